//! A FLUX.1 checkpoint as the training loop and the renderer use it: captions to T5 states and
//! a pooled CLIP vector, images to 16-channel latents, and the transformer's prediction on
//! latents in the (B, C, h, w) layout every family shares (packed into 2x2 patch tokens and
//! back here, as diffusers' `_pack_latents` / `_unpack_latents`).

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};

use super::t5::{T5Config, T5Encoder};
use super::tokenizer::T5Tokenizer;
use super::transformer::{self, FluxConfig, FluxInputs, FluxTransformer, LoraTargets};
use crate::model::layers::lora::{Adapter, LoraSpec};
use crate::model::sd::clip::{ClipTextConfig, ClipTextModel};
use crate::model::sd::tokenizer::ClipTokenizer;
use crate::model::sd::vae::{VaeConfig, VaeEncoder};
use crate::model::weights::Weights;
use crate::model::{FamilyModel, ModelError, TextConditioning, read_config};

/// How a FLUX.1 folder is loaded.
#[derive(Debug, Clone)]
pub struct FluxOptions {
    /// Adapters on the transformer (none: the base model only).
    pub lora: Option<LoraSpec>,
    pub targets: LoraTargets,
    /// T5 tokens per caption; `None`: as long as the variant was trained with, 512 for
    /// guidance-distilled (dev) checkpoints, 256 for schnell.
    pub t5_max_length: Option<usize>,
}

impl FluxOptions {
    /// Adapters on `targets` (`None`: every block layer), T5 rows as the variant's.
    pub fn new(lora: Option<LoraSpec>, targets: Option<&[String]>) -> Self {
        Self {
            lora,
            targets: targets.map_or_else(LoraTargets::default, |t| LoraTargets(t.to_vec())),
            t5_max_length: None,
        }
    }
}

/// The loaded FLUX.1 components.
pub struct FluxModel {
    transformer: FluxTransformer,
    /// The encoders, `None` once released.
    encoders: Option<Encoders>,
    latent_channels: usize,
    vae_scale_factor: usize,
    device: Device,
}

/// What only caching needs.
struct Encoders {
    clip: (ClipTokenizer, ClipTextModel),
    t5: (T5Tokenizer, T5Encoder),
    vae: VaeEncoder,
}

impl FluxModel {
    /// Loads `transformer/`, `text_encoder/` + `tokenizer/` (CLIP), `text_encoder_2/` +
    /// `tokenizer_2/` (T5) and `vae/` from a diffusers folder, every weight in `dtype`.
    pub fn load(
        dir: &Path,
        opts: &FluxOptions,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Self, ModelError> {
        let component = |name: &str| Weights::from_dir(&dir.join(name), name, dtype, device);
        let config = |name: &str| dir.join(name).join("config.json");
        // Every config first: a mismatch is found before gigabytes of weights are read.
        let cfg: FluxConfig = read_config(&config("transformer"))?;
        let clip_cfg: ClipTextConfig = read_config(&config("text_encoder"))?;
        let t5_cfg: T5Config = read_config(&config("text_encoder_2"))?;
        let vae_cfg: VaeConfig = read_config(&config("vae"))?;
        check_components(dir, &cfg, &clip_cfg, &t5_cfg, &vae_cfg)?;
        let transformer = FluxTransformer::load(
            &component("transformer")?,
            &cfg,
            opts.lora.as_ref(),
            &opts.targets,
        )?;
        let clip = (
            ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            ClipTextModel::load(&component("text_encoder")?, &clip_cfg, false)?,
        );
        let t5 = (
            T5Tokenizer::from_dir(
                &dir.join("tokenizer_2"),
                opts.t5_max_length
                    .unwrap_or(if cfg.guidance_embeds { 512 } else { 256 }),
            )?,
            T5Encoder::load(&component("text_encoder_2")?, &t5_cfg)?,
        );
        let vae = VaeEncoder::load(&component("vae")?, &vae_cfg)?;
        Ok(Self {
            transformer,
            latent_channels: vae_cfg.latent_channels,
            vae_scale_factor: vae.scale_factor(),
            encoders: Some(Encoders { clip, t5, vae }),
            device: device.clone(),
        })
    }

    pub fn transformer(&self) -> &FluxTransformer {
        &self.transformer
    }
}

impl FamilyModel for FluxModel {
    /// T5's last hidden state (`hidden`, (B, t5_max_length, joint_attention_dim)) and CLIP's
    /// pooled output (`pooled`, (B, hidden)), as `FluxPipeline.encode_prompt`. Frozen.
    fn encode_prompts(
        &self,
        captions: &[String],
    ) -> std::result::Result<TextConditioning, ModelError> {
        let enc = self
            .encoders
            .as_ref()
            .ok_or(ModelError::EncoderReleased("text encoders"))?;
        let (t5_tok, t5) = &enc.t5;
        let rows = captions
            .iter()
            .map(|c| t5_tok.encode_padded(c))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let hidden = t5.forward(&rows, &self.device)?;
        let (clip_tok, clip) = &enc.clip;
        let (ids, eos): (Vec<_>, Vec<_>) =
            captions.iter().map(|c| clip_tok.encode_padded(c)).unzip();
        let pooled = clip.forward(&ids, &eos, &self.device)?.pooled.detach();
        Ok(TextConditioning {
            hidden,
            pooled: Some(pooled),
        })
    }

    /// Images (B, 3, H, W) in [-1, 1] to shifted, scaled latents (B, 16, H/8, W/8). Frozen.
    fn encode_images(&self, pixels: &Tensor) -> std::result::Result<Tensor, ModelError> {
        let enc = self
            .encoders
            .as_ref()
            .ok_or(ModelError::EncoderReleased("VAE encoder"))?;
        Ok(enc.vae.encode(pixels)?.detach())
    }

    fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    fn release_encoders(&mut self) {
        self.encoders = None;
    }

    fn guidance_distilled(&self) -> bool {
        self.transformer.config().guidance_embeds
    }

    /// The velocity (ε − x₀) for noisy latents (B, C, h, w) at `sigmas` (B,) in [0, 1], with
    /// `guidance` (B,) for guidance-distilled (dev) models; the result in the latents' layout.
    fn predict(
        &self,
        noisy: &Tensor,
        sigmas: &Tensor,
        cond: &TextConditioning,
        guidance: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, _, h, w) = noisy.dims4()?;
        if h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!("FLUX.1 latents need even sides, got {h}x{w}");
        }
        let pooled = cond
            .pooled
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("FLUX.1 needs pooled CLIP embeddings".into()))?;
        let text_len = cond.hidden.dim(1)?;
        let cfg = self.transformer.config();
        let positions = transformer::positions(text_len, h / 2, w / 2);
        // The rotation in f32 at least, as diffusers applies it (`x.float() * cos + …`).
        let table_dtype = match noisy.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        let rope = transformer::rope_tables(cfg, &positions, table_dtype, noisy.device())?;
        let guidance_needed = cfg.guidance_embeds.then_some(guidance).flatten();
        let out = self.transformer.forward(&FluxInputs {
            image: &pack(noisy)?,
            text: &cond.hidden,
            pooled,
            sigma: sigmas,
            guidance: guidance_needed,
            rope: &rope,
        })?;
        unpack(&out, h, w)
    }

    fn adapters(&self) -> Vec<(String, Adapter)> {
        self.transformer.adapters()
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.transformer.set_gradient_checkpointing(on);
    }

    fn merge_checkpointed_grads(&self, grads: &mut GradStore) -> Result<()> {
        self.transformer.merge_checkpointed_grads(grads)
    }
}

/// The components must fit together (a folder mixing parts of different models would load,
/// cache every input and only then fail on a shape): the transformer's inputs are 2x2 patches
/// of the VAE's latents, T5's states and CLIP's pooled vector.
fn check_components(
    dir: &Path,
    cfg: &FluxConfig,
    clip: &ClipTextConfig,
    t5: &T5Config,
    vae: &VaeConfig,
) -> std::result::Result<(), ModelError> {
    let pairs = [
        (
            "in_channels",
            cfg.in_channels,
            "4 x vae latent_channels",
            4 * vae.latent_channels,
        ),
        (
            "joint_attention_dim",
            cfg.joint_attention_dim,
            "text_encoder_2 d_model",
            t5.d_model,
        ),
        (
            "pooled_projection_dim",
            cfg.pooled_projection_dim,
            "text_encoder hidden_size",
            clip.hidden_size,
        ),
    ];
    for (key, have, other, want) in pairs {
        if have != want {
            return Err(ModelError::UnsupportedConfig {
                path: dir.join("transformer").join("config.json"),
                reason: format!("{key} {have} does not match {other} {want}"),
            });
        }
    }
    Ok(())
}

/// (B, C, h, w) latents to (B, h/2 · w/2, 4C) tokens of 2x2 patches, row by row.
pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// The inverse of [`pack`] for an (h, w) latent.
pub fn unpack(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c4) = tokens.dims3()?;
    let c = c4 / 4;
    tokens
        .reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))
}
