#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The simulated cluster's nodes and scheduler, driven through a real `kube::Client` (and
//! `kubectl` for the node listing): topology labels, GPU placement, kube-scheduler's
//! Unschedulable reporting and retry once capacity frees, taints and tolerations.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube_sim::cluster::{KubeletConfig, Topology};
use kube_sim::{KubeSim, SimConfig};
use serde_json::json;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}

const SMALL: &str = r#"
regions:
  - name: eu-west
    jurisdiction: eea
    pools:
      - {name: ew-l4, gpuProduct: NVIDIA-L4, gpuMemoryGiB: 24, gpusPerNode: 1, instanceType: g6.xlarge, nodes: 1}
      - {name: ew-spot, gpuProduct: NVIDIA-L4, gpuMemoryGiB: 24, gpusPerNode: 1, spot: true, instanceType: g6.xlarge, nodes: 1,
         taints: [{key: loraplane.io/spot, value: "true", effect: NoSchedule}]}
  - name: us-east
    jurisdiction: us
    pools:
      - {name: us-a100, gpuProduct: NVIDIA-A100-SXM4-80GB, gpuMemoryGiB: 80, gpusPerNode: 2, instanceType: p4d, nodes: 1}
"#;

async fn sim(topology: &str) -> KubeSim {
    KubeSim::start(SimConfig {
        topology: Some(Topology::from_yaml(topology).unwrap()),
        kubelet: KubeletConfig::default(),
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn gpu_pod(name: &str, gpus: u32, script: &str, spec_extra: serde_json::Value) -> Pod {
    let mut spec = json!({
        "containers": [{"name": "main", "image": "trainer:1",
                        "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}],
        "restartPolicy": "Never",
    });
    for (k, v) in spec_extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": {"kube-sim.loraplane.io/script": script}},
        "spec": spec,
    }))
    .unwrap()
}

/// Polls the pod until `pred` holds; returns it.
async fn wait_pod(api: &Api<Pod>, name: &str, what: &str, pred: impl Fn(&Pod) -> bool) -> Pod {
    let mut last = None;
    for _ in 0..1000 {
        if let Some(p) = api.get_opt(name).await.unwrap() {
            if pred(&p) {
                return p;
            }
            last = Some(p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pod {name} never became {what}; last: {last:#?}");
}

fn node_of(p: &Pod) -> Option<String> {
    p.spec.as_ref().and_then(|s| s.node_name.clone())
}

fn scheduled_condition(p: &Pod) -> Option<(String, String, String)> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled")?;
    Some((
        c.status.clone(),
        c.reason.clone().unwrap_or_default(),
        c.message.clone().unwrap_or_default(),
    ))
}

fn unschedulable(p: &Pod) -> bool {
    scheduled_condition(p).is_some_and(|(_, reason, _)| reason == "Unschedulable")
}

#[tokio::test]
async fn nodes_of_the_shipped_topology_are_listed_with_their_labels() {
    within(async {
        let topo = Topology::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/three-regions.yaml"
        ))
        .unwrap();
        let sim = KubeSim::start(SimConfig {
            topology: Some(topo),
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let nodes: Api<Node> = Api::all(sim.client());
        let list = nodes.list(&ListParams::default()).await.unwrap().items;
        assert_eq!(list.len(), 12);
        let spot_us = nodes.get("us-east-a10g-spot-1").await.unwrap();
        let labels = spot_us.metadata.labels.clone().unwrap();
        assert_eq!(labels["topology.kubernetes.io/region"], "us-east");
        assert_eq!(labels["topology.kubernetes.io/zone"], "us-east-1b");
        assert_eq!(labels["node.kubernetes.io/instance-type"], "g5.xlarge");
        assert_eq!(labels["nvidia.com/gpu.product"], "NVIDIA-A10G");
        assert_eq!(labels["nvidia.com/gpu.memory"], "24576");
        assert_eq!(labels["loraplane.io/node-pool"], "us-east-a10g-spot");
        assert_eq!(labels["karpenter.sh/capacity-type"], "spot");
        let status = spot_us.status.unwrap();
        assert_eq!(status.allocatable.unwrap()["nvidia.com/gpu"].0, "1");
        assert!(
            status
                .conditions
                .unwrap()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        );
        let eea = nodes
            .list(
                &ListParams::default()
                    .labels("topology.kubernetes.io/region in (eu-west,eu-central)"),
            )
            .await
            .unwrap();
        assert_eq!(eea.items.len(), 8);

        // kubectl sees the same nodes with the region column.
        let dir = std::env::temp_dir().join(format!("kube-sim-kubectl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig).unwrap();
        let out = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["get", "nodes", "-L", "topology.kubernetes.io/region"])
            .output()
            .await
            .expect("kubectl must be on PATH (https://kubernetes.io/docs/tasks/tools/)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.lines().next().unwrap().contains("REGION"),
            "{stdout}"
        );
        let row = stdout
            .lines()
            .find(|l| l.starts_with("eu-central-a100-0 "))
            .unwrap_or_else(|| panic!("{stdout}"));
        assert!(
            row.contains("Ready") && row.trim_end().ends_with("eu-central"),
            "{row}"
        );
        assert_eq!(stdout.lines().count(), 13, "{stdout}");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test]
async fn gpu_pods_bind_to_matching_nodes_and_wait_for_capacity() {
    within(async {
        let sim = sim(SMALL).await;
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        let us = json!({"nodeSelector": {"topology.kubernetes.io/region": "us-east"}});
        // Two one-GPU pods fill the two-GPU US node; a third must wait.
        for name in ["a", "b"] {
            pods.create(&PostParams::default(), &gpu_pod(name, 1, "duration=forever", us.clone())).await.unwrap();
        }
        for name in ["a", "b"] {
            let p = wait_pod(&pods, name, "Running", |p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .await;
            assert_eq!(node_of(&p).as_deref(), Some("us-a100-0"));
        }
        pods.create(&PostParams::default(), &gpu_pod("c", 1, "duration=1s", us.clone())).await.unwrap();
        let c = wait_pod(&pods, "c", "Unschedulable", unschedulable).await;
        assert_eq!(node_of(&c), None);
        let (status, reason, message) = scheduled_condition(&c).unwrap();
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Unschedulable"));
        assert_eq!(
            message,
            "0/3 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) didn't match Pod's node affinity/selector, \
             1 node(s) had untolerated taint {loraplane.io/spot: true}."
        );

        // Deleting one running pod frees a GPU: the waiting pod is bound and runs to the end.
        pods.delete("a", &DeleteParams::default()).await.unwrap();
        let c = wait_pod(&pods, "c", "Succeeded", |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
        })
        .await;
        assert_eq!(node_of(&c).as_deref(), Some("us-a100-0"));
        assert_eq!(scheduled_condition(&c).unwrap().0, "True");
        // The deleted pod is gone for good once its kubelet stopped it.
        for _ in 0..400 {
            if pods.get_opt("a").await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(pods.get_opt("a").await.unwrap().is_none());

        // A two-GPU pod needs the whole node; node affinity keeps it off the L4 pool.
        let affinity = json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A100-SXM4-80GB"]},
                {"key": "karpenter.sh/capacity-type", "operator": "NotIn", "values": ["spot"]}]}]}}}});
        pods.create(&PostParams::default(), &gpu_pod("big", 2, "duration=1s", affinity)).await.unwrap();
        let big = wait_pod(&pods, "big", "Unschedulable", unschedulable).await;
        assert!(scheduled_condition(&big).unwrap().2.contains("1 Insufficient nvidia.com/gpu"));
        pods.delete("b", &DeleteParams::default()).await.unwrap();
        let big = wait_pod(&pods, "big", "bound", |p| node_of(p).is_some()).await;
        assert_eq!(node_of(&big).as_deref(), Some("us-a100-0"));
    })
    .await;
}

#[tokio::test]
async fn spot_taint_keeps_pods_without_the_toleration_away() {
    within(async {
        let sim = sim(SMALL).await;
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        let spot = json!({"nodeSelector": {"loraplane.io/node-pool": "ew-spot"}});
        pods.create(&PostParams::default(), &gpu_pod("intolerant", 1, "duration=forever", spot.clone())).await.unwrap();
        let p = wait_pod(&pods, "intolerant", "Unschedulable", unschedulable).await;
        assert_eq!(
            scheduled_condition(&p).unwrap().2,
            "0/3 nodes are available: 1 node(s) had untolerated taint {loraplane.io/spot: true}, \
             2 node(s) didn't match Pod's node affinity/selector."
        );
        let mut tolerant = spot;
        tolerant["tolerations"] = json!([{"key": "loraplane.io/spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]);
        pods.create(&PostParams::default(), &gpu_pod("tolerant", 1, "duration=forever", tolerant)).await.unwrap();
        let p = wait_pod(&pods, "tolerant", "bound", |p| node_of(p).is_some()).await;
        assert_eq!(node_of(&p).as_deref(), Some("ew-spot-0"));
        // Still unschedulable: the taint, not capacity, is what keeps it out.
        assert_eq!(node_of(&pods.get("intolerant").await.unwrap()), None);
    })
    .await;
}
