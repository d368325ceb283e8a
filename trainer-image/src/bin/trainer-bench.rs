//! `trainer-bench [--steps N] [--out FILE]`: measures CPU seconds per training step and peak
//! RSS for the tiny SD1.5 and SDXL configurations (generated on the fly, as the tests do) and
//! writes the figures as JSON. Each configuration runs in a child process so peak RSS is its
//! own. Linux only (reads `/proc/self`).

use std::io::{Cursor, Write};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use candle_core::Device;
use loraplane_trainer::model::{self, LoraSpec, ModelFamily};
use loraplane_trainer::optim::{AdamW, AdamWParams};
use loraplane_trainer::rng::Rng;
use loraplane_trainer::schedule::{NoiseSchedule, SchedulerConfig};
use loraplane_trainer::{dataset, train};

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
            rank: 16,
            alpha: 16.0,
        },
        &Device::Cpu,
    )
    .map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    let m = loaded?;
    let mut samples = Vec::new();
    for i in 0..5 {
        samples.push(dataset::Sample {
            name: format!("{i}.png"),
            bytes: png(i)?,
            caption: "bench, a photo".into(),
        });
    }
    let limits = dataset::Limits::default();
    let cache =
        train::cache_samples(&m, &samples, resolution, &limits).map_err(|e| e.to_string())?;
    let sched = NoiseSchedule::new(&SchedulerConfig::default()).map_err(|e| e.to_string())?;
    let mut opt =
        AdamW::new(train::named_params(&m), AdamWParams::default()).map_err(|e| e.to_string())?;
    let mut rng = Rng::new(1, 0);
    let mut step = |i: u64| -> Result<(), String> {
        let idx = train::batch_indices(i, cache.len(), batch, 1);
        let b = train::make_batch(&m, &cache, &idx, &sched, &mut rng, 0.0, Some(5.0))
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
        "rank": 16,
        "adapters": m.adapters().len(),
        "steps_measured": steps,
        "cpu_seconds_per_step": cpu,
        "wall_seconds_per_step": wall,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let steps: usize = arg("--steps").and_then(|s| s.parse().ok()).unwrap_or(20);
    // Child mode: one configuration, JSON on stdout.
    if let Some(family) = arg("--one") {
        let family = if family == "sdxl" {
            ModelFamily::Sdxl
        } else {
            ModelFamily::Sd15
        };
        return match measure(family, steps, 64, 1) {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trainer-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let out_path = arg("--out")
        .cloned()
        .unwrap_or_else(|| "trainer-bench.json".into());
    let Ok(me) = std::env::current_exe() else {
        eprintln!("trainer-bench: cannot find own executable");
        return ExitCode::FAILURE;
    };
    let mut results = Vec::new();
    for family in ["sd15", "sdxl"] {
        let out = Command::new(&me)
            .args(["--one", family, "--steps", &steps.to_string()])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                match serde_json::from_slice::<serde_json::Value>(&o.stdout) {
                    Ok(v) => results.push(v),
                    Err(e) => {
                        eprintln!("trainer-bench: {family}: bad output: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            Ok(o) => {
                eprintln!(
                    "trainer-bench: {family}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("trainer-bench: {family}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let report = serde_json::json!({ "threads": std::thread::available_parallelism().map_or(0, |n| n.get()), "results": results });
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
