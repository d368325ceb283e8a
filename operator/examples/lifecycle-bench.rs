//! Lifecycle benchmark: erasure latency and retention lag with thousands of live jobs, on
//! kube-sim with a real SeaweedFS and the release `loraplane-operator` as its own process.
//!
//! - `--live` EEA jobs are submitted first and left training (their trainers never finish):
//!   416 run on the EEA pools, the rest wait in them. They are the load the operator carries.
//! - **erasure**: once the operator has settled (no job changed for 3 s), `--erasures` of them
//!   (running and waiting alike), each with a dataset,
//!   checkpoints and a LoRA in S3, get `spec.erasure` at `--erasure-rate` per second; the
//!   latency is request → job object gone (pods stopped and waited for, every object deleted,
//!   audit record written, finalizer removed).
//! - **retention**: `--retained` US jobs (the US pools are left free for them) train for half a
//!   second and keep inputs 1 s and outputs 2 s; the lag is `outputsExpireAt` → job object
//!   gone, as seen by a watch.
//! - **requests per deletion**: with kube-sim's audit log on during both phases, the operator's
//!   requests about the deleted jobs and their children (and the audit records written), per
//!   deleted job (the simulated kubelets' and scheduler's requests are left out).
//!
//! Reports JSON on stdout (and to `--json PATH`).
//!
//! `cargo build --release -p loraplane-operator --bins --examples && \
//!  target/release/examples/lifecycle-bench --live 10000 --json lifecycle-bench.json`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "bench_cluster/mod.rs"]
mod bench_cluster;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bench_cluster::{percentile, vm_hwm_kib};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube_sim::KubeSim;
use kube_sim::cluster::{Script, ScriptRule};
use loraplane_crds::LoRATrainingJob;
use loraplane_testkit::Family;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const AGENT: &str = "lifecycle-bench";

#[derive(Debug, Parser)]
struct Args {
    /// Live jobs the operator carries throughout.
    #[arg(long, default_value_t = 10_000)]
    live: usize,
    /// Live jobs whose erasure is requested.
    #[arg(long, default_value_t = 200)]
    erasures: usize,
    /// Erasure requests per second.
    #[arg(long, default_value_t = 20.0)]
    erasure_rate: f64,
    /// Short-lived jobs whose retention is measured.
    #[arg(long, default_value_t = 100)]
    retained: usize,
    /// Give up waiting for a phase after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn job(name: &str, residency: &str, retention: serde_json::Value) -> LoRATrainingJob {
    let region = if residency == "us" {
        "us-east"
    } else {
        "eu-west"
    };
    serde_json::from_value(serde_json::json!({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "LoRATrainingJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "baseModel": {"family": "sdxl"},
            "concept": {"type": "style", "triggerWord": "zxq"},
            "dataset": {"uri": format!("s3://datasets-{region}/{name}.zip"), "sha256": "a".repeat(64)},
            "placement": {"residency": residency, "spot": "never"},
            "retention": retention,
        }
    }))
    .unwrap()
}

/// Waits until every name in `pending` has been reported by `rx`, or the deadline; returns
/// when each arrived.
async fn collect(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
    pending: &HashSet<String>,
    timeout: Duration,
) -> HashMap<String, Instant> {
    let mut seen = HashMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while seen.len() < pending.len() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some((name, at)) = rx.recv() => {
                if pending.contains(&name) {
                    seen.entry(name).or_insert(at);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    seen
}

fn requests_about(sim: &KubeSim, deleted: &HashSet<String>) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for r in sim.audit().snapshot() {
        // The bench's own calls, and the simulated kubelets' and scheduler's, are not the
        // operator's.
        let kubelet_or_scheduler =
            r.resource == "pods" && matches!(r.subresource.as_deref(), Some("status" | "binding"));
        if r.user_agent == AGENT || kubelet_or_scheduler {
            continue;
        }
        let about_job = r.name.as_deref().is_some_and(|n| {
            deleted.contains(n)
                || deleted.iter().any(|j| {
                    n.strip_prefix(j.as_str())
                        .is_some_and(|rest| rest.starts_with('-'))
                })
        });
        let audit_record = r.resource == "configmaps" && r.verb == "create";
        if about_job || audit_record {
            *counts
                .entry(format!("{} {}", r.verb, r.rbac_resource()))
                .or_default() += 1.0;
        }
    }
    let total: f64 = counts.values().sum();
    counts.insert("total".into(), total);
    counts
        .values_mut()
        .for_each(|c| *c /= deleted.len().max(1) as f64);
    counts
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let timeout = Duration::from_secs(args.timeout_seconds);
    let s3 = seaweed::SeaweedFs::start()
        .await
        .expect("SeaweedFS starts (`weed` comes from `make bootstrap`)");
    for (region, _) in bench_cluster::REGIONS {
        for kind in ["datasets", "checkpoints", "outputs"] {
            s3.create_bucket(&format!("{kind}-{region}")).await.unwrap();
        }
    }
    let sim = bench_cluster::start_sim(vec![
        ScriptRule {
            image: "trainer:bench".into(),
            script: Script {
                duration: None,
                ..Script::default()
            },
        },
        ScriptRule {
            image: "trainer:quick".into(),
            script: Script {
                duration: Some(Duration::from_millis(500)),
                ..Script::default()
            },
        },
    ])
    .await;
    let client = sim.client_as(AGENT).unwrap();
    let (dir, kubeconfig) = bench_cluster::work_dir("lifecycle-bench", &sim);
    // The short jobs get their own family entry (another trainer image) by model family:
    // sd15 runs the quick script.
    // Waiting jobs stay where they wait (as under a queue) instead of moving pool every
    // five minutes: the load is 10,000 live jobs, not 10,000 failovers.
    let mut spec = bench_cluster::platform(s3.endpoint());
    spec.families
        .extend(Family::sdxl_and_sd15("/models", "trainer:quick").pop());
    spec.defaults = Some(serde_json::json!({"schedulingTimeoutSeconds": 3600}));
    let platform = bench_cluster::cluster().platform_yaml(&spec);
    let (mut child, pid) = bench_cluster::start_operator(
        &dir,
        &kubeconfig,
        &platform,
        (s3.access_key(), s3.secret_key()),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Watches: the first pod of each job, and each job's deletion.
    let (pod_tx, mut pod_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<(String, i64)>();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    tokio::spawn(async move {
        let stream = watcher(pods, watcher::Config::default());
        futures::pin_mut!(stream);
        while let Ok(Some(ev)) = stream.try_next().await {
            if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = ev
                && let Some(job) = p
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("loraplane.io/job"))
            {
                let _ = pod_tx.send((job.clone(), Instant::now()));
            }
        }
    });
    let jobs: Api<LoRATrainingJob> = Api::namespaced(client.clone(), "default");
    let watched = jobs.clone();
    // When any job last changed (ms since `epoch`): the erasures start once the operator has
    // settled after admitting the live jobs, so they measure erasure, not that backlog.
    let epoch = Instant::now();
    let last_change = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let changed = last_change.clone();
    tokio::spawn(async move {
        let stream = watcher(watched, watcher::Config::default());
        futures::pin_mut!(stream);
        while let Ok(Some(ev)) = stream.try_next().await {
            changed.store(
                u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
            match ev {
                watcher::Event::Delete(j) => {
                    let _ = gone_tx.send((j.metadata.name.unwrap_or_default(), Instant::now()));
                }
                watcher::Event::Apply(j) => {
                    if let Some(at) = j
                        .status
                        .as_ref()
                        .and_then(|s| s.retention.as_ref())
                        .and_then(|r| r.outputs_expire_at.as_ref())
                    {
                        let _ = due_tx
                            .send((j.metadata.name.unwrap_or_default(), at.0.as_millisecond()));
                    }
                }
                _ => {}
            }
        }
    });

    // The live load.
    let live: Vec<String> = (0..args.live).map(|i| format!("live-{i}")).collect();
    let started = Instant::now();
    futures::stream::iter(live.iter().cloned())
        .map(|name| {
            let jobs = jobs.clone();
            async move {
                jobs.create(
                    &PostParams::default(),
                    &job(&name, "eea", serde_json::json!({})),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<()>()
        .await;
    let all_live: HashSet<String> = live.iter().cloned().collect();
    let admitted = collect(&mut pod_rx, &all_live, timeout).await;
    let admission_seconds = started.elapsed().as_secs_f64();

    let settle_started = Instant::now();
    while settle_started.elapsed() < Duration::from_secs(120) {
        let last = Duration::from_millis(last_change.load(std::sync::atomic::Ordering::Relaxed));
        if epoch.elapsed().saturating_sub(last) >= Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settle_seconds = settle_started.elapsed().as_secs_f64();

    // Erasure of running and waiting jobs alike, each with data in S3.
    let step = (args.live / args.erasures.max(1)).max(1);
    let victims: Vec<String> = live
        .iter()
        .step_by(step)
        .take(args.erasures)
        .cloned()
        .collect();
    for name in &victims {
        let j = jobs.get(name).await.unwrap();
        let prefix =
            loraplane_crds::layout::job_prefix("default", name, j.metadata.uid.as_deref().unwrap());
        for (bucket, key) in [
            ("datasets-eu-west".to_string(), format!("{name}.zip")),
            (
                "checkpoints-eu-west".to_string(),
                format!("{prefix}step-100/state"),
            ),
            (
                "outputs-eu-west".to_string(),
                format!("{prefix}lora.safetensors"),
            ),
        ] {
            s3.client()
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(vec![0u8; 4096].into())
                .send()
                .await
                .unwrap();
        }
    }
    sim.audit().clear();
    sim.audit().enable();
    let clock = tokio::time::Instant::now();
    let requested: HashMap<String, Instant> =
        futures::stream::iter(victims.iter().cloned().enumerate())
            .map(|(i, name)| {
                let jobs = jobs.clone();
                let rate = args.erasure_rate;
                async move {
                    tokio::time::sleep_until(clock + Duration::from_secs_f64(i as f64 / rate))
                        .await;
                    let at = Instant::now();
                    let patch = serde_json::json!({"spec": {"erasure": {
                        "requestedAt": k8s_openapi::jiff::Timestamp::now().to_string(),
                        "reason": "customerRequest",
                    }}});
                    jobs.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .unwrap();
                    (name, at)
                }
            })
            .buffer_unordered(1024)
            .collect()
            .await;
    let erased = collect(&mut gone_rx, &victims.iter().cloned().collect(), timeout).await;
    let mut erasure: Vec<f64> = erased
        .iter()
        .map(|(n, at)| at.saturating_duration_since(requested[n]).as_secs_f64())
        .collect();
    erasure.sort_by(f64::total_cmp);
    let erasure_requests = requests_about(&sim, &erased.keys().cloned().collect());
    let mut left = 0usize;
    for bucket in ["datasets-eu-west", "checkpoints-eu-west", "outputs-eu-west"] {
        let list = s3
            .client()
            .list_objects_v2()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        left += list.contents().len();
    }

    // Retention of short US jobs beside the live load.
    sim.audit().clear();
    let short: Vec<String> = (0..args.retained).map(|i| format!("short-{i}")).collect();
    futures::stream::iter(short.iter().cloned())
        .map(|name| {
            let jobs = jobs.clone();
            async move {
                let mut j = job(
                    &name,
                    "us",
                    serde_json::json!({"keepInputsSeconds": 1, "keepOutputsSeconds": 2}),
                );
                j.spec.base_model.family = loraplane_crds::v1alpha1::ModelFamily::Sd15;
                jobs.create(&PostParams::default(), &j).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<()>()
        .await;
    let short_set: HashSet<String> = short.iter().cloned().collect();
    let deleted = collect(&mut gone_rx, &short_set, timeout).await;
    let mut due: HashMap<String, i64> = HashMap::new();
    while let Ok((name, at)) = due_rx.try_recv() {
        due.insert(name, at);
    }
    // Lag from the whole-second due time to the deletion seen by the watch.
    let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
    let mut retention: Vec<f64> = deleted
        .iter()
        .filter_map(|(n, at)| {
            let seen_ms = now_ms - i64::try_from(at.elapsed().as_millis()).unwrap_or(0);
            due.get(n).map(|d| ((seen_ms - d).max(0) as f64) / 1000.0)
        })
        .collect();
    retention.sort_by(f64::total_cmp);
    let retention_requests = requests_about(&sim, &deleted.keys().cloned().collect());
    sim.audit().disable();
    let peak_rss = vm_hwm_kib(pid).unwrap_or(0);
    let _ = child.kill().await;

    let report = serde_json::json!({
        "live_jobs": args.live,
        "live_jobs_with_pod": admitted.len(),
        "admission_seconds": admission_seconds,
        "settle_seconds": settle_seconds,
        "erasure": {
            "requested": victims.len(),
            "rate_per_s": args.erasure_rate,
            "completed": erasure.len(),
            "p50_seconds": percentile(&erasure, 0.5),
            "p99_seconds": percentile(&erasure, 0.99),
            "max_seconds": erasure.last().copied().unwrap_or(f64::NAN),
            "objects_left": left,
            "apiserver_requests_per_erasure": erasure_requests,
            "goal_p99_seconds": 10,
        },
        "retention": {
            "jobs": args.retained,
            "deleted": retention.len(),
            "lag_p50_seconds": percentile(&retention, 0.5),
            "lag_p99_seconds": percentile(&retention, 0.99),
            "apiserver_requests_per_job_whole_life": retention_requests,
            "note": "lag from outputsExpireAt (whole seconds) to the deletion seen by a watch; requests cover each short job's whole life, creation to deletion",
        },
        "operator_peak_rss_mib": peak_rss as f64 / 1024.0,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "machine_threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{text}\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}
