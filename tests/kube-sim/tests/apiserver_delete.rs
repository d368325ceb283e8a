#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Conformance of deletion through a real `kube::Client`: finalizers and deletionTimestamp,
//! ownerReference garbage collection (background, foreground, orphan), pvc-protection,
//! deletecollection and namespace termination.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource};
use kube_sim::{KubeSim, SimConfig};
use serde_json::json;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

/// Polls until `get` returns 404 (the GC works asynchronously, as in Kubernetes).
async fn gone<K>(api: &Api<K>, name: &str)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    loop {
        match api.get(name).await {
            Err(kube::Error::Api(s)) if s.code == 404 => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    }
}

fn cm(name: &str, extra: serde_json::Value) -> ConfigMap {
    let mut v = json!({"metadata": {"name": name}, "data": {"k": "v"}});
    kube_sim::apiserver::patch::merge_patch(&mut v, &extra);
    serde_json::from_value(v).unwrap()
}

fn owned_by(owner: &ConfigMap) -> serde_json::Value {
    json!({"metadata": {"ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap",
        "name": owner.metadata.name, "uid": owner.metadata.uid, "blockOwnerDeletion": true
    }]}})
}

#[tokio::test]
async fn finalizers_keep_an_object_until_removed() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        cms.create(
            &PostParams::default(),
            &cm(
                "f",
                json!({"metadata": {"finalizers": ["loraplane.io/cleanup"]}}),
            ),
        )
        .await
        .unwrap();
        cms.create(&PostParams::default(), &cm("plain", json!({})))
            .await
            .unwrap();
        let status = cms.delete("plain", &DeleteParams::default()).await.unwrap();
        assert!(
            status.is_right(),
            "a deleted ConfigMap answers with a Success status"
        );
        let deleted = cms.delete("f", &DeleteParams::default()).await.unwrap();
        let held = deleted
            .left()
            .expect("object returned while finalizers remain");
        assert!(held.metadata.deletion_timestamp.is_some());
        let still = cms.get("f").await.unwrap();
        assert!(still.metadata.deletion_timestamp.is_some());
        // New finalizers cannot be added during deletion.
        let e = cms
            .patch(
                "f",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": ["loraplane.io/cleanup", "x/y"]}})),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, kube::Error::Api(s) if s.code == 422));
        cms.patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
        gone(&cms, "f").await;
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn background_deletion_collects_dependents() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        let owner = cms
            .create(&PostParams::default(), &cm("owner", json!({})))
            .await
            .unwrap();
        cms.create(&PostParams::default(), &cm("child", owned_by(&owner)))
            .await
            .unwrap();
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "child-pod"},
            "spec": {"containers": [{"name": "c", "image": "i"}]}
        }))
        .unwrap();
        pod.metadata.owner_references = Some(vec![owner.controller_owner_ref(&()).unwrap()]);
        pods.create(&PostParams::default(), &pod).await.unwrap();
        cms.delete("owner", &DeleteParams::background())
            .await
            .unwrap();
        gone(&cms, "owner").await;
        gone(&cms, "child").await;
        gone(&pods, "child-pod").await;
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn foreground_deletion_waits_for_dependents() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        let owner = cms
            .create(&PostParams::default(), &cm("owner", json!({})))
            .await
            .unwrap();
        let mut child = owned_by(&owner);
        child["metadata"]["finalizers"] = json!(["test/hold"]);
        cms.create(&PostParams::default(), &cm("child", child))
            .await
            .unwrap();
        cms.delete("owner", &DeleteParams::foreground())
            .await
            .unwrap();
        // The owner waits with the foregroundDeletion finalizer while its child is held.
        loop {
            let c = cms.get("child").await.unwrap();
            if c.metadata.deletion_timestamp.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let o = cms.get("owner").await.unwrap();
        assert!(o.metadata.deletion_timestamp.is_some());
        assert_eq!(o.metadata.finalizers.unwrap(), ["foregroundDeletion"]);
        cms.patch(
            "child",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
        gone(&cms, "child").await;
        gone(&cms, "owner").await;
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn orphan_deletion_keeps_dependents_without_the_reference() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
        let owner = cms
            .create(&PostParams::default(), &cm("owner", json!({})))
            .await
            .unwrap();
        cms.create(&PostParams::default(), &cm("child", owned_by(&owner)))
            .await
            .unwrap();
        cms.delete("owner", &DeleteParams::orphan()).await.unwrap();
        gone(&cms, "owner").await;
        let child = cms.get("child").await.unwrap();
        assert!(
            child
                .metadata
                .owner_references
                .unwrap_or_default()
                .is_empty()
        );
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn pvc_protection_holds_a_claim_while_a_running_pod_uses_it() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(sim.client(), "default");
        let pods: Api<Pod> = Api::namespaced(sim.client(), "default");
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        }))
        .unwrap();
        let created = pvcs.create(&PostParams::default(), &pvc).await.unwrap();
        assert_eq!(created.metadata.finalizers.unwrap(), ["kubernetes.io/pvc-protection"]);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "user"},
            "spec": {"containers": [{"name": "c", "image": "i"}],
                     "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        pvcs.delete("data", &DeleteParams::default()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let held = pvcs.get("data").await.unwrap();
        assert!(held.metadata.deletion_timestamp.is_some());
        // Once the pod has terminated, the claim goes.
        pods.patch_status("user", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Succeeded"}})))
            .await
            .unwrap();
        gone(&pvcs, "data").await;
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn deletecollection_and_namespace_termination() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let nss: Api<Namespace> = Api::all(sim.client());
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap(),
        )
        .await
        .unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(sim.client(), "team");
        for (name, tier) in [("a", "x"), ("b", "x"), ("c", "y")] {
            cms.create(
                &PostParams::default(),
                &cm(name, json!({"metadata": {"labels": {"tier": tier}}})),
            )
            .await
            .unwrap();
        }
        cms.delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("tier=x"),
        )
        .await
        .unwrap();
        let left: Vec<String> = cms
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect();
        assert_eq!(left, ["c"]);
        nss.delete("team", &DeleteParams::default()).await.unwrap();
        gone(&cms, "c").await;
        gone(&nss, "team").await;
        sim.shutdown().await;
    })
    .await;
}
