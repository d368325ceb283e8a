#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Data end to end against a real SeaweedFS and kube-sim: presigned uploads and downloads with
//! a plain HTTP client (and their expiry), precise dataset validation errors, and datasets
//! checked once (retention and erasure are the operator's: see `operator/tests/retention.rs`).

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use loraplane_crds::v1alpha1::LoRATrainingJob;
use loraplane_dataset::testing::{dataset, png, zip_of};
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
        let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "acme");
        let uid = api.get(id).await.unwrap().metadata.uid.unwrap();
        let own = format!("acme/{id}-{uid}/lora.safetensors");
        h.put("out-eu", &own, b"LORA-BYTES").await;
        h.put("out-eu", "acme/other-job-uid/lora.safetensors", b"NOT-YOURS").await;
        // A status naming a file outside the job's layout (as a lying trainer would) gets no link.
        api.patch_status(id, &PatchParams::default(), &Patch::Merge(json!({"status": {
            "phase": "Succeeded",
            "artifacts": [
                {"format": "kohya", "uri": format!("s3://out-eu/{own}"), "sha256": "a".repeat(64), "bytes": 10},
                {"format": "diffusers", "uri": "s3://out-eu/acme/other-job-uid/lora.safetensors", "sha256": "b".repeat(64), "bytes": 9},
            ]
        }}))).await.unwrap();
        let (s, _, links) = h.call("GET", &format!("/v1/jobs/{id}/artifacts"), Some(ACME), &[], None).await;
        assert_eq!(s, StatusCode::OK, "{links}");
        assert_eq!(links["artifacts"].as_array().unwrap().len(), 1, "{links}");
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
async fn sample_links_are_the_jobs_own_pngs_for_its_tenant_and_close_on_erasure() {
    within(120, async {
        let h = Harness::start().await;
        let upload = h.upload(ACME, "eea", dataset(2)).await;
        let order = json!({"orderId": "smp", "family": "sdxl", "conceptType": "object",
            "triggerWord": "mug", "plan": "basic", "residency": "eea", "uploadId": upload});
        let (s, _, job) = h.call("POST", "/v1/jobs", Some(ACME), &[("idempotency-key", "smp")], Some(order)).await;
        assert_eq!(s, StatusCode::CREATED, "{job}");
        let id = job["id"].as_str().unwrap();
        let path = format!("/v1/jobs/{id}/samples");
        let (s, _, e) = h.call("GET", &path, Some(ACME), &[], None).await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("samples_not_ready")));

        let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "acme");
        let uid = api.get(id).await.unwrap().metadata.uid.unwrap();
        let image = format!("acme/{id}-{uid}/samples/step-000000-0.png");
        let sheet = format!("acme/{id}-{uid}/samples/contact-sheet.png");
        h.put("out-eu", &image, b"PNG-BASE").await;
        h.put("out-eu", &sheet, b"PNG-SHEET").await;
        // The operator's record, plus a name outside the job's layout (a lying trainer's).
        api.patch_status(id, &PatchParams::default(), &Patch::Merge(json!({"status": {
            "phase": "Running",
            "samples": [
                {"kind": "image", "step": 0, "prompt": 0, "uri": format!("s3://out-eu/{image}")},
                {"kind": "image", "step": 0, "prompt": 1, "uri": "s3://out-eu/acme/other-job-uid/samples/step-000000-1.png"},
                {"kind": "contactSheet", "step": 0, "uri": format!("s3://out-eu/{sheet}")},
            ]
        }}))).await.unwrap();
        let (s, _, links) = h.call("GET", &path, Some(ACME), &[], None).await;
        assert_eq!(s, StatusCode::OK, "{links}");
        let samples = links["samples"].as_array().unwrap();
        let shape: Vec<(&str, i64, Option<i64>)> = samples
            .iter()
            .map(|l| (l["kind"].as_str().unwrap(), l["step"].as_i64().unwrap(), l["prompt"].as_i64()))
            .collect();
        assert_eq!(shape, [("image", 0, Some(0)), ("contactSheet", 0, None)]);
        for (link, bytes) in samples.iter().zip([b"PNG-BASE".as_slice(), b"PNG-SHEET"]) {
            let (s, _, body) = http("GET", link["url"].as_str().unwrap(), &[], Vec::new()).await;
            assert_eq!((s, body.as_slice()), (StatusCode::OK, bytes));
        }
        assert!(links["expiresAt"].as_str().is_some_and(|t| !t.is_empty()));
        // Another tenant does not see the job at all.
        let (s, _, _) = h.call("GET", &path, Some(GLOBEX), &[], None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        // Erasure closes the links at once, before the operator has deleted anything.
        let (s, _, body) = h.call("DELETE", &format!("/v1/jobs/{id}"), Some(ACME), &[], None).await;
        assert!(s.is_success(), "{s}: {body}");
        let (s, _, e) = h.call("GET", &path, Some(ACME), &[], None).await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::GONE, Some("samples_deleted")));
    })
    .await;
}

#[tokio::test]
async fn bad_datasets_are_refused_with_precise_errors_before_any_job_exists() {
    within(120, async {
        let h = Harness::start().await;
        let img = || png(8, 8, 1);
        // A truncated PNG: right magic bytes, no image. The API decodes every image, as the
        // trainer will, so it is refused here, not after payment.
        let truncated = png(8, 8, 2)[..40].to_vec();
        let bomb = zip_of(&[("a.png", img()), ("notes.txt", vec![b'a'; 1_500_000])]);
        let cases: Vec<(Vec<u8>, StatusCode, &str)> = vec![
            (b"definitely not a zip".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "upload_not_zip"),
            (zip_of(&[("../../etc/a.png", img()), ("b.png", img())]), StatusCode::UNPROCESSABLE_ENTITY, "upload_unsafe_path"),
            (zip_of(&[("a.png", img())]), StatusCode::UNPROCESSABLE_ENTITY, "upload_image_count"),
            (zip_of(&[("a.png", img()), ("b.gif", b"GIF89a".to_vec())]), StatusCode::UNPROCESSABLE_ENTITY, "upload_unsupported_file"),
            (zip_of(&[("a.png", img()), ("b.jpg", truncated)]), StatusCode::UNPROCESSABLE_ENTITY, "upload_bad_image"),
            (bomb, StatusCode::UNPROCESSABLE_ENTITY, "upload_decompression_bomb"),
            (vec![0u8; 250_000], StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large"),
        ];
        for (i, (zip, status, code)) in cases.into_iter().enumerate() {
            let upload = h.upload(ACME, "eea", zip).await;
            let (s, _, e) = h
                .call("POST", &format!("/v1/uploads/{upload}/validate"), Some(ACME), &[], None)
                .await;
            assert_eq!((s, e["error"]["code"].as_str()), (status, Some(code)), "{e}");
            if code == "upload_bad_image" {
                // The uploader learns which file; the entry's number is what the rest of the
                // system would ever see.
                let msg = e["error"]["message"].as_str().unwrap_or_default();
                assert!(msg.starts_with("entry #2: corrupt image") && msg.ends_with("(file \"b.jpg\")"), "{msg}");
            }
            if code == "upload_too_large" {
                // Nothing oversized is kept: the object is gone, and asking again says so.
                let (s, _, e) = h
                    .call("POST", &format!("/v1/uploads/{upload}/validate"), Some(ACME), &[], None)
                    .await;
                assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("upload_not_found")));
                continue;
            }
            let order = json!({"orderId": format!("bad-{i}"), "family": "sdxl", "conceptType": "object",
                "triggerWord": "mug", "plan": "basic", "uploadId": upload});
            let (s, _, e) = h
                .call("POST", "/v1/jobs", Some(ACME), &[("idempotency-key", &format!("k{i}"))], Some(order))
                .await;
            assert_eq!((s, e["error"]["code"].as_str()), (status, Some(code)));
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
async fn a_dataset_is_checked_once_and_again_when_it_is_replaced() {
    within(120, async {
        let h = Harness::start().await;
        let (s, _, ticket) = h
            .call(
                "POST",
                "/v1/uploads",
                Some(ACME),
                &[],
                Some(json!({"residency": "eea"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let url = ticket["url"].as_str().unwrap().to_string();
        let upload = ticket["uploadId"].as_str().unwrap().to_string();
        let validate = format!("/v1/uploads/{upload}/validate");
        let checks = |how: &str| dataset_checks(&h.app, how);

        let first = dataset(3);
        assert_eq!(
            http("PUT", &url, &[], first.clone()).await.0,
            StatusCode::OK
        );
        for _ in 0..2 {
            let (s, _, ok) = h.call("POST", &validate, Some(ACME), &[], None).await;
            assert_eq!(s, StatusCode::OK, "{ok}");
            assert_eq!(ok["sha256"], loraplane_api::app::sha256_hex(&first));
        }
        assert_eq!(
            (checks("download"), checks("marker")),
            (1, 1),
            "the second check reads the marker"
        );

        // Replacing the bytes (the ticket's URL is still valid) drops the marker with them.
        let bad = zip_of(&[("a.png", png(8, 8, 1))]);
        assert_eq!(http("PUT", &url, &[], bad).await.0, StatusCode::OK);
        let (s, _, e) = h.call("POST", &validate, Some(ACME), &[], None).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("upload_image_count"))
        );
        let second = dataset(4);
        assert_eq!(
            http("PUT", &url, &[], second.clone()).await.0,
            StatusCode::OK
        );
        let order = json!({"orderId": "swap", "family": "sdxl", "conceptType": "object",
            "triggerWord": "mug", "plan": "basic", "uploadId": upload});
        let (s, _, job) = h
            .call(
                "POST",
                "/v1/jobs",
                Some(ACME),
                &[("idempotency-key", "swap")],
                Some(order),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{job}");
        let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "acme");
        let cr = api.get(job["id"].as_str().unwrap()).await.unwrap();
        assert_eq!(
            cr.spec.dataset.sha256,
            loraplane_api::app::sha256_hex(&second),
            "the job pins the bytes now stored"
        );
        assert_eq!(checks("download"), 3);

        // Tighter limits (a new configuration) do not trust a marker made under the old ones.
        let stricter = loraplane_dataset::DatasetRules {
            max_images: 3,
            ..h.app.platform.dataset
        };
        let replica = h.replica_with_rules(stricter);
        let e = replica
            .validate_upload("acme", &upload, None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                loraplane_api::app::AppError::Upload(
                    loraplane_dataset::DatasetError::ImageCount { .. }
                )
            ),
            "{e}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_receipt_from_the_check_stands_in_for_s3_but_only_for_its_own_upload() {
    within(120, async {
        let h = Harness::start().await;
        let checks = |how: &str| dataset_checks(&h.app, how);
        let good_bytes = &dataset(3);
        let good = &h.upload(ACME, "eea", good_bytes.clone()).await;
        let bad = &h
            .upload(ACME, "eea", zip_of(&[("a.png", png(8, 8, 1))]))
            .await;
        let (s, _, check) = h
            .call(
                "POST",
                &format!("/v1/uploads/{good}/validate"),
                Some(ACME),
                &[],
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{check}");
        let receipt = check["receipt"].as_str().unwrap().to_string();
        assert_eq!(checks("download"), 1);

        // The order carrying the receipt needs no S3 request: the job pins the checked bytes.
        let order = |id: &str, upload: &str| {
            json!({"orderId": id, "family": "sdxl", "conceptType": "object",
                "triggerWord": "mug", "plan": "basic", "uploadId": upload,
                "datasetReceipt": receipt})
        };
        let (s, _, job) = h
            .call(
                "POST",
                "/v1/jobs",
                Some(ACME),
                &[("idempotency-key", "r1")],
                Some(order("r1", good)),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{job}");
        assert_eq!(
            (checks("receipt"), checks("marker"), checks("download")),
            (1, 0, 1)
        );
        let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "acme");
        let cr = api.get(job["id"].as_str().unwrap()).await.unwrap();
        assert_eq!(
            cr.spec.dataset.sha256,
            loraplane_api::app::sha256_hex(good_bytes)
        );

        // The same receipt presented with another upload vouches for nothing: that upload is
        // checked (downloaded) and refused on its own merits.
        let (s, _, e) = h
            .call(
                "POST",
                "/v1/jobs",
                Some(ACME),
                &[("idempotency-key", "r2")],
                Some(order("r2", bad)),
            )
            .await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("upload_image_count"))
        );
        assert_eq!((checks("receipt"), checks("download")), (1, 2));

        // Another tenant cannot borrow it either (its namespace is not the receipt's).
        let forged = h
            .app
            .validate_upload("other", good, Some(&receipt))
            .await
            .unwrap_err();
        assert!(
            matches!(forged, loraplane_api::app::AppError::UploadNotFound(_)),
            "{forged}"
        );
        assert_eq!(checks("receipt"), 1);
    })
    .await;
}

/// How many dataset validations `app` answered this way (receipt, marker or download).
fn dataset_checks(app: &loraplane_api::app::App, how: &str) -> u64 {
    let m = app.metrics.render();
    let line = format!("loraplane_api_dataset_checks_total{{how=\"{how}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .map_or(0, |v| v.parse::<u64>().unwrap())
}
