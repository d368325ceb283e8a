#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Orders end to end against a real kube-sim and SeaweedFS: signed Stripe webhooks become
//! exactly one job whatever the delivery order; refunds and disputes erase; tenants are
//! isolated; Idempotency-Key replays; every error is JSON.

mod common;

use axum::http::StatusCode;
use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use loraplane_crds::v1alpha1::{ErasureReason, LoRATrainingJob, Residency, RetentionMode};
use loraplane_dataset::testing::dataset;
use serde_json::json;

#[tokio::test]
async fn a_paid_order_that_cannot_become_a_job_is_refunded_exactly_once() {
    within(120, async {
        let h = Harness::start_with(|c| c.stripe_api.timeout_seconds = 1).await;
        // Paid for, and it can never become a job: the checkout names a draft this API does
        // not hold (expired, or never made).
        let paid = paid_draft(
            "cs_bad_1",
            "pi_bad_1",
            "eu-west.0123456789abcdef0123456789abcdef",
            1900,
            "eur",
        );

        // Stripe down twice, then too slow once: each delivery fails, so Stripe delivers again.
        h.stripe.fail_next(2);
        for _ in 0..2 {
            let (s, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
            assert_eq!(
                (s, ack["error"]["code"].as_str()),
                (StatusCode::BAD_GATEWAY, Some("refund_failed")),
                "{ack}"
            );
        }
        h.stripe.delay(Some(std::time::Duration::from_secs(2)));
        let (s, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
        assert_eq!(
            (s, ack["error"]["code"].as_str()),
            (StatusCode::BAD_GATEWAY, Some("refund_failed")),
            "{ack}"
        );
        h.stripe.delay(None);

        // The slow call did refund; only its answer came after we gave up. A restarted API gets
        // the next delivery and asks again with the same idempotency key: the same refund
        // comes back.
        let replica = h.replica();
        let (_, event) =
            loraplane_api::stripe::parse_event(&serde_json::to_vec(&paid).unwrap()).unwrap();
        assert_eq!(
            replica.handle_event(event).await.unwrap(),
            loraplane_api::app::Outcome::Refunded
        );
        let (s, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
        assert_eq!(
            (s, ack["outcome"].as_str()),
            (StatusCode::OK, Some("refunded")),
            "{ack}"
        );

        let refunds = h.stripe.refunds();
        assert_eq!(refunds.len(), 1, "{refunds:?}");
        let r = &refunds[0];
        assert_eq!(r.payment_intent, "pi_bad_1");
        // Our reason and nothing of the customer's goes to Stripe; the key names no Stripe id.
        assert_eq!(r.metadata.keys().collect::<Vec<_>>(), ["loraplane_reason"]);
        assert_eq!(r.metadata["loraplane_reason"], "order_rejected");
        let key = r.idempotency_key.clone().unwrap_or_default();
        assert!(
            key.starts_with("loraplane-refund-")
                && !key.contains("cs_bad")
                && !key.contains("pi_bad"),
            "{key}"
        );
        assert!(
            h.stripe.refused().is_empty(),
            "malformed requests: {:?}",
            h.stripe.refused()
        );
        assert_eq!(h.stripe.requests(), 5);
        assert!(jobs(&h, "orders").await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_draft_order_keeps_the_customers_words_out_of_stripe_and_must_be_paid_its_price() {
    within(120, async {
        let h = Harness::start().await;
        let draft = |upload: &str, trigger: &str| {
            json!({"family": "sdxl", "conceptType": "object", "triggerWord": trigger,
                "description": "my red enamel mug", "plan": "basic", "residency": "eea", "uploadId": upload})
        };
        let upload = h.upload(STOREFRONT, "eea", dataset(3)).await;
        let order = draft(&upload, "zxqmug");
        let (s, _, ticket) = h
            .call("POST", "/v1/orders", Some(STOREFRONT), &[("idempotency-key", "cart-1")], Some(order.clone()))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{ticket}");
        assert_eq!(ticket["price"], json!({"amount": 1900, "currency": "eur"}));
        let id = ticket["orderId"].as_str().unwrap().to_string();
        assert!(id.starts_with("eu-west."), "the draft lives in the upload's region: {id}");
        // The same cart again is the same draft; the same key for another order is refused.
        let (s, _, again) = h
            .call("POST", "/v1/orders", Some(STOREFRONT), &[("idempotency-key", "cart-1")], Some(order.clone()))
            .await;
        assert_eq!((s, again["orderId"].as_str()), (StatusCode::CREATED, Some(id.as_str())));
        let (s, _, e) = h
            .call("POST", "/v1/orders", Some(STOREFRONT), &[("idempotency-key", "cart-1")], Some(draft(&upload, "other")))
            .await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_reused")));
        // A plan without a price cannot be drafted; a bad dataset is refused before payment.
        let mut unpriced = order.clone();
        unpriced["plan"] = json!("fast");
        let (s, _, e) = h
            .call("POST", "/v1/orders", Some(STOREFRONT), &[("idempotency-key", "cart-x")], Some(unpriced))
            .await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("plan_unpriced")));
        let one_image = loraplane_dataset::testing::zip_of(&[("a.png", loraplane_dataset::testing::png(8, 8, 1))]);
        let bad = h.upload(STOREFRONT, "eea", one_image).await;
        let (s, _, e) = h
            .call("POST", "/v1/orders", Some(STOREFRONT), &[("idempotency-key", "cart-y")], Some(draft(&bad, "zxqmug")))
            .await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("upload_image_count")));

        // Checkout carries only the draft's id; paid at the quoted price, it is the job.
        let paid = paid_draft("cs_draft_1", "pi_draft_1", &id, 1900, "eur");
        let metadata = paid["data"]["object"]["metadata"].to_string();
        assert!(!metadata.contains("zxqmug") && !metadata.contains("mug"), "{metadata}");
        let (s, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
        assert_eq!((s, ack["outcome"].as_str()), (StatusCode::OK, Some("created")), "{ack}");
        let all = jobs(&h, "orders").await;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].spec.concept.trigger_word, "zxqmug");
        assert_eq!(all[0].spec.concept.description.as_deref(), Some("my red enamel mug"));
        // The job holds the order: the draft (the customer's words) is gone at once.
        assert_eq!(drafts(&h).await, Vec::<String>::new());
        // Only the Stripe namespace's storefront makes drafts: nobody else's could be paid.
        let (s, _, e) = h
            .call("POST", "/v1/orders", Some(ACME), &[("idempotency-key", "cart-acme")], Some(order.clone()))
            .await;
        assert_eq!((s, e["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("orders_not_enabled")));

        // Another draft, charged the wrong amount: refunded, and no job.
        let second = h.upload(STOREFRONT, "eea", dataset(3)).await;
        let (_, _, ticket) = h
            .call("POST", "/v1/orders", Some(STOREFRONT), &[("idempotency-key", "cart-2")], Some(draft(&second, "zxqmug")))
            .await;
        let cheap = paid_draft("cs_draft_2", "pi_draft_2", ticket["orderId"].as_str().unwrap(), 100, "eur");
        let (s, ack) = h.webhook(&cheap, now(), WEBHOOK_SECRET).await;
        assert_eq!((s, ack["outcome"].as_str()), (StatusCode::OK, Some("refunded")), "{ack}");
        let wrong_currency = paid_draft("cs_draft_3", "pi_draft_3", ticket["orderId"].as_str().unwrap(), 1900, "usd");
        let (_, ack) = h.webhook(&wrong_currency, now(), WEBHOOK_SECRET).await;
        assert_eq!(ack["outcome"], "refunded");
        // A checkout naming no draft we hold is refunded too.
        let unknown = paid_draft("cs_draft_4", "pi_draft_4", "eu-west.00000000000000000000000000000000", 1900, "eur");
        let (_, ack) = h.webhook(&unknown, now(), WEBHOOK_SECRET).await;
        assert_eq!(ack["outcome"], "refunded");
        assert_eq!(jobs(&h, "orders").await.len(), 1);
        let reasons: Vec<(String, String)> = h
            .stripe
            .refunds()
            .into_iter()
            .map(|r| (r.payment_intent, r.metadata["loraplane_reason"].clone()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("pi_draft_2".to_string(), "price_mismatch".to_string()),
                ("pi_draft_3".to_string(), "price_mismatch".to_string()),
                ("pi_draft_4".to_string(), "order_rejected".to_string()),
            ]
        );
        assert!(h.stripe.refused().is_empty(), "{:?}", h.stripe.refused());
        // The paid draft redelivered: the same job though its draft is gone, and nothing is
        // refunded; neither once the sweep deleted the other draft.
        let (_, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
        assert_eq!(ack["outcome"], "duplicate");
        let drafts = drafts(&h).await;
        assert_eq!(drafts.len(), 1, "the unpaid draft stays until its TTL: {drafts:?}");
        for key in &drafts {
            h.s3.client().delete_object().bucket("ds-eu").key(key).send().await.unwrap();
        }
        let (_, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
        assert_eq!(ack["outcome"], "duplicate");
        assert_eq!(h.stripe.refunds().len(), 3);
    })
    .await;
}

async fn drafts(h: &Harness) -> Vec<String> {
    h.keys("ds-eu")
        .await
        .into_iter()
        .filter(|k| k.starts_with("drafts/"))
        .collect()
}

async fn jobs(h: &Harness, ns: &str) -> Vec<LoRATrainingJob> {
    let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), ns);
    api.list(&ListParams::default()).await.unwrap().items
}

#[tokio::test]
async fn a_signed_checkout_creates_exactly_one_job_whatever_the_delivery_order() {
    within(120, async {
        let h = Harness::start().await;
        let zip = dataset(3);
        let upload = h.upload(STOREFRONT, "eea", zip.clone()).await;
        let paid = h
            .paid_draft("cs_test_1", "pi_test_1", &upload, "basic")
            .await;
        let mut async_paid = paid.clone();
        async_paid["type"] = json!("checkout.session.async_payment_succeeded");

        let (s, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
        assert_eq!(s, StatusCode::OK, "{ack}");
        assert_eq!(ack["outcome"], "created");
        // Redelivery, the async event after it, and a byte-identical replay (same body, same
        // signature header) inside the tolerance.
        let t = now();
        for (ev, at) in [(&paid, t), (&async_paid, now()), (&paid, t), (&paid, t)] {
            let (s, ack) = h.webhook(ev, at, WEBHOOK_SECRET).await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(ack["outcome"], "duplicate");
        }
        // Another checkout on the same upload: one upload, one order.
        let other = h
            .paid_draft("cs_test_2", "pi_test_2", &upload, "basic")
            .await;
        let (s, ack) = h.webhook(&other, now(), WEBHOOK_SECRET).await;
        assert_eq!(
            (s, ack["outcome"].as_str()),
            (StatusCode::OK, Some("refunded"))
        );
        let refunded: Vec<String> = h
            .stripe
            .refunds()
            .into_iter()
            .map(|r| r.payment_intent)
            .collect();
        assert_eq!(
            refunded,
            ["pi_test_2"],
            "only the order that cannot be served is refunded"
        );
        let all = jobs(&h, "orders").await;
        assert_eq!(all.len(), 1);
        let job = &all[0];
        // The upload's claim names neither the upload nor the order in clear, and is the
        // one the operator deletes with the job's data.
        let claims: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(h.sim.client(), "orders");
        let claims = claims
            .list(&ListParams::default().labels("loraplane.io/record=upload-claim"))
            .await
            .unwrap()
            .items;
        assert_eq!(claims.len(), 1);
        assert_eq!(
            claims[0].metadata.name.as_deref(),
            Some(loraplane_crds::layout::upload_claim_name(&job.spec.dataset.uri).as_str())
        );
        assert_eq!(
            claims[0]
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref()),
            job.labels().get("loraplane.io/order").map(String::as_str)
        );
        // The plan's policy and the validated dataset are in the spec.
        assert_eq!(job.spec.training.steps, 500);
        assert_eq!(job.spec.retention.mode, RetentionMode::Standard);
        assert_eq!(job.spec.retention.keep_inputs_seconds, Some(3600));
        assert!(
            job.spec.data_use.training_consent,
            "the customer consented at checkout"
        );
        assert_eq!(job.spec.placement.residency, Residency::Eea);
        assert_eq!(job.spec.dataset.region.as_deref(), Some("eu-west"));
        assert_eq!(
            job.spec.dataset.sha256,
            loraplane_api::app::sha256_hex(&zip)
        );
        assert!(
            job.spec
                .dataset
                .uri
                .starts_with("s3://ds-eu/uploads/orders/")
        );
        // No payment id, email or customer text in metadata.
        let meta = serde_json::to_string(&job.metadata).unwrap();
        for secret in [
            "cs_test_1",
            "pi_test_1",
            "someone@example.com",
            "grey cat",
            "zxq",
        ] {
            assert!(
                !meta.contains(secret),
                "{secret} leaked into metadata: {meta}"
            );
        }
        let metrics = h.call("GET", "/metrics", None, &[], None).await;
        assert_eq!(metrics.0, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn forged_stale_and_oversized_webhooks_are_refused_with_json_errors() {
    within(120, async {
        let h = Harness::start().await;
        let upload = h.upload(STOREFRONT, "eea", dataset(3)).await;
        let paid = h
            .paid_draft("cs_forged", "pi_forged", &upload, "basic")
            .await;

        let (s, body) = h.webhook(&paid, now(), b"whsec_wrong").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_signature");

        let (s, body) = h.webhook(&paid, now() - 301, WEBHOOK_SECRET).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "stale_timestamp");

        let (s, _, body) = h
            .call("POST", "/v1/webhooks/stripe", None, &[], Some(paid.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_signature");

        let mut big = paid.clone();
        big["data"]["object"]["padding"] = json!("x".repeat(10_000));
        let (s, body) = h.webhook(&big, now(), WEBHOOK_SECRET).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"]["code"], "body_too_large");

        assert!(jobs(&h, "orders").await.is_empty());

        // Unknown routes and methods answer in the same JSON shape, with a request id.
        let (s, headers, body) = h.call("GET", "/v1/nope", None, &[], None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "not_found");
        assert!(headers.contains_key("x-request-id"));
    })
    .await;
}

#[tokio::test]
async fn a_refund_before_the_completion_wins_and_a_dispute_erases_a_job() {
    within(120, async {
        let h = Harness::start().await;
        // Refund first, completion second: no job, ever.
        let upload = h.upload(STOREFRONT, "eea", dataset(3)).await;
        let (s, ack) = h
            .webhook(&refunded("pi_early"), now(), WEBHOOK_SECRET)
            .await;
        assert_eq!(
            (s, ack["outcome"].as_str()),
            (StatusCode::OK, Some("tombstoned"))
        );
        let paid = h.paid_draft("cs_early", "pi_early", &upload, "basic").await;
        for _ in 0..2 {
            let (_, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
            assert_eq!(ack["outcome"], "revoked_first");
        }
        assert!(jobs(&h, "orders").await.is_empty());

        // Completion first, then a dispute: the API asks for the job's erasure on its spec
        // (the operator deletes it and its data; the API itself deletes nothing of a job).
        let upload = h.upload(STOREFRONT, "eea", dataset(3)).await;
        let paid = h.paid_draft("cs_late", "pi_late", &upload, "basic").await;
        let (_, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
        assert_eq!(ack["outcome"], "created");
        let job = jobs(&h, "orders").await.remove(0);
        let (_, ack) = h
            .webhook(&dispute_created("pi_late"), now(), WEBHOOK_SECRET)
            .await;
        assert_eq!(ack["outcome"], "erased");
        let after = jobs(&h, "orders").await.remove(0);
        let erasure = after
            .spec
            .erasure
            .clone()
            .expect("erasure requested on the spec");
        assert_eq!(erasure.reason, ErasureReason::Dispute);
        assert_eq!(after.status, None, "the API never writes status");
        assert_eq!(after.uid(), job.uid());
        let uploads = h.keys("ds-eu").await;
        let uploads: Vec<&String> = uploads.iter().filter(|k| k.contains("uploads/")).collect();
        assert_eq!(uploads.len(), 1, "the API deletes no job data: {uploads:?}");
        // A second dispute delivery changes nothing: the first request stands.
        let (_, ack) = h
            .webhook(&dispute_created("pi_late"), now(), WEBHOOK_SECRET)
            .await;
        assert_eq!(ack["outcome"], "erased");
        let again = jobs(&h, "orders").await.remove(0);
        assert_eq!(again.spec.erasure, Some(erasure));
        // Once the operator has deleted the job (and the API's notifier has let it go: the
        // payment went back at Stripe, nothing is owed), a replayed completion does not bring
        // it back.
        let _notifier = h.notifier("api-0");
        let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "orders");
        api.delete(&after.name_any(), &Default::default())
            .await
            .unwrap();
        for _ in 0..100 {
            if api.get_opt(&after.name_any()).await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let (_, ack) = h.webhook(&paid, now(), WEBHOOK_SECRET).await;
        assert_eq!(ack["outcome"], "revoked_first");
        assert!(jobs(&h, "orders").await.is_empty());
        // The tombstones that make this so hold no personal data.
        let cms: Api<ConfigMap> = Api::namespaced(h.sim.client(), "orders");
        let all =
            serde_json::to_string(&cms.list(&ListParams::default()).await.unwrap().items).unwrap();
        for secret in [
            "pi_late", "cs_late", "pi_early", "zxq", "grey cat", "someone@",
        ] {
            assert!(!all.contains(secret), "{secret} in tombstones");
        }
    })
    .await;
}

#[tokio::test]
async fn tenants_are_isolated_and_idempotency_keys_replay() {
    within(120, async {
        let h = Harness::start().await;
        let upload = h.upload(ACME, "eea", dataset(2)).await;
        let order = json!({
            "orderId": "order-1", "family": "sd15", "conceptType": "style",
            "triggerWord": "vangoghish", "plan": "basic", "residency": "eea",
            "uploadId": upload, "steps": 100
        });
        let key = [("idempotency-key", "k-1")];
        let (s, _, job) = h
            .call("POST", "/v1/jobs", Some(ACME), &key, Some(order.clone()))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        assert_eq!(job["totalSteps"], 100);

        let (s, headers, again) = h
            .call("POST", "/v1/jobs", Some(ACME), &key, Some(order.clone()))
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(again["id"], id.as_str());
        assert_eq!(headers["idempotent-replayed"], "true");

        let mut changed = order.clone();
        changed["steps"] = json!(200);
        let (s, _, e) = h
            .call("POST", "/v1/jobs", Some(ACME), &key, Some(changed))
            .await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("idempotency_key_reused")
            )
        );
        let (s, _, e) = h
            .call(
                "POST",
                "/v1/jobs",
                Some(ACME),
                &[("idempotency-key", "k-2")],
                Some(order.clone()),
            )
            .await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("order_exists"))
        );
        // A new order on an upload another order consumed is refused, however it is keyed.
        let mut reuse = order.clone();
        reuse["orderId"] = json!("order-reusing-the-upload");
        let (s, _, e) = h
            .call(
                "POST",
                "/v1/jobs",
                Some(ACME),
                &[("idempotency-key", "k-reuse")],
                Some(reuse),
            )
            .await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("upload_consumed")),
            "{e}"
        );
        let (s, _, e) = h
            .call("POST", "/v1/jobs", Some(ACME), &[], Some(order.clone()))
            .await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("idempotency_key_required"))
        );

        // Globex sees nothing of acme's, and cannot use acme's upload either.
        let path = format!("/v1/jobs/{id}");
        for (m, p) in [
            ("GET", path.clone()),
            ("DELETE", path.clone()),
            ("POST", format!("{path}/cancel")),
            ("GET", format!("{path}/artifacts")),
        ] {
            let (s, _, e) = h.call(m, &p, Some(GLOBEX), &[], None).await;
            assert_eq!(
                (s, e["error"]["code"].as_str()),
                (StatusCode::NOT_FOUND, Some("job_not_found")),
                "{m} {p}"
            );
        }
        let (_, _, list) = h.call("GET", "/v1/jobs", Some(GLOBEX), &[], None).await;
        assert_eq!(list["items"].as_array().unwrap().len(), 0);
        let (s, _, e) = h
            .call(
                "POST",
                "/v1/jobs",
                Some(GLOBEX),
                &[("idempotency-key", "g")],
                Some(order.clone()),
            )
            .await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("upload_not_found"))
        );
        assert_eq!(jobs(&h, "acme").await.len(), 1);

        let (s, _, e) = h.call("GET", "/v1/jobs", None, &[], None).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized"))
        );
        let (s, _, _) = h.call("GET", "/v1/jobs", Some("wrong"), &[], None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);

        // Pagination.
        let upload2 = h.upload(ACME, "eea", dataset(2)).await;
        let mut second = order.clone();
        second["orderId"] = json!("order-2");
        second["uploadId"] = json!(upload2);
        let (s, _, _) = h
            .call(
                "POST",
                "/v1/jobs",
                Some(ACME),
                &[("idempotency-key", "k-3")],
                Some(second),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let (_, _, page1) = h
            .call("GET", "/v1/jobs?limit=1", Some(ACME), &[], None)
            .await;
        assert_eq!(page1["items"].as_array().unwrap().len(), 1);
        let next = page1["next"].as_str().expect("a next token");
        let (_, _, page2) = h
            .call(
                "GET",
                &format!("/v1/jobs?limit=1&continue={next}"),
                Some(ACME),
                &[],
                None,
            )
            .await;
        assert_eq!(page2["items"].as_array().unwrap().len(), 1);
        assert_ne!(page1["items"][0]["id"], page2["items"][0]["id"]);
    })
    .await;
}

#[tokio::test]
async fn cancel_and_erase_are_one_way_intent_on_the_spec() {
    within(120, async {
        let h = Harness::start().await;
        let upload = h.upload(ACME, "eea", dataset(2)).await;
        let order = json!({
            "orderId": "o-9", "family": "sdxl", "conceptType": "object",
            "triggerWord": "mug", "plan": "basic", "uploadId": upload, "trainingConsent": true
        });
        let (s, _, job) = h
            .call(
                "POST",
                "/v1/jobs",
                Some(ACME),
                &[("idempotency-key", "x")],
                Some(order),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        let (s, _, cancelled) = h
            .call(
                "POST",
                &format!("/v1/jobs/{id}/cancel"),
                Some(ACME),
                &[],
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{cancelled}");
        let api: Api<LoRATrainingJob> = Api::namespaced(h.sim.client(), "acme");
        let cr = api.get(&id).await.unwrap();
        assert!(
            cr.spec.cancel,
            "the operator is told to stop the job for good"
        );
        assert_eq!(cr.status, None, "the API never writes status");
        // Consent withdrawn: recorded on the spec, one-way, for the operator to act on.
        let (s, _, w) = h
            .call(
                "POST",
                &format!("/v1/jobs/{id}/consent/withdraw"),
                Some(ACME),
                &[],
                None,
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{w}");
        assert_eq!(w["consentWithdrawn"], true);
        let withdrawn = api.get(&id).await.unwrap();
        assert!(
            withdrawn.spec.data_use.training_consent && withdrawn.spec.data_use.consent_withdrawn
        );
        // Nobody can take a cancel back: the apiserver refuses it.
        let undo = api
            .patch(
                &id,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({"spec": {"cancel": false}})),
            )
            .await
            .unwrap_err();
        assert!(
            undo.to_string().contains("spec.cancel cannot be undone"),
            "{undo}"
        );

        let prefix = format!("acme/{id}-{}/", cr.uid().unwrap());
        h.put("out-eu", &format!("{prefix}b"), b"2").await;
        for _ in 0..2 {
            let (s, _, body) = h
                .call("DELETE", &format!("/v1/jobs/{id}"), Some(ACME), &[], None)
                .await;
            assert_eq!(s, StatusCode::ACCEPTED, "{body}");
            assert_eq!(body["erasureRequested"], true);
        }
        let cr = api.get(&id).await.unwrap();
        let erasure = cr.spec.erasure.clone().expect("erasure on the spec");
        assert_eq!(erasure.reason, ErasureReason::CustomerRequest);
        assert_eq!(cr.status, None);
        // Downloads close at once; the data itself is the operator's to delete.
        let (s, _, e) = h
            .call(
                "GET",
                &format!("/v1/jobs/{id}/artifacts"),
                Some(ACME),
                &[],
                None,
            )
            .await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::GONE, Some("artifacts_deleted"))
        );
        assert_eq!(h.keys("out-eu").await, vec![format!("{prefix}b")]);
        let metrics = h.app.metrics.render();
        assert!(
            metrics.contains("loraplane_api_erasure_requests_total{reason=\"customerRequest\"} 1"),
            "{metrics}"
        );
        // A job that does not exist cannot be erased.
        let (s, _, _) = h
            .call("DELETE", "/v1/jobs/nope", Some(ACME), &[], None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    })
    .await;
}

#[tokio::test]
async fn every_documented_route_is_served() {
    within(120, async {
        let h = Harness::start().await;
        let (s, _, doc) = h.call("GET", "/openapi.json", None, &[], None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            doc["openapi"].as_str().map(|v| v.starts_with("3.")),
            Some(true)
        );
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                let concrete = path.replace("{id}", "x");
                let (s, _, body) = h
                    .call(&method.to_uppercase(), &concrete, None, &[], None)
                    .await;
                // Unauthenticated: 401 (or 400 for the signed webhook), never "no such route".
                assert!(
                    s == StatusCode::UNAUTHORIZED || s == StatusCode::BAD_REQUEST,
                    "{method} {path}: {s} {body}"
                );
                assert!(body["error"]["code"].is_string());
            }
        }
        for p in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(
                h.call("GET", p, None, &[], None).await.0,
                StatusCode::OK,
                "{p}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn tenants_over_their_rate_get_429_with_retry_after() {
    within(120, async {
        let h = Harness::start_with(|c| c.limits.tenant_rps = 1.0).await;
        // Burst of two, then throttled; another tenant is unaffected.
        for _ in 0..2 {
            assert_eq!(
                h.call("GET", "/v1/jobs", Some(ACME), &[], None).await.0,
                StatusCode::OK
            );
        }
        let (s, headers, e) = h.call("GET", "/v1/jobs", Some(ACME), &[], None).await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e["error"]["code"], "rate_limited");
        let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(wait >= 1);
        assert_eq!(
            h.call("GET", "/v1/jobs", Some(GLOBEX), &[], None).await.0,
            StatusCode::OK
        );
        let m = h.call("GET", "/metrics", None, &[], None).await;
        assert_eq!(m.0, StatusCode::OK);
        let text = h.app.metrics.render();
        assert!(
            text.contains(
                r#"loraplane_api_requests_total{method="GET",route="/v1/jobs",status="429"} 1"#
            ),
            "{text}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_client_address_over_its_rate_gets_429_and_others_do_not() {
    within(120, async {
        // Tenants are not limited here: only the per-address bucket (1/s, burst 2) can refuse.
        let h = Harness::start_with(|c| {
            c.limits.ip_rps = 1.0;
            c.limits.tenant_rps = 1e9;
        })
        .await;
        let from = |ip: [u8; 4], path: &'static str| {
            let url = format!("{}{path}", h.base);
            async move {
                let auth = [("authorization".to_string(), format!("Bearer {ACME}"))];
                http_from(Some(ip.into()), "GET", &url, &auth, Vec::new()).await
            }
        };
        for _ in 0..2 {
            assert_eq!(from([127, 0, 0, 2], "/v1/jobs").await.0, StatusCode::OK);
        }
        let (s, headers, body) = from([127, 0, 0, 2], "/v1/jobs").await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["content-type"], "application/json");
        let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(wait >= 1);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limited");
        assert!(body["error"]["message"].is_string());
        assert!(headers.contains_key("x-request-id"));
        // Unauthenticated requests from the same address are throttled before anything else.
        let (s, _, _) = from([127, 0, 0, 2], "/openapi.json").await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
        // Probes are never throttled, and another address has its own bucket.
        assert_eq!(from([127, 0, 0, 2], "/healthz").await.0, StatusCode::OK);
        assert_eq!(from([127, 0, 0, 3], "/v1/jobs").await.0, StatusCode::OK);
        // After the advertised wait the address is served again.
        tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
        assert_eq!(from([127, 0, 0, 2], "/v1/jobs").await.0, StatusCode::OK);
    })
    .await;
}
