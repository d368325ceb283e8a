//! Benchmark: webhook-to-CR throughput and latency against kube-sim (with a real SeaweedFS
//! holding the dataset each order validates), Stripe signature verification cost, and
//! retention GC lag. Prints one JSON object; no assertions (goals are compared by a human or CI
//! script, never inside tests).
//!
//! `cargo run --release -p loraplane-api --example bench -- [ORDERS] [CONCURRENCY] [GC_JOBS]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kube::Api;
use kube::api::{Patch, PatchParams};
use loraplane_api::leader::Leader;
use loraplane_api::zipcheck::testing::dataset;
use loraplane_crds::v1alpha1::LoRATrainingJob;
use serde_json::json;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let orders = args.first().copied().unwrap_or(1000);
    let concurrency = args.get(1).copied().unwrap_or(32);
    let gc_jobs = args.get(2).copied().unwrap_or(50);

    // Signature verification cost on a realistic 2 KiB event.
    let body = vec![b'x'; 2048];
    let secrets = vec![WEBHOOK_SECRET.to_vec()];
    let t = now();
    let header = loraplane_api::stripe::header(WEBHOOK_SECRET, t, &body);
    let n = 20_000;
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(loraplane_api::stripe::verify(
            Some(&header),
            &body,
            &secrets,
            t,
            300,
        ))
        .ok();
    }
    let verify_ns = start.elapsed().as_nanos() as f64 / n as f64;

    let h = Arc::new(
        Harness::start_with(|c| {
            c.limits.tenant_rps = 1e9;
            c.limits.ip_rps = 1e9;
        })
        .await,
    );
    let upload = h.upload(STOREFRONT, "eea", dataset(8)).await;

    // Webhook to CR: each request returns after the CR is stored.
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..orders {
        let h = h.clone();
        let upload = upload.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let ev = paid_event(
                &format!("cs_bench_{i}"),
                &format!("pi_bench_{i}"),
                &upload,
                "basic",
            );
            let t0 = Instant::now();
            let (s, ack) = h.webhook(&ev, now(), WEBHOOK_SECRET).await;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            (s.is_success() && ack["outcome"] == "created", ms)
        }));
    }
    let mut lat = Vec::new();
    let mut ok = 0usize;
    for t in tasks {
        let (good, ms) = t.await.unwrap();
        ok += usize::from(good);
        lat.push(ms);
    }
    let wall = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));

    // GC lag: jobs whose inputs and outputs fall due 1 s and 2 s after completion.
    let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "acme");
    let gc_upload = h.upload(ACME, "eea", dataset(2)).await;
    let mut ids = Vec::new();
    for i in 0..gc_jobs {
        let order = json!({"orderId": format!("gc-{i}"), "family": "sdxl", "conceptType": "object",
            "triggerWord": "mug", "plan": "fast", "uploadId": gc_upload});
        let (_, _, job) = h
            .call(
                "POST",
                "/v1/jobs",
                Some(ACME),
                &[("idempotency-key", &format!("gc-{i}"))],
                Some(order),
            )
            .await;
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let leader = Arc::new(Leader::new(
        h.sim.client(),
        "loraplane-system",
        "gc",
        "bench",
        Duration::from_secs(15),
    ));
    leader.try_acquire().await;
    tokio::spawn(loraplane_api::app::retention_loop(
        h.app.clone(),
        leader,
        Duration::from_secs(30),
    ));
    tokio::spawn(loraplane_api::app::watch_jobs(h.app.clone()));
    let completed = k8s_openapi::jiff::Timestamp::now();
    for id in &ids {
        api.patch_status(
            id,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
            "phase": "Succeeded", "completionTime": completed.to_string()}})),
        )
        .await
        .unwrap();
    }
    // Due times are whole seconds (the CRD's time format); lag is measured from them.
    let out_due = completed.as_second() + 2;
    let mut lags = Vec::new();
    let mut pending: Vec<String> = ids.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for id in pending {
            let j = api.get(&id).await.unwrap();
            let done = j
                .status
                .as_ref()
                .and_then(|s| s.retention.as_ref())
                .is_some_and(|r| r.outputs_deleted_at.is_some());
            if done {
                let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
                lags.push(((now_ms - out_due * 1000).max(0) as f64) / 1000.0);
            } else {
                still.push(id);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lags.sort_by(|a, b| a.total_cmp(b));

    let report = json!({
        "webhook_to_cr": {
            "orders": orders, "concurrency": concurrency, "created": ok,
            "throughput_per_s": orders as f64 / wall,
            "latency_ms": {"p50": pct(&lat, 0.5), "p99": pct(&lat, 0.99), "max": pct(&lat, 1.0)},
            "goal": {"throughput_per_s": 2000, "p99_ms": 50}
        },
        "signature_verify_ns": verify_ns,
        "gc_lag_s": {"jobs": gc_jobs, "deleted": lags.len(), "p50": pct(&lags, 0.5), "p99": pct(&lags, 0.99),
            "note": "observed by polling every 50 ms, so it includes up to 0.05 s of observation delay", "goal_p99": 5},
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
