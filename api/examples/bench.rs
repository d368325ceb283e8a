//! Benchmark: webhook-to-CR throughput and latency of draft orders against kube-sim (with a
//! real SeaweedFS holding each draft and the dataset it validates) and Stripe signature verification cost (retention
//! and erasure are the operator's: see `operator-bench`), the answer to a webhook stuffed
//! with 100,000 signatures, and, with the notifier running as in production, the same load
//! again and the lag from a job's event to the storefront's receipt of its notification. Prints one JSON object (and writes it to `--json PATH`); no assertions:
//! the goals are in the report for a human or a CI script to compare.
//!
//! `cargo run --release -p loraplane-api --example bench -- [ORDERS] [CONCURRENCY] [--low-concurrency N] [--json PATH]`
//!
//! Everything runs on this machine: the API, kube-sim and the load generator share one tokio
//! runtime (one worker per hardware thread), SeaweedFS is its own process. The API logs as in
//! production (JSON lines at `info`), into a sink.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::http::{Method, Request};
use clap::Parser;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use kube::Api;
use kube::api::ListParams;
use loraplane_crds::v1alpha1::LoRATrainingJob;
use loraplane_dataset::testing::dataset;
use serde_json::json;
use stripe_sim::storefront::Storefront;

// glibc malloc was about a quarter of the CPU under load (perf); mimalloc is a drop-in.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Orders to send through the webhook.
    #[arg(default_value_t = 2000)]
    orders: usize,
    /// Orders in flight at once (one keep-alive connection each, as a webhook sender's pool).
    #[arg(default_value_t = 32)]
    concurrency: usize,
    /// A second, lower concurrency to measure the same orders at (0: skip), so the report can
    /// tell queueing (latency ≈ concurrency / throughput, Little's law) from service time.
    #[arg(long, default_value_t = 8)]
    low_concurrency: usize,
    /// Also write the report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// Mean cost of `verify` on a realistic 2 KiB event, in microseconds.
fn signature_verify_us() -> f64 {
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
    start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

/// A webhook whose Stripe-Signature carries 100,000 `v1=` entries (7 MB of header), sent raw
/// over TCP `rounds` times: the status line the API answers with (or how the connection
/// ended) and the milliseconds from the request's first byte to the answer.
async fn stuffed_webhook(base: &str, rounds: usize) -> (Vec<String>, Vec<f64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://").to_string();
    let body = br#"{"id":"evt_x","type":"charge.refunded"}"#;
    let mut header = format!("t={}", now());
    for _ in 0..100_000 {
        header.push_str(",v1=");
        header.push_str(&"0".repeat(64));
    }
    let request = format!(
        "POST /v1/webhooks/stripe HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\nstripe-signature: {header}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let (mut answers, mut ms) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let start = Instant::now();
        let (mut rd, mut wr) = conn.split();
        // The server may answer and close before the client has written everything: the
        // write's error is expected, the answer is what counts.
        let write = async {
            let _ = wr.write_all(request.as_bytes()).await;
            let _ = wr.write_all(body).await;
        };
        let read = async {
            let mut first = [0u8; 64];
            let n = rd.read(&mut first).await.unwrap_or(0);
            (
                String::from_utf8_lossy(&first[..n])
                    .lines()
                    .next()
                    .unwrap_or("closed")
                    .to_string(),
                start.elapsed(),
            )
        };
        let (_, (status, took)) = tokio::join!(write, read);
        answers.push(if status.is_empty() {
            "closed".into()
        } else {
            status
        });
        ms.push(took.as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    answers.sort();
    answers.dedup();
    (answers, ms)
}

/// CPU seconds used so far by a process (Linux `/proc`, in USER_HZ = 100 ticks).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds of this process (API, kube-sim and load generator) and of its children
/// (SeaweedFS).
fn cpu_now() -> (f64, f64) {
    let me = std::process::id();
    let mut children = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
            if rest.split_whitespace().nth(1) == Some(me.to_string().as_str()) {
                children += cpu_seconds(pid);
            }
        }
    }
    (cpu_seconds(me), children)
}

/// One keep-alive HTTP/1.1 connection to the API.
async fn connect(base: &str) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let addr = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// One order's upload id and, when the storefront carries it, the dataset check's receipt.
/// One upload backs one order only, so every order of the bench has its own.
type Upload = (String, Option<String>);

/// Uploads for orders `first..first + n` that carry a receipt: the receipt vouches for the
/// dataset, so these orders make no S3 request and the objects need not exist.
fn receipted_uploads(h: &Harness, region: &str, sha: &str, first: usize, n: usize) -> Vec<Upload> {
    (first..first + n)
        .map(|i| {
            let id = format!("{region}.{:032x}", i);
            let receipt = h.app.dataset_receipt("orders", &id, sha);
            (id, Some(receipt))
        })
        .collect()
}

/// Uploads for orders `first..first + n` without a receipt: each is a real object carrying the
/// validation marker a passed check leaves, which the order reads.
async fn marked_uploads(
    h: &Harness,
    region: &str,
    zip: &[u8],
    sha: &str,
    first: usize,
    n: usize,
) -> Vec<Upload> {
    let bucket = h
        .app
        .platform
        .region(region)
        .unwrap()
        .buckets
        .datasets
        .clone();
    let marker = loraplane_api::dataset_check::marker(h.app.dataset_rules(), sha);
    let mut out = Vec::new();
    for i in first..first + n {
        let token = format!("{:032x}", i);
        let key = loraplane_crds::layout::upload_key("orders", &token);
        h.put(&bucket, &key, zip).await;
        h.app
            .storage
            .set_validation_marker(region, &bucket, &key, &marker)
            .await
            .unwrap();
        out.push((format!("{region}.{token}"), None));
    }
    out
}

/// Records a draft order for each upload (with its receipt when it has one), `concurrency` at
/// a time, as the storefront does before checkout; returns the drafts' ids.
async fn drafts(h: &Harness, uploads: Vec<Upload>, concurrency: usize) -> Vec<String> {
    use futures::StreamExt;
    futures::stream::iter(uploads)
        .map(|(upload, receipt)| async move {
            let order = json!({"family": "sdxl", "conceptType": "character", "triggerWord": "zxq",
                "description": "my grey cat", "plan": "basic", "residency": "eea",
                "uploadId": upload, "datasetReceipt": receipt});
            let key = format!("cart-{upload}");
            let (s, _, v) = h
                .call(
                    "POST",
                    "/v1/orders",
                    Some(STOREFRONT),
                    &[("idempotency-key", &key)],
                    Some(order),
                )
                .await;
            assert!(s.is_success(), "{v}");
            v["orderId"].as_str().unwrap().to_string()
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Sends `orders` signed checkout completions (sessions numbered from `first`, order `i` paying
/// draft `drafts[i - first]` at the plan's price) over `concurrency` connections; returns the
/// sorted latencies (ms) of the orders answered `created`, the failures, and the wall time (s).
async fn webhook_load(
    h: &Harness,
    drafts: Vec<String>,
    first: usize,
    concurrency: usize,
) -> (Vec<f64>, usize, f64) {
    let (lat, failed, wall, _) = webhook_load_timed(h, drafts, first, concurrency).await;
    (lat, failed, wall)
}

/// [`webhook_load`], also returning when each created order was answered, by job name.
async fn webhook_load_timed(
    h: &Harness,
    drafts: Vec<String>,
    first: usize,
    concurrency: usize,
) -> (Vec<f64>, usize, f64, HashMap<String, Instant>) {
    let orders = drafts.len();
    let drafts = Arc::new(drafts);
    let next = Arc::new(AtomicUsize::new(first));
    let end = first + orders;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let base = h.base.clone();
        let drafts = drafts.clone();
        workers.push(tokio::spawn(async move {
            let mut conn = connect(&base).await;
            let mut lat = Vec::new();
            let mut answered = Vec::new();
            let mut failed = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return (lat, failed, answered);
                }
                let ev = paid_draft(
                    &format!("cs_bench_{i}"),
                    &format!("pi_bench_{i}"),
                    &drafts[i - first],
                    1900,
                    "eur",
                );
                let body = serde_json::to_vec(&ev).unwrap();
                let sig = loraplane_api::stripe::header(WEBHOOK_SECRET, now(), &body);
                let req = Request::builder()
                    .method(Method::POST)
                    .uri("/v1/webhooks/stripe")
                    .header("host", base.trim_start_matches("http://"))
                    .header("stripe-signature", sig)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let t0 = Instant::now();
                conn.ready().await.unwrap();
                let resp = conn.send_request(req).await.unwrap();
                let ok = resp.status().is_success();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                let ack: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                if ok && ack["outcome"] == "created" {
                    lat.push(ms);
                    answered.push((i, Instant::now()));
                } else {
                    failed += 1;
                }
            }
        }));
    }
    let mut lat = Vec::new();
    let mut failed = 0;
    let mut at = HashMap::new();
    for w in workers {
        let (l, f, a) = w.await.unwrap();
        lat.extend(l);
        failed += f;
        at.extend(a.into_iter().map(|(i, t)| (job_of(i), t)));
    }
    let wall = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat, failed, wall, at)
}

/// The job the bench's checkout number `i` becomes.
fn job_of(i: usize) -> String {
    let hash = loraplane_api::order::hash_id(b"test-id-key", "session", &format!("cs_bench_{i}"));
    loraplane_api::order::job_name(&hash)
}

/// Milliseconds from `since[job]` to the storefront's receipt of that job's `kind` event.
fn lags(store: &Storefront, kind: &str, since: &HashMap<String, Instant>) -> Vec<f64> {
    // The first receipt of each job's event (a redelivery is not a lag).
    let mut first: HashMap<String, Instant> = HashMap::new();
    for (t, e) in store.timed().into_iter().filter(|(_, e)| e["type"] == kind) {
        if let Some(job) = e["data"]["object"]["id"].as_str() {
            first.entry(job.to_string()).or_insert(t);
        }
    }
    let mut out: Vec<f64> = first
        .iter()
        .filter_map(|(job, t)| {
            let from = since.get(job)?;
            Some(t.saturating_duration_since(*from).as_secs_f64() * 1000.0)
        })
        .collect();
    out.sort_by(|a, b| a.total_cmp(b));
    out
}

/// Waits until the storefront holds `kind` events of `n` distinct jobs (at most `secs`).
async fn until_told(store: &Storefront, kind: &str, n: usize, secs: u64) -> bool {
    let deadline = Instant::now() + std::time::Duration::from_secs(secs);
    while Instant::now() < deadline {
        let jobs: std::collections::HashSet<String> = store
            .events()
            .iter()
            .filter(|e| e["type"] == kind)
            .filter_map(|e| e["data"]["object"]["id"].as_str().map(str::to_string))
            .collect();
        if jobs.len() >= n {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// The Kubernetes part of an order alone, with no API in between: the same four requests (two
/// tombstone lookups, the upload's claim, the create) straight from a `kube::Client`, so the
/// report can tell the API's own cost from the apiserver's (kube-sim runs in this process).
async fn kube_only(h: &Harness, orders: usize, concurrency: usize) -> f64 {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::ConfigMap;
    let jobs: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "orders");
    let template = jobs
        .list(&ListParams::default().limit(1))
        .await
        .unwrap()
        .items
        .remove(0);
    let next = Arc::new(AtomicUsize::new(0));
    let (cpu0, _) = cpu_now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let jobs = jobs.clone();
        let cms: Api<ConfigMap> = Api::namespaced(h.sim.client(), "orders");
        let leases: Api<Lease> = Api::namespaced(h.sim.client(), "orders");
        let spec = template.spec.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= orders {
                    return;
                }
                // The API's tombstone look-up, before and after the create.
                let selector = format!("loraplane.io/tombstone-of in (p{i},o{i})");
                for _ in 0..2 {
                    let _ = cms.list(&ListParams::default().labels(&selector)).await;
                }
                let claim = format!("ltj-upload-kube-only-{i}");
                let lease: Lease = serde_json::from_value(json!({
                    "metadata": {"name": claim}, "spec": {"holderIdentity": format!("o{i}")}
                }))
                .unwrap();
                leases.create(&Default::default(), &lease).await.unwrap();
                let job = LoRATrainingJob::new(&format!("ltj-kube-only-{i}"), spec.clone());
                jobs.create(&Default::default(), &job).await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let (cpu1, _) = cpu_now();
    (cpu1 - cpu0) * 1000.0 / orders.max(1) as f64
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // Production logging cost (one JSON line per request and per event), written nowhere.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,kube_sim=warn"))
        .with_writer(std::io::sink)
        .json()
        .flatten_event(true)
        .init();
    let verify_us = signature_verify_us();

    // The storefront tenant has a notification endpoint; the notifier starts after the runs
    // measured without it (below), so both are measured in one process.
    let store = Storefront::start(NOTIFY_SECRET).await.unwrap();
    let url = store.url();
    let h = Harness::start_with(|c| {
        c.limits.tenant_rps = 1e9;
        c.limits.ip_rps = 1e9;
        let t = c
            .tenants
            .iter_mut()
            .find(|t| t.name == "storefront")
            .unwrap();
        t.notifications = Some(loraplane_api::config::TenantNotifications {
            url,
            secret_env: "STOREFRONT_NOTIFY_SECRET".into(),
        });
    })
    .await;
    // The storefront uploads and validates the dataset, then records the draft order (with
    // the check's receipt), as in production; the checkout carries only the draft's id. The
    // webhook reads the draft (one S3 GET); drafts with the receipt need no other S3 request,
    // drafts without read the marker the check left on the object.
    let (stuffed_answers, stuffed_ms) = stuffed_webhook(&h.base, 20).await;
    let zip = dataset(8);
    let upload = h.upload(STOREFRONT, "eea", zip.clone()).await;
    let t0 = Instant::now();
    let (s, _, v) = h
        .call(
            "POST",
            &format!("/v1/uploads/{upload}/validate"),
            Some(STOREFRONT),
            &[],
            None,
        )
        .await;
    assert!(s.is_success(), "{v}");
    let first_check_ms = t0.elapsed().as_secs_f64() * 1000.0;
    assert!(
        v["receipt"].is_string(),
        "the dataset check returns a receipt: {v}"
    );
    let sha = v["sha256"]
        .as_str()
        .expect("the check returns the SHA-256")
        .to_string();
    let region = upload.split_once('.').unwrap().0.to_string();

    // A short warm-up (connections, allocator, kube-sim's first writes), not measured.
    let warm = args.concurrency * 4;
    let n = args.orders;
    let c = args.concurrency;
    let warm_drafts = drafts(&h, receipted_uploads(&h, &region, &sha, 0, warm), c).await;
    let _ = webhook_load(&h, warm_drafts, 0, c).await;
    let t_drafts = Instant::now();
    let measured = drafts(&h, receipted_uploads(&h, &region, &sha, warm, n), c).await;
    let drafts_per_s = n as f64 / t_drafts.elapsed().as_secs_f64();
    h.sim.audit().enable();
    let cpu0 = cpu_now();
    let (lat, failed, wall) = webhook_load(&h, measured, warm, c).await;
    let cpu1 = cpu_now();
    h.sim.audit().disable();
    let per_order_ms = |a: f64, b: f64| round((b - a) * 1000.0 / args.orders.max(1) as f64, 3);
    let cpu_self_ms = per_order_ms(cpu0.0, cpu1.0);
    let cpu_weed_ms = per_order_ms(cpu0.1, cpu1.1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kube_requests = h.sim.audit().snapshot().len();

    // The same load at a lower concurrency, after the measured run so its figures stay
    // comparable with earlier reports.
    let low = (args.low_concurrency > 0).then_some(args.low_concurrency);
    let low_run = match low {
        Some(c) => {
            let uploads = receipted_uploads(&h, &region, &sha, warm + n, n);
            let ds = drafts(&h, uploads, args.concurrency).await;
            Some(webhook_load(&h, ds, warm + n, c).await)
        }
        None => None,
    };
    // Drafts that carry no receipt: their checkouts read the validation marker from SeaweedFS.
    let marked = marked_uploads(&h, &region, &zip, &sha, warm + 2 * n, n).await;
    let marked = drafts(&h, marked, c).await;
    let cpu2 = cpu_now();
    let (mlat, mfailed, mwall) = webhook_load(&h, marked, warm + 2 * n, c).await;
    let cpu3 = cpu_now();
    let marker_tput = args.orders as f64 / mwall;

    let kube_only_ms = kube_only(&h, args.orders, args.concurrency).await;

    // With the notifier running, as `loraplane-api` runs it: first it tells the storefront
    // about every job made so far (a backlog, not measured), then the same load again, each
    // order's `job.accepted` timed from the webhook's answer to the storefront's receipt.
    // Jobs so far (the warm-up, the measured runs and `kube_only`'s): all are told.
    let orders_ns: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "orders");
    let backlog = orders_ns
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    // Checkout numbers go on after the marker run's.
    let before = warm + 3 * n;
    let notifier = h.notifier("api-bench");
    let backlog_t = Instant::now();
    let drained = until_told(&store, "job.accepted", backlog, 600).await;
    let backlog_s = backlog_t.elapsed().as_secs_f64();
    let uploads = receipted_uploads(&h, &region, &sha, before, n);
    let ds = drafts(&h, uploads, c).await;
    let cpu4 = cpu_now();
    let (nlat, nfailed, nwall, answered) = webhook_load_timed(&h, ds, before, c).await;
    let cpu5 = cpu_now();
    let told_all = until_told(&store, "job.accepted", backlog + n, 600).await;
    let accepted_lag = lags(&store, "job.accepted", &answered);
    // A status change (the operator's `Running`) told to the storefront: 200 jobs, at 20 per
    // second, each timed from its status write to the storefront's receipt.
    let jobs: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "orders");
    let mut written = HashMap::new();
    let changes = 200.min(n);
    for i in before..before + changes {
        let name = job_of(i);
        let patch = json!({"apiVersion": "loraplane.io/v1alpha1", "kind": "LoRATrainingJob",
            "status": {"phase": "Running", "attempts": [{"region": "eu-west", "pool": "p", "node": "n"}]}});
        written.insert(name.clone(), Instant::now());
        jobs.patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(patch),
        )
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let running_told = until_told(&store, "job.running", changes, 120).await;
    let running_lag = lags(&store, "job.running", &written);
    notifier.abort();
    // At least once: events the storefront got more than once.
    let accepted: Vec<String> = store
        .events()
        .iter()
        .filter(|e| e["type"] == "job.accepted")
        .filter_map(|e| e["data"]["object"]["id"].as_str().map(str::to_string))
        .collect();
    let distinct: std::collections::HashSet<&String> = accepted.iter().collect();
    let redelivered = accepted.len() - distinct.len();

    let throughput = args.orders as f64 / wall;
    // Little's law: with `concurrency` orders always in flight, the mean latency is
    // concurrency / throughput; when it matches the measured p50, the latency is queueing.
    let littles_mean_ms = |c: usize, tput: f64| round(c as f64 * 1000.0 / tput.max(1e-9), 2);
    let low_report = match (low, &low_run) {
        (Some(c), Some((l, f, w))) => {
            let tput = args.orders as f64 / w;
            json!({
                "orders": args.orders,
                "concurrency": c,
                "created": l.len(),
                "failed": f,
                "throughput_orders_per_s": round(tput, 1),
                "latency_ms": {"p50": round(pct(l, 0.5), 2), "p99": round(pct(l, 0.99), 2), "max": round(pct(l, 1.0), 2)},
                "littles_law_mean_latency_ms": littles_mean_ms(c, tput),
            })
        }
        _ => serde_json::Value::Null,
    };
    let report = json!({
        "profile": if cfg!(debug_assertions) { "debug (dependencies at opt-level 3)" } else { "release" },
        "machine_threads": threads,
        "load_average_1m": std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().and_then(|v| v.parse::<f64>().ok())),
        "webhook_to_cr": {
            "orders": args.orders,
            "concurrency": args.concurrency,
            "created": lat.len(),
            "failed": failed,
            "throughput_orders_per_s": round(throughput, 1),
            "littles_law_mean_latency_ms": littles_mean_ms(args.concurrency, throughput),
            "latency_ms": {"p50": round(pct(&lat, 0.5), 2), "p99": round(pct(&lat, 0.99), 2), "max": round(pct(&lat, 1.0), 2)},
            "cpu_ms_per_order": {"api_kube_sim_and_load_generator": cpu_self_ms, "seaweedfs": cpu_weed_ms,
                "of_which_kube_client_and_kube_sim": round(kube_only_ms, 3)},
            "cpu_bound_orders_per_s": round(threads as f64 * 1000.0 / (cpu_self_ms + cpu_weed_ms).max(1e-9), 0),
            "kube_requests_per_order": round(kube_requests as f64 / args.orders.max(1) as f64, 2),
            "goal": {"throughput_orders_per_s": 2000, "p99_ms": 50}
        },
        "webhook_to_cr_low_concurrency": low_report,
        "webhook_to_cr_with_notifier": {
            "orders": args.orders,
            "concurrency": args.concurrency,
            "created": nlat.len(),
            "failed": nfailed,
            "throughput_orders_per_s": round(args.orders as f64 / nwall, 1),
            "latency_ms": {"p50": round(pct(&nlat, 0.5), 2), "p99": round(pct(&nlat, 0.99), 2), "max": round(pct(&nlat, 1.0), 2)},
            "cpu_ms_per_order": {"api_kube_sim_and_load_generator": per_order_ms(cpu4.0, cpu5.0), "seaweedfs": per_order_ms(cpu4.1, cpu5.1)},
            "backlog_jobs_told": backlog,
            "backlog_drained": drained,
            "backlog_seconds": round(backlog_s, 2),
        },
        "notification_lag_ms": {
            "job_accepted_after_webhook_answer": {"events": accepted_lag.len(), "all_told": told_all,
                "redelivered": redelivered,
                "p50": round(pct(&accepted_lag, 0.5), 1), "p99": round(pct(&accepted_lag, 0.99), 1), "max": round(pct(&accepted_lag, 1.0), 1),
                "note": "under the load above: 32 checkouts in flight"},
            "job_running_after_status_write": {"events": running_lag.len(), "all_told": running_told,
                "p50": round(pct(&running_lag, 0.5), 1), "p99": round(pct(&running_lag, 0.99), 1), "max": round(pct(&running_lag, 1.0), 1),
                "note": "20 status changes per second, nothing else running"},
        },
        "webhook_to_cr_without_receipt": {
            "orders": args.orders,
            "concurrency": args.concurrency,
            "created": mlat.len(),
            "failed": mfailed,
            "throughput_orders_per_s": round(marker_tput, 1),
            "latency_ms": {"p50": round(pct(&mlat, 0.5), 2), "p99": round(pct(&mlat, 0.99), 2), "max": round(pct(&mlat, 1.0), 2)},
            "cpu_ms_per_order": {"api_kube_sim_and_load_generator": per_order_ms(cpu2.0, cpu3.0), "seaweedfs": per_order_ms(cpu2.1, cpu3.1)},
        },
        "drafts_recorded_per_s": round(drafts_per_s, 1),
        "first_dataset_check_ms": round(first_check_ms, 2),
        "signature_verify_us": round(verify_us, 2),
        "stuffed_signature_webhook": {
            "v1_entries": 100_000,
            "answers": stuffed_answers,
            "ms": {"p50": round(pct(&stuffed_ms, 0.5), 2), "max": round(pct(&stuffed_ms, 1.0), 2)},
            "goal_ms": 50
        },
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{text}\n")).unwrap();
    }
}
