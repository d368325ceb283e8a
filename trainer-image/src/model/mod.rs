//! The diffusion model the trainer trains through, built from a diffusers folder: the
//! architecture comes from each component's `config.json`, the weights from its safetensors,
//! so any conforming SD1.5 or SDXL checkpoint loads, full size or tiny.
//!
//! Read it from the bottom up:
//! - `kernels/`: the hand-written CPU kernels (attention, convolution, fused norms and
//!   activations, GEMM and SIMD helpers) and the storage plumbing every custom op shares;
//!   each applies to f32 CPU tensors only, so other devices never reach them;
//! - `layers/`: the differentiable layers the families are built from (`ops`: linear, conv,
//!   norms, activations, attention, each handing over to a kernel where one applies and
//!   composed from candle ops elsewhere; `lora`: the LoRA adapter; `checkpoint`: gradient
//!   checkpointing). candle's own fused softmax/layer-norm/rms-norm have no backward pass and
//!   would silently cut the graph, so none is used;
//! - `sd/`: the Stable Diffusion family (SD1.5 and SDXL): UNet, VAE encoder, CLIP text
//!   encoders and tokenizer, each with its `Config` from the diffusers `config.json` and a
//!   `load` per block;
//! - here: `DiffusionModel`, the facade the training loop calls (encode prompts and images,
//!   predict, list adapters, backward), `weights` (safetensors by diffusers name) and `tiny`
//!   (small random checkpoints in the exact diffusers layout, for tests and demos).
//!
//! Only the UNet is on the training path; the text encoders and the VAE encoder are frozen
//! and forward-only.

pub mod flux;
mod kernels;
pub mod layers;
pub mod sd;
pub mod tiny;
mod weights;

pub use layers::{lora, ops};
pub use sd::{clip, tokenizer, unet, vae};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;

pub use lora::{Adapter, LoraSpec};
pub use loraplane_crds::v1alpha1::ModelFamily;

/// Everything that can go wrong loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config or tokenizer file could not be read.
    #[error("reading {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A JSON config file is malformed.
    #[error("parsing {path}: {source}")]
    ParseConfig {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A config is well-formed JSON but describes something this trainer cannot build.
    #[error("unsupported model config {path}: {reason}")]
    UnsupportedConfig { path: PathBuf, reason: String },
    /// A safetensors file could not be read or parsed.
    #[error("reading weights {path}: {source}")]
    ReadWeights {
        path: PathBuf,
        source: Box<candle_core::Error>,
    },
    /// A weight the architecture needs is missing or has the wrong shape.
    #[error("loading tensor `{tensor}` of {component}: {source}")]
    LoadTensor {
        component: String,
        tensor: String,
        source: Box<candle_core::Error>,
    },
    /// The tokenizer files are missing or malformed.
    #[error("loading tokenizer from {path}: {reason}")]
    LoadTokenizer { path: PathBuf, reason: String },
    /// Adapter tensors handed in (e.g. from a checkpoint) do not fit the model.
    #[error("setting adapter `{name}`: {reason}")]
    SetAdapters { name: String, reason: String },
    /// A tensor computation failed (shape mismatch in the inputs, out of memory, ...).
    #[error("model computation failed: {0}")]
    Forward(Box<candle_core::Error>),
    /// Writing a (tiny) model to disk failed.
    #[error("writing {path}: {reason}")]
    WriteModel { path: PathBuf, reason: String },
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Forward(Box::new(one_line(e)))
    }
}

/// candle's error without the backtrace it captures when `RUST_BACKTRACE` is set, on one
/// line: a failed run reports its error as the last line of stderr and in the termination
/// summary, and a backtrace there would bury the tensor name a user needs.
pub(crate) fn one_line(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error;
    match e {
        Error::WithBacktrace { inner, .. } => one_line(*inner),
        Error::WithPath { inner, path } => Error::WithPath {
            inner: Box::new(one_line(*inner)),
            path,
        },
        Error::Context { inner, context } => Error::Msg(format!("{context}: {}", one_line(*inner))),
        other => other,
    }
}

/// Text conditioning for the UNet.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// Per-token hidden states, (B, 77, cross_attention_dim).
    pub hidden: Tensor,
    /// SDXL only: pooled, projected embedding of `text_encoder_2`, (B, projection_dim).
    pub pooled: Option<Tensor>,
}

impl TextConditioning {
    /// Moves/casts the conditioning, e.g. after loading it from a cache.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self, ModelError> {
        Ok(Self {
            hidden: self.hidden.to_dtype(dtype)?,
            pooled: self
                .pooled
                .as_ref()
                .map(|p| p.to_dtype(dtype))
                .transpose()?,
        })
    }
}

/// The noise schedule the base model was trained with (`scheduler/scheduler_config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// `epsilon` or `v_prediction`; anything else fails loading with the field named.
    #[serde(default)]
    pub prediction_type: PredictionType,
    /// The scheduler the model was published with (`_class_name`): picks the preview sampler.
    #[serde(default, rename = "_class_name")]
    pub class_name: Option<String>,
    /// How inference timesteps are spread (`leading`, `trailing`, `linspace`).
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// Added to `leading` inference timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// DDIM's last step lands on a clean sample (ᾱ = 1) rather than on timestep 0.
    #[serde(default)]
    pub set_alpha_to_one: bool,
}

/// What the UNet predicts (`prediction_type` in `scheduler_config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise.
    #[default]
    Epsilon,
    /// v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀.
    VPrediction,
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_beta_schedule() -> String {
    "scaled_linear".to_string()
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: default_train_timesteps(),
            beta_start: default_beta_start(),
            beta_end: default_beta_end(),
            beta_schedule: default_beta_schedule(),
            prediction_type: PredictionType::default(),
            class_name: None,
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: false,
        }
    }
}

/// A loaded base model with LoRA adapters on its UNet.
pub struct DiffusionModel {
    family: ModelFamily,
    dtype: DType,
    device: Device,
    unet: unet::UNet2DConditionModel,
    text_encoders: Vec<(tokenizer::ClipTokenizer, clip::ClipTextModel)>,
    vae: vae::VaeEncoder,
    scheduler: SchedulerConfig,
}

impl std::fmt::Debug for DiffusionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiffusionModel")
            .field("family", &self.family)
            .field("dtype", &self.dtype)
            .field("adapters", &self.unet.adapters().len())
            .finish_non_exhaustive()
    }
}

/// Loads a diffusers folder in f32 (the CPU training dtype).
pub fn load(
    dir: &Path,
    family: ModelFamily,
    lora: LoraSpec,
    device: &Device,
) -> Result<DiffusionModel, ModelError> {
    load_with_dtype(dir, family, lora, device, DType::F32)
}

/// Loads a diffusers folder with every weight and adapter in `dtype` (f64 for gradient
/// checks, f16/bf16 on GPUs).
pub fn load_with_dtype(
    dir: &Path,
    family: ModelFamily,
    lora: LoraSpec,
    device: &Device,
    dtype: DType,
) -> Result<DiffusionModel, ModelError> {
    // The family is checked before gigabytes of weights are read.
    let unet_cfg: unet::UNetConfig = read_config(&dir.join("unet").join("config.json"))?;
    check_family(dir, family, &unet_cfg)?;
    let unet = load_unet_with(dir, &unet_cfg, lora, device, dtype)?;

    let mut text_encoders = Vec::new();
    let names: &[(&str, &str)] = match family {
        ModelFamily::Sd15 => &[("text_encoder", "tokenizer")],
        ModelFamily::Sdxl => &[
            ("text_encoder", "tokenizer"),
            ("text_encoder_2", "tokenizer_2"),
        ],
    };
    for (enc, tok) in names {
        let tokenizer = tokenizer::ClipTokenizer::from_dir(&dir.join(tok))?;
        let cfg: clip::ClipTextConfig = read_config(&dir.join(enc).join("config.json"))?;
        let vb = weights::Weights::from_dir(&dir.join(enc), enc, dtype, device)?;
        let with_projection = family == ModelFamily::Sdxl && *enc == "text_encoder_2";
        let model = clip::ClipTextModel::load(&vb, &cfg, with_projection)?;
        text_encoders.push((tokenizer, model));
    }

    let vae_cfg: vae::VaeConfig = read_config(&dir.join("vae").join("config.json"))?;
    let vae_vb = weights::Weights::from_dir(&dir.join("vae"), "vae", dtype, device)?;
    let vae = vae::VaeEncoder::load(&vae_vb, &vae_cfg)?;

    let sched_path = dir.join("scheduler").join("scheduler_config.json");
    let scheduler = if sched_path.exists() {
        read_config(&sched_path)?
    } else {
        SchedulerConfig::default()
    };

    Ok(DiffusionModel {
        family,
        dtype,
        device: device.clone(),
        unet,
        text_encoders,
        vae,
        scheduler,
    })
}

/// The UNet of a diffusers folder (`unet/`) with LoRA adapters, every weight in `dtype` on
/// `device`: the trained part alone, as the GPU check benchmarks it.
pub fn load_unet(
    dir: &Path,
    lora: LoraSpec,
    device: &Device,
    dtype: DType,
) -> Result<unet::UNet2DConditionModel, ModelError> {
    let cfg: unet::UNetConfig = read_config(&dir.join("unet").join("config.json"))?;
    load_unet_with(dir, &cfg, lora, device, dtype)
}

/// `load_unet` with its config already read.
fn load_unet_with(
    dir: &Path,
    cfg: &unet::UNetConfig,
    lora: LoraSpec,
    device: &Device,
    dtype: DType,
) -> Result<unet::UNet2DConditionModel, ModelError> {
    let vb = weights::Weights::from_dir(&dir.join("unet"), "unet", dtype, device)?;
    unet::UNet2DConditionModel::load(&vb, cfg, Some(&lora))
}

/// The FLUX.1 transformer of a diffusers folder (`transformer/`), every weight in `dtype` on
/// `device`, with LoRA adapters (when `lora` is given) on the layers `targets` names.
pub fn load_flux_transformer(
    dir: &Path,
    lora: Option<&LoraSpec>,
    targets: &flux::transformer::LoraTargets,
    device: &Device,
    dtype: DType,
) -> Result<flux::transformer::FluxTransformer, ModelError> {
    let folder = dir.join("transformer");
    let cfg: flux::transformer::FluxConfig = read_config(&folder.join("config.json"))?;
    let vb = weights::Weights::from_dir(&folder, "transformer", dtype, device)?;
    flux::transformer::FluxTransformer::load(&vb, &cfg, lora, targets)
}

/// The VAE decoder of a diffusers folder, in f32 on `device` (for rendering images; training
/// never loads it).
pub fn load_vae_decoder(dir: &Path, device: &Device) -> Result<vae::VaeDecoder, ModelError> {
    let cfg: vae::VaeConfig = read_config(&dir.join("vae").join("config.json"))?;
    let vb = weights::Weights::from_dir(&dir.join("vae"), "vae", DType::F32, device)?;
    vae::VaeDecoder::load(&vb, &cfg)
}

fn check_family(dir: &Path, family: ModelFamily, cfg: &unet::UNetConfig) -> Result<(), ModelError> {
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

pub(crate) fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::ParseConfig {
        path: path.to_path_buf(),
        source,
    })
}

impl DiffusionModel {
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of latent channels the UNet expects.
    pub fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

    /// Pixel-to-latent downscale factor of the VAE (8 for real checkpoints).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// Token sequence length of the text encoders (77).
    pub fn max_token_length(&self) -> usize {
        self.text_encoders
            .first()
            .map(|(t, _)| t.max_length())
            .unwrap_or(77)
    }

    /// Tokenizes and encodes captions: SD1.5 uses the last hidden state of `text_encoder`;
    /// SDXL concatenates the penultimate hidden states of both encoders and adds the pooled
    /// projection of `text_encoder_2`. Frozen: the result carries no gradient.
    pub fn encode_prompts(&self, captions: &[String]) -> Result<TextConditioning, ModelError> {
        let mut hiddens = Vec::new();
        let mut pooled = None;
        for (tokenizer, encoder) in &self.text_encoders {
            let mut ids = Vec::with_capacity(captions.len());
            let mut eos = Vec::with_capacity(captions.len());
            for caption in captions {
                let (row, eos_pos) = tokenizer.encode_padded(caption);
                ids.push(row);
                eos.push(eos_pos);
            }
            let out = encoder.forward(&ids, &eos, &self.device)?;
            match self.family {
                ModelFamily::Sd15 => hiddens.push(out.last_hidden),
                ModelFamily::Sdxl => {
                    hiddens.push(out.penultimate_hidden);
                    if out.text_embeds.is_some() {
                        pooled = out.text_embeds;
                    }
                }
            }
        }
        let hidden = Tensor::cat(&hiddens, 2)?.detach();
        Ok(TextConditioning {
            hidden,
            pooled: pooled.map(|p| p.detach()),
        })
    }

    /// Encodes images (B, 3, H, W) in [-1, 1] to scaled latents (the posterior mean, not a
    /// sample, so caching is deterministic). Frozen: the result carries no gradient.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let pixels = pixels.to_dtype(self.dtype)?.to_device(&self.device)?;
        Ok(self.vae.encode(&pixels)?.detach())
    }

    /// Predicts noise (or v) for noisy latents (B, C, h, w) at per-sample timesteps (B,).
    /// SDXL needs `cond.pooled` and `time_ids` (B, 6): original size, crop top-left, target
    /// size, as in diffusers.
    pub fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        cond: &TextConditioning,
        time_ids: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let added = match self.family {
            ModelFamily::Sd15 => None,
            ModelFamily::Sdxl => {
                let pooled = cond.pooled.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("SDXL needs pooled text embeddings".into())
                })?;
                let ids = time_ids
                    .ok_or_else(|| candle_core::Error::Msg("SDXL needs time ids (B, 6)".into()))?;
                Some((pooled, ids))
            }
        };
        Ok(self.unet.forward(noisy, timesteps, &cond.hidden, added)?)
    }

    /// Turns gradient checkpointing of the UNet's blocks on or off (see `checkpoint`):
    /// less memory for one more forward of each block in the backward pass.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.unet.set_gradient_checkpointing(on);
    }

    /// The gradients of `loss` for every trainable variable. Always use this rather than
    /// `loss.backward()`: with checkpointing on, the adapters inside checkpointed blocks get
    /// their gradients from the recomputation, outside candle's own store.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        let mut grads = loss.backward()?;
        self.unet.merge_checkpointed_grads(&mut grads)?;
        Ok(grads)
    }

    /// Every LoRA adapter with its diffusers module path, e.g.
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, in a stable order.
    pub fn adapters(&self) -> Vec<(String, Adapter)> {
        self.unet.adapters()
    }

    /// The trainable variables (every adapter's `down` and `up`), for the optimizer.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.adapters()
            .into_iter()
            .flat_map(|(_, a)| [a.down, a.up])
            .collect()
    }

    /// Overwrites adapter weights (resume from a checkpoint). Keys are
    /// `{module path}.down` / `{module path}.up`; every adapter must be present with its
    /// exact shape.
    pub fn load_adapters(&self, tensors: &HashMap<String, Tensor>) -> Result<(), ModelError> {
        for (name, adapter) in self.adapters() {
            for (suffix, var) in [("down", &adapter.down), ("up", &adapter.up)] {
                let key = format!("{name}.{suffix}");
                let t = tensors.get(&key).ok_or_else(|| ModelError::SetAdapters {
                    name: key.clone(),
                    reason: "missing".to_string(),
                })?;
                if t.dims() != var.dims() {
                    return Err(ModelError::SetAdapters {
                        name: key,
                        reason: format!("shape {:?}, expected {:?}", t.dims(), var.dims()),
                    });
                }
                // A fresh copy: `Var::set` refuses a tensor sharing the variable's storage
                // (as the output of `adapter_tensors` does).
                var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?.copy()?)?;
            }
        }
        Ok(())
    }

    /// Re-initialises every adapter from `seed` (`down` kaiming-uniform, `up` zero). Loading
    /// is already deterministic (seed 0); this lets the training seed choose the draw.
    pub fn reseed_adapters(&self, seed: u64) -> Result<(), ModelError> {
        for (name, a) in self.adapters() {
            let (rank, in_dim) = a.down.as_tensor().dims2()?;
            let down =
                lora::kaiming_uniform(rank, in_dim, seed, &name, a.down.dtype(), a.down.device())?;
            a.down.set(&down)?;
            a.up.set(&a.up.as_tensor().zeros_like()?)?;
        }
        Ok(())
    }

    /// The adapter weights keyed as `load_adapters` expects.
    pub fn adapter_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, a) in self.adapters() {
            out.insert(format!("{name}.down"), a.down.as_tensor().clone());
            out.insert(format!("{name}.up"), a.up.as_tensor().clone());
        }
        out
    }

    /// The base model's noise schedule.
    pub fn scheduler_config(&self) -> SchedulerConfig {
        self.scheduler.clone()
    }
}
