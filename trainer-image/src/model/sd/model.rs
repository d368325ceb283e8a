//! A Stable Diffusion checkpoint (SD1.5 or SDXL) as the training loop and the renderer use it:
//! captions through the CLIP encoders, images through the VAE encoder, the UNet's prediction.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};

use super::{clip, tokenizer, unet, vae};
use crate::model::layers::lora::{Adapter, LoraSpec};
use crate::model::weights::Weights;
use crate::model::{FamilyModel, ModelError, ModelFamily, TextConditioning, read_config};

/// The loaded SD components: the UNet with adapters, the frozen text encoders and VAE encoder.
pub struct SdModel {
    family: ModelFamily,
    unet: unet::UNet2DConditionModel,
    /// Empty once released.
    text_encoders: Vec<(tokenizer::ClipTokenizer, clip::ClipTextModel)>,
    /// `None` once released.
    vae: Option<vae::VaeEncoder>,
    vae_scale_factor: usize,
    device: Device,
}

impl SdModel {
    /// Loads `unet/`, the CLIP encoders and tokenizers (one for SD1.5, two for SDXL) and
    /// `vae/`, every weight in `dtype`. The family is checked before the weights are read.
    pub(crate) fn load(
        dir: &Path,
        family: ModelFamily,
        lora: LoraSpec,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Self, ModelError> {
        let unet_cfg: unet::UNetConfig = read_config(&dir.join("unet").join("config.json"))?;
        check_family(dir, family, &unet_cfg)?;
        let unet = load_unet_with(dir, &unet_cfg, lora, device, dtype)?;

        let names: &[(&str, &str)] = match family {
            ModelFamily::Sdxl => &[
                ("text_encoder", "tokenizer"),
                ("text_encoder_2", "tokenizer_2"),
            ],
            _ => &[("text_encoder", "tokenizer")],
        };
        let mut text_encoders = Vec::new();
        for (enc, tok) in names {
            let tokenizer = tokenizer::ClipTokenizer::from_dir(&dir.join(tok))?;
            let cfg: clip::ClipTextConfig = read_config(&dir.join(enc).join("config.json"))?;
            let vb = Weights::from_dir(&dir.join(enc), enc, dtype, device)?;
            let with_projection = family == ModelFamily::Sdxl && *enc == "text_encoder_2";
            text_encoders.push((
                tokenizer,
                clip::ClipTextModel::load(&vb, &cfg, with_projection)?,
            ));
        }

        let vae_cfg: vae::VaeConfig = read_config(&dir.join("vae").join("config.json"))?;
        let vae_vb = Weights::from_dir(&dir.join("vae"), "vae", dtype, device)?;
        let vae = vae::VaeEncoder::load(&vae_vb, &vae_cfg)?;
        Ok(Self {
            family,
            unet,
            text_encoders,
            vae_scale_factor: vae.scale_factor(),
            vae: Some(vae),
            device: device.clone(),
        })
    }
}

impl FamilyModel for SdModel {
    /// SD1.5: the last hidden state of `text_encoder`. SDXL: the penultimate hidden states of
    /// both encoders side by side, and the pooled projection of `text_encoder_2`.
    fn encode_prompts(
        &self,
        captions: &[String],
    ) -> std::result::Result<TextConditioning, ModelError> {
        if self.text_encoders.is_empty() {
            return Err(ModelError::EncoderReleased("text encoders"));
        }
        let mut hiddens = Vec::new();
        let mut pooled = None;
        for (tokenizer, encoder) in &self.text_encoders {
            let (ids, eos): (Vec<_>, Vec<_>) =
                captions.iter().map(|c| tokenizer.encode_padded(c)).unzip();
            let out = encoder.forward(&ids, &eos, &self.device)?;
            if self.family == ModelFamily::Sdxl {
                hiddens.push(out.penultimate_hidden);
                if out.text_embeds.is_some() {
                    pooled = out.text_embeds;
                }
            } else {
                hiddens.push(out.last_hidden);
            }
        }
        Ok(TextConditioning {
            hidden: Tensor::cat(&hiddens, 2)?.detach(),
            pooled: pooled.map(|p| p.detach()),
        })
    }

    fn encode_images(&self, pixels: &Tensor) -> std::result::Result<Tensor, ModelError> {
        let vae = self
            .vae
            .as_ref()
            .ok_or(ModelError::EncoderReleased("VAE encoder"))?;
        Ok(vae.encode(pixels)?.detach())
    }

    /// `extra`: SDXL's size and crop ids (B, 6) (original size, crop top-left, target size).
    fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        cond: &TextConditioning,
        extra: Option<&Tensor>,
    ) -> Result<Tensor> {
        let added = match self.family {
            ModelFamily::Sdxl => {
                let pooled = cond.pooled.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("SDXL needs pooled text embeddings".into())
                })?;
                let ids = extra
                    .ok_or_else(|| candle_core::Error::Msg("SDXL needs time ids (B, 6)".into()))?;
                Some((pooled, ids))
            }
            _ => None,
        };
        self.unet.forward(noisy, timesteps, &cond.hidden, added)
    }

    fn adapters(&self) -> Vec<(String, Adapter)> {
        self.unet.adapters()
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.unet.set_gradient_checkpointing(on);
    }

    fn merge_checkpointed_grads(&self, grads: &mut GradStore) -> Result<()> {
        self.unet.merge_checkpointed_grads(grads)
    }

    fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

    fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    fn release_encoders(&mut self) {
        self.text_encoders.clear();
        self.vae = None;
    }
}

/// The UNet of a diffusers folder (`unet/`) with LoRA adapters, every weight in `dtype` on
/// `device`: the trained part alone, as the GPU check benchmarks it.
pub fn load_unet(
    dir: &Path,
    lora: LoraSpec,
    device: &Device,
    dtype: DType,
) -> std::result::Result<unet::UNet2DConditionModel, ModelError> {
    let cfg: unet::UNetConfig = read_config(&dir.join("unet").join("config.json"))?;
    load_unet_with(dir, &cfg, lora, device, dtype)
}

fn load_unet_with(
    dir: &Path,
    cfg: &unet::UNetConfig,
    lora: LoraSpec,
    device: &Device,
    dtype: DType,
) -> std::result::Result<unet::UNet2DConditionModel, ModelError> {
    let vb = Weights::from_dir(&dir.join("unet"), "unet", dtype, device)?;
    unet::UNet2DConditionModel::load(&vb, cfg, Some(&lora))
}

fn check_family(
    dir: &Path,
    family: ModelFamily,
    cfg: &unet::UNetConfig,
) -> std::result::Result<(), ModelError> {
    let is_xl = cfg.addition_embed_type.as_deref() == Some("text_time");
    if is_xl != (family == ModelFamily::Sdxl) {
        return Err(ModelError::UnsupportedConfig {
            path: dir.join("unet").join("config.json"),
            reason: format!(
                "family {family:?} does not match the UNet (addition_embed_type {:?})",
                cfg.addition_embed_type
            ),
        });
    }
    Ok(())
}
