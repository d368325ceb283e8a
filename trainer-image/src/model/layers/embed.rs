//! Embeddings of scalars shared by the families: diffusers' sinusoidal timestep features and
//! `TimestepEmbedding` (linear, SiLU, linear), which the UNet uses for its timestep and SDXL's
//! size conditioning, and FLUX.1 for its timestep and guidance.

use candle_core::{DType, Module, Result, Tensor};

use super::ops::{self, Linear};
use crate::model::ModelError;
use crate::model::weights::Weights;

/// Sinusoidal timestep features as diffusers' `get_timestep_embedding` (max period 10000).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let t = timesteps.to_dtype(DType::F32)?.flatten_all()?;
    // In f32 step by step, as PyTorch computes it: FLUX.1 multiplies σ by 1000, and at such
    // arguments one ulp of a frequency moves the sine visibly.
    let exponent: Vec<f32> = (0..half)
        .map(|i| {
            let e =
                -(10000f64.ln() as f32) * i as f32 / (half as f32 - downscale_freq_shift as f32);
            e.exp()
        })
        .collect();
    let freqs = Tensor::from_vec(exponent, (1, half), t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `TimestepEmbedding`: linear_1, SiLU, linear_2.
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn load(
        vb: &Weights,
        in_dim: usize,
        out_dim: usize,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            linear_1: Linear::load(&vb.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::load(&vb.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&ops::silu(&self.linear_1.forward(x)?)?)
    }
}
