//! The values `loraplane-e2e-real values` prints for the real-cluster guide
//! (tests/e2e/REAL_CLUSTER.md) pass the chart's schema, and the chart turns them into the
//! configuration the journey expects: the operator and API read a platform with the local
//! stack's regions and pools, the storefront tenant and short retention, and every image
//! comes from the registry and tag given.

use loraplane_api::config::ApiConfig;
use loraplane_crds::platform::PlatformConfig;
use loraplane_e2e::config::{ORDERS_NS, REGIONS};
use loraplane_e2e::real::{self, RealSettings};
use serde_json::Value;

#[test]
fn the_guides_values_render_into_the_stack_the_journey_expects() {
    let values = real::helm_values(&RealSettings {
        s3_endpoint: "http://172.18.0.1:8333".into(),
        s3_region: "us-east-1".into(),
        registry: "loraplane.local".into(),
        tag: "dev".into(),
    })
    .unwrap();
    let docs = loraplane_e2e::helm::render(&values, real::RELEASE, "loraplane-system")
        .unwrap_or_else(|e| panic!("{e}"));

    let config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "loraplane-config")
        .expect("the platform ConfigMap is rendered");
    let platform = PlatformConfig::from_yaml(config["data"]["platform.yaml"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("the operator refuses the rendered platform: {e}"));
    let names: Vec<&str> = platform.regions.iter().map(|r| r.name.as_str()).collect();
    let expected: Vec<&str> = REGIONS.iter().map(|(r, _)| *r).collect();
    assert_eq!(names, expected);
    for f in &platform.families {
        assert_eq!(f.trainer_image, "loraplane.local/loraplane-trainer:dev");
    }
    let api = ApiConfig::from_yaml(config["data"]["api.yaml"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("the API refuses the rendered api.yaml: {e}"));
    assert_eq!(api.stripe_namespace, ORDERS_NS);
    assert_eq!(
        api.plans["standard"].keep_outputs_seconds,
        real::retention().keep_outputs_seconds
    );

    let images: Vec<String> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .flat_map(|d| {
            d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|c: Value| c["image"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        images
            .iter()
            .any(|i| i == "loraplane.local/loraplane-operator:dev"),
        "{images:?}"
    );
    assert!(
        images
            .iter()
            .any(|i| i == "loraplane.local/loraplane-api:dev"),
        "{images:?}"
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "NetworkPolicy" || d["kind"] == "ServiceMonitor"),
        "network policies and monitoring are off for kind"
    );
}

#[test]
fn the_real_cluster_run_refuses_to_start_without_kubeconfig() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loraplane-e2e-real"))
        .args(["run", "--s3-endpoint", "http://127.0.0.1:1"])
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("KUBECONFIG is not set") && stderr.contains("REAL_CLUSTER.md"),
        "{stderr}"
    );
}
