//! The chart's `values.schema.json` is what the Rust types of its values say
//! (`loraplane_crds::chart_values`), documents every value, and the chart's own values files
//! fit those types: the platform they hold is one the operator and the API accept.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::workspace_root;
use loraplane_crds::chart_values::{ChartValues, values_schema};
use serde_json::Value;

fn chart() -> PathBuf {
    workspace_root().join("charts/loraplane")
}

fn load_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn schema() -> Value {
    serde_json::to_value(values_schema()).unwrap()
}

#[test]
fn checked_in_values_schema_matches_the_types() {
    let generated = loraplane_crds::values_schema_json().unwrap();
    let path = loraplane_crds::VALUES_SCHEMA_PATH;
    let checked_in = std::fs::read_to_string(workspace_root().join(path)).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{path} is stale: run `make values-schema` and commit it"
    );
}

/// Helm (3 and 4) validates values with JSON Schema draft-07: the schema says so, and every
/// `$ref` points into its own `definitions`.
#[test]
fn schema_is_draft_07_and_every_reference_resolves() {
    fn walk(node: &Value, refs: &mut Vec<String>) {
        match node {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    refs.push(r.clone());
                }
                for (key, value) in map {
                    // `default`, `const` and `enum` hold values, not schemas.
                    if !matches!(key.as_str(), "default" | "const" | "enum") {
                        walk(value, refs);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, refs)),
            _ => {}
        }
    }
    let schema = schema();
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    let mut refs = Vec::new();
    walk(&schema, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{r} is not local"));
        assert!(
            pointer.starts_with("/definitions/") && schema.pointer(pointer).is_some(),
            "{r} does not resolve"
        );
    }
}

/// Every value carries a description (the field's doc comment), which editors show.
#[test]
fn every_value_is_documented() {
    fn walk(node: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                let documented = p
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.trim().is_empty());
                if !documented {
                    missing.push(format!("{path}.{k}"));
                }
            }
        }
    }
    let schema = schema();
    let mut missing = Vec::new();
    walk(&schema, "", &mut missing);
    for (name, definition) in schema["definitions"].as_object().unwrap() {
        walk(definition, name, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "values without a description: {missing:?}"
    );
}

/// What `helm` does with `-f`: maps merge key by key, anything else is replaced.
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (k, v) in patch {
                match base.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        base.insert(k, v);
                    }
                }
            }
        }
        (base, patch) => *base = patch,
    }
}

/// `values.yaml` alone and with each `ci/*-values.yaml` on top.
fn chart_values_files() -> Vec<(String, Value)> {
    let defaults = load_yaml(&chart().join("values.yaml"));
    let mut files = vec![("values.yaml".to_string(), defaults.clone())];
    let mut ci: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    ci.sort();
    assert!(!ci.is_empty());
    for path in ci {
        let mut values = defaults.clone();
        merge(&mut values, load_yaml(&path));
        files.push((path.file_name().unwrap().to_string_lossy().into(), values));
    }
    files
}

#[test]
fn the_charts_values_fit_the_types_and_hold_a_valid_platform() {
    for (name, mut values) in chart_values_files() {
        // As the chart's `loraplane.platformConfig` does: a family without a trainer image gets
        // the chart's (its tag does not matter here).
        let trainer_image = format!(
            "{}/{}",
            values["image"]["registry"].as_str().unwrap(),
            values["trainer"]["image"].as_str().unwrap()
        );
        for family in values["platform"]["families"].as_array_mut().unwrap() {
            if family["trainerImage"].as_str().is_none_or(str::is_empty) {
                family["trainerImage"] = trainer_image.clone().into();
            }
        }
        let parsed: ChartValues = serde_json::from_value(values)
            .unwrap_or_else(|e| panic!("{name} does not fit the chart's types: {e}"));
        parsed
            .platform
            .validate()
            .unwrap_or_else(|e| panic!("{name}: the operator would refuse its platform: {e}"));
    }
}

/// A plan's resolution is written into each job's `spec.training.resolution`: the chart must
/// not allow one the CRD refuses.
#[test]
fn plan_resolution_limits_match_the_crd() {
    let crd: Value = serde_yaml::from_str(&loraplane_crds::crd_yaml().unwrap()).unwrap();
    let in_crd = crd["spec"]["versions"][0]
        .pointer(
            "/schema/openAPIV3Schema/properties/spec/properties/training/properties/resolution",
        )
        .unwrap()
        .clone();
    let schema = schema();
    let in_chart = &schema["definitions"]["Plan"]["properties"]["resolution"];
    for key in ["minimum", "maximum", "multipleOf"] {
        assert_eq!(
            in_chart[key].as_f64(),
            in_crd[key].as_f64(),
            "resolution {key}"
        );
        assert!(in_chart[key].is_number(), "resolution {key} is set");
    }
}
