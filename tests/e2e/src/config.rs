//! The stack's configuration as data (pure): the simulated topology, the platform
//! configuration the operator and the API share, the API's plans and tenants, and the
//! LoRATrainingJob CRD as installed for the stack.
//!
//! The topology is chosen so that the journey proves something: `eu-west` sells only spot
//! capacity (one node) and is where datasets are uploaded, so a job lands there first and, when
//! its node is preempted, must move to `eu-central` (the other EEA region) to go on; `us-east` is the
//! non-EEA region an `eea` job must never reach.

use std::path::Path;

use kube_sim::cluster::Topology;
use loraplane_api::config::ApiConfig;
use loraplane_crds::platform::PlatformConfig;
use loraplane_testkit::api_config as api_fixtures;
use loraplane_testkit::{Cluster, Family, Platform, Pool, Region};
use serde_json::Value;

/// The namespace Stripe orders' jobs live in.
pub const ORDERS_NS: &str = "orders";
/// The namespace of the operator's and the API's Leases.
pub const SYSTEM_NS: &str = "loraplane-system";
/// The trainer image name in the platform configuration; the kubelets run it as the local
/// `loraplane-trainer` binary.
pub const TRAINER_IMAGE: &str = "registry.local/loraplane/trainer:e2e";
/// The bearer token of the storefront tenant (whose namespace is `ORDERS_NS`).
pub const STOREFRONT_TOKEN: &str = "storefront-e2e-token";
/// The Stripe webhook endpoint secret.
pub const WEBHOOK_SECRET: &str = "whsec_loraplane_e2e";
/// The API's id-hashing key.
pub const ID_HASH_KEY: &str = "loraplane-e2e-id-key";
/// Training resolution of the stack's plans (see [`api_yaml`]).
pub const E2E_RESOLUTION: i32 = 256;
/// Regions of the stack, with their jurisdictions.
pub const REGIONS: [(&str, &str); 3] =
    [("eu-west", "eea"), ("eu-central", "eea"), ("us-east", "us")];

/// The simulated cluster: two EEA regions and one US region, on-demand and spot pools (spot is
/// cheaper, eu-west cheapest).
pub fn cluster() -> Cluster {
    const A100: &str = "NVIDIA-A100-SXM4-80GB";
    let a100 =
        |name: &str, price: f64| Pool::l4(name, 1, price).with_gpus(A100, 80, 2, "p4d.2xlarge");
    Cluster {
        regions: vec![
            Region::new(
                "eu-west",
                "eea",
                vec![Pool::l4("eu-west-l4-spot", 1, 0.3).spot()],
            )
            .in_zone("eu-west-a"),
            Region::new(
                "eu-central",
                "eea",
                vec![
                    a100("eu-central-a100", 2.5),
                    a100("eu-central-a100-spot", 1.0).spot(),
                ],
            )
            .in_zone("eu-central-a"),
            Region::new(
                "us-east",
                "us",
                vec![
                    Pool::l4("us-east-l4", 1, 0.8),
                    Pool::l4("us-east-a10g-spot", 1, 0.4)
                        .with_gpus("NVIDIA-A10G", 24, 1, "g5.xlarge")
                        .spot(),
                ],
            )
            .in_zone("us-east-1a"),
        ],
    }
}

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The topology did not parse.
    #[error("parse the topology: {0}")]
    ParseTopology(String),
    /// The platform configuration was refused.
    #[error("build the platform config: {0}")]
    BuildPlatform(#[from] loraplane_crds::platform::ConfigError),
    /// The API configuration was refused.
    #[error("build the API config: {0}")]
    BuildApiConfig(#[from] loraplane_api::config::ConfigError),
    /// The CRD could not be generated or lacks the expected schema.
    #[error("build the CRD: {0}")]
    BuildCrd(String),
}

/// The stack's topology.
pub fn topology() -> Result<Topology, ConfigError> {
    cluster()
        .topology()
        .map_err(|e| ConfigError::ParseTopology(e.to_string()))
}

/// Names of a region's buckets: (datasets, checkpoints, outputs).
pub fn buckets(region: &str) -> [String; 3] {
    [
        format!("datasets-{region}"),
        format!("checkpoints-{region}"),
        format!("outputs-{region}"),
    ]
}

/// Every bucket of the stack.
pub fn all_buckets() -> Vec<String> {
    REGIONS.iter().flat_map(|(r, _)| buckets(r)).collect()
}

/// Operator knobs that differ between the tests and the demo.
#[derive(Debug, Clone)]
pub struct PlatformKnobs {
    /// Checkpoint interval of jobs that do not set one.
    pub checkpoint_every: u64,
    /// Seconds a pod may stay unschedulable before the next pool is tried.
    pub scheduling_timeout_seconds: u64,
}

impl Default for PlatformKnobs {
    fn default() -> Self {
        PlatformKnobs {
            checkpoint_every: 5,
            scheduling_timeout_seconds: 4,
        }
    }
}

/// The platform configuration text: regions on the given S3 endpoint, the topology's pools,
/// every model family with weights under `models_dir/<family>` (FLUX.1's licence cleared, as a
/// service holding a commercial licence states it).
pub fn platform_yaml(
    s3_endpoint: &str,
    s3_region: &str,
    models_dir: &Path,
    knobs: &PlatformKnobs,
) -> String {
    let mut p = Platform::new(s3_endpoint);
    p.s3_region = Some(s3_region.into());
    let models = models_dir.display().to_string();
    p.families = Family::sdxl_and_sd15(&models, TRAINER_IMAGE);
    p.families.push(Family::flux1(&models, TRAINER_IMAGE));
    p.defaults = Some(serde_json::json!({
        "schedulingTimeoutSeconds": knobs.scheduling_timeout_seconds,
        "backoffSeconds": 1,
        "checkpointEvery": knobs.checkpoint_every,
        "scratchGib": 1,
    }));
    cluster().platform_yaml(&p)
}

/// The parsed platform configuration.
pub fn platform(
    s3_endpoint: &str,
    s3_region: &str,
    models_dir: &Path,
    knobs: &PlatformKnobs,
) -> Result<PlatformConfig, ConfigError> {
    Ok(PlatformConfig::from_yaml(&platform_yaml(
        s3_endpoint,
        s3_region,
        models_dir,
        knobs,
    ))?)
}

/// Retention periods of the stack's plans (seconds after completion).
#[derive(Debug, Clone)]
pub struct RetentionKnobs {
    /// `standard` plan: inputs kept.
    pub keep_inputs_seconds: i64,
    /// `standard` plan: outputs kept.
    pub keep_outputs_seconds: i64,
    /// `zero` plan: outputs kept (inputs never).
    pub zero_keep_outputs_seconds: i64,
}

impl Default for RetentionKnobs {
    fn default() -> Self {
        RetentionKnobs {
            keep_inputs_seconds: 3,
            keep_outputs_seconds: 12,
            zero_keep_outputs_seconds: 10,
        }
    }
}

/// The API configuration: a `standard` and a `zero` plan with short retention, the storefront
/// tenant, small dataset limits, a fast retention resync.
///
/// Both plans train at [`E2E_RESOLUTION`]: without a plan resolution jobs get the family default
/// (1024 px for SDXL), where even the tiny test models need gigabytes of attention memory on a
/// CPU. Their samples are small and quick for the same reason: 64 px, 3 sampler steps (the
/// default 20 steps at the training resolution would take longer than the 20-step runs).
pub fn api_yaml(r: &RetentionKnobs, storefront: Option<&str>) -> String {
    let samples = serde_json::json!({"steps": 3, "resolution": 64});
    let plans = serde_json::json!({
        "standard": {"retention": "standard", "keepInputsSeconds": r.keep_inputs_seconds,
                     "keepOutputsSeconds": r.keep_outputs_seconds, "maxSteps": 400,
                     "resolution": E2E_RESOLUTION, "price": {"amount": 1900, "currency": "eur"},
                     "samples": samples},
        "zero": {"retention": "zeroRetention", "keepOutputsSeconds": r.zero_keep_outputs_seconds,
                 "maxSteps": 400, "resolution": E2E_RESOLUTION,
                 "price": {"amount": 2900, "currency": "eur"}, "samples": samples},
    });
    // The storefront's notification endpoint (the stack's stub), signed with NOTIFY_SECRET,
    // retried quickly.
    let storefront = match storefront {
        Some(url) => api_fixtures::notified_tenant(
            "storefront",
            ORDERS_NS,
            STOREFRONT_TOKEN,
            url,
            "STOREFRONT_NOTIFY_SECRET",
        ),
        None => api_fixtures::tenant("storefront", ORDERS_NS, STOREFRONT_TOKEN),
    };
    api_fixtures::yaml(
        ORDERS_NS,
        plans,
        vec![storefront],
        api_fixtures::loose_limits(16384, 600),
        serde_json::json!({"notifications": {"retryBaseSeconds": 1, "retryMaxSeconds": 5}}),
    )
}

/// The secret the storefront's notifications are signed with.
pub const NOTIFY_SECRET: &str = "whsec_e2e_storefront_notifications";

/// The parsed API configuration, notifying the storefront at `storefront` if given.
pub fn api_config(r: &RetentionKnobs, storefront: Option<&str>) -> Result<ApiConfig, ConfigError> {
    Ok(ApiConfig::from_yaml(&api_yaml(r, storefront))?)
}

/// The LoRATrainingJob CRD as the stack installs it: the generated CRD, unchanged.
pub fn crd() -> Result<Value, ConfigError> {
    let text = loraplane_crds::crd_yaml().map_err(|e| ConfigError::BuildCrd(e.to_string()))?;
    serde_yaml::from_str(&text).map_err(|e| ConfigError::BuildCrd(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraplane_crds::platform::Jurisdiction;

    #[test]
    fn platform_matches_the_topology_pools_and_regions() {
        let topo = topology().unwrap();
        let p = platform(
            "http://127.0.0.1:1",
            "us-east-1",
            Path::new("/models"),
            &PlatformKnobs::default(),
        )
        .unwrap();
        for pool in &p.pools {
            let (region, tp) = topo.pool(&pool.name).unwrap();
            assert_eq!(region.name, pool.region, "{}", pool.name);
            assert_eq!(tp.spot, pool.spot, "{}", pool.name);
            assert_eq!(tp.gpu_product, pool.gpu_product, "{}", pool.name);
        }
        let eea: Vec<_> = p
            .regions
            .iter()
            .filter(|r| r.jurisdiction == Jurisdiction::Eea)
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(eea, ["eu-west", "eu-central"]);
        // eu-west sells only spot: a preempted job must leave the region to go on.
        assert!(
            p.pools
                .iter()
                .filter(|x| x.region == "eu-west")
                .all(|x| x.spot)
        );
        assert_eq!(
            p.family(loraplane_crds::v1alpha1::ModelFamily::Sdxl)
                .unwrap()
                .weights,
            "/models/sdxl"
        );
    }

    #[test]
    fn api_config_has_short_retention_plans_and_the_storefront_tenant() {
        let c = api_config(&RetentionKnobs::default(), Some("http://127.0.0.1:9/hooks")).unwrap();
        assert_eq!(c.stripe_namespace, ORDERS_NS);
        assert_eq!(c.plans["standard"].keep_outputs_seconds, 12);
        assert_eq!(
            c.plans["zero"].retention,
            loraplane_crds::v1alpha1::RetentionMode::ZeroRetention
        );
        assert_eq!(
            c.tenants[0].token_sha256,
            api_fixtures::token_sha256(STOREFRONT_TOKEN)
        );
    }

    #[test]
    fn every_plan_trains_at_the_small_e2e_resolution() {
        let c = api_config(&RetentionKnobs::default(), Some("http://127.0.0.1:9/hooks")).unwrap();
        assert_eq!(c.plans.len(), 2);
        for (name, plan) in &c.plans {
            assert_eq!(plan.resolution, Some(E2E_RESOLUTION), "{name}");
        }
    }
}
