#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The request audit log, driven through real `kube::Client`s: each client's User-Agent, the
//! RBAC verb (watch included), group, resource, subresource and namespace of every call.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, WatchParams};
use kube_sim::apiserver::audit::AuditRecord;
use kube_sim::{KubeSim, SimConfig};
use serde_json::json;

fn call(r: &AuditRecord) -> (String, String, String, Option<String>) {
    (
        r.verb.clone(),
        r.group.clone(),
        r.rbac_resource(),
        r.namespace.clone(),
    )
}

fn c(
    verb: &str,
    group: &str,
    res: &str,
    ns: Option<&str>,
) -> (String, String, String, Option<String>) {
    (verb.into(), group.into(), res.into(), ns.map(String::from))
}

#[tokio::test]
async fn the_audit_log_records_who_called_which_verb_on_what() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let setup = sim.client();
        // Off by default: nothing is recorded.
        Api::<ConfigMap>::namespaced(setup.clone(), "default")
            .list(&ListParams::default())
            .await
            .unwrap();
        assert!(sim.audit().snapshot().is_empty());

        sim.audit().enable();
        Api::<ConfigMap>::namespaced(setup.clone(), "kube-public")
            .list(&ListParams::default())
            .await
            .unwrap();
        let alice = sim.client_as("alice/1.0").unwrap();
        let bob = sim.client_as("bob/2.0").unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(alice.clone(), "default");
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
        cms.get("a").await.unwrap();
        cms.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "v"}})),
        )
        .await
        .unwrap();
        cms.replace("a", &PostParams::default(), &cms.get("a").await.unwrap())
            .await
            .unwrap();
        // A refused call is audited too: RBAC authorizes the attempt.
        assert!(cms.get("missing").await.is_err());
        cms.delete("a", &DeleteParams::default()).await.unwrap();
        cms.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .unwrap();
        // Server-side apply: creating is authorized as create and patch, updating as patch.
        let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}});
        for _ in 0..2 {
            cms.patch("b", &PatchParams::apply("alice"), &Patch::Apply(&applied))
                .await
                .unwrap();
        }

        let pods: Api<Pod> = Api::namespaced(bob.clone(), "default");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "main", "image": "x"}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        pods.patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
        pods.logs("p", &LogParams::default()).await.unwrap();
        Api::<Node>::all(bob.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        Api::<Pod>::all(bob.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        let leases: Api<Lease> = Api::namespaced(bob.clone(), "kube-system");
        let mut stream = leases
            .watch(&WatchParams::default().timeout(1), "0")
            .await
            .unwrap()
            .boxed();
        while stream.next().await.is_some() {}

        let log = sim.audit().snapshot();
        let of = |agent: &str| -> Vec<_> {
            log.iter()
                .filter(|r| r.user_agent == agent)
                .map(call)
                .collect()
        };
        let d = Some("default");
        assert_eq!(
            of("alice/1.0"),
            vec![
                c("create", "", "configmaps", d),
                c("get", "", "configmaps", d),
                c("patch", "", "configmaps", d),
                c("get", "", "configmaps", d),
                c("update", "", "configmaps", d),
                c("get", "", "configmaps", d),
                c("delete", "", "configmaps", d),
                c("deletecollection", "", "configmaps", d),
                c("create", "", "configmaps", d),
                c("patch", "", "configmaps", d),
                c("patch", "", "configmaps", d),
            ]
        );
        assert_eq!(
            of("bob/2.0"),
            vec![
                c("create", "", "pods", d),
                c("patch", "", "pods/status", d),
                c("get", "", "pods/log", d),
                c("list", "", "nodes", None),
                c("list", "", "pods", None),
                c(
                    "watch",
                    "coordination.k8s.io",
                    "leases",
                    Some("kube-system")
                ),
            ]
        );
        let named = log
            .iter()
            .find(|r| r.verb == "patch" && r.subresource.is_some())
            .unwrap();
        assert_eq!(named.name.as_deref(), Some("p"));
        // The default client sends no User-Agent: it is not mistaken for a component.
        assert_eq!(
            of(""),
            vec![c("list", "", "configmaps", Some("kube-public"))]
        );

        sim.audit().clear();
        sim.audit().disable();
        cms.list(&ListParams::default()).await.unwrap();
        assert!(sim.audit().snapshot().is_empty());
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
