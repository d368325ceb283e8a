//! FLUX.1's transformer (diffusers' `FluxTransformer2DModel`), built from
//! `transformer/config.json`: a rectified-flow DiT over packed latent tokens.
//!
//! - Embeddings: `x_embedder` (packed latents → width), `context_embedder` (T5 states → width),
//!   and one conditioning vector `temb` from the timestep, the guidance value (dev models,
//!   `guidance_embeds`) and the pooled CLIP embedding (`time_text_embed`).
//! - `transformer_blocks` (double stream): text and image tokens keep their own weights
//!   (AdaLayerNormZero modulation from `temb`, q/k/v, feed-forward) but attend jointly.
//! - `single_transformer_blocks`: one stream of text + image tokens; attention and an MLP run
//!   side by side and `proj_out` fuses them.
//! - `norm_out` (AdaLayerNormContinuous) and `proj_out` back to latent channels.
//!
//! Queries and keys get a per-head RMSNorm, then RoPE over (text, row, column) positions
//! (`layers::rope`). The LoRA adapters sit on the linear layers [`LoraTargets`] names.
//! Gradient checkpointing recomputes each block: a block's two streams travel through the
//! checkpoint as one (text, image) sequence.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Module, Result, Tensor, Var};
use serde::Deserialize;

use loraplane_crds::v1alpha1::FLUX_LORA_TARGETS;

use crate::model::ModelError;
use crate::model::layers::checkpoint::{BlockFn, Checkpointing};
use crate::model::layers::embed::{TimestepEmbedding, timestep_embedding};
use crate::model::layers::lora::{self, Adapter, LoraLinear, LoraSpec};
use crate::model::layers::ops::{self, LayerNorm, Linear, RmsNorm};
use crate::model::layers::rope::RopeTables;
use crate::model::weights::Weights;

/// The keys of diffusers' `FluxTransformer2DModel` config (defaults as diffusers').
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FluxConfig {
    #[serde(default = "one")]
    pub patch_size: usize,
    #[serde(default = "sixty_four")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "nineteen")]
    pub num_layers: usize,
    #[serde(default = "thirty_eight")]
    pub num_single_layers: usize,
    #[serde(default = "one_twenty_eight")]
    pub attention_head_dim: usize,
    #[serde(default = "twenty_four")]
    pub num_attention_heads: usize,
    #[serde(default = "four_thousand_ninety_six")]
    pub joint_attention_dim: usize,
    #[serde(default = "seven_sixty_eight")]
    pub pooled_projection_dim: usize,
    /// FLUX.1-dev (guidance-distilled) embeds the guidance value; schnell does not.
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "default_axes")]
    pub axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}
fn sixty_four() -> usize {
    64
}
fn nineteen() -> usize {
    19
}
fn thirty_eight() -> usize {
    38
}
fn one_twenty_eight() -> usize {
    128
}
fn twenty_four() -> usize {
    24
}
fn four_thousand_ninety_six() -> usize {
    4096
}
fn seven_sixty_eight() -> usize {
    768
}
fn default_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

/// The sinusoidal features timestep and guidance are embedded from (diffusers' `Timesteps(256)`).
const TIME_FEATURES: usize = 256;
/// RoPE's base period (`FluxPosEmbed(theta=10000)`).
const ROPE_THETA: f64 = 10_000.0;
/// The epsilon of the modulated layer norms and of the q/k RMSNorms.
const NORM_EPS: f64 = 1e-6;

impl FluxConfig {
    /// The model width (heads × head dimension).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels per output token.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Why this config cannot be built, if it cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.patch_size != 1 {
            return Err(format!(
                "patch_size {} (FLUX.1 packs 2x2 latents itself; only 1 is supported)",
                self.patch_size
            ));
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.attention_head_dim || self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!(
                "axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.axes_dims_rope.len() != 3 {
            return Err(format!(
                "axes_dims_rope {:?}: FLUX.1 has three position axes (text, row, column)",
                self.axes_dims_rope
            ));
        }
        Ok(())
    }
}

/// Which linear layers get LoRA adapters: module-path suffixes as PEFT's `target_modules`
/// (a layer is adapted when its path is a name here or ends with `.` + a name).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTargets(pub Vec<String>);

impl Default for LoraTargets {
    /// Every linear layer of both block kinds (`v1alpha1::FLUX_LORA_TARGETS`): the image and
    /// context attention projections, both feed-forwards, and the single blocks'
    /// `proj_mlp`/`proj_out` (as ai-toolkit and kohya's defaults train them; diffusers'
    /// example script leaves the single blocks' MLP out). Embedders and modulation layers are
    /// never adapted.
    fn default() -> Self {
        Self(FLUX_LORA_TARGETS.iter().map(|s| s.to_string()).collect())
    }
}

impl LoraTargets {
    fn matches(&self, path: &str) -> bool {
        self.0
            .iter()
            .any(|t| path == t || path.ends_with(&format!(".{t}")))
    }
}

/// What every block needs at construction.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    lora: Option<&'a LoraSpec>,
    targets: &'a LoraTargets,
    dtype: DType,
    device: &'a Device,
}

impl Ctx<'_> {
    /// A linear layer with an adapter when it is a target (and LoRA is on).
    fn linear(
        &self,
        vb: &Weights,
        in_dim: usize,
        out_dim: usize,
    ) -> std::result::Result<LoraLinear, ModelError> {
        let base = Linear::load(vb, in_dim, out_dim, true)?;
        let path = vb.path_prefix();
        // Top-level `proj_out` (back to latent channels) is not a block layer.
        let adapted = path.contains("blocks.") && self.targets.matches(&path);
        let spec = if adapted { self.lora } else { None };
        LoraLinear::new(base, path, spec, false, self.dtype, self.device)
    }

    fn plain_norm(&self, dim: usize) -> Result<LayerNorm> {
        LayerNorm::without_affine(dim, NORM_EPS, self.dtype, self.device)
    }
}

/// `x · (1 + scale) + shift`, with `scale`, `shift` (B, C) broadcast over tokens.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `chunk(n, dim=1)` of a modulation vector (B, n·C).
fn chunks(m: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    let c = m.dim(1)? / n;
    (0..n).map(|i| m.narrow(1, i * c, c)).collect()
}

/// Per-head q/k/v projections with RMSNorm on q and k.
#[derive(Debug, Clone)]
struct Projections {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl Projections {
    fn load(
        vb: &Weights,
        [q, k, v, nq, nk]: [&str; 5],
        dim: usize,
        head_dim: usize,
        ctx: Ctx,
    ) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            q: ctx.linear(&vb.pp(q), dim, dim)?,
            k: ctx.linear(&vb.pp(k), dim, dim)?,
            v: ctx.linear(&vb.pp(v), dim, dim)?,
            norm_q: RmsNorm::load(&vb.pp(nq), head_dim, NORM_EPS)?,
            norm_k: RmsNorm::load(&vb.pp(nk), head_dim, NORM_EPS)?,
        })
    }

    /// (q, k, v), each (B, S, H, head_dim), q and k normalised.
    fn forward(&self, x: &Tensor, heads: usize) -> Result<[Tensor; 3]> {
        let (b, s, c) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, s, heads, c / heads));
        Ok([
            self.norm_q.forward(&split(self.q.forward(x)?)?)?,
            self.norm_k.forward(&split(self.k.forward(x)?)?)?,
            split(self.v.forward(x)?)?,
        ])
    }

    fn adapters(&self, out: &mut Vec<(String, Adapter)>) {
        out.extend(
            [&self.q, &self.k, &self.v]
                .iter()
                .filter_map(|l| l.adapter()),
        );
    }
}

/// Joint attention over `streams` (text first), RoPE applied to q and k; the output per stream.
fn joint_attention(
    streams: &[[Tensor; 3]],
    rope: &RopeTables,
    heads: usize,
) -> Result<Vec<Tensor>> {
    let cat = |i: usize| -> Result<Tensor> {
        let parts: Vec<&Tensor> = streams.iter().map(|s| &s[i]).collect();
        Tensor::cat(&parts, 1)
    };
    let (q, k, v) = (cat(0)?, cat(1)?, cat(2)?);
    let (b, s, h, d) = q.dims4()?;
    let flat = |t: Tensor| t.reshape((b, s, h * d));
    let q = flat(rope.apply(&q)?)?;
    let k = flat(rope.apply(&k)?)?;
    let o = ops::attention(&q, &k, &flat(v)?, heads)?;
    let mut out = Vec::with_capacity(streams.len());
    let mut at = 0;
    for stream in streams {
        let len = stream[0].dim(1)?;
        out.push(o.narrow(1, at, len)?);
        at += len;
    }
    Ok(out)
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")`: width → 4·width → width.
#[derive(Debug, Clone)]
struct FeedForward {
    up: LoraLinear,
    down: LoraLinear,
}

impl FeedForward {
    fn load(vb: &Weights, dim: usize, ctx: Ctx) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            up: ctx.linear(&vb.pp("net.0.proj"), dim, 4 * dim)?,
            down: ctx.linear(&vb.pp("net.2"), 4 * dim, dim)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&ops::gelu_tanh(&self.up.forward(x)?)?)
    }

    fn adapters(&self, out: &mut Vec<(String, Adapter)>) {
        out.extend([&self.up, &self.down].iter().filter_map(|l| l.adapter()));
    }
}

/// One stream's half of a double block: its modulation, projections, output and feed-forward.
#[derive(Debug, Clone)]
struct StreamWeights {
    /// AdaLayerNormZero's linear: `temb` → shift, scale, gate (attention), shift, scale, gate (MLP).
    modulation: Linear,
    projections: Projections,
    out: LoraLinear,
    ff: FeedForward,
}

impl StreamWeights {
    fn adapters(&self, out: &mut Vec<(String, Adapter)>) {
        self.projections.adapters(out);
        out.extend(self.out.adapter());
        self.ff.adapters(out);
    }
}

/// `FluxTransformerBlock`: text and image streams with their own weights, joint attention.
#[derive(Debug, Clone)]
struct DoubleBlock {
    image: StreamWeights,
    text: StreamWeights,
    norm: LayerNorm,
    heads: usize,
}

impl DoubleBlock {
    fn load(vb: &Weights, cfg: &FluxConfig, ctx: Ctx) -> std::result::Result<Self, ModelError> {
        let (dim, hd) = (cfg.inner_dim(), cfg.attention_head_dim);
        let attn = vb.pp("attn");
        let image = StreamWeights {
            modulation: Linear::load(&vb.pp("norm1").pp("linear"), dim, 6 * dim, true)?,
            projections: Projections::load(
                &attn,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                hd,
                ctx,
            )?,
            out: ctx.linear(&attn.pp("to_out").pp("0"), dim, dim)?,
            ff: FeedForward::load(&vb.pp("ff"), dim, ctx)?,
        };
        let text = StreamWeights {
            modulation: Linear::load(&vb.pp("norm1_context").pp("linear"), dim, 6 * dim, true)?,
            projections: Projections::load(
                &attn,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                dim,
                hd,
                ctx,
            )?,
            out: ctx.linear(&attn.pp("to_add_out"), dim, dim)?,
            ff: FeedForward::load(&vb.pp("ff_context"), dim, ctx)?,
        };
        Ok(Self {
            image,
            text,
            norm: ctx.plain_norm(dim)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `joint` (B, T + N, C) is the text stream then the image stream; `text_len` = T.
    fn forward(
        &self,
        joint: &Tensor,
        text_len: usize,
        temb: &Tensor,
        rope: &RopeTables,
    ) -> Result<Tensor> {
        let n = joint.dim(1)? - text_len;
        let streams = [
            (&self.text, joint.narrow(1, 0, text_len)?),
            (&self.image, joint.narrow(1, text_len, n)?),
        ];
        let mut modulations = Vec::with_capacity(2);
        let mut projected = Vec::with_capacity(2);
        for (w, x) in &streams {
            let m = chunks(&w.modulation.forward(temb)?, 6)?;
            let normed = modulate(&self.norm.forward(x)?, &m[0], &m[1])?;
            projected.push(w.projections.forward(&normed, self.heads)?);
            modulations.push(m);
        }
        let attended = joint_attention(&projected, rope, self.heads)?;
        let mut out = Vec::with_capacity(2);
        for (((w, x), m), a) in streams.iter().zip(&modulations).zip(attended) {
            let x = (x + w.out.forward(&a)?.broadcast_mul(&m[2].unsqueeze(1)?)?)?;
            let normed = modulate(&self.norm.forward(&x)?, &m[3], &m[4])?;
            let ff = w.ff.forward(&normed)?.broadcast_mul(&m[5].unsqueeze(1)?)?;
            out.push((x + ff)?);
        }
        Tensor::cat(&out, 1)
    }
}

/// `FluxSingleTransformerBlock`: one stream; attention and an MLP in parallel, fused by `proj_out`.
#[derive(Debug, Clone)]
struct SingleBlock {
    /// AdaLayerNormZeroSingle's linear: `temb` → shift, scale, gate.
    modulation: Linear,
    norm: LayerNorm,
    projections: Projections,
    proj_mlp: LoraLinear,
    proj_out: LoraLinear,
    heads: usize,
}

impl SingleBlock {
    fn load(vb: &Weights, cfg: &FluxConfig, ctx: Ctx) -> std::result::Result<Self, ModelError> {
        let (dim, hd) = (cfg.inner_dim(), cfg.attention_head_dim);
        let mlp = 4 * dim;
        Ok(Self {
            modulation: Linear::load(&vb.pp("norm").pp("linear"), dim, 3 * dim, true)?,
            norm: ctx.plain_norm(dim)?,
            projections: Projections::load(
                &vb.pp("attn"),
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                hd,
                ctx,
            )?,
            proj_mlp: ctx.linear(&vb.pp("proj_mlp"), dim, mlp)?,
            proj_out: ctx.linear(&vb.pp("proj_out"), dim + mlp, dim)?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor, rope: &RopeTables) -> Result<Tensor> {
        let m = chunks(&self.modulation.forward(temb)?, 3)?;
        let normed = modulate(&self.norm.forward(x)?, &m[0], &m[1])?;
        let mlp = ops::gelu_tanh(&self.proj_mlp.forward(&normed)?)?;
        let qkv = self.projections.forward(&normed, self.heads)?;
        let attn = joint_attention(&[qkv], rope, self.heads)?.remove(0);
        let fused = self
            .proj_out
            .forward(&Tensor::cat(&[attn, mlp], D::Minus1)?)?;
        x + fused.broadcast_mul(&m[2].unsqueeze(1)?)?
    }
}

/// `time_text_embed`: timestep (and guidance) features plus the pooled text projection.
#[derive(Debug, Clone)]
struct Conditioning {
    timestep: TimestepEmbedding,
    guidance: Option<TimestepEmbedding>,
    /// `PixArtAlphaTextProjection`: linear_1, SiLU, linear_2.
    text_1: Linear,
    text_2: Linear,
}

impl Conditioning {
    fn forward(
        &self,
        sigma: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let dtype = pooled.dtype();
        let features = |v: &Tensor| -> Result<Tensor> {
            timestep_embedding(
                &(v.to_dtype(DType::F32)? * 1000.0)?,
                TIME_FEATURES,
                true,
                0.0,
            )?
            .to_dtype(dtype)
        };
        let mut temb = self.timestep.forward(&features(sigma)?)?;
        match (&self.guidance, guidance) {
            (Some(embedder), Some(g)) => temb = (temb + embedder.forward(&features(g)?)?)?,
            (Some(_), None) => {
                candle_core::bail!("this FLUX.1 model embeds guidance: pass a value")
            }
            (None, _) => {}
        }
        let text = self
            .text_2
            .forward(&ops::silu(&self.text_1.forward(pooled)?)?)?;
        temb + text
    }
}

/// The inputs of one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct FluxInputs<'a> {
    /// Packed noisy latents, (B, N, in_channels).
    pub image: &'a Tensor,
    /// T5 hidden states, (B, T, joint_attention_dim).
    pub text: &'a Tensor,
    /// Pooled CLIP embedding, (B, pooled_projection_dim).
    pub pooled: &'a Tensor,
    /// σ in [0, 1] per sample, (B,).
    pub sigma: &'a Tensor,
    /// The guidance value per sample, (B,), for models with `guidance_embeds`.
    pub guidance: Option<&'a Tensor>,
    /// RoPE tables for the T text positions followed by the N image positions.
    pub rope: &'a RopeTables,
}

/// FLUX.1's transformer with LoRA adapters.
#[derive(Debug, Clone)]
pub struct FluxTransformer {
    config: FluxConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    conditioning: Conditioning,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    /// AdaLayerNormContinuous's linear: `temb` → scale, shift.
    norm_out_modulation: Linear,
    norm_out: LayerNorm,
    proj_out: Linear,
    dtype: DType,
    checkpointing: Checkpointing,
}

impl FluxTransformer {
    /// Builds the transformer from `vb` (the `transformer/` weights). `lora` adds adapters to
    /// the layers `targets` names.
    pub(crate) fn load(
        vb: &Weights,
        cfg: &FluxConfig,
        lora: Option<&LoraSpec>,
        targets: &LoraTargets,
    ) -> std::result::Result<Self, ModelError> {
        cfg.check()
            .map_err(|reason| ModelError::UnsupportedConfig {
                path: "transformer/config.json".into(),
                reason,
            })?;
        let ctx = Ctx {
            lora,
            targets,
            dtype: vb.dtype(),
            device: vb.device(),
        };
        let dim = cfg.inner_dim();
        let tte = vb.pp("time_text_embed");
        let guidance = if cfg.guidance_embeds {
            Some(TimestepEmbedding::load(
                &tte.pp("guidance_embedder"),
                TIME_FEATURES,
                dim,
            )?)
        } else {
            None
        };
        let conditioning = Conditioning {
            timestep: TimestepEmbedding::load(&tte.pp("timestep_embedder"), TIME_FEATURES, dim)?,
            guidance,
            text_1: Linear::load(
                &tte.pp("text_embedder").pp("linear_1"),
                cfg.pooled_projection_dim,
                dim,
                true,
            )?,
            text_2: Linear::load(&tte.pp("text_embedder").pp("linear_2"), dim, dim, true)?,
        };
        let double_blocks = (0..cfg.num_layers)
            .map(|i| DoubleBlock::load(&vb.pp("transformer_blocks").pp(i), cfg, ctx))
            .collect::<std::result::Result<_, _>>()?;
        let single_blocks = (0..cfg.num_single_layers)
            .map(|i| SingleBlock::load(&vb.pp("single_transformer_blocks").pp(i), cfg, ctx))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self {
            x_embedder: Linear::load(&vb.pp("x_embedder"), cfg.in_channels, dim, true)?,
            context_embedder: Linear::load(
                &vb.pp("context_embedder"),
                cfg.joint_attention_dim,
                dim,
                true,
            )?,
            conditioning,
            double_blocks,
            single_blocks,
            norm_out_modulation: Linear::load(&vb.pp("norm_out").pp("linear"), dim, 2 * dim, true)?,
            norm_out: ctx.plain_norm(dim)?,
            proj_out: Linear::load(&vb.pp("proj_out"), dim, cfg.out_channels(), true)?,
            dtype: ctx.dtype,
            checkpointing: Checkpointing::default(),
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// The dtype of the base weights (the adapters stay f32 under half precision).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The velocity prediction (ε − x₀ in flow matching) per image token, (B, N, out_channels).
    pub fn forward(&self, inputs: &FluxInputs) -> Result<Tensor> {
        let dtype = self.dtype;
        let image = self.x_embedder.forward(&inputs.image.to_dtype(dtype)?)?;
        let text = self
            .context_embedder
            .forward(&inputs.text.to_dtype(dtype)?)?;
        let temb = self.conditioning.forward(
            inputs.sigma,
            inputs.guidance,
            &inputs.pooled.to_dtype(dtype)?,
        )?;
        // Every modulation applies SiLU to `temb` first; once is enough.
        let temb_act = ops::silu(&temb)?;
        let text_len = text.dim(1)?;
        let mut joint = Tensor::cat(&[&text, &image], 1)?;
        // A block's two streams go through a checkpoint as one (text, image) sequence.
        for block in &self.double_blocks {
            let (owned, temb, rope) = (block.clone(), temb_act.clone(), inputs.rope.clone());
            let f: BlockFn = Box::new(move |x| owned.forward(x, text_len, &temb, &rope));
            joint = self
                .checkpointing
                .run(&joint, &[&temb_act], || block.params(), f)?;
        }
        for block in &self.single_blocks {
            let (owned, temb, rope) = (block.clone(), temb_act.clone(), inputs.rope.clone());
            let f: BlockFn = Box::new(move |x| owned.forward(x, &temb, &rope));
            joint = self
                .checkpointing
                .run(&joint, &[&temb_act], || block.params(), f)?;
        }
        let n = joint.dim(1)? - text_len;
        let image = joint.narrow(1, text_len, n)?;
        let m = chunks(&self.norm_out_modulation.forward(&temb_act)?, 2)?;
        // AdaLayerNormContinuous chunks (scale, shift), the reverse of AdaLayerNormZero.
        let normed = modulate(&self.norm_out.forward(&image)?, &m[1], &m[0])?;
        self.proj_out.forward(&normed)
    }

    /// Turns gradient checkpointing of every block on or off (see `layers::checkpoint`).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpointing = Checkpointing::new(on);
    }

    /// Adds the LoRA gradients gathered inside checkpointed blocks to `grads`.
    pub fn merge_checkpointed_grads(&self, grads: &mut GradStore) -> Result<()> {
        self.checkpointing.merge_into(grads)
    }

    /// Every adapter with its diffusers module path, in module order.
    pub fn adapters(&self) -> Vec<(String, Adapter)> {
        let mut out = Vec::new();
        for b in &self.double_blocks {
            b.adapters(&mut out);
        }
        for b in &self.single_blocks {
            b.adapters(&mut out);
        }
        out
    }
}

/// A block's trainable variables (what a checkpointed block's recomputation differentiates).
trait Adapted {
    fn adapters(&self, out: &mut Vec<(String, Adapter)>);

    fn params(&self) -> Vec<Var> {
        let mut adapters = Vec::new();
        self.adapters(&mut adapters);
        lora::variables(adapters)
    }
}

impl Adapted for DoubleBlock {
    fn adapters(&self, out: &mut Vec<(String, Adapter)>) {
        self.image.adapters(out);
        self.text.adapters(out);
    }
}

impl Adapted for SingleBlock {
    fn adapters(&self, out: &mut Vec<(String, Adapter)>) {
        self.projections.adapters(out);
        out.extend(
            [&self.proj_mlp, &self.proj_out]
                .iter()
                .filter_map(|l| l.adapter()),
        );
    }
}

/// RoPE positions of a FLUX.1 input: `text_len` text tokens at (0, 0, 0), then the packed
/// image tokens row by row at (0, row, column) of a `rows` × `cols` token grid (diffusers'
/// `_prepare_latent_image_ids`).
pub fn positions(text_len: usize, rows: usize, cols: usize) -> Vec<Vec<f64>> {
    let mut out = vec![vec![0.0; 3]; text_len];
    for r in 0..rows {
        for c in 0..cols {
            out.push(vec![0.0, r as f64, c as f64]);
        }
    }
    out
}

/// RoPE tables for `positions` with this model's axes, in `dtype` on `device`.
pub fn rope_tables(
    cfg: &FluxConfig,
    positions: &[Vec<f64>],
    dtype: DType,
    device: &Device,
) -> Result<RopeTables> {
    RopeTables::new(positions, &cfg.axes_dims_rope, ROPE_THETA, dtype, device)
}
