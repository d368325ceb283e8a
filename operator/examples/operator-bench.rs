//! Operator admission benchmark on kube-sim: 3 regions, 624 simulated GPUs. The operator runs
//! as its own process (the release `loraplane-operator` binary next to this example), so its
//! peak RSS is its own.
//!
//! Two phases, each on a fresh kube-sim with a fresh operator:
//! - **burst**: `--jobs` jobs submitted as fast as the API takes them. Its throughput (jobs/s
//!   from the first submission until every job has a pod, placed or queued in a pool) is the
//!   admission capacity; its latencies are queue-bound (the last job waits for all before it),
//!   so they say how long a backlog takes to drain, not how long one job takes;
//! - **paced**: `--paced-jobs` jobs submitted at a steady `--rate` per second, so the
//!   creation-to-pod latency is that of one job under that load (`--rate 0` skips it).
//!
//! Reports JSON on stdout (and to `--json PATH`): the burst figures at the top level
//! (throughput, p50/p99 creation-to-pod latency, operator peak RSS (VmHWM)), the paced ones
//! under `paced`, with `--audit` the API requests per job by verb and resource, the build
//! profile and the machine's threads. kube-sim runs inside this process, so a debug build
//! measures a debug apiserver too.
//!
//! `cargo build --release -p loraplane-operator --bins --examples && \
//!  target/release/examples/operator-bench --jobs 10000 --json operator-bench.json`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "bench_cluster/mod.rs"]
mod bench_cluster;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bench_cluster::{
    GPUS_PER_NODE, NODES_PER_POOL, POOLS_PER_REGION, REGIONS, percentile, platform_yaml, vm_hwm_kib,
};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube_sim::cluster::{Script, ScriptRule};
use loraplane_crds::LoRATrainingJob;

// glibc malloc was about a quarter of the CPU under load (perf); mimalloc is a drop-in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Jobs to submit.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Concurrent create requests.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Jobs per second submitted in the paced phase (the throughput goal, so the latency
    /// goal is checked at the rate the operator must sustain); 0 skips it.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Jobs submitted in the paced phase.
    #[arg(long, default_value_t = 5000)]
    paced_jobs: usize,
    /// Record every API request and report requests per job by verb and resource (costs
    /// kube-sim some CPU, so the figures of an audited run are a little lower).
    #[arg(long)]
    audit: bool,
}

fn job(i: usize) -> LoRATrainingJob {
    let residency = ["eea", "any", "us"][i % 3];
    // The dataset lies in a bucket of a region the residency allows, or the job fails at once.
    let data_region = if residency == "us" {
        "us-east"
    } else {
        "eu-west"
    };
    serde_json::from_value(serde_json::json!({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "LoRATrainingJob",
        "metadata": {"name": format!("bench-{i}"), "namespace": "default"},
        "spec": {
            "baseModel": {"family": "sdxl"},
            "concept": {"type": "style", "triggerWord": "zxq"},
            "dataset": {"uri": format!("s3://datasets-{data_region}/d.zip"), "sha256": "a".repeat(64)},
            "placement": {"residency": residency},
        }
    }))
    .unwrap()
}

/// What one phase measured.
struct PhaseResult {
    jobs: usize,
    jobs_with_pod: usize,
    submit_seconds: f64,
    admission_seconds: f64,
    /// Creation-to-first-pod latencies, sorted.
    latencies: Vec<f64>,
    peak_rss_kib: u64,
    /// API requests per job, by "verb resource[/subresource]", when audited.
    requests_per_job: Option<BTreeMap<String, f64>>,
}

impl PhaseResult {
    fn throughput(&self) -> f64 {
        self.jobs_with_pod as f64 / self.admission_seconds
    }
}

/// Starts kube-sim and the operator, submits `n` jobs (all at once, or `rate` per second),
/// and waits until each has a pod.
async fn run_phase(args: &Args, n: usize, rate: Option<f64>) -> PhaseResult {
    let sim = bench_cluster::start_sim(vec![ScriptRule {
        image: "trainer:*".into(),
        script: Script {
            duration: None,
            ..Script::default()
        },
    }])
    .await;
    let client = sim.client();
    let (dir, kubeconfig) = bench_cluster::work_dir("operator-bench", &sim);
    let (mut child, pid) = bench_cluster::start_operator(
        &dir,
        &kubeconfig,
        &platform_yaml("http://127.0.0.1:8333"),
        ("bench", "bench"),
    );

    // Pod watch: first pod per job.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    tokio::spawn(async move {
        let stream = watcher(pods, watcher::Config::default()).applied_objects();
        futures::pin_mut!(stream);
        while let Ok(Some(p)) = stream.try_next().await {
            if let Some(job) = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("loraplane.io/job"))
            {
                let _ = tx.send((job.clone(), Instant::now()));
            }
        }
    });
    // Let the operator win its Lease before the clock starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if args.audit {
        sim.audit().clear();
        sim.audit().enable();
    }

    let jobs: Api<LoRATrainingJob> = Api::namespaced(client.clone(), "default");
    let start = Instant::now();
    let clock = tokio::time::Instant::now();
    // Paced: job i is sent at start + i/rate whatever earlier creates took, so a slow
    // apiserver shows as latency, not as a lower offered rate (up to the concurrency bound).
    let concurrency = if rate.is_some() {
        args.concurrency.max(1024)
    } else {
        args.concurrency
    };
    let created: HashMap<String, Instant> = futures::stream::iter(0..n)
        .map(|i| {
            let jobs = jobs.clone();
            async move {
                if let Some(rate) = rate {
                    tokio::time::sleep_until(clock + Duration::from_secs_f64(i as f64 / rate))
                        .await;
                }
                let j = job(i);
                let name = j.metadata.name.clone().unwrap();
                let t = Instant::now();
                jobs.create(&PostParams::default(), &j).await.unwrap();
                (name, t)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let submitted = start.elapsed();
    let mut first_pod: HashMap<String, Instant> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_seconds);
    let mut peak_rss = 0u64;
    // Pods may have come in while submitting: drain them first.
    while let Ok((job, at)) = rx.try_recv() {
        first_pod.entry(job).or_insert(at);
    }
    while first_pod.len() < n {
        tokio::select! {
            Some((job, at)) = rx.recv() => { first_pod.entry(job).or_insert(at); }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        peak_rss = peak_rss.max(vm_hwm_kib(pid).unwrap_or(0));
        if tokio::time::Instant::now() > deadline {
            break;
        }
    }
    let elapsed = start.elapsed();
    peak_rss = peak_rss.max(vm_hwm_kib(pid).unwrap_or(0));
    let requests_per_job = args.audit.then(|| {
        sim.audit().disable();
        let mut counts: BTreeMap<String, f64> = BTreeMap::new();
        for r in sim.audit().snapshot() {
            *counts
                .entry(format!("{} {}", r.verb, r.rbac_resource()))
                .or_default() += 1.0;
        }
        let total: f64 = counts.values().sum();
        counts.insert("total".into(), total);
        counts.values_mut().for_each(|c| *c /= n.max(1) as f64);
        counts
    });
    let mut latencies: Vec<f64> = first_pod
        .iter()
        .filter_map(|(j, at)| {
            created
                .get(j)
                .map(|c| at.saturating_duration_since(*c).as_secs_f64())
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let _ = child.kill().await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    PhaseResult {
        jobs: n,
        jobs_with_pod: first_pod.len(),
        submit_seconds: submitted.as_secs_f64(),
        admission_seconds: elapsed.as_secs_f64(),
        latencies,
        peak_rss_kib: peak_rss,
        requests_per_job,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let burst = run_phase(&args, args.jobs, None).await;
    let mut report = serde_json::json!({
        "jobs": burst.jobs,
        "gpus": REGIONS.len() * POOLS_PER_REGION * NODES_PER_POOL * GPUS_PER_NODE,
        "regions": REGIONS.len(),
        "jobs_with_pod": burst.jobs_with_pod,
        "submit_seconds": burst.submit_seconds,
        "admission_seconds": burst.admission_seconds,
        "throughput_jobs_per_s": burst.throughput(),
        "p50_latency_seconds": percentile(&burst.latencies, 0.5),
        "p99_latency_seconds": percentile(&burst.latencies, 0.99),
        "operator_peak_rss_mib": burst.peak_rss_kib as f64 / 1024.0,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "machine_threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    if let Some(r) = &burst.requests_per_job {
        report["requests_per_job"] = serde_json::json!(r);
    }
    if args.rate > 0.0 && args.paced_jobs > 0 {
        let paced = run_phase(&args, args.paced_jobs, Some(args.rate)).await;
        report["paced"] = serde_json::json!({
            "rate_per_s": args.rate,
            "jobs": paced.jobs,
            "jobs_with_pod": paced.jobs_with_pod,
            "submit_seconds": paced.submit_seconds,
            "admission_seconds": paced.admission_seconds,
            "p50_latency_seconds": percentile(&paced.latencies, 0.5),
            "p99_latency_seconds": percentile(&paced.latencies, 0.99),
            "max_latency_seconds": paced.latencies.last().copied().unwrap_or(f64::NAN),
            "operator_peak_rss_mib": paced.peak_rss_kib as f64 / 1024.0,
        });
    }
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{text}\n"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}
