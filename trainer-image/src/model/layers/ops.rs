//! Differentiable building blocks. candle's fused `softmax_last_dim`, `layer_norm` and
//! `rms_norm` kernels have no backward pass, so gradients silently stop at them; everything
//! here is composed from elementary ops that candle can differentiate.
//!
//! Some backward passes are written by hand. `ChunkedAttention` computes attention a block of
//! query rows at a time and recomputes the probabilities in the backward pass, so no
//! sequence-squared score matrix outlives its chunk (SD1.5 at 512 px has 4096 tokens);
//! `FlashAttention` does the same through `kernels/attention.rs`. `FrozenGrad`, for frozen
//! linear/conv layers, returns the input gradient only, because candle's stock matmul/conv
//! backward also computes a weight gradient (as much work as the forward pass, and
//! model-sized memory) that frozen base weights never use; `Adapted` is a frozen linear with
//! its LoRA branch as one node. The finite-difference tests check them all.
//!
//! On the CPU in f32, the norms and activations here hand over to `kernels/fused.rs` (one
//! kernel each way, parallel) and the frozen convolutions to `kernels/conv.rs` (GEMMs in NCHW:
//! one per kernel tap on large planes, im2col and one GEMM otherwise); the composed versions
//! and candle's `conv2d` stay for other devices and dtypes, and as the reference those
//! kernels are tested against.

use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, D, DType, Layout, MetalStorage, Module, Result,
    Shape, Tensor,
};

use crate::model::ModelError;
use crate::model::kernels::gemm::{Cores, gemm_into};
use crate::model::kernels::storage::{
    Precomputed, fusable, hand_over_forward, on_cpu, on_cuda, on_metal, read_f32,
};
use crate::model::kernels::{attention, conv, fused};
use crate::model::weights::Weights;

/// The forward passes (every device) of a three-operand graph node whose output was computed
/// beforehand: they hand over the `Precomputed` field named.
macro_rules! hand_over_forwards {
    ($field:ident) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            self.$field.hand_over(on_cpu)
        }

        fn cuda_fwd(
            &self,
            _: &CudaStorage,
            _: &Layout,
            _: &CudaStorage,
            _: &Layout,
            _: &CudaStorage,
            _: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.$field.hand_over(on_cuda)
        }

        fn metal_fwd(
            &self,
            _: &MetalStorage,
            _: &Layout,
            _: &MetalStorage,
            _: &Layout,
            _: &MetalStorage,
            _: &Layout,
        ) -> Result<(MetalStorage, Shape)> {
            self.$field.hand_over(on_metal)
        }
    };
}

/// Softmax over the last dimension: exp(x - max) / sum. The max is detached: softmax is
/// shift-invariant, so the gradient is exact without differentiating through it.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Normalises over the last dimension (zero mean, unit variance), without affine.
#[cfg(test)]
fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return fused::silu(x);
    }
    x.silu()
}

/// Exact (erf) GELU, as PyTorch's default `F.gelu`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return fused::gelu_erf(x);
    }
    x.gelu_erf()
}

/// GEGLU over the last dimension: its first half times the exact GELU of its second half.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        return fused::geglu(x);
    }
    let half = x.dim(D::Minus1)? / 2;
    let hidden = x.narrow(D::Minus1, 0, half)?;
    let gate = x.narrow(D::Minus1, half, half)?;
    hidden * gelu(&gate)?
}

/// GELU with the tanh approximation (PyTorch's `gelu(approximate="tanh")`), as FLUX.1's
/// feed-forwards use.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// CLIP's `quick_gelu`: x * sigmoid(1.702 x).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let s = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    x * s
}

/// LayerNorm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn load(
        vb: &Weights,
        dim: usize,
        eps: f64,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl LayerNorm {
    /// A norm without learned affine (`elementwise_affine=False`): weight one, bias zero, so
    /// it runs through the same kernels as every other layer norm.
    pub(crate) fn without_affine(
        dim: usize,
        eps: f64,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: Tensor::ones(dim, dtype, device)?,
            bias: Tensor::zeros(dim, dtype, device)?,
            eps,
        })
    }
}

#[cfg(test)]
impl LayerNorm {
    /// A norm from its parameters, for tests that compare kernels.
    pub(crate) fn from_parts(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fusable(x) {
            return fused::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        lean_norm(x, rows, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
impl LayerNorm {
    /// The same norm from elementary ops: the reference the fused kernel and `lean_norm` are
    /// tested against.
    pub(crate) fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        // Statistics in f32 at least, as PyTorch does for half precision.
        let dtype = x.dtype();
        let xf = upcast(x)?;
        normalize_last_dim(&xf, self.eps)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// RMSNorm over the last dimension with a learned scale (PyTorch's `nn.RMSNorm`, T5's
/// `T5LayerNorm`): `x / sqrt(mean(x²) + eps) · weight`, statistics in f32 at least. Composed
/// from elementary ops, so it is differentiable on every device; it normalises small vectors
/// (FLUX.1's per-head queries and keys, T5's hidden states), where a kernel would not pay.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(
        vb: &Weights,
        dim: usize,
        eps: f64,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = upcast(x)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        xf.broadcast_div(&rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)
    }
}

/// GroupNorm over (B, C, ...) tensors.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn load(
        vb: &Weights,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> std::result::Result<Self, ModelError> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(ModelError::LoadTensor {
                component: "group norm".into(),
                tensor: vb.path("weight"),
                source: Box::new(candle_core::Error::Msg(format!(
                    "{channels} channels are not divisible into {groups} groups"
                ))),
            });
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }
}

#[cfg(test)]
impl GroupNorm {
    /// A norm from its parameters, for tests that compare kernels.
    pub(crate) fn from_parts(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Self {
        Self {
            weight,
            bias,
            groups,
            eps,
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fusable(x) {
            return fused::group_norm(x, self.groups, &self.weight, &self.bias, self.eps);
        }
        let mut affine_shape = vec![1usize; x.rank()];
        affine_shape[1] = x.dim(1)?;
        let rows = x.dim(0)? * self.groups;
        lean_norm(
            x,
            rows,
            &self.weight.reshape(affine_shape.as_slice())?,
            &self.bias.reshape(affine_shape.as_slice())?,
            self.eps,
        )
    }
}

#[cfg(test)]
impl GroupNorm {
    /// The same norm from elementary ops: the reference the fused kernel and `lean_norm` are
    /// tested against.
    pub(crate) fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let grouped = upcast(x)?.reshape((b, self.groups, ()))?;
        let normed = normalize_last_dim(&grouped, self.eps)?
            .to_dtype(dtype)?
            .reshape(dims.as_slice())?;
        let mut affine_shape = vec![1usize; dims.len()];
        affine_shape[1] = c;
        normed
            .broadcast_mul(&self.weight.reshape(affine_shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(affine_shape.as_slice())?)
    }
}

fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// A norm on any device and dtype as one graph node: `x` seen as `rows` groups of
/// consecutive elements, each normalised (statistics in f32 at least, as PyTorch computes them
/// for half precision), then the frozen affine `weight`, `bias` (broadcast to `x`).
///
/// As composed candle ops the norm kept three or four f32 tensors of the input's size for the
/// backward pass (the upcast input, the centred values, the normalised values, their product
/// with the weight): at SDXL's 1024 px, 80 MB per norm in the first blocks. This node keeps
/// only one mean and one reciprocal deviation per group besides the input (which the graph
/// holds anyway) and recomputes the normalised values in the backward pass, where, with
/// g = dy · weight over a group of n, dx = rstd · (g - mean(g) - x̂ · mean(g · x̂)). The
/// weight and bias get no gradient: norms are frozen in LoRA training.
fn lean_norm(x: &Tensor, rows: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let grouped = upcast(&x.detach())?.reshape((rows, ()))?;
    let mean = grouped.mean_keepdim(1)?;
    let centered = grouped.broadcast_sub(&mean)?;
    let rstd = (centered.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    let y = centered
        .broadcast_mul(&rstd)?
        .to_dtype(dtype)?
        .reshape(x.shape())?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op1(LeanNorm {
        value: Precomputed::new(y.contiguous()?, "norm output"),
        mean,
        rstd,
        weight: weight.clone(),
    })
}

/// The graph node of `lean_norm`.
struct LeanNorm {
    value: Precomputed,
    /// Per group (rows, 1), f32 at least.
    mean: Tensor,
    rstd: Tensor,
    /// Broadcastable to the input.
    weight: Tensor,
}

impl CustomOp1 for LeanNorm {
    fn name(&self) -> &'static str {
        "lean-norm"
    }

    hand_over_forward!(value);

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let rows = self.mean.dim(0)?;
        let xhat = upcast(&x.detach())?
            .reshape((rows, ()))?
            .broadcast_sub(&self.mean)?
            .broadcast_mul(&self.rstd)?;
        let g = upcast(&dy.detach())?
            .broadcast_mul(&upcast(&self.weight)?)?
            .reshape((rows, ()))?;
        let g_mean = g.mean_keepdim(1)?;
        let gx_mean = (&g * &xhat)?.mean_keepdim(1)?;
        let dx = (g.broadcast_sub(&g_mean)? - xhat.broadcast_mul(&gx_mean)?)?
            .broadcast_mul(&self.rstd)?
            .reshape(x.shape())?
            .to_dtype(x.dtype())?;
        Ok(Some(dx))
    }
}

/// A frozen linear layer (weights are plain tensors, never `Var`s).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(
        vb: &Weights,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> std::result::Result<Self, ModelError> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A 1x1 convolution loaded as the equivalent linear layer over channels.
    pub(crate) fn load_conv1x1(
        vb: &Weights,
        in_dim: usize,
        out_dim: usize,
    ) -> std::result::Result<Self, ModelError> {
        let weight = vb
            .get((out_dim, in_dim, 1, 1), "weight")?
            .reshape((out_dim, in_dim))
            .map_err(|source| ModelError::LoadTensor {
                component: "conv".into(),
                tensor: vb.path("weight"),
                source: Box::new(crate::model::one_line(source)),
            })?;
        let bias = Some(vb.get(out_dim, "bias")?);
        Ok(Self { weight, bias })
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x Wᵀ + b computed outside the graph. The bias is added before the result joins the
    /// graph: as a graph node of its own, candle's backward pass would also build the bias's
    /// gradient at the output's full size (zeros, then a sum) and keep it until the pass ends.
    fn output(&self, x: &Tensor) -> Result<Tensor> {
        self.output_with(x, None)
    }

    /// `output` plus `h · upᵀ` for a LoRA branch's middle `h` (..., rank), when given.
    fn output_with(&self, x: &Tensor, branch: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let on_cpu = fusable(x)
            && fusable(&self.weight)
            && self.bias.as_ref().is_none_or(fusable)
            && branch.is_none_or(|(h, up)| fusable(h) && fusable(up));
        if on_cpu {
            return self.output_on_cpu(x, branch);
        }
        let y = matmul_last(&x.detach(), &self.weight)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match branch {
            Some((h, up)) => {
                let dtype = y.dtype();
                y + matmul_last(h, up)?.to_dtype(dtype)?
            }
            None => Ok(y),
        }
    }

    /// `output_with` for f32 CPU tensors in one buffer: the bias is written first and the GEMM
    /// adds both products into it. Through candle's ops that was a zeroed product, a copy of
    /// it plus the bias, and a third buffer for the branch's sum: three passes over (for the
    /// feed-forward's first linear at 64x64) 42 MB more.
    fn output_on_cpu(&self, x: &Tensor, branch: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let (in_dim, out) = (self.in_dim(), self.out_dim());
        if x.dim(D::Minus1)? != in_dim {
            candle_core::bail!(
                "linear: input {:?} does not end in the layer's {in_dim} features",
                x.dims()
            );
        }
        let x = x.detach().contiguous()?;
        let rows = x.elem_count() / in_dim.max(1);
        let mut z = match &self.bias {
            Some(b) => b.to_vec1::<f32>()?.repeat(rows),
            None => vec![0f32; rows * out],
        };
        // Wᵀ (in × out) is the kernel read with column stride `in`, row stride 1; upᵀ likewise.
        let (input, w) = (
            (&x, 1, in_dim, "linear input"),
            (&self.weight, in_dim, 1, "linear weight"),
        );
        gemm_tensors(&mut z, (rows, out, in_dim), self.bias.is_some(), input, w)?;
        if let Some((h, up)) = branch {
            let rank = up.dim(1)?;
            let (h, up) = ((h, 1, rank, "LoRA middle"), (up, rank, 1, "LoRA up"));
            gemm_tensors(&mut z, (rows, out, rank), true, h, up)?;
        }
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Tensor::from_vec(z, dims, x.device())
    }

    /// `base(x) + scale · (x · downᵀ) · upᵀ`: the frozen layer plus a LoRA branch, as one
    /// graph node on (x, down, up).
    ///
    /// Built from candle ops, the sum kept two extra tensors of the output's size alive until
    /// the backward pass (the base output and the branch output, both operands of the add;
    /// 0.6 GB at full SD1.5 size), and the branch's first product was three more nodes on x
    /// (a reshape to a matrix, the product, the reshape back), each of which candle's backward
    /// pass pays for with a zero tensor and a sum of the operand's size. This node keeps only
    /// its operands and the rank-sized middle h = scale · x · downᵀ, and its backward pass
    /// computes, with g = scale · dz · up: dx = dz · W + g · down (the frozen weight gets no
    /// gradient), d_down = gᵀ · x and d_up = dzᵀ · h. The scale is applied to the rank-sized
    /// middle, not the full-size output: the same product, one pass over a tensor `rank / out`
    /// the size.
    pub(crate) fn forward_with_adapter(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        // The branch is in the adapter's dtype (f32 for a half-precision model).
        let xa = x.detach().to_dtype(down.dtype())?;
        let h = (matmul_last(&xa, &down.detach())? * scale)?;
        let z = self.output_with(x, Some((&h, &up.detach())))?;
        if !(x.track_op() || down.track_op() || up.track_op()) {
            return Ok(z);
        }
        x.apply_op3(
            down,
            up,
            Adapted {
                value: Precomputed::new(z.contiguous()?, "adapted linear"),
                weight: self.weight.clone(),
                h,
                scale,
            },
        )
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        frozen(x, self.output(x)?, Frozen::Linear(self.weight.clone()))
    }
}

/// The graph node of `Linear::forward_with_adapter`.
struct Adapted {
    value: Precomputed,
    weight: Tensor,
    /// scale · x · downᵀ, (..., rank), detached.
    h: Tensor,
    scale: f64,
}

impl CustomOp3 for Adapted {
    fn name(&self) -> &'static str {
        "adapted-linear"
    }

    hand_over_forwards!(value);

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _z: &Tensor,
        dz: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients built from graph tensors would record ops on them, and the
        // optimizer state made from those gradients would keep every step's graph alive.
        let (down, up) = (down.detach(), up.detach());
        let (rank, in_dim, out) = (down.dim(0)?, down.dim(1)?, up.dim(0)?);
        let rows = dz.elem_count() / out.max(1);
        let dz_branch = dz.to_dtype(self.h.dtype())?.reshape((rows, out))?;
        let g = (dz_branch.matmul(&up)? * self.scale)?;
        let d_up = dz_branch.t()?.matmul(&self.h.reshape((rows, rank))?)?;
        let xa = x.detach().to_dtype(g.dtype())?.reshape((rows, in_dim))?;
        let d_down = g.t()?.matmul(&xa)?;
        let dx = if !x.track_op() {
            None
        } else if [dz, &self.weight, &g, &down].iter().all(|t| fusable(t)) {
            // dz · W and g · down into one buffer.
            let mut dx = vec![0f32; rows * in_dim];
            let (dz, w) = (
                (dz, 1, out, "linear output gradient"),
                (&self.weight, 1, in_dim, "linear weight"),
            );
            gemm_tensors(&mut dx, (rows, in_dim, out), false, dz, w)?;
            let (g, down) = (
                (&g, 1, rank, "LoRA middle gradient"),
                (&down, 1, in_dim, "LoRA down"),
            );
            gemm_tensors(&mut dx, (rows, in_dim, rank), true, g, down)?;
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            let base = matmul_last(dz, &self.weight.t()?)?;
            let branch = g.matmul(&down)?.to_dtype(base.dtype())?;
            Some((base + branch.reshape(x.shape())?)?)
        };
        Ok((dx, Some(d_down), Some(d_up)))
    }
}

/// A GEMM operand: an f32 CPU tensor, read (made contiguous first) with (column stride, row
/// stride), and its name for errors.
type Operand<'a> = (&'a Tensor, usize, usize, &'static str);

/// `dst` (r × c) [+]= lhs (r × k) · rhs (k × c) on every core, for the CPU kernels of `Linear`
/// and `Adapted`.
fn gemm_tensors(
    dst: &mut [f32],
    dims: (usize, usize, usize),
    accumulate: bool,
    (lhs, lhs_cs, lhs_rs, lhs_name): Operand<'_>,
    (rhs, rhs_cs, rhs_rs, rhs_name): Operand<'_>,
) -> Result<()> {
    let (lhs, rhs) = (lhs.contiguous()?, rhs.contiguous()?);
    gemm_into(
        dims,
        dst,
        dims.1,
        accumulate,
        (read_f32(&lhs, lhs_name)?.slice(), lhs_cs, lhs_rs),
        (read_f32(&rhs, rhs_name)?.slice(), rhs_cs, rhs_rs),
        1.0,
        Cores::All,
    );
    Ok(())
}

/// x (..., in) times w^T with w (out, in), flattening leading dims into one GEMM.
pub(crate) fn matmul_last(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((lead, in_dim))?.matmul(&w.t()?)?;
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = w.dims()[0];
    y.reshape(out_dims)
}

/// A frozen 2-D convolution with symmetric padding.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub(crate) fn load(
        vb: &Weights,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            weight: vb.get((out_c, in_c, kernel, kernel), "weight")?,
            bias: Some(vb.get(out_c, "bias")?),
            stride,
            padding,
        })
    }

    /// A convolution from its parameters: `weight` (out, in, k, k), `bias` (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if conv::applicable(x, &self.weight) {
            return conv::conv2d(
                x,
                &self.weight,
                self.bias.as_ref(),
                self.stride,
                self.padding,
            );
        }
        self.forward_candle(x)
    }
}

impl Conv2d {
    /// The same convolution through candle's `conv2d` (any device or dtype; the reference the
    /// CPU kernels in `kernels/conv.rs` are tested and benchmarked against).
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        // The bias joins before the graph does, as in `Linear::forward`.
        let y = x
            .detach()
            .conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        };
        frozen(
            x,
            y,
            Frozen::Conv {
                weight: self.weight.clone(),
                padding: self.padding,
                stride: self.stride,
            },
        )
    }
}

/// A frozen layer's backward: only the gradient with respect to the input. candle's own
/// matmul/conv backward also computes (and keeps) a gradient for the weight operand, which for
/// frozen base weights is wasted work the size of the forward pass and memory the size of the
/// model. So the output is computed on a detached input and re-attached to the graph through
/// this op, whose backward returns the input gradient alone.
enum Frozen {
    /// y = x + c for a c that depends on nothing trained: dx = dy.
    Shift,
    Linear(Tensor),
    Conv {
        weight: Tensor,
        padding: usize,
        stride: usize,
    },
}

fn frozen(x: &Tensor, value: Tensor, kind: Frozen) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(FrozenGrad {
        kind,
        value: Precomputed::new(value.contiguous()?, "frozen-layer output"),
    })
}

/// `x + c` (broadcast) where `c` depends on nothing trained, e.g. SD's time embedding added
/// to a resnet's feature map. candle's add would also build c's gradient at x's full size
/// (zeros, then a sum) and keep it until the backward pass ends; here only x's is computed.
pub fn add_untrained(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if !c.track_op() {
        let y = x.detach().broadcast_add(c)?;
        // dx = dy needs y shaped like x (c broadcast to x, not x to something larger).
        if y.dims() == x.dims() {
            return frozen(x, y, Frozen::Shift);
        }
    }
    x.broadcast_add(c)
}

/// The graph node of a frozen layer: an op on the input alone, whose forward pass hands over
/// the output computed beforehand. The output is taken out of the op there, so the graph does
/// not keep a second copy of every frozen layer's output alive until the backward pass (as an
/// op with the output as a second operand would).
struct FrozenGrad {
    kind: Frozen,
    value: Precomputed,
}

impl CustomOp1 for FrozenGrad {
    fn name(&self) -> &'static str {
        "frozen-weight"
    }

    hand_over_forward!(value);

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = match &self.kind {
            Frozen::Shift => grad.clone(),
            // y = x W^T  =>  dx = dy W
            Frozen::Linear(w) => matmul_last(grad, &w.t()?)?,
            Frozen::Conv {
                weight,
                padding,
                stride,
            } => {
                let k = weight.dim(2)?;
                if *stride == 1 && *padding < k {
                    conv_input_grad(grad, weight, *padding)?
                } else {
                    let out = (grad.dim(2)? - 1) * stride + k - 2 * padding;
                    let out_padding = arg.dim(2)? - out;
                    grad.conv_transpose2d(weight, *padding, out_padding, *stride, 1)?
                }
            }
        };
        Ok(Some(g))
    }
}

/// The input gradient of a stride-1 convolution as another convolution: dy convolved with
/// the kernel transposed over (out, in) and flipped in both spatial axes, padded by
/// k - 1 - padding. Same result as `conv_transpose2d`, but candle's CPU transposed
/// convolution is a direct loop while `conv2d` runs as im2col + GEMM, several times faster
/// on the 3x3 convolutions that dominate a UNet.
fn conv_input_grad(grad: &Tensor, weight: &Tensor, padding: usize) -> Result<Tensor> {
    let k = weight.dim(2)?;
    let mut w = weight.transpose(0, 1)?.contiguous()?;
    if k > 1 {
        let rev: Vec<u32> = (0..k as u32).rev().collect();
        let rev = Tensor::new(rev.as_slice(), weight.device())?;
        w = w.index_select(&rev, 2)?.index_select(&rev, 3)?;
    }
    grad.conv2d(&w, k - 1 - padding, 1, 1, 1)
}

/// Nearest-neighbour 2x upsampling from broadcast + reshape, which candle differentiates.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, h * 2, w * 2))
}

/// Splits (B, L, C) into (B*heads, L, C/heads), contiguous.
fn split_heads(t: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, len, c) = t.dims3()?;
    t.reshape((b, len, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * heads, len, c / heads))
}

/// Inverse of `split_heads`.
fn merge_heads(t: &Tensor, b: usize, heads: usize) -> Result<Tensor> {
    let (_, len, d) = t.dims3()?;
    t.reshape((b, heads, len, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, len, heads * d))
}

/// Score elements (rows x keys x heads) one attention chunk may materialise: 16 Mi elements
/// (64 MiB in f32). At SD1.5's 64x64 latents (4096 tokens, 8 heads) that is 512 query rows
/// per chunk instead of the whole 4096 x 4096 x 8 (512 MiB) matrix, several of which the
/// plain formulation keeps alive per layer for the backward pass.
const CHUNK_SCORE_ELEMENTS: usize = 1 << 24;

/// Multi-head scaled dot-product attention on (B, N, C) inputs, memory-efficient: the
/// attention is computed in chunks of query rows and only the output is kept for the
/// backward pass, which recomputes each chunk's probabilities (see `ChunkedAttention`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    attention_in_chunks(q, k, v, heads, None)
}

/// `attention` with an explicit number of query rows per chunk (`None`: by the score budget).
pub(crate) fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    rows: Option<usize>,
) -> Result<Tensor> {
    let (b, _, c) = q.dims3()?;
    let scale = 1.0 / ((c / heads) as f64).sqrt();
    if [q, k, v].iter().all(|t| fusable(t)) {
        return flash_attention(q, k, v, heads, scale as f32, rows);
    }
    let q = split_heads(&(q * scale)?, heads)?;
    let k = split_heads(k, heads)?;
    let v = split_heads(v, heads)?;
    let budget = CHUNK_SCORE_ELEMENTS / (q.dim(0)? * k.dim(1)?).max(1);
    let chunk = rows.unwrap_or(budget).max(1);
    merge_heads(&chunked_attention(&q, &k, &v, chunk)?, b, heads)
}

/// Attention on (BH, N, d) tensors with `q` already scaled, `chunk` query rows at a time.
pub(crate) fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let out = chunked_forward(&q.detach(), &k.detach(), &v.detach(), chunk)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        ChunkedAttention {
            out: Precomputed::new(out, "chunked attention output"),
            chunk,
        },
    )
}

/// Attention on f32 CPU tensors (B, N, C) through the fused kernels of `kernels/attention.rs`, which
/// split the heads into head-major copies and merge them back themselves; `rows` query rows
/// per block (`None`: by its score budget). The
/// graph keeps the output and one log-sum-exp per query row and head for the backward pass.
fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
    rows: Option<usize>,
) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let shape = attention::Shape::new(b, heads, (n, k.dim(1)?, c / heads), rows);
    let (out, lse) = attention::forward(
        read_f32(&q, "attention q")?.slice(),
        read_f32(&k, "attention k")?.slice(),
        read_f32(&v, "attention v")?.slice(),
        shape,
        scale,
    )
    .map_err(candle_core::Error::Msg)?;
    let out = Tensor::from_vec(out, q.shape(), q.device())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        &k,
        &v,
        FlashAttention {
            out: Precomputed::new(out, "attention output"),
            lse,
            shape,
            scale,
        },
    )
}

/// The graph node of `flash_attention`; the backward pass is `attention::backward`.
struct FlashAttention {
    out: Precomputed,
    lse: Vec<f32>,
    shape: attention::Shape,
    scale: f32,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    hand_over_forwards!(out);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, grad) = (out.contiguous()?, grad.contiguous()?);
        let attention::Gradients { dq, dk, dv } = attention::backward(
            read_f32(q, "attention q")?.slice(),
            read_f32(k, "attention k")?.slice(),
            read_f32(v, "attention v")?.slice(),
            read_f32(&out, "attention output")?.slice(),
            &self.lse,
            read_f32(&grad, "attention output gradient")?.slice(),
            self.shape,
            self.scale,
        )
        .map_err(candle_core::Error::Msg)?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Query-row ranges of at most `chunk` rows covering `0..n`.
fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..n)
        .step_by(chunk)
        .map(move |start| (start, chunk.min(n - start)))
}

/// softmax(q k^T) v on detached inputs. Each chunk holds complete score rows, so the fused
/// softmax kernel applies (no gradient is needed here).
fn chunked_forward(q: &Tensor, k: &Tensor, v: &Tensor, chunk: usize) -> Result<Tensor> {
    let kt = k.t()?;
    let outs = chunks(q.dim(1)?, chunk)
        .map(|(start, len)| {
            let scores = q.narrow(1, start, len)?.matmul(&kt)?;
            candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
        })
        .collect::<Result<Vec<_>>>()?;
    if outs.len() == 1 {
        return outs
            .into_iter()
            .next()
            .ok_or_else(|| candle_core::Error::Msg("attention over zero query rows".into()));
    }
    Tensor::cat(&outs, 1)
}

/// The graph node of `chunked_attention`. The forward pass hands over the output computed
/// beforehand (so one implementation serves every device); the backward pass recomputes
/// each chunk's probabilities P from q and k and applies the softmax backward with the
/// per-row term D = rowsum(dO * O), as flash attention does:
/// dV = P^T dO, dS = P * (dO V^T - D), dQ = dS K, dK = dS^T Q.
struct ChunkedAttention {
    out: Precomputed,
    chunk: usize,
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }

    hand_over_forwards!(out);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, out, grad) = (
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            grad.detach(),
        );
        let kt = k.t()?;
        let vt = v.t()?;
        let row_term = (&grad * &out)?.sum_keepdim(D::Minus1)?;
        let mut dq = Vec::new();
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        for (start, len) in chunks(q.dim(1)?, self.chunk) {
            let qc = q.narrow(1, start, len)?;
            let go = grad.narrow(1, start, len)?;
            let p = candle_nn::ops::softmax_last_dim(&qc.matmul(&kt)?)?;
            dv = (dv + p.t()?.matmul(&go)?)?;
            let dp = go.matmul(&vt)?;
            let ds = (p * dp.broadcast_sub(&row_term.narrow(1, start, len)?)?)?;
            dq.push(ds.matmul(&k)?);
            dk = (dk + ds.t()?.matmul(&qc)?)?;
        }
        let dq = if dq.len() == 1 {
            dq.pop()
        } else {
            Some(Tensor::cat(&dq, 1)?)
        };
        Ok((dq, Some(dk), Some(dv)))
    }
}

/// Plain multi-head attention composed of differentiable ops (the whole score matrix is
/// materialised and kept for the backward pass). The reference `attention` is tested against.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, _, c) = q.dims3()?;
    let scale = 1.0 / ((c / heads) as f64).sqrt();
    let q = split_heads(&(q * scale)?, heads)?;
    let k = split_heads(k, heads)?;
    let v = split_heads(v, heads)?;
    let probs = softmax_last_dim(&q.matmul(&k.t()?)?)?;
    merge_heads(&probs.matmul(&v)?, b, heads)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_matches_candle_and_has_gradient() {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&Tensor::new(&[[1.0f64, 2.0, 0.5], [-1.0, 0.0, 3.0]], &dev).unwrap())
                .unwrap();
        let ours = softmax_last_dim(x.as_tensor()).unwrap();
        let fused = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
        let diff = (&ours - &fused)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12);
        let w = Tensor::new(&[[1.0f64, 0.0, 0.0], [0.0, 0.0, 1.0]], &dev).unwrap();
        let grads = (ours * w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        // d softmax_0 / d x_0 = p0 (1 - p0) > 0.
        assert!(g.to_vec2::<f64>().unwrap()[0][0] > 0.0);
    }

    fn wave(shape: &[usize], phase: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|i| (i as f64 * 0.377 + phase).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest absolute element difference, compared in f64.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        (f64(a) - f64(b))
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Output and gradients of q, k, v of chunked attention (several chunks, a ragged last
    /// one) against the plain differentiable formulation, for self- and cross-attention.
    #[test]
    fn chunked_attention_matches_plain_attention_and_its_gradients() {
        for (n, m) in [(37usize, 37usize), (29, 11)] {
            let (b, c, heads) = (2, 12, 3);
            let q = Var::from_tensor(&wave(&[b, n, c], 0.1)).unwrap();
            let k = Var::from_tensor(&(wave(&[b, m, c], 1.3) * 2.0).unwrap()).unwrap();
            let v = Var::from_tensor(&wave(&[b, m, c], 2.9)).unwrap();
            // A weighting makes every output element matter differently.
            let w = wave(&[b, n, c], 4.2);
            let run = |chunked: bool| {
                let out = if chunked {
                    attention_in_chunks(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, Some(8))
                        .unwrap()
                } else {
                    attention_reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads).unwrap()
                };
                let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let g = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
                (out, g(&q), g(&k), g(&v))
            };
            let (o1, gq1, gk1, gv1) = run(true);
            let (o2, gq2, gk2, gv2) = run(false);
            assert!(max_diff(&o1, &o2) < 1e-12, "output ({n}x{m})");
            for (name, a, b) in [("q", gq1, gq2), ("k", gk1, gk2), ("v", gv1, gv2)] {
                let norm = b
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(norm > 1e-3, "grad {name} is degenerate");
                assert!(max_diff(&a, &b) < 1e-10, "grad {name} ({n}x{m})");
            }
            // The public entry point picks its own chunking and agrees too.
            let public = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads).unwrap();
            assert!(max_diff(&public, &o2) < 1e-12);
        }
    }

    #[test]
    fn chunked_attention_in_f32_agrees_with_f64() {
        let (q, k, v) = (
            wave(&[1, 70, 16], 0.5),
            wave(&[1, 70, 16], 1.5),
            wave(&[1, 70, 16], 2.5),
        );
        let f64_out = attention(&q, &k, &v, 2).unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let f32_out = attention(&f32(&q), &f32(&k), &f32(&v), 2).unwrap();
        assert!(max_diff(&f32_out, &f64_out) < 1e-5);
    }

    #[test]
    fn query_chunks_cover_every_row_once() {
        let covered: Vec<(usize, usize)> = chunks(10, 4).collect();
        assert_eq!(covered, vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(chunks(3, 0).count(), 3);
        assert_eq!(chunks(0, 4).count(), 0);
    }

    /// The conv2d form of the stride-1 input gradient equals candle's transposed convolution
    /// (3x3 with padding 1 and 0, 1x1, non-square input, several channels).
    #[test]
    fn stride_one_conv_input_gradient_matches_transposed_convolution() {
        for (k, padding) in [(3usize, 1usize), (3, 0), (1, 0)] {
            let w = wave(&[5, 3, k, k], 0.7);
            let x = wave(&[2, 3, 7, 6], 1.1);
            let y = x.conv2d(&w, padding, 1, 1, 1).unwrap();
            let g = wave(y.dims(), 2.3);
            let ours = conv_input_grad(&g, &w, padding).unwrap();
            let theirs = g.conv_transpose2d(&w, padding, 0, 1, 1).unwrap();
            assert_eq!(ours.dims(), x.dims());
            assert!(max_diff(&ours, &theirs) < 1e-12, "k={k} padding={padding}");
        }
    }

    #[test]
    fn upsample_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((1, 1, 3, 4))
            .unwrap();
        let ours = upsample_nearest_2x(&x).unwrap();
        let theirs = x.upsample_nearest2d(6, 8).unwrap();
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
