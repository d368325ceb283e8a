//! The hand-written CPU kernels behind the layers, for f32 tensors on the CPU (`storage::fusable`);
//! every other device and dtype takes the layers' composed candle ops instead:
//! - `attention`: flash-style attention forward and backward (no sequence-squared matrix);
//! - `conv`: frozen convolutions as GEMMs in NCHW, forward and input gradient;
//! - `fused`: group/layer norm and the activations, one pass each way;
//! - `gemm`, `simd`: the GEMM call and run-time SIMD dispatch they share (the only `unsafe`
//!   of the model, each with its safety argument);
//! - `storage`: what every custom op shares (tensor storage as slices, outputs computed
//!   before their op joins the graph).

pub(crate) mod attention;
pub(crate) mod conv;
pub(crate) mod fused;
pub(crate) mod gemm;
pub(crate) mod simd;
pub(crate) mod storage;
