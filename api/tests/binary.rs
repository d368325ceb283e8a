#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `loraplane-api` binary: it starts from its configuration files and environment
//! against a kube-sim apiserver (through a kubeconfig) and a real SeaweedFS, answers its probes
//! and its OpenAPI document, and refuses a bad configuration with one line naming the field.

mod common;

use std::path::Path;
use std::process::Stdio;

use axum::http::StatusCode;
use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_loraplane-api");

const PLATFORM: &str = r#"
regions:
  - name: eu-west
    jurisdiction: eea
    s3: {endpoint: "ENDPOINT", region: us-east-1, forcePathStyle: true}
    buckets: {datasets: ds-eu, checkpoints: ck-eu, outputs: out-eu}
pools: []
families: []
"#;

fn api_config(token_sha256: &str) -> String {
    format!(
        r#"
stripeNamespace: orders
plans:
  basic: {{retention: standard, maxSteps: 500}}
tenants:
  - {{name: acme, namespace: acme, tokenSha256: "{token_sha256}"}}
"#
    )
}

fn scratch_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("loraplane-api-bin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The binary with its flags and environment (everything but the API config file).
fn command(dir: &Path, h: &Harness, config: &Path, log_format: &str) -> Command {
    let kubeconfig = dir.join("kubeconfig");
    h.sim.write_kubeconfig(&kubeconfig).unwrap();
    let platform = dir.join("platform.yaml");
    std::fs::write(&platform, PLATFORM.replace("ENDPOINT", h.s3.endpoint())).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["--listen", "127.0.0.1:0", "--log-format", log_format])
        .arg("--config")
        .arg(config)
        .arg("--platform")
        .arg(&platform)
        .env("KUBECONFIG", &kubeconfig)
        .env("STRIPE_WEBHOOK_SECRET", "whsec_a,whsec_b")
        .env("ID_HASH_KEY", "k")
        .env("STRIPE_API_KEY", stripe_sim::SECRET_KEY)
        .env("AWS_ACCESS_KEY_ID", h.s3.access_key())
        .env("AWS_SECRET_ACCESS_KEY", h.s3.secret_key())
        .env("POD_NAME", "api-0")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Reads the JSON log lines until the "serving" line and returns its address.
async fn serving_address(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if v["message"] == "loraplane-api serving" {
            // Keep draining the logs so the binary never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return v["listen"].as_str().unwrap().to_string();
        }
    }
    panic!(
        "loraplane-api exited before serving: {:?}",
        child.wait().await
    );
}

#[tokio::test]
async fn the_binary_starts_from_its_config_files_and_answers_probes_and_openapi() {
    within(120, async {
        let h = Harness::start().await;
        let dir = scratch_dir();
        let config = dir.join("api.yaml");
        std::fs::write(
            &config,
            api_config(&loraplane_api::app::sha256_hex(ACME.as_bytes())),
        )
        .unwrap();
        let mut child = command(&dir, &h, &config, "json").spawn().unwrap();
        let addr = serving_address(&mut child).await;
        let base = format!("http://{addr}");
        for path in ["/healthz", "/readyz"] {
            let (s, _, body) = http("GET", &format!("{base}{path}"), &[], Vec::new()).await;
            assert_eq!(
                (s, body.as_slice()),
                (StatusCode::OK, b"ok".as_slice()),
                "{path}"
            );
        }
        let (s, _, doc) = http("GET", &format!("{base}/openapi.json"), &[], Vec::new()).await;
        assert_eq!(s, StatusCode::OK);
        let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert!(doc["paths"]["/v1/webhooks/stripe"]["post"].is_object());
        // The tenant of the config file is known, and the cluster is the simulator's.
        let auth = [("authorization".to_string(), format!("Bearer {ACME}"))];
        let (s, _, list) = http("GET", &format!("{base}/v1/jobs"), &auth, Vec::new()).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&list));
        // Either rolled webhook secret is accepted.
        let body = br#"{"id":"evt_1","type":"customer.created","data":{"object":{}}}"#.to_vec();
        let sig = loraplane_api::stripe::header(b"whsec_b", now(), &body);
        let (s, _, ack) = http(
            "POST",
            &format!("{base}/v1/webhooks/stripe"),
            &[("stripe-signature".into(), sig)],
            body,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&ack));
        assert!(child.try_wait().unwrap().is_none(), "still running");
        child.kill().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_bad_config_exits_non_zero_with_one_line_naming_the_field() {
    within(120, async {
        let h = Harness::start().await;
        let dir = scratch_dir();
        let cases = [
            (api_config("not-a-hash"), "tenants[0].tokenSha256"),
            (
                api_config(&"a".repeat(64)).replace("maxSteps: 500", "maxSteps: 0"),
                "plans.basic.maxSteps",
            ),
            (
                api_config(&"a".repeat(64)).replace("stripeNamespace", "stripeNamspace"),
                "stripeNamspace",
            ),
        ];
        for (i, (text, field)) in cases.iter().enumerate() {
            let config = dir.join(format!("api-{i}.yaml"));
            std::fs::write(&config, text).unwrap();
            let out = command(&dir, &h, &config, "text").output().await.unwrap();
            assert!(!out.status.success(), "{field}: exited {:?}", out.status);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(lines.len(), 1, "one line for {field}: {stderr}");
            assert!(lines[0].contains(field), "{field} not named in: {stderr}");
        }
        // A missing secret is named too, and no secret value ever appears.
        let config = dir.join("api-ok.yaml");
        std::fs::write(&config, api_config(&"a".repeat(64))).unwrap();
        let out = command(&dir, &h, &config, "text")
            .env_remove("ID_HASH_KEY")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("ID_HASH_KEY"), "{stderr}");
        assert!(!stderr.contains("whsec_"), "{stderr}");
        let out = command(&dir, &h, &config, "text")
            .env_remove("STRIPE_API_KEY")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("STRIPE_API_KEY"), "{stderr}");
        assert!(!stderr.contains("sk_test"), "{stderr}");
    })
    .await;
}
