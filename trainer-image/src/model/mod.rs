//! The diffusion model built from a diffusers folder. SKELETON: being written.
