//! The diffusion models the trainer trains through, built from a diffusers folder: the
//! architecture comes from each component's `config.json`, the weights from its safetensors,
//! so any conforming SD1.5, SDXL or FLUX.1 checkpoint loads, full size or tiny.
//!
//! Read it from the bottom up:
//! - `kernels/`: the hand-written CPU kernels (attention, convolution, fused norms and
//!   activations, GEMM and SIMD helpers) and the storage plumbing every custom op shares;
//!   each applies to f32 CPU tensors only, so other devices never reach them;
//! - `layers/`: the differentiable layers the families are built from (`ops`: linear, conv,
//!   norms, activations, attention, each handing over to a kernel where one applies and
//!   composed from candle ops elsewhere; `lora`: the LoRA adapter; `rope`, `embed`;
//!   `checkpoint`: gradient checkpointing). candle's own fused softmax/layer-norm/rms-norm
//!   have no backward pass and would silently cut the graph, so none is used;
//! - `sd/`: the Stable Diffusion family (SD1.5 and SDXL): UNet, VAE, CLIP text encoders and
//!   tokenizer, each with its `Config` from the diffusers `config.json` and a `load` per block;
//!   `sd/model.rs` puts them together;
//! - `flux/`: FLUX.1: the transformer, T5 and its tokenizer; `flux/pipeline.rs` puts them
//!   together with CLIP and the autoencoder from `sd/`;
//! - here: [`FamilyModel`], what the training loop and the renderer ask of a family (encode
//!   prompts and images, predict, adapters, checkpointing), and [`DiffusionModel`], which loads
//!   the family's implementation and adds the noise schedule and `backward`; `weights`
//!   (safetensors by diffusers name) and `tiny` (small random checkpoints in the exact
//!   diffusers layout, for tests and demos).
//!
//! Only the trained network (SD's UNet, FLUX.1's transformer) is on the training path; the
//! text encoders and the VAE encoder are frozen, forward-only, and released once training has
//! cached what it needs from them.

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
    /// The text encoders or the VAE encoder were asked for after training released them.
    #[error("the {0} was released after the inputs were cached")]
    EncoderReleased(&'static str),
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

/// Text conditioning for the trained network.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// Per-token hidden states: CLIP's (B, 77, cross_attention_dim) for SD, T5's (B, 512 or
    /// 256, joint_attention_dim) for FLUX.1.
    pub hidden: Tensor,
    /// A pooled vector: SDXL's projected `text_encoder_2` embedding (B, projection_dim),
    /// FLUX.1's CLIP pooler output (B, hidden); none for SD1.5.
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
    /// Flow matching (FLUX.1): the static shift of the noise levels.
    #[serde(default = "one")]
    pub shift: f64,
    /// Flow matching: shift by μ from the image's token count instead of `shift`.
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    /// Flow matching: μ at `base_image_seq_len` tokens.
    #[serde(default = "default_base_shift")]
    pub base_shift: f64,
    /// Flow matching: μ at `max_image_seq_len` tokens.
    #[serde(default = "default_max_shift")]
    pub max_shift: f64,
    #[serde(default = "default_base_seq_len")]
    pub base_image_seq_len: usize,
    #[serde(default = "default_max_seq_len")]
    pub max_image_seq_len: usize,
    /// Flow matching: how μ shifts σ (`exponential`, the only kind supported).
    #[serde(default)]
    pub time_shift_type: Option<String>,
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
fn one() -> f64 {
    1.0
}
fn default_base_shift() -> f64 {
    0.5
}
fn default_max_shift() -> f64 {
    1.15
}
fn default_base_seq_len() -> usize {
    256
}
fn default_max_seq_len() -> usize {
    4096
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
            shift: one(),
            use_dynamic_shifting: false,
            base_shift: default_base_shift(),
            max_shift: default_max_shift(),
            base_image_seq_len: default_base_seq_len(),
            max_image_seq_len: default_max_seq_len(),
            time_shift_type: None,
        }
    }
}

/// What the training loop and the renderer ask of a model family. Each family folder
/// implements it once (`sd::model::SdModel`, `flux::pipeline::FluxModel`); adding a family is
/// a folder with its components and one more implementation.
pub trait FamilyModel: Send + Sync {
    /// Tokenizes and encodes captions. Frozen: the result carries no gradient.
    fn encode_prompts(&self, captions: &[String]) -> Result<TextConditioning, ModelError>;

    /// Encodes images (B, 3, H, W) in [-1, 1] to the latents training caches (the
    /// posterior mean, shifted and scaled). Frozen.
    fn encode_images(&self, pixels: &Tensor) -> Result<Tensor, ModelError>;

    /// The model's output for noisy latents (B, C, h, w) at per-sample `timesteps` (B,):
    /// DDPM timesteps for SD, σ for flow matching. `extra` is the family's extra
    /// conditioning (SDXL: size and crop ids (B, 6); FLUX.1-dev: the guidance value (B,)).
    fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        cond: &TextConditioning,
        extra: Option<&Tensor>,
    ) -> candle_core::Result<Tensor>;

    /// Every LoRA adapter with its diffusers module path, in a stable order.
    fn adapters(&self) -> Vec<(String, Adapter)>;

    /// Gradient checkpointing of the trained network's blocks on or off.
    fn set_gradient_checkpointing(&mut self, on: bool);

    /// Adds the gradients gathered inside checkpointed blocks to `grads`.
    fn merge_checkpointed_grads(&self, grads: &mut GradStore) -> candle_core::Result<()>;

    /// Latent channels (4 for SD, 16 for FLUX.1).
    fn latent_channels(&self) -> usize;

    /// Pixel-to-latent downscale factor of the VAE (8 for real checkpoints).
    fn vae_scale_factor(&self) -> usize;

    /// Whether the trained network embeds a guidance value (FLUX.1-dev: guidance-distilled).
    fn guidance_distilled(&self) -> bool {
        false
    }

    /// Drops the text encoders and the VAE encoder: training needs them only to cache its
    /// inputs, and FLUX.1's T5 alone is 9.5 GB in bf16. Encoding afterwards fails with
    /// [`ModelError::EncoderReleased`].
    fn release_encoders(&mut self);
}

/// A loaded base model with LoRA adapters on the network it trains (SD's UNet, FLUX.1's
/// transformer), and the noise schedule it was trained with.
pub struct DiffusionModel {
    family: ModelFamily,
    dtype: DType,
    device: Device,
    inner: Box<dyn FamilyModel>,
    scheduler: SchedulerConfig,
}

impl std::fmt::Debug for DiffusionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiffusionModel")
            .field("family", &self.family)
            .field("dtype", &self.dtype)
            .field("adapters", &self.inner.adapters().len())
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
/// checks, f16/bf16 on GPUs). FLUX.1 gets adapters on every block layer and T5 rows of the
/// length its variant was trained with (see [`load_flux`] to choose).
pub fn load_with_dtype(
    dir: &Path,
    family: ModelFamily,
    lora: LoraSpec,
    device: &Device,
    dtype: DType,
) -> Result<DiffusionModel, ModelError> {
    match family {
        ModelFamily::Sd15 | ModelFamily::Sdxl => {
            let inner = sd::model::SdModel::load(dir, family, lora, device, dtype)?;
            with_scheduler(dir, family, dtype, device, Box::new(inner))
        }
        ModelFamily::Flux1 => load_flux(
            dir,
            &flux::pipeline::FluxOptions::new(Some(lora), None),
            device,
            dtype,
        ),
    }
}

/// Loads a FLUX.1 folder with the given options.
pub fn load_flux(
    dir: &Path,
    opts: &flux::pipeline::FluxOptions,
    device: &Device,
    dtype: DType,
) -> Result<DiffusionModel, ModelError> {
    let inner = flux::pipeline::FluxModel::load(dir, opts, device, dtype)?;
    with_scheduler(dir, ModelFamily::Flux1, dtype, device, Box::new(inner))
}

fn with_scheduler(
    dir: &Path,
    family: ModelFamily,
    dtype: DType,
    device: &Device,
    inner: Box<dyn FamilyModel>,
) -> Result<DiffusionModel, ModelError> {
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
        inner,
        scheduler,
    })
}

pub use sd::model::load_unet;

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

    /// Number of latent channels the trained network expects.
    pub fn latent_channels(&self) -> usize {
        self.inner.latent_channels()
    }

    /// Pixel-to-latent downscale factor of the VAE (8 for real checkpoints).
    pub fn vae_scale_factor(&self) -> usize {
        self.inner.vae_scale_factor()
    }

    /// Tokenizes and encodes captions (see [`FamilyModel::encode_prompts`]).
    pub fn encode_prompts(&self, captions: &[String]) -> Result<TextConditioning, ModelError> {
        self.inner.encode_prompts(captions)
    }

    /// Encodes images (B, 3, H, W) in [-1, 1] to scaled latents (the posterior mean, not a
    /// sample, so caching is deterministic). Frozen: the result carries no gradient.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        let pixels = pixels.to_dtype(self.dtype)?.to_device(&self.device)?;
        self.inner.encode_images(&pixels)
    }

    /// The prediction for noisy latents (see [`FamilyModel::predict`]).
    pub fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        cond: &TextConditioning,
        extra: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        Ok(self.inner.predict(noisy, timesteps, cond, extra)?)
    }

    /// Whether the model embeds a guidance value (FLUX.1-dev; schnell and SD do not).
    pub fn guidance_distilled(&self) -> bool {
        self.inner.guidance_distilled()
    }

    /// Drops the text encoders and the VAE encoder (see [`FamilyModel::release_encoders`]).
    pub fn release_encoders(&mut self) {
        self.inner.release_encoders();
    }

    /// Turns gradient checkpointing of the trained network's blocks on or off (see
    /// `checkpoint`): less memory for one more forward of each block in the backward pass.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.inner.set_gradient_checkpointing(on);
    }

    /// The gradients of `loss` for every trainable variable. Always use this rather than
    /// `loss.backward()`: with checkpointing on, the adapters inside checkpointed blocks get
    /// their gradients from the recomputation, outside candle's own store.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        let mut grads = loss.backward()?;
        self.inner.merge_checkpointed_grads(&mut grads)?;
        Ok(grads)
    }

    /// Every LoRA adapter with its diffusers module path, e.g.
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, in a stable order.
    pub fn adapters(&self) -> Vec<(String, Adapter)> {
        self.inner.adapters()
    }

    /// The trainable variables (every adapter's `down` and `up`), for the optimizer.
    pub fn trainable_vars(&self) -> Vec<Var> {
        lora::variables(self.adapters())
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
