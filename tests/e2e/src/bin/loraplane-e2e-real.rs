//! `loraplane-e2e-real`: the customer journey against a real cluster (kind or k3d, set up as
//! `tests/e2e/REAL_CLUSTER.md` describes; `make e2e-real` runs it). Subcommands:
//!
//! - `values`: prints the Helm values that make the chart look like the local stack.
//! - `models DIR`: writes the tiny SD1.5/SDXL/FLUX.1 models the trainer image carries under `/models`.
//! - `prepare`: namespaces, Secrets, buckets and GPU-looking worker nodes (idempotent).
//! - `run`: an EEA-only SDXL order through the installed API, a spot reclaim of its node
//!   (cordon + eviction), resume in the other EEA region, the checked download, retention.
//!
//! `prepare` and `run` talk to the cluster of `KUBECONFIG` and refuse to start without it.
//! Prints the same timeline as the demo; exits 1 when a step fails, 2 on bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use loraplane_crds::v1alpha1::Phase;
use loraplane_e2e::fixtures;
use loraplane_e2e::journey::{self, OrderSpec, Timeline};
use loraplane_e2e::real::{self, RealSettings, S3Keys};

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// S3 endpoint as the cluster's pods and this machine both reach it.
    #[arg(long, env = "LORAPLANE_S3_ENDPOINT", global = true, default_value = "")]
    s3_endpoint: String,
    /// S3 signing region.
    #[arg(
        long,
        env = "LORAPLANE_S3_REGION",
        global = true,
        default_value = "us-east-1"
    )]
    s3_region: String,
    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", global = true, default_value = seaweed::ACCESS_KEY)]
    s3_access_key: String,
    /// S3 secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", global = true, default_value = seaweed::SECRET_KEY, hide_default_value = true)]
    s3_secret_key: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the Helm values (YAML) for `helm install -f -`.
    Values {
        /// Registry of the three images.
        #[arg(long, default_value = "loraplane.local")]
        registry: String,
        /// Tag of the three images.
        #[arg(long, default_value = "dev")]
        tag: String,
    },
    /// Write the tiny models into DIR (`DIR/sd15`, `DIR/sdxl`, `DIR/flux1`).
    Models {
        /// Target directory.
        dir: PathBuf,
    },
    /// Create namespaces, Secrets, buckets and label one worker per GPU pool.
    Prepare,
    /// Play the journey.
    Run {
        /// Base URL of the loraplane API (e.g. a port-forward of Service `loraplane-api`).
        #[arg(
            long,
            env = "LORAPLANE_API_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        api_url: String,
        /// Multiplies the local stack's waits (image pulls, real scheduling).
        #[arg(long, default_value_t = 4)]
        patience: u32,
        /// Training steps of the order.
        #[arg(long, default_value_t = 30)]
        steps: u32,
    },
}

/// Why the run stopped.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// Bad usage or a missing precondition (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A step failed (exit 1).
    #[error("{0}")]
    Step(String),
}

fn step(e: impl std::fmt::Display) -> RunError {
    RunError::Step(e.to_string())
}

fn keys(args: &Args) -> S3Keys {
    S3Keys {
        access_key: args.s3_access_key.clone(),
        secret_key: args.s3_secret_key.clone(),
    }
}

fn need_s3(args: &Args) -> Result<(), RunError> {
    if args.s3_endpoint.is_empty() {
        return Err(RunError::Usage(
            "no S3 endpoint: set LORAPLANE_S3_ENDPOINT (or --s3-endpoint) to the address pods and this machine both reach, see tests/e2e/REAL_CLUSTER.md".into(),
        ));
    }
    Ok(())
}

/// The kubeconfig to use: only an explicit `KUBECONFIG`, so that this never talks to whatever
/// cluster `~/.kube/config` happens to point at.
fn kubeconfig() -> Result<PathBuf, RunError> {
    match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(p) => Ok(PathBuf::from(p)),
        None => Err(RunError::Usage(
            "KUBECONFIG is not set: this suite runs against a real cluster (kind or k3d); set it up as tests/e2e/REAL_CLUSTER.md says and export KUBECONFIG".into(),
        )),
    }
}

async fn client() -> Result<(kube::Client, PathBuf), RunError> {
    let path = kubeconfig()?;
    loraplane_runtime::tls::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .map_err(|e| RunError::Usage(format!("connect with KUBECONFIG={}: {e}", path.display())))?;
    Ok((client, path))
}

async fn run(args: &Args) -> Result<(), RunError> {
    match &args.command {
        Command::Values { registry, tag } => {
            need_s3(args)?;
            let values = real::helm_values(&RealSettings {
                s3_endpoint: args.s3_endpoint.clone(),
                s3_region: args.s3_region.clone(),
                registry: registry.clone(),
                tag: tag.clone(),
            })
            .map_err(step)?;
            print!("{}", serde_yaml::to_string(&values).map_err(step)?);
            Ok(())
        }
        Command::Models { dir } => {
            fixtures::write_models(dir).map_err(step)?;
            println!("wrote {}/sd15 and {}/sdxl", dir.display(), dir.display());
            Ok(())
        }
        Command::Prepare => {
            need_s3(args)?;
            let (client, _) = client().await?;
            let s3 = real::s3_client(&args.s3_endpoint, &args.s3_region, &keys(args));
            for (node, pool) in real::prepare(&client, &s3, &keys(args))
                .await
                .map_err(step)?
            {
                println!("node {node} is pool {pool}");
            }
            println!("prepared: namespaces, Secrets, buckets, GPU pools");
            Ok(())
        }
        Command::Run {
            api_url,
            patience,
            steps,
        } => {
            need_s3(args)?;
            let (client, path) = client().await?;
            let s3 = real::s3_client(&args.s3_endpoint, &args.s3_region, &keys(args));
            let ends = real::endpoints(client.clone(), &path, api_url, s3, *patience);
            journey_on(&client, &ends, *steps).await
        }
    }
}

/// The journey: like the local one, with an eviction from a cordoned node as the reclaim.
async fn journey_on(
    client: &kube::Client,
    ends: &loraplane_e2e::endpoints::Endpoints,
    steps: u32,
) -> Result<(), RunError> {
    let mut tl = Timeline::new(true);
    let order = OrderSpec::new("real", "standard", "sdxl", "eea", steps);
    let placed = journey::place_order(ends, &order, &mut tl)
        .await
        .map_err(step)?;
    let first = journey::wait_running(ends, &placed.job, Duration::from_secs(60), &mut tl)
        .await
        .map_err(step)?;
    let (region, ..) = journey::placement(&first).unwrap_or_default();
    if journey::jurisdiction(&region) != "eea" {
        return Err(step(format!("an eea job was placed in {region}")));
    }
    let c = journey::wait_checkpoint(ends, &placed.job, &mut tl)
        .await
        .map_err(step)?;
    real::reclaim(client, &c.node, &placed.job)
        .await
        .map_err(step)?;
    tl.note(
        "spot reclaim",
        format!("node {} cordoned, trainer pod evicted", c.node),
    );
    let resumed = journey::wait_resumed(ends, &placed.job, 1, &mut tl).await;
    // The node goes back into service whatever happened.
    let restored = real::restore(client, &c.node).await;
    let resumed = resumed.map_err(step)?;
    restored.map_err(step)?;
    let (new_region, ..) = journey::placement(&resumed).unwrap_or_default();
    if journey::jurisdiction(&new_region) != "eea" {
        return Err(step(format!(
            "after the reclaim the eea job moved to {new_region}"
        )));
    }
    let done = journey::wait_succeeded(ends, &placed.job, &mut tl)
        .await
        .map_err(step)?;
    if journey::phase(&done) != Some(Phase::Succeeded) {
        return Err(step("the job did not succeed"));
    }
    journey::download_loras(ends, &placed.job, &mut tl)
        .await
        .map_err(step)?;
    journey::wait_retention(ends, &placed, &mut tl)
        .await
        .map_err(step)?;
    let left = journey::leftovers(ends, &placed).await.map_err(step)?;
    tl.note(
        "audit",
        format!(
            "{} claims, {} S3 objects, {} live pods left",
            left.claims.len(),
            left.objects.len(),
            left.live_pods
        ),
    );
    if left.job_exists || !left.claims.is_empty() || !left.objects.is_empty() || left.live_pods > 0
    {
        return Err(step(format!(
            "retention left data behind: claims {:?}, objects {:?}, pods {:?}",
            left.claims, left.objects, left.pods
        )));
    }
    println!("journey passed on the real cluster");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ RunError::Usage(_)) => {
            eprintln!("loraplane-e2e-real: {e}");
            ExitCode::from(2)
        }
        Err(e @ RunError::Step(_)) => {
            eprintln!("loraplane-e2e-real: {e}");
            ExitCode::FAILURE
        }
    }
}
