//! Rendering a preview image with the model as it stands (base weights plus the LoRA trained
//! so far): for SD, classifier-free guidance (over the empty prompt for SD1.5, over zeros for
//! SDXL, as diffusers' pipelines do) and the sampler the model's scheduler config names
//! (`sampler`); for FLUX.1, flow matching's Euler steps with the guidance value embedded (dev)
//! as `FluxPipeline` runs them; then the VAE decoder and a PNG.
//!
//! Forward only: each step's graph (the adapters are variables, so candle records one) is
//! dropped before the next step.

use candle_core::{DType, Tensor};

use loraplane_crds::v1alpha1::TimestepSampling;

use crate::flow::FlowMatching;
use crate::model::vae::VaeDecoder;
use crate::model::{DiffusionModel, ModelError, ModelFamily, TextConditioning};
use crate::rng::Rng;
use crate::sampler::{self, PlanConfig, Sampler};
use crate::schedule::{NoiseSchedule, ScheduleError};

/// How to render one image.
#[derive(Debug, Clone, Copy)]
pub struct RenderOptions {
    /// The sampler; `None`: the one the model's scheduler config names (Euler otherwise).
    pub sampler: Option<Sampler>,
    /// Sampler steps.
    pub steps: usize,
    /// Classifier-free guidance scale (1: the prompt's prediction alone); for FLUX.1-dev the
    /// guidance value the transformer embeds (schnell ignores it).
    pub guidance: f64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Image side in pixels (a multiple of the VAE's scale factor).
    pub resolution: usize,
}

/// Why an image could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The resolution does not divide into latents.
    #[error("resolution {resolution} is not a positive multiple of {factor}")]
    CheckResolution {
        /// Asked.
        resolution: usize,
        /// The VAE's scale factor.
        factor: usize,
    },
    /// The initial noise does not have the latents' shape for the resolution.
    #[error("initial noise of shape {got:?} for latents of shape {expected:?}")]
    CheckNoise {
        /// What the resolution needs.
        expected: [usize; 4],
        /// What was given.
        got: Vec<usize>,
    },
    /// The model's scheduler config cannot drive a sampler.
    #[error(transparent)]
    BuildSchedule(#[from] ScheduleError),
    /// Running the text encoders, the UNet or the decoder failed.
    #[error("rendering: {0}")]
    Run(#[from] ModelError),
    /// A tensor operation failed.
    #[error("rendering: {0}")]
    Compute(#[from] candle_core::Error),
    /// The image could not be encoded as PNG.
    #[error("encoding the preview as PNG: {0}")]
    EncodePng(String),
}

/// Renders `prompt` with `model` and `decoder`: a PNG of `resolution`² pixels, from noise
/// drawn with `seed`.
pub fn render(
    model: &DiffusionModel,
    decoder: &VaeDecoder,
    prompt: &str,
    o: &RenderOptions,
) -> Result<Vec<u8>, RenderError> {
    render_with(model, decoder, &conditioning(model, prompt)?, o)
}

/// [`render`] from a prompt's [`conditioning`] encoded beforehand (training releases the text
/// encoders once its inputs and the sample prompts are encoded).
pub fn render_with(
    model: &DiffusionModel,
    decoder: &VaeDecoder,
    cond: &TextConditioning,
    o: &RenderOptions,
) -> Result<Vec<u8>, RenderError> {
    let shape = latent_shape(model, o.resolution)?;
    let n = shape.iter().product();
    let noise = Tensor::from_vec(Rng::new(o.seed, 0).normals(n), &shape[..], model.device())?;
    png(&render_conditioned(model, decoder, cond, &noise, o)?)
}

/// What the renderer conditions on for `prompt`: for SD the unconditional and the prompt's
/// encodings (classifier-free guidance), for FLUX.1 the prompt's alone.
pub fn conditioning(model: &DiffusionModel, prompt: &str) -> Result<TextConditioning, RenderError> {
    let cond = if model.family() == ModelFamily::Flux1 {
        model.encode_prompts(&[prompt.to_string()])?
    } else {
        guidance_conditioning(model, prompt)?
    };
    Ok(cond.to_dtype(model.dtype())?)
}

/// The shape of the latents of a `resolution`² image.
pub fn latent_shape(model: &DiffusionModel, resolution: usize) -> Result<[usize; 4], RenderError> {
    let factor = model.vae_scale_factor();
    if resolution == 0 || !resolution.is_multiple_of(factor) {
        return Err(RenderError::CheckResolution { resolution, factor });
    }
    let side = resolution / factor;
    Ok([1, model.latent_channels(), side, side])
}

/// The image (1, 3, H, W), nominally in [-1, 1], rendered from standard normal `noise` of
/// [`latent_shape`] (the sampler scales it): what diffusers' pipelines give for the same
/// `latents=`.
pub fn render_image(
    model: &DiffusionModel,
    decoder: &VaeDecoder,
    prompt: &str,
    noise: &Tensor,
    o: &RenderOptions,
) -> Result<Tensor, RenderError> {
    render_conditioned(model, decoder, &conditioning(model, prompt)?, noise, o)
}

/// [`render_image`] from a prompt's [`conditioning`].
pub fn render_conditioned(
    model: &DiffusionModel,
    decoder: &VaeDecoder,
    cond: &TextConditioning,
    noise: &Tensor,
    o: &RenderOptions,
) -> Result<Tensor, RenderError> {
    let expected = latent_shape(model, o.resolution)?;
    if noise.dims() != expected {
        return Err(RenderError::CheckNoise {
            expected,
            got: noise.dims().to_vec(),
        });
    }
    if model.family() == ModelFamily::Flux1 {
        return render_flow(model, decoder, cond, noise, o);
    }
    let (dev, dtype) = (model.device(), model.dtype());
    let schedule = NoiseSchedule::new(&model.scheduler_config())?;
    let mut config = PlanConfig::for_model(&model.scheduler_config(), o.steps);
    if let Some(sampler) = o.sampler {
        config.sampler = sampler;
    }
    let plan = sampler::plan(&schedule, &config);
    let mut x = (noise.to_dtype(DType::F32)? * plan.init_noise_sigma)?;
    let r = o.resolution as f32;
    let time_ids = match model.family() {
        ModelFamily::Sdxl => Some(Tensor::new(&[[r, r, 0., 0., r, r]; 2], dev)?.to_dtype(dtype)?),
        ModelFamily::Sd15 | ModelFamily::Flux1 => None,
    };
    for step in &plan.steps {
        let input = (&x * step.input_scale)?.to_dtype(dtype)?;
        let input = Tensor::cat(&[&input, &input], 0)?;
        let t = Tensor::new(&[step.timestep as f32; 2], dev)?;
        let out = predict(model, &input, &t, cond, time_ids.as_ref())?;
        let (uncond, text) = (out.narrow(0, 0, 1)?, out.narrow(0, 1, 1)?);
        let guided = (&uncond + ((text - &uncond)? * o.guidance)?)?;
        x = ((&x * step.x_coef)? + (guided * step.out_coef)?)?.detach();
    }
    Ok(decoder.decode(&x)?)
}

/// FLUX.1: Euler steps of the velocity from σ = 1 (the noise itself) to 0 over the shifted
/// sigmas of `FlowMatchEulerDiscreteScheduler`; no unconditional pass (dev embeds the
/// guidance value instead, schnell needs none).
fn render_flow(
    model: &DiffusionModel,
    decoder: &VaeDecoder,
    cond: &TextConditioning,
    noise: &Tensor,
    o: &RenderOptions,
) -> Result<Tensor, RenderError> {
    let (dev, dtype) = (model.device(), model.dtype());
    let flow = FlowMatching::new(&model.scheduler_config(), TimestepSampling::Uniform)?;
    let (_, _, h, w) = noise.dims4()?;
    let sigmas = flow.inference_sigmas(o.steps, h * w / 4);
    let guidance = Tensor::new(&[o.guidance as f32], dev)?;
    let mut x = noise.to_dtype(DType::F32)?;
    for pair in sigmas.windows(2) {
        let sigma = Tensor::new(&[pair[0] as f32], dev)?;
        let v = predict(model, &x.to_dtype(dtype)?, &sigma, cond, Some(&guidance))?;
        x = (&x + (v * (pair[1] - pair[0]))?)?.detach();
    }
    Ok(decoder.decode(&x)?)
}

/// Row 0 the unconditional input, row 1 the prompt's, as diffusers batches them. The
/// unconditional input is the empty prompt's encoding for SD1.5, and zeros for SDXL (its
/// pipeline's `force_zeros_for_empty_prompt`).
fn guidance_conditioning(
    model: &DiffusionModel,
    prompt: &str,
) -> Result<TextConditioning, RenderError> {
    let both = model.encode_prompts(&[String::new(), prompt.to_string()])?;
    if model.family() == ModelFamily::Sd15 {
        return Ok(both);
    }
    let zero_first = |t: &Tensor| -> candle_core::Result<Tensor> {
        let text = t.narrow(0, 1, 1)?;
        Tensor::cat(&[&text.zeros_like()?, &text], 0)
    };
    Ok(TextConditioning {
        hidden: zero_first(&both.hidden)?,
        pooled: both.pooled.as_ref().map(zero_first).transpose()?,
    })
}

fn predict(
    model: &DiffusionModel,
    input: &Tensor,
    t: &Tensor,
    cond: &TextConditioning,
    time_ids: Option<&Tensor>,
) -> Result<Tensor, RenderError> {
    Ok(model
        .predict(input, t, cond, time_ids)?
        .to_dtype(DType::F32)?
        .detach())
}

/// A (1, 3, H, W) image in [-1, 1] as PNG bytes.
fn png(image: &Tensor) -> Result<Vec<u8>, RenderError> {
    let (_, _, h, w) = image.dims4()?;
    let pixels: Vec<u8> = ((image.squeeze(0)?.permute((1, 2, 0))? + 1.0)? * 127.5)?
        .clamp(0.0, 255.0)?
        .round()?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1()?;
    let img = image::RgbImage::from_raw(w as u32, h as u32, pixels)
        .ok_or_else(|| RenderError::EncodePng("pixel buffer of the wrong size".into()))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| RenderError::EncodePng(e.to_string()))?;
    Ok(out.into_inner())
}
