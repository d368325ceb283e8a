//! loraplane-trainer as a library: the binary in `main.rs` is a thin wrapper, and tests and
//! benchmarks drive the same code.
//!
//! - `model`: the diffusion models (SD1.5/SDXL's UNet, FLUX.1's transformer, with LoRA
//!   adapters; their text encoders and VAE) built from diffusers `config.json` files and
//!   safetensors, with differentiable ops throughout.
//! - `config`: the job's config file, checked key by key.
//! - `dataset`: zip validation, captions, centre crop.
//! - `schedule`: DDPM noise schedule, targets, min-SNR weights, learning-rate schedule;
//!   `flow`: flow matching's noise levels (FLUX.1); `objective`: what one training sample
//!   draws from either.
//! - `optim`: AdamW with saveable state and gradient clipping.
//! - `rng`: the seeded, saveable random source.
//! - `checkpoint`, `tensors`: checkpoint files and safetensors with metadata.
//! - `export`: kohya and diffusers/PEFT LoRA files.
//! - `storage`: local paths and S3.
//! - `progress`: event lines and the termination summary.
//! - `train`: one run, end to end.
//! - `alloc`, `threads`: the global allocator the binaries declare (malloc tuned for
//!   training) and the thread settings they apply at start.

pub mod alloc;
pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod export;
pub mod flow;
pub mod model;
pub mod objective;
pub mod optim;
pub mod preview;
pub mod progress;
pub mod rng;
pub mod sampler;
pub mod samples;
pub mod schedule;
pub mod storage;
pub mod tensors;
pub mod threads;
pub mod train;
