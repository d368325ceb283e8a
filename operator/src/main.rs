//! `loraplane-operator`: loads the platform configuration (refusing to start on a bad one),
//! serves `/metrics`, `/healthz` and `/readyz`, waits for the CRD, takes part in leader
//! election and reconciles LoRATrainingJobs while leading. SIGTERM or Ctrl-C stops it
//! gracefully: in-flight reconciles finish and the Lease is released.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use loraplane_operator::config::{Args, Settings, load_platform_config};
use loraplane_operator::controller::{self, Health};
use loraplane_operator::metrics::Metrics;
use loraplane_operator::server;
use loraplane_runtime::logging;
use loraplane_runtime::storage::{S3Credentials, Storage};
use tokio::sync::watch;

// glibc malloc was about a quarter of the CPU under load (perf); mimalloc is a drop-in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(err) = logging::init(args.log_format) {
        eprintln!("loraplane-operator: {err}");
        return ExitCode::FAILURE;
    }
    let platform = match load_platform_config(&args.config) {
        Ok(p) => p,
        Err(err) => {
            tracing::error!(error = %err, "invalid configuration; not starting");
            eprintln!("loraplane-operator: {err}");
            return ExitCode::from(2);
        }
    };
    // The operator deletes jobs' data in S3 (retention, erasure): it holds the credentials the
    // chart gives it from the S3 Secret; trainer pods get their own access.
    let creds = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"].map(std::env::var);
    let [Ok(access_key), Ok(secret_key)] = creds else {
        eprintln!(
            "loraplane-operator: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set (the chart takes them from the S3 credentials Secret)"
        );
        return ExitCode::from(2);
    };
    let storage = Storage::new(
        &platform,
        &S3Credentials {
            access_key,
            secret_key,
        },
    );
    let settings = Settings::from_args(&args, platform);
    let metrics = match Metrics::new() {
        Ok(m) => m,
        Err(err) => {
            eprintln!("loraplane-operator: {err}");
            return ExitCode::FAILURE;
        }
    };
    loraplane_runtime::tls::install_crypto_provider();
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(err) => {
            eprintln!("loraplane-operator: could not configure the Kubernetes client: {err}");
            return ExitCode::FAILURE;
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        stop_tx.send_replace(true);
    });
    let health = Arc::new(Health::default());
    let http = tokio::spawn(server::serve(
        args.metrics_addr,
        metrics.clone(),
        health.clone(),
        stop_rx.clone(),
        None,
    ));
    let result = controller::run(client, settings, storage, metrics, health, stop_rx).await;
    http.abort();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "operator stopped");
            ExitCode::FAILURE
        }
    }
}
