//! The FLUX.1 family (dev, schnell and their fine-tunes), from the diffusers layout: the
//! rectified-flow transformer (`transformer`). Like `sd`, each component reads its `Config`
//! from its `config.json` and loads block by block, so a tiny checkpoint and the published one
//! load through the same code.

pub mod transformer;
