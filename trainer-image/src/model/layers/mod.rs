//! The differentiable layers every model family is built from: `ops` (linear, conv, norms,
//! activations, attention; each hands over to a CPU kernel in `kernels` where one applies),
//! `embed` (sinusoidal timestep features and their MLP),
//! `lora` (the LoRA adapter on a frozen linear), `rope` (rotary position embedding over
//! several axes) and `checkpoint` (gradient checkpointing of a block).

pub(crate) mod checkpoint;
pub mod embed;
pub mod lora;
pub mod ops;
pub mod rope;
