//! `trainer-bench --flux DIR [--steps N] [--resolution PX] [--text-tokens N]`: CPU seconds per
//! LoRA training step and peak RSS of a FLUX.1 transformer (the tiny diffusers-made one in
//! `tests/fixtures/flux`, or any diffusers FLUX.1 folder), with the step `bench/flux_ref.py`
//! times in diffusers + PEFT: σ drawn as kohya's `flux_shift`, x_σ on cached packed latents,
//! the velocity predicted from cached T5 states and pooled CLIP vector (guidance 3.5), MSE
//! against ε − x₀, backward, clipping and AdamW. Every adapter target, rank 16, batch 1, fp32.
//!
//! `trainer-bench --full-flux [--device cpu|cuda] [--blocks D,S] [--resolution PX]
//! [--text-tokens N] [--steps N]`: the same step on FLUX.1-dev's published architecture with
//! random weights built on the device (bf16 base and f32 adapters on a GPU, f32 on the CPU),
//! gradient checkpointing on, 1024 px and 512 T5 tokens by default: the GPU check's FLUX.1
//! case. `--blocks` keeps fewer double and single blocks (full width), so the CPU can run it.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use loraplane_crds::v1alpha1::TimestepSampling;
use loraplane_trainer::flow::{self, FlowMatching};
use loraplane_trainer::model::flux::transformer::{self, FluxInputs, LoraTargets};
use loraplane_trainer::model::{self, LoraSpec, SchedulerConfig};
use loraplane_trainer::optim::{AdamW, AdamWParams};
use loraplane_trainer::rng::Rng;

use super::{RANK, cpu_seconds, gpu_check, peak_rss_mib};

/// The step's shape: image and text tokens, steps to time.
pub struct Shape {
    pub resolution: usize,
    pub text_tokens: usize,
    pub steps: usize,
}

fn spec() -> LoraSpec {
    LoraSpec {
        rank: RANK,
        alpha: RANK as f64,
    }
}

/// Times `steps` training steps (after one warm-up) of the FLUX.1 transformer in `dir`.
pub fn measure(dir: &Path, shape: &Shape) -> Result<serde_json::Value, String> {
    let t = model::load_flux_transformer(
        dir,
        Some(&spec()),
        &LoraTargets::default(),
        &Device::Cpu,
        DType::F32,
    )
    .map_err(|e| e.to_string())?;
    let mut report = time_steps(&t, shape, &Device::Cpu)?;
    report["implementation"] = "loraplane-trainer (candle, cpu, fp32)".into();
    report["config"] = dir.display().to_string().into();
    Ok(report)
}

/// Times FLUX.1-dev's published architecture with random weights on `device` (see the module
/// doc); `blocks` keeps that many double and single blocks.
pub fn measure_full(
    device: &str,
    blocks: Option<(usize, usize)>,
    shape: &Shape,
) -> Result<serde_json::Value, String> {
    let dev = gpu_check::device(device)?;
    // Every key at diffusers' default is the published FLUX.1-dev config, guidance aside.
    let mut cfg: transformer::FluxConfig =
        serde_json::from_str(r#"{"guidance_embeds": true}"#).map_err(|e| e.to_string())?;
    if let Some((d, s)) = blocks {
        (cfg.num_layers, cfg.num_single_layers) = (d, s);
    }
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let start = Instant::now();
    let mut t = model::tiny::random_flux_transformer(&cfg, &spec(), &dev, dtype)
        .map_err(|e| e.to_string())?;
    t.set_gradient_checkpointing(true);
    let build_seconds = start.elapsed().as_secs_f64();
    let mut report = time_steps(&t, shape, &dev)?;
    report["implementation"] =
        format!("loraplane-trainer (candle, {device}, {dtype:?} base)").into();
    report["config"] = format!(
        "FLUX.1-dev architecture, {} double + {} single blocks, random weights",
        cfg.num_layers, cfg.num_single_layers
    )
    .into();
    report["random_init_seconds"] = build_seconds.into();
    report["gradient_checkpointing"] = true.into();
    Ok(report)
}

fn time_steps(
    t: &transformer::FluxTransformer,
    shape: &Shape,
    dev: &Device,
) -> Result<serde_json::Value, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let (resolution, text_tokens) = (shape.resolution, shape.text_tokens);
    let steps = shape.steps.max(1);
    let dev = dev.clone();
    let dtype = t.dtype();
    let cfg = t.config().clone();
    let side = resolution / 16; // latent side / 2: packed tokens per side
    let tokens = side * side;
    let mut rng = Rng::new(1, 0);
    let mut normals = |shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normals(n), shape, &dev)
    };
    let latents = normals(&[1, tokens, cfg.in_channels]).map_err(|e| err(&e))?;
    let text = normals(&[1, text_tokens, cfg.joint_attention_dim])
        .and_then(|t| t.to_dtype(dtype))
        .map_err(|e| err(&e))?;
    let pooled = normals(&[1, cfg.pooled_projection_dim])
        .and_then(|t| t.to_dtype(dtype))
        .map_err(|e| err(&e))?;
    let rope = transformer::rope_tables(
        &cfg,
        &transformer::positions(text_tokens, side, side),
        dtype,
        &dev,
    )
    .map_err(|e| err(&e))?;
    let guidance = Tensor::new(&[3.5f32], &dev).map_err(|e| err(&e))?;
    let flow = FlowMatching::new(&SchedulerConfig::default(), TimestepSampling::FluxShift)
        .map_err(|e| err(&e))?;
    let params = model::lora::named_variables(t.adapters());
    let mut opt = AdamW::new(params, AdamWParams::default()).map_err(|e| err(&e))?;
    let mut rng = Rng::new(2, 0);
    let mut step = || -> candle_core::Result<()> {
        let sigma = flow.sample_sigma(&mut rng, tokens);
        let noise = Tensor::from_vec(rng.normals(latents.elem_count()), latents.shape(), &dev)?;
        let (xa, nb) = flow::input_coefficients(sigma);
        let noisy = ((&latents * xa)? + (&noise * nb)?)?.to_dtype(dtype)?;
        let pred = t.forward(&FluxInputs {
            image: &noisy,
            text: &text,
            pooled: &pooled,
            sigma: &Tensor::new(&[sigma as f32], &dev)?,
            guidance: Some(&guidance),
            rope: &rope,
        })?;
        let loss = (pred.to_dtype(DType::F32)? - (&noise - &latents)?)?
            .sqr()?
            .mean_all()?;
        let mut grads = loss.backward()?;
        t.merge_checkpointed_grads(&mut grads)?;
        opt.step(&grads, 1e-4)
            .map(|_| ())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    };
    step().map_err(|e| err(&e))?; // warm-up: first-touch allocations
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    for _ in 0..steps {
        step().map_err(|e| err(&e))?;
    }
    Ok(serde_json::json!({
        "resolution": resolution,
        "image_tokens": tokens,
        "text_tokens": text_tokens,
        "batch_size": 1,
        "rank": RANK,
        "adapters": t.adapters().len(),
        "steps_measured": steps,
        "cpu_seconds_per_step": (cpu_seconds() - cpu0) / steps as f64,
        "wall_seconds_per_step": wall0.elapsed().as_secs_f64() / steps as f64,
        "peak_rss_mib": peak_rss_mib(),
    }))
}
