//! `kube-sim`: runs the Kubernetes API emulator (and, with `--topology`, the simulated GPU
//! cluster) until Ctrl-C, after printing the path of a kubeconfig for `kubectl`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kube_sim::{KubeSim, SimConfig};

// glibc malloc was about a quarter of the CPU under load (perf); mimalloc is a drop-in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Kubernetes API emulator with simulated GPU nodes.
#[derive(Debug, Parser)]
#[command(name = "kube-sim", version)]
struct Args {
    /// Topology file (YAML): regions → node pools → nodes. Without it only the apiserver runs.
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Where to write the kubeconfig (default: a file in the system temp directory).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Do not install loraplane's LoRATrainingJob CRD at start.
    #[arg(long)]
    no_loraplane_crd: bool,
    /// Directory for kubelet volumes and local-process working files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("reading topology {path}: {source}")]
    ReadTopology {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing topology {path}: {source}")]
    ParseTopology {
        path: String,
        source: serde_yaml::Error,
    },
    #[error(transparent)]
    Sim(#[from] kube_sim::SimError),
    #[error("waiting for Ctrl-C: {0}")]
    WaitSignal(std::io::Error),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

async fn run(args: Args) -> Result<(), MainError> {
    let mut config = SimConfig::default();
    if !args.no_loraplane_crd {
        config = config.with_loraplane_crd();
    }
    if let Some(path) = &args.topology {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MainError::ReadTopology {
            path: shown.clone(),
            source,
        })?;
        config.topology =
            Some(
                serde_yaml::from_str(&text).map_err(|source| MainError::ParseTopology {
                    path: shown,
                    source,
                })?,
            );
    }
    config.kubelet.data_dir = args.data_dir.clone();
    let sim = KubeSim::start(config).await?;
    let kubeconfig = args.kubeconfig.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("kube-sim-{}.kubeconfig", std::process::id()))
    });
    sim.write_kubeconfig(&kubeconfig)?;
    tracing::info!(url = %sim.url(), kubeconfig = %kubeconfig.display(), "kube-sim serving");
    println!("{}", kubeconfig.display());
    tokio::signal::ctrl_c()
        .await
        .map_err(MainError::WaitSignal)?;
    sim.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kube-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
