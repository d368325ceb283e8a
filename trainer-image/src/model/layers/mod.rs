//! The differentiable layers every model family is built from: `ops` (linear, conv, norms,
//! activations, attention; each hands over to a CPU kernel in `kernels` where one applies),
//! `lora` (the LoRA adapter on a frozen linear) and `checkpoint` (gradient checkpointing of a
//! block).

pub(crate) mod checkpoint;
pub mod lora;
pub mod ops;
