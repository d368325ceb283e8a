//! The platform configuration: regions (jurisdiction, S3 endpoint, buckets), GPU node pools,
//! model families and operator defaults. One YAML file, mounted from the chart into the operator
//! and the API, so both place data and pods by the same map.
//!
//! `PlatformConfig::from_yaml` parses and validates; an invalid file fails start-up with a
//! message naming the bad field.

use std::collections::{BTreeMap, HashSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::dataset::DatasetRules;
use crate::patterns::{BUCKET_PATTERN, DNS_LABEL_PATTERN};
use crate::trainer::S3Endpoint;
use crate::v1alpha1::{ModelFamily, Residency};

/// The jurisdiction a region's data centres are in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Jurisdiction {
    /// Inside the European Economic Area.
    Eea,
    /// In the United States.
    Us,
    /// Anywhere else (only `residency: any` jobs go there).
    Other,
}

impl Jurisdiction {
    /// Whether a job with this residency may be processed here.
    pub fn allows(self, residency: Residency) -> bool {
        match residency {
            Residency::Any => true,
            Residency::Eea => self == Jurisdiction::Eea,
            Residency::Us => self == Jurisdiction::Us,
        }
    }
}

/// The whole platform configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlatformConfig {
    /// Regions jobs may run in.
    #[schemars(length(min = 1))]
    pub regions: Vec<RegionConfig>,
    /// GPU node pools, each in one region.
    pub pools: Vec<PoolConfig>,
    /// Model families the platform trains.
    #[schemars(length(min = 1))]
    pub families: Vec<FamilyConfig>,
    /// Operator defaults.
    #[serde(default)]
    pub defaults: Defaults,
    /// What a dataset may be: checked by the API at upload and by the trainer before it trains.
    #[serde(default)]
    pub dataset: DatasetRules,
}

/// A region: where its nodes are, under which law, and its buckets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegionConfig {
    /// Region name, as in the nodes' `topology.kubernetes.io/region` label.
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// `eea`, `us` or `other`.
    pub jurisdiction: Jurisdiction,
    /// The region's S3 endpoint.
    pub s3: S3Endpoint,
    /// The region's buckets.
    pub buckets: Buckets,
}

/// The buckets of one region.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Buckets {
    /// Uploaded datasets.
    #[schemars(pattern(BUCKET_PATTERN))]
    pub datasets: String,
    /// Training checkpoints.
    #[schemars(pattern(BUCKET_PATTERN))]
    pub checkpoints: String,
    /// Trained LoRA files.
    #[schemars(pattern(BUCKET_PATTERN))]
    pub outputs: String,
    /// The consented corpus: where the dataset and LoRA of a job whose customer consented to
    /// training use are copied when it succeeds. Optional; a region without one copies nothing.
    /// It must lie in the region's jurisdiction, like the other buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(BUCKET_PATTERN))]
    pub corpus: Option<String>,
}

/// A Kubernetes toleration for a pool's taints.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TolerationConfig {
    /// Taint key.
    pub key: String,
    /// `Equal` (default) or `Exists`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Taint value (with `Equal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; empty matches all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
}

/// A GPU node pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name, unique across regions.
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// The region the pool's nodes are in.
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub region: String,
    /// Labels that select the pool's nodes (the pod's nodeSelector).
    #[schemars(extend("minProperties" = 1))]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the pool's taints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<TolerationConfig>,
    /// GPU product, as in `nvidia.com/gpu.product`.
    #[schemars(length(min = 1))]
    pub gpu_product: String,
    /// Memory per GPU in GiB.
    #[schemars(range(min = 1))]
    pub gpu_memory_gib: u32,
    /// Spot (preemptible) capacity.
    #[serde(default)]
    pub spot: bool,
    /// Price per GPU-hour, used to rank otherwise equal pools.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub hourly_price: f64,
}

/// How to train one model family.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FamilyConfig {
    /// `sd15`, `sdxl` or `flux1`.
    pub family: ModelFamily,
    /// The base weights' licence as this service holds it. When empty: the SD families are
    /// cleared for commercial use (CreativeML OpenRAIL-M and OpenRAIL++-M allow it) and flux1
    /// is not (FLUX.1-dev's licence is non-commercial; state schnell's Apache-2.0, or a
    /// commercial FLUX.1-dev licence the service holds, here). The API refuses orders for a
    /// family that is not cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licence: Option<Licence>,
    /// Minimum memory per GPU in GiB.
    #[schemars(range(min = 1))]
    pub min_gpu_memory_gib: u32,
    /// Base weights in the diffusers layout (a path in the trainer image or an `s3://` prefix).
    #[schemars(length(min = 1))]
    pub weights: String,
    /// Trainer container image.
    pub trainer_image: String,
    /// Extra trainer arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trainer_args: Vec<String>,
    /// CPU cores a trainer pod requests and is limited to.
    #[serde(default = "default_trainer_cpu")]
    #[schemars(range(min = 1))]
    pub cpu: u32,
    /// Memory a trainer pod requests and is limited to, in GiB (decoding, the model on the
    /// host while it loads, data loading).
    #[serde(default = "default_trainer_memory_gib")]
    #[schemars(range(min = 1))]
    pub memory_gib: u32,
    /// Size limit of the trainer's `/tmp` emptyDir, in GiB.
    #[serde(default = "default_trainer_tmp_gib")]
    #[schemars(range(min = 1))]
    pub tmp_gib: u32,
}

/// A base model's licence.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Licence {
    /// Its name, as the weights' model card gives it (e.g. `apache-2.0`,
    /// `flux-1-dev-non-commercial-license`).
    #[schemars(length(min = 1))]
    pub name: String,
    /// Whether LoRAs trained on it may be sold: the licence allows commercial use, or the
    /// service holds a commercial licence.
    pub commercial_use: bool,
}

impl FamilyConfig {
    /// Whether paid orders may train on this family (see `licence`).
    pub fn cleared_for_sale(&self) -> bool {
        match &self.licence {
            Some(l) => l.commercial_use,
            None => self.family != ModelFamily::Flux1,
        }
    }
}

fn default_trainer_cpu() -> u32 {
    4
}
fn default_trainer_memory_gib() -> u32 {
    32
}
fn default_trainer_tmp_gib() -> u32 {
    1
}

/// Operator defaults.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Defaults {
    /// Seconds a pod may stay unschedulable before the next candidate pool is tried.
    #[serde(default = "default_scheduling_timeout")]
    #[schemars(range(min = 1))]
    pub scheduling_timeout_seconds: u64,
    /// Checkpoint interval when the job does not set one.
    #[serde(default = "default_checkpoint_every")]
    #[schemars(range(min = 1))]
    pub checkpoint_every: u64,
    /// First retry delay after a trainer crash; doubles per failure.
    #[serde(default = "default_backoff_seconds")]
    pub backoff_seconds: u64,
    /// Size of the job's scratch claim in GiB.
    #[serde(default = "default_scratch_gib")]
    #[schemars(range(min = 1))]
    pub scratch_gib: u32,
    /// Seconds an upload that no order consumed is kept before the operator deletes it.
    #[serde(default = "default_upload_ttl")]
    #[schemars(range(min = 60))]
    pub upload_ttl_seconds: u64,
}

fn default_scheduling_timeout() -> u64 {
    300
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_backoff_seconds() -> u64 {
    10
}
fn default_scratch_gib() -> u32 {
    50
}
fn default_upload_ttl() -> u64 {
    86_400
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            scheduling_timeout_seconds: default_scheduling_timeout(),
            checkpoint_every: default_checkpoint_every(),
            backoff_seconds: default_backoff_seconds(),
            scratch_gib: default_scratch_gib(),
            upload_ttl_seconds: default_upload_ttl(),
        }
    }
}

/// Why a platform configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid YAML for the schema.
    #[error("platform config: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// A field's value breaks a rule.
    #[error("platform config: {field}: {message}")]
    Invalid {
        /// Path of the bad field, e.g. `pools[2].region`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl PlatformConfig {
    /// Parses and validates a YAML configuration.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: PlatformConfig = serde_yaml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules serde cannot: unique names, pools in known regions, sane numbers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.dataset
            .validate()
            .map_err(|e| invalid("dataset", e.to_string()))?;
        if self.regions.is_empty() {
            return Err(invalid("regions", "at least one region is required"));
        }
        let mut regions = HashSet::new();
        for (i, r) in self.regions.iter().enumerate() {
            if !is_dns_label(&r.name) {
                return Err(invalid(
                    format!("regions[{i}].name"),
                    format!("{:?} is not a DNS label", r.name),
                ));
            }
            if !regions.insert(r.name.as_str()) {
                return Err(invalid(
                    format!("regions[{i}].name"),
                    format!("duplicate region {:?}", r.name),
                ));
            }
            let b = &r.buckets;
            let named = [
                ("datasets", Some(&b.datasets)),
                ("checkpoints", Some(&b.checkpoints)),
                ("outputs", Some(&b.outputs)),
                ("corpus", b.corpus.as_ref()),
            ];
            for (field, bucket) in named.into_iter().filter_map(|(f, b)| Some((f, b?))) {
                if bucket.len() < 3
                    || bucket.len() > 63
                    || !bucket.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
                    })
                {
                    return Err(invalid(
                        format!("regions[{i}].buckets.{field}"),
                        format!("{bucket:?} is not a valid bucket name"),
                    ));
                }
            }
            if !(r.s3.endpoint.starts_with("http://") || r.s3.endpoint.starts_with("https://")) {
                return Err(invalid(
                    format!("regions[{i}].s3.endpoint"),
                    "must be an http:// or https:// URL",
                ));
            }
        }
        let mut pools = HashSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            if !pools.insert(p.name.as_str()) {
                return Err(invalid(
                    format!("pools[{i}].name"),
                    format!("duplicate pool {:?}", p.name),
                ));
            }
            if !regions.contains(p.region.as_str()) {
                return Err(invalid(
                    format!("pools[{i}].region"),
                    format!("unknown region {:?}", p.region),
                ));
            }
            if p.node_selector.is_empty() {
                return Err(invalid(
                    format!("pools[{i}].nodeSelector"),
                    "must select the pool's nodes",
                ));
            }
            if p.gpu_memory_gib == 0 {
                return Err(invalid(
                    format!("pools[{i}].gpuMemoryGib"),
                    "must be at least 1",
                ));
            }
            if !(p.hourly_price.is_finite() && p.hourly_price >= 0.0) {
                return Err(invalid(
                    format!("pools[{i}].hourlyPrice"),
                    "must be a non-negative number",
                ));
            }
        }
        let mut families = HashSet::new();
        for (i, f) in self.families.iter().enumerate() {
            if !families.insert(f.family) {
                return Err(invalid(
                    format!("families[{i}].family"),
                    format!("duplicate family {}", f.family.as_str()),
                ));
            }
            if f.trainer_image.is_empty() {
                return Err(invalid(
                    format!("families[{i}].trainerImage"),
                    "must not be empty",
                ));
            }
        }
        if self.defaults.scheduling_timeout_seconds == 0 {
            return Err(invalid(
                "defaults.schedulingTimeoutSeconds",
                "must be at least 1",
            ));
        }
        if self.defaults.checkpoint_every == 0 {
            return Err(invalid("defaults.checkpointEvery", "must be at least 1"));
        }
        Ok(())
    }

    /// The region with this name.
    pub fn region(&self, name: &str) -> Option<&RegionConfig> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// The configuration of a model family.
    pub fn family(&self, family: ModelFamily) -> Option<&FamilyConfig> {
        self.families.iter().find(|f| f.family == family)
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
regions:
  - name: eu-west
    jurisdiction: eea
    s3: {endpoint: "http://127.0.0.1:8333", region: eu-west, forcePathStyle: true}
    buckets: {datasets: datasets-eu-west, checkpoints: checkpoints-eu-west, outputs: outputs-eu-west}
  - name: us-east
    jurisdiction: us
    s3: {endpoint: "https://s3.us-east-1.amazonaws.com", region: us-east-1}
    buckets: {datasets: datasets-us-east, checkpoints: checkpoints-us-east, outputs: outputs-us-east}
pools:
  - name: eu-west-l4
    region: eu-west
    nodeSelector: {loraplane.io/node-pool: eu-west-l4}
    gpuProduct: NVIDIA-L4
    gpuMemoryGib: 24
    hourlyPrice: 0.8
families:
  - family: sdxl
    minGpuMemoryGib: 16
    weights: /models/sdxl
    trainerImage: ghcr.io/loraplane/trainer:0.1.0
"#;

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = PlatformConfig::from_yaml(GOOD).unwrap();
        assert_eq!(c.defaults.scheduling_timeout_seconds, 300);
        assert_eq!(
            c.region("eu-west").map(|r| r.jurisdiction),
            Some(Jurisdiction::Eea)
        );
    }

    #[test]
    fn errors_name_the_bad_field() {
        let bad = GOOD.replace(
            "region: eu-west\n    nodeSelector",
            "region: mars\n    nodeSelector",
        );
        let err = PlatformConfig::from_yaml(&bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "platform config: pools[0].region: unknown region \"mars\""
        );
        let bad = GOOD.replace("gpuMemoryGib: 24", "gpuMemoryGib: 24\n    colour: red");
        let err = PlatformConfig::from_yaml(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn residency_maps_to_jurisdictions() {
        assert!(Jurisdiction::Eea.allows(Residency::Eea));
        assert!(!Jurisdiction::Us.allows(Residency::Eea));
        assert!(!Jurisdiction::Other.allows(Residency::Us));
        assert!(Jurisdiction::Other.allows(Residency::Any));
    }
}
