#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Data end to end against a real SeaweedFS and kube-sim: presigned uploads and downloads with
//! a plain HTTP client (and their expiry), precise dataset validation errors, and the retention
//! loop deleting every object and claim on time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use loraplane_api::leader::Leader;
use loraplane_api::zipcheck::testing::{dataset, png, zip_of};
use loraplane_crds::v1alpha1::LoRATrainingJob;
use serde_json::json;

#[tokio::test]
async fn presigned_urls_work_with_a_plain_http_client_and_expire() {
    within(120, async {
        let h = Harness::start_with(|c| c.limits.presign_seconds = 2).await;
        // EEA residency lands in the EEA region's bucket.
        let (s, _, ticket) = h
            .call("POST", "/v1/uploads", Some(ACME), &[], Some(json!({"residency": "eea"})))
            .await;
        assert_eq!(s, StatusCode::CREATED);
        assert!(ticket["uploadId"].as_str().unwrap().starts_with("eu-west."));
        let url = ticket["url"].as_str().unwrap().to_string();
        assert!(url.contains("/ds-eu/uploads/acme/"), "{url}");
        let zip = dataset(2);
        let (s, _, _) = http("PUT", &url, &[], zip.clone()).await;
        assert_eq!(s, StatusCode::OK);
        let (s, _, us) = h
            .call("POST", "/v1/uploads", Some(ACME), &[], Some(json!({"residency": "us"})))
            .await;
        assert_eq!(s, StatusCode::CREATED);
        assert!(us["url"].as_str().unwrap().contains("/ds-us/"));
        let (s, _, e) = h
            .call("POST", "/v1/uploads", Some(ACME), &[], Some(json!({"residency": "eea", "region": "us-east"})))
            .await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("region_not_allowed")));

        // A job with an artifact: its download link works, then expires.
        let order = json!({"orderId": "dl", "family": "sdxl", "conceptType": "object",
            "triggerWord": "mug", "plan": "basic", "residency": "eea", "uploadId": ticket["uploadId"]});
        let (s, _, job) = h.call("POST", "/v1/jobs", Some(ACME), &[("idempotency-key", "dl")], Some(order)).await;
        assert_eq!(s, StatusCode::CREATED, "{job}");
        let id = job["id"].as_str().unwrap();
        let (s, _, e) = h.call("GET", &format!("/v1/jobs/{id}/artifacts"), Some(ACME), &[], None).await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("artifacts_not_ready")));
        h.put("out-eu", "acme/x/lora.safetensors", b"LORA-BYTES").await;
        let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "acme");
        api.patch_status(id, &PatchParams::default(), &Patch::Merge(json!({"status": {
            "phase": "Succeeded",
            "artifacts": [{"format": "kohya", "uri": "s3://out-eu/acme/x/lora.safetensors", "sha256": "a".repeat(64), "bytes": 10}]
        }}))).await.unwrap();
        let (s, _, links) = h.call("GET", &format!("/v1/jobs/{id}/artifacts"), Some(ACME), &[], None).await;
        assert_eq!(s, StatusCode::OK, "{links}");
        let get_url = links["artifacts"][0]["url"].as_str().unwrap().to_string();
        let (s, _, body) = http("GET", &get_url, &[], Vec::new()).await;
        assert_eq!((s, body.as_slice()), (StatusCode::OK, b"LORA-BYTES".as_slice()));

        tokio::time::sleep(Duration::from_secs(4)).await;
        let (s, _, _) = http("GET", &get_url, &[], Vec::new()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "an expired GET link must be refused");
        let (s, _, _) = http("PUT", &url, &[], zip).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "an expired PUT link must be refused");
    })
    .await;
}

#[tokio::test]
async fn bad_datasets_are_refused_with_precise_errors_before_any_job_exists() {
    within(120, async {
        let h = Harness::start().await;
        let bomb = zip_of(&[("a.png", png(1_500_000)), ("b.png", png(10))]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"definitely not a zip".to_vec(), "upload_not_zip"),
            (zip_of(&[("../../etc/a.png", png(10)), ("b.png", png(10))]), "upload_unsafe_path"),
            (zip_of(&[("a.png", png(10))]), "upload_image_count"),
            (zip_of(&[("a.png", png(10)), ("b.gif", b"GIF89a".to_vec())]), "upload_unsupported_file"),
            (zip_of(&[("a.png", png(10)), ("b.jpg", png(10))]), "upload_bad_image"),
            (bomb, "upload_decompression_bomb"),
            (vec![0u8; 250_000], "upload_too_large"),
        ];
        for (i, (zip, code)) in cases.into_iter().enumerate() {
            let upload = h.upload(ACME, "eea", zip).await;
            let (s, _, e) = h
                .call("POST", &format!("/v1/uploads/{upload}/validate"), Some(ACME), &[], None)
                .await;
            assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(code)), "{e}");
            let order = json!({"orderId": format!("bad-{i}"), "family": "sdxl", "conceptType": "object",
                "triggerWord": "mug", "plan": "basic", "uploadId": upload});
            let (s, _, e) = h
                .call("POST", "/v1/jobs", Some(ACME), &[("idempotency-key", &format!("k{i}"))], Some(order))
                .await;
            assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(code)));
        }
        let (s, _, e) = h
            .call("POST", "/v1/uploads/eu-west.00000000000000000000000000000000/validate", Some(ACME), &[], None)
            .await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("upload_not_found")));
        let good = h.upload(ACME, "eea", dataset(3)).await;
        let (s, _, ok) = h
            .call("POST", &format!("/v1/uploads/{good}/validate"), Some(ACME), &[], None)
            .await;
        assert_eq!(s, StatusCode::OK, "{ok}");
        let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "acme");
        assert!(api.list(&ListParams::default()).await.unwrap().items.is_empty());
    })
    .await;
}

#[tokio::test]
async fn retention_deletes_every_object_and_claim_when_due() {
    within(120, async {
        let h = Harness::start().await;
        let upload = h.upload(ACME, "eea", dataset(2)).await;
        let order = json!({"orderId": "ret", "family": "sdxl", "conceptType": "object",
            "triggerWord": "mug", "plan": "fast", "uploadId": upload});
        let (s, _, job) = h.call("POST", "/v1/jobs", Some(ACME), &[("idempotency-key", "r")], Some(order)).await;
        assert_eq!(s, StatusCode::CREATED, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "acme");
        let cr = api.get(&id).await.unwrap();
        let uid = cr.uid().unwrap();
        let prefix = format!("acme/{id}-{uid}/");
        for i in 0..5 {
            h.put("ck-eu", &format!("{prefix}step-{i}/state.safetensors"), b"ck").await;
        }
        h.put("out-eu", &format!("{prefix}lora.safetensors"), b"lora").await;
        h.put("out-eu", &format!("{prefix}diffusers/pytorch_lora_weights.safetensors"), b"lora").await;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(h.sim.client(), "acme");
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": format!("{id}-work-eu-west"), "labels": {"loraplane.io/job-uid": uid}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        })).unwrap();
        pvcs.create(&PostParams::default(), &pvc).await.unwrap();

        let leader = Arc::new(Leader::new(h.sim.client(), "loraplane-system", "gc", "replica-a", Duration::from_secs(15)));
        assert!(leader.try_acquire().await);
        let other = Leader::new(h.sim.client(), "loraplane-system", "gc", "replica-b", Duration::from_secs(15));
        assert!(!other.try_acquire().await, "only one replica leads");
        tokio::spawn(loraplane_api::app::retention_loop(h.app.clone(), leader, Duration::from_secs(30)));
        tokio::spawn(loraplane_api::app::watch_jobs(h.app.clone()));

        // The operator's completion starts the clock (inputs: 1 s, outputs: 2 s).
        let completed = k8s_openapi::jiff::Timestamp::now();
        api.patch_status(&id, &PatchParams::default(), &Patch::Merge(json!({"status": {
            "phase": "Succeeded", "completionTime": completed.to_string()
        }}))).await.unwrap();

        let done = loop {
            let j = api.get(&id).await.unwrap();
            let r = j.status.as_ref().and_then(|s| s.retention.clone()).unwrap_or_default();
            if r.outputs_deleted_at.is_some() && r.inputs_deleted_at.is_some() {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(done.inputs_expire_at.is_some() && done.outputs_expire_at.is_some());
        assert!(done.outputs_deleted_at.unwrap().0 >= done.outputs_expire_at.unwrap().0, "not before due");
        assert!(h.keys("ck-eu").await.is_empty());
        assert!(h.keys("out-eu").await.is_empty());
        assert!(h.keys("ds-eu").await.is_empty());
        assert!(pvcs.list(&ListParams::default()).await.unwrap().items.is_empty());
        let events: Api<Event> = Api::namespaced(h.sim.client(), "acme");
        let evs = events.list(&ListParams::default()).await.unwrap().items;
        assert!(evs.iter().any(|e| e.reason.as_deref() == Some("RetentionExpired")));
        let (s, _, e) = h.call("GET", &format!("/v1/jobs/{id}/artifacts"), Some(ACME), &[], None).await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::GONE, Some("artifacts_deleted")));
        let m = h.app.metrics.render();
        assert!(m.contains("loraplane_api_gc_lag_seconds_count 2"), "{m}");
    })
    .await;
}
