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
    /// Stripe's API, called for refunds.
    #[serde(default)]
    pub stripe_api: StripeApi,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// How notifications to storefronts, and refunds of jobs that end badly, are retried.
    #[serde(default)]
    pub notifications: Notifications,
}

/// Delivery of storefront notifications and of refunds owed after a job ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Notifications {
    /// A `job.progress` event at every multiple of this many per cent (0: none).
    pub progress_every_percent: u8,
    /// Seconds before the first retry of a failed delivery or refund; each next one doubles.
    pub retry_base_seconds: u64,
    /// The longest wait between two retries, in seconds.
    pub retry_max_seconds: u64,
    /// Seconds after which an undelivered event is abandoned (Stripe's own: three days).
    pub give_up_after_seconds: u64,
    /// Seconds a storefront may take to answer one delivery.
    pub timeout_seconds: u64,
    /// Jobs looked after at once per namespace (deliveries and refunds in flight).
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

impl Notifications {
    /// The delivery policy the pure decisions take.
    pub fn policy(&self) -> crate::outbox::Policy {
        let secs = |s: u64| i64::try_from(s).unwrap_or(i64::MAX);
        crate::outbox::Policy {
            progress_every: self.progress_every_percent,
            retry_base: secs(self.retry_base_seconds),
            retry_max: secs(self.retry_max_seconds),
            give_up_after: secs(self.give_up_after_seconds),
        }
    }
}

/// Where a tenant's storefront is told about its jobs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantNotifications {
    /// The storefront's webhook endpoint (`https://…`).
    pub url: String,
    /// The environment variable holding the signing secret shared with the storefront.
    pub secret_env: String,
}

/// Where Stripe's API is and how long a call may take.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StripeApi {
    /// Base URL of the API.
    pub base_url: String,
    /// Seconds a call may take before it counts as failed (the webhook then fails, and Stripe
    /// delivers it again later).
    pub timeout_seconds: u64,
}

impl Default for StripeApi {
    fn default() -> Self {
        StripeApi {
            base_url: "https://api.stripe.com".into(),
            timeout_seconds: 10,
        }
    }
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
    /// Training resolution in pixels (the long side of each bucket) of the plan's jobs; when
    /// empty the job leaves it unset and the family's default applies. Within the CRD's limits
    /// ([`RESOLUTION_MIN`]..=[`RESOLUTION_MAX`], a multiple of [`RESOLUTION_MULTIPLE`]).
    #[serde(default)]
    pub resolution: Option<i32>,
    /// What the plan costs. Draft orders quote it, and a paid checkout must match it exactly;
    /// a plan without a price can be ordered only through `POST /v1/jobs`.
    #[serde(default)]
    pub price: Option<Price>,
}

/// A price as Stripe states amounts: an integer in the currency's smallest unit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Price {
    /// In the smallest unit (cents for `eur`).
    pub amount: i64,
    /// Three-letter ISO code, lowercase (`eur`).
    pub currency: String,
}

// The CRD schema's limits of `spec.training.resolution`, checked at load so a bad plan fails
// at start-up rather than every order on it being refused by the apiserver. A test compares
// them with the generated CRD.
/// Smallest training resolution a plan may set.
pub const RESOLUTION_MIN: i32 = 256;
/// Largest training resolution a plan may set.
pub const RESOLUTION_MAX: i32 = 2048;
/// A plan's training resolution must be a multiple of this.
pub const RESOLUTION_MULTIPLE: i32 = 64;

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
    /// Hashes of tokens still accepted while the tenant rotates to `tokenSha256`: add the new
    /// token as `tokenSha256`, move the old one here, remove it once the clients switched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_token_sha256s: Vec<String>,
    /// Where the tenant's storefront receives signed notifications; none when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<TenantNotifications>,
}

impl Tenant {
    /// Every token hash that authenticates the tenant.
    pub fn token_hashes(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.token_sha256.as_str())
            .chain(self.previous_token_sha256s.iter().map(String::as_str))
    }
}

/// SHA-256 of the empty string: a tenant whose hash is this would accept an empty token.
const EMPTY_TOKEN_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Request and data limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Largest webhook body accepted.
    pub webhook_max_bytes: usize,
    /// Largest JSON request body accepted.
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
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, counted from its opening
    /// or from the previous response (slow or idle clients are dropped).
    #[serde(default = "default_header_timeout_seconds")]
    pub header_timeout_seconds: u64,
    /// Seconds a request may take to send its body.
    #[serde(default = "default_body_timeout_seconds")]
    pub body_timeout_seconds: u64,
    /// Dataset checks run at once; more wait their turn. Each holds up to the dataset rules'
    /// `maxEntryBytes + maxDecodeBytes` (320 MiB by default), so the chart's memory limit
    /// follows this number.
    #[serde(default = "default_max_concurrent_validations")]
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
            if let Some(r) = p.resolution
                && (!(RESOLUTION_MIN..=RESOLUTION_MAX).contains(&r) || r % RESOLUTION_MULTIPLE != 0)
            {
                return Err(ConfigError::Invalid {
                    field: format!("plans.{name}.resolution"),
                    message: format!(
                        "must be a multiple of {RESOLUTION_MULTIPLE} from {RESOLUTION_MIN} to {RESOLUTION_MAX}, not {r}"
                    ),
                });
            }
            if let Some(price) = &p.price
                && (price.amount < 1
                    || price.currency.len() != 3
                    || !price.currency.bytes().all(|b| b.is_ascii_lowercase()))
            {
                return Err(bad(
                    format!("plans.{name}.price"),
                    "needs a positive amount and a lowercase three-letter currency",
                ));
            }
            if p.retention == RetentionMode::ZeroRetention && p.keep_outputs_seconds > 86_400 {
                return Err(bad(
                    format!("plans.{name}.keepOutputsSeconds"),
                    "a zeroRetention plan keeps outputs for at most 86400 seconds",
                ));
            }
        }
        for (i, c) in self.limits.trusted_proxies.iter().enumerate() {
            if crate::client_ip::Cidr::parse(c).is_none() {
                return Err(bad(
                    format!("limits.trustedProxies[{i}]"),
                    "must be an address or ADDRESS/PREFIX",
                ));
            }
        }
        for (field, value) in [
            ("limits.maxConnections", self.limits.max_connections as u64),
            (
                "limits.maxConcurrentValidations",
                self.limits.max_concurrent_validations as u64,
            ),
            (
                "limits.headerTimeoutSeconds",
                self.limits.header_timeout_seconds,
            ),
            (
                "limits.bodyTimeoutSeconds",
                self.limits.body_timeout_seconds,
            ),
        ] {
            if value == 0 {
                return Err(bad(field.into(), "must be at least 1"));
            }
        }
        if self.notifications.progress_every_percent > 50 {
            return Err(bad(
                "notifications.progressEveryPercent".into(),
                "must be from 0 (none) to 50",
            ));
        }
        let mut namespaces = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            for (j, h) in t.token_hashes().enumerate() {
                let field = if j == 0 {
                    format!("tenants[{i}].tokenSha256")
                } else {
                    format!("tenants[{i}].previousTokenSha256s[{}]", j - 1)
                };
                if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad(field, "must be 64 hex digits"));
                }
                if h.eq_ignore_ascii_case(EMPTY_TOKEN_SHA256) {
                    return Err(bad(field, "is the SHA-256 of an empty token"));
                }
                if !hashes.insert(h.to_ascii_lowercase()) {
                    return Err(bad(field, "the same token hash is configured twice"));
                }
            }
            if let Some(n) = &t.notifications {
                let scheme_ok = n.url.starts_with("https://") || n.url.starts_with("http://");
                if !scheme_ok || n.url.len() > 2048 {
                    return Err(bad(
                        format!("tenants[{i}].notifications.url"),
                        "must be an http(s) URL of at most 2048 characters",
                    ));
                }
                let env_ok = !n.secret_env.is_empty()
                    && !n.secret_env.starts_with(|c: char| c.is_ascii_digit())
                    && n.secret_env
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                if !env_ok {
                    return Err(bad(
                        format!("tenants[{i}].notifications.secretEnv"),
                        "must be an environment variable name (A-Z, 0-9, _)",
                    ));
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(plan: &str) -> Result<ApiConfig, ConfigError> {
        ApiConfig::from_yaml(&format!(
            "stripeNamespace: orders\nplans:\n  basic: {{{plan}}}\n"
        ))
    }

    fn tenants(yaml: &str) -> Result<ApiConfig, ConfigError> {
        ApiConfig::from_yaml(&format!(
            "stripeNamespace: orders\nplans: {{}}\ntenants:\n{yaml}"
        ))
    }

    #[test]
    fn tokens_rotate_and_the_empty_tokens_hash_is_refused() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let c = tenants(&format!(
            "  - {{name: t, namespace: t, tokenSha256: {a}, previousTokenSha256s: [{b}]}}\n"
        ))
        .unwrap();
        assert_eq!(c.tenants[0].token_hashes().collect::<Vec<_>>(), [&a, &b]);
        let err = |yaml: String| match tenants(&yaml) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            err(format!(
                "  - {{name: t, namespace: t, tokenSha256: {EMPTY_TOKEN_SHA256}}}\n"
            )),
            "tenants[0].tokenSha256"
        );
        assert_eq!(
            err(format!(
                "  - {{name: t, namespace: t, tokenSha256: {a}}}\n  - {{name: u, namespace: u, tokenSha256: {b}, previousTokenSha256s: [{a}]}}\n"
            )),
            "tenants[1].previousTokenSha256s[0]"
        );
    }

    #[test]
    fn a_plan_resolution_is_read_and_is_optional() {
        let c = config("maxSteps: 100, resolution: 512").unwrap();
        assert_eq!(c.plans["basic"].resolution, Some(512));
        let c = config("maxSteps: 100").unwrap();
        assert_eq!(c.plans["basic"].resolution, None);
    }

    #[test]
    fn a_plan_resolution_outside_the_crd_limits_is_refused_naming_the_field() {
        for r in [0, 192, 300, 2112, -256] {
            match config(&format!("maxSteps: 100, resolution: {r}")) {
                Err(ConfigError::Invalid { field, message }) => {
                    assert_eq!(field, "plans.basic.resolution");
                    assert!(message.contains(&r.to_string()), "{message}");
                }
                other => panic!("resolution {r} was not refused: {other:?}"),
            }
        }
        for r in [256, 1024, 2048] {
            assert!(
                config(&format!("maxSteps: 100, resolution: {r}")).is_ok(),
                "{r}"
            );
        }
    }

    #[test]
    fn a_plan_price_must_be_positive_in_a_lowercase_currency() {
        let ok = config("maxSteps: 100, price: {amount: 1900, currency: eur}").unwrap();
        assert_eq!(
            ok.plans["basic"].price,
            Some(Price {
                amount: 1900,
                currency: "eur".into()
            })
        );
        for bad in [
            "{amount: 0, currency: eur}",
            "{amount: 5, currency: EUR}",
            "{amount: 5, currency: euro}",
        ] {
            match config(&format!("maxSteps: 100, price: {bad}")) {
                Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "plans.basic.price"),
                other => panic!("price {bad} was not refused: {other:?}"),
            }
        }
    }

    #[test]
    fn the_resolution_limits_match_the_crd_schema() {
        let crd: serde_json::Value =
            serde_yaml::from_str(&loraplane_crds::crd_yaml().unwrap()).unwrap();
        let versions = crd["spec"]["versions"].as_array().unwrap();
        assert!(!versions.is_empty());
        for v in versions {
            let field = v
                .pointer(
                    "/schema/openAPIV3Schema/properties/spec/properties/training/properties/resolution",
                )
                .unwrap();
            assert_eq!(field["minimum"].as_f64(), Some(f64::from(RESOLUTION_MIN)));
            assert_eq!(field["maximum"].as_f64(), Some(f64::from(RESOLUTION_MAX)));
            assert_eq!(
                field["multipleOf"].as_f64(),
                Some(f64::from(RESOLUTION_MULTIPLE))
            );
        }
    }
}
