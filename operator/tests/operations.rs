//! Start-up and endpoints against kube-sim: the operator waits for the CRD and says so through
//! `/readyz`, then serves `/healthz` and `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube_sim::{KubeSim, SimConfig};
use loraplane_operator::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_the_crd_then_becomes_ready_and_serves_metrics() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let sim = KubeSim::start(SimConfig {
            topology: Some(topology(false)),
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:ok", 30), "op-a");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let http = tokio::spawn(server::serve(
            "127.0.0.1:0".parse().unwrap(),
            op.metrics.clone(),
            op.health.clone(),
            stop_rx,
            Some(bound_tx),
        ));
        let addr = bound_rx.await.unwrap();
        assert_eq!(http_get(addr, "/healthz").await.0, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            http_get(addr, "/readyz").await.0,
            503,
            "not ready without the CRD"
        );

        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&loraplane_crds::crd_yaml().unwrap()).unwrap();
        Api::<CustomResourceDefinition>::all(client.clone())
            .create(&PostParams::default(), &crd)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while http_get(addr, "/readyz").await.0 != 200 {
            assert!(tokio::time::Instant::now() < deadline, "never became ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (code, body) = http_get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("loraplane_jobs{phase=\"Pending\"}"), "{body}");
        stop_tx.send_replace(true);
        http.await.unwrap().unwrap();
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
