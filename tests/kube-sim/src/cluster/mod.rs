//! The simulated cluster: nodes declared by a topology file, a scheduler that binds pending
//! pods, and kubelets that run them (scripted or as local processes). Every part talks to the
//! apiserver through a `kube::Client`, like kwok, so the apiserver stays the only source of
//! truth.
//!
//! SKELETON: the types below are the agreed interface; the implementation is being written.

use std::path::PathBuf;

use crate::logs::PodLogs;

/// Regions → pools → nodes, parsed from YAML.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    /// Regions of the simulated cluster.
    #[serde(default)]
    pub regions: Vec<serde_json::Value>,
}

/// How the simulated kubelets run containers.
#[derive(Debug, Clone, Default)]
pub struct KubeletConfig {
    /// Where per-claim volume directories and local-process working files live.
    pub data_dir: Option<PathBuf>,
}

/// Errors of the simulated cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The topology file is invalid.
    #[error("topology: {0}")]
    ParseTopology(String),
}

/// A running simulated cluster.
#[derive(Debug)]
pub struct Cluster {
    _logs: PodLogs,
}

impl Cluster {
    /// Creates the topology's nodes and starts the scheduler and kubelets.
    pub async fn start(
        _client: kube::Client,
        _topology: Topology,
        _kubelet: KubeletConfig,
        logs: PodLogs,
    ) -> Result<Cluster, ClusterError> {
        Ok(Cluster { _logs: logs })
    }
}
