#![allow(clippy::unwrap_used, clippy::expect_used)]
//! TEMPORARY measurement (removed after use).
use std::time::{Duration, Instant};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube_sim::cluster::Topology;
use kube_sim::{KubeSim, SimConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure() {
    let n: usize = std::env::var("N").unwrap().parse().unwrap();
    let topo = format!("regions:\n  - name: r\n    jurisdiction: eea\n    pools:\n      - {{name: p, gpuProduct: X, gpuMemoryGiB: 24, gpusPerNode: 8, instanceType: t, nodes: {}}}\n", n / 8 + 1);
    let sim = KubeSim::start(SimConfig { topology: Some(Topology::from_yaml(&topo).unwrap()), ..SimConfig::default() }).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
    let t0 = Instant::now();
    for i in 0..n {
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": format!("p{i}"), "annotations": {"kube-sim.loraplane.io/script": "duration=200ms"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}})).unwrap();
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    let created = t0.elapsed();
    let mut bound_at = None;
    loop {
        let list = pods.list(&ListParams::default()).await.unwrap().items;
        let bound = list.iter().filter(|p| p.spec.as_ref().unwrap().node_name.is_some()).count();
        let done = list.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")).count();
        if bound == n && bound_at.is_none() { bound_at = Some(t0.elapsed()); }
        if done == n { break; }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = t0.elapsed();
    let line = format!("n={n} created={created:?} all_bound={bound_at:?} all_succeeded={all:?}\n");
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open("/tmp/measure/log.txt").unwrap();
    std::io::Write::write_all(&mut f, line.as_bytes()).unwrap();
}
