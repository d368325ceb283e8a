//! The simulated cluster's error type.

/// Errors of the simulated cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The topology file is invalid.
    #[error("topology: {0}")]
    ParseTopology(String),
    /// The topology file cannot be read.
    #[error("cannot read topology file {path}: {source}")]
    ReadTopology {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory cannot be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Creating a Node failed.
    #[error("create node {name}: {source}")]
    CreateNode {
        /// The node.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// Patching a Node (status or taints) failed.
    #[error("patch node {name}: {source}")]
    PatchNode {
        /// The node.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// Deleting a Node failed.
    #[error("delete node {name}: {source}")]
    DeleteNode {
        /// The node.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// Writing a pod's status failed.
    #[error("patch status of pod {namespace}/{name}: {source}")]
    PatchPodStatus {
        /// Namespace.
        namespace: String,
        /// Pod.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// The watches did not sync.
    #[error("watch {0}: the initial list did not complete")]
    StartWatch(&'static str),
    /// No such node in the simulated cluster.
    #[error("no simulated node named {0}")]
    UnknownNode(String),
    /// No such pool in the topology.
    #[error("no pool named {0} in the topology")]
    UnknownPool(String),
}
