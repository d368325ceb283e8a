//! `loraplane-trainer --config FILE`: trains one LoRA as the job's config file says, prints
//! `LORAPLANE {json}` progress lines, leaves a summary in the termination-message file and
//! exits 0 (done), 2 (bad input: do not retry) or 1 (crash: retry).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use loraplane_crds::trainer::{EXIT_BAD_INPUT, EXIT_CRASH, EXIT_OK, Outcome, TrainerSummary};
use loraplane_trainer::{config, progress, train};

// Reuses freed activations instead of faulting them in again each step (alloc.rs).
#[global_allocator]
static ALLOCATOR: loraplane_trainer::alloc::TrainerAllocator =
    loraplane_trainer::alloc::TrainerAllocator;

/// Log output format: the services' convention (text, or one JSON object per line), set up
/// here because the trainer does not link the services' runtime crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs go to stderr (stdout carries the progress lines), filtered by `RUST_LOG`.
fn init_logging(format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.try_init(),
        LogFormat::Json => fmt.json().flatten_event(true).try_init(),
    }
    .map_err(|e| format!("could not install the log subscriber: {e}"))
}

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The job's config file (YAML or JSON `TrainerConfig`).
    #[arg(long)]
    config: PathBuf,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    log_format: LogFormat,
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}

/// Where the summary goes when the config itself is unusable: the path it names if that much
/// can be read, else Kubernetes' default.
fn fallback_summary_path(config: &Path) -> PathBuf {
    std::fs::read_to_string(config)
        .ok()
        .and_then(|t| serde_yaml::from_str::<serde_yaml::Value>(&t).ok())
        .and_then(|v| {
            v.get("terminationMessagePath")
                .and_then(|p| p.as_str().map(PathBuf::from))
        })
        .unwrap_or_else(|| PathBuf::from("/dev/termination-log"))
}

fn finish(path: &Path, summary: &TrainerSummary) {
    if let Err(e) = progress::write_summary(path, summary) {
        tracing::warn!(path = %path.display(), error = %e, "could not write the termination message");
    }
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`: no other thread exists yet.
    #[allow(unsafe_code)]
    unsafe {
        loraplane_trainer::threads::limit_candle_spinning();
    }
    let args = Args::parse();
    if let Err(err) = init_logging(args.log_format) {
        eprintln!("loraplane-trainer: {err}");
        return code(EXIT_CRASH);
    }
    let cfg = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loraplane-trainer: {e}");
            let summary = TrainerSummary {
                outcome: Outcome::BadInput,
                step: 0,
                artifacts: vec![],
                error: Some(e.to_string()),
            };
            finish(&fallback_summary_path(&args.config), &summary);
            return code(EXIT_BAD_INPUT);
        }
    };
    tracing::info!(
        job = %cfg.job.name,
        family = cfg.base_model.family.as_str(),
        steps = cfg.training.steps,
        "starting training"
    );
    let summary_path = PathBuf::from(&cfg.termination_message_path);
    let completed = std::cell::Cell::new(0);
    match train::run_tracking(&cfg, &train::RunOptions::default(), &completed) {
        Ok(report) => {
            tracing::info!(
                artifacts = report.summary.artifacts.len(),
                "training finished"
            );
            finish(&summary_path, &report.summary);
            code(EXIT_OK)
        }
        Err(e) => {
            let bad = e.is_bad_input();
            let step = completed.get();
            eprintln!("loraplane-trainer: {e}");
            let summary = TrainerSummary {
                outcome: if bad {
                    Outcome::BadInput
                } else {
                    Outcome::Crashed
                },
                step,
                artifacts: vec![],
                error: Some(e.to_string()),
            };
            finish(&summary_path, &summary);
            code(if bad { EXIT_BAD_INPUT } else { EXIT_CRASH })
        }
    }
}
