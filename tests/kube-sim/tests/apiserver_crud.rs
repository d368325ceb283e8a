#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Conformance of the emulated apiserver's basic verbs, driven through a real `kube::Client`:
//! create/get/list/update/patch/delete, names, conflicts, selectors, pagination, pod
//! immutability, binding, logs and injected faults.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use kube_sim::{KubeSim, SimConfig};
use serde_json::json;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

async fn sim() -> KubeSim {
    KubeSim::start(SimConfig::default()).await.unwrap()
}

fn status(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other}"),
    }
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "trainer"}},
        "spec": {"containers": [{"name": "main", "image": "trainer:1", "args": ["--x"]}]}
    }))
    .unwrap()
}

fn cm(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .unwrap()
}

#[tokio::test]
async fn pod_lifecycle_create_get_list_patch_delete() {
    within(async {
        let sim = sim().await;
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        let created = pods
            .create(&PostParams::default(), &pod("p1"))
            .await
            .unwrap();
        let meta = &created.metadata;
        assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
        assert_eq!(meta.generation, Some(1));
        assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"));

        let got = pods.get("p1").await.unwrap();
        assert_eq!(got.metadata.resource_version, meta.resource_version);
        assert_eq!(
            pods.list(&ListParams::default()).await.unwrap().items.len(),
            1
        );

        let patched = pods
            .patch(
                "p1",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await
            .unwrap();
        assert_eq!(patched.metadata.labels.unwrap()["x"], "y");
        assert_ne!(patched.metadata.resource_version, meta.resource_version);

        let deleted = pods.delete("p1", &DeleteParams::default()).await.unwrap();
        assert!(deleted.is_left(), "a deleted pod answers with the object");
        let e = status(pods.get("p1").await.unwrap_err());
        assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
        assert_eq!(e.message, "pods \"p1\" not found");
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn names_generate_collide_and_validate() {
    within(async {
        let sim = sim().await;
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        let mut generated = cm("", json!({}));
        generated.metadata.name = None;
        generated.metadata.generate_name = Some("job-".into());
        let a = cms
            .create(&PostParams::default(), &generated)
            .await
            .unwrap();
        let name = a.metadata.name.unwrap();
        assert!(name.starts_with("job-") && name.len() == 9, "{name}");

        cms.create(&PostParams::default(), &cm("dup", json!({})))
            .await
            .unwrap();
        let e = status(
            cms.create(&PostParams::default(), &cm("dup", json!({})))
                .await
                .unwrap_err(),
        );
        assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));

        let e = status(
            cms.create(&PostParams::default(), &cm("Bad_Name", json!({})))
                .await
                .unwrap_err(),
        );
        assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
        assert!(
            e.message
                .contains("metadata.name: Invalid value: \"Bad_Name\""),
            "{}",
            e.message
        );

        let elsewhere: Api<ConfigMap> = Api::namespaced(sim.client(), "no-such-ns");
        let e = status(
            elsewhere
                .create(&PostParams::default(), &cm("x", json!({})))
                .await
                .unwrap_err(),
        );
        assert_eq!(e.code, 404);
        assert_eq!(e.message, "namespaces \"no-such-ns\" not found");

        let nss: Api<Namespace> = Api::all(sim.client());
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "team-a"}})).unwrap();
        let ns = nss.create(&PostParams::default(), &ns).await.unwrap();
        assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));
        let there: Api<ConfigMap> = Api::namespaced(sim.client(), "team-a");
        there
            .create(&PostParams::default(), &cm("x", json!({})))
            .await
            .unwrap();
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stale_resource_version_update_conflicts() {
    within(async {
        let sim = sim().await;
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        let first = cms.create(&PostParams::default(), &cm("c", json!({}))).await.unwrap();
        let mut a = first.clone();
        a.data = Some([("k".to_string(), "a".to_string())].into());
        cms.replace("c", &PostParams::default(), &a).await.unwrap();
        let mut b = first.clone();
        b.data = Some([("k".to_string(), "b".to_string())].into());
        let e = status(cms.replace("c", &PostParams::default(), &b).await.unwrap_err());
        assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
        assert!(e.message.contains("the object has been modified"));
        // A patch carrying a stale resourceVersion is a precondition too.
        let stale = json!({"metadata": {"resourceVersion": first.metadata.resource_version}, "data": {"k": "c"}});
        let e = status(cms.patch("c", &PatchParams::default(), &Patch::Merge(stale)).await.unwrap_err());
        assert_eq!(e.code, 409);
        assert_eq!(cms.get("c").await.unwrap().data.unwrap()["k"], "a");
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn label_and_field_selectors_and_pagination() {
    within(async {
        let sim = sim().await;
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        for i in 0..7 {
            let tier = if i % 2 == 0 { "gpu" } else { "cpu" };
            cms.create(&PostParams::default(), &cm(&format!("c{i}"), json!({"tier": tier, "n": i.to_string()})))
                .await
                .unwrap();
        }
        let names = |l: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
            l.items.into_iter().map(|c| c.metadata.name.unwrap()).collect()
        };
        let gpu = cms.list(&ListParams::default().labels("tier=gpu")).await.unwrap();
        assert_eq!(names(gpu), ["c0", "c2", "c4", "c6"]);
        let set = cms.list(&ListParams::default().labels("tier in (cpu),n notin (1,3)")).await.unwrap();
        assert_eq!(names(set), ["c5"]);
        let by_name = cms.list(&ListParams::default().fields("metadata.name=c3")).await.unwrap();
        assert_eq!(names(by_name), ["c3"]);
        let not_name = cms.list(&ListParams::default().fields("metadata.name!=c3")).await.unwrap();
        assert_eq!(not_name.items.len(), 6);

        let mut all = Vec::new();
        let mut lp = ListParams::default().limit(3);
        let mut pages = 0;
        loop {
            let page = cms.list(&lp).await.unwrap();
            pages += 1;
            let next = page.metadata.continue_.clone();
            all.extend(names(page));
            match next {
                Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
                _ => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(all, ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]);

        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        pods.create(&PostParams::default(), &pod("bound")).await.unwrap();
        pods.create(&PostParams::default(), &pod("pending")).await.unwrap();
        let bind = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "bound"}, "target": {"kind": "Node", "name": "n1"}});
        let _: serde_json::Value = pods
            .create_subresource("binding", "bound", &PostParams::default(), &bind)
            .await
            .unwrap();
        let on_n1 = pods.list(&ListParams::default().fields("spec.nodeName=n1")).await.unwrap();
        assert_eq!(on_n1.items.len(), 1);
        let unbound = pods.list(&ListParams::default().fields("spec.nodeName=")).await.unwrap();
        assert_eq!(unbound.items[0].metadata.name.as_deref(), Some("pending"));
        let pending = pods.list(&ListParams::default().fields("status.phase=Pending")).await.unwrap();
        assert_eq!(pending.items.len(), 2);
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn pod_spec_is_immutable_but_binds_once() {
    within(async {
        let sim = sim().await;
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        pods.create(&PostParams::default(), &pod("p")).await.unwrap();
        let e = status(
            pods.patch("p", &PatchParams::default(), &Patch::Merge(json!({"spec": {"restartPolicy": "Never"}})))
                .await
                .unwrap_err(),
        );
        assert_eq!(e.code, 422);
        assert!(e.message.contains("pod updates may not change fields"), "{}", e.message);
        let bound = pods
            .patch("p", &PatchParams::default(), &Patch::Merge(json!({"spec": {"nodeName": "n1"}})))
            .await
            .unwrap();
        assert_eq!(bound.spec.unwrap().node_name.as_deref(), Some("n1"));
        let e = status(
            pods.patch("p", &PatchParams::default(), &Patch::Merge(json!({"spec": {"nodeName": "n2"}})))
                .await
                .unwrap_err(),
        );
        assert_eq!(e.code, 422);
        let bind = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n3"}});
        let e = status(
            pods.create_subresource::<_, serde_json::Value>("binding", "p", &PostParams::default(), &bind)
                .await
                .unwrap_err(),
        );
        assert_eq!(e.code, 409);
        // Status goes through /status and leaves the spec alone.
        let st = pods
            .patch_status("p", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running"}, "spec": {"nodeName": "zz"}})))
            .await
            .unwrap();
        assert_eq!(st.status.unwrap().phase.as_deref(), Some("Running"));
        assert_eq!(st.spec.unwrap().node_name.as_deref(), Some("n1"));
        // And the main resource ignores status.
        let main = pods
            .patch("p", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Failed"}})))
            .await
            .unwrap();
        assert_eq!(main.status.unwrap().phase.as_deref(), Some("Running"));
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn strategic_json_and_apply_patches() {
    within(async {
        let sim = sim().await;
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        pods.create(&PostParams::default(), &pod("p")).await.unwrap();
        pods.patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}})),
        )
        .await
        .unwrap();
        let st = pods
            .patch_status(
                "p",
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})),
            )
            .await
            .unwrap();
        let conds = st.status.unwrap().conditions.unwrap();
        assert_eq!(conds.len(), 2, "conditions merge by type");

        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        cms.create(&PostParams::default(), &cm("c", json!({"a": "1"}))).await.unwrap();
        let ops = json!([
            {"op": "add", "path": "/data/extra", "value": "x"},
            {"op": "remove", "path": "/metadata/labels/a"}
        ]);
        let jp = Patch::Json::<()>(serde_json::from_value(ops).unwrap());
        let out = cms.patch("c", &PatchParams::default(), &jp).await.unwrap();
        assert_eq!(out.data.unwrap()["extra"], "x");
        assert!(out.metadata.labels.unwrap_or_default().is_empty());

        let apply = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"a": "1"}});
        let pp = PatchParams::apply("kube-sim-test").force();
        let created = cms.patch("applied", &pp, &Patch::Apply(&apply)).await.unwrap();
        assert_eq!(created.data.unwrap()["a"], "1");
        let apply2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"b": "2"}});
        let merged = cms.patch("applied", &pp, &Patch::Apply(&apply2)).await.unwrap();
        assert_eq!(merged.data.unwrap()["b"], "2");
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn eviction_deletes_the_pod() {
    within(async {
        let sim = sim().await;
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        pods.create(&PostParams::default(), &pod("victim"))
            .await
            .unwrap();
        pods.evict("victim", &Default::default()).await.unwrap();
        assert_eq!(status(pods.get("victim").await.unwrap_err()).code, 404);
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn pod_logs_are_served_with_tail_lines() {
    within(async {
        let sim = sim().await;
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        pods.create(&PostParams::default(), &pod("p"))
            .await
            .unwrap();
        sim.logs()
            .append("default", "p", "main", b"one\ntwo\nthree\n");
        assert_eq!(
            pods.logs("p", &LogParams::default()).await.unwrap(),
            "one\ntwo\nthree\n"
        );
        let tail = LogParams {
            tail_lines: Some(2),
            container: Some("main".into()),
            ..Default::default()
        };
        assert_eq!(pods.logs("p", &tail).await.unwrap(), "two\nthree\n");
        assert_eq!(
            status(pods.logs("nope", &LogParams::default()).await.unwrap_err()).code,
            404
        );
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn injected_faults_fail_writes_with_the_chosen_codes() {
    within(async {
        let sim = sim().await;
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        sim.faults().set_error_rate(1.0);
        sim.faults().set_error_codes(&[500]);
        let e = status(
            cms.create(&PostParams::default(), &cm("c", json!({})))
                .await
                .unwrap_err(),
        );
        assert_eq!((e.code, e.reason.as_str()), (500, "InternalError"));
        sim.faults().set_error_codes(&[409]);
        let e = status(
            cms.create(&PostParams::default(), &cm("c", json!({})))
                .await
                .unwrap_err(),
        );
        assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
        // Reads are unaffected.
        cms.list(&ListParams::default()).await.unwrap();

        // 429 as a client without retries sees it.
        sim.faults().set_error_codes(&[429]);
        let mut config = kube::Config::new(sim.url().parse().unwrap());
        config.default_retry = false;
        let raw: Api<ConfigMap> = Api::namespaced(Client::try_from(config).unwrap(), "default");
        let e = status(
            raw.create(&PostParams::default(), &cm("c", json!({})))
                .await
                .unwrap_err(),
        );
        assert_eq!((e.code, e.reason.as_str()), (429, "TooManyRequests"));
        assert_eq!(sim.faults().injected_errors(), 3);

        // kube's default client retries 503 (and 429, after Retry-After: 1 s): a write issued
        // while the apiserver fails lands once the faults stop.
        sim.faults().set_error_codes(&[503]);
        let retried = tokio::spawn({
            let cms = cms.clone();
            async move {
                cms.create(&PostParams::default(), &cm("retried", json!({})))
                    .await
            }
        });
        while sim.faults().injected_errors() < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sim.faults().clear();
        retried.await.unwrap().unwrap();
        sim.faults().clear();
        cms.create(&PostParams::default(), &cm("c", json!({})))
            .await
            .unwrap();

        sim.faults().set_latency(Duration::from_millis(300));
        let started = std::time::Instant::now();
        cms.get("c").await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn the_client_is_a_plain_kube_client() {
    within(async {
        let sim = sim().await;
        let client: Client = sim.client();
        let v = client.apiserver_version().await.unwrap();
        assert_eq!(v.major, "1");
        let groups = client.list_api_groups().await.unwrap();
        assert!(
            groups
                .groups
                .iter()
                .any(|g| g.name == "coordination.k8s.io")
        );
        let dir = std::env::temp_dir().join(format!("kube-sim-kc-{}", std::process::id()));
        sim.write_kubeconfig(&dir).unwrap();
        let kc = kube::config::Kubeconfig::read_from(&dir).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        let again = Client::try_from(cfg).unwrap();
        let nss: Api<Namespace> = Api::all(again);
        assert!(nss.get("default").await.is_ok());
        let _ = std::fs::remove_file(dir);
        sim.shutdown().await;
        assert!(client.apiserver_version().await.is_err(), "stopped serving");
    })
    .await;
}
