//! A trainer pod holds no S3 credential, and the presigned URLs the operator grants it reach its
//! own job's objects and nothing else: against kube-sim and a real SeaweedFS (which checks
//! every signature), the grants of one job's pod read its dataset and write its LoRA, and the
//! same URLs bent to another job's keys are refused with 403.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use loraplane_crds::trainer::TrainerConfig;
use loraplane_operator::resources::{CONFIG_KEY, secret_name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(90);

/// One plain HTTP/1.1 exchange with SeaweedFS on loopback, as a trainer would make it:
/// (status, body).
async fn http(method: &str, url: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").expect("a loopback http URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut conn = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).await.unwrap();
    let text = String::from_utf8_lossy(&reply);
    let status = text[9..12].parse().unwrap();
    let start = text.find("\r\n\r\n").map_or(reply.len(), |i| i + 4);
    (status, reply[start..].to_vec())
}

async fn trainer_config(client: &kube::Client, job: &str) -> TrainerConfig {
    let secret = Api::<Secret>::namespaced(client.clone(), NS)
        .get(&secret_name(job))
        .await
        .unwrap();
    serde_json::from_slice(&secret.data.unwrap()[CONFIG_KEY].0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_holds_no_credential_and_its_grants_reach_only_its_own_objects() {
    tokio::time::timeout(LIMIT, async {
        let (sim, client, s3, op) = start_with_s3(script("trainer:long", None, 0, 0)).await;
        s3.put("datasets-eu-west", "uploads/ns/a.zip", b"dataset of a")
            .await;
        s3.put("datasets-eu-west", "uploads/ns/b.zip", b"dataset of b")
            .await;
        let dataset = |name: &str| {
            serde_json::json!({"dataset": {
                "uri": format!("s3://datasets-eu-west/uploads/ns/{name}.zip"),
                "sha256": "a".repeat(64),
                "region": "eu-west",
            }})
        };
        let a = create_running(&client, "job-a", dataset("a")).await;
        let b = create_running(&client, "job-b", dataset("b")).await;

        // The pod: no environment, no Secret but its config file, nothing naming a key.
        let pods = pods_of(&client, &a).await;
        let pod = serde_json::to_string(&pods[0]).unwrap();
        for needle in ["secretKeyRef", "envFrom", "AWS_", "\"env\""] {
            assert!(!pod.contains(needle), "{needle} in the trainer pod: {pod}");
        }

        let config = trainer_config(&client, "job-a").await;
        let grants = &config.grants;
        let prefix = |bucket: &str, job: &kube::api::ObjectMeta| {
            format!(
                "s3://{bucket}-eu-west/{NS}/{}-{}/",
                job.name.as_deref().unwrap(),
                job.uid.as_deref().unwrap()
            )
        };
        let ck = format!(
            "{}checkpoint.safetensors",
            prefix("checkpoints", &a.metadata)
        );
        let kohya = format!("{}job-a.safetensors", prefix("outputs", &a.metadata));
        let peft = format!(
            "{}pytorch_lora_weights.safetensors",
            prefix("outputs", &a.metadata)
        );
        assert_eq!(
            grants.get.keys().cloned().collect::<Vec<_>>(),
            vec![
                ck.clone(),
                "s3://datasets-eu-west/uploads/ns/a.zip".to_string()
            ]
        );
        assert_eq!(
            grants.put.keys().cloned().collect::<Vec<_>>(),
            vec![ck.clone(), kohya.clone(), peft]
        );
        assert!(grants.expires_at.is_some());

        // What the grants allow works...
        let get_a = &grants.get["s3://datasets-eu-west/uploads/ns/a.zip"];
        assert_eq!(
            http("GET", get_a, b"").await,
            (200, b"dataset of a".to_vec())
        );
        let put_kohya = &grants.put[&kohya];
        assert_eq!(http("PUT", put_kohya, b"lora").await.0, 200);
        // ...and nothing else: another job's dataset, another job's output, another method,
        // and the bucket without any signature.
        let bent = get_a.replace("/uploads/ns/a.zip", "/uploads/ns/b.zip");
        assert_eq!(http("GET", &bent, b"").await.0, 403);
        let b_prefix = prefix("outputs", &b.metadata);
        let b_path = b_prefix.trim_start_matches("s3://outputs-eu-west");
        let a_path = prefix("outputs", &a.metadata);
        let a_path = a_path.trim_start_matches("s3://outputs-eu-west");
        let bent = put_kohya.replace(a_path, b_path);
        assert_ne!(&bent, put_kohya);
        assert_eq!(http("PUT", &bent, b"overwrite").await.0, 403);
        assert_eq!(http("DELETE", get_a, b"").await.0, 403);
        let unsigned = get_a.split('?').next().unwrap().replace("a.zip", "b.zip");
        assert_eq!(http("GET", &unsigned, b"").await.0, 403);
        assert!(
            !s3.keys()
                .await
                .iter()
                .any(|k| k.starts_with(b_path.trim_start_matches('/'))),
            "nothing was written under job-b"
        );
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
