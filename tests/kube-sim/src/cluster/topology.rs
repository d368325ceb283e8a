//! Topology files (regions → pools → node count) and the Node objects they describe.
//!
//! Pure: parsing, validation and Node generation, no I/O. Node names are `{pool}-{index}`, so
//! pool names must be unique across regions (as in the platform config).

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use loraplane_crds::platform::Jurisdiction;
use serde::{Deserialize, Serialize};

use super::error::ClusterError;

/// Label naming the pool a node belongs to.
pub const LABEL_POOL: &str = "loraplane.io/node-pool";
/// Standard region label.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
/// Standard zone label.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Standard instance-type label.
pub const LABEL_INSTANCE_TYPE: &str = "node.kubernetes.io/instance-type";
/// GPU product, as NVIDIA GPU feature discovery writes it.
pub const LABEL_GPU_PRODUCT: &str = "nvidia.com/gpu.product";
/// Memory per GPU in MiB, as NVIDIA GPU feature discovery writes it.
pub const LABEL_GPU_MEMORY: &str = "nvidia.com/gpu.memory";
/// `spot` or `on-demand`, as Karpenter writes it.
pub const LABEL_CAPACITY_TYPE: &str = "karpenter.sh/capacity-type";
/// The extended resource of a GPU.
pub const RESOURCE_GPU: &str = "nvidia.com/gpu";
/// Annotation marking nodes this simulator owns.
pub const ANNOTATION_SIMULATED: &str = "kube-sim.loraplane.io/simulated";

/// Regions → pools → nodes, parsed from YAML.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    /// Regions of the simulated cluster.
    #[serde(default)]
    pub regions: Vec<Region>,
}

/// One region.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Region {
    /// Region name (`topology.kubernetes.io/region`).
    pub name: String,
    /// `eea`, `us` or `other`.
    pub jurisdiction: Jurisdiction,
    /// Zones; nodes of each pool are spread over them round-robin. Default: `{name}-a`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<String>,
    /// Node pools of the region.
    #[serde(default)]
    pub pools: Vec<Pool>,
}

/// A node pool: identical nodes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pool {
    /// Pool name, unique across regions (`loraplane.io/node-pool`).
    pub name: String,
    /// GPU product (`nvidia.com/gpu.product`), e.g. `NVIDIA-L4`.
    pub gpu_product: String,
    /// Memory per GPU in GiB.
    #[serde(rename = "gpuMemoryGiB")]
    pub gpu_memory_gib: u32,
    /// GPUs per node (`nvidia.com/gpu` allocatable).
    pub gpus_per_node: u32,
    /// Spot (preemptible) capacity.
    #[serde(default)]
    pub spot: bool,
    /// Instance type (`node.kubernetes.io/instance-type`).
    pub instance_type: String,
    /// Extra node labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Node taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<TaintSpec>,
    /// Number of nodes.
    pub nodes: u32,
    /// CPU per node (a Kubernetes quantity). Default `8`.
    #[serde(default = "default_cpu")]
    pub cpu: String,
    /// Memory per node (a Kubernetes quantity). Default `64Gi`.
    #[serde(default = "default_memory")]
    pub memory: String,
}

fn default_cpu() -> String {
    "8".into()
}

fn default_memory() -> String {
    "64Gi".into()
}

/// A taint in a topology file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaintSpec {
    /// Taint key.
    pub key: String,
    /// Taint value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

impl Topology {
    /// Parses and validates a topology.
    pub fn from_yaml(text: &str) -> Result<Topology, ClusterError> {
        let topology: Topology =
            serde_yaml::from_str(text).map_err(|e| ClusterError::ParseTopology(e.to_string()))?;
        topology.validate()?;
        Ok(topology)
    }

    /// Reads, parses and validates a topology file.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Topology, ClusterError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ClusterError::ReadTopology {
            path: path.display().to_string(),
            source,
        })?;
        Topology::from_yaml(&text)
    }

    fn validate(&self) -> Result<(), ClusterError> {
        let mut regions = HashSet::new();
        let mut pools = HashSet::new();
        for region in &self.regions {
            if !regions.insert(region.name.as_str()) {
                return Err(ClusterError::ParseTopology(format!(
                    "region {} is declared twice",
                    region.name
                )));
            }
            for pool in &region.pools {
                if !pools.insert(pool.name.as_str()) {
                    return Err(ClusterError::ParseTopology(format!(
                        "pool {} is declared twice (pool names must be unique across regions)",
                        pool.name
                    )));
                }
                for taint in &pool.taints {
                    if !matches!(
                        taint.effect.as_str(),
                        "NoSchedule" | "PreferNoSchedule" | "NoExecute"
                    ) {
                        return Err(ClusterError::ParseTopology(format!(
                            "pool {}: taint {} has effect {:?}; want NoSchedule, PreferNoSchedule or NoExecute",
                            pool.name, taint.key, taint.effect
                        )));
                    }
                }
                for (what, q) in [("cpu", &pool.cpu), ("memory", &pool.memory)] {
                    if crate::cluster::quantity::parse(q).is_none() {
                        return Err(ClusterError::ParseTopology(format!(
                            "pool {}: {what} {q:?} is not a Kubernetes quantity",
                            pool.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Finds a pool and its region by pool name.
    pub fn pool(&self, name: &str) -> Option<(&Region, &Pool)> {
        self.regions
            .iter()
            .flat_map(|r| r.pools.iter().map(move |p| (r, p)))
            .find(|(_, p)| p.name == name)
    }

    /// Every node the topology declares.
    pub fn nodes(&self) -> Vec<Node> {
        let mut out = Vec::new();
        for region in &self.regions {
            for pool in &region.pools {
                for index in 0..pool.nodes {
                    out.push(node_for(region, pool, index));
                }
            }
        }
        out
    }
}

/// The Node object for the `index`-th node of a pool, Ready.
pub fn node_for(region: &Region, pool: &Pool, index: u32) -> Node {
    let name = format!("{}-{index}", pool.name);
    let zone = if region.zones.is_empty() {
        format!("{}-a", region.name)
    } else {
        region.zones[index as usize % region.zones.len()].clone()
    };
    let mut labels: BTreeMap<String, String> = pool.labels.clone();
    for (k, v) in [
        ("kubernetes.io/hostname", name.clone()),
        ("kubernetes.io/os", "linux".into()),
        ("kubernetes.io/arch", "amd64".into()),
        (LABEL_REGION, region.name.clone()),
        (LABEL_ZONE, zone.clone()),
        (LABEL_INSTANCE_TYPE, pool.instance_type.clone()),
        (LABEL_GPU_PRODUCT, pool.gpu_product.clone()),
        (
            LABEL_GPU_MEMORY,
            (u64::from(pool.gpu_memory_gib) * 1024).to_string(),
        ),
        ("nvidia.com/gpu.count", pool.gpus_per_node.to_string()),
        (LABEL_POOL, pool.name.clone()),
        (
            LABEL_CAPACITY_TYPE,
            if pool.spot { "spot" } else { "on-demand" }.into(),
        ),
    ] {
        labels.insert(k.to_string(), v);
    }
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", pool.cpu.clone()),
        ("memory", pool.memory.clone()),
        ("pods", "110".to_string()),
        ("ephemeral-storage", "200Gi".to_string()),
        (RESOURCE_GPU, pool.gpus_per_node.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v)))
    .collect();
    let taints: Vec<Taint> = pool
        .taints
        .iter()
        .map(|t| Taint {
            key: t.key.clone(),
            value: t.value.clone(),
            effect: t.effect.clone(),
            time_added: None,
        })
        .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_SIMULATED.to_string(),
                "true".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(format!("kube-sim://{}/{zone}/{name}", region.name)),
            taints: (!taints.is_empty()).then_some(taints),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            conditions: Some(ready_conditions(true)),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: "127.0.0.1".into(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name.clone(),
                },
            ]),
            node_info: Some(NodeSystemInfo {
                architecture: "amd64".into(),
                boot_id: format!("kube-sim-{name}"),
                container_runtime_version: "kube-sim://0.1.0".into(),
                kernel_version: "6.1.0-kube-sim".into(),
                kube_proxy_version: String::new(),
                kubelet_version: "v1.33.0-kube-sim".into(),
                machine_id: name.clone(),
                operating_system: "linux".into(),
                os_image: "kube-sim".into(),
                system_uuid: name,
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        }),
    }
}

/// The node conditions of a healthy (`ready`) or unreachable node, as the node lifecycle
/// controller writes them when a kubelet stops posting status.
pub fn ready_conditions(ready: bool) -> Vec<NodeCondition> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let cond = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    };
    if ready {
        vec![
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            cond(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            cond(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            cond(
                "Ready",
                "True",
                "KubeletReady",
                "kubelet is posting ready status",
            ),
        ]
    } else {
        ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"]
            .into_iter()
            .map(|t| {
                cond(
                    t,
                    "Unknown",
                    "NodeStatusUnknown",
                    "Kubelet stopped posting node status.",
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = include_str!("../../topologies/three-regions.yaml");

    #[test]
    fn shipped_topology_has_three_regions_and_tainted_spot_pools() {
        let t = Topology::from_yaml(THREE).unwrap();
        let names: Vec<_> = t.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["eu-west", "eu-central", "us-east"]);
        assert_eq!(t.regions[2].jurisdiction, Jurisdiction::Us);
        assert!(
            t.regions[..2]
                .iter()
                .all(|r| r.jurisdiction == Jurisdiction::Eea)
        );
        let nodes = t.nodes();
        assert!(nodes.len() >= 6);
        for n in &nodes {
            let labels = n.metadata.labels.as_ref().unwrap();
            let taints = n.spec.as_ref().unwrap().taints.clone().unwrap_or_default();
            let spot = labels[LABEL_CAPACITY_TYPE] == "spot";
            assert_eq!(
                taints.iter().any(|t| t.key == "loraplane.io/spot"
                    && t.value.as_deref() == Some("true")
                    && t.effect == "NoSchedule"),
                spot,
                "{:?}",
                n.metadata.name
            );
        }
        assert!(
            nodes
                .iter()
                .any(|n| n.metadata.labels.as_ref().unwrap()[LABEL_CAPACITY_TYPE] == "spot")
        );
    }

    #[test]
    fn nodes_carry_standard_labels_and_gpu_allocatable() {
        let t = Topology::from_yaml(
            r#"
regions:
  - name: eu-west
    jurisdiction: eea
    zones: [eu-west-a, eu-west-b]
    pools:
      - name: eu-west-l4
        gpuProduct: NVIDIA-L4
        gpuMemoryGiB: 24
        gpusPerNode: 2
        instanceType: g6.2xlarge
        labels: {team: ml}
        nodes: 3
"#,
        )
        .unwrap();
        let nodes = t.nodes();
        let names: Vec<_> = nodes
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["eu-west-l4-0", "eu-west-l4-1", "eu-west-l4-2"]);
        let labels = nodes[1].metadata.labels.clone().unwrap();
        assert_eq!(labels[LABEL_REGION], "eu-west");
        assert_eq!(labels[LABEL_ZONE], "eu-west-b");
        assert_eq!(labels[LABEL_INSTANCE_TYPE], "g6.2xlarge");
        assert_eq!(labels[LABEL_GPU_PRODUCT], "NVIDIA-L4");
        assert_eq!(labels[LABEL_GPU_MEMORY], "24576");
        assert_eq!(labels[LABEL_POOL], "eu-west-l4");
        assert_eq!(labels[LABEL_CAPACITY_TYPE], "on-demand");
        assert_eq!(labels["team"], "ml");
        let status = nodes[1].status.clone().unwrap();
        assert_eq!(status.allocatable.unwrap()[RESOURCE_GPU].0, "2");
        assert_eq!(status.capacity.unwrap()["memory"].0, "64Gi");
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
    }

    #[test]
    fn invalid_topologies_are_rejected_with_the_reason() {
        let dup = r#"
regions:
  - name: a
    jurisdiction: eea
    pools:
      - {name: p, gpuProduct: X, gpuMemoryGiB: 1, gpusPerNode: 1, instanceType: t, nodes: 1}
  - name: b
    jurisdiction: us
    pools:
      - {name: p, gpuProduct: X, gpuMemoryGiB: 1, gpusPerNode: 1, instanceType: t, nodes: 1}
"#;
        let err = Topology::from_yaml(dup).unwrap_err().to_string();
        assert!(err.contains("pool p is declared twice"), "{err}");
        let bad_j = "regions:\n  - {name: a, jurisdiction: mars}\n";
        let err = Topology::from_yaml(bad_j).unwrap_err().to_string();
        assert!(err.contains("unknown variant `mars`"), "{err}");
        let bad_effect = r#"
regions:
  - name: a
    jurisdiction: eea
    pools:
      - {name: p, gpuProduct: X, gpuMemoryGiB: 1, gpusPerNode: 1, instanceType: t, nodes: 1,
         taints: [{key: k, effect: Sometimes}]}
"#;
        let err = Topology::from_yaml(bad_effect).unwrap_err().to_string();
        assert!(err.contains("effect \"Sometimes\""), "{err}");
    }
}
