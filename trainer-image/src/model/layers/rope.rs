//! Rotary position embedding over several axes, as FLUX.1 uses it (diffusers' `FluxPosEmbed`
//! with `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`): each token has one
//! position per axis (FLUX.1: text index, latent row, latent column), each axis owns a slice of
//! the head dimension, and consecutive pairs of a head's channels are rotated by the angle
//! `position · θ^(-2j/d)` of their axis.
//!
//! The tables depend on positions only, so they are computed once per input size (in f64 on
//! the host, as diffusers does) and applied with elementary ops: differentiable on every device.

use candle_core::{D, DType, Device, Result, Tensor};

/// cos and sin of every token's rotation angles, (S, head_dim) each, channels of one pair
/// repeated (`repeat_interleave(2)`).
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    /// Tables for `positions` (one row of `axes.len()` positions per token), `axes` the head
    /// channels per axis (each even, summing to the head dimension).
    pub fn new(
        positions: &[Vec<f64>],
        axes: &[usize],
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let head_dim: usize = axes.iter().sum();
        if axes.iter().any(|d| d % 2 != 0) {
            candle_core::bail!("rotary axes {axes:?}: every axis needs an even channel count");
        }
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        for row in positions {
            if row.len() != axes.len() {
                candle_core::bail!("rotary position {row:?} has not {} axes", axes.len());
            }
            for (&pos, &dim) in row.iter().zip(axes) {
                for j in (0..dim).step_by(2) {
                    let angle = pos / theta.powf(j as f64 / dim as f64);
                    let (s, c) = angle.sin_cos();
                    cos.extend([c as f32; 2]);
                    sin.extend([s as f32; 2]);
                }
            }
        }
        let shape = (positions.len(), head_dim);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x` (B, S, H, head_dim): each channel pair (a, b) becomes
    /// (a·cos − b·sin, b·cos + a·sin), computed in the tables' dtype (f32 for half-precision
    /// models, as diffusers does) and returned in `x`'s.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(self.cos.dtype())?;
        let (b, s, h, d) = x.dims4()?;
        let pairs = x.reshape((b, s, h, d / 2, 2))?;
        let real = pairs.narrow(D::Minus1, 0, 1)?;
        let imag = pairs.narrow(D::Minus1, 1, 1)?;
        let rotated = Tensor::cat(&[&imag.neg()?, &real], D::Minus1)?.reshape((b, s, h, d))?;
        let cos = self.cos.reshape((1, s, 1, d))?;
        let sin = self.sin.reshape((1, s, 1, d))?;
        (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_rotation_keeps_each_pairs_length_and_turns_it_by_its_angle() {
        // One token at position 3 on a single axis of 4 channels: pairs turn by 3 and 3/100.
        let t = RopeTables::new(&[vec![3.0]], &[4], 10_000.0, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::new(&[1f32, 0.0, 0.0, 2.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let y: Vec<f32> = t
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (a0, a1) = (3f64, 3f64 / 100.0);
        let want = [a0.cos(), a0.sin(), -2.0 * a1.sin(), 2.0 * a1.cos()];
        for (got, want) in y.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn odd_axes_are_refused() {
        assert!(RopeTables::new(&[vec![0.0]], &[3], 10_000.0, DType::F32, &Device::Cpu).is_err());
    }
}
