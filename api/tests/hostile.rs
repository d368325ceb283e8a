#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hostile input against the running API (kube-sim + SeaweedFS): what an attacker or a broken
//! client sends is answered with a 4xx JSON error, never a 5xx, never by work proportional to
//! the attack, and never turned into a metric label or an apiserver call it should not cost.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use loraplane_dataset::testing::dataset;
use serde_json::{Value, json};

#[tokio::test]
async fn a_signature_header_stuffed_with_entries_is_refused_without_checking_them() {
    within(60, async {
        let h = Harness::start().await;
        let body = serde_json::to_vec(&json!({"id": "evt_x", "type": "charge.refunded"})).unwrap();
        let t = now();
        let good = loraplane_api::stripe::sign(WEBHOOK_SECRET, t, &body);
        // Thousands of entries, the genuine one last: refused before any HMAC.
        let mut header = format!("t={t}");
        for _ in 0..2_000 {
            header.push_str(&format!(",v1={}", "0".repeat(64)));
        }
        header.push_str(&format!(",v1={good}"));
        let (s, _, b) = http(
            "POST",
            &format!("{}/v1/webhooks/stripe", h.base),
            &[("stripe-signature".into(), header)],
            body,
        )
        .await;
        let e: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_signature")),
            "{e}"
        );
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("longer than")
        );
    })
    .await;
}

#[tokio::test]
async fn malformed_job_ids_and_continue_tokens_are_400s_not_502s() {
    within(60, async {
        let h = Harness::start().await;
        for id in [
            "UPPER",
            "a%2Fb",
            "%C3%A9t%C3%A9",
            "-lead",
            "x%3Fy%3Dz",
            &"a".repeat(254),
        ] {
            for (m, p) in [
                ("GET", format!("/v1/jobs/{id}")),
                ("DELETE", format!("/v1/jobs/{id}")),
                ("POST", format!("/v1/jobs/{id}/cancel")),
                ("POST", format!("/v1/jobs/{id}/consent/withdraw")),
                ("GET", format!("/v1/jobs/{id}/artifacts")),
            ] {
                let (s, _, e) = h.call(m, &p, Some(ACME), &[], None).await;
                assert_eq!(
                    (s, e["error"]["code"].as_str()),
                    (StatusCode::BAD_REQUEST, Some("job_id_invalid")),
                    "{m} {p}: {e}"
                );
            }
        }
        // A well-formed id that names nothing is still a plain 404.
        let (s, _, _) = h
            .call("GET", "/v1/jobs/ltj-none", Some(ACME), &[], None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        for token in ["garbage", "eyJ2IjoxfQ", "%00"] {
            let (s, _, e) = h
                .call(
                    "GET",
                    &format!("/v1/jobs?continue={token}"),
                    Some(ACME),
                    &[],
                    None,
                )
                .await;
            assert_eq!(
                (s, e["error"]["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some("continue_invalid")),
                "{token}: {e}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn trigger_words_with_controls_or_bidi_overrides_are_refused() {
    within(60, async {
        let h = Harness::start().await;
        let upload = h.upload(ACME, "eea", dataset(2)).await;
        for (i, word) in [
            "nul\u{0}byte",
            "rtl\u{202e}txet",
            "line\u{2028}sep",
            "zw\u{200b}j",
        ]
        .into_iter()
        .enumerate()
        {
            let order = json!({
                "orderId": format!("hostile-{i}"), "family": "sd15", "conceptType": "style",
                "triggerWord": word, "plan": "basic", "uploadId": upload
            });
            let (s, _, e) = h
                .call(
                    "POST",
                    "/v1/jobs",
                    Some(ACME),
                    &[("idempotency-key", &format!("k-{i}"))],
                    Some(order),
                )
                .await;
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{word:?}: {e}");
            assert!(
                e["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("triggerWord"),
                "{e}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn an_invented_method_is_no_metric_label_and_readyz_is_throttled() {
    within(60, async {
        let h = Harness::start_with(|c| c.limits.ip_rps = 1.0).await;
        let (s, _, _) = http(
            "FROBNICATE",
            &format!("{}/v1/jobs", h.base),
            &[],
            Vec::new(),
        )
        .await;
        assert!(s.is_client_error(), "{s}");
        let metrics = h.app.metrics.render();
        assert!(!metrics.contains("FROBNICATE"), "{metrics}");
        assert!(metrics.contains("method=\"OTHER\""), "{metrics}");
        // Readiness asks the apiserver, so a flood of probes from one address is throttled.
        let mut statuses = Vec::new();
        for _ in 0..10 {
            let (s, _, _) = http("GET", &format!("{}/readyz", h.base), &[], Vec::new()).await;
            statuses.push(s);
        }
        assert_eq!(statuses[0], StatusCode::OK);
        assert!(
            statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
            "{statuses:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
    within(60, async {
        let h = Harness::start_with(|c| {
            c.limits.ip_rps = 1.0;
            c.limits.trusted_proxies = vec!["127.0.0.2".into()];
        })
        .await;
        let url = format!("{}/v1/jobs", h.base);
        let limited = |from: [u8; 4]| {
            let url = url.clone();
            async move {
                let mut n = 0;
                for i in 0..6 {
                    let xff = vec![("x-forwarded-for".to_string(), format!("198.51.100.{i}"))];
                    let (s, _, _) =
                        http_from(Some(from.into()), "GET", &url, &xff, Vec::new()).await;
                    n += usize::from(s == StatusCode::TOO_MANY_REQUESTS);
                }
                n
            }
        };
        // Behind the ingress every customer has a bucket of their own.
        assert_eq!(limited([127, 0, 0, 2]).await, 0);
        // A client writing the header itself does not get a fresh bucket per request.
        assert!(limited([127, 0, 0, 3]).await > 0);
    })
    .await;
}

/// Reads from a raw connection until the server closes it; what it sent.
async fn until_closed(conn: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got).await;
    got
}

#[tokio::test]
async fn slow_and_idle_clients_are_dropped_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    within(60, async {
        let h = Harness::start_with(|c| {
            c.limits.header_timeout_seconds = 1;
            c.limits.body_timeout_seconds = 1;
            c.limits.max_connections = 2;
        })
        .await;
        let addr = h.base.trim_start_matches("http://").to_string();

        // Slowloris: half a request head, then nothing. The server hangs up on its own.
        let mut slow = TcpStream::connect(&addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut slow))
            .await
            .expect("a client that never finishes its headers is dropped");
        assert!(!String::from_utf8_lossy(&got).contains("200 OK"));

        // A body that never arrives: refused after the body timeout, not waited on forever.
        let mut stalled = TcpStream::connect(&addr).await.unwrap();
        stalled
            .write_all(
                b"POST /v1/webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
            )
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut stalled))
            .await
            .expect("a stalled body is given up on");
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 4"), "{got}");

        // Two connections held open (the cap), a third waits: it is served only once one of
        // the two goes.
        let mut held: Vec<TcpStream> = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(&addr).await.unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 12];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"HTTP/1.1 200");
            held.push(c);
        }
        let mut third = TcpStream::connect(&addr).await.unwrap();
        third
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        let early =
            tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut buf)).await;
        assert!(early.is_err(), "a connection past the cap was served");
        drop(held.pop());
        let got = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut third))
            .await
            .expect("the waiting connection is served once a slot frees");
        assert!(String::from_utf8_lossy(&got).contains("200 OK"), "{got:?}");
    })
    .await;
}
