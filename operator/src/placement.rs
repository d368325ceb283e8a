//! Placement: which node pools a job may run on, best first. Pure functions of the job, the
//! platform configuration and the observed free GPU capacity, so residency can be proven by
//! tests rather than trusted.
//!
//! The pod only gets a pool's nodeSelector, tolerations and a required region affinity: the
//! kube-scheduler still binds it to a node. Ranking is a hint about where it will bind soonest.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use loraplane_crds::LoRATrainingJobSpec;
use loraplane_crds::platform::{PlatformConfig, PoolConfig};
use loraplane_crds::v1alpha1::SpotPolicy;

/// The extended resource name of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Free and total GPUs of one pool, from its Ready, schedulable nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCapacity {
    /// Allocatable GPUs over all nodes.
    pub total: i64,
    /// Allocatable minus requested by non-terminated pods, over all nodes.
    pub free: i64,
    /// The most free GPUs on any single node (a pod must fit on one node).
    pub max_free_on_node: i64,
}

/// A pool a job may be placed on.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Pool name.
    pub pool: String,
    /// The pool's region.
    pub region: String,
    /// Whether the pool is spot capacity.
    pub spot: bool,
    /// The pool's capacity when ranked.
    pub capacity: PoolCapacity,
}

/// Why no placement can be computed at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The job's model family has no configuration.
    #[error("model family {0} is not configured on this platform")]
    UnknownFamily(&'static str),
}

/// The minimum GPU memory the job needs: the larger of the family's and the job's.
pub fn required_gpu_memory_gib(
    spec: &LoRATrainingJobSpec,
    config: &PlatformConfig,
) -> Result<u32, PlacementError> {
    let family = config
        .family(spec.base_model.family)
        .ok_or(PlacementError::UnknownFamily(
            spec.base_model.family.as_str(),
        ))?;
    let asked = spec
        .resources
        .gpu
        .min_memory_gi_b
        .map(|m| u32::try_from(m).unwrap_or(0))
        .unwrap_or(0);
    Ok(family.min_gpu_memory_gib.max(asked))
}

/// Why a job's data may not be used where it lies. Each message names the rule broken (the
/// `BadInput` condition carries it); none quotes customer text (bucket names, region names
/// and the configured weights locations only).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataLocationError {
    /// `spec.dataset.uri` is not in any region's dataset bucket.
    #[error(
        "spec.dataset.uri must lie in a configured dataset bucket; bucket {bucket:?} is none of them"
    )]
    DatasetOutsideBuckets {
        /// The bucket the URI names.
        bucket: String,
    },
    /// The dataset's bucket is in a region the residency does not allow.
    #[error(
        "the dataset lies in region {region} ({jurisdiction}), which residency {residency} does not allow"
    )]
    DatasetOutsideResidency {
        /// The bucket's region.
        region: String,
        /// Its jurisdiction.
        jurisdiction: String,
        /// The job's residency.
        residency: String,
    },
    /// `spec.dataset.region` names another region than the one whose bucket holds it.
    #[error("spec.dataset.region is {claimed} but the dataset's bucket belongs to region {actual}")]
    DatasetRegionMismatch {
        /// What the spec says.
        claimed: String,
        /// Where the bucket is.
        actual: String,
    },
    /// `spec.baseModel.weights` is outside every configured weights location.
    #[error(
        "spec.baseModel.weights must lie under a configured model location ({allowed}); {weights:?} does not"
    )]
    WeightsOutsideModelLocations {
        /// The job's weights location.
        weights: String,
        /// The configured locations.
        allowed: String,
    },
}

/// Checks that the job's data lies where its residency allows, in buckets the platform owns:
/// the dataset in a configured dataset bucket of a region whose jurisdiction the residency
/// allows (retention later deletes by that location, so it must be ours), and explicit base
/// weights under one of the families' configured weights locations.
pub fn check_data_location(
    spec: &LoRATrainingJobSpec,
    config: &PlatformConfig,
) -> Result<(), DataLocationError> {
    let bucket = spec
        .dataset
        .uri
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .map_or("", |(b, _)| b);
    let region = config
        .regions
        .iter()
        .find(|r| r.buckets.datasets == bucket)
        .ok_or_else(|| DataLocationError::DatasetOutsideBuckets {
            bucket: bucket.to_string(),
        })?;
    if !region.jurisdiction.allows(spec.placement.residency) {
        return Err(DataLocationError::DatasetOutsideResidency {
            region: region.name.clone(),
            jurisdiction: format!("{:?}", region.jurisdiction).to_lowercase(),
            residency: format!("{:?}", spec.placement.residency).to_lowercase(),
        });
    }
    if let Some(claimed) = &spec.dataset.region
        && *claimed != region.name
    {
        return Err(DataLocationError::DatasetRegionMismatch {
            claimed: claimed.clone(),
            actual: region.name.clone(),
        });
    }
    if let Some(weights) = &spec.base_model.weights {
        let under = |root: &str| {
            let root = root.trim_end_matches('/');
            weights == root
                || weights
                    .strip_prefix(root)
                    .is_some_and(|rest| rest.starts_with('/'))
        };
        if !config.families.iter().any(|f| under(&f.weights)) {
            return Err(DataLocationError::WeightsOutsideModelLocations {
                weights: weights.clone(),
                allowed: config
                    .families
                    .iter()
                    .map(|f| f.weights.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    Ok(())
}

/// Whether a pool may ever host the job: residency, allow-list, GPU and spot policy.
fn eligible(
    spec: &LoRATrainingJobSpec,
    config: &PlatformConfig,
    pool: &PoolConfig,
    min_memory: u32,
) -> bool {
    let Some(region) = config.region(&pool.region) else {
        return false;
    };
    let placement = &spec.placement;
    region.jurisdiction.allows(placement.residency)
        && (placement.regions.is_empty() || placement.regions.iter().any(|r| r.0 == pool.region))
        && pool.gpu_memory_gib >= min_memory
        && (spec.resources.gpu.products.is_empty()
            || spec
                .resources
                .gpu
                .products
                .iter()
                .any(|p| p.0 == pool.gpu_product))
        && !(pool.spot && placement.spot == SpotPolicy::Never)
}

/// The pools the job may run on, best first (`status::next_in_round` picks the one it goes to).
pub fn rank(
    spec: &LoRATrainingJobSpec,
    config: &PlatformConfig,
    capacity: &BTreeMap<String, PoolCapacity>,
) -> Result<Vec<Candidate>, PlacementError> {
    let min_memory = required_gpu_memory_gib(spec, config)?;
    let count = i64::from(spec.resources.gpu.count.max(1));
    let dataset_region = spec.dataset.region.as_deref();
    let mut all: Vec<(&PoolConfig, PoolCapacity)> = config
        .pools
        .iter()
        .filter(|p| eligible(spec, config, p, min_memory))
        .map(|p| (p, capacity.get(&p.name).copied().unwrap_or_default()))
        .collect();
    all.sort_by(|(a, ca), (b, cb)| {
        // Each key sorts `false` first: a pool with room, the preferred kind, the data's region.
        let no_room = |c: &PoolCapacity| c.max_free_on_node < count;
        let not_preferred =
            |p: &PoolConfig| spec.placement.spot == SpotPolicy::Preferred && !p.spot;
        let remote = |p: &PoolConfig| dataset_region.is_some_and(|d| d != p.region);
        no_room(ca)
            .cmp(&no_room(cb))
            .then(not_preferred(a).cmp(&not_preferred(b)))
            .then(remote(a).cmp(&remote(b)))
            .then(a.hourly_price.total_cmp(&b.hourly_price))
            .then(cb.free.cmp(&ca.free))
            .then(a.name.cmp(&b.name))
    });
    Ok(all
        .iter()
        .map(|(p, c)| Candidate {
            pool: p.name.clone(),
            region: p.region.clone(),
            spot: p.spot,
            capacity: *c,
        })
        .collect())
}

/// GPUs a pod asks for (limits, else requests, summed over its containers).
pub fn pod_gpus(pod: &Pod) -> i64 {
    let Some(spec) = &pod.spec else { return 0 };
    spec.containers
        .iter()
        .map(|c| {
            let r = c.resources.as_ref();
            r.and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get(GPU_RESOURCE))
                .or_else(|| {
                    r.and_then(|r| r.requests.as_ref())
                        .and_then(|l| l.get(GPU_RESOURCE))
                })
                .and_then(|q| q.0.parse::<i64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

fn node_ready_and_schedulable(node: &Node) -> bool {
    let unschedulable = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        // A node that reports no conditions at all is taken at its word.
        .unwrap_or(true);
    !unschedulable && ready && node.metadata.deletion_timestamp.is_none()
}

/// Free GPU capacity per configured pool, from the Nodes and the non-terminated pods bound to
/// them.
pub fn pool_capacity<'a>(
    config: &PlatformConfig,
    nodes: impl IntoIterator<Item = &'a Node>,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> BTreeMap<String, PoolCapacity> {
    let mut used: BTreeMap<&str, i64> = BTreeMap::new();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded") | Some("Failed")) {
            continue;
        }
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            *used.entry(node).or_default() += pod_gpus(pod);
        }
    }
    pool_capacity_with_usage(config, nodes, |n| used.get(n).copied().unwrap_or(0))
}

/// As [`pool_capacity`], with the GPUs in use per node already known (the operator keeps
/// them current from its pod watch instead of summing every pod per reconcile).
pub fn pool_capacity_with_usage<'a>(
    config: &PlatformConfig,
    nodes: impl IntoIterator<Item = &'a Node>,
    used: impl Fn(&str) -> i64,
) -> BTreeMap<String, PoolCapacity> {
    let mut out: BTreeMap<String, PoolCapacity> = config
        .pools
        .iter()
        .map(|p| (p.name.clone(), PoolCapacity::default()))
        .collect();
    for node in nodes {
        if !node_ready_and_schedulable(node) {
            continue;
        }
        let labels = node.metadata.labels.as_ref();
        let Some(pool) = config.pools.iter().find(|p| {
            p.node_selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        }) else {
            continue;
        };
        let allocatable = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get(GPU_RESOURCE))
            .and_then(|q| q.0.parse::<i64>().ok())
            .unwrap_or(0);
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let free = (allocatable - used(name)).max(0);
        let Some(entry) = out.get_mut(&pool.name) else {
            continue;
        };
        entry.total += allocatable;
        entry.free += free;
        entry.max_free_on_node = entry.max_free_on_node.max(free);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use loraplane_crds::platform::{Buckets, Defaults, FamilyConfig, Jurisdiction, RegionConfig};
    use loraplane_crds::trainer::S3Endpoint;
    use loraplane_crds::v1alpha1::{GpuProduct, ModelFamily, Residency};
    use std::collections::BTreeSet;

    pub(crate) fn region(name: &str, j: Jurisdiction) -> RegionConfig {
        RegionConfig {
            name: name.into(),
            jurisdiction: j,
            s3: S3Endpoint {
                endpoint: "http://127.0.0.1:8333".into(),
                region: name.into(),
                force_path_style: true,
            },
            buckets: Buckets {
                datasets: format!("datasets-{name}"),
                checkpoints: format!("checkpoints-{name}"),
                outputs: format!("outputs-{name}"),
                corpus: None,
            },
        }
    }

    pub(crate) fn pool(name: &str, region: &str, mem: u32, spot: bool, price: f64) -> PoolConfig {
        PoolConfig {
            name: name.into(),
            region: region.into(),
            node_selector: [("loraplane.io/node-pool".to_string(), name.to_string())].into(),
            tolerations: vec![],
            gpu_product: if mem >= 80 {
                "NVIDIA-A100-SXM4-80GB"
            } else {
                "NVIDIA-L4"
            }
            .into(),
            gpu_memory_gib: mem,
            spot,
            hourly_price: price,
        }
    }

    pub(crate) fn platform() -> PlatformConfig {
        PlatformConfig {
            regions: vec![
                region("eu-west", Jurisdiction::Eea),
                region("eu-north", Jurisdiction::Eea),
                region("us-east", Jurisdiction::Us),
            ],
            pools: vec![
                pool("eu-west-l4", "eu-west", 24, false, 0.8),
                pool("eu-west-l4-spot", "eu-west", 24, true, 0.3),
                pool("eu-north-a100", "eu-north", 80, false, 3.0),
                pool("us-east-l4", "us-east", 24, false, 0.5),
            ],
            families: vec![
                FamilyConfig {
                    family: ModelFamily::Sdxl,
                    min_gpu_memory_gib: 16,
                    weights: "/models/sdxl".into(),
                    trainer_image: "trainer:test".into(),
                    trainer_args: vec![],
                    cpu: 4,
                    memory_gib: 32,
                    tmp_gib: 1,
                    licence: None,
                },
                FamilyConfig {
                    family: ModelFamily::Sd15,
                    min_gpu_memory_gib: 8,
                    weights: "/models/sd15".into(),
                    trainer_image: "trainer:test".into(),
                    trainer_args: vec![],
                    cpu: 4,
                    memory_gib: 32,
                    tmp_gib: 1,
                    licence: None,
                },
                FamilyConfig {
                    family: ModelFamily::Flux1,
                    min_gpu_memory_gib: 40,
                    weights: "/models/flux1".into(),
                    trainer_image: "trainer:test".into(),
                    trainer_args: vec![],
                    cpu: 4,
                    memory_gib: 64,
                    tmp_gib: 1,
                    licence: None,
                },
            ],
            defaults: Defaults::default(),
            dataset: Default::default(),
        }
    }

    pub(crate) fn spec(residency: Residency) -> LoRATrainingJobSpec {
        let mut s: LoRATrainingJobSpec = serde_json::from_value(serde_json::json!({
            "baseModel": {"family": "sdxl"},
            "concept": {"type": "character", "triggerWord": "zxq"},
            "dataset": {"uri": "s3://datasets-eu-west/a.zip", "sha256": "0".repeat(64)},
        }))
        .unwrap();
        s.placement.residency = residency;
        s
    }

    fn cap(free: i64) -> PoolCapacity {
        PoolCapacity {
            total: 8,
            free,
            max_free_on_node: free.min(8),
        }
    }

    fn names(c: &[Candidate]) -> Vec<&str> {
        c.iter().map(|c| c.pool.as_str()).collect()
    }

    #[test]
    fn the_data_must_lie_in_our_buckets_where_the_residency_allows() {
        let cfg = platform();
        assert_eq!(check_data_location(&spec(Residency::Eea), &cfg), Ok(()));
        let mut us_data = spec(Residency::Eea);
        us_data.dataset.uri = "s3://datasets-us-east/a.zip".into();
        let err = check_data_location(&us_data, &cfg).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the dataset lies in region us-east (us), which residency eea does not allow"
        );
        us_data.placement.residency = Residency::Any;
        assert_eq!(check_data_location(&us_data, &cfg), Ok(()));
        let mut foreign = spec(Residency::Any);
        foreign.dataset.uri = "s3://someone-elses-bucket/a.zip".into();
        assert!(matches!(
            check_data_location(&foreign, &cfg),
            Err(DataLocationError::DatasetOutsideBuckets { .. })
        ));
        // A checkpoint bucket is ours, but not a dataset bucket: retention would delete there.
        foreign.dataset.uri = "s3://checkpoints-eu-west/a.zip".into();
        assert!(check_data_location(&foreign, &cfg).is_err());
        let mut lying = spec(Residency::Eea);
        lying.dataset.region = Some("eu-north".into());
        assert!(matches!(
            check_data_location(&lying, &cfg),
            Err(DataLocationError::DatasetRegionMismatch { .. })
        ));
    }

    #[test]
    fn explicit_weights_must_lie_under_a_configured_model_location() {
        let cfg = platform();
        let mut s = spec(Residency::Eea);
        for ok in ["/models/sdxl", "/models/sdxl/", "/models/sd15/finetune-a"] {
            s.base_model.weights = Some(ok.into());
            assert_eq!(check_data_location(&s, &cfg), Ok(()), "{ok}");
        }
        for bad in ["/models/sdxl-evil", "s3://elsewhere/sdxl", "/etc"] {
            s.base_model.weights = Some(bad.into());
            assert!(
                matches!(
                    check_data_location(&s, &cfg),
                    Err(DataLocationError::WeightsOutsideModelLocations { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn eea_jobs_only_see_eea_pools_and_cheapest_with_capacity_wins() {
        let cfg = platform();
        let capacity = BTreeMap::from([
            ("eu-west-l4".to_string(), cap(4)),
            ("eu-west-l4-spot".to_string(), cap(0)),
            ("eu-north-a100".to_string(), cap(2)),
            ("us-east-l4".to_string(), cap(8)),
        ]);
        let c = rank(&spec(Residency::Eea), &cfg, &capacity).unwrap();
        // The spot pool is cheapest but full, so it drops behind the pools that fit.
        assert_eq!(
            names(&c),
            ["eu-west-l4", "eu-north-a100", "eu-west-l4-spot"]
        );
        let c = rank(&spec(Residency::Any), &cfg, &capacity).unwrap();
        assert_eq!(c[0].pool, "us-east-l4");
    }

    #[test]
    fn dataset_region_spot_policy_memory_and_products_shape_the_list() {
        let cfg = platform();
        let capacity: BTreeMap<_, _> = cfg.pools.iter().map(|p| (p.name.clone(), cap(8))).collect();
        let mut s = spec(Residency::Any);
        s.dataset.region = Some("eu-north".into());
        let c = rank(&s, &cfg, &capacity).unwrap();
        assert_eq!(c[0].pool, "eu-north-a100", "data locality beats price");

        let mut s = spec(Residency::Eea);
        s.placement.spot = SpotPolicy::Never;
        let c = rank(&s, &cfg, &capacity).unwrap();
        assert!(c.iter().all(|c| !c.spot));

        s.placement.spot = SpotPolicy::Preferred;
        let c = rank(&s, &cfg, &capacity).unwrap();
        assert_eq!(c[0].pool, "eu-west-l4-spot");

        s.resources.gpu.min_memory_gi_b = Some(40);
        let c = rank(&s, &cfg, &capacity).unwrap();
        assert_eq!(names(&c), ["eu-north-a100"]);

        // FLUX.1's weights alone fill a 24 GiB card: the family's minimum sizes the pools.
        let mut s = spec(Residency::Any);
        s.base_model.family = ModelFamily::Flux1;
        let c = rank(&s, &cfg, &capacity).unwrap();
        assert_eq!(names(&c), ["eu-north-a100"]);

        let mut s = spec(Residency::Any);
        s.resources.gpu.products = vec![GpuProduct("NVIDIA-L4".into())];
        s.placement.regions = vec![loraplane_crds::v1alpha1::RegionName("us-east".into())];
        let c = rank(&s, &cfg, &capacity).unwrap();
        assert_eq!(names(&c), ["us-east-l4"]);
    }

    #[test]
    fn tried_pools_are_skipped_until_the_round_is_exhausted() {
        let cfg = platform();
        let capacity = BTreeMap::new();
        let mut s = spec(Residency::Eea);
        s.placement.spot = SpotPolicy::Never;
        let c = rank(&s, &cfg, &capacity).unwrap();
        assert_eq!(names(&c), ["eu-west-l4", "eu-north-a100"]);
        let next = |tried: &[&str]| {
            let tried: BTreeSet<String> = tried.iter().map(|t| t.to_string()).collect();
            crate::status::next_in_round(&c, &tried).map(|n| n.pool.clone())
        };
        assert_eq!(next(&[]).as_deref(), Some("eu-west-l4"));
        assert_eq!(next(&["eu-west-l4"]).as_deref(), Some("eu-north-a100"));
        assert_eq!(
            next(&["eu-west-l4", "eu-north-a100"]).as_deref(),
            Some("eu-west-l4"),
            "round starts over"
        );
    }

    #[test]
    fn an_unconfigured_family_is_an_error() {
        let mut cfg = platform();
        cfg.families.retain(|f| f.family != ModelFamily::Sdxl);
        let err = rank(&spec(Residency::Any), &cfg, &BTreeMap::new());
        assert_eq!(err, Err(PlacementError::UnknownFamily("sdxl")));
    }

    pub(crate) fn node(name: &str, pool: &str, gpus: i64, ready: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"loraplane.io/node-pool": pool}},
            "status": {
                "allocatable": {"nvidia.com/gpu": gpus.to_string()},
                "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]
            }
        }))
        .unwrap()
    }

    fn gpu_pod(node: &str, gpus: i64, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"nodeName": node, "containers": [{"name": "c",
                "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[test]
    fn capacity_counts_ready_nodes_minus_running_pods() {
        let cfg = platform();
        let nodes = [
            node("n1", "eu-west-l4", 4, true),
            node("n2", "eu-west-l4", 4, true),
            node("n3", "eu-west-l4", 4, false),
            node("stray", "not-a-pool", 4, true),
        ];
        let pods = [
            gpu_pod("n1", 3, "Running"),
            gpu_pod("n2", 4, "Succeeded"),
            gpu_pod("n2", 1, "Pending"),
        ];
        let c = pool_capacity(&cfg, &nodes, &pods);
        assert_eq!(
            c["eu-west-l4"],
            PoolCapacity {
                total: 8,
                free: 4,
                max_free_on_node: 3
            }
        );
        assert_eq!(c["us-east-l4"], PoolCapacity::default());
    }

    /// A tiny deterministic generator, so the property test needs no extra crate and every
    /// failure is reproducible from its seed.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    #[test]
    fn property_eea_jobs_are_never_offered_a_non_eea_pool() {
        let jurisdictions = [Jurisdiction::Eea, Jurisdiction::Us, Jurisdiction::Other];
        for seed in 1..=2000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut cfg = platform();
            cfg.regions = (0..1 + rng.below(5))
                .map(|i| region(&format!("r{i}"), jurisdictions[rng.below(3) as usize]))
                .collect();
            cfg.pools = (0..1 + rng.below(8))
                .map(|i| {
                    let r = format!("r{}", rng.below(cfg.regions.len() as u64));
                    let mem = [16, 24, 48, 80][rng.below(4) as usize];
                    pool(
                        &format!("p{i}"),
                        &r,
                        mem,
                        rng.below(2) == 0,
                        rng.below(50) as f64 / 10.0,
                    )
                })
                .collect();
            let mut s = spec(Residency::Eea);
            s.placement.spot = [
                SpotPolicy::Never,
                SpotPolicy::Allowed,
                SpotPolicy::Preferred,
            ][rng.below(3) as usize];
            if rng.below(3) == 0 {
                s.dataset.region = Some(format!("r{}", rng.below(5)));
            }
            let mut excluded = BTreeSet::new();
            // A failure sequence: each round some pools fill up and the chosen one fails.
            for _ in 0..1 + rng.below(10) {
                let capacity: BTreeMap<_, _> = cfg
                    .pools
                    .iter()
                    .map(|p| (p.name.clone(), cap(rng.below(9) as i64)))
                    .collect();
                let c = rank(&s, &cfg, &capacity).unwrap();
                for cand in &c {
                    let j = cfg.region(&cand.region).map(|r| r.jurisdiction);
                    assert_eq!(j, Some(Jurisdiction::Eea), "seed {seed}: {cand:?}");
                }
                match crate::status::next_in_round(&c, &excluded) {
                    Some(first) => {
                        excluded.insert(first.pool.clone());
                    }
                    None => {
                        let any_eea_pool = cfg.pools.iter().any(|p| {
                            cfg.region(&p.region).map(|r| r.jurisdiction) == Some(Jurisdiction::Eea)
                        });
                        // Nothing offered is only right when no EEA pool could ever fit.
                        if any_eea_pool && s.placement.spot != SpotPolicy::Never {
                            assert!(
                                cfg.pools.iter().all(|p| cfg
                                    .region(&p.region)
                                    .map(|r| r.jurisdiction)
                                    != Some(Jurisdiction::Eea)
                                    || p.gpu_memory_gib < 16),
                                "seed {seed}: an eligible EEA pool was not offered"
                            );
                        }
                    }
                }
            }
        }
    }
}
