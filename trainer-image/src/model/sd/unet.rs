//! `UNet2DConditionModel` as diffusers builds it from `unet/config.json` (SD1.5 and SDXL
//! variants: per-block attention heads and transformer depth, linear or 1x1-conv projections,
//! SDXL's `text_time` additional embedding), with LoRA adapters on every attention
//! projection, feed-forward linear and transformer `proj_in`/`proj_out`.
//!
//! All ops on this path are differentiable (see `ops`); tensor names follow diffusers
//! exactly, so `load` reads any conforming checkpoint.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Result, Tensor};
use serde::Deserialize;

use crate::model::ModelError;
use crate::model::layers::checkpoint::Checkpointing;
use crate::model::layers::embed::{TimestepEmbedding, timestep_embedding};
use crate::model::layers::lora::{self, Adapter, LoraLinear, LoraSpec};
use crate::model::layers::ops::{self, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::model::weights::Weights;

/// A config value diffusers accepts either as one number or as one per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, n: usize, what: &str) -> std::result::Result<Vec<usize>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(format!("{what} has {} entries for {n} blocks", v.len())),
        }
    }
}

/// The keys of diffusers' `UNet2DConditionModel` config this trainer uses.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default = "two_per_block")]
    pub layers_per_block: PerBlock,
    pub cross_attention_dim: PerBlock,
    #[serde(default = "eight_per_block")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub dual_cross_attention: bool,
}

fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn two_per_block() -> PerBlock {
    PerBlock::One(2)
}
fn eight_per_block() -> PerBlock {
    PerBlock::One(8)
}
fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}

/// Per-block values resolved from a config.
struct Resolved {
    heads: Vec<usize>,
    transformer_layers: Vec<usize>,
    layers: Vec<usize>,
    cross_dims: Vec<usize>,
}

impl UNetConfig {
    fn resolve(&self) -> std::result::Result<Resolved, String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(
                "block_out_channels, down_block_types and up_block_types must have the same, \
                 non-zero length"
                    .into(),
            );
        }
        if let Some(t) = &self.class_embed_type {
            return Err(format!("class_embed_type {t:?} is not supported"));
        }
        if self.encoder_hid_dim.is_some() {
            return Err("encoder_hid_dim is not supported".into());
        }
        if self
            .resnet_time_scale_shift
            .as_deref()
            .is_some_and(|s| s != "default")
        {
            return Err("resnet_time_scale_shift other than \"default\" is not supported".into());
        }
        if self
            .time_embedding_type
            .as_deref()
            .is_some_and(|s| s != "positional")
        {
            return Err("time_embedding_type other than \"positional\" is not supported".into());
        }
        if self.dual_cross_attention {
            return Err("dual_cross_attention is not supported".into());
        }
        if let Some(v) = &self.only_cross_attention
            && v != &serde_json::Value::Bool(false)
        {
            return Err("only_cross_attention is not supported".into());
        }
        if let Some(m) = &self.mid_block_type
            && m != "UNetMidBlock2DCrossAttn"
        {
            return Err(format!("mid_block_type {m:?} is not supported"));
        }
        let incomplete_text_time = self.addition_time_embed_dim.is_none()
            || self.projection_class_embeddings_input_dim.is_none();
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") if incomplete_text_time => {
                return Err(
                    "addition_embed_type \"text_time\" needs addition_time_embed_dim and \
                     projection_class_embeddings_input_dim"
                        .into(),
                );
            }
            Some("text_time") => {}
            Some(other) => return Err(format!("addition_embed_type {other:?} is not supported")),
        }
        for c in &self.block_out_channels {
            if self.norm_num_groups == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return Err(format!(
                    "block_out_channels entry {c} is not divisible by norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
        }
        // diffusers' historical naming: `attention_head_dim` holds the number of heads when
        // `num_attention_heads` is absent.
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n, "num_attention_heads")?;
        for (c, h) in self.block_out_channels.iter().zip(&heads) {
            if *h == 0 || !c.is_multiple_of(*h) {
                return Err(format!(
                    "{c} channels cannot be split into {h} attention heads"
                ));
            }
        }
        Ok(Resolved {
            heads,
            transformer_layers: self
                .transformer_layers_per_block
                .expand(n, "transformer_layers_per_block")?,
            layers: self.layers_per_block.expand(n, "layers_per_block")?,
            cross_dims: self.cross_attention_dim.expand(n, "cross_attention_dim")?,
        })
    }

    fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }
}

/// What every adapted layer needs at construction.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub lora: Option<&'a LoraSpec>,
    pub dtype: DType,
    pub device: &'a Device,
}

fn lora_linear(
    vb: &Weights,
    name: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    ctx: Ctx,
) -> std::result::Result<LoraLinear, ModelError> {
    let vb = vb.pp(name);
    let base = Linear::load(&vb, in_dim, out_dim, bias)?;
    LoraLinear::new(
        base,
        vb.path_prefix(),
        ctx.lora,
        false,
        ctx.dtype,
        ctx.device,
    )
}

/// `ResnetBlock2D` (also used by the VAE, without the time embedding projection).
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub(crate) fn load(
        vb: &Weights,
        in_c: usize,
        out_c: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), groups, in_c, eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), in_c, out_c, 3, 1, 1)?,
            time_emb_proj: temb
                .map(|t| Linear::load(&vb.pp("time_emb_proj"), t, out_c, true))
                .transpose()?,
            norm2: GroupNorm::load(&vb.pp("norm2"), groups, out_c, eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), out_c, out_c, 3, 1, 1)?,
            conv_shortcut: if in_c != out_c {
                Some(Conv2d::load(&vb.pp("conv_shortcut"), in_c, out_c, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&ops::silu(&self.norm1.forward(x)?)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&ops::silu(t)?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = ops::add_untrained(&h, &t)?;
        }
        let h = self.conv2.forward(&ops::silu(&self.norm2.forward(&h)?)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// diffusers `Attention` as used in transformer blocks (self or cross).
#[derive(Debug, Clone)]
struct CrossAttention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
}

impl CrossAttention {
    fn load(
        vb: &Weights,
        dim: usize,
        context_dim: usize,
        heads: usize,
        ctx: Ctx,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            to_q: lora_linear(vb, "to_q", dim, dim, false, ctx)?,
            to_k: lora_linear(vb, "to_k", context_dim, dim, false, ctx)?,
            to_v: lora_linear(vb, "to_v", context_dim, dim, false, ctx)?,
            to_out: lora_linear(&vb.pp("to_out"), "0", dim, dim, true, ctx)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with(x, context, &ops::attention)
    }

    fn forward_with(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        attend: &dyn Fn(&Tensor, &Tensor, &Tensor, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out.forward(&attend(&q, &k, &v, self.heads)?)
    }

    fn adapters(&self, out: &mut Vec<(String, Adapter)>) {
        for l in [&self.to_q, &self.to_k, &self.to_v, &self.to_out] {
            out.extend(l.adapter());
        }
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_in: LoraLinear,
    ff_out: LoraLinear,
}

impl BasicTransformerBlock {
    fn load(
        vb: &Weights,
        dim: usize,
        context_dim: usize,
        heads: usize,
        ctx: Ctx,
    ) -> std::result::Result<Self, ModelError> {
        let inner = dim * 4;
        let ff = vb.pp("ff").pp("net");
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: CrossAttention::load(&vb.pp("attn1"), dim, dim, heads, ctx)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: CrossAttention::load(&vb.pp("attn2"), dim, context_dim, heads, ctx)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff_in: lora_linear(&ff.pp("0"), "proj", dim, inner * 2, true, ctx)?,
            ff_out: lora_linear(&ff, "2", inner, dim, true, ctx)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let h = (self
            .attn2
            .forward(&self.norm2.forward(&h)?, Some(context))?
            + h)?;
        let proj = self.ff_in.forward(&self.norm3.forward(&h)?)?;
        let ff = self.ff_out.forward(&ops::geglu(&proj)?)?;
        ff + h
    }

    fn adapters(&self, out: &mut Vec<(String, Adapter)>) {
        self.attn1.adapters(out);
        self.attn2.adapters(out);
        out.extend(self.ff_in.adapter());
        out.extend(self.ff_out.adapter());
    }
}

/// `Transformer2DModel`: group norm, projection in, transformer blocks, projection out,
/// residual.
#[derive(Debug, Clone)]
struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: LoraLinear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: LoraLinear,
}

impl Transformer2DModel {
    #[allow(clippy::too_many_arguments)]
    fn load(
        vb: &Weights,
        channels: usize,
        context_dim: usize,
        heads: usize,
        depth: usize,
        cfg: &UNetConfig,
        ctx: Ctx,
    ) -> std::result::Result<Self, ModelError> {
        let proj = |name: &str| -> std::result::Result<LoraLinear, ModelError> {
            let pvb = vb.pp(name);
            if cfg.use_linear_projection {
                lora_linear(vb, name, channels, channels, true, ctx)
            } else {
                // A 1x1 conv over (B, C, H, W) equals a linear over the (B, HW, C) tokens.
                let base = Linear::load_conv1x1(&pvb, channels, channels)?;
                LoraLinear::new(
                    base,
                    pvb.path_prefix(),
                    ctx.lora,
                    true,
                    ctx.dtype,
                    ctx.device,
                )
            }
        };
        let blocks = (0..depth)
            .map(|i| {
                BasicTransformerBlock::load(
                    &vb.pp("transformer_blocks").pp(i),
                    channels,
                    context_dim,
                    heads,
                    ctx,
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), cfg.norm_num_groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        checkpointing: &Checkpointing,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .permute((0, 2, 3, 1))?
            .reshape((b, h * w, c))?;
        let mut t = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            let (owned, ctx) = (block.clone(), context.clone());
            t = checkpointing.run(
                &t,
                &[context],
                || {
                    let mut adapters = Vec::new();
                    block.adapters(&mut adapters);
                    lora::variables(adapters)
                },
                Box::new(move |x| owned.forward(x, &ctx)),
            )?;
        }
        let t = self.proj_out.forward(&t)?;
        let out = t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        out + x
    }

    fn adapters(&self, out: &mut Vec<(String, Adapter)>) {
        out.extend(self.proj_in.adapter());
        for b in &self.blocks {
            b.adapters(out);
        }
        out.extend(self.proj_out.adapter());
    }
}

/// A down or up block: resnets, optional attentions, optional resampler.
#[derive(Debug, Clone)]
struct Block {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    resample: Option<Conv2d>,
}

impl Block {
    fn adapters(&self, out: &mut Vec<(String, Adapter)>) {
        for a in &self.attentions {
            a.adapters(out);
        }
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Transformer2DModel,
    resnet1: ResnetBlock2D,
}

/// SDXL's `text_time` additional conditioning.
#[derive(Debug, Clone)]
struct AddEmbedding {
    time_dim: usize,
    embedding: TimestepEmbedding,
}

/// The conditional UNet.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<AddEmbedding>,
    down_blocks: Vec<Block>,
    mid_block: MidBlock,
    up_blocks: Vec<Block>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// When set, resnet and transformer blocks recompute their activations in the backward
    /// pass (gradient checkpointing); their LoRA gradients are gathered here.
    checkpointing: Checkpointing,
}

fn is_cross_attn(block_type: &str, path: &str) -> std::result::Result<bool, ModelError> {
    match block_type {
        "CrossAttnDownBlock2D" | "CrossAttnUpBlock2D" => Ok(true),
        "DownBlock2D" | "UpBlock2D" => Ok(false),
        other => Err(ModelError::UnsupportedConfig {
            path: path.into(),
            reason: format!("block type {other:?} is not supported"),
        }),
    }
}

impl UNet2DConditionModel {
    /// Builds the UNet from `cfg`, reading weights through `vb` (rooted at the UNet), with
    /// LoRA adapters when `lora` is given.
    pub(crate) fn load(
        vb: &Weights,
        cfg: &UNetConfig,
        lora: Option<&LoraSpec>,
    ) -> std::result::Result<Self, ModelError> {
        let cfg_path = "unet/config.json";
        let r = cfg
            .resolve()
            .map_err(|reason| ModelError::UnsupportedConfig {
                path: cfg_path.into(),
                reason,
            })?;
        let device = vb.device().clone();
        let ctx = Ctx {
            lora,
            dtype: vb.dtype(),
            device: &device,
        };
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        let temb = cfg.time_embed_dim();

        let conv_in = Conv2d::load(&vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?;
        let time_embedding = TimestepEmbedding::load(&vb.pp("time_embedding"), boc[0], temb)?;
        let add_embedding = match cfg.addition_embed_type.as_deref() {
            Some("text_time") => Some(AddEmbedding {
                time_dim: cfg.addition_time_embed_dim.unwrap_or(256),
                embedding: TimestepEmbedding::load(
                    &vb.pp("add_embedding"),
                    cfg.projection_class_embeddings_input_dim.unwrap_or(2816),
                    temb,
                )?,
            }),
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let bvb = vb.pp("down_blocks").pp(i);
            let cross = is_cross_attn(&cfg.down_block_types[i], cfg_path)?;
            let in_c = if i == 0 { boc[0] } else { boc[i - 1] };
            let out_c = boc[i];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..r.layers[i] {
                let rin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::load(
                    &bvb.pp("resnets").pp(j),
                    rin,
                    out_c,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if cross {
                    attentions.push(Transformer2DModel::load(
                        &bvb.pp("attentions").pp(j),
                        out_c,
                        r.cross_dims[i],
                        r.heads[i],
                        r.transformer_layers[i],
                        cfg,
                        ctx,
                    )?);
                }
            }
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    &bvb.pp("downsamplers").pp(0).pp("conv"),
                    out_c,
                    out_c,
                    3,
                    2,
                    1,
                )?)
            } else {
                None
            };
            down_blocks.push(Block {
                resnets,
                attentions,
                resample,
            });
        }

        let last = boc[n - 1];
        let mvb = vb.pp("mid_block");
        let mid_block = MidBlock {
            resnet0: ResnetBlock2D::load(
                &mvb.pp("resnets").pp(0),
                last,
                last,
                Some(temb),
                groups,
                eps,
            )?,
            attention: Transformer2DModel::load(
                &mvb.pp("attentions").pp(0),
                last,
                r.cross_dims[n - 1],
                r.heads[n - 1],
                r.transformer_layers[n - 1],
                cfg,
                ctx,
            )?,
            resnet1: ResnetBlock2D::load(
                &mvb.pp("resnets").pp(1),
                last,
                last,
                Some(temb),
                groups,
                eps,
            )?,
        };

        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for i in 0..n {
            let bvb = vb.pp("up_blocks").pp(i);
            let cross = is_cross_attn(&cfg.up_block_types[i], cfg_path)?;
            let prev_out = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let ri = n - 1 - i;
            let num_layers = r.layers[ri] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num_layers {
                let skip = if j + 1 == num_layers { in_c } else { out_c };
                let rin = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::load(
                    &bvb.pp("resnets").pp(j),
                    rin + skip,
                    out_c,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if cross {
                    attentions.push(Transformer2DModel::load(
                        &bvb.pp("attentions").pp(j),
                        out_c,
                        r.cross_dims[ri],
                        r.heads[ri],
                        r.transformer_layers[ri],
                        cfg,
                        ctx,
                    )?);
                }
            }
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    &bvb.pp("upsamplers").pp(0).pp("conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(Block {
                resnets,
                attentions,
                resample,
            });
        }

        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), groups, boc[0], eps)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), boc[0], cfg.out_channels, 3, 1, 1)?,
            checkpointing: Checkpointing::default(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Whether the UNet has SDXL's `add_embedding` (pooled text + time ids).
    pub fn has_add_embedding(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// `x` (B, C, h, w) noisy latents, `timesteps` (B,), `context` (B, T, cross_dim);
    /// `added` = (pooled text embeds (B, P), time ids (B, k)) for SDXL.
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let b = x.dim(0)?;
        let timesteps = if timesteps.rank() == 0 {
            timesteps.broadcast_as(b)?.contiguous()?
        } else {
            timesteps.clone()
        };
        let t = timestep_embedding(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t)?;
        match (&self.add_embedding, added) {
            (Some(add), Some((pooled, time_ids))) => {
                let ids = timestep_embedding(
                    time_ids,
                    add.time_dim,
                    self.config.flip_sin_to_cos,
                    self.config.freq_shift,
                )?
                .reshape((b, ()))?
                .to_dtype(dtype)?;
                let features = Tensor::cat(&[pooled.to_dtype(dtype)?, ids], 1)?;
                emb = (emb + add.embedding.forward(&features)?)?;
            }
            (Some(_), None) => {
                candle_core::bail!("this UNet needs pooled text embeddings and time ids")
            }
            (None, _) => {}
        }
        let context = context.to_dtype(dtype)?;
        let ck = &self.checkpointing;

        let mut h = self.conv_in.forward(x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = self.resnet(resnet, &h, &emb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, &context, ck)?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &block.resample {
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }

        h = self.resnet(&self.mid_block.resnet0, &h, &emb)?;
        h = self.mid_block.attention.forward(&h, &context, ck)?;
        h = self.resnet(&self.mid_block.resnet1, &h, &emb)?;

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = match skips.pop() {
                    Some(s) => s,
                    None => candle_core::bail!("UNet skip connections exhausted"),
                };
                h = Tensor::cat(&[&h, &skip], 1)?;
                h = self.resnet(resnet, &h, &emb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, &context, ck)?;
                }
            }
            if let Some(up) = &block.resample {
                h = up.forward(&ops::upsample_nearest_2x(&h)?)?;
            }
        }

        let h = ops::silu(&self.conv_norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }

    /// A resnet block's forward, checkpointed when gradient checkpointing is on.
    fn resnet(&self, resnet: &ResnetBlock2D, h: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let (resnet, temb) = (resnet.clone(), emb.clone());
        self.checkpointing.run(
            h,
            &[emb],
            Vec::new,
            Box::new(move |x| resnet.forward(x, Some(&temb))),
        )
    }

    /// Turns gradient checkpointing on or off: on, the backward pass recomputes each resnet
    /// and transformer block's activations instead of keeping them, and the gradients of
    /// their LoRA parameters arrive through [`UNet2DConditionModel::merge_checkpointed_grads`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = Checkpointing::new(on);
    }

    /// Adds the LoRA gradients gathered inside checkpointed blocks to `grads` (a no-op when
    /// checkpointing is off). Call after every `backward`.
    pub fn merge_checkpointed_grads(&self, grads: &mut GradStore) -> Result<()> {
        self.checkpointing.merge_into(grads)
    }

    /// Every adapter with its diffusers module path, in module order.
    pub fn adapters(&self) -> Vec<(String, Adapter)> {
        let mut out = Vec::new();
        for b in &self.down_blocks {
            b.adapters(&mut out);
        }
        self.mid_block.attention.adapters(&mut out);
        for b in &self.up_blocks {
            b.adapters(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_nn::VarBuilder;

    use super::*;

    fn wave(shape: &[usize], phase: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|i| (i as f64 * 0.613 + phase).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A LoRA-adapted attention layer with fixed pseudo-random base weights and non-zero
    /// `up` matrices (so `down` has gradients too).
    fn layer(dim: usize, context_dim: usize, heads: usize) -> CrossAttention {
        let mut tensors = HashMap::new();
        for (i, (name, in_dim)) in [
            ("to_q", dim),
            ("to_k", context_dim),
            ("to_v", context_dim),
            ("to_out.0", dim),
        ]
        .into_iter()
        .enumerate()
        {
            let w = (wave(&[dim, in_dim], i as f64) * 0.4).unwrap();
            tensors.insert(format!("{name}.weight"), w);
        }
        tensors.insert("to_out.0.bias".into(), wave(&[dim], 9.0));
        let dev = Device::Cpu;
        let vb = Weights::new(VarBuilder::from_tensors(tensors, DType::F64, &dev), "unet");
        let spec = LoraSpec {
            rank: 3,
            alpha: 2.0,
        };
        let ctx = Ctx {
            lora: Some(&spec),
            dtype: DType::F64,
            device: &dev,
        };
        let attn = CrossAttention::load(&vb, dim, context_dim, heads, ctx).unwrap();
        let mut adapters = Vec::new();
        attn.adapters(&mut adapters);
        for (i, (_, a)) in adapters.iter().enumerate() {
            a.up.set(&(wave(a.up.dims(), i as f64 + 0.5) * 0.3).unwrap())
                .unwrap();
        }
        attn
    }

    /// The memory-efficient attention trains the adapters exactly as the plain formulation:
    /// same output and same gradients for every `up` and `down` matrix, with the query rows
    /// split over several chunks.
    #[test]
    fn chunked_attention_gives_adapters_the_plain_gradients() {
        let x = wave(&[2, 21, 16], 0.2);
        let context = wave(&[2, 5, 8], 3.1);
        let w = wave(&[2, 21, 16], 5.5);
        for (attn, ctx) in [(layer(16, 16, 2), None), (layer(16, 8, 2), Some(&context))] {
            let grads = |attend: &dyn Fn(&Tensor, &Tensor, &Tensor, usize) -> Result<Tensor>| {
                let out = attn.forward_with(&x, ctx, attend).unwrap();
                let g = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let mut adapters = Vec::new();
                attn.adapters(&mut adapters);
                let per_adapter: Vec<(String, Tensor, Tensor)> = adapters
                    .iter()
                    .map(|(name, a)| {
                        let up = g.get(a.up.as_tensor()).unwrap().clone();
                        let down = g.get(a.down.as_tensor()).unwrap().clone();
                        (name.clone(), up, down)
                    })
                    .collect();
                (out, per_adapter)
            };
            let chunked = |q: &Tensor, k: &Tensor, v: &Tensor, h: usize| {
                ops::attention_in_chunks(q, k, v, h, Some(4))
            };
            let (out_a, ga) = grads(&chunked);
            let (out_b, gb) = grads(&ops::attention_reference);
            let diff = ops::tests::max_diff;
            assert!(diff(&out_a, &out_b) < 1e-12);
            assert_eq!(ga.len(), 4);
            for ((name, up_a, down_a), (_, up_b, down_b)) in ga.iter().zip(&gb) {
                let norm = down_b.abs().unwrap().sum_all().unwrap();
                assert!(
                    norm.to_scalar::<f64>().unwrap() > 1e-6,
                    "{name}: no down grad"
                );
                assert!(diff(up_a, up_b) < 1e-10, "{name}: up gradient differs");
                assert!(
                    diff(down_a, down_b) < 1e-10,
                    "{name}: down gradient differs"
                );
            }
        }
    }
}
