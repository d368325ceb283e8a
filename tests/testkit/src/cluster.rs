//! A simulated cluster described once, and the two views of it the tests need: kube-sim's
//! topology (nodes, labels, taints) and the platform configuration the operator and the API read
//! (regions, buckets, pools, families). Describing both from one table keeps a pool's region,
//! GPU and spot flag from disagreeing between the two.
//!
//! Every pool's nodes carry `loraplane.io/node-pool: <pool>` (kube-sim's labels) and the platform
//! selects them by it. Spot pools are tainted `loraplane.io/spot=true:NoSchedule` and the
//! platform tolerates that; a [`Pool::untolerated_taint`] is a taint the platform does not
//! tolerate, so pods sent there stay unschedulable.

use kube_sim::cluster::{ClusterError, Topology};
use loraplane_crds::platform::{ConfigError, PlatformConfig};
use serde_json::{Value, json};

/// The spot taint's key (also the platform's toleration).
pub const SPOT_TAINT: &str = "loraplane.io/spot";

/// A cluster: its regions, in order.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The regions.
    pub regions: Vec<Region>,
}

/// A region, under one jurisdiction.
#[derive(Debug, Clone)]
pub struct Region {
    /// Region name (also the S3 region name unless [`Platform::s3_region`] says otherwise).
    pub name: String,
    /// `eea`, `us` or `other`.
    pub jurisdiction: &'static str,
    /// Zones of the nodes (kube-sim picks one when empty).
    pub zones: Vec<String>,
    /// GPU node pools.
    pub pools: Vec<Pool>,
}

/// A GPU node pool.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// `nvidia.com/gpu.product` of its nodes.
    pub gpu_product: &'static str,
    /// GPU memory per GPU.
    pub gpu_memory_gib: u32,
    /// GPUs per node.
    pub gpus_per_node: u32,
    /// Cloud instance type of its nodes.
    pub instance_type: &'static str,
    /// Spot capacity (reclaimable).
    pub spot: bool,
    /// How many nodes.
    pub nodes: u32,
    /// The platform's price per GPU-hour (placement prefers cheaper pools).
    pub hourly_price: f64,
    /// A taint key (value `"true"`, NoSchedule) the platform does not tolerate.
    pub untolerated_taint: Option<&'static str>,
}

impl Pool {
    /// `nodes` on-demand nodes with one NVIDIA L4 (24 GiB) each, at `hourly_price`.
    pub fn l4(name: &str, nodes: u32, hourly_price: f64) -> Pool {
        Pool {
            name: name.into(),
            gpu_product: "NVIDIA-L4",
            gpu_memory_gib: 24,
            gpus_per_node: 1,
            instance_type: "g6.xlarge",
            spot: false,
            nodes,
            hourly_price,
            untolerated_taint: None,
        }
    }

    /// Other GPUs: `per_node` × `product` with `memory_gib` each, on `instance_type`.
    pub fn with_gpus(
        mut self,
        product: &'static str,
        memory_gib: u32,
        per_node: u32,
        instance_type: &'static str,
    ) -> Pool {
        self.gpu_product = product;
        self.gpu_memory_gib = memory_gib;
        self.gpus_per_node = per_node;
        self.instance_type = instance_type;
        self
    }

    /// Spot capacity.
    pub fn spot(mut self) -> Pool {
        self.spot = true;
        self
    }

    /// Nodes tainted `key=true:NoSchedule`, which the platform does not tolerate.
    pub fn tainted(mut self, key: &'static str) -> Pool {
        self.untolerated_taint = Some(key);
        self
    }
}

impl Region {
    /// A region with `pools`.
    pub fn new(name: &str, jurisdiction: &'static str, pools: Vec<Pool>) -> Region {
        Region {
            name: name.into(),
            jurisdiction,
            zones: Vec::new(),
            pools,
        }
    }

    /// Its nodes in `zone`.
    pub fn in_zone(mut self, zone: &str) -> Region {
        self.zones = vec![zone.into()];
        self
    }
}

/// A model family the platform trains, with its weights and trainer image.
#[derive(Debug, Clone)]
pub struct Family {
    /// `sdxl`, `sd15`, …
    pub family: &'static str,
    /// Least GPU memory a pool needs for it.
    pub min_gpu_memory_gib: u32,
    /// Weights folder.
    pub weights: String,
    /// Trainer image.
    pub trainer_image: String,
    /// The licence as the platform states it: (name, cleared for commercial use).
    pub licence: Option<(&'static str, bool)>,
}

impl Family {
    /// FLUX.1 (40 GiB), weights under `models_dir/flux1`, its licence cleared for sale (as a
    /// service holding a commercial licence states it).
    pub fn flux1(models_dir: &str, image: &str) -> Family {
        Family {
            family: "flux1",
            min_gpu_memory_gib: 40,
            weights: format!("{models_dir}/flux1"),
            trainer_image: image.into(),
            licence: Some(("flux-1-dev-commercial", true)),
        }
    }

    /// SDXL (16 GiB) and SD1.5 (8 GiB), weights under `models_dir/<family>`, one image.
    pub fn sdxl_and_sd15(models_dir: &str, image: &str) -> Vec<Family> {
        [("sdxl", 16), ("sd15", 8)]
            .into_iter()
            .map(|(family, min_gpu_memory_gib)| Family {
                family,
                min_gpu_memory_gib,
                weights: format!("{models_dir}/{family}"),
                trainer_image: image.into(),
                licence: None,
            })
            .collect()
    }
}

/// How the platform configuration names a region's bucket of a kind (`datasets`, …).
pub type BucketNamer = fn(kind: &str, region: &str) -> String;

/// `<kind>-<region>`, e.g. `datasets-eu-west`.
pub fn bucket_by_kind_and_region(kind: &str, region: &str) -> String {
    format!("{kind}-{region}")
}

/// What the platform configuration adds to the cluster: S3, buckets, families, defaults.
#[derive(Debug, Clone)]
pub struct Platform {
    /// Every region's S3 endpoint.
    pub s3_endpoint: String,
    /// The S3 signing region; `None`: each region's own name.
    pub s3_region: Option<String>,
    /// Bucket names.
    pub buckets: BucketNamer,
    /// Whether regions have a `corpus` bucket.
    pub corpus: bool,
    /// Families trained.
    pub families: Vec<Family>,
    /// The `defaults` section (JSON object), if any.
    pub defaults: Option<Value>,
    /// The `dataset` section (JSON object), if any.
    pub dataset: Option<Value>,
    /// Whether to list the cluster's pools (the API alone needs only regions).
    pub pools: bool,
}

impl Platform {
    /// S3 at `s3_endpoint`, `<kind>-<region>` buckets, no families, no defaults.
    pub fn new(s3_endpoint: &str) -> Platform {
        Platform {
            s3_endpoint: s3_endpoint.into(),
            s3_region: None,
            buckets: bucket_by_kind_and_region,
            corpus: false,
            families: Vec::new(),
            defaults: None,
            dataset: None,
            pools: true,
        }
    }
}

impl Cluster {
    /// The operator tests' cluster: `eu-west` (an L4 pool of 2 nodes at 0.5, the cheapest
    /// on-demand, `tainted` with `maintenance` when asked, and a 1-node spot pool at 0.2),
    /// `eu-north` (2 L4 nodes at 0.9) and `us-east` (4 L4 nodes at 0.1).
    pub fn three_regions(tainted_cheap_pool: bool) -> Cluster {
        let mut cheap = Pool::l4("eu-west-l4", 2, 0.5);
        if tainted_cheap_pool {
            cheap = cheap.tainted("maintenance");
        }
        Cluster {
            regions: vec![
                Region::new(
                    "eu-west",
                    "eea",
                    vec![cheap, Pool::l4("eu-west-l4-spot", 1, 0.2).spot()],
                ),
                Region::new("eu-north", "eea", vec![Pool::l4("eu-north-l4", 2, 0.9)]),
                Region::new("us-east", "us", vec![Pool::l4("us-east-l4", 4, 0.1)]),
            ],
        }
    }

    /// The cluster without region `name`.
    pub fn without_region(mut self, name: &str) -> Cluster {
        self.regions.retain(|r| r.name != name);
        self
    }

    /// kube-sim's topology YAML.
    pub fn topology_yaml(&self) -> String {
        let regions: Vec<Value> = self.regions.iter().map(region_topology).collect();
        to_yaml(&json!({ "regions": regions }))
    }

    /// kube-sim's topology.
    pub fn topology(&self) -> Result<Topology, ClusterError> {
        Topology::from_yaml(&self.topology_yaml())
    }

    /// The platform configuration YAML, as mounted from the chart's ConfigMap.
    pub fn platform_yaml(&self, p: &Platform) -> String {
        let regions: Vec<Value> = self.regions.iter().map(|r| region_platform(r, p)).collect();
        let pools: Vec<Value> = if p.pools {
            self.regions
                .iter()
                .flat_map(|r| r.pools.iter().map(|pool| pool_platform(&r.name, pool)))
                .collect()
        } else {
            Vec::new()
        };
        let families: Vec<Value> = p
            .families
            .iter()
            .map(|f| {
                let mut family = json!({"family": f.family, "minGpuMemoryGib": f.min_gpu_memory_gib,
                       "weights": f.weights, "trainerImage": f.trainer_image});
                if let Some((name, commercial_use)) = f.licence {
                    family["licence"] = json!({"name": name, "commercialUse": commercial_use});
                }
                family
            })
            .collect();
        let mut config = json!({"regions": regions, "pools": pools, "families": families});
        if let Some(defaults) = &p.defaults {
            config["defaults"] = defaults.clone();
        }
        if let Some(dataset) = &p.dataset {
            config["dataset"] = dataset.clone();
        }
        to_yaml(&config)
    }

    /// The parsed and validated platform configuration.
    pub fn platform(&self, p: &Platform) -> Result<PlatformConfig, ConfigError> {
        PlatformConfig::from_yaml(&self.platform_yaml(p))
    }
}

fn region_topology(r: &Region) -> Value {
    let pools: Vec<Value> = r
        .pools
        .iter()
        .map(|p| {
            let mut taints = Vec::new();
            if p.spot {
                taints.push(json!({"key": SPOT_TAINT, "value": "true", "effect": "NoSchedule"}));
            }
            if let Some(key) = p.untolerated_taint {
                taints.push(json!({"key": key, "value": "true", "effect": "NoSchedule"}));
            }
            json!({"name": p.name, "gpuProduct": p.gpu_product, "gpuMemoryGiB": p.gpu_memory_gib,
                   "gpusPerNode": p.gpus_per_node, "spot": p.spot, "instanceType": p.instance_type,
                   "taints": taints, "nodes": p.nodes})
        })
        .collect();
    let mut region = json!({"name": r.name, "jurisdiction": r.jurisdiction, "pools": pools});
    if !r.zones.is_empty() {
        region["zones"] = json!(r.zones);
    }
    region
}

fn region_platform(r: &Region, p: &Platform) -> Value {
    let bucket = |kind: &str| (p.buckets)(kind, &r.name);
    let mut buckets = json!({"datasets": bucket("datasets"), "checkpoints": bucket("checkpoints"),
                             "outputs": bucket("outputs")});
    if p.corpus {
        buckets["corpus"] = json!(bucket("corpus"));
    }
    let s3_region = p.s3_region.clone().unwrap_or_else(|| r.name.clone());
    json!({"name": r.name, "jurisdiction": r.jurisdiction,
           "s3": {"endpoint": p.s3_endpoint, "region": s3_region, "forcePathStyle": true},
           "buckets": buckets})
}

fn pool_platform(region: &str, p: &Pool) -> Value {
    let mut pool = json!({"name": p.name, "region": region,
                          "nodeSelector": {"loraplane.io/node-pool": p.name},
                          "gpuProduct": p.gpu_product, "gpuMemoryGib": p.gpu_memory_gib,
                          "spot": p.spot, "hourlyPrice": p.hourly_price});
    if p.spot {
        pool["tolerations"] = json!([{"key": SPOT_TAINT, "operator": "Equal", "value": "true",
                                      "effect": "NoSchedule"}]);
    }
    pool
}

fn to_yaml(v: &Value) -> String {
    // A JSON value always serialises to YAML.
    serde_yaml::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_pool_is_in_the_topology_and_the_platform_alike() {
        let c = Cluster::three_regions(true);
        let topo = c.topology().unwrap();
        let mut p = Platform::new("http://127.0.0.1:1");
        p.families = Family::sdxl_and_sd15("/models", "trainer:t");
        let platform = c.platform(&p).unwrap();
        assert_eq!(platform.pools.len(), 4);
        for pool in &platform.pools {
            let (region, tp) = topo.pool(&pool.name).unwrap();
            assert_eq!(region.name, pool.region, "{}", pool.name);
            assert_eq!(tp.spot, pool.spot, "{}", pool.name);
            assert_eq!(tp.gpu_product, pool.gpu_product, "{}", pool.name);
        }
        assert_eq!(platform.regions[0].buckets.datasets, "datasets-eu-west");
    }

    #[test]
    fn only_spot_pools_are_tolerated_and_the_maintenance_taint_is_not() {
        let c = Cluster::three_regions(true);
        let yaml = c.topology_yaml();
        assert!(yaml.contains("maintenance"), "{yaml}");
        let platform = c.platform(&Platform::new("http://s3")).unwrap();
        for pool in &platform.pools {
            let tolerated: Vec<_> = pool.tolerations.iter().map(|t| t.key.as_str()).collect();
            let want: &[&str] = if pool.spot { &[SPOT_TAINT] } else { &[] };
            assert_eq!(tolerated, want, "{}", pool.name);
        }
    }
}
