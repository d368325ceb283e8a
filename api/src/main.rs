//! `loraplane-api`: reads its configuration, connects to Kubernetes and S3, serves HTTP and runs
//! the notifier (storefront notifications, refunds of jobs that ended badly). It holds no
//! lease: every replica is the same.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use loraplane_api::app::{App, Secrets};
use loraplane_api::config::ApiConfig;
use loraplane_api::http;
use loraplane_api::metrics::Metrics;
use loraplane_api::notifier::Notifier;
use loraplane_api::refunds::Stripe;
use loraplane_crds::platform::PlatformConfig;
use loraplane_runtime::logging::{self, LogFormat};
use loraplane_runtime::storage::{S3Credentials, Storage};

// glibc malloc was about a quarter of the CPU under load (perf); mimalloc is a drop-in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command-line flags. Secrets come only from the environment.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    log_format: LogFormat,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "LISTEN")]
    listen: SocketAddr,
    /// The API configuration (plans, tenants, limits).
    #[arg(long, env = "API_CONFIG")]
    config: PathBuf,
    /// The platform configuration (regions, buckets).
    #[arg(long, env = "PLATFORM_CONFIG")]
    platform: PathBuf,
}

/// Why start-up failed.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("read {0}: {1}")]
    ReadConfig(PathBuf, std::io::Error),
    #[error(transparent)]
    ApiConfig(#[from] loraplane_api::config::ConfigError),
    #[error(transparent)]
    PlatformConfig(#[from] loraplane_crds::platform::ConfigError),
    #[error("environment variable {0} is required")]
    MissingEnv(&'static str),
    #[error("environment variable {0} (a tenant's notification secret) is required")]
    MissingTenantSecret(String),
    #[error(transparent)]
    Notifier(#[from] loraplane_api::notifier::NotifyError),
    #[error("connect to Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("serve: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Stripe(#[from] loraplane_api::refunds::RefundError),
}

fn env(name: &'static str) -> Result<String, StartError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or(StartError::MissingEnv(name))
}

async fn run(args: Args) -> Result<(), StartError> {
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| StartError::ReadConfig(p.clone(), e));
    let config = ApiConfig::from_yaml(&read(&args.config)?)?;
    let platform = PlatformConfig::from_yaml(&read(&args.platform)?)?;
    // Several comma-separated secrets are accepted while one is being rolled.
    let webhook = env("STRIPE_WEBHOOK_SECRET")?
        .split(',')
        .map(|s| s.trim().as_bytes().to_vec())
        .collect();
    // Each tenant's notification secret comes from the variable its configuration names.
    let mut notify = std::collections::BTreeMap::new();
    for t in &config.tenants {
        if let Some(n) = &t.notifications {
            let value = std::env::var(&n.secret_env)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| StartError::MissingTenantSecret(n.secret_env.clone()))?;
            notify.insert(t.name.clone(), value.into_bytes());
        }
    }
    let secrets = Secrets {
        webhook,
        id_key: env("ID_HASH_KEY")?.into_bytes(),
        notify,
    };
    let creds = S3Credentials {
        access_key: env("AWS_ACCESS_KEY_ID")?,
        secret_key: env("AWS_SECRET_ACCESS_KEY")?,
    };
    let kube = kube::Client::try_default().await?;
    let validations = App::validation_permits(&config);
    let stripe = Stripe::new(
        &config.stripe_api.base_url,
        &env("STRIPE_API_KEY")?,
        Duration::from_secs(config.stripe_api.timeout_seconds),
    )?;
    let app = Arc::new(App {
        kube,
        storage: Storage::new(&platform, &creds),
        config,
        platform,
        secrets,
        metrics: Metrics::new()?,
        validations,
        stripe,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| StartError::Listen(args.listen, e))?;
    // The bound address, not the flag: with port 0 this is where the API really is.
    let bound = listener
        .local_addr()
        .map_err(|e| StartError::Listen(args.listen, e))?;
    tracing::info!(listen = %bound, "loraplane-api serving");
    let holder = std::env::var("HOSTNAME").unwrap_or_else(|_| uuid::Uuid::new_v4().to_string());
    let notifier = Arc::new(Notifier::new(app.clone(), &holder)?);
    tokio::spawn(notifier.run());
    http::serve(listener, app, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .map_err(StartError::Serve)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    loraplane_api::install_crypto_provider();
    if let Err(err) = logging::init(args.log_format) {
        eprintln!("loraplane-api: {err}");
        return std::process::ExitCode::FAILURE;
    }
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "loraplane-api failed");
            std::process::ExitCode::FAILURE
        }
    }
}
