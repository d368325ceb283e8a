#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The simulated kubelets and node faults, driven through a real `kube::Client`: scripted
//! pods with exit codes, trainer-style progress and termination messages; a local-process pod
//! with Secret and ConfigMap volumes, env from a Secret and a ConfigMap, a claim directory, logs through `pods/log` and its
//! termination message; graceful deletion of a running process; spot preemption and node loss
//! with their DisruptionTarget conditions.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, LogParams, PostParams};
use kube_sim::cluster::{KubeletConfig, LocalImage, Script, ScriptRule, Topology};
use kube_sim::{KubeSim, SimConfig};
use loraplane_crds::trainer::{Outcome, TrainerEvent, TrainerSummary};
use serde_json::json;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out")
}

const TOPOLOGY: &str = r#"
regions:
  - name: eu-west
    jurisdiction: eea
    pools:
      - {name: ew-l4, gpuProduct: NVIDIA-L4, gpuMemoryGiB: 24, gpusPerNode: 1, instanceType: g6.xlarge, nodes: 2}
      - {name: ew-spot, gpuProduct: NVIDIA-L4, gpuMemoryGiB: 24, gpusPerNode: 1, spot: true, instanceType: g6.xlarge, nodes: 1,
         taints: [{key: loraplane.io/spot, value: "true", effect: NoSchedule}]}
"#;

async fn sim(kubelet: KubeletConfig) -> KubeSim {
    KubeSim::start(SimConfig {
        topology: Some(Topology::from_yaml(TOPOLOGY).unwrap()),
        kubelet,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn pod(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).unwrap()
}

fn phase(p: &Pod) -> Option<&str> {
    p.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn terminated(p: &Pod) -> k8s_openapi::api::core::v1::ContainerStateTerminated {
    p.status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .unwrap_or_else(|| panic!("container not terminated: {p:#?}"))
}

fn condition<'a>(p: &'a Pod, type_: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

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

async fn wait_gone(api: &Api<Pod>, name: &str) {
    for _ in 0..1000 {
        if api.get_opt(name).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pod {name} was never removed");
}

fn scripted(name: &str, image: &str, annotation: Option<&str>) -> Pod {
    let mut p = json!({
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": image,
                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
                 "tolerations": [{"key": "loraplane.io/spot", "operator": "Exists"}]},
    });
    if let Some(a) = annotation {
        p["metadata"]["annotations"] = json!({"kube-sim.loraplane.io/script": a});
    }
    pod(p)
}

#[tokio::test]
async fn scripted_pods_run_to_their_exit_code_with_progress_and_message() {
    within(async {
        let sim = sim(KubeletConfig {
            scripts: vec![ScriptRule {
                image: "ghcr.io/loraplane/trainer:*".into(),
                script: Script {
                    duration: Some(Duration::from_millis(600)),
                    progress_steps: 3,
                    ..Script::default()
                },
            }],
            ..KubeletConfig::default()
        })
        .await;
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        pods.create(
            &PostParams::default(),
            &scripted("ok", "ghcr.io/loraplane/trainer:1", None),
        )
        .await
        .unwrap();
        pods.create(
            &PostParams::default(),
            &scripted(
                "crash",
                "ghcr.io/loraplane/trainer:1",
                Some("duration=300ms,exit=3,message=boom"),
            ),
        )
        .await
        .unwrap();
        pods.create(
            &PostParams::default(),
            &scripted("other", "busybox", Some("exit=2")),
        )
        .await
        .unwrap();

        let seen_running = wait_pod(&pods, "ok", "Running or done", |p| {
            phase(p).is_some_and(|ph| ph != "Pending")
        })
        .await;
        assert!(seen_running.status.as_ref().unwrap().start_time.is_some());
        let ok = wait_pod(&pods, "ok", "Succeeded", |p| phase(p) == Some("Succeeded")).await;
        let t = terminated(&ok);
        assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
        let summary: TrainerSummary = serde_json::from_str(t.message.as_deref().unwrap()).unwrap();
        assert_eq!((summary.outcome, summary.step), (Outcome::Succeeded, 3));
        assert_eq!(condition(&ok, "Ready").unwrap().status, "False");
        let log = pods.logs("ok", &LogParams::default()).await.unwrap();
        let events: Vec<TrainerEvent> = log.lines().filter_map(TrainerEvent::parse_line).collect();
        assert_eq!(events.len(), 3, "{log}");
        assert!(matches!(
            events[2],
            TrainerEvent::Progress {
                step: 3,
                total_steps: 3,
                ..
            }
        ));

        let crash = wait_pod(&pods, "crash", "Failed", |p| phase(p) == Some("Failed")).await;
        let t = terminated(&crash);
        assert_eq!(
            (t.exit_code, t.reason.as_deref(), t.message.as_deref()),
            (3, Some("Error"), Some("boom"))
        );
        let other = wait_pod(&pods, "other", "Failed", |p| phase(p) == Some("Failed")).await;
        assert_eq!(terminated(&other).exit_code, 2);
    })
    .await;
}

#[tokio::test]
async fn local_process_pod_reads_its_secret_writes_its_claim_and_reports() {
    within(async {
        let data_dir = std::env::temp_dir().join(format!("kube-sim-local-{}", std::process::id()));
        let sim = sim(KubeletConfig {
            data_dir: Some(data_dir.clone()),
            local_images: vec![LocalImage { image: "busybox*".into(), entrypoint: vec!["/bin/sh".into(), "-c".into()] }],
            ..KubeletConfig::default()
        })
        .await;
        let client = sim.client();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
        secrets
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "metadata": {"name": "creds"},
                "stringData": {"token": "s3cr3t", "config.yaml": "workDir: /work\n"},
            })).unwrap())
            .await
            .unwrap();
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        config_maps
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "metadata": {"name": "settings"},
                "data": {"MODE": "fast", "app.conf": "level=3\n"},
            })).unwrap())
            .await
            .unwrap();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        claims
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "metadata": {"name": "work"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            })).unwrap())
            .await
            .unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let script = "cat /etc/creds/token > /work/out.txt; cat /etc/creds/config.yaml; \
                      echo \"pod=$POD_NAME key=$API_KEY mode=$CFG_MODE ref=$(POD_NAME)\"; \
                      cat /etc/app/conf/app.conf; echo oops >&2; \
                      printf 'all done' > /dev/termination-log; exit 4";
        pods.create(&PostParams::default(), &pod(json!({
            "metadata": {"name": "local"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main", "image": "busybox:1.36", "command": ["sh", "-c"], "args": [script],
                    "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                    ],
                    "volumeMounts": [
                        {"name": "creds", "mountPath": "/etc/creds", "readOnly": true},
                        {"name": "work", "mountPath": "/work"},
                        {"name": "app", "mountPath": "/etc/app"},
                    ],
                }],
                "volumes": [
                    {"name": "creds", "secret": {"secretName": "creds"}},
                    {"name": "work", "persistentVolumeClaim": {"claimName": "work"}},
                    {"name": "app", "configMap": {"name": "settings", "items": [{"key": "app.conf", "path": "conf/app.conf"}]}},
                ],
            },
        })))
        .await
        .unwrap();

        let done = wait_pod(&pods, "local", "Failed", |p| phase(p) == Some("Failed")).await;
        let t = terminated(&done);
        assert_eq!((t.exit_code, t.message.as_deref()), (4, Some("all done")));

        let cluster = sim.cluster().unwrap();
        let claim_dir = cluster.claim_dir("default", "work").unwrap();
        assert!(claim_dir.starts_with(&data_dir));
        assert_eq!(std::fs::read_to_string(claim_dir.join("out.txt")).unwrap(), "s3cr3t");

        let log = pods.logs("local", &LogParams::default()).await.unwrap();
        assert!(log.contains("pod=local key=s3cr3t mode=fast ref=local"), "{log}");
        assert!(log.contains("level=3"), "{log}");
        assert!(log.contains("oops"), "{log}");
        // The mounted config's path points at the claim's host directory.
        assert!(log.contains(&format!("workDir: {}", claim_dir.display())), "{log}");

        // Deleting the claim deletes its directory.
        pods.delete("local", &DeleteParams::default()).await.unwrap();
        wait_gone(&pods, "local").await;
        claims.delete("work", &DeleteParams::default()).await.unwrap();
        for _ in 0..400 {
            if !claim_dir.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!claim_dir.exists(), "{} still exists", claim_dir.display());
        drop(sim);
        let _ = std::fs::remove_dir_all(&data_dir);
    })
    .await;
}

#[tokio::test]
async fn deleting_a_running_local_process_terminates_it_gracefully() {
    within(async {
        let data_dir = std::env::temp_dir().join(format!("kube-sim-term-{}", std::process::id()));
        let sim = sim(KubeletConfig {
            data_dir: Some(data_dir.clone()),
            local_images: vec![LocalImage { image: "busybox".into(), entrypoint: vec!["/bin/sh".into(), "-c".into()] }],
            ..KubeletConfig::default()
        })
        .await;
        let client = sim.client();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        claims
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "metadata": {"name": "evidence"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            })).unwrap())
            .await
            .unwrap();
        let pods: Api<Pod> = Api::namespaced(client, "default");
        // The process records SIGTERM on its claim, which outlives the pod; the loop runs in
        // a memory-medium emptyDir as its working directory.
        let script = "trap 'echo got-term > /evidence/term; exit 0' TERM; echo started > up; \
                      while true; do sleep 0.1; done";
        pods.create(&PostParams::default(), &pod(json!({
            "metadata": {"name": "sleeper"},
            "spec": {"terminationGracePeriodSeconds": 10, "containers": [{
                "name": "main", "image": "busybox", "args": [script], "workingDir": "/scratch",
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"},
                                 {"name": "evidence", "mountPath": "/evidence"}]}],
                "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory"}},
                            {"name": "evidence", "persistentVolumeClaim": {"claimName": "evidence"}}]},
        })))
        .await
        .unwrap();
        let running = wait_pod(&pods, "sleeper", "Running", |p| phase(p) == Some("Running")).await;
        let scratch = data_dir.join("pods").join(running.metadata.uid.unwrap()).join("volumes").join("scratch");
        for _ in 0..400 {
            if scratch.join("up").exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(scratch.join("up").exists());
        pods.delete("sleeper", &DeleteParams::default()).await.unwrap();
        wait_gone(&pods, "sleeper").await;
        let claim_dir = sim.cluster().unwrap().claim_dir("default", "evidence").unwrap();
        // The kubelet acts on the deletion asynchronously; the trap leaves its mark soon.
        for _ in 0..400 {
            if claim_dir.join("term").exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(std::fs::read_to_string(claim_dir.join("term")).unwrap(), "got-term\n");
        drop(sim);
        let _ = std::fs::remove_dir_all(&data_dir);
    })
    .await;
}

#[tokio::test]
async fn spot_preemption_fails_pods_with_disruption_target_and_node_returns() {
    within(async {
        let sim = sim(KubeletConfig::default()).await;
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        let nodes: Api<Node> = Api::all(sim.client());
        let mut p = scripted("spot-job", "trainer", Some("duration=forever"));
        p.spec.as_mut().unwrap().node_selector =
            Some([("karpenter.sh/capacity-type".to_string(), "spot".to_string())].into());
        pods.create(&PostParams::default(), &p).await.unwrap();
        wait_pod(&pods, "spot-job", "Running", |p| {
            phase(p) == Some("Running")
        })
        .await;

        sim.cluster()
            .unwrap()
            .preempt_node("ew-spot-0", Some(Duration::from_millis(500)))
            .await
            .unwrap();
        let p = pods.get("spot-job").await.unwrap();
        assert_eq!(phase(&p), Some("Failed"));
        let dt = condition(&p, "DisruptionTarget").unwrap();
        assert_eq!(
            (dt.status.as_str(), dt.reason.as_deref()),
            ("True", Some("TerminationByKubelet"))
        );
        assert_eq!(terminated(&p).exit_code, 143);
        assert!(nodes.get_opt("ew-spot-0").await.unwrap().is_none());

        // The node comes back and takes a new pod.
        let mut again = scripted("spot-job-2", "trainer", Some("duration=forever"));
        again.spec.as_mut().unwrap().node_selector =
            Some([("karpenter.sh/capacity-type".to_string(), "spot".to_string())].into());
        pods.create(&PostParams::default(), &again).await.unwrap();
        let p = wait_pod(&pods, "spot-job-2", "Running", |p| {
            phase(p) == Some("Running")
        })
        .await;
        assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("ew-spot-0"));
    })
    .await;
}

#[tokio::test]
async fn node_loss_fails_pods_and_keeps_new_ones_away_until_restored() {
    within(async {
        let sim = sim(KubeletConfig::default()).await;
        let cluster = sim.cluster().unwrap();
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        let nodes: Api<Node> = Api::all(sim.client());
        let pinned = |name: &str| {
            let mut p = scripted(name, "trainer", Some("duration=forever"));
            p.spec.as_mut().unwrap().node_selector =
                Some([("kubernetes.io/hostname".to_string(), "ew-l4-1".to_string())].into());
            p
        };
        pods.create(&PostParams::default(), &pinned("victim"))
            .await
            .unwrap();
        wait_pod(&pods, "victim", "Running", |p| phase(p) == Some("Running")).await;

        cluster.lose_node("ew-l4-1").await.unwrap();
        let p = pods.get("victim").await.unwrap();
        assert_eq!(phase(&p), Some("Failed"));
        let dt = condition(&p, "DisruptionTarget").unwrap();
        assert_eq!(
            (dt.status.as_str(), dt.reason.as_deref()),
            ("True", Some("DeletionByTaintManager"))
        );
        let node = nodes.get("ew-l4-1").await.unwrap();
        let ready = node
            .status
            .unwrap()
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "Unknown");
        assert!(
            node.spec
                .unwrap()
                .taints
                .unwrap()
                .iter()
                .any(|t| t.key == "node.kubernetes.io/unreachable")
        );

        // A new pod for that node waits on the unreachable taint, and runs once it is restored.
        pods.create(&PostParams::default(), &pinned("next"))
            .await
            .unwrap();
        let waiting = wait_pod(&pods, "next", "Unschedulable", |p| {
            condition(p, "PodScheduled")
                .is_some_and(|c| c.reason.as_deref() == Some("Unschedulable"))
        })
        .await;
        let message = condition(&waiting, "PodScheduled")
            .unwrap()
            .message
            .clone()
            .unwrap();
        assert!(
            message.contains("1 node(s) had untolerated taint {node.kubernetes.io/unreachable: }"),
            "{message}"
        );
        cluster.restore_node("ew-l4-1").await.unwrap();
        let p = wait_pod(&pods, "next", "Running", |p| phase(p) == Some("Running")).await;
        assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("ew-l4-1"));

        let added = cluster.add_nodes("ew-l4", 2).await.unwrap();
        assert_eq!(added, ["ew-l4-2", "ew-l4-3"]);
        assert!(nodes.get_opt("ew-l4-3").await.unwrap().is_some());
    })
    .await;
}
