#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Conformance of custom resources through a real `kube::Client`: the LoRATrainingJob CRD's
//! defaulting, pruning and validation (422 with a `Status` listing causes), the status
//! subresource and `metadata.generation`, server-side apply, and CRDs installed at runtime.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube_sim::{KubeSim, SimConfig};
use loraplane_crds::LoRATrainingJob;
use serde_json::{Value, json};

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

fn examples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds/examples")
}

fn ltj_api(sim: &KubeSim) -> Api<DynamicObject> {
    let ar = ApiResource::erase::<LoRATrainingJob>(&());
    Api::namespaced_with(sim.client(), "default", &ar)
}

fn example(name: &str) -> DynamicObject {
    let text = std::fs::read_to_string(examples().join(name)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[tokio::test]
async fn ltj_is_defaulted_pruned_and_generation_tracks_spec_only() {
    within(async {
        let sim = KubeSim::start(SimConfig::default().with_loraplane_crd())
            .await
            .unwrap();
        let jobs = ltj_api(&sim);
        let mut job = example("minimal.yaml");
        job.data["spec"]["notAField"] = json!(1);
        job.data["status"] = json!({"phase": "Succeeded"});
        let created = jobs.create(&PostParams::default(), &job).await.unwrap();
        assert_eq!(created.data["spec"]["training"]["steps"], 1000, "defaulted");
        assert!(created.data["spec"].get("notAField").is_none(), "pruned");
        assert!(
            created.data.get("status").is_none(),
            "status is ignored on create"
        );
        assert_eq!(created.metadata.generation, Some(1));
        // The typed client reads it back.
        let typed: Api<LoRATrainingJob> = Api::namespaced(sim.client(), "default");
        assert_eq!(
            typed.get("minimal").await.unwrap().metadata.name.as_deref(),
            Some("minimal")
        );

        let status = jobs
            .patch_status(
                "minimal",
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "status": {"phase": "Running"}, "spec": {"backoffLimit": 9}
                })),
            )
            .await
            .unwrap();
        assert_eq!(status.data["status"]["phase"], "Running");
        assert_eq!(
            status.data["spec"]["backoffLimit"], 3,
            "/status ignores spec"
        );
        assert_eq!(status.metadata.generation, Some(1));

        let labelled = jobs
            .patch(
                "minimal",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
            )
            .await
            .unwrap();
        assert_eq!(
            labelled.metadata.generation,
            Some(1),
            "metadata is not spec"
        );
        let spec = jobs
            .patch(
                "minimal",
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "spec": {"backoffLimit": 5}, "status": {"phase": "Failed"}
                })),
            )
            .await
            .unwrap();
        assert_eq!(spec.metadata.generation, Some(2));
        assert_eq!(
            spec.data["status"]["phase"], "Running",
            "main resource ignores status"
        );
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_examples_are_rejected_with_the_apiserver_message() {
    within(async {
        let sim = KubeSim::start(SimConfig::default().with_loraplane_crd())
            .await
            .unwrap();
        let jobs = ltj_api(&sim);
        let mut checked = 0;
        for entry in std::fs::read_dir(examples().join("invalid")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let expect = text
                .lines()
                .find_map(|l| l.strip_prefix("# expect: "))
                .expect("every invalid example says what to expect");
            let job: DynamicObject = serde_yaml::from_str(&text).unwrap();
            let name = job.metadata.name.clone().unwrap();
            let err = jobs.create(&PostParams::default(), &job).await.unwrap_err();
            let kube::Error::Api(status) = err else {
                panic!("{err}")
            };
            assert_eq!(
                (status.code, status.reason.as_str()),
                (422, "Invalid"),
                "{}",
                path.display()
            );
            let prefix = format!("LoRATrainingJob.loraplane.io \"{name}\" is invalid: ");
            assert!(status.message.starts_with(&prefix), "{}", status.message);
            assert!(
                status.message.contains(expect),
                "{}: {} does not contain {expect}",
                path.display(),
                status.message
            );
            let details = status.details.expect("details");
            assert_eq!(details.kind, "LoRATrainingJob");
            assert!(!details.causes.is_empty());
            checked += 1;
        }
        assert!(checked >= 5);
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn server_side_apply_creates_then_merges() {
    within(async {
        let sim = KubeSim::start(SimConfig::default().with_loraplane_crd()).await.unwrap();
        let jobs = ltj_api(&sim);
        let job = example("minimal.yaml");
        let pp = PatchParams::apply("loraplane-test").force();
        let created = jobs.patch("minimal", &pp, &Patch::Apply(&job)).await.unwrap();
        assert_eq!(created.metadata.generation, Some(1));
        let mut again = job.clone();
        again.data["spec"]["backoffLimit"] = json!(7);
        let applied = jobs.patch("minimal", &pp, &Patch::Apply(&again)).await.unwrap();
        assert_eq!(applied.data["spec"]["backoffLimit"], 7);
        assert_eq!(applied.metadata.generation, Some(2));
        let status = json!({"apiVersion": "loraplane.io/v1alpha1", "kind": "LoRATrainingJob", "status": {"phase": "Pending"}});
        let st = jobs.patch_status("minimal", &pp, &Patch::Apply(&status)).await.unwrap();
        assert_eq!(st.data["status"]["phase"], "Pending");
        // Invalid applied configuration is refused like a create.
        let mut bad = job.clone();
        bad.data["spec"]["training"] = json!({"steps": 0});
        let err = jobs.patch("minimal", &pp, &Patch::Apply(&bad)).await.unwrap_err();
        assert!(matches!(err, kube::Error::Api(s) if s.code == 422));
        sim.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_crd_created_through_the_api_serves_its_resource() {
    within(async {
        let sim = KubeSim::start(SimConfig::default()).await.unwrap();
        let crds: Api<CustomResourceDefinition> = Api::all(sim.client());
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Cluster",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "properties": {"size": {"type": "integer", "maximum": 10}}}}}}}]
            }
        }))
        .unwrap();
        let created = crds.create(&PostParams::default(), &crd).await.unwrap();
        let conds = created.status.unwrap().conditions.unwrap();
        assert!(conds.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        let resources = sim.client().list_api_group_resources("example.com/v1").await.unwrap();
        assert_eq!(resources.resources[0].name, "widgets");

        let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
        let widgets: Api<DynamicObject> = Api::all_with(sim.client(), &ar);
        let w: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}
        }))
        .unwrap();
        widgets.create(&PostParams::default(), &w).await.unwrap();
        let mut big = w.clone();
        big.metadata.name = Some("big".into());
        big.data["spec"]["size"] = Value::from(11);
        let err = widgets.create(&PostParams::default(), &big).await.unwrap_err();
        let kube::Error::Api(s) = err else { panic!("{err}") };
        assert_eq!(s.code, 422);
        assert!(s.message.contains("spec.size: Invalid value: 11"), "{}", s.message);
        sim.shutdown().await;
    })
    .await;
}
