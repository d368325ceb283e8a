//! Differentiable building blocks. candle's fused `softmax_last_dim`, `layer_norm` and
//! `rms_norm` kernels have no backward pass, so gradients silently stop at them; everything
//! here is composed from elementary ops that candle can differentiate.
//!
//! The one hand-written backward is `FrozenGrad` for frozen linear/conv layers: it returns
//! the input gradient only, because candle's stock matmul/conv backward also computes a weight
//! gradient (as much work as the forward pass, and model-sized memory) that frozen base
//! weights never use. The finite-difference tests check it.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, D, DType, Layout, MetalStorage, Module, Result, Shape,
    Tensor,
};

use super::ModelError;
use super::weights::Weights;

/// Softmax over the last dimension: exp(x - max) / sum. The max is detached: softmax is
/// shift-invariant, so the gradient is exact without differentiating through it.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Normalises over the last dimension (zero mean, unit variance), without affine.
fn normalize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Exact (erf) GELU, as PyTorch's default `F.gelu`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
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

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Statistics in f32 at least, as PyTorch does for half precision.
        let dtype = x.dtype();
        let xf = upcast(x)?;
        normalize_last_dim(&xf, self.eps)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
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

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
                source: Box::new(source),
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
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = frozen(
            x,
            matmul_last(&x.detach(), &self.weight)?,
            Frozen::Linear(self.weight.clone()),
        )?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
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
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = frozen(
            x,
            x.detach()
                .conv2d(&self.weight, self.padding, self.stride, 1, 1)?,
            Frozen::Conv {
                weight: self.weight.clone(),
                padding: self.padding,
                stride: self.stride,
            },
        )?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// A frozen layer's backward: only the gradient with respect to the input. candle's own
/// matmul/conv backward also computes (and keeps) a gradient for the weight operand, which for
/// frozen base weights is wasted work the size of the forward pass and memory the size of the
/// model. So the output is computed on a detached input and re-attached to the graph through
/// this op, whose backward returns the input gradient alone.
enum Frozen {
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
    x.apply_op2(&value.contiguous()?, FrozenGrad(kind))
}

struct FrozenGrad(Frozen);

fn pass_through<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("frozen-weight op expects a contiguous output");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp2 for FrozenGrad {
    fn name(&self) -> &'static str {
        "frozen-weight"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(s, l)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        pass_through(s, l)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        s: &MetalStorage,
        l: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        pass_through(s, l)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = match &self.0 {
            // y = x W^T  =>  dx = dy W
            Frozen::Linear(w) => matmul_last(grad, &w.t()?)?,
            Frozen::Conv {
                weight,
                padding,
                stride,
            } => {
                let k = weight.dim(2)?;
                let out = (grad.dim(2)? - 1) * stride + k - 2 * padding;
                let out_padding = arg.dim(2)? - out;
                grad.conv_transpose2d(weight, *padding, out_padding, *stride, 1)?
            }
        };
        Ok((Some(g), None))
    }
}

/// Nearest-neighbour 2x upsampling from broadcast + reshape, which candle differentiates.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, h * 2, w * 2))
}

/// Multi-head scaled dot-product attention on (B, N, C) inputs.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let m = k.dim(1)?;
    let d = c / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
    };
    // Scaling q (N x d) instead of the scores (N x M) keeps one fewer N x M tensor alive
    // for the backward pass: at 64x64 latents each one is 0.5 GB per attention.
    let scale = 1.0 / (d as f64).sqrt();
    let q = split(&(q * scale)?, n)?;
    let k = split(k, m)?;
    let v = split(v, m)?;
    let scores = q.matmul(&k.t()?)?;
    let probs = softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, c))
}

#[cfg(test)]
mod tests {
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
