//! `trainer-bench [--steps N] [--out|--json FILE] [--full-sd15 [--full-steps N]] [--only-full]`:
//! measures CPU seconds per training step and peak RSS for the tiny SD1.5 and SDXL
//! configurations (generated on the fly, as the tests do) and, with `--full-sd15`, for a
//! full-size SD1.5 UNet (random weights from the published `unet/config.json`) at 512 px,
//! batch 1, and writes the figures as JSON. Each configuration runs in a child process so
//! peak RSS is its own. Linux only (reads `/proc/self`).
//!
//! `trainer-bench --conv-micro [--steps N]` times single UNet convolutions (forward, and
//! forward + input gradient) through the CPU kernels and through candle's `conv2d`.
//!
//! `trainer-bench --attention-micro [--steps N]` times the UNet's attention shapes (forward,
//! and forward + gradients of q, k, v).
//!
//! `trainer-bench --sampling [--full-sd15] [--images N] [--sample-steps N]` times preview
//! rendering (seconds per image) for the tiny models and, with `--full-sd15`, the full-size
//! SD1.5 at 512 px, times a training step of the same model, and reports the share of a
//! run's wall time the default sample sets take (runs of 500, 1000 and 2000 steps,
//! checkpoints every 100).
//!
//! `trainer-bench --flux DIR [--steps N] [--resolution PX] [--text-tokens N]` times LoRA
//! training steps of a FLUX.1 transformer beside `bench/flux_ref.py`, and `--full-flux
//! [--device cpu|cuda] [--blocks D,S]` the published FLUX.1-dev architecture with random
//! weights (see `flux.rs`).
//!
//! `trainer-bench --write-tiny-model DIR --family sd15|sdxl --seed N` writes the tiny random
//! model the tests build from that seed (for the diffusers reference scripts in `bench/`).
//!
//! `trainer-bench --gpu-check-inputs DIR ...` and `--gpu-check-steps DIR ...` are loraplane's
//! side of `bench/gpu-check.sh` (see `gpu_check.rs`).
//!
//! `trainer-bench --unet-configs DIR` writes the UNet configs it measures
//! (`tiny-sd15.json`, `tiny-sdxl.json`, `full-sd15.json`) for the PyTorch reference in
//! `trainer-image/bench/`.

mod flux;
mod gpu_check;

use std::io::{Cursor, Write};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::{Device, Tensor};
use loraplane_trainer::model::tiny::{self, ModelSize};
use loraplane_trainer::model::{self, LoraSpec, ModelFamily, ops};
use loraplane_trainer::objective::Objective;
use loraplane_trainer::optim::{AdamW, AdamWParams};
use loraplane_trainer::rng::Rng;
use loraplane_trainer::schedule::{NoiseSchedule, SchedulerConfig};
use loraplane_trainer::{dataset, train};

// Reuses freed activations instead of faulting them in again each step (alloc.rs).
#[global_allocator]
static ALLOCATOR: loraplane_trainer::alloc::TrainerAllocator =
    loraplane_trainer::alloc::TrainerAllocator;

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the `(comm)`; utime and stime are fields 14 and 15 (1-based).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // Clock ticks are 100 Hz on every Linux this runs on.
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn png(seed: u32) -> Result<Vec<u8>, String> {
    let img = image::RgbImage::from_fn(80, 64, |x, y| {
        image::Rgb([
            (x * 3 + seed) as u8,
            (y * 5) as u8,
            ((x ^ y) + seed * 7) as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

fn measure(
    family: ModelFamily,
    steps: usize,
    resolution: u32,
    batch: usize,
) -> Result<serde_json::Value, String> {
    let dir = std::env::temp_dir().join(format!(
        "trainer-bench-{}-{}",
        family.as_str(),
        std::process::id()
    ));
    model::tiny::write_tiny_model(&dir, family, 7).map_err(|e| e.to_string())?;
    let loaded = model::load(
        &dir,
        family,
        LoraSpec {
            rank: RANK,
            alpha: RANK as f64,
        },
        &Device::Cpu,
    )
    .map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let m = loaded?;
    let mut samples = Vec::new();
    for i in 0..5 {
        samples.push(dataset::Sample {
            entry: loraplane_dataset::Entry {
                number: i as usize + 1,
                name: format!("{i}.png"),
            },
            bytes: png(i)?,
            caption: "bench, a photo".into(),
        });
    }
    let rules = loraplane_dataset::DatasetRules::default();
    let cache =
        train::cache_samples(&m, &samples, resolution, &rules).map_err(|e| e.to_string())?;
    let objective = Objective::Ddpm {
        schedule: NoiseSchedule::new(&SchedulerConfig::default()).map_err(|e| e.to_string())?,
        min_snr_gamma: Some(5.0),
    };
    let mut opt =
        AdamW::new(train::named_params(&m), AdamWParams::default()).map_err(|e| e.to_string())?;
    let mut rng = Rng::new(1, 0);
    let mut step = |i: u64| -> Result<(), String> {
        let idx = train::batch_indices(i, cache.len(), batch, 1);
        let b = train::make_batch(&m, &cache, &idx, &objective, &mut rng, 0.0, 1.0)
            .map_err(|e| e.to_string())?;
        let loss = train::batch_loss(&m, &b).map_err(|e| e.to_string())?;
        let grads = loss.backward().map_err(|e| e.to_string())?;
        opt.step(&grads, 1e-4).map_err(|e| e.to_string())?;
        Ok(())
    };
    step(0)?; // warm-up: first-touch allocations
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    for i in 1..=steps as u64 {
        step(i)?;
    }
    let cpu = (cpu_seconds() - cpu0) / steps as f64;
    let wall = wall0.elapsed().as_secs_f64() / steps as f64;
    Ok(serde_json::json!({
        "config": format!("tiny-{}", family.as_str()),
        "resolution": resolution,
        "batch_size": batch,
        "rank": RANK,
        "adapters": m.adapters().len(),
        "steps_measured": steps,
        "cpu_seconds_per_step": cpu,
        "wall_seconds_per_step": wall,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

const RANK: usize = 16;

/// Tokens of a CLIP text conditioning.
const TEXT_TOKENS: usize = 77;

/// One LoRA training step of a full-size SD1.5 UNet at 512 px (64x64 latents), batch 1, as
/// the trainer runs it after caching: latents and text embeddings are given (random here),
/// noise and timestep are drawn, min-SNR-5 weighted MSE, backward, AdamW.
fn measure_full_sd15(steps: usize) -> Result<serde_json::Value, String> {
    let lora = LoraSpec {
        rank: RANK,
        alpha: RANK as f64,
    };
    let build0 = Instant::now();
    let unet = tiny::random_unet(ModelFamily::Sd15, ModelSize::Full, 7, &lora)
        .map_err(|e| e.to_string())?;
    let build_seconds = build0.elapsed().as_secs_f64();
    let adapters = unet.adapters();
    let params = adapters
        .iter()
        .flat_map(|(p, a)| {
            [
                (format!("{p}.down"), a.down.clone()),
                (format!("{p}.up"), a.up.clone()),
            ]
        })
        .collect();
    let mut opt = AdamW::new(params, AdamWParams::default()).map_err(|e| e.to_string())?;
    let sched = NoiseSchedule::new(&SchedulerConfig::default()).map_err(|e| e.to_string())?;
    let dev = Device::Cpu;
    let mut rng = Rng::new(1, 0);
    let (side, cross) = (64usize, 768usize);
    let latents = Tensor::from_vec(rng.normals(4 * side * side), (1, 4, side, side), &dev)
        .map_err(|e| e.to_string())?;
    let context = Tensor::from_vec(
        rng.normals(TEXT_TOKENS * cross),
        (1, TEXT_TOKENS, cross),
        &dev,
    )
    .map_err(|e| e.to_string())?;
    let mut step = || -> Result<(), candle_core::Error> {
        let t = rng.below(sched.len() as u64) as usize;
        let noise = Tensor::from_vec(rng.normals(4 * side * side), (1, 4, side, side), &dev)?;
        let (sa, sb) = sched.coefficients(t);
        let noisy = (latents.affine(sa, 0.0)? + noise.affine(sb, 0.0)?)?;
        let timesteps = Tensor::new(&[t as f32], &dev)?;
        let pred = unet.forward(&noisy, &timesteps, &context, None)?;
        let loss = ((pred - &noise)?.sqr()?.mean_all()? * sched.min_snr_weight(t, 5.0))?;
        let grads = loss.backward()?;
        drop(loss);
        opt.step(&grads, 1e-4)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(())
    };
    // Warm-up (first-touch allocations); reported too, since a full-size step takes minutes.
    let (cpu_w, wall_w) = (cpu_seconds(), Instant::now());
    step().map_err(|e| e.to_string())?;
    let warmup_cpu = cpu_seconds() - cpu_w;
    let warmup_wall = wall_w.elapsed().as_secs_f64();
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    for _ in 0..steps {
        step().map_err(|e| e.to_string())?;
    }
    let n = steps.max(1) as f64;
    let (cpu, wall) = if steps == 0 {
        (warmup_cpu, warmup_wall)
    } else {
        (
            (cpu_seconds() - cpu0) / n,
            wall0.elapsed().as_secs_f64() / n,
        )
    };
    Ok(serde_json::json!({
        "config": "full-sd15",
        "warmup_step_cpu_seconds": warmup_cpu,
        "warmup_step_wall_seconds": warmup_wall,
        "resolution": 512,
        "batch_size": 1,
        "rank": RANK,
        "adapters": adapters.len(),
        "dtype": "f32",
        "steps_measured": steps,
        "cpu_seconds_per_step": cpu,
        "wall_seconds_per_step": wall,
        "peak_rss_mib": peak_rss_mib(),
        "random_init_seconds": build_seconds,
    }))
}

/// Wall seconds per preview image (text encoders, `steps` guided sampler steps, VAE decoder):
/// the tiny SD1.5 and SDXL at 64 px, and with `full` the full-size SD1.5 (random weights) at
/// 512 px.
fn measure_sampling(full: bool, images: usize, steps: usize) -> Result<serde_json::Value, String> {
    use loraplane_trainer::preview::{RenderOptions, render};
    let mut cases = vec![
        (ModelFamily::Sd15, ModelSize::Tiny, 64usize),
        (ModelFamily::Sdxl, ModelSize::Tiny, 64),
    ];
    if full {
        cases.push((ModelFamily::Sd15, ModelSize::Full, 512));
    }
    let mut rows = Vec::new();
    for (family, size, resolution) in cases {
        let name = format!(
            "{}-{}",
            if size == ModelSize::Full {
                "full"
            } else {
                "tiny"
            },
            family.as_str()
        );
        let dir = std::env::temp_dir().join(format!("trainer-bench-{name}-{}", std::process::id()));
        tiny::write_random_model(&dir, family, size, 7).map_err(|e| e.to_string())?;
        let lora = LoraSpec {
            rank: RANK,
            alpha: RANK as f64,
        };
        let loaded = model::load(&dir, family, lora, &Device::Cpu)
            .and_then(|m| Ok((m, model::load_vae_decoder(&dir, &Device::Cpu)?)));
        let _ = std::fs::remove_dir_all(&dir);
        let (m, decoder) = loaded.map_err(|e| e.to_string())?;
        let opts = |seed| RenderOptions {
            sampler: None,
            steps,
            guidance: 7.5,
            seed,
            resolution,
        };
        // A warm-up image for the tiny models, whose figures first-touch allocations would
        // swamp; a full-size image takes minutes, so it is measured from the first.
        if size == ModelSize::Tiny {
            render(&m, &decoder, "bench, a photo", &opts(0)).map_err(|e| e.to_string())?;
        }
        let (cpu0, wall0) = (cpu_seconds(), Instant::now());
        for seed in 1..=images as u64 {
            render(&m, &decoder, "bench, a photo", &opts(seed)).map_err(|e| e.to_string())?;
        }
        let n = images.max(1) as f64;
        let (per_image, cpu_per_image) = (
            wall0.elapsed().as_secs_f64() / n,
            (cpu_seconds() - cpu0) / n,
        );
        drop((m, decoder));
        // A training step of the same model at the same resolution, for the share below.
        let step = match size {
            ModelSize::Tiny => measure(family, 5, resolution as u32, 1)?,
            ModelSize::Full => measure_full_sd15(1)?,
        };
        let per_step = step["wall_seconds_per_step"].as_f64().unwrap_or(f64::NAN);
        let share: serde_json::Map<String, serde_json::Value> = [500u64, 1000, 2000]
            .into_iter()
            .map(|total| {
                let share = sampling_share(per_image, per_step, total, 100, DEFAULT_PROMPTS);
                (total.to_string(), share.into())
            })
            .collect();
        rows.push(serde_json::json!({
            "config": name,
            "resolution": resolution,
            "sampler_steps": steps,
            "images_measured": images,
            "wall_seconds_per_image": per_image,
            "cpu_seconds_per_image": cpu_per_image,
            "training_wall_seconds_per_step": per_step,
            "sampling_share_of_wall_time_by_run_steps": share,
        }));
    }
    Ok(serde_json::json!({
        "implementation": "loraplane-trainer previews (candle, cpu, f32, classifier-free guidance)",
        "threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "results": rows,
    }))
}

/// Prompts of a job's default sample sets (`SamplesConfig::prompts_for` with none given).
const DEFAULT_PROMPTS: usize = 2;

/// The share of a run's wall time its default sample sets take: a run of `total` steps with
/// checkpoints every `checkpoint_every` renders the sets `layout::sample_steps` names at the
/// default interval, `prompts` images each.
fn sampling_share(
    per_image: f64,
    per_step: f64,
    total: u64,
    checkpoint_every: u64,
    prompts: usize,
) -> f64 {
    use loraplane_crds::layout::sample_steps;
    use loraplane_crds::trainer::SamplesConfig;
    let every = SamplesConfig::default_every(total, checkpoint_every);
    let sampling = (sample_steps(total, every).len() * prompts) as f64 * per_image;
    sampling / (sampling + total as f64 * per_step)
}

/// `var` itself (`graph`: the op builds its backward graph) or detached from it.
fn tracked(var: &candle_core::Var, graph: bool) -> Tensor {
    if graph {
        var.as_tensor().clone()
    } else {
        var.as_tensor().detach()
    }
}

/// CPU seconds of `op` without a graph, and of `op` with its graph plus the backward pass of
/// sum(op · r): each the mean of `reps` runs after a warm-up run (process CPU time ticks at
/// 10 ms, so single calls are not timed alone).
fn time_op(
    reps: usize,
    r: &Tensor,
    op: impl Fn(bool) -> Result<Tensor, candle_core::Error>,
) -> Result<(f64, f64), candle_core::Error> {
    let (mut fwd, mut both) = (0.0, 0.0);
    for rep in 0..=reps {
        let c0 = cpu_seconds();
        drop(op(false)?);
        let c1 = cpu_seconds();
        let grads = (op(true)? * r)?.sum_all()?.backward()?;
        let c2 = cpu_seconds();
        drop(grads);
        if rep > 0 {
            fwd += (c1 - c0) / reps as f64;
            both += (c2 - c1) / reps as f64;
        }
    }
    Ok((fwd, both))
}

/// One frozen 3x3 (or 1x1) convolution of the full SD1.5 UNet, forward alone and forward +
/// input gradient, through the CPU kernels (`Conv2d::forward`) and candle's `conv2d`
/// (`Conv2d::forward_candle`): CPU seconds per call, the mean of `reps` runs after a warm-up
/// (process CPU time ticks at 10 ms, so single calls are not timed alone).
fn measure_conv(reps: usize) -> Result<serde_json::Value, String> {
    let reps = reps.max(1);
    use candle_core::Module;
    use loraplane_trainer::model::ops::Conv2d;
    // (name, in channels, out channels, side, kernel, stride, padding)
    let shapes = [
        ("down 320, 64x64, 3x3", 320, 320, 64, 3, 1, 1),
        ("up 640->320, 64x64, 3x3", 640, 320, 64, 3, 1, 1),
        ("down 640, 32x32, 3x3", 640, 640, 32, 3, 1, 1),
        ("mid 1280, 8x8, 3x3", 1280, 1280, 8, 3, 1, 1),
        (
            "downsampler 320, 64x64, 3x3 stride 2",
            320,
            320,
            64,
            3,
            2,
            1,
        ),
        ("shortcut 640->320, 64x64, 1x1", 640, 320, 64, 1, 1, 0),
    ];
    let dev = Device::Cpu;
    let mut rows = Vec::new();
    for (name, c_in, c_out, side, k, stride, padding) in shapes {
        let tensor = |rng: &mut Rng, shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            let v: Vec<f32> = rng.normals(n).into_iter().map(|v| v * scale).collect();
            Tensor::from_vec(v, shape, &dev)
        };
        let run = || -> Result<serde_json::Value, candle_core::Error> {
            let mut rng = Rng::new(3, 0);
            let w = tensor(&mut rng, &[c_out, c_in, k, k], 0.02)?;
            let b = tensor(&mut rng, &[c_out], 0.1)?;
            let conv = Conv2d::new(w, Some(b), stride, padding);
            let x = candle_core::Var::from_tensor(&tensor(&mut rng, &[1, c_in, side, side], 1.0)?)?;
            let out_side = (side + 2 * padding - k) / stride + 1;
            let r = tensor(&mut rng, &[1, c_out, out_side, out_side], 1.0)?;
            let mut times = serde_json::Map::new();
            for (which, candle) in [("new", false), ("candle", true)] {
                let forward = |x: &Tensor| {
                    if candle {
                        conv.forward_candle(x)
                    } else {
                        conv.forward(x)
                    }
                };
                let (fwd, both) = time_op(reps, &r, |graph| forward(&tracked(&x, graph)))?;
                times.insert(
                    which.into(),
                    serde_json::json!({"forward_cpu_s": fwd, "forward_and_input_grad_cpu_s": both}),
                );
            }
            Ok(serde_json::json!({"conv": name, "times": times}))
        };
        rows.push(run().map_err(|e| format!("{name}: {e}"))?);
    }
    Ok(serde_json::json!({"config": "conv-micro", "reps": reps, "results": rows}))
}

/// The attention of the full SD1.5 UNet at 512 px (self-attention at each latent size,
/// cross-attention at the largest), forward alone and forward + gradients of q, k and v:
/// CPU seconds per call, the mean of `reps` runs after a warm-up.
fn measure_attention(reps: usize) -> Result<serde_json::Value, String> {
    let reps = reps.max(1);
    // (name, query tokens, key tokens, channels, heads)
    let shapes = [
        (
            "self 64x64 (4096 tokens), 320 ch, 8 heads",
            4096,
            4096,
            320,
            8,
        ),
        ("cross 64x64 (4096 x 77), 320 ch, 8 heads", 4096, 77, 320, 8),
        (
            "self 32x32 (1024 tokens), 640 ch, 8 heads",
            1024,
            1024,
            640,
            8,
        ),
        (
            "self 16x16 (256 tokens), 1280 ch, 8 heads",
            256,
            256,
            1280,
            8,
        ),
    ];
    let dev = Device::Cpu;
    let mut rows = Vec::new();
    for (name, n, m, c, heads) in shapes {
        let run = || -> Result<serde_json::Value, candle_core::Error> {
            let mut rng = Rng::new(5, 0);
            let mut var = |len: usize| {
                candle_core::Var::from_tensor(&Tensor::from_vec(
                    rng.normals(len * c),
                    (1, len, c),
                    &dev,
                )?)
            };
            let (q, k, v) = (var(n)?, var(m)?, var(m)?);
            let r = Tensor::from_vec(rng.normals(n * c), (1, n, c), &dev)?;
            let (fwd, both) = time_op(reps, &r, |graph| {
                let [q, k, v] = [&q, &k, &v].map(|t| tracked(t, graph));
                ops::attention(&q, &k, &v, heads)
            })?;
            Ok(serde_json::json!({
                "attention": name,
                "forward_cpu_s": fwd,
                "forward_and_grads_cpu_s": both,
            }))
        };
        rows.push(run().map_err(|e| format!("{name}: {e}"))?);
    }
    Ok(serde_json::json!({"config": "attention-micro", "reps": reps, "results": rows}))
}

/// Writes the UNet configs this benchmark builds, for the PyTorch reference.
fn write_unet_configs(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, family, size) in [
        ("tiny-sd15", ModelFamily::Sd15, ModelSize::Tiny),
        ("tiny-sdxl", ModelFamily::Sdxl, ModelSize::Tiny),
        ("full-sd15", ModelFamily::Sd15, ModelSize::Full),
    ] {
        let cfg = tiny::unet_config(family, size).map_err(|e| e.to_string())?;
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| e.to_string())?;
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Runs one configuration in a child process and parses its JSON line.
fn child(
    me: &Path,
    name: &str,
    steps: usize,
    full_steps: usize,
) -> Result<serde_json::Value, String> {
    let out = Command::new(me)
        .args([
            "--one",
            name,
            "--steps",
            &steps.to_string(),
            "--full-steps",
            &full_steps.to_string(),
        ])
        .output()
        .map_err(|e| format!("{name}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{name}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{name}: bad output: {e}"))
}

/// Ends a one-shot mode: its output (if any) on stdout, or its error on stderr.
fn finish(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trainer-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`: no other thread exists yet.
    #[allow(unsafe_code)]
    unsafe {
        loraplane_trainer::threads::limit_candle_spinning();
    }
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    let steps: usize = arg("--steps").and_then(|s| s.parse().ok()).unwrap_or(20);
    let full_steps: usize = arg("--full-steps")
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let family = || match arg("--family").map(String::as_str) {
        Some("sdxl") => Ok(ModelFamily::Sdxl),
        Some("sd15") => Ok(ModelFamily::Sd15),
        other => Err(format!("--family {other:?}: expected sd15 or sdxl")),
    };
    if let Some(dir) = arg("--write-tiny-model") {
        let seed = arg("--seed").and_then(|s| s.parse().ok()).unwrap_or(0);
        return finish(family().and_then(|family| {
            tiny::write_tiny_model(Path::new(dir), family, seed)
                .map(|()| String::new())
                .map_err(|e| e.to_string())
        }));
    }
    if let Some(dir) = arg("--gpu-check-inputs") {
        let spec = || -> Result<gpu_check::InputSpec, String> {
            let number = |name: &str, default: u64| {
                arg(name).map_or(Ok(default), |v| {
                    v.parse()
                        .map_err(|_| format!("{name} {v}: expected a number"))
                })
            };
            Ok(gpu_check::InputSpec {
                family: family()?,
                size: match arg("--size").map(String::as_str) {
                    Some("full") => ModelSize::Full,
                    Some("tiny") => ModelSize::Tiny,
                    other => return Err(format!("--size {other:?}: expected tiny or full")),
                },
                resolution: number("--resolution", 64)? as usize,
                steps: number("--steps", 5)? as usize,
                seed: number("--seed", 0)?,
            })
        };
        return finish(
            spec()
                .and_then(|s| gpu_check::write_inputs(Path::new(dir), &s).map(|()| String::new())),
        );
    }
    if let Some(dir) = arg("--gpu-check-steps") {
        let report = gpu_check::device(arg("--device").map_or("cpu", String::as_str))
            .and_then(|dev| gpu_check::run_steps(Path::new(dir), &dev, flag("--checkpointing")))
            .and_then(|v| {
                let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
                match arg("--json") {
                    Some(path) => std::fs::write(path, &text)
                        .map(|()| String::new())
                        .map_err(|e| format!("writing {path}: {e}")),
                    None => Ok(text),
                }
            });
        return finish(report);
    }
    if flag("--sampling") {
        let images = arg("--images").and_then(|s| s.parse().ok()).unwrap_or(3);
        let sample_steps = arg("--sample-steps")
            .and_then(|s| s.parse().ok())
            .unwrap_or(loraplane_crds::trainer::SamplesConfig::default().steps as usize);
        return finish(
            measure_sampling(flag("--full-sd15"), images, sample_steps)
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default()),
        );
    }
    let flux_shape = |resolution| flux::Shape {
        resolution: arg("--resolution")
            .and_then(|s| s.parse().ok())
            .unwrap_or(resolution),
        text_tokens: arg("--text-tokens")
            .and_then(|s| s.parse().ok())
            .unwrap_or(512),
        steps,
    };
    if let Some(dir) = arg("--flux") {
        return finish(
            flux::measure(Path::new(dir), &flux_shape(256))
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default()),
        );
    }
    if flag("--full-flux") {
        let blocks = arg("--blocks").and_then(|b| {
            let (d, s) = b.split_once(',')?;
            Some((d.parse().ok()?, s.parse().ok()?))
        });
        let device = arg("--device").map_or("cpu", String::as_str);
        return finish(
            flux::measure_full(device, blocks, &flux_shape(1024))
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default()),
        );
    }
    if let Some(dir) = arg("--unet-configs") {
        return finish(write_unet_configs(Path::new(dir)).map(|()| String::new()));
    }
    if flag("--conv-micro") {
        return finish(
            measure_conv(steps).map(|v| serde_json::to_string_pretty(&v).unwrap_or_default()),
        );
    }
    if flag("--attention-micro") {
        return finish(
            measure_attention(steps).map(|v| serde_json::to_string_pretty(&v).unwrap_or_default()),
        );
    }
    // Child mode: one configuration, JSON on stdout.
    if let Some(name) = arg("--one") {
        let result = match name.as_str() {
            "full-sd15" => measure_full_sd15(full_steps),
            "tiny-sdxl" | "sdxl" => measure(ModelFamily::Sdxl, steps, 64, 1),
            _ => measure(ModelFamily::Sd15, steps, 64, 1),
        };
        return finish(result.map(|v| v.to_string()));
    }
    // `--json` is what `make bench` passes; `--out` is the older spelling.
    let out_path = arg("--json")
        .or_else(|| arg("--out"))
        .cloned()
        .unwrap_or_else(|| "trainer-bench.json".into());
    let Ok(me) = std::env::current_exe() else {
        eprintln!("trainer-bench: cannot find own executable");
        return ExitCode::FAILURE;
    };
    let mut names = Vec::new();
    if !flag("--only-full") {
        names.extend(["tiny-sd15", "tiny-sdxl"]);
    }
    if flag("--full-sd15") || flag("--only-full") {
        names.push("full-sd15");
    }
    let mut results = Vec::new();
    for name in names {
        match child(&me, name, steps, full_steps) {
            Ok(v) => results.push(v),
            Err(e) => {
                eprintln!("trainer-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let report = serde_json::json!({
        "implementation": "loraplane-trainer (candle, cpu, f32)",
        "threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "results": results,
    });
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    let written =
        std::fs::File::create(Path::new(&out_path)).and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written {
        eprintln!("trainer-bench: writing {out_path}: {e}");
        return ExitCode::FAILURE;
    }
    println!("{text}");
    ExitCode::SUCCESS
}
