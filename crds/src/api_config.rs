//! The sections of the API's configuration file (`api.yaml`) that the Helm chart copies from
//! its values unchanged: the plans, the notification policy and the request limits. The chart's
//! `values.schema.json` is generated from these types (see [`crate::chart_values`]).
//!
//! `loraplane-api` reads them as they are (`loraplane_api::config` re-exports them), so the
//! API's file and the chart's schema cannot disagree. The schema's bounds are the API's
//! `validate` rules; the rules that span sections stay in the API.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::patterns::DNS_LABEL_PATTERN;
use crate::v1alpha1::RetentionMode;

/// SHA-256 of the empty string: a tenant whose hash is this would accept an empty token, so
/// neither the API nor the chart's schema accepts it.
pub const EMPTY_TOKEN_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Smallest training resolution a plan may set (the CRD's `spec.training.resolution` minimum).
pub const RESOLUTION_MIN: i32 = 256;
/// Largest training resolution a plan may set (the CRD's `spec.training.resolution` maximum).
pub const RESOLUTION_MAX: i32 = 2048;
/// A plan's training resolution must be a multiple of this (as the CRD's).
pub const RESOLUTION_MULTIPLE: i32 = 64;
/// The longest a plan may keep inputs or outputs: a year, in seconds.
pub const MAX_KEEP_SECONDS: i64 = 365 * 86_400;

/// A plan: what a paid order of this kind is allowed and how long its data lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Plan {
    /// `standard` or `zeroRetention`.
    #[serde(default)]
    pub retention: RetentionMode,
    /// Seconds inputs are kept after completion (standard mode).
    #[serde(default = "default_keep_inputs")]
    #[schemars(range(min = 0, max = MAX_KEEP_SECONDS))]
    pub keep_inputs_seconds: i64,
    /// Seconds outputs are kept after completion (at most 86400 for zero retention).
    #[serde(default = "default_keep_outputs")]
    #[schemars(range(min = 0, max = MAX_KEEP_SECONDS))]
    pub keep_outputs_seconds: i64,
    /// Regions the plan may use; empty means every region of the residency.
    #[serde(default)]
    #[schemars(inner(pattern(DNS_LABEL_PATTERN)))]
    pub allowed_regions: Vec<String>,
    /// Acceptable GPU products; empty accepts any with enough memory.
    #[serde(default)]
    pub gpu_products: Vec<String>,
    /// Minimum GPU memory in GiB.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub min_gpu_memory_gib: Option<i32>,
    /// Maximum training steps an order may ask for; also the default.
    #[schemars(range(min = 1, max = 100_000))]
    pub max_steps: i64,
    /// Training resolution in pixels (the long side of each bucket) of the plan's jobs; when
    /// empty the job leaves it unset and the family's default applies (512 for sd15, 1024 for
    /// sdxl). Within the CRD's limits: 256 to 2048, a multiple of 64.
    #[serde(default)]
    #[schemars(
        range(min = RESOLUTION_MIN, max = RESOLUTION_MAX),
        extend("multipleOf" = RESOLUTION_MULTIPLE)
    )]
    pub resolution: Option<i32>,
    /// What the plan costs. Draft orders quote it, and a paid checkout must match it exactly;
    /// a plan without a price can be ordered only through `POST /v1/jobs`.
    #[serde(default)]
    pub price: Option<Price>,
    /// The sample images the plan's jobs render while training (the job's `spec.samples`,
    /// with its defaults for everything not named here).
    #[serde(default)]
    pub samples: PlanSamples,
}

/// The sample images of a plan's jobs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PlanSamples {
    /// Sampler steps per image; 0: the plan's jobs render no samples.
    #[schemars(range(min = 0, max = 150))]
    pub steps: i32,
    /// Image side in pixels; empty: the training resolution.
    #[schemars(range(min = 64, max = RESOLUTION_MAX), extend("multipleOf" = RESOLUTION_MULTIPLE))]
    pub resolution: Option<i32>,
}

impl Default for PlanSamples {
    fn default() -> Self {
        PlanSamples {
            steps: crate::trainer::SamplesConfig::default().steps as i32,
            resolution: None,
        }
    }
}

fn default_keep_inputs() -> i64 {
    7 * 86_400
}
fn default_keep_outputs() -> i64 {
    30 * 86_400
}

/// A price as Stripe states amounts: an integer in the currency's smallest unit. (Also in the
/// API's OpenAPI document, with the `utoipa` feature.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Price {
    /// In the smallest unit (cents for `eur`).
    #[schemars(range(min = 1))]
    pub amount: i64,
    /// Three-letter ISO 4217 code, lowercase (`eur`).
    #[schemars(pattern("^[a-z]{3}$"))]
    pub currency: String,
}

/// Delivery of storefront notifications and of refunds owed after a job ended (failed or
/// cancelled by the platform).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Notifications {
    /// A `job.progress` event at every multiple of this many per cent (0: none).
    #[schemars(range(max = 50))]
    pub progress_every_percent: u8,
    /// Seconds before the first retry of a failed delivery or refund; each next one doubles.
    #[schemars(range(min = 1))]
    pub retry_base_seconds: u64,
    /// The longest wait between two retries, in seconds.
    #[schemars(range(min = 1))]
    pub retry_max_seconds: u64,
    /// Seconds after which an undelivered event is abandoned (Stripe's own: three days).
    #[schemars(range(min = 1))]
    pub give_up_after_seconds: u64,
    /// Seconds a storefront may take to answer one delivery.
    #[schemars(range(min = 1))]
    pub timeout_seconds: u64,
    /// Jobs looked after at once per namespace (deliveries and refunds in flight).
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: u16,
}

impl Default for Notifications {
    fn default() -> Self {
        Notifications {
            progress_every_percent: 25,
            retry_base_seconds: 30,
            retry_max_seconds: 3600,
            give_up_after_seconds: 3 * 86_400,
            timeout_seconds: 10,
            concurrency: 16,
        }
    }
}

/// Request and data limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Largest webhook body accepted, in bytes.
    pub webhook_max_bytes: usize,
    /// Largest JSON request body accepted, in bytes.
    pub json_max_bytes: usize,
    /// Presigned URL lifetime in seconds.
    pub presign_seconds: u64,
    /// Requests per second allowed per tenant (burst = 2x).
    pub tenant_rps: f64,
    /// Requests per second allowed per client IP (burst = 2x).
    pub ip_rps: f64,
    /// Proxies (CIDRs) whose `X-Forwarded-For` is believed: behind an ingress, its addresses,
    /// so each client gets its own rate-limit bucket. Empty: the socket peer is the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// Most connections open at once; more wait in the kernel's backlog.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1))]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, counted from its opening
    /// or from the previous response (slow or idle clients are dropped).
    #[serde(default = "default_header_timeout_seconds")]
    #[schemars(range(min = 1))]
    pub header_timeout_seconds: u64,
    /// Seconds a request may take to send its body.
    #[serde(default = "default_body_timeout_seconds")]
    #[schemars(range(min = 1))]
    pub body_timeout_seconds: u64,
    /// Dataset checks run at once; more wait their turn. Each holds up to the dataset rules'
    /// `maxEntryBytes + maxDecodeBytes` (320 MiB by default), so the chart's memory limit
    /// follows this number.
    #[serde(default = "default_max_concurrent_validations")]
    #[schemars(range(min = 1))]
    pub max_concurrent_validations: usize,
}

fn default_max_connections() -> usize {
    1024
}

fn default_header_timeout_seconds() -> u64 {
    10
}

fn default_body_timeout_seconds() -> u64 {
    30
}

fn default_max_concurrent_validations() -> usize {
    2
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            webhook_max_bytes: 64 * 1024,
            json_max_bytes: 16 * 1024,
            presign_seconds: 900,
            tenant_rps: 50.0,
            ip_rps: 100.0,
            trusted_proxies: Vec::new(),
            max_connections: default_max_connections(),
            header_timeout_seconds: default_header_timeout_seconds(),
            body_timeout_seconds: default_body_timeout_seconds(),
            max_concurrent_validations: default_max_concurrent_validations(),
        }
    }
}
