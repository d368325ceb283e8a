//! LoRA adapters: a frozen base linear plus a trainable low-rank branch,
//! `y = base(x) + (alpha / rank) * up(down(x))`, with `down` kaiming-uniform initialised (as
//! PEFT does) and `up` zero, so training starts from the base model exactly.

use candle_core::{DType, Device, Module, Result, Tensor, Var};

use super::ops::Linear;
use crate::model::ModelError;

/// Rank and alpha of the adapters. The `down` initialisation is seeded from each module's
/// path, so it is reproducible; `DiffusionModel::reseed_adapters` draws it from another seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
}

/// One adapter's trainable weights.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// (rank, in_features).
    pub down: Var,
    /// (out_features, rank).
    pub up: Var,
    pub alpha: f64,
    pub rank: usize,
    /// The adapted layer is a 1x1 convolution in the checkpoint (SD1.5 `proj_in`/`proj_out`):
    /// exported weights must be reshaped to (rank, in, 1, 1) / (out, rank, 1, 1).
    pub conv1x1: bool,
}

impl Adapter {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The trainable variables (`down`, `up`) of `adapters`, in order.
pub fn variables(adapters: Vec<(String, Adapter)>) -> Vec<Var> {
    adapters
        .into_iter()
        .flat_map(|(_, a)| [a.down, a.up])
        .collect()
}

/// The trainable variables of `adapters` named as optimizer state and checkpoints key them:
/// `{module path}.down` / `{module path}.up`.
pub fn named_variables(adapters: Vec<(String, Adapter)>) -> Vec<(String, Var)> {
    adapters
        .into_iter()
        .flat_map(|(p, a)| [(format!("{p}.down"), a.down), (format!("{p}.up"), a.up)])
        .collect()
}

/// A frozen linear layer with an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    adapter: Option<Adapter>,
    path: String,
}

impl LoraLinear {
    /// Wraps `base`; `path` is the diffusers module path (used to name the adapter and to
    /// derive its initialisation seed).
    pub(crate) fn new(
        base: Linear,
        path: String,
        spec: Option<&LoraSpec>,
        conv1x1: bool,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let adapter = match spec {
            None => None,
            Some(spec) => {
                if spec.rank == 0 {
                    return Err(ModelError::SetAdapters {
                        name: path,
                        reason: "rank must be at least 1".into(),
                    });
                }
                let (in_dim, out_dim) = (base.in_dim(), base.out_dim());
                // Half-precision models keep their trainable weights in f32, as mixed
                // precision training does; the branch casts activations to match.
                let dtype = match dtype {
                    DType::F16 | DType::BF16 => DType::F32,
                    other => other,
                };
                let down = kaiming_uniform(spec.rank, in_dim, 0, &path, dtype, device)?;
                let up = Tensor::zeros((out_dim, spec.rank), dtype, device)?;
                Some(Adapter {
                    down: Var::from_tensor(&down)?,
                    up: Var::from_tensor(&up)?,
                    alpha: spec.alpha,
                    rank: spec.rank,
                    conv1x1,
                })
            }
        };
        Ok(Self {
            base,
            adapter,
            path,
        })
    }

    pub(crate) fn adapter(&self) -> Option<(String, Adapter)> {
        self.adapter.clone().map(|a| (self.path.clone(), a))
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.adapter {
            None => self.base.forward(x),
            Some(a) => {
                self.base
                    .forward_with_adapter(x, a.down.as_tensor(), a.up.as_tensor(), a.scale())
            }
        }
    }
}

/// PEFT's `kaiming_uniform_(a=sqrt(5))`: U(-1/sqrt(in), 1/sqrt(in)), seeded per module.
pub(crate) fn kaiming_uniform(
    rank: usize,
    in_dim: usize,
    seed: u64,
    path: &str,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut rng = SplitMix64::new(seed ^ fnv1a(path));
    let bound = 1.0 / (in_dim as f64).sqrt();
    let vals: Vec<f64> = (0..rank * in_dim)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) * bound)
        .collect();
    Tensor::from_vec(vals, (rank, in_dim), device)?.to_dtype(dtype)
}

/// Small deterministic generator (SplitMix64) for reproducible initialisation; the CPU
/// backend's own RNG cannot be seeded.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub(crate) fn next_normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

pub(crate) fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
