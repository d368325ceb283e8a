//! After the order is a job: a paid job that fails for good is refunded exactly once (through
//! Stripe failures and an API restart), a customer's own cancel is not refunded, and the
//! storefront is told everything in order, signed, even after it was down for a while.
//! The operator is not running here: the tests write the job's status as it would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use loraplane_api::config::TenantNotifications;
use loraplane_crds::layout::{ANNOTATION_REFUND, job_prefix, output_files};
use loraplane_crds::v1alpha1::LoRATrainingJob;
use loraplane_dataset::testing::dataset;
use serde_json::{Value, json};
use stripe_sim::storefront::Storefront;

/// Points the storefront tenant's notifications at `url` (signed with [`NOTIFY_SECRET`]).
fn notify_storefront(c: &mut loraplane_api::config::ApiConfig, url: String) {
    let t = c
        .tenants
        .iter_mut()
        .find(|t| t.name == "storefront")
        .unwrap();
    t.notifications = Some(TenantNotifications {
        url,
        secret_env: "STOREFRONT_NOTIFY_SECRET".into(),
    });
}

async fn only_job(h: &Harness) -> LoRATrainingJob {
    let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "orders");
    let mut all = api.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all.len(), 1);
    all.remove(0)
}

/// Writes the job's status as the operator would.
async fn set_status(h: &Harness, name: &str, status: Value) {
    let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "orders");
    let patch =
        json!({"apiVersion": "loraplane.io/v1alpha1", "kind": "LoRATrainingJob", "status": status});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

fn ended(phase: &str, reason: &str) -> Value {
    json!({"phase": phase, "conditions": [{
        "type": phase, "status": "True", "reason": reason, "message": "m",
        "lastTransitionTime": "2026-12-04T00:00:00Z"}]})
}

async fn events(h: &Harness, id: &str) -> Value {
    let (s, _, body) = h
        .call(
            "GET",
            &format!("/v1/jobs/{id}/events"),
            Some(STOREFRONT),
            &[],
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if ok().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Orders through a draft and a signed checkout; returns the job.
async fn paid_job(h: &Harness, session: &str, payment: &str) -> LoRATrainingJob {
    let upload = h.upload(STOREFRONT, "eea", dataset(3)).await;
    let paid = h.paid_draft(session, payment, &upload, "basic").await;
    let (s, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
    assert_eq!(
        (s, ack["outcome"].as_str()),
        (StatusCode::OK, Some("created"))
    );
    only_job(h).await
}

#[tokio::test]
async fn a_paid_job_failing_for_good_is_refunded_exactly_once_through_failures_and_a_restart() {
    within(120, async {
        let store = Storefront::start(NOTIFY_SECRET).await.unwrap();
        let url = store.url();
        let h = Harness::start_with(|c| {
            c.notifications.retry_base_seconds = 1;
            notify_storefront(c, url);
        })
        .await;
        let job = paid_job(&h, "cs_fail", "pi_fail").await;
        let name = job.name_any();
        // The payment intent is kept beside the job, never on it.
        assert!(
            job.finalizers()
                .iter()
                .any(|f| f == "loraplane.io/settlement")
        );
        let on_job = serde_json::to_string(&job).unwrap();
        assert!(!on_job.contains("pi_fail"), "{on_job}");
        let secrets: Api<Secret> = Api::namespaced(h.sim.client(), "orders");
        assert!(
            secrets
                .get_opt(&format!("{name}-ledger"))
                .await
                .unwrap()
                .is_some()
        );

        h.stripe.fail_next(2);
        let first = h.notifier("api-0");
        set_status(&h, &name, ended("Failed", "BackoffLimitExceeded")).await;
        wait_for("the first refund call", async || h.stripe.requests() >= 1).await;
        // The API restarts while Stripe is failing.
        first.abort();
        let _second = h.notifier("api-1");
        wait_for("the refund", async || !h.stripe.refunds().is_empty()).await;
        let jobs: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "orders");
        wait_for("the refund recorded on the job", async || {
            let j = jobs.get(&name).await.unwrap();
            j.annotations().get(ANNOTATION_REFUND).map(String::as_str)
                == Some("jobFailed/succeeded")
        })
        .await;
        // Another look finds nothing more to do.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let refunds = h.stripe.refunds();
        assert_eq!(refunds.len(), 1, "{refunds:?}");
        assert_eq!(h.stripe.requests(), 3, "two failures, then the refund");
        assert_eq!(h.stripe.refused(), Vec::<String>::new());
        assert_eq!(refunds[0].payment_intent, "pi_fail");
        assert_eq!(refunds[0].metadata["loraplane_reason"], "job_failed");
        let order = job.labels()["loraplane.io/order"].clone();
        assert_eq!(
            refunds[0].idempotency_key.as_deref(),
            Some(format!("loraplane-refund-{order}").as_str())
        );
        // The storefront hears of the failure, then of the refund (its reason, no payment id).
        wait_for("job.refunded told", async || store.events().len() >= 3).await;
        let told = store.events();
        let types: Vec<&str> = told.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["job.accepted", "job.failed", "job.refunded"]);
        assert_eq!(told[1]["data"]["object"]["reason"], "BackoffLimitExceeded");
        assert_eq!(told[2]["data"]["object"]["refund_reason"], "jobFailed");
        assert!(!serde_json::to_string(&told).unwrap().contains("pi_fail"));
        let log = events(&h, &name).await;
        assert_eq!(log["refund"]["state"], "succeeded");
        assert_eq!(log["refund"]["reason"], "jobFailed");
        assert_eq!(log["refund"]["attempts"], 3);

        // Deleted (its data purged): the finalizer goes, and the ledger with the job.
        jobs.delete(&name, &DeleteParams::default()).await.unwrap();
        wait_for("the job to go", async || {
            jobs.get_opt(&name).await.unwrap().is_none()
        })
        .await;
        wait_for("the ledger to go with it", async || {
            secrets
                .get_opt(&format!("{name}-ledger"))
                .await
                .unwrap()
                .is_none()
        })
        .await;
        assert_eq!(h.stripe.refunds().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_customers_cancel_is_not_refunded_and_a_platform_cancel_is() {
    within(120, async {
        let h = Harness::start_with(|c| c.notifications.retry_base_seconds = 1).await;
        let _n = h.notifier("api-0");
        let job = paid_job(&h, "cs_mine", "pi_mine").await;
        let (s, _, body) = h
            .call(
                "POST",
                &format!("/v1/jobs/{}/cancel", job.name_any()),
                Some(STOREFRONT),
                &[],
                None,
            )
            .await;
        assert!(s.is_success(), "{body}");
        set_status(&h, &job.name_any(), ended("Cancelled", "CancelRequested")).await;

        // A platform team cancels another paid job with kubectl: that one is ours to refund.
        let jobs: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "orders");
        jobs.delete(&job.name_any(), &DeleteParams::default())
            .await
            .unwrap();
        wait_for("the first job to go", async || {
            jobs.get_opt(&job.name_any()).await.unwrap().is_none()
        })
        .await;
        let theirs = paid_job(&h, "cs_theirs", "pi_theirs").await;
        jobs.patch(
            &theirs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cancel": true}})),
        )
        .await
        .unwrap();
        set_status(
            &h,
            &theirs.name_any(),
            ended("Cancelled", "CancelRequested"),
        )
        .await;
        wait_for("the platform cancel's refund", async || {
            !h.stripe.refunds().is_empty()
        })
        .await;
        let refunds = h.stripe.refunds();
        assert_eq!(refunds.len(), 1);
        assert_eq!(refunds[0].payment_intent, "pi_theirs");
        assert_eq!(refunds[0].metadata["loraplane_reason"], "job_cancelled");
    })
    .await;
}

#[tokio::test]
async fn the_storefront_is_told_in_order_after_it_was_down_signed_and_without_customer_text() {
    within(180, async {
        let store = Storefront::start(NOTIFY_SECRET).await.unwrap();
        let url = store.url();
        let h = Harness::start_with(|c| {
            c.notifications.retry_base_seconds = 1;
            c.notifications.retry_max_seconds = 2;
            notify_storefront(c, url);
        })
        .await;
        store.set_down(true);
        let _n = h.notifier("api-0");
        let job = paid_job(&h, "cs_told", "pi_told").await;
        let name = job.name_any();
        let recorded = async |n: usize| {
            let name = name.clone();
            let h = &h;
            wait_for("the event to be recorded", async move || {
                events(h, &name).await["events"].as_array().unwrap().len() >= n
            })
            .await;
        };
        recorded(1).await;
        set_status(
            &h,
            &name,
            json!({"phase": "Running", "progress": {"step": 30, "totalSteps": 100}}),
        )
        .await;
        recorded(3).await;
        set_status(
            &h,
            &name,
            json!({"progress": {"step": 80, "totalSteps": 100}}),
        )
        .await;
        recorded(4).await;
        let uid = job.uid().unwrap();
        let (_, file) = &output_files(&name)[0];
        let uri = format!("s3://out-eu/{}{file}", job_prefix("orders", &name, &uid));
        let mut done = ended("Succeeded", "Completed");
        done["artifacts"] = json!([{"format": "kohya", "uri": uri, "sha256": "ab", "bytes": 3}]);
        set_status(&h, &name, done).await;
        recorded(5).await;
        // Down for a while: retried, nothing accepted.
        wait_for("retries while down", async || store.attempts() >= 3).await;
        assert!(store.events().is_empty());
        let log = events(&h, &name).await;
        assert_eq!(log["events"][0]["delivery"], "pending");
        assert_eq!(log["events"][0]["lastStatus"], 503);

        store.set_down(false);
        wait_for("every event delivered", async || store.events().len() >= 5).await;
        let got = store.events();
        let types: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "job.accepted",
                "job.running",
                "job.progress",
                "job.progress",
                "job.succeeded"
            ]
        );
        let percents: Vec<i64> = got[2..4]
            .iter()
            .map(|e| e["data"]["object"]["percent"].as_i64().unwrap())
            .collect();
        assert_eq!(percents, [25, 75]);
        assert_eq!(store.refused(), Vec::<String>::new());
        let mut ids: Vec<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
        ids.dedup();
        assert_eq!(ids.len(), 5, "each event once");
        for e in &got {
            assert_eq!(e["object"], "event");
            assert_eq!(e["data"]["object"]["id"], name);
            assert!(
                e["data"]["object"]["order_id"]
                    .as_str()
                    .is_some_and(|o| !o.is_empty())
            );
            let text = e.to_string();
            for private in ["zxq", "grey cat", "pi_told", "cs_told"] {
                assert!(!text.contains(private), "{private} in {text}");
            }
        }
        let links = &got[4]["data"]["object"]["downloads"];
        assert!(
            links[0]["url"]
                .as_str()
                .unwrap()
                .contains("X-Amz-Signature"),
            "{links}"
        );
        // The official Stripe library accepts every delivery as a genuine event, and refuses
        // one whose body was altered.
        let raw = store.raw();
        let types_seen = Storefront::verify_with_stripe_package(&raw, NOTIFY_SECRET).unwrap();
        assert_eq!(types_seen, types);
        let (header, body) = &raw[0];
        let mut forged = body.clone();
        forged.extend_from_slice(b" ");
        assert!(
            Storefront::verify_with_stripe_package(&[(header.clone(), forged)], NOTIFY_SECRET)
                .is_err()
        );
        let log = events(&h, &name).await;
        assert!(
            log["events"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["delivery"] == "delivered")
        );
        assert!(log["events"][0]["attempts"].as_u64().unwrap() > 1);
        assert!(log.get("refund").is_none());

        // The customer asks for erasure; once the operator has purged the job (here: the job
        // deleted, no operator finalizer), the storefront is told, and only then does the job go.
        let (s, _, body) = h
            .call(
                "DELETE",
                &format!("/v1/jobs/{name}"),
                Some(STOREFRONT),
                &[],
                None,
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
        let jobs: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "orders");
        jobs.delete(&name, &DeleteParams::default()).await.unwrap();
        wait_for("the job to go", async || {
            jobs.get_opt(&name).await.unwrap().is_none()
        })
        .await;
        let last = store.events().last().cloned().unwrap();
        assert_eq!(last["type"], "job.erased", "{last}");
        assert_eq!(store.events().len(), 6);
        assert!(h.stripe.refunds().is_empty(), "an erasure is no refund");
    })
    .await;
}
