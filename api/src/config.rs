//! The API's own configuration (one YAML file): plans, tenants, the Stripe namespace, limits.
//! Secrets (the Stripe endpoint secret, the id-hashing key) come from the environment, never
//! from this file, so the file can live in a ConfigMap.

use std::collections::BTreeMap;

use loraplane_crds::v1alpha1::{Residency, RetentionMode};
use serde::{Deserialize, Serialize};

/// The whole API configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiConfig {
    /// Plans by name.
    pub plans: BTreeMap<String, Plan>,
    /// Tenants of the service API.
    #[serde(default)]
    pub tenants: Vec<Tenant>,
    /// The namespace jobs ordered through the Stripe webhook live in.
    pub stripe_namespace: String,
    /// The namespace of the retention loop's leader-election Lease.
    #[serde(default = "default_lease_namespace")]
    pub lease_namespace: String,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
}

fn default_lease_namespace() -> String {
    "loraplane-system".into()
}

/// A plan: what a paid order of this kind is allowed and how long its data lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Plan {
    /// `standard` or `zeroRetention`.
    #[serde(default)]
    pub retention: RetentionMode,
    /// Seconds inputs are kept after completion (standard mode).
    #[serde(default = "default_keep_inputs")]
    pub keep_inputs_seconds: i64,
    /// Seconds outputs are kept after completion (at most 86400 for zero retention).
    #[serde(default = "default_keep_outputs")]
    pub keep_outputs_seconds: i64,
    /// Whether orders on this plan include training consent.
    #[serde(default)]
    pub training_consent: bool,
    /// Regions the plan may use; empty means every region of the residency.
    #[serde(default)]
    pub allowed_regions: Vec<String>,
    /// Acceptable GPU products; empty accepts any with enough memory.
    #[serde(default)]
    pub gpu_products: Vec<String>,
    /// Minimum GPU memory in GiB.
    #[serde(default)]
    pub min_gpu_memory_gib: Option<i32>,
    /// Maximum training steps an order may ask for; also the default.
    pub max_steps: i64,
}

fn default_keep_inputs() -> i64 {
    7 * 86_400
}
fn default_keep_outputs() -> i64 {
    30 * 86_400
}

/// A tenant of the service API.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tenant {
    /// Tenant name (appears in logs and metrics).
    pub name: String,
    /// The namespace the tenant's jobs live in; one tenant per namespace.
    pub namespace: String,
    /// Lowercase hex SHA-256 of the tenant's bearer token (the token itself is never stored).
    pub token_sha256: String,
}

/// Request and data limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Largest webhook body accepted.
    pub webhook_max_bytes: usize,
    /// Largest JSON request body accepted.
    pub json_max_bytes: usize,
    /// Largest dataset zip accepted.
    pub upload_max_bytes: u64,
    /// Largest total uncompressed size of a dataset.
    pub upload_max_uncompressed_bytes: u64,
    /// Largest compression ratio of any zip entry (decompression-bomb guard).
    pub upload_max_ratio: u64,
    /// Fewest images in a dataset.
    pub min_images: usize,
    /// Most images in a dataset.
    pub max_images: usize,
    /// Presigned URL lifetime in seconds.
    pub presign_seconds: u64,
    /// Requests per second allowed per tenant (burst = 2x).
    pub tenant_rps: f64,
    /// Requests per second allowed per client IP (burst = 2x).
    pub ip_rps: f64,
    /// Longest the retention loop sleeps without a change or a due time.
    pub gc_resync_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            webhook_max_bytes: 64 * 1024,
            json_max_bytes: 16 * 1024,
            upload_max_bytes: 512 * 1024 * 1024,
            upload_max_uncompressed_bytes: 2 * 1024 * 1024 * 1024,
            upload_max_ratio: 100,
            min_images: 5,
            max_images: 200,
            presign_seconds: 900,
            tenant_rps: 50.0,
            ip_rps: 100.0,
            gc_resync_seconds: 60,
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid YAML for the schema.
    #[error("api config: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// A rule serde cannot check.
    #[error("api config: {field}: {message}")]
    Invalid {
        /// The bad field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl ApiConfig {
    /// Parses and validates a YAML configuration.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let c: ApiConfig = serde_yaml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks plans and tenants.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: String, message: &str| ConfigError::Invalid {
            field,
            message: message.into(),
        };
        for (name, p) in &self.plans {
            if p.max_steps < 1 {
                return Err(bad(format!("plans.{name}.maxSteps"), "must be at least 1"));
            }
            if p.retention == RetentionMode::ZeroRetention && p.training_consent {
                return Err(bad(
                    format!("plans.{name}.trainingConsent"),
                    "a zeroRetention plan cannot include training consent",
                ));
            }
            if p.retention == RetentionMode::ZeroRetention && p.keep_outputs_seconds > 86_400 {
                return Err(bad(
                    format!("plans.{name}.keepOutputsSeconds"),
                    "a zeroRetention plan keeps outputs for at most 86400 seconds",
                ));
            }
        }
        let mut namespaces = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            if t.token_sha256.len() != 64 || !t.token_sha256.chars().all(|c| c.is_ascii_hexdigit())
            {
                return Err(bad(
                    format!("tenants[{i}].tokenSha256"),
                    "must be 64 hex digits",
                ));
            }
            // The Stripe namespace may have one tenant: the storefront that creates uploads
            // for checkout orders.
            if !namespaces.insert(t.namespace.as_str()) {
                return Err(bad(
                    format!("tenants[{i}].namespace"),
                    "each tenant needs its own namespace",
                ));
            }
        }
        Ok(())
    }
}

/// Residency parsed from an order's `region` preference: a jurisdiction or `any`.
pub fn parse_residency(s: &str) -> Option<Residency> {
    match s {
        "eea" => Some(Residency::Eea),
        "us" => Some(Residency::Us),
        "any" | "" => Some(Residency::Any),
        _ => None,
    }
}
