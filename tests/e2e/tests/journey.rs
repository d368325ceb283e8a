//! The customer's main journey through the whole stack: a draft order and a signed Stripe
//! checkout that carries only its id, for an EEA-only SDXL order, the dataset uploaded through the API, the job placed in the EEA, the
//! real trainer running on the CPU, a spot preemption mid-training, the resume in the other EEA
//! region from the checkpoint, the LoRA downloaded through a presigned URL and checked, and
//! retention deleting every byte while the audit record stays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use loraplane_e2e::journey::{self, OrderSpec, Timeline};
use loraplane_e2e::stack::{Stack, StackOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eea_order_survives_spot_preemption_and_leaves_nothing_after_retention() {
    let t0 = Instant::now();
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let mut tl = Timeline::new(true);
    let order = OrderSpec::new("journey", "standard", "sdxl", "eea", 20);
    let report = journey::happy_journey(&stack, &order, &mut tl)
        .await
        .unwrap();

    // Where it ran: first on eu-west's spot node until it was preempted, last in eu-central
    // (the other EEA region), resumed from a checkpoint rather than from scratch; every
    // attempt in the EEA. (Between them the operator may retry the preempted pool while it has
    // no node: an `Unschedulable` attempt that never ran.)
    let a = &report.attempts;
    assert!(a.len() >= 2, "{a:?}");
    assert_eq!(a[0].region, "eu-west");
    assert_eq!(a[0].node, report.preempted.1);
    assert_eq!(a[0].reason.as_deref(), Some("Preempted"), "{a:?}");
    let last = a.last().unwrap();
    assert_eq!(last.region, "eu-central", "{a:?}");
    assert_eq!(last.reason.as_deref(), Some("Completed"), "{a:?}");
    assert!(a.iter().all(|x| journey::jurisdiction(&x.region) == "eea"));
    let resumed = last.resumed_from_step.unwrap_or(0);
    assert!(resumed > 0, "resumed from {resumed}: {a:?}");
    assert!(resumed >= report.checkpoint_before_preemption);
    // kubectl shows the job with its progress while it runs.
    assert!(report.kubectl_running.contains(&report.placed.job));
    assert!(
        report.kubectl_running.contains("PROGRESS"),
        "{}",
        report.kubectl_running
    );

    // What the customer got: both LoRA formats, checksums verified, SDXL metadata, 20 steps.
    let formats: Vec<_> = report.downloads.iter().map(|d| d.format.as_str()).collect();
    assert!(
        formats.contains(&"kohya") && formats.len() == 2,
        "{formats:?}"
    );
    for d in &report.downloads {
        assert!(d.bytes > 1000 && d.facts.tensors > 0, "{d:?}");
        assert_eq!(d.facts.steps.as_deref(), Some("20"), "{d:?}");
    }
    assert_eq!(report.api_view["phase"], "Succeeded");
    assert_eq!(report.api_view["region"], "eu-central");

    // The sample sets through the API: images by step and prompt index (the base model's at
    // step 0 unless it was rendered in the region the job left), the final step's, and the
    // contact sheet, a PNG.
    let links = &report.samples.links;
    let images: Vec<_> = links.iter().filter(|l| l.0 == "image").collect();
    assert!(
        images.iter().any(|l| l.1 == 20) && images.iter().all(|l| l.2.is_some()),
        "{links:?}"
    );
    assert_eq!(
        links.iter().filter(|l| l.0 == "contactSheet").count(),
        1,
        "{links:?}"
    );
    assert!(report.samples.contact_sheet.len() > 1000);

    // Before retention the data existed (so "gone" below means deleted, not never written).
    assert!(!report.claims_after_success.is_empty());
    let objs = &report.objects_after_success;
    assert!(
        objs.iter().any(|o| o.starts_with("checkpoints-eu-west/")),
        "{objs:?}"
    );
    assert!(
        objs.iter().any(|o| o.starts_with("outputs-eu-west/")),
        "{objs:?}"
    );
    assert!(
        objs.iter().any(|o| o.starts_with("datasets-eu-west/")),
        "{objs:?}"
    );
    // Data stayed in the EEA buckets.
    assert!(objs.iter().all(|o| !o.contains("us-east")), "{objs:?}");

    // After retention nothing of the job is left: no job object (the customer's text went
    // with it), no Secret, no pod, no claim, no S3 object; the links answer 404. What stays is
    // the audit record, without personal data.
    let left = &report.after_retention;
    assert!(!left.job_exists, "the job object outlived its retention");
    assert!(
        !left.secret_exists,
        "the trainer-config Secret outlived the job"
    );
    assert!(left.pods.is_empty(), "{:?}", left.pods);
    assert!(left.claims.is_empty(), "{:?}", left.claims);
    assert!(left.objects.is_empty(), "{:?}", left.objects);
    assert_eq!(report.artifacts_status_after_retention, 404);
    assert_eq!(report.samples_status_after_retention, 404);
    let record = &report.audit_record;
    assert_eq!(record["reason"], "retention");
    assert_eq!(record["tenant"], "orders");
    assert_eq!(record["phase"], "Succeeded");
    assert!(
        record["regions"].as_str().unwrap().contains("eu-"),
        "{record:?}"
    );
    assert!(
        record["bytesDeleted"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let text = serde_json::to_string(record).unwrap();
    for private in [
        "zxqcat",
        "Mimi",
        report.placed.job.as_str(),
        report.placed.uid.as_str(),
    ] {
        assert!(
            !text.contains(private),
            "{private} in the audit record {text}"
        );
    }
    // Stripe saw the order's id and its price, nothing the customer wrote (the checkout's
    // metadata is checked in `place_order`), and a fulfilled order asks it for no refund.
    assert_eq!(stack.stripe.requests(), 0);

    // The storefront was told, signed (its stub verifies every delivery as it would a Stripe
    // event), in order, each event once, with the download links on success and nothing the
    // customer wrote.
    let told = stack.storefront.events();
    let types: Vec<&str> = told.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"job.accepted"), "{types:?}");
    assert_eq!(types.get(1), Some(&"job.running"), "{types:?}");
    assert_eq!(types.last(), Some(&"job.succeeded"), "{types:?}");
    assert!(
        stack.storefront.refused().is_empty(),
        "{:?}",
        stack.storefront.refused()
    );
    // …and the official `stripe` package accepts each one as a genuine event.
    let read = stripe_sim::storefront::Storefront::verify_with_stripe_package(
        &stack.storefront.raw(),
        loraplane_e2e::config::NOTIFY_SECRET.as_bytes(),
    )
    .unwrap();
    assert_eq!(read, types);
    let mut ids: Vec<&str> = told.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        told.len(),
        "an event was delivered twice: {types:?}"
    );
    let done = &told.last().unwrap()["data"]["object"];
    assert_eq!(done["id"], report.placed.job.as_str());
    assert_eq!(
        done["downloads"].as_array().map(Vec::len),
        Some(2),
        "{done}"
    );
    // The storefront can show the samples with the success: their contact sheet's link.
    assert!(
        done["contact_sheet"]
            .as_str()
            .is_some_and(|u| u.contains("samples/contact-sheet.png")),
        "{done}"
    );
    let text = serde_json::to_string(&told).unwrap();
    for private in ["zxqcat", "Mimi"] {
        assert!(!text.contains(private), "{private} in a notification");
    }
    eprintln!("journey wall time: {:.1} s", t0.elapsed().as_secs_f64());
    stack.shutdown().await;
}
