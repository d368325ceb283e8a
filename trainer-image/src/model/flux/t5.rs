//! T5's encoder (transformers' `T5EncoderModel`), FLUX.1's `text_encoder_2`, built from its
//! `config.json`: token embeddings, pre-norm blocks of self-attention with a learned relative
//! position bias (computed by the first block, shared by all) and a feed-forward (gated GELU
//! for T5 v1.1 and FLUX.1's T5-XXL, ReLU for the original T5), and a final RMS norm. Frozen and
//! forward-only: FLUX.1 training encodes every caption once and caches the result.

use candle_core::{DType, Device, Module, Result, Tensor};
use serde::Deserialize;

use crate::model::ModelError;
use crate::model::layers::ops::{self, Linear, RmsNorm};
use crate::model::weights::Weights;

/// The keys of transformers' `T5Config` the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "thirty_two")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "one_twenty_eight")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (T5 v1.1, FLUX.1) or `relu` (the original T5).
    #[serde(default = "relu")]
    pub feed_forward_proj: String,
}

fn thirty_two() -> usize {
    32
}
fn one_twenty_eight() -> usize {
    128
}
fn eps() -> f64 {
    1e-6
}
fn relu() -> String {
    "relu".into()
}

/// The feed-forward of a block.
#[derive(Debug, Clone)]
enum FeedForward {
    /// `wo(gelu_tanh(wi_0 x) · wi_1 x)`.
    GatedGelu {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
    /// `wo(relu(wi x))`.
    Relu { wi: Linear, wo: Linear },
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::GatedGelu { wi_0, wi_1, wo } => {
                let gate = ops::gelu_tanh(&wi_0.forward(x)?)?;
                wo.forward(&(gate * wi_1.forward(x)?)?)
            }
            FeedForward::Relu { wi, wo } => wo.forward(&wi.forward(x)?.relu()?),
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

/// A T5 encoder stack.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    embedding: Tensor,
    /// (buckets, heads): the first block's `relative_attention_bias`.
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    config: T5Config,
}

impl T5Encoder {
    pub(crate) fn load(vb: &Weights, cfg: &T5Config) -> std::result::Result<Self, ModelError> {
        let unsupported = |reason: String| ModelError::UnsupportedConfig {
            path: "text_encoder_2/config.json".into(),
            reason,
        };
        let gated = match cfg.feed_forward_proj.as_str() {
            "gated-gelu" => true,
            "relu" => false,
            other => return Err(unsupported(format!("feed_forward_proj {other:?}"))),
        };
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        let enc = vb.pp("encoder");
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let b = enc.pp("block").pp(i);
            let attn = b.pp("layer").pp(0);
            let sa = attn.pp("SelfAttention");
            let ffl = b.pp("layer").pp(1);
            let dense = ffl.pp("DenseReluDense");
            let lin = |name: &str, i: usize, o: usize| Linear::load(&dense.pp(name), i, o, false);
            let ff = if gated {
                FeedForward::GatedGelu {
                    wi_0: lin("wi_0", d, cfg.d_ff)?,
                    wi_1: lin("wi_1", d, cfg.d_ff)?,
                    wo: lin("wo", cfg.d_ff, d)?,
                }
            } else {
                FeedForward::Relu {
                    wi: lin("wi", d, cfg.d_ff)?,
                    wo: lin("wo", cfg.d_ff, d)?,
                }
            };
            blocks.push(Block {
                attn_norm: RmsNorm::load(&attn.pp("layer_norm"), d, cfg.layer_norm_epsilon)?,
                q: Linear::load(&sa.pp("q"), d, inner, false)?,
                k: Linear::load(&sa.pp("k"), d, inner, false)?,
                v: Linear::load(&sa.pp("v"), d, inner, false)?,
                o: Linear::load(&sa.pp("o"), inner, d, false)?,
                ff_norm: RmsNorm::load(&ffl.pp("layer_norm"), d, cfg.layer_norm_epsilon)?,
                ff,
            });
        }
        // The embedding is `shared` (tied) in every save; some also carry the encoder's copy.
        let embedding = if vb.contains("shared.weight") {
            vb.pp("shared").get((cfg.vocab_size, d), "weight")?
        } else {
            enc.pp("embed_tokens").get((cfg.vocab_size, d), "weight")?
        };
        let relative_bias = enc
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get(
                (cfg.relative_attention_num_buckets, cfg.num_heads),
                "weight",
            )?;
        Ok(Self {
            embedding,
            relative_bias,
            blocks,
            final_norm: RmsNorm::load(&enc.pp("final_layer_norm"), d, cfg.layer_norm_epsilon)?,
            config: cfg.clone(),
        })
    }

    /// The last hidden state for equally long token rows, (B, L, d_model). No attention mask:
    /// FLUX.1's pipeline lets the padding attend too, and the model was trained that way.
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let b = ids.len();
        let len = ids.first().map(Vec::len).unwrap_or(0);
        if b == 0 || len == 0 || ids.iter().any(|r| r.len() != len) {
            candle_core::bail!("token rows must be non-empty and equally long");
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, b * len, device)?;
        let mut x = self
            .embedding
            .index_select(&ids, 0)?
            .reshape((b, len, self.config.d_model))?;
        let bias = self.position_bias(len, x.dtype(), device)?;
        for block in &self.blocks {
            x = (&x + self.attention(block, &block.attn_norm.forward(&x)?, &bias)?)?;
            x = (&x + block.ff.forward(&block.ff_norm.forward(&x)?)?)?;
        }
        Ok(self.final_norm.forward(&x)?.detach())
    }

    /// T5 attention: no 1/sqrt(d) scaling (folded into the trained weights), the relative
    /// position bias added to the scores.
    fn attention(&self, block: &Block, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let (heads, dk) = (self.config.num_heads, self.config.d_kv);
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, len, heads, dk))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(block.q.forward(x)?)?;
        let k = split(block.k.forward(x)?)?;
        let v = split(block.v.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, len, heads * dk))?;
        block.o.forward(&out)
    }

    /// The (1, heads, L, L) bias of every (query, key) pair from its relative position bucket.
    fn position_bias(&self, len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..len)
            .flat_map(|q| {
                (0..len).map(move |k| {
                    relative_position_bucket(
                        k as i64 - q as i64,
                        self.config.relative_attention_num_buckets,
                        self.config.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let idx = Tensor::from_vec(buckets, len * len, device)?;
        self.relative_bias
            .index_select(&idx, 0)?
            .reshape((len, len, self.config.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(dtype)?
            .contiguous()
    }
}

/// transformers' bidirectional `_relative_position_bucket`: half the buckets for keys after
/// the query; within each half, exact buckets for small distances and logarithmically wider
/// ones up to `max_distance` (computed in f32, as PyTorch does, so the edges agree).
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    bucket += if n < max_exact {
        n
    } else {
        let ratio =
            (n as f32 / max_exact as f32).ln() / (max_distance as f32 / max_exact as f32).ln();
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        large.min(half - 1)
    };
    bucket as u32
}
