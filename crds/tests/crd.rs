//! The generated CRD is what the types say, is a valid structural `apiextensions.k8s.io/v1`
//! object documented for `kubectl explain`, and the samples in `crds/examples` are accepted
//! (and the invalid ones rejected with a readable message) by the same schema enforcement
//! kube-sim applies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::workspace_root;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube_sim::schema::{Schema, structural_problems};
use loraplane_crds::v1alpha1::{Concept, ConceptType};
use serde_json::Value;

fn generated_crd() -> CustomResourceDefinition {
    let yaml = loraplane_crds::crd_yaml().unwrap();
    serde_yaml::from_str(&yaml).unwrap()
}

fn open_api_schema() -> Value {
    let crd = generated_crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

fn load_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn checked_in_crds_match_the_types() {
    let generated = loraplane_crds::crd_yaml().unwrap();
    for path in [
        loraplane_crds::CRD_YAML_PATH,
        loraplane_crds::CHART_CRD_YAML_PATH,
    ] {
        let checked_in = std::fs::read_to_string(workspace_root().join(path)).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{path} differs from the Rust types: run `make crdgen` and commit the result"
        );
    }
}

#[test]
fn crd_identity_printer_columns_and_subresources() {
    let crd = generated_crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("loratrainingjobs.loraplane.io")
    );
    assert_eq!(crd.spec.group, "loraplane.io");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, "LoRATrainingJob");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["ltj".to_string()][..])
    );
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.served && version.storage);
    assert!(
        version.subresources.as_ref().unwrap().status.is_some(),
        "status subresource"
    );
    let columns: Vec<&str> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Phase", "Model", "Region", "Progress", "Age"]);
}

#[test]
fn schema_is_structural() {
    let problems = structural_problems(&open_api_schema());
    assert!(
        problems.is_empty(),
        "non-structural schema:\n{}",
        problems.join("\n")
    );
}

/// Every field under spec and status carries a description, which `kubectl explain` prints.
#[test]
fn every_field_is_documented() {
    fn walk(node: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                let here = format!("{path}.{k}");
                let documented = p
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.trim().is_empty());
                if !documented {
                    missing.push(here.clone());
                }
                walk(p, &here, missing);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, path, missing);
        }
    }
    let schema = open_api_schema();
    let mut missing = Vec::new();
    for top in ["spec", "status"] {
        walk(&schema["properties"][top], top, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

#[test]
fn samples_are_accepted_and_defaulted() {
    let schema = Schema::new(open_api_schema()).unwrap();
    let samples = yaml_files(&workspace_root().join("crds/examples"));
    assert!(
        samples.len() >= 3,
        "expected the minimal, full and zero-retention samples"
    );
    for path in samples {
        let admitted = schema
            .admit(load_yaml(&path), None)
            .unwrap_or_else(|errs| panic!("{} rejected: {errs:#?}", path.display()));
        // Admitted objects deserialize into the Rust types the operator and API use.
        let job: loraplane_crds::LoRATrainingJob = serde_json::from_value(admitted.clone())
            .unwrap_or_else(|e| panic!("{} does not fit the types: {e}", path.display()));
        assert!(job.spec.training.steps >= 1);
        assert!(
            admitted["spec"]["training"]["rank"].is_number(),
            "defaults applied in {}",
            path.display()
        );
    }
}

#[test]
fn minimal_sample_gets_documented_defaults() {
    let schema = Schema::new(open_api_schema()).unwrap();
    let admitted = schema
        .admit(
            load_yaml(&workspace_root().join("crds/examples/minimal.yaml")),
            None,
        )
        .unwrap();
    let spec = &admitted["spec"];
    assert_eq!(spec["training"]["steps"], 1000);
    assert_eq!(spec["training"]["rank"], 16);
    assert_eq!(spec["training"]["learningRate"], 0.0001);
    assert_eq!(spec["placement"]["residency"], "any");
    assert_eq!(spec["retention"]["mode"], "standard");
    assert_eq!(spec["dataUse"]["trainingConsent"], false);
    assert_eq!(spec["resources"]["gpu"]["count"], 1);
    assert_eq!(spec["backoffLimit"], 3);
    assert_eq!(spec["suspend"], false);
}

#[test]
fn invalid_samples_are_rejected_with_readable_messages() {
    let schema = Schema::new(open_api_schema()).unwrap();
    let samples = yaml_files(&workspace_root().join("crds/examples/invalid"));
    assert!(samples.len() >= 3);
    for path in samples {
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks a '# expect:' line", path.display()));
        let errs = schema
            .admit(serde_yaml::from_str(&text).unwrap(), None)
            .expect_err(&format!("{} was accepted", path.display()));
        let messages: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            messages.iter().any(|m| m.contains(expect)),
            "{}: expected {expect:?} among {messages:#?}",
            path.display()
        );
    }
}

#[test]
fn started_job_spec_is_immutable_except_suspend_and_placement() {
    let schema = Schema::new(open_api_schema()).unwrap();
    let old = schema
        .admit(
            load_yaml(&workspace_root().join("crds/examples/full.yaml")),
            None,
        )
        .unwrap();

    let mut suspended = old.clone();
    suspended["spec"]["suspend"] = true.into();
    suspended["spec"]["placement"]["spot"] = "never".into();
    assert!(
        schema.admit(suspended, Some(&old)).is_ok(),
        "suspend and placement may change"
    );

    for (block, field, value) in [
        ("baseModel", "family", Value::from("sd15")),
        ("concept", "triggerWord", Value::from("other")),
        ("dataset", "sha256", Value::from("0".repeat(64))),
        ("training", "steps", Value::from(10)),
        ("samples", "every", Value::from(250)),
        (
            "resources",
            "gpu",
            serde_json::json!({"count": 1, "minMemoryGiB": 40}),
        ),
    ] {
        let mut changed = old.clone();
        changed["spec"][block][field] = value;
        let errs = schema.admit(changed, Some(&old)).expect_err(block);
        let expected = format!("spec.{block} is immutable");
        assert!(
            errs.iter().any(|e| e.to_string().contains(&expected)),
            "{block}: {errs:?}"
        );
    }
}

#[test]
fn concept_debug_output_never_shows_customer_text() {
    let concept = Concept {
        concept_type: ConceptType::Character,
        trigger_word: "zxq-secret".into(),
        description: Some("my private description".into()),
    };
    let shown = format!("{concept:?}");
    assert!(
        !shown.contains("zxq-secret") && !shown.contains("private"),
        "{shown}"
    );
}
