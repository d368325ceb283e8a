//! Fused CPU kernels with hand-written backward passes: GroupNorm and LayerNorm with a frozen
//! affine, the SiLU and exact-GELU activations, and the GEGLU feed-forward gate.
//!
//! The composed norms in `layers/ops.rs` (mean, subtract, square, mean, add, sqrt, divide, scale,
//! shift) are differentiable by candle but keep about four input-sized intermediates per norm
//! alive for the backward pass and walk the data nine times, single-threaded. A full SD1.5
//! UNet at 512 px has 61 GroupNorms and 48 LayerNorms on tensors of up to 5 MiB each, so those
//! intermediates were 2.5 GB of the step's peak. Here the backward keeps only the input (the
//! statistics are recomputed from it: one extra read, far cheaper than keeping them), and both
//! passes run over row blocks in parallel. candle's SiLU and GELU are single kernels forward,
//! but their backward passes are built from 8–13 elementwise ops each; here it is one pass.
//!
//! A norm's "row" is what one set of statistics covers: (sample, group) for GroupNorm, one
//! token for LayerNorm. The base model's scale and shift are frozen, so only the input
//! gradient is computed: with x̂ = (x − μ)·r, g = dy·γ and means over the row,
//! dx = r · (g − mean(g) − x̂ · mean(g · x̂)).
//!
//! Used for f32 tensors on the CPU (`fusable`); other devices and dtypes keep the composed
//! versions, and the tests check the fused kernels against them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd;
use super::storage::contiguous_f32;

/// How a row's elements map to the affine parameters.
#[derive(Debug, Clone, Copy)]
enum Affine {
    /// GroupNorm: the row is `channels_per_group` channels of `spatial` elements each, the
    /// row's group is `row % groups`.
    Group {
        groups: usize,
        channels_per_group: usize,
        spatial: usize,
    },
    /// LayerNorm: element i of every row uses parameter i.
    Layer,
}

impl Affine {
    /// Elements in a row that share one parameter, and the parameter of the row's first.
    fn segments(self, row: usize) -> (usize, usize) {
        match self {
            Affine::Group {
                groups,
                channels_per_group,
                spatial,
            } => (spatial, (row % groups) * channels_per_group),
            Affine::Layer => (1, 0),
        }
    }
}

/// One norm: its frozen parameters and geometry.
#[derive(Debug, Clone)]
struct FusedNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    row_len: usize,
    affine: Affine,
    eps: f64,
}

/// (Σ d·w, Σ d·w·(x − mean)) over a row, w one weight per element, in f64 lanes.
#[inline(always)]
fn gradient_sums(xs: &[f32], ds: &[f32], ws: impl Fn(usize) -> f32, mean: f32) -> (f64, f64) {
    let (mut g, mut gx) = ([0f64; simd::F64_LANES], [0f64; simd::F64_LANES]);
    let len = xs.len().min(ds.len());
    let whole = len / simd::F64_LANES * simd::F64_LANES;
    for i0 in (0..whole).step_by(simd::F64_LANES) {
        for l in 0..simd::F64_LANES {
            let i = i0 + l;
            let d = ds[i] * ws(i);
            g[l] += f64::from(d);
            gx[l] += f64::from(d * (xs[i] - mean));
        }
    }
    let (mut tail_g, mut tail_gx) = (0f64, 0f64);
    for i in whole..len {
        let d = ds[i] * ws(i);
        tail_g += f64::from(d);
        tail_gx += f64::from(d * (xs[i] - mean));
    }
    (
        g.iter().sum::<f64>() + tail_g,
        gx.iter().sum::<f64>() + tail_gx,
    )
}

/// Mean and reciprocal standard deviation of a row (two passes in f64: the rows are up to
/// 160k elements, where a one-pass f32 variance loses digits).
#[inline(always)]
fn stats(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = simd::sum_f64(row, f64::from) / n;
    let var = simd::sum_f64(row, |v| {
        let d = f64::from(v) - mean;
        d * d
    }) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

simd::multiversion! {
    /// One row of the forward pass: y = (x − mean) · rstd · γ + β.
    fn forward_row(norm: &FusedNorm, row: usize, xr: &[f32], yr: &mut [f32]) {
        let (mean, rstd) = stats(xr, norm.eps);
        match norm.affine {
            Affine::Layer => {
                for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(&norm.gamma).zip(&norm.beta) {
                    *o = (v - mean) * (rstd * g) + b;
                }
            }
            Affine::Group { .. } => {
                let (seg, base) = norm.affine.segments(row);
                for (j, (ys, xs)) in yr.chunks_mut(seg).zip(xr.chunks(seg)).enumerate() {
                    let (scale, shift) = (rstd * norm.gamma[base + j], norm.beta[base + j]);
                    for (o, &v) in ys.iter_mut().zip(xs) {
                        *o = (v - mean) * scale + shift;
                    }
                }
            }
        }
    }
}

simd::multiversion! {
    /// One row of the backward pass: dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)), g = dy · γ.
    fn backward_row(norm: &FusedNorm, row: usize, xr: &[f32], dyr: &[f32], dxr: &mut [f32]) {
        let n = xr.len() as f64;
        let (mean, rstd) = stats(xr, norm.eps);
        let (sum_g, sum_gd) = match norm.affine {
            Affine::Layer => gradient_sums(xr, dyr, |i| norm.gamma[i], mean),
            Affine::Group { .. } => {
                let (seg, base) = norm.affine.segments(row);
                xr.chunks(seg)
                    .zip(dyr.chunks(seg))
                    .enumerate()
                    .fold((0f64, 0f64), |(a, b), (j, (xs, ds))| {
                        let (g, gd) = gradient_sums(xs, ds, |_| 1.0, mean);
                        let gamma = f64::from(norm.gamma[base + j]);
                        (a + gamma * g, b + gamma * gd)
                    })
            }
        };
        // Σ g·x̂ = rstd · Σ g·(x − mean).
        let (mean_g, mean_gx) = ((sum_g / n) as f32, (sum_gd * f64::from(rstd) / n) as f32);
        match norm.affine {
            Affine::Layer => {
                for (((o, &v), &d), &g) in dxr.iter_mut().zip(xr).zip(dyr).zip(&norm.gamma) {
                    *o = rstd * (d * g - mean_g - (v - mean) * rstd * mean_gx);
                }
            }
            Affine::Group { .. } => {
                let (seg, base) = norm.affine.segments(row);
                for (j, (os, (xs, ds))) in dxr
                    .chunks_mut(seg)
                    .zip(xr.chunks(seg).zip(dyr.chunks(seg)))
                    .enumerate()
                {
                    let gamma = norm.gamma[base + j];
                    for (o, (&v, &d)) in os.iter_mut().zip(xs.iter().zip(ds)) {
                        *o = rstd * (d * gamma - mean_g - (v - mean) * rstd * mean_gx);
                    }
                }
            }
        }
    }
}

impl FusedNorm {
    fn check(&self, len: usize) -> Result<()> {
        if self.row_len == 0 || !len.is_multiple_of(self.row_len) {
            candle_core::bail!(
                "fused norm: {len} elements do not split into rows of {}",
                self.row_len
            );
        }
        Ok(())
    }

    fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.check(x.len())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(self.row_len)
            .zip(x.par_chunks(self.row_len))
            .enumerate()
            .for_each(|(row, (yr, xr))| forward_row(self, row, xr, yr));
        Ok(y)
    }

    fn backward(&self, x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        self.check(x.len())?;
        if dy.len() != x.len() {
            candle_core::bail!(
                "fused norm: gradient has {} elements, input {}",
                dy.len(),
                x.len()
            );
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(self.row_len)
            .zip(x.par_chunks(self.row_len).zip(dy.par_chunks(self.row_len)))
            .enumerate()
            .for_each(|(row, (dxr, (xr, dyr)))| backward_row(self, row, xr, dyr, dxr));
        Ok(dx)
    }
}

impl CustomOp1 for FusedNorm {
    fn name(&self) -> &'static str {
        "fused-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "fused norm input")?;
        Ok((CpuStorage::F32(self.forward(x)?), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        input_gradient(arg, grad, &FusedNormGrad(self.clone()))
    }
}

/// The input gradient of a `FusedNorm`, as an op of (input, output gradient).
struct FusedNormGrad(FusedNorm);

impl CustomOp2 for FusedNormGrad {
    fn name(&self) -> &'static str {
        "fused-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "fused norm input")?;
        let dy = contiguous_f32(gs, gl, "fused norm gradient")?;
        Ok((CpuStorage::F32(self.0.backward(x, dy)?), xl.shape().clone()))
    }
}

/// A fused op's backward pass: its gradient op applied to (input, output gradient).
fn input_gradient(arg: &Tensor, grad: &Tensor, op: &impl CustomOp2) -> Result<Option<Tensor>> {
    let grad = grad.contiguous()?;
    Ok(Some(arg.apply_op2_no_bwd(&grad, op)?))
}

/// The scale and shift as plain vectors, refused unless each has `len` entries (the kernels
/// index them per channel or position and must not read past them).
fn affine_params(weight: &Tensor, bias: &Tensor, len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let gamma: Vec<f32> = weight.to_dtype(DType::F32)?.to_vec1()?;
    let beta: Vec<f32> = bias.to_dtype(DType::F32)?.to_vec1()?;
    if gamma.len() != len || beta.len() != len {
        candle_core::bail!(
            "fused norm: {len} channels but {} weights and {} biases",
            gamma.len(),
            beta.len()
        );
    }
    Ok((gamma, beta))
}

/// GroupNorm of a (B, C, ...) f32 CPU tensor with a frozen affine.
pub(crate) fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm: {dims:?} does not split into {groups} groups");
    }
    let (c, spatial) = (dims[1], dims[2..].iter().product::<usize>());
    let (gamma, beta) = affine_params(weight, bias, c)?;
    let op = FusedNorm {
        gamma,
        beta,
        row_len: c / groups * spatial,
        affine: Affine::Group {
            groups,
            channels_per_group: c / groups,
            spatial,
        },
        eps,
    };
    x.contiguous()?.apply_op1(op)
}

/// LayerNorm over the last dimension of an f32 CPU tensor with a frozen affine.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let row_len = x.dim(candle_core::D::Minus1)?;
    let (gamma, beta) = affine_params(weight, bias, row_len)?;
    let op = FusedNorm {
        gamma,
        beta,
        row_len,
        affine: Affine::Layer,
        eps,
    };
    x.contiguous()?.apply_op1(op)
}

/// An elementwise activation with a hand-written derivative.
#[derive(Debug, Clone, Copy)]
enum Activation {
    /// x · σ(x).
    Silu,
    /// Exact GELU: x · Φ(x), Φ the standard normal CDF (through erf).
    GeluErf,
}

/// Elements per parallel task: big enough to amortise the task, small enough to spread.
const ELEMENTWISE_CHUNK: usize = 1 << 15;

impl Activation {
    #[inline(always)]
    fn value(self, x: f32) -> f32 {
        match self {
            Activation::Silu => x / (1.0 + simd::exp(-x)),
            Activation::GeluErf => 0.5 * x * (1.0 + simd::erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        }
    }

    #[inline(always)]
    fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Silu => {
                let s = 1.0 / (1.0 + simd::exp(-x));
                s * (1.0 + x * (1.0 - s))
            }
            Activation::GeluErf => {
                // Φ(x) + x φ(x), φ(x) = exp(−x²/2) / √(2π).
                const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
                let cdf = 0.5 * (1.0 + simd::erf(x * std::f32::consts::FRAC_1_SQRT_2));
                cdf + x * FRAC_1_SQRT_2PI * simd::exp(-0.5 * x * x)
            }
        }
    }
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self {
            Activation::Silu => "fused-silu",
            Activation::GeluErf => "fused-gelu-erf",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "fused activation input")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(x.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|(ys, xs)| activation_values(*self, xs, ys));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        input_gradient(arg, grad, &ActivationGrad(*self))
    }
}

/// The input gradient of an `Activation`, as an op of (input, output gradient).
struct ActivationGrad(Activation);

impl CustomOp2 for ActivationGrad {
    fn name(&self) -> &'static str {
        "fused-activation-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "fused activation input")?;
        let dy = contiguous_f32(gs, gl, "fused activation gradient")?;
        if x.len() != dy.len() {
            candle_core::bail!(
                "fused activation: gradient has {} elements, input {}",
                dy.len(),
                x.len()
            );
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(
                x.par_chunks(ELEMENTWISE_CHUNK)
                    .zip(dy.par_chunks(ELEMENTWISE_CHUNK)),
            )
            .for_each(|(os, (xs, ds))| activation_grads(self.0, xs, ds, os));
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

simd::multiversion! {
    /// `ys[i] = f(xs[i])`, vectorised (the activation's `match` is hoisted out of the loop).
    fn activation_values(f: Activation, xs: &[f32], ys: &mut [f32]) {
        match f {
            Activation::Silu => ys
                .iter_mut()
                .zip(xs)
                .for_each(|(o, &v)| *o = Activation::Silu.value(v)),
            Activation::GeluErf => ys
                .iter_mut()
                .zip(xs)
                .for_each(|(o, &v)| *o = Activation::GeluErf.value(v)),
        }
    }
}

simd::multiversion! {
    /// `os[i] = ds[i] · f'(xs[i])`, vectorised.
    fn activation_grads(f: Activation, xs: &[f32], ds: &[f32], os: &mut [f32]) {
        match f {
            Activation::Silu => os
                .iter_mut()
                .zip(xs.iter().zip(ds))
                .for_each(|(o, (&v, &d))| *o = d * Activation::Silu.derivative(v)),
            Activation::GeluErf => os
                .iter_mut()
                .zip(xs.iter().zip(ds))
                .for_each(|(o, (&v, &d))| *o = d * Activation::GeluErf.derivative(v)),
        }
    }
}

/// SiLU of an f32 CPU tensor.
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Activation::Silu)
}

/// Exact (erf) GELU of an f32 CPU tensor.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Activation::GeluErf)
}

/// GEGLU, diffusers' feed-forward gate: for x (..., 2n), hidden = x[..., :n] and gate =
/// x[..., n:], y = hidden · GELU(gate). One pass each way; composed from candle ops it was two
/// narrows, a copy, a GELU and a product forward, and backward the two narrows' gradients
/// padded to the full width and summed (SD1.5 at 512 px: 42 MB per block at 64x64).
#[derive(Debug, Clone, Copy)]
struct Geglu {
    /// n: the width of y's rows (half of x's).
    half: usize,
}

impl Geglu {
    fn check(&self, x: usize, y: usize) -> Result<()> {
        if self.half == 0 || !x.is_multiple_of(2 * self.half) || y != x / 2 {
            candle_core::bail!(
                "geglu: {x} input and {y} output elements for rows of {}",
                2 * self.half
            );
        }
        Ok(())
    }
}

simd::multiversion! {
    /// Rows of `y` (n) from rows of `x` (2n).
    fn geglu_rows(x: &[f32], y: &mut [f32], n: usize) {
        for (yr, xr) in y.chunks_mut(n).zip(x.chunks(2 * n)) {
            let (hidden, gate) = xr.split_at(n);
            for ((o, &h), &g) in yr.iter_mut().zip(hidden).zip(gate) {
                *o = h * Activation::GeluErf.value(g);
            }
        }
    }
}

simd::multiversion! {
    /// Rows of dx (2n) from rows of x (2n) and dy (n).
    fn geglu_grad_rows(x: &[f32], dy: &[f32], dx: &mut [f32], n: usize) {
        for ((dxr, xr), dyr) in dx.chunks_mut(2 * n).zip(x.chunks(2 * n)).zip(dy.chunks(n)) {
            let (hidden, gate) = xr.split_at(n);
            let (d_hidden, d_gate) = dxr.split_at_mut(n);
            for i in 0..n.min(dyr.len()) {
                let (h, g, d) = (hidden[i], gate[i], dyr[i]);
                d_hidden[i] = d * Activation::GeluErf.value(g);
                d_gate[i] = d * h * Activation::GeluErf.derivative(g);
            }
        }
    }
}

/// Rows per parallel task: about `ELEMENTWISE_CHUNK` elements.
fn rows_per_task(row_len: usize) -> usize {
    (ELEMENTWISE_CHUNK / row_len.max(1)).max(1)
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "fused geglu input")?;
        let mut y = vec![0f32; x.len() / 2];
        self.check(x.len(), y.len())?;
        let (n, rows) = (self.half, rows_per_task(2 * self.half));
        y.par_chunks_mut(rows * n)
            .zip(x.par_chunks(rows * 2 * n))
            .for_each(|(ys, xs)| geglu_rows(xs, ys, n));
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        input_gradient(arg, grad, &GegluGrad(*self))
    }
}

/// The input gradient of `Geglu`, as an op of (input, output gradient).
struct GegluGrad(Geglu);

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "fused-geglu-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "fused geglu input")?;
        let dy = contiguous_f32(gs, gl, "fused geglu gradient")?;
        self.0.check(x.len(), dy.len())?;
        let (n, rows) = (self.0.half, rows_per_task(2 * self.0.half));
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(rows * 2 * n)
            .zip(x.par_chunks(rows * 2 * n).zip(dy.par_chunks(rows * n)))
            .for_each(|(dxs, (xs, dys))| geglu_grad_rows(xs, dys, dxs, n));
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// GEGLU of an f32 CPU tensor whose last dimension holds hidden then gate.
pub(crate) fn geglu(x: &Tensor) -> Result<Tensor> {
    let width = x.dim(candle_core::D::Minus1)?;
    if !width.is_multiple_of(2) {
        candle_core::bail!("geglu: odd last dimension {width}");
    }
    x.contiguous()?.apply_op1(Geglu { half: width / 2 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::storage::fusable;
    use crate::model::layers::ops::tests::max_diff;
    use crate::model::layers::ops::{GroupNorm, LayerNorm};
    use candle_core::{Device, Module, Var};

    /// Deterministic, uneven data: offsets per position so every row has its own mean.
    fn data(shape: &[usize], phase: f64) -> Vec<f64> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|i| {
                let i = i as f64;
                (i * 0.37 + phase).sin() * 2.0 + (i * 0.011).cos() * 3.0 + phase
            })
            .collect()
    }

    fn tensor(v: &[f64], shape: &[usize], dtype: DType) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// The largest element difference relative to the largest element of `b`.
    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let zero = b.zeros_like().unwrap();
        max_diff(a, b) / max_diff(b, &zero).max(1e-12)
    }

    /// The f32 kernel's value and gradient against the f64 reference's: f32 rounding only.
    fn assert_matches_reference(fused: &(Tensor, Tensor), reference: &(Tensor, Tensor)) {
        let value = max_rel_diff(&fused.0, &reference.0);
        let grad = max_rel_diff(&fused.1, &reference.1);
        assert!(value < 1e-5, "value differs by {value}");
        assert!(grad < 1e-4, "gradient differs by {grad}");
    }

    /// y and dL/dx for L = sum(y * r), from `norm` applied to x in `dtype`.
    fn value_and_grad(
        x: &[f64],
        r: &[f64],
        shape: &[usize],
        dtype: DType,
        norm: impl Fn(&Tensor) -> Tensor,
    ) -> (Tensor, Tensor) {
        let var = Var::from_tensor(&tensor(x, shape, dtype)).unwrap();
        let y = norm(var.as_tensor());
        let loss = (&y * tensor(r, shape, dtype)).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        (y, grads.get(var.as_tensor()).unwrap().clone())
    }

    #[test]
    fn fused_group_norm_matches_the_composed_reference_value_and_gradient() {
        let (shape, groups, eps) = ([2usize, 6, 5, 7], 3usize, 1e-5);
        let gamma: Vec<f64> = (0..6).map(|c| 0.5 + c as f64 * 0.25).collect();
        let beta: Vec<f64> = (0..6).map(|c| c as f64 * 0.1 - 0.2).collect();
        let norm = |dtype| {
            GroupNorm::from_parts(
                tensor(&gamma, &[6], dtype),
                tensor(&beta, &[6], dtype),
                groups,
                eps,
            )
        };
        let (x, r) = (data(&shape, 0.3), data(&shape, 1.7));
        let reference = value_and_grad(&x, &r, &shape, DType::F64, |t| {
            norm(DType::F64).forward_composed(t).unwrap()
        });
        let ours = value_and_grad(&x, &r, &shape, DType::F32, |t| {
            assert!(fusable(t));
            norm(DType::F32).forward(t).unwrap()
        });
        assert_matches_reference(&ours, &reference);
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_reference_value_and_gradient() {
        let (shape, eps) = ([2usize, 5, 16], 1e-5);
        let gamma: Vec<f64> = (0..16).map(|i| 1.0 + i as f64 * 0.05).collect();
        let beta: Vec<f64> = (0..16).map(|i| i as f64 * -0.03).collect();
        let norm = |dtype| {
            LayerNorm::from_parts(
                tensor(&gamma, &[16], dtype),
                tensor(&beta, &[16], dtype),
                eps,
            )
        };
        let (x, r) = (data(&shape, 0.9), data(&shape, 2.3));
        let reference = value_and_grad(&x, &r, &shape, DType::F64, |t| {
            norm(DType::F64).forward_composed(t).unwrap()
        });
        let ours = value_and_grad(&x, &r, &shape, DType::F32, |t| {
            assert!(fusable(t));
            norm(DType::F32).forward(t).unwrap()
        });
        assert_matches_reference(&ours, &reference);
    }

    /// Off the CPU-f32 kernels (other devices, other dtypes) the norms are one lean graph node
    /// each (`ops::lean_norm`); in f64 it must agree with the composed ops to rounding, and in
    /// bf16 (statistics in f32) to bf16's precision.
    #[test]
    fn lean_norms_match_the_composed_reference_value_and_gradient() {
        let (shape, groups, eps) = ([2usize, 6, 5, 7], 3usize, 1e-5);
        let gamma: Vec<f64> = (0..6).map(|c| 0.5 + c as f64 * 0.25).collect();
        let beta: Vec<f64> = (0..6).map(|c| c as f64 * 0.1 - 0.2).collect();
        let group = |dtype| {
            GroupNorm::from_parts(
                tensor(&gamma, &[6], dtype),
                tensor(&beta, &[6], dtype),
                groups,
                eps,
            )
        };
        // The layer norm normalises the last dimension, 7 wide.
        let (gamma7, beta7): (Vec<f64>, Vec<f64>) = (0..7)
            .map(|i| (1.0 + i as f64 * 0.05, i as f64 * -0.03))
            .unzip();
        let layer = |dtype| {
            LayerNorm::from_parts(
                tensor(&gamma7, &[7], dtype),
                tensor(&beta7, &[7], dtype),
                eps,
            )
        };
        let (x, r) = (data(&shape, 0.3), data(&shape, 1.7));
        type Norm<'a> = Box<dyn Fn(DType, &Tensor, bool) -> Tensor + 'a>;
        let norms: [(&str, Norm); 2] = [
            (
                "group",
                Box::new(move |d, t, lean| {
                    let n = group(d);
                    if lean {
                        n.forward(t)
                    } else {
                        n.forward_composed(t)
                    }
                    .unwrap()
                }),
            ),
            (
                "layer",
                Box::new(move |d, t, lean| {
                    let n = layer(d);
                    if lean {
                        n.forward(t)
                    } else {
                        n.forward_composed(t)
                    }
                    .unwrap()
                }),
            ),
        ];
        for (name, norm) in norms {
            let reference =
                value_and_grad(&x, &r, &shape, DType::F64, |t| norm(DType::F64, t, false));
            let lean = value_and_grad(&x, &r, &shape, DType::F64, |t| {
                assert!(!fusable(t));
                norm(DType::F64, t, true)
            });
            let (value, grad) = (
                max_rel_diff(&lean.0, &reference.0),
                max_rel_diff(&lean.1, &reference.1),
            );
            assert!(
                value < 1e-12 && grad < 1e-10,
                "{name} f64: value {value}, gradient {grad}"
            );
            let half = value_and_grad(&x, &r, &shape, DType::BF16, |t| norm(DType::BF16, t, true));
            let (value, grad) = (
                max_rel_diff(&half.0, &reference.0),
                max_rel_diff(&half.1, &reference.1),
            );
            assert!(
                value < 2e-2 && grad < 5e-2,
                "{name} bf16: value {value}, gradient {grad}"
            );
        }
    }

    #[test]
    fn fused_activations_match_candles_value_and_gradient() {
        // Wider than one parallel chunk, so chunk edges are crossed.
        let shape = [2usize, 40_000];
        let x: Vec<f64> = data(&shape, 0.4).iter().map(|v| v * 1.5).collect();
        let r = data(&shape, 1.1);
        type Act = fn(&Tensor) -> Result<Tensor>;
        let pairs: [(Act, Act); 2] = [(silu, Tensor::silu), (gelu_erf, Tensor::gelu_erf)];
        for (fused, candle) in pairs {
            let reference = value_and_grad(&x, &r, &shape, DType::F64, |t| candle(t).unwrap());
            let ours = value_and_grad(&x, &r, &shape, DType::F32, |t| fused(t).unwrap());
            assert_matches_reference(&ours, &reference);
        }
    }

    #[test]
    fn fused_geglu_matches_the_composed_value_and_gradient() {
        // Rows wider than one parallel task's share, and several rows.
        let shape = [2usize, 3, 2 * 6000];
        let x: Vec<f64> = data(&shape, 0.2).iter().map(|v| v * 0.8).collect();
        let r = data(&[2, 3, 6000], 2.1);
        let composed = |t: &Tensor| -> Tensor {
            let hidden = t.narrow(2, 0, 6000).unwrap();
            let gate = t.narrow(2, 6000, 6000).unwrap();
            (hidden * gate.gelu_erf().unwrap()).unwrap()
        };
        let run = |dtype, f: &dyn Fn(&Tensor) -> Tensor| {
            let var = Var::from_tensor(&tensor(&x, &shape, dtype)).unwrap();
            let y = f(var.as_tensor());
            let loss = (&y * tensor(&r, &[2, 3, 6000], dtype))
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            (y, grads.get(var.as_tensor()).unwrap().clone())
        };
        let reference = run(DType::F64, &composed);
        let ours = run(DType::F32, &|t| geglu(t).unwrap());
        assert_eq!(ours.0.dims(), &[2, 3, 6000]);
        assert_matches_reference(&ours, &reference);
        assert!(geglu(&tensor(&[1.0, 2.0, 3.0], &[3], DType::F32)).is_err());
    }

    #[test]
    fn a_view_into_a_larger_tensor_is_normalised_like_its_copy() {
        // Rows 1..3 of a contiguous tensor: contiguous, but starting at an offset.
        let x = tensor(&data(&[4, 6], 0.1), &[4, 6], DType::F32);
        let view = x.narrow(0, 1, 2).unwrap();
        let copy = Tensor::from_vec(
            view.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (2, 6),
            &Device::Cpu,
        )
        .unwrap();
        let (w, b) = (
            Tensor::ones(6, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap(),
        );
        let a = layer_norm(&view, &w, &b, 1e-5).unwrap();
        let c = layer_norm(&copy, &w, &b, 1e-5).unwrap();
        assert_eq!(max_rel_diff(&a, &c), 0.0);
        // And the rows really are the view's, not the tensor's first ones.
        let first = layer_norm(&x.narrow(0, 0, 2).unwrap(), &w, &b, 1e-5).unwrap();
        assert!(max_rel_diff(&first, &c) > 0.0);
    }

    #[test]
    fn parameters_of_the_wrong_length_are_an_error_not_a_panic() {
        let x = tensor(&data(&[1, 4, 3, 3], 0.2), &[1, 4, 3, 3], DType::F32);
        let three = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let four = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        assert!(group_norm(&x, 2, &three, &four, 1e-5).is_err());
        assert!(layer_norm(&x, &four, &four, 1e-5).is_err(), "last dim is 3");
        assert!(group_norm(&x, 2, &four, &four, 1e-5).is_ok());
    }

    #[test]
    fn only_f32_on_the_cpu_takes_the_fused_path() {
        let dev = Device::Cpu;
        assert!(fusable(&Tensor::zeros(3, DType::F32, &dev).unwrap()));
        assert!(!fusable(&Tensor::zeros(3, DType::F64, &dev).unwrap()));
        assert!(!fusable(&Tensor::zeros(3, DType::BF16, &dev).unwrap()));
    }
}
