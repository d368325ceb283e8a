//! The cluster the operator benchmarks run against: kube-sim's three regions and six pools
//! (624 simulated GPUs), the matching platform configuration, and the release
//! `loraplane-operator` binary started as its own process (so its peak RSS is its own).
//! Shared by `operator-bench` (admission) and `lifecycle-bench` (erasure and retention).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kube_sim::cluster::{KubeletConfig, ScriptRule, Topology};
use kube_sim::{KubeSim, SimConfig};
use loraplane_testkit::{Cluster, Family, Platform, Pool, Region};

pub const REGIONS: [(&str, &str); 3] = [("eu-west", "eea"), ("eu-north", "eea"), ("us-east", "us")];
pub const POOLS_PER_REGION: usize = 2;
pub const NODES_PER_POOL: usize = 13;
pub const GPUS_PER_NODE: usize = 8;

/// Three regions of two pools each, every node with 8 L4s; pools of the `i`-th region cost
/// `1 + i` per GPU-hour.
pub fn cluster() -> Cluster {
    let regions = REGIONS
        .iter()
        .enumerate()
        .map(|(i, (region, j))| {
            let pools = ["a", "b"]
                .iter()
                .map(|kind| {
                    Pool::l4(
                        &format!("{region}-{kind}"),
                        NODES_PER_POOL as u32,
                        1.0 + i as f64,
                    )
                    .with_gpus(
                        "NVIDIA-L4",
                        24,
                        GPUS_PER_NODE as u32,
                        "g6.48xlarge",
                    )
                })
                .collect();
            Region::new(region, j, pools)
        })
        .collect();
    Cluster { regions }
}

pub fn topology() -> Topology {
    cluster().topology().unwrap()
}

/// kube-sim with `topology`, the CRD, and kubelets that run `scripts`.
pub async fn start_sim(scripts: Vec<ScriptRule>) -> KubeSim {
    KubeSim::start(
        SimConfig {
            topology: Some(topology()),
            kubelet: KubeletConfig {
                scripts,
                ..KubeletConfig::default()
            },
            crds: vec![],
        }
        .with_loraplane_crd(),
    )
    .await
    .unwrap()
}

/// A fresh working directory for one run of bench `name`, holding a kubeconfig for `sim`;
/// returns both paths.
pub fn work_dir(name: &str, sim: &KubeSim) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).unwrap();
    (dir, kubeconfig)
}

/// What the platform configuration adds to [`cluster`]: every region's S3 at `s3_endpoint`,
/// SDXL trained by `trainer:bench`.
pub fn platform(s3_endpoint: &str) -> Platform {
    let mut p = Platform::new(s3_endpoint);
    p.families = Family::sdxl_and_sd15("/models", "trainer:bench");
    p.families.truncate(1);
    p
}

/// The platform configuration of `topology`, every region's S3 at `s3_endpoint`.
pub fn platform_yaml(s3_endpoint: &str) -> String {
    cluster().platform_yaml(&platform(s3_endpoint))
}

/// Starts the release operator next to this example against `kubeconfig`, with
/// `platform_yaml` and S3 credentials `(access key, secret key)`. Returns it and its pid.
pub fn start_operator(
    dir: &Path,
    kubeconfig: &Path,
    platform_yaml: &str,
    (access_key, secret_key): (&str, &str),
) -> (tokio::process::Child, u32) {
    let config = dir.join("platform.yaml");
    std::fs::write(&config, platform_yaml).unwrap();
    let exe = std::env::current_exe().unwrap();
    let operator_bin = exe
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("loraplane-operator");
    let child = tokio::process::Command::new(&operator_bin)
        .args([
            "--config",
            config.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--leader-election-namespace",
            "default",
            "--log-format",
            "json",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("AWS_ACCESS_KEY_ID", access_key)
        .env("AWS_SECRET_ACCESS_KEY", secret_key)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} (build it with --bins): {e}",
                operator_bin.display()
            )
        });
    let pid = child.id().unwrap();
    (child, pid)
}

/// The peak resident set (VmHWM) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The `p` quantile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
