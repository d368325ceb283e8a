//! loraplane-trainer as a library: the binary in `main.rs` is a thin wrapper, and tests and
//! benchmarks drive the same code.
//!
//! - `model`: the diffusion model (UNet with LoRA adapters, text encoders, VAE encoder) built
//!   from diffusers `config.json` files and safetensors, with differentiable ops throughout.

pub mod model;
