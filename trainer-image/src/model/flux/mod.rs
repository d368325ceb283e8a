//! The FLUX.1 family (dev, schnell and their fine-tunes), from the diffusers layout: the
//! rectified-flow transformer (`transformer`), T5's encoder (`t5`) and tokenizer
//! (`tokenizer`), and `pipeline`, which puts them together for training and rendering. Its CLIP text encoder and 16-channel autoencoder are the same
//! architectures as Stable Diffusion's, built from their configs by `sd::clip` and `sd::vae`.
//! Like `sd`, each component reads its `Config` from its `config.json` and loads block by
//! block, so a tiny checkpoint and the published one load through the same code.

pub mod pipeline;
mod spiece;
pub mod t5;
pub mod tokenizer;
pub mod transformer;
