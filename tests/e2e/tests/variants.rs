//! Variants of the journey, each checked the way a customer or an auditor would: the job's
//! outcome, where it ran, and what data exists afterwards. Every test starts its own stack
//! (kube-sim, SeaweedFS, operator, API, real trainer) and trains a tiny model on the CPU.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use loraplane_crds::v1alpha1::Phase;
use loraplane_e2e::config::RetentionKnobs;
use loraplane_e2e::journey::{self, OrderSpec, Timeline, phase};
use loraplane_e2e::stack::{Stack, StackOptions};

fn report(name: &str, t0: Instant) {
    eprintln!("{name}: wall time {:.1} s", t0.elapsed().as_secs_f64());
}

async fn wait_settled_empty(stack: &Stack, placed: &journey::Placed) -> journey::Leftovers {
    // The operator deletes the job object last, once its pods have stopped and its data is
    // gone, and writes the audit record just before: wait for both, then look twice, a second
    // apart, so a late writer (a trainer outliving the sweep) would show.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = journey::leftovers(stack, placed).await.unwrap();
        if !left.job_exists && !left.audit_records.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job was not purged within 30 s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = journey::leftovers(stack, placed).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = journey::leftovers(stack, placed).await.unwrap();
    assert_eq!(first.objects, second.objects);
    assert!(second.pods.is_empty(), "{:?}", second.pods);
    assert!(
        !second.secret_exists,
        "the trainer-config Secret is deleted"
    );
    second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_retention_order_keeps_no_inputs_and_outputs_only_for_the_delivery_window() {
    let t0 = Instant::now();
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let mut tl = Timeline::new(true);
    let order = OrderSpec::new("zero", "zero", "sd15", "eea", 10);
    let placed = journey::place_order(&stack, &order, &mut tl).await.unwrap();
    let running = journey::wait_running(&stack, &placed.job, Duration::from_secs(60), &mut tl)
        .await
        .unwrap();
    // The scratch space is memory, not a disk claim.
    let pods = stack.pods_of(&placed.uid).await.unwrap();
    let work = pods[0].spec.as_ref().unwrap().volumes.as_ref().unwrap();
    let work = work.iter().find(|v| v.name == "work").unwrap();
    assert_eq!(
        work.empty_dir.as_ref().and_then(|e| e.medium.as_deref()),
        Some("Memory")
    );
    assert!(stack.claims_of(&placed.uid).await.unwrap().is_empty());
    assert_eq!(
        journey::jurisdiction(&journey::placement(&running).unwrap().0),
        "eea"
    );

    let done = journey::wait_succeeded(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    // Inputs are deleted at completion: by the time the customer downloads, the dataset and
    // checkpoints are gone and only the LoRA files remain.
    stack
        .wait_job(
            &placed.job,
            Duration::from_secs(20),
            "inputs deleted",
            |j| {
                j.status
                    .as_ref()
                    .and_then(|s| s.retention.as_ref())
                    .is_some_and(|r| r.inputs_deleted_at.is_some())
            },
        )
        .await
        .unwrap();
    let mid = journey::leftovers(&stack, &placed).await.unwrap();
    assert!(!mid.objects.is_empty());
    assert!(
        mid.objects.iter().all(|o| o.starts_with("outputs-")),
        "only outputs may remain: {:?}",
        mid.objects
    );
    let downloads = journey::download_loras(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    assert_eq!(
        downloads.len(),
        done.status.as_ref().unwrap().artifacts.len()
    );

    let record = journey::wait_retention(&stack, &placed, &mut tl)
        .await
        .unwrap();
    assert_eq!(record["reason"], "retention");
    let left = journey::leftovers(&stack, &placed).await.unwrap();
    assert!(left.objects.is_empty(), "{:?}", left.objects);
    assert!(left.claims.is_empty());
    assert!(!left.job_exists && !left.secret_exists && left.pods.is_empty());
    let gone = stack
        .api("GET", &format!("/v1/jobs/{}/artifacts", placed.job), None)
        .await
        .unwrap();
    assert_eq!(gone.status, 404);
    report("zero_retention", t0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_mid_training_stops_the_trainer_and_erases_the_order() {
    let t0 = Instant::now();
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let mut tl = Timeline::new(true);
    let order = OrderSpec::new("refund", "standard", "sdxl", "eea", 200);
    let placed = journey::place_order(&stack, &order, &mut tl).await.unwrap();
    journey::wait_running(&stack, &placed.job, Duration::from_secs(60), &mut tl)
        .await
        .unwrap();
    stack
        .wait_job(&placed.job, Duration::from_secs(90), "a checkpoint", |j| {
            journey::progress(j).2 > 0
        })
        .await
        .unwrap();
    let outcome = stack
        .webhook(&journey::refund_event(&order.payment_intent))
        .await
        .unwrap();
    assert_eq!(outcome, "erased");
    tl.note(
        "refund",
        "charge.refunded delivered: job cancelled and erased",
    );

    let left = wait_settled_empty(&stack, &placed).await;
    assert!(
        !left.job_exists,
        "the job (holding the customer's text) is deleted"
    );
    assert!(left.claims.is_empty(), "{:?}", left.claims);
    assert!(left.objects.is_empty(), "{:?}", left.objects);
    // The audit trail: the operator's record, without personal data.
    assert_eq!(left.audit_records.len(), 1);
    let rec = &left.audit_records[0];
    assert_eq!(rec["reason"], "refund");
    assert_eq!(rec["phase"], "Cancelled");
    assert!(rec.contains_key("erasureRequestedAt") && rec.contains_key("deletedAt"));
    let rec_text = serde_json::to_string(rec).unwrap();
    for private in [
        "zxqcat",
        "Mimi",
        "customer@example.com",
        &order.payment_intent,
        &placed.job,
    ] {
        assert!(!rec_text.contains(private), "{private} in {rec_text}");
    }
    // The customer's view: the job is gone, and a replayed checkout does not bring it back.
    let view = stack
        .api("GET", &format!("/v1/jobs/{}", placed.job), None)
        .await
        .unwrap();
    assert_eq!(view.status, 404);
    let upload2 = stack
        .upload_dataset("eea", loraplane_e2e::fixtures::dataset_zip(6).unwrap())
        .await
        .unwrap();
    // The same checkout again, on a new draft (a new cart) over a new upload.
    let receipt = stack.validate_upload(&upload2).await.unwrap();
    let draft = stack
        .draft_order(
            &journey::draft_order(&order, &upload2, &receipt),
            &format!("{}-again", order.session),
        )
        .await
        .unwrap();
    let replay = stack
        .webhook(&journey::paid_draft_event(&order, &draft))
        .await
        .unwrap();
    assert_eq!(replay, "revoked_first");
    assert!(stack.job(&placed.job).await.unwrap().is_none());
    report("refund", t0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_request_deletes_every_byte_and_keeps_an_audit_record() {
    let t0 = Instant::now();
    // Retention long enough that everything still exists when the customer asks for erasure.
    let stack = Stack::start(StackOptions {
        retention: RetentionKnobs {
            keep_inputs_seconds: 600,
            keep_outputs_seconds: 600,
            ..RetentionKnobs::default()
        },
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let mut tl = Timeline::new(true);
    let order = OrderSpec::new("erase", "standard", "sd15", "eea", 10);
    let placed = journey::place_order(&stack, &order, &mut tl).await.unwrap();
    journey::wait_succeeded(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    journey::download_loras(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    let before = journey::leftovers(&stack, &placed).await.unwrap();
    assert!(!before.objects.is_empty() && !before.claims.is_empty());

    let r = stack
        .api("DELETE", &format!("/v1/jobs/{}", placed.job), None)
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["erasureRequested"], true);
    tl.note("erasure", "DELETE /v1/jobs/{id} answered 202");

    let left = wait_settled_empty(&stack, &placed).await;
    assert!(!left.job_exists);
    assert!(left.claims.is_empty(), "{:?}", left.claims);
    assert!(left.objects.is_empty(), "{:?}", left.objects);
    assert_eq!(left.audit_records.len(), 1);
    let rec = &left.audit_records[0];
    assert_eq!(rec["reason"], "customerRequest");
    assert_eq!(rec["phase"], "Succeeded");
    let deleted: u64 = rec["objectsDeleted"].as_str().unwrap().parse().unwrap();
    assert!(
        deleted >= before.objects.len() as u64,
        "{rec:?} vs {:?}",
        before.objects
    );
    let links = stack
        .api("GET", &format!("/v1/jobs/{}/artifacts", placed.job), None)
        .await
        .unwrap();
    assert_eq!(links.status, 404);
    report("erasure", t0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn us_only_order_waits_for_us_capacity_and_never_goes_to_the_eea() {
    let t0 = Instant::now();
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let mut tl = Timeline::new(true);
    let mut hogs = stack.occupy_pool("us-east-l4").await.unwrap();
    hogs.extend(stack.occupy_pool("us-east-a10g-spot").await.unwrap());
    tl.note(
        "US region full",
        format!("{} GPUs taken by other work", hogs.len()),
    );

    let order = OrderSpec::new("us", "standard", "sd15", "us", 10);
    let placed = journey::place_order(&stack, &order, &mut tl).await.unwrap();
    assert!(
        placed.upload_id.starts_with("us-east."),
        "{}",
        placed.upload_id
    );
    // Long enough for the operator to give up on each US pool (4 s scheduling timeout) and
    // go round again: the job waits, and nothing of it ever appears outside the US.
    let watch_until = Instant::now() + Duration::from_secs(14);
    let mut pods_seen = std::collections::BTreeSet::new();
    while Instant::now() < watch_until {
        let job = stack.job(&placed.job).await.unwrap().unwrap();
        assert_ne!(phase(&job), Some(Phase::Running), "no US GPU is free");
        assert_ne!(phase(&job), Some(Phase::Failed));
        if let Some((region, ..)) = journey::placement(&job) {
            assert_eq!(region, "us-east");
        }
        for p in stack.pods_of(&placed.uid).await.unwrap() {
            let labels = p.metadata.labels.clone().unwrap_or_default();
            assert_eq!(
                labels.get("loraplane.io/region").map(String::as_str),
                Some("us-east"),
                "{labels:?}"
            );
            pods_seen.insert(p.metadata.name.unwrap_or_default());
        }
        for c in stack.claims_of(&placed.uid).await.unwrap() {
            assert!(c.metadata.name.unwrap_or_default().ends_with("us-east"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!pods_seen.is_empty(), "the operator tried the US pools");
    let waiting = stack.job(&placed.job).await.unwrap().unwrap();
    tl.note(
        "waiting",
        format!(
            "phase {:?}, {} pod(s) tried, all in us-east",
            phase(&waiting),
            pods_seen.len()
        ),
    );

    stack.free_gpu(&hogs[0]).await.unwrap();
    tl.note("capacity", "one US GPU freed");
    let done = journey::wait_succeeded(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    let attempts = journey::attempts(&done);
    assert!(!attempts.is_empty());
    assert!(
        attempts.iter().all(|a| a.region == "us-east"),
        "{attempts:?}"
    );
    let objs = stack
        .job_objects(&placed.job, &placed.uid, Some(&placed.dataset_key))
        .await
        .unwrap();
    assert!(!objs.is_empty());
    assert!(objs.iter().all(|o| o.contains("-us-east/")), "{objs:?}");
    report("us_full", t0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restart_during_training_creates_no_duplicate_pod() {
    let t0 = Instant::now();
    let mut stack = Stack::start(StackOptions::default()).await.unwrap();
    let mut tl = Timeline::new(true);
    let order = OrderSpec::new("oprestart", "standard", "sd15", "eea", 30);
    let placed = journey::place_order(&stack, &order, &mut tl).await.unwrap();
    journey::wait_running(&stack, &placed.job, Duration::from_secs(60), &mut tl)
        .await
        .unwrap();
    stack
        .wait_job(&placed.job, Duration::from_secs(90), "some progress", |j| {
            journey::progress(j).0 > 0
        })
        .await
        .unwrap();
    let old = stack.operator_identity().unwrap().to_string();
    stack.stop_operator().await.unwrap();
    tl.note("operator stopped", old);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.start_operator();
    tl.note(
        "operator started",
        stack.operator_identity().unwrap().to_string(),
    );
    let done = journey::wait_succeeded(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    assert_eq!(
        journey::attempts(&done).len(),
        1,
        "{:?}",
        journey::attempts(&done)
    );
    // One attempt is one pod (pods are named per attempt); finished, it is released.
    let pods = stack.pods_of(&placed.uid).await.unwrap();
    assert!(pods.len() <= 1, "one pod for the whole job: {}", pods.len());
    journey::download_loras(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    report("operator_restart", t0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_replica_crash_loses_no_order_and_retention_still_runs() {
    let t0 = Instant::now();
    let mut stack = Stack::start(StackOptions {
        api_replicas: 2,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let mut tl = Timeline::new(true);
    let order = OrderSpec::new("apicrash", "standard", "sd15", "eea", 10);
    let placed = journey::place_order(&stack, &order, &mut tl).await.unwrap();
    let killed = stack.kill_api().unwrap();
    tl.note(
        "API replica crashed",
        format!(
            "{killed}; {} keeps serving",
            stack.api_identities().join(", ")
        ),
    );
    // The surviving replica sees the order and serves the download; retention is the
    // operator's and goes on regardless.
    let view = stack
        .api("GET", &format!("/v1/jobs/{}", placed.job), None)
        .await
        .unwrap();
    assert_eq!(view.status, 200);
    journey::wait_succeeded(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    journey::download_loras(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    journey::wait_retention(&stack, &placed, &mut tl)
        .await
        .unwrap();
    let left = journey::leftovers(&stack, &placed).await.unwrap();
    assert!(left.objects.is_empty(), "{:?}", left.objects);
    assert!(left.claims.is_empty());
    assert!(!left.job_exists);
    report("api_replica_crash", t0);
    stack.shutdown().await;
}

/// A FLUX.1 order (the tiny dev pipeline diffusers made) goes the whole way: the API sells it
/// because the platform states a commercial licence, the operator places it only on a pool
/// with the family's 40 GiB, the real trainer trains it with flow matching and renders the
/// plan's samples, and the customer downloads both files: Black Forest Labs' module names with fused q/k/v in the kohya file,
/// `transformer.` keys in the diffusers one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux1_order_trains_on_a_large_gpu_and_delivers_both_files() {
    let t0 = Instant::now();
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let mut tl = Timeline::new(true);
    let order = OrderSpec::new("flux", "standard", "flux1", "eea", 4);
    let placed = journey::place_order(&stack, &order, &mut tl).await.unwrap();
    let done = journey::wait_succeeded(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    let (_, pool, _) = journey::placement(&done).unwrap();
    assert!(
        pool.contains("a100"),
        "FLUX.1 ran on {pool}, a pool under 40 GiB"
    );
    // The plan's samples, rendered with flow-matching Euler: the base set and the last at least.
    let samples = &done.status.as_ref().unwrap().samples;
    assert!(
        samples.iter().any(|s| s.step == 0) && samples.iter().any(|s| s.step == 4),
        "{samples:?}"
    );
    let downloads = journey::download_loras(&stack, &placed.job, &mut tl)
        .await
        .unwrap();
    assert_eq!(downloads.len(), 2);
    let kohya = downloads.iter().find(|d| d.format == "kohya").unwrap();
    assert_eq!(kohya.facts.base_model_version.as_deref(), Some("flux1"));
    assert!(
        kohya
            .facts
            .names
            .iter()
            .any(|n| n == "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"),
        "{:?}",
        kohya.facts.names
    );
    let peft = downloads.iter().find(|d| d.format != "kohya").unwrap();
    assert!(
        peft.facts
            .names
            .iter()
            .all(|n| n.starts_with("transformer."))
    );
    report("flux1", t0);
    stack.shutdown().await;
}
