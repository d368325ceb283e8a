//! The frozen 2-D convolutions of the UNet on the CPU in f32: forward and input gradient as
//! GEMMs in NCHW, with the data movement around the GEMMs kept to contiguous copies.
//!
//! candle 0.11's CPU `conv2d` converts the input to NHWC single-threaded, reorders the whole
//! kernel into a new (out, kh·kw·in) buffer on every call (59 MB for a 1280-channel 3x3
//! kernel), fills 512-pixel im2col tiles with strided writes and scatters each tile's result
//! back with a stride of H·W; the input gradient went through another such convolution with a
//! transposed and flipped copy of the kernel (stride 2: candle's direct-loop
//! `conv_transpose2d`). Here, per batch item:
//!
//! - stride 1 on large planes (SD1.5's 64x64 latents): `correlate`, one GEMM per kernel tap
//!   reading the zero-padded input planes in place at the tap's offset, no im2col; the input
//!   gradient is the same correlation of the output gradient with the flipped kernel.
//!
//! Otherwise (strided, small planes, few channels):
//!
//! - forward: `cols` (C·kh·kw, pixels) holds in row (c, ky, kx) input plane c shifted by
//!   (ky, kx) (and subsampled for stride 2), zero outside: a few contiguous copies per row,
//!   built in parallel over channels. The kernel's own contiguous (O, C, kh, kw) layout already
//!   is the (O, C·kh·kw) matrix, so `y = W · cols` needs no reordering and comes out in NCHW;
//!   the bias is added as it is copied into the output.
//! - input gradient: `dcols = Wᵀ · dy` (a transposed view of the same kernel, no copy), then
//!   col2im adds each row of `dcols` back onto its shifted input plane. Each parallel task owns
//!   whole input planes, so there are no races, and stride 2 is the same loop.
//!
//! `cols` is built for a band of output rows at a time and `dcols` for a group of input
//! channels at a time, at most `COLUMN_BUDGET` elements each: the whole `cols` of a 3x3
//! convolution is 9x its input (94 MB for 640 channels at 64x64), and a buffer that large
//! comes fresh from the kernel, page fault by page fault, on every call, where one of a few MB
//! is reused by the allocator. These GEMMs are candle's `matmul` (the `gemm` crate on rayon,
//! which reads the transposed view as it is); `correlate` calls the `gemm` crate directly
//! (`gemm.rs`), since its operands are offset, strided views of one buffer.
//!
//! Used for f32 tensors on the CPU with groups = 1 and dilation = 1 (`applicable`); `ops::Conv2d`
//! keeps candle's path for other devices and dtypes, and the tests compare against it.

use candle_core::{
    CpuStorage, CustomOp1, DType, Device, InplaceOp2, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::gemm::{Cores, gemm_into};
use super::storage::{contiguous_f32, fusable, read_f32};

/// Elements (f32) of `cols` or `dcols` one GEMM works on: 8 MiB. Large enough that the GEMMs
/// stay efficient (a 320-channel 3x3 convolution at 64x64 gets 11 output rows per band),
/// small enough for the allocator to reuse the buffer instead of mapping fresh pages.
const COLUMN_BUDGET: usize = 1 << 21;

/// The sizes of one convolution: input (B, C, H, W), kernel (O, C, KH, KW), symmetric padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    h_out: usize,
    w_out: usize,
    /// Elements of `cols` or `dcols` per GEMM (`COLUMN_BUDGET`; smaller in tests).
    budget: usize,
    /// Which way a stride-1 convolution goes (`Method::BySize`; forced in tests).
    method: Method,
}

/// The two ways of a stride-1 convolution; strided ones always take im2col. Only the tests
/// force one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum Method {
    /// Shifted GEMMs for large planes with enough channels, im2col otherwise.
    BySize,
    /// Shifted GEMMs wherever they apply.
    Shifted,
    /// im2col and col2im.
    Im2col,
}

/// Output positions (rows × padded width) from which a stride-1 convolution takes the shifted
/// GEMMs. Measured with a standalone `gemm` harness at SD1.5 sizes (CPU ms, single-threaded,
/// shifted vs im2col): 320→320 at 64x64 68 vs 122, 640→320 at 64x64 140 vs 249, 640→640 at
/// 32x32 76 vs 80, 1280→1280 at 16x16 102 vs 68, at 8x8 34 vs 19. Below some thousand
/// positions the GEMMs are too narrow for nine passes over the output to pay off; 32x32 (1088
/// positions) is a near-tie and stays with im2col.
const SHIFTED_MIN_POSITIONS: usize = 2048;

/// Channels (in and out) from which a convolution takes the shifted GEMMs: each tap's GEMM
/// has the channels as its inner dimension, which must not be tiny (the UNet's `conv_in` has
/// 4).
const SHIFTED_MIN_CHANNELS: usize = 32;

impl Geometry {
    fn new(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (batch, c_in, h, w) = x.dims4()?;
        let (c_out, wc, kh, kw) = weight.dims4()?;
        if wc != c_in {
            candle_core::bail!("conv2d: input has {c_in} channels, the kernel expects {wc}");
        }
        if stride == 0 || kh == 0 || kw == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!(
                "conv2d: a {kh}x{kw} kernel with stride {stride} and padding {padding} does \
                 not fit a {h}x{w} input"
            );
        }
        Ok(Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            padding,
            h_out: (h + 2 * padding - kh) / stride + 1,
            w_out: (w + 2 * padding - kw) / stride + 1,
            budget: COLUMN_BUDGET,
            method: Method::BySize,
        })
    }

    /// Output pixels per channel.
    fn pixels(&self) -> usize {
        self.h_out * self.w_out
    }

    /// Kernel taps per input channel.
    fn taps_per_channel(&self) -> usize {
        self.kh * self.kw
    }

    /// Kernel taps per output value: the rows of `cols`, the inner dimension of the forward GEMM.
    fn taps(&self) -> usize {
        self.c_in * self.taps_per_channel()
    }

    /// The outputs `o` whose input `o·stride + k − padding` lies inside an input of `len`
    /// (along one axis, for kernel offset `k`), as a range `lo..hi`, empty when none does.
    fn valid(&self, k: usize, len: usize, out_len: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let lo = if k >= p { 0 } else { (p - k).div_ceil(s) };
        let hi = if len + p > k {
            out_len.min((len + p - k - 1) / s + 1)
        } else {
            0
        };
        let lo = lo.min(out_len);
        (lo, hi.max(lo))
    }

    /// Output rows per forward band: `cols` of a band stays within `COLUMN_BUDGET`.
    fn rows_per_band(&self) -> usize {
        (self.budget / (self.taps() * self.w_out).max(1)).clamp(1, self.h_out.max(1))
    }

    /// Whether forward and input gradient go through `correlate` (shifted GEMMs) rather than
    /// im2col and col2im. The input gradient correlates the output gradient with the flipped
    /// kernel, padded by kernel − 1 − padding, so the padding must be smaller than the kernel.
    fn shifted(&self) -> bool {
        let applies = self.stride == 1
            && self.padding < self.kh
            && self.padding < self.kw
            && self.h * self.w * self.pixels() > 0;
        match self.method {
            Method::Im2col => false,
            Method::Shifted => applies,
            Method::BySize => {
                applies
                    && self.c_in.min(self.c_out) >= SHIFTED_MIN_CHANNELS
                    && self.h_out * (self.w + 2 * self.padding) >= SHIFTED_MIN_POSITIONS
            }
        }
    }

    /// Input channels per backward group: `dcols` of a group stays within `COLUMN_BUDGET`.
    fn channels_per_group(&self) -> usize {
        (self.budget / (self.taps_per_channel() * self.pixels()).max(1)).clamp(1, self.c_in)
    }
}

/// Whether the CPU kernels here apply: f32 input and kernel on the CPU. (The UNet's
/// convolutions all have groups = 1 and dilation = 1, which is all `ops::Conv2d` expresses.)
pub(crate) fn applicable(x: &Tensor, weight: &Tensor) -> bool {
    fusable(x) && fusable(weight)
}

/// A frozen convolution of an f32 CPU tensor (B, C, H, W) with `weight` (O, C, KH, KW) and an
/// optional bias (O): the output (B, O, Ho, Wo), differentiable with respect to `x` only.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    conv2d_with(
        x,
        weight,
        bias,
        stride,
        padding,
        (COLUMN_BUDGET, Method::BySize),
    )
}

/// `conv2d` with `budget` elements of `cols` / `dcols` per GEMM (tests use small ones, so
/// several bands and channel groups are crossed) and a chosen `Method`.
fn conv2d_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    (budget, method): (usize, Method),
) -> Result<Tensor> {
    let geometry = Geometry {
        budget,
        method,
        ..Geometry::new(x, weight, stride, padding)?
    };
    let bias = match bias {
        Some(b) => b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        None => vec![0f32; geometry.c_out],
    };
    if bias.len() != geometry.c_out {
        candle_core::bail!(
            "conv2d: {} output channels, {} biases",
            geometry.c_out,
            bias.len()
        );
    }
    // (O, C·kh·kw): a view of a contiguous kernel (loaded kernels are contiguous; anything else
    // is copied once here rather than mis-read).
    let weight = weight
        .contiguous()?
        .reshape((geometry.c_out, geometry.taps()))?;
    let op = FrozenConv {
        geometry,
        weight,
        bias,
    };
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

/// The graph node of a frozen convolution, an op on its input `x` that keeps only the kernel.
/// The backward pass computes the input gradient alone: frozen base weights need no gradient.
struct FrozenConv {
    geometry: Geometry,
    /// The kernel as the (O, C·kh·kw) matrix.
    weight: Tensor,
    bias: Vec<f32>,
}

impl CustomOp1 for FrozenConv {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("conv2d: the input must be f32");
        };
        let g = self.geometry;
        let pixels = g.pixels();
        let mut out = vec![0f32; g.batch * g.c_out * pixels];
        if g.shifted()
            && let Some((start, end)) = l.contiguous_offsets()
        {
            let weight = read_f32(&self.weight, "conv2d kernel")?;
            let taps = g.taps_per_channel();
            let plan = Correlation {
                channels: g.c_in,
                h: g.h,
                w: g.w,
                pad: (g.padding, g.padding),
                kh: g.kh,
                kw: g.kw,
                m: g.c_out,
            };
            // Tap (ky, kx) of the kernel (O, C, kh, kw) as the (O × C) matrix it multiplies.
            let tap = |ky: usize, kx: usize| (ky * g.kw + kx, taps, g.c_in * taps);
            for (x, out) in x[start..end]
                .chunks(g.c_in * g.h * g.w)
                .zip(out.chunks_mut(g.c_out * pixels))
            {
                correlate(x, plan, (weight.slice(), &tap), Some(&self.bias), out);
            }
            return Ok((
                CpuStorage::F32(out),
                Shape::from((g.batch, g.c_out, g.h_out, g.w_out)),
            ));
        }
        let band = g.rows_per_band();
        for (b, out_b) in out.chunks_mut(g.c_out * pixels).enumerate() {
            for oy0 in (0..g.h_out).step_by(band) {
                let rows = oy0..(oy0 + band).min(g.h_out);
                let width = rows.len() * g.w_out;
                let cols = im2col(x, l, g, b, rows)?;
                let cols = Tensor::from_vec(cols, (g.taps(), width), &Device::Cpu)?;
                let y = self.weight.matmul(&cols)?;
                let y = read_f32(&y, "conv2d GEMM result")?;
                let y = y.slice();
                // Row o of the band's result is output channel o's pixels from oy0 on.
                out_b
                    .par_chunks_mut(pixels)
                    .zip(y.par_chunks(width))
                    .zip(&self.bias)
                    .for_each(|((o, y), &bias)| {
                        for (o, &v) in o[oy0 * g.w_out..][..width].iter_mut().zip(y) {
                            *o = v + bias;
                        }
                    });
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.batch, g.c_out, g.h_out, g.w_out)),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = self.geometry;
        if g.shifted() {
            return self.input_gradient_shifted(grad).map(Some);
        }
        let dy =
            grad.to_dtype(DType::F32)?
                .contiguous()?
                .reshape((g.batch, g.c_out, g.pixels()))?;
        let dx = Tensor::zeros((g.batch, g.c_in, g.h, g.w), DType::F32, &Device::Cpu)?;
        // Wᵀ (C·kh·kw, O) as a strided view: the GEMM packs it as it reads.
        let wt = self.weight.t()?;
        let (group, kk) = (g.channels_per_group(), g.taps_per_channel());
        for b in 0..g.batch {
            let dy_b = dy.get(b)?;
            for c0 in (0..g.c_in).step_by(group) {
                let channels = group.min(g.c_in - c0);
                let dcols = wt.narrow(0, c0 * kk, channels * kk)?.matmul(&dy_b)?;
                dx.inplace_op2(
                    &dcols,
                    &Col2Im {
                        geometry: g,
                        batch: b,
                        first_channel: c0,
                    },
                )?;
            }
        }
        Ok(Some(dx))
    }
}

impl FrozenConv {
    /// The input gradient of a stride-1 convolution: the output gradient correlated with the
    /// kernel flipped in both axes and transposed (in ↔ out), padded by kernel − 1 − padding.
    fn input_gradient_shifted(&self, grad: &Tensor) -> Result<Tensor> {
        let g = self.geometry;
        let dy = grad.to_dtype(DType::F32)?.contiguous()?;
        let dy = read_f32(&dy, "conv2d output gradient")?;
        let weight = read_f32(&self.weight, "conv2d kernel")?;
        let taps = g.taps_per_channel();
        let plan = Correlation {
            channels: g.c_out,
            h: g.h_out,
            w: g.w_out,
            pad: (g.kh - 1 - g.padding, g.kw - 1 - g.padding),
            kh: g.kh,
            kw: g.kw,
            m: g.c_in,
        };
        // Tap (a, b) of the flipped kernel as the (C × O) matrix it multiplies: element (c, o)
        // is W[o, c, kh − 1 − a, kw − 1 − b].
        let tap =
            |a: usize, b: usize| ((g.kh - 1 - a) * g.kw + (g.kw - 1 - b), g.c_in * taps, taps);
        let plane = g.h * g.w;
        let mut dx = vec![0f32; g.batch * g.c_in * plane];
        for (dy, dx) in dy
            .slice()
            .chunks(g.c_out * g.pixels())
            .zip(dx.chunks_mut(g.c_in * plane))
        {
            correlate(dy, plan, (weight.slice(), &tap), None, dx);
        }
        Tensor::from_vec(dx, (g.batch, g.c_in, g.h, g.w), &Device::Cpu)
    }
}

/// One correlation of a set of planes with a kernel, as `correlate` computes it.
#[derive(Debug, Clone, Copy)]
struct Correlation {
    /// Input planes (the GEMMs' inner dimension).
    channels: usize,
    h: usize,
    w: usize,
    /// Zero padding (rows, columns) on each side.
    pad: (usize, usize),
    kh: usize,
    kw: usize,
    /// Output planes.
    m: usize,
}

/// A kernel tap's matrix: `tap(ky, kx)` gives (offset, column stride, row stride) of the
/// (m × channels) matrix inside the kernel's elements.
type Taps<'a> = (&'a [f32], &'a dyn Fn(usize, usize) -> (usize, usize, usize));

/// `out` (m, oh, ow) = Σ over taps (ky, kx) of the tap's matrix times the input planes shifted
/// by (ky, kx), plus `bias` per output plane, for a stride-1 correlation of `src` (channels,
/// h, w), zero-padded by `pad`.
///
/// No im2col: in the padded planes (width wp = w + 2·pad), the input an output at (y, x)
/// sees through tap (ky, kx) sits at a fixed distance ky·wp + kx from the output's own index
/// y·wp + x, so each tap is one GEMM that reads the padded planes in place, offset by that
/// distance, into a (m, oh·wp) result. The last kw − 1 columns of each result row wrap into
/// the next padded row; they are computed and dropped. im2col wrote and read kh·kw copies of
/// the input (94 MB for 640 channels at 64x64) and col2im added them back.
fn correlate(
    src: &[f32],
    c: Correlation,
    (kernel, tap): Taps<'_>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (hp, wp) = (c.h + 2 * c.pad.0, c.w + 2 * c.pad.1);
    let (oh, ow) = (hp + 1 - c.kh, wp + 1 - c.kw);
    let plane = hp * wp;
    // kw floats past the last plane: the dropped columns of the last taps read there.
    let mut padded = vec![0f32; c.channels * plane + c.kw];
    padded[..c.channels * plane]
        .par_chunks_mut(plane)
        .zip(src.par_chunks(c.h * c.w))
        .for_each(|(dst, src)| {
            for (y, row) in src.chunks(c.w).enumerate() {
                dst[(y + c.pad.0) * wp + c.pad.1..][..c.w].copy_from_slice(row);
            }
        });
    let positions = oh * wp;
    let mut wide = vec![0f32; c.m * positions];
    for ky in 0..c.kh {
        for kx in 0..c.kw {
            let (offset, cs, rs) = tap(ky, kx);
            gemm_into(
                (c.m, positions, c.channels),
                &mut wide,
                positions,
                ky + kx > 0,
                (&kernel[offset..], cs, rs),
                (&padded[ky * wp + kx..], 1, plane),
                1.0,
                Cores::All,
            );
        }
    }
    out.par_chunks_mut(oh * ow)
        .zip(wide.par_chunks(positions))
        .enumerate()
        .for_each(|(o, (out, wide))| {
            let b = bias.map_or(0.0, |b| b[o]);
            for (out, wide) in out.chunks_mut(ow).zip(wide.chunks(wp)) {
                for (y, &v) in out.iter_mut().zip(wide) {
                    *y = v + b;
                }
            }
        });
}

/// `cols` (C·kh·kw, rows·Wo) for output rows `rows` of batch item `b`, from an input of any
/// strides: row (c, ky, kx) holds the input pixels each output pixel sees through tap (ky, kx)
/// of channel c, zero where that is padding.
fn im2col(
    x: &[f32],
    l: &Layout,
    g: Geometry,
    b: usize,
    rows: std::ops::Range<usize>,
) -> Result<Vec<f32>> {
    let (s0, s1, s2, s3) = candle_core::shape::dims4(l.stride())?;
    let width = rows.len() * g.w_out;
    let mut cols = vec![0f32; g.taps() * width];
    // One task per input channel: its kh·kw rows of `cols`.
    cols.par_chunks_mut(g.taps_per_channel() * width)
        .enumerate()
        .for_each(|(c, taps)| {
            let plane = l.start_offset() + b * s0 + c * s1;
            for ky in 0..g.kh {
                let (oy_lo, oy_hi) = g.valid(ky, g.h, g.h_out);
                let (oy_lo, oy_hi) = (oy_lo.max(rows.start), oy_hi.min(rows.end));
                for kx in 0..g.kw {
                    let (ox_lo, ox_hi) = g.valid(kx, g.w, g.w_out);
                    if ox_lo == ox_hi {
                        continue; // this tap sees only padding
                    }
                    let row = &mut taps[(ky * g.kw + kx) * width..][..width];
                    let ix0 = ox_lo * g.stride + kx - g.padding;
                    for oy in oy_lo..oy_hi {
                        let src = plane + (oy * g.stride + ky - g.padding) * s2 + ix0 * s3;
                        let dst = &mut row[(oy - rows.start) * g.w_out..][ox_lo..ox_hi];
                        if g.stride == 1 && s3 == 1 {
                            dst.copy_from_slice(&x[src..][..dst.len()]);
                        } else {
                            let step = g.stride * s3;
                            for (j, d) in dst.iter_mut().enumerate() {
                                *d = x[src + j * step];
                            }
                        }
                    }
                }
            }
        });
    Ok(cols)
}

/// Adds `dcols` (channels·kh·kw, Ho·Wo) of input channels `first_channel..` of batch item
/// `batch` back onto their shifted input planes of the gradient (B, C, H, W).
struct Col2Im {
    geometry: Geometry,
    batch: usize,
    first_channel: usize,
}

impl InplaceOp2 for Col2Im {
    fn name(&self) -> &'static str {
        "conv-col2im"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let g = self.geometry;
        let dcols = contiguous_f32(src, src_l, "conv2d col2im source")?;
        let (kk, pixels, plane_len) = (g.taps_per_channel(), g.pixels(), g.h * g.w);
        let channels = dcols.len() / (kk * pixels).max(1);
        if dcols.len() != channels * kk * pixels || self.first_channel + channels > g.c_in {
            candle_core::bail!("conv2d: col2im got {} elements", dcols.len());
        }
        let CpuStorage::F32(dx) = dst else {
            candle_core::bail!("conv2d: col2im expects an f32 gradient");
        };
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            candle_core::bail!("conv2d: col2im expects a contiguous gradient");
        };
        let first = (self.batch * g.c_in + self.first_channel) * plane_len;
        let Some(planes) = dx[start..end].get_mut(first..first + channels * plane_len) else {
            candle_core::bail!("conv2d: col2im gradient is too small");
        };
        // One task per input channel: it owns that input plane and reads the plane's kh·kw
        // rows, which are adjacent in `dcols`.
        planes
            .par_chunks_mut(plane_len)
            .zip(dcols.par_chunks(kk * pixels))
            .for_each(|(plane, taps)| {
                for ky in 0..g.kh {
                    let (oy_lo, oy_hi) = g.valid(ky, g.h, g.h_out);
                    for kx in 0..g.kw {
                        let (ox_lo, ox_hi) = g.valid(kx, g.w, g.w_out);
                        if ox_lo == ox_hi {
                            continue; // this tap sees only padding
                        }
                        let row = &taps[(ky * g.kw + kx) * pixels..][..pixels];
                        let ix0 = ox_lo * g.stride + kx - g.padding;
                        for oy in oy_lo..oy_hi {
                            let src = &row[oy * g.w_out..][ox_lo..ox_hi];
                            let iy = oy * g.stride + ky - g.padding;
                            let dst = &mut plane[iy * g.w + ix0..(iy + 1) * g.w];
                            for (d, &v) in dst.iter_mut().step_by(g.stride).zip(src) {
                                *d += v;
                            }
                        }
                    }
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::ops::tests::max_diff;
    use candle_core::{Device, Var};

    /// Deterministic, uneven data in [-1, 1].
    fn data(shape: &[usize], phase: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| {
                let i = i as f64;
                ((i * 0.377 + phase).sin() + (i * 0.0131 + 2.0 * phase).cos()) * 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn f32(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F32).unwrap()
    }

    /// The largest element difference relative to the largest element of `reference`.
    fn rel_diff(ours: &Tensor, reference: &Tensor) -> f64 {
        max_diff(ours, reference) / max_diff(reference, &reference.zeros_like().unwrap())
    }

    /// A direct-loop convolution in f64 plus the bias, and its input gradient for the loss
    /// sum(y · r): the definition, written out. (candle's own conv2d backward cannot be the
    /// reference: for stride 2 it gets the gradient's shape wrong when height and width
    /// differ in parity, as it derives one output padding for both.)
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride: usize,
        padding: usize,
        r: &Tensor,
    ) -> (Tensor, Tensor) {
        let (n, c, h, wd) = x.dims4().unwrap();
        let (o, _, kh, kw) = w.dims4().unwrap();
        let (ho, wo) = (
            (h + 2 * padding - kh) / stride + 1,
            (wd + 2 * padding - kw) / stride + 1,
        );
        let flat = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (xv, wv, bv, rv) = (flat(x), flat(w), flat(b), flat(r));
        let (mut y, mut dx) = (vec![0f64; n * o * ho * wo], vec![0f64; xv.len()]);
        for (bi, oc, oy, ox) in indices4(n, o, ho, wo) {
            let yi = ((bi * o + oc) * ho + oy) * wo + ox;
            y[yi] = bv[oc];
            for (ic, ky, kx) in indices3(c, kh, kw) {
                let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                if iy < padding || ix < padding || iy - padding >= h || ix - padding >= wd {
                    continue;
                }
                let xi = ((bi * c + ic) * h + iy - padding) * wd + ix - padding;
                let wi = ((oc * c + ic) * kh + ky) * kw + kx;
                y[yi] += wv[wi] * xv[xi];
                dx[xi] += wv[wi] * rv[yi];
            }
        }
        let dev = Device::Cpu;
        (
            Tensor::from_vec(y, (n, o, ho, wo), &dev).unwrap(),
            Tensor::from_vec(dx, (n, c, h, wd), &dev).unwrap(),
        )
    }

    /// Every index triple of an a x b x c box, row-major.
    fn indices3(a: usize, b: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))))
    }

    /// Every index quadruple of an a x b x c x d box, row-major.
    fn indices4(
        a: usize,
        b: usize,
        c: usize,
        d: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..a).flat_map(move |i| indices3(b, c, d).map(move |(j, k, l)| (i, j, k, l)))
    }

    /// The kernels here in f32 on `x` (any layout), value and input gradient of sum(y · r).
    fn ours(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride: usize,
        padding: usize,
        r: &Tensor,
        tuning: (usize, Method),
    ) -> (Tensor, Tensor) {
        let var = Var::from_tensor(&f32(x)).unwrap();
        assert!(applicable(var.as_tensor(), &f32(w)));
        let (w, b) = (f32(w), f32(b));
        let y = conv2d_with(var.as_tensor(), &w, Some(&b), stride, padding, tuning).unwrap();
        let grads = (&y * f32(r))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (y, grads.get(var.as_tensor()).unwrap().clone())
    }

    fn assert_close(x: &Tensor, w: &Tensor, stride: usize, padding: usize, case: &str) {
        let b = data(&[w.dim(0).unwrap()], 0.9);
        let out_dims = x.conv2d(w, padding, stride, 1, 1).unwrap().dims().to_vec();
        // A weighting makes every output element matter differently in the loss.
        let r = data(&out_dims, 3.1);
        let expected = reference(x, w, &b, stride, padding, &r);
        // im2col with the production budget (one piece at these sizes), one output row /
        // input channel per GEMM, and sizes in between (ragged last pieces); then the shifted
        // GEMMs (the same as im2col where they do not apply).
        let tunings = [COLUMN_BUDGET, 1, 1000, 3000]
            .map(|budget| (budget, Method::Im2col))
            .into_iter()
            .chain([(COLUMN_BUDGET, Method::Shifted)]);
        for tuning in tunings {
            let got = ours(x, w, &b, stride, padding, &r, tuning);
            let case = format!("{case}, {tuning:?}");
            assert_eq!(got.0.dims(), expected.0.dims(), "{case}: output shape");
            assert_eq!(got.1.dims(), x.dims(), "{case}: gradient shape");
            let (value, grad) = (rel_diff(&got.0, &expected.0), rel_diff(&got.1, &expected.1));
            assert!(value < 1e-4, "{case}: output differs by {value}");
            assert!(grad < 1e-4, "{case}: input gradient differs by {grad}");
        }
    }

    #[test]
    fn matches_the_direct_convolution_and_its_input_gradient() {
        // (batch, in, out, h, w, kernel, stride, padding)
        let cases = [
            (2, 5, 7, 9, 8, 3, 1, 1),  // 3x3 "same", batch 2, non-square
            (1, 4, 6, 9, 9, 3, 2, 1),  // downsampler, odd size
            (2, 4, 6, 8, 10, 3, 2, 1), // downsampler, even sizes
            (1, 3, 5, 6, 7, 3, 1, 0),  // no padding
            (2, 6, 5, 7, 7, 1, 1, 0),  // 1x1: plain GEMM, no im2col
            (1, 6, 4, 7, 8, 1, 2, 0),  // 1x1 strided: through im2col
            (1, 2, 3, 2, 3, 3, 1, 2),  // padding wider than the input's border
        ];
        for (b, c, o, h, w, k, s, p) in cases {
            let x = data(&[b, c, h, w], 0.3);
            let wt = data(&[o, c, k, k], 1.7);
            assert_close(&x, &wt, s, p, &format!("{b}x{c}x{h}x{w} k{k} s{s} p{p}"));
        }
    }

    #[test]
    fn a_strided_view_is_convolved_like_its_copy() {
        // A transposed view (H and W swapped) of a channel slice: non-contiguous, offset.
        let big = data(&[2, 7, 9, 8], 0.4);
        let x = big.narrow(1, 2, 4).unwrap().transpose(2, 3).unwrap();
        assert!(!x.is_contiguous());
        let wt = data(&[6, 4, 3, 3], 2.2);
        assert_close(&x, &wt, 1, 1, "transposed view, stride 1");
        assert_close(&x, &wt, 2, 1, "transposed view, stride 2");
        let wt = data(&[6, 4, 1, 1], 2.2);
        assert_close(&x, &wt, 1, 0, "transposed view, 1x1");
    }

    /// Through the layer the UNet uses: `Conv2d::forward` (these kernels) against
    /// `Conv2d::forward_candle` (candle's conv2d re-attached by `FrozenGrad`, whose input
    /// gradient is conv2d with the flipped kernel or, for stride 2, conv_transpose2d), with a
    /// second layer after it so the gradient arriving at the first is not trivial.
    #[test]
    fn conv2d_layer_gradient_matches_the_candle_path() {
        use crate::model::layers::ops::Conv2d;
        use candle_core::Module;
        // Square inputs: the candle path's stride-2 gradient assumes height and width share
        // their parity (the UNet's latents are square).
        let cases = [
            (1usize, 3usize, 1usize, 11usize),
            (2, 3, 1, 11),
            (2, 3, 1, 10),
            (1, 1, 0, 9),
        ];
        for (stride, k, padding, side) in cases {
            let layer = |c_in, c_out, k, phase| {
                Conv2d::new(
                    f32(&data(&[c_out, c_in, k, k], phase)),
                    Some(f32(&data(&[c_out], phase + 0.5))),
                    stride,
                    padding,
                )
            };
            let (first, second) = (layer(3, 5, k, 0.2), layer(5, 4, k, 1.4));
            let run = |candle: bool| {
                let x = Var::from_tensor(&f32(&data(&[2, 3, side, side], 0.6))).unwrap();
                let apply = |l: &Conv2d, t: &Tensor| {
                    if candle {
                        l.forward_candle(t).unwrap()
                    } else {
                        l.forward(t).unwrap()
                    }
                };
                let y = apply(&second, &apply(&first, x.as_tensor()).tanh().unwrap());
                let r = f32(&data(y.dims(), 2.0));
                let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
                (y, grads.get(x.as_tensor()).unwrap().clone())
            };
            let (ours, candle) = (run(false), run(true));
            let case = format!("{side}x{side} k{k} s{stride} p{padding}");
            assert_eq!(ours.0.dims(), candle.0.dims(), "{case}");
            assert!(rel_diff(&ours.0, &candle.0) < 1e-4, "{case}: output");
            assert!(
                rel_diff(&ours.1, &candle.1) < 1e-4,
                "{case}: input gradient"
            );
            assert!(max_diff(&candle.1, &candle.1.zeros_like().unwrap()) > 1e-3);
        }
    }

    #[test]
    fn an_untracked_input_gets_the_same_output_without_a_graph() {
        let x = f32(&data(&[1, 3, 6, 6], 0.1));
        let (w, b) = (f32(&data(&[4, 3, 3, 3], 0.2)), f32(&data(&[4], 0.3)));
        let y = conv2d(&x, &w, Some(&b), 1, 1).unwrap();
        assert!(!y.track_op());
        let expected = x
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        assert!(rel_diff(&y, &expected) < 1e-5);
        let no_bias = conv2d(&x, &w, None, 1, 1).unwrap();
        assert!(rel_diff(&no_bias, &x.conv2d(&w, 1, 1, 1, 1).unwrap()) < 1e-5);
    }

    #[test]
    fn mismatched_shapes_are_errors_not_panics() {
        let x = f32(&data(&[1, 3, 6, 6], 0.1));
        let w = f32(&data(&[4, 2, 3, 3], 0.2));
        assert!(conv2d(&x, &w, None, 1, 1).is_err(), "channels");
        let w = f32(&data(&[4, 3, 3, 3], 0.2));
        assert!(
            conv2d(&x, &w, Some(&f32(&data(&[5], 0.0))), 1, 1).is_err(),
            "bias"
        );
        assert!(conv2d(&x, &w, None, 0, 1).is_err(), "stride 0");
        let tiny = f32(&data(&[1, 3, 1, 1], 0.1));
        assert!(
            conv2d(&tiny, &w, None, 1, 0).is_err(),
            "kernel larger than input"
        );
    }

    #[test]
    fn only_f32_on_the_cpu_takes_these_kernels() {
        let w = data(&[2, 2, 3, 3], 0.0);
        let x = data(&[1, 2, 4, 4], 0.0);
        assert!(applicable(&f32(&x), &f32(&w)));
        assert!(!applicable(&x, &w));
        assert!(!applicable(&f32(&x), &w));
    }
}
