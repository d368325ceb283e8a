//! The binary refuses a bad platform config before touching any cluster, naming the field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn an_invalid_config_stops_start_up_with_the_field_named() {
    let dir = std::env::temp_dir().join(format!("lp-op-startup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("platform.yaml");
    std::fs::write(
        &path,
        r#"
regions:
  - name: eu-west
    jurisdiction: eea
    s3: {endpoint: "http://127.0.0.1:8333", region: eu-west}
    buckets: {datasets: datasets-eu, checkpoints: checkpoints-eu, outputs: outputs-eu}
pools:
  - name: gpu
    region: mars
    nodeSelector: {loraplane.io/node-pool: gpu}
    gpuProduct: NVIDIA-L4
    gpuMemoryGib: 24
families: []
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loraplane-operator"))
        .args([
            "--config",
            path.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", dir.join("absent-kubeconfig"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pools[0].region: unknown region \"mars\""),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
