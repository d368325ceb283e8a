//! The simulated cluster: nodes declared by a topology file, a scheduler that binds pending
//! pods, and kubelets that run them (scripted or as local processes). Every part talks to the
//! apiserver through a `kube::Client`, like kwok, so the apiserver stays the only source of
//! truth.
//!
//! - `topology`: the topology file and the Node objects it declares.
//! - `scheduler`: fit and score (pure); `kubelet`: [`KubeletConfig`] and the
//!   scripted/local-process rules (pure).
//! - `runtime`: the watchers, the scheduling and kubelet loops, and the faults.
//! - `pod`: one pod's life on a kubelet (status writes, scripts, processes, volumes, env).
//! - `host`: what a pod task uses of its kubelet (client, config, logs, volumes, processes).
//! - `error`: [`ClusterError`].
//!
//! Faults (methods on [`Cluster`]), and how they differ from a real cluster:
//! - [`Cluster::lose_node`]: the node's kubelet stops at once (its processes are killed, no
//!   final status is written), the node's conditions become `Unknown`
//!   (`NodeStatusUnknown`) and it gets the `node.kubernetes.io/unreachable` taint with
//!   `NoSchedule` and `NoExecute`. Its non-terminated pods are then marked the way the taint
//!   manager and pod GC leave them, immediately rather than after `tolerationSeconds`: phase
//!   `Failed`, reason `NodeLost`, condition `DisruptionTarget` (reason
//!   `DeletionByTaintManager`), containers terminated with `ContainerStatusUnknown` (exit
//!   137). They are not deleted: the operator sees them and deletes them.
//! - [`Cluster::preempt_node`]: a spot interruption. The kubelet shuts down gracefully: each
//!   container gets SIGTERM (scripted ones stop at once) and SIGKILL after the pod's grace
//!   period capped at [`KubeletConfig::shutdown_grace_period`]; the pods become `Failed`,
//!   reason `Terminated`, condition `DisruptionTarget` (reason `TerminationByKubelet`), with
//!   the containers' real exit codes. Then the Node object is deleted; with `recreate_after`
//!   a node of the same name and pool comes back after that delay. Pods stay (Failed) bound to
//!   the deleted node's name; pod GC is not simulated.
//! - [`Cluster::restore_node`]: a lost node becomes Ready again without the unreachable
//!   taints; a deleted (preempted) node is created again.
//! - [`Cluster::add_nodes`]: more nodes in a pool, named on from the pool's last index.

mod error;
mod host;
mod kubelet;
mod pod;
mod quantity;
mod runtime;
mod scheduler;
mod topology;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::ClusterError;
pub use kubelet::{ANNOTATION_SCRIPT, KubeletConfig, LocalImage, Script, ScriptRule};
pub use topology::{
    ANNOTATION_SIMULATED, LABEL_CAPACITY_TYPE, LABEL_GPU_MEMORY, LABEL_GPU_PRODUCT,
    LABEL_INSTANCE_TYPE, LABEL_POOL, LABEL_REGION, LABEL_ZONE, Pool, RESOURCE_GPU, Region,
    TaintSpec, Topology, node_for,
};

use crate::logs::PodLogs;

/// A running simulated cluster. Dropping it stops the scheduler and kubelets (and kills the
/// local processes).
pub struct Cluster {
    inner: Arc<runtime::Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("data_dir", &self.inner.host.data_dir)
            .finish_non_exhaustive()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.inner.kill_all();
    }
}

impl Cluster {
    /// Creates the topology's nodes and starts the scheduler and kubelets. Returns once the
    /// nodes exist and the watches have synced.
    pub async fn start(
        client: kube::Client,
        topology: Topology,
        kubelet: KubeletConfig,
        logs: PodLogs,
    ) -> Result<Cluster, ClusterError> {
        let (inner, tasks) = runtime::start(client, topology, kubelet, logs).await?;
        Ok(Cluster { inner, tasks })
    }

    /// The directory holding volumes and working files.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.inner.host.data_dir
    }

    /// The host directory of a claim, once a local-process pod has mounted it.
    pub fn claim_dir(&self, namespace: &str, claim: &str) -> Option<PathBuf> {
        self.inner.host.claim_dir(namespace, claim)
    }

    /// Names of the nodes this cluster created (and has not lost to preemption).
    pub fn node_names(&self) -> Vec<String> {
        self.inner.node_names()
    }

    /// Node loss (see the module docs).
    pub async fn lose_node(&self, name: &str) -> Result<(), ClusterError> {
        self.inner.lose_node(name).await
    }

    /// Spot preemption, optionally bringing the node back after a delay (see the module
    /// docs).
    pub async fn preempt_node(
        &self,
        name: &str,
        recreate_after: Option<Duration>,
    ) -> Result<(), ClusterError> {
        runtime::preempt_node(&self.inner, name, recreate_after).await
    }

    /// Brings a lost or preempted node back.
    pub async fn restore_node(&self, name: &str) -> Result<(), ClusterError> {
        self.inner.restore_node(name).await
    }

    /// Adds `count` nodes to a pool; returns their names.
    pub async fn add_nodes(&self, pool: &str, count: u32) -> Result<Vec<String>, ClusterError> {
        self.inner.add_nodes(pool, count).await
    }
}
