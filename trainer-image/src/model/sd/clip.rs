//! CLIP text encoder (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`) built
//! from `text_encoder*/config.json`. Frozen and forward-only; it still uses the differentiable
//! ops from `ops` so one implementation serves every dtype.

use candle_core::{DType, Device, Module, Result, Tensor};
use serde::Deserialize;

use crate::model::ModelError;
use crate::model::layers::ops::{self, LayerNorm, Linear};
use crate::model::weights::Weights;

/// The keys of transformers' `CLIPTextConfig` this encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn seventy_seven() -> usize {
    77
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn ln_eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Outputs of one encoder pass.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// After the final layer norm, (B, T, hidden).
    pub last_hidden: Tensor,
    /// Output of the second-to-last layer, no final norm (what SDXL conditions on).
    pub penultimate_hidden: Tensor,
    /// The final-normed state at each row's EOS token, (B, hidden): transformers'
    /// `pooler_output`, what FLUX.1 conditions on.
    pub pooled: Tensor,
    /// `text_projection` of `pooled` (with projection only; what SDXL conditions on).
    pub text_embeds: Option<Tensor>,
}

/// A CLIP text transformer.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    heads: usize,
    activation: Activation,
}

impl ClipTextModel {
    pub(crate) fn load(
        vb: &Weights,
        cfg: &ClipTextConfig,
        with_projection: bool,
    ) -> std::result::Result<Self, ModelError> {
        let activation = match cfg.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(ModelError::UnsupportedConfig {
                    path: "text_encoder/config.json".into(),
                    reason: format!("hidden_act {other:?} is not supported"),
                });
            }
        };
        let h = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || !h.is_multiple_of(cfg.num_attention_heads) {
            return Err(ModelError::UnsupportedConfig {
                path: "text_encoder/config.json".into(),
                reason: format!(
                    "hidden_size {h} cannot be split into {} heads",
                    cfg.num_attention_heads
                ),
            });
        }
        // transformers 5 saves `CLIPTextModel` without the `text_model.` prefix (4.x, and
        // `CLIPTextModelWithProjection` in both, keep it): both layouts load. The prefixed one
        // is the default, so a builder that holds no tensors yet (the tiny-model writer) writes
        // the layout every library reads.
        let tm = if vb.contains("embeddings.token_embedding.weight") {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let emb = tm.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = tm.pp("encoder").pp("layers").pp(i);
            let a = l.pp("self_attn");
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(&l.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
                q_proj: Linear::load(&a.pp("q_proj"), h, h, true)?,
                k_proj: Linear::load(&a.pp("k_proj"), h, h, true)?,
                v_proj: Linear::load(&a.pp("v_proj"), h, h, true)?,
                out_proj: Linear::load(&a.pp("out_proj"), h, h, true)?,
                layer_norm2: LayerNorm::load(&l.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
                fc1: Linear::load(&l.pp("mlp").pp("fc1"), h, cfg.intermediate_size, true)?,
                fc2: Linear::load(&l.pp("mlp").pp("fc2"), cfg.intermediate_size, h, true)?,
            });
        }
        let text_projection = if with_projection {
            let p = cfg.projection_dim.unwrap_or(h);
            Some(Linear::load(&vb.pp("text_projection"), h, p, false)?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: emb
                .pp("token_embedding")
                .get((cfg.vocab_size, h), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, h), "weight")?,
            layers,
            final_layer_norm: LayerNorm::load(&tm.pp("final_layer_norm"), h, cfg.layer_norm_eps)?,
            text_projection,
            heads: cfg.num_attention_heads,
            activation,
        })
    }

    /// Encodes padded token rows; `eos` is each row's EOS position (for pooling).
    pub fn forward(&self, ids: &[Vec<u32>], eos: &[usize], device: &Device) -> Result<ClipOutput> {
        let b = ids.len();
        let t = ids.first().map(|r| r.len()).unwrap_or(0);
        if b == 0 || ids.iter().any(|r| r.len() != t) {
            candle_core::bail!("token rows must be non-empty and equally long");
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids_t = Tensor::from_vec(flat, b * t, device)?;
        let dtype = self.token_embedding.dtype();
        let tok = self
            .token_embedding
            .index_select(&ids_t, 0)?
            .reshape((b, t, ()))?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mask = causal_mask(t, dtype, device)?;
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            x = self.layer_forward(layer, &x, &mask)?;
        }
        let last_hidden = self.final_layer_norm.forward(&x)?;
        let rows = eos
            .iter()
            .enumerate()
            .map(|(i, &p)| last_hidden.get(i)?.get(p.min(t - 1)))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&rows, 0)?;
        let text_embeds = match &self.text_projection {
            None => None,
            Some(proj) => Some(proj.forward(&pooled)?),
        };
        Ok(ClipOutput {
            last_hidden,
            penultimate_hidden: penultimate,
            pooled,
            text_embeds,
        })
    }

    fn layer_forward(&self, l: &EncoderLayer, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let d = c / self.heads;
        let h = l.layer_norm1.forward(x)?;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((l.q_proj.forward(&h)? * (1.0 / (d as f64).sqrt()))?)?;
        let k = split(l.k_proj.forward(&h)?)?;
        let v = split(l.v_proj.forward(&h)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = ops::softmax_last_dim(&scores)?;
        let attn = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, c))?;
        let x = (l.out_proj.forward(&attn)? + x)?;
        let h = l.fc1.forward(&l.layer_norm2.forward(&x)?)?;
        let h = match self.activation {
            Activation::QuickGelu => ops::quick_gelu(&h)?,
            Activation::Gelu => ops::gelu(&h)?,
        };
        l.fc2.forward(&h)? + x
    }
}

fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let vals: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(vals, (t, t), device)?
        .to_dtype(dtype)?
        .unsqueeze(0)?
        .unsqueeze(0)
}
