//! The Stable Diffusion family, SD1.5 and SDXL, from the diffusers layout: the conditional
//! UNet (`unet`), the VAE encoder (`vae`), the CLIP text encoders (`clip`) and their BPE
//! tokenizer (`tokenizer`), and `model`, which puts them together for training and rendering.
//! Each reads its `Config` from the component's `config.json` and loads block by block, so a
//! tiny checkpoint and the published one load through the same code.

pub mod clip;
pub mod model;
pub mod tokenizer;
pub mod unet;
pub mod vae;
