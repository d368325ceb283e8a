//! `kube-sim-bench`: measures the emulator through a real `kube::Client` over HTTP and prints
//! one JSON object: creates/s, updates/s (merge patches) and watch fan-out (events/s delivered
//! to many concurrent watchers while updates run). Not a test: timings vary by machine.

use std::time::{Duration, Instant};

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube_sim::{KubeSim, SimConfig};
use serde_json::json;

// glibc malloc was about a quarter of the CPU under load (perf); mimalloc is a drop-in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmark settings.
#[derive(Debug, Parser)]
#[command(name = "kube-sim-bench")]
struct Args {
    /// Objects to create (and then update once each).
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Concurrent watchers during the fan-out phase.
    #[arg(long, default_value_t = 50)]
    watchers: usize,
    /// Updates during the fan-out phase.
    #[arg(long, default_value_t = 2_000)]
    fanout_updates: usize,
}

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error(transparent)]
    Start(#[from] kube_sim::SimError),
    #[error("{action}: {source}")]
    Api {
        action: &'static str,
        source: kube::Error,
    },
    #[error("watchers did not receive every event within a minute")]
    WatchTimeout,
    #[error("configmaps are not served")]
    NoConfigMaps,
    #[error("direct create: {0}")]
    Direct(String),
}

fn api(action: &'static str) -> impl Fn(kube::Error) -> BenchError {
    move |source| BenchError::Api { action, source }
}

fn per_second(n: usize, d: Duration) -> f64 {
    (n as f64 / d.as_secs_f64() * 10.0).round() / 10.0
}

async fn run(args: Args) -> Result<serde_json::Value, BenchError> {
    let sim = KubeSim::start(SimConfig::default()).await?;
    let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");

    let started = Instant::now();
    futures::stream::iter(0..args.objects)
        .map(|i| {
            let cms = cms.clone();
            async move {
                let cm: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": format!("cm-{i}"), "labels": {"bench": "yes"}},
                    "data": {"i": i.to_string()}
                }))
                .unwrap_or_default();
                cms.create(&PostParams::default(), &cm).await
            }
        })
        .buffer_unordered(args.concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
        .map_err(api("create"))?;
    let create_time = started.elapsed();

    let started = Instant::now();
    futures::stream::iter(0..args.objects)
        .map(|i| {
            let cms = cms.clone();
            async move {
                let patch = json!({"data": {"updated": "true"}});
                cms.patch(
                    &format!("cm-{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            }
        })
        .buffer_unordered(args.concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
        .map_err(api("update"))?;
    let update_time = started.elapsed();

    // Fan-out: every watcher sees every update of one object.
    let rv = cms
        .get("cm-0")
        .await
        .map_err(api("get"))?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        let stream = cms
            .watch(&WatchParams::default().fields("metadata.name=cm-0"), &rv)
            .await
            .map_err(api("watch"))?;
        let want = args.fanout_updates;
        watchers.push(tokio::spawn(async move {
            let mut seen = 0usize;
            let mut stream = Box::pin(stream);
            while let Some(Ok(ev)) = stream.next().await {
                if matches!(ev, WatchEvent::Modified(_)) {
                    seen += 1;
                    if seen == want {
                        break;
                    }
                }
            }
            seen
        }));
    }
    let started = Instant::now();
    for i in 0..args.fanout_updates {
        let patch = json!({"data": {"n": i.to_string()}});
        cms.patch("cm-0", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api("fan-out update"))?;
    }
    let write_time = started.elapsed();
    let mut delivered = 0;
    for w in watchers {
        delivered += tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .map_err(|_| BenchError::WatchTimeout)?
            .unwrap_or(0);
    }
    let fanout_time = started.elapsed();

    // The store alone, without HTTP and client (which share the same cores in the numbers
    // above): an upper bound of what the apiserver can take.
    let state = sim.apiserver().state().clone();
    let rt = state
        .resolve("", "v1", "configmaps")
        .ok_or(BenchError::NoConfigMaps)?;
    let started = Instant::now();
    for i in 0..args.objects {
        let obj =
            json!({"metadata": {"name": format!("direct-{i}")}, "data": {"i": i.to_string()}});
        state
            .create(&rt, "default", obj)
            .map_err(|e| BenchError::Direct(e.to_string()))?;
    }
    let direct_time = started.elapsed();
    sim.shutdown().await;
    Ok(json!({
        "profile": if cfg!(debug_assertions) { "dev" } else { "release" },
        "objects": args.objects,
        "concurrency": args.concurrency,
        "creates_per_s": per_second(args.objects, create_time),
        "updates_per_s": per_second(args.objects, update_time),
        "store_only_creates_per_s": per_second(args.objects, direct_time),
        "fanout": {
            "watchers": args.watchers,
            "updates": args.fanout_updates,
            "sequential_updates_per_s": per_second(args.fanout_updates, write_time),
            "events_delivered": delivered,
            "events_expected": args.watchers * args.fanout_updates,
            "events_delivered_per_s": per_second(delivered, fanout_time),
        },
    }))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kube-sim-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
