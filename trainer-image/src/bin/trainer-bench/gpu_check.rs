//! loraplane's side of the GPU check (`trainer-image/bench/gpu-check.sh` drives it; the
//! diffusers + PEFT side is `bench/gpu_check.py`). Both sides train the same UNet from the
//! same files, so their step times, memory and losses compare like for like:
//!
//! - `--gpu-check-inputs DIR --family F --size tiny|full --resolution R --steps N [--seed S]`
//!   writes `DIR/unet/` (config and seeded random weights under diffusers' names, which
//!   diffusers loads as they are) and `DIR/batch.safetensors`: one latent, its text
//!   conditioning (and SDXL's pooled embedding and size ids), and for each step the noise and
//!   the timestep, so both sides see the same batches.
//! - `--gpu-check-steps DIR --device cpu|cuda [--checkpointing] [--json FILE]` loads
//!   the UNet with rank-16 adapters in the precision the trainer would run in on that device
//!   (bf16 base weights on CUDA, f32 on the CPU), writes its adapters' initial down matrices to
//!   `DIR/lora_init.safetensors` (PEFT's `lora_A` names, so the reference starts from the same
//!   adapters), trains one step per batch entry (min-SNR-5 weighted epsilon MSE, backward,
//!   AdamW with the trainer's defaults) and reports each step's wall seconds (the device
//!   synchronised) and loss.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use loraplane_crds::v1alpha1::MixedPrecision;
use loraplane_trainer::model::tiny::{self, ModelSize};
use loraplane_trainer::model::{self, LoraSpec, ModelFamily};
use loraplane_trainer::optim::{AdamW, AdamWParams};
use loraplane_trainer::rng::Rng;
use loraplane_trainer::schedule::{NoiseSchedule, SchedulerConfig};
use loraplane_trainer::train;
use serde_json::{Value, json};

// The adapters' rank (alpha the same: scale 1) and the text conditioning's length, as in the
// CPU benchmark and the reference.
use super::{RANK, TEXT_TOKENS};
/// min-SNR-γ weighting of the loss, as the trainer's default.
const MIN_SNR_GAMMA: f64 = 5.0;
/// The learning rate of every step.
const LEARNING_RATE: f64 = 1e-4;
/// The batch file inside an inputs folder.
const BATCH_FILE: &str = "batch.safetensors";
/// The adapters' initial down matrices, written by the steps mode for the reference.
const LORA_INIT_FILE: &str = "lora_init.safetensors";

/// What `--gpu-check-inputs` writes.
pub struct InputSpec {
    pub family: ModelFamily,
    pub size: ModelSize,
    pub resolution: usize,
    pub steps: usize,
    pub seed: u64,
}

/// The UNet config fields the batch is shaped by.
struct Shapes {
    in_channels: usize,
    cross_dim: usize,
    /// SDXL's pooled text embedding width (`None` for SD1.5).
    pooled_dim: Option<usize>,
}

fn shapes(cfg: &Value) -> Result<Shapes, String> {
    let num = |v: &Value| v.as_u64().map(|n| n as usize);
    let cross = &cfg["cross_attention_dim"];
    let cross_dim = num(cross)
        .or_else(|| cross.as_array().and_then(|a| a.first()).and_then(num))
        .ok_or("unet config: no cross_attention_dim")?;
    let pooled_dim = if cfg["addition_embed_type"].as_str() == Some("text_time") {
        let total = num(&cfg["projection_class_embeddings_input_dim"])
            .ok_or("unet config: no projection_class_embeddings_input_dim")?;
        let time = num(&cfg["addition_time_embed_dim"])
            .ok_or("unet config: no addition_time_embed_dim")?;
        Some(
            total
                .checked_sub(6 * time)
                .ok_or("unet config: bad SDXL embedding sizes")?,
        )
    } else {
        None
    };
    Ok(Shapes {
        in_channels: num(&cfg["in_channels"]).unwrap_or(4),
        cross_dim,
        pooled_dim,
    })
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))
}

/// Writes the UNet and the batches of one configuration into `dir`.
pub fn write_inputs(dir: &Path, spec: &InputSpec) -> Result<(), String> {
    if spec.resolution == 0 || !spec.resolution.is_multiple_of(8) {
        return Err(format!(
            "--resolution {} is not a positive multiple of 8 (the VAE's downsampling)",
            spec.resolution
        ));
    }
    tiny::write_random_unet(dir, spec.family, spec.size, spec.seed).map_err(|e| e.to_string())?;
    let s = shapes(&read_json(&dir.join("unet").join("config.json"))?)?;
    let side = spec.resolution / 8;
    let latent = s.in_channels * side * side;
    let dev = Device::Cpu;
    let mut rng = Rng::new(spec.seed, 1);
    let sched = NoiseSchedule::new(&SchedulerConfig::default()).map_err(|e| e.to_string())?;
    let steps = spec.steps.max(1);
    let err = |e: candle_core::Error| e.to_string();
    let mut batch = HashMap::new();
    batch.insert(
        "latents".to_string(),
        Tensor::from_vec(rng.normals(latent), (1, s.in_channels, side, side), &dev).map_err(err)?,
    );
    batch.insert(
        "noise".to_string(),
        Tensor::from_vec(
            rng.normals(steps * latent),
            (steps, 1, s.in_channels, side, side),
            &dev,
        )
        .map_err(err)?,
    );
    let timesteps: Vec<i64> = (0..steps)
        .map(|_| rng.below(sched.len() as u64) as i64)
        .collect();
    batch.insert(
        "timesteps".to_string(),
        Tensor::from_vec(timesteps, steps, &dev).map_err(err)?,
    );
    batch.insert(
        "encoder_hidden_states".to_string(),
        Tensor::from_vec(
            rng.normals(TEXT_TOKENS * s.cross_dim),
            (1, TEXT_TOKENS, s.cross_dim),
            &dev,
        )
        .map_err(err)?,
    );
    if let Some(pooled) = s.pooled_dim {
        batch.insert(
            "text_embeds".to_string(),
            Tensor::from_vec(rng.normals(pooled), (1, pooled), &dev).map_err(err)?,
        );
        // (original size, crop top-left, target size), as SDXL's training scripts pass them.
        let r = spec.resolution as f32;
        batch.insert(
            "time_ids".to_string(),
            Tensor::new(&[[r, r, 0.0, 0.0, r, r]], &dev).map_err(err)?,
        );
    }
    let path = dir.join(BATCH_FILE);
    candle_core::safetensors::save(&batch, &path)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// `cpu` or `cuda` (GPU 0).
pub fn device(name: &str) -> Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            format!("no CUDA device ({e}): the GPU check needs trainer-bench built with `--features cuda` and a GPU")
        }),
        other => Err(format!("--device {other}: expected cpu or cuda")),
    }
}

/// Trains the UNet in `dir` for one step per batch entry and reports the figures.
pub fn run_steps(dir: &Path, device: &Device, checkpointing: bool) -> Result<Value, String> {
    let err = |e: candle_core::Error| e.to_string();
    let dtype = train::compute_dtype(train::effective_precision(
        MixedPrecision::Bf16,
        ModelFamily::Sd15,
        device.is_cuda(),
    ));
    let lora = LoraSpec {
        rank: RANK,
        alpha: RANK as f64,
    };
    let load0 = Instant::now();
    let mut unet = model::load_unet(dir, lora, device, dtype).map_err(|e| e.to_string())?;
    unet.set_gradient_checkpointing(checkpointing);
    device.synchronize().map_err(err)?;
    let load_seconds = load0.elapsed().as_secs_f64();

    let adapters = unet.adapters();
    let mut init = HashMap::new();
    let mut params = Vec::new();
    let mut trainable = 0usize;
    for (path, a) in &adapters {
        init.insert(
            format!("{path}.lora_A.weight"),
            a.down.as_tensor().to_dtype(DType::F32).map_err(err)?,
        );
        trainable += a.down.elem_count() + a.up.elem_count();
        params.push((format!("{path}.down"), a.down.clone()));
        params.push((format!("{path}.up"), a.up.clone()));
    }
    let init_path = dir.join(LORA_INIT_FILE);
    candle_core::safetensors::save(&init, &init_path)
        .map_err(|e| format!("writing {}: {e}", init_path.display()))?;
    let mut opt = AdamW::new(params, AdamWParams::default()).map_err(|e| e.to_string())?;

    let batch_path = dir.join(BATCH_FILE);
    let batch = candle_core::safetensors::load(&batch_path, device)
        .map_err(|e| format!("reading {}: {e}", batch_path.display()))?;
    let get = |name: &str| {
        batch
            .get(name)
            .ok_or_else(|| format!("{}: no tensor `{name}`", batch_path.display()))
    };
    let latents = get("latents")?;
    let noise = get("noise")?;
    let timesteps: Vec<i64> = get("timesteps")?.to_vec1().map_err(err)?;
    let context = get("encoder_hidden_states")?.to_dtype(dtype).map_err(err)?;
    let added = match (batch.get("text_embeds"), batch.get("time_ids")) {
        (Some(p), Some(ids)) => Some((
            p.to_dtype(dtype).map_err(err)?,
            ids.to_dtype(dtype).map_err(err)?,
        )),
        _ => None,
    };
    let sched = NoiseSchedule::new(&SchedulerConfig::default()).map_err(|e| e.to_string())?;

    let mut step_seconds = Vec::new();
    let mut losses = Vec::new();
    for (i, &t) in timesteps.iter().enumerate() {
        let t = usize::try_from(t)
            .ok()
            .filter(|t| *t < sched.len())
            .ok_or_else(|| format!("{}: timestep {t} out of range", batch_path.display()))?;
        let t0 = Instant::now();
        let eps = noise.i(i).map_err(err)?;
        let (sa, sb) = sched.coefficients(t);
        let noisy = (latents.affine(sa, 0.0).map_err(err)? + eps.affine(sb, 0.0).map_err(err)?)
            .and_then(|x| x.to_dtype(dtype))
            .map_err(err)?;
        let ts = Tensor::new(&[t as f32], device).map_err(err)?;
        let pred = unet
            .forward(
                &noisy,
                &ts,
                &context,
                added.as_ref().map(|(p, ids)| (p, ids)),
            )
            .and_then(|p| p.to_dtype(DType::F32))
            .map_err(err)?;
        let loss = ((pred - &eps).map_err(err)?.sqr().map_err(err)?)
            .mean_all()
            .and_then(|l| l * sched.min_snr_weight(t, MIN_SNR_GAMMA))
            .map_err(err)?;
        let mut grads = loss.backward().map_err(err)?;
        unet.merge_checkpointed_grads(&mut grads).map_err(err)?;
        opt.step(&grads, LEARNING_RATE).map_err(|e| e.to_string())?;
        losses.push(f64::from(loss.to_scalar::<f32>().map_err(err)?));
        drop((grads, loss));
        device.synchronize().map_err(err)?;
        step_seconds.push(t0.elapsed().as_secs_f64());
    }
    Ok(json!({
        "implementation": "loraplane (candle)",
        "device": if device.is_cuda() { "cuda" } else { "cpu" },
        "dtype": format!("{dtype:?}").to_lowercase(),
        "gradient_checkpointing": checkpointing,
        "rank": RANK,
        "adapters": adapters.len(),
        "trainable_parameters": trainable,
        "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        // The first step pays for kernel loading and first-touch allocations.
        "median_step_seconds": median(step_seconds.get(1..).unwrap_or_default()),
        "losses": losses,
    }))
}

fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_skips_nothing_it_is_given() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
