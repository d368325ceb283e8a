//! The API's own configuration (one YAML file): plans, tenants, the Stripe namespace, limits.
//! Secrets (the Stripe endpoint secret, the id-hashing key) come from the environment, never
//! from this file, so the file can live in a ConfigMap.
//!
//! The sections the chart copies from its values unchanged (plans, prices, notification policy,
//! limits) are defined in `loraplane_crds::api_config`, where the chart's values schema is
//! generated from them; the rules that span sections (`validate`) live here.

use std::collections::BTreeMap;

pub use loraplane_crds::api_config::{
    EMPTY_TOKEN_SHA256, Limits, Notifications, Plan, Price, RESOLUTION_MAX, RESOLUTION_MIN,
    RESOLUTION_MULTIPLE,
};
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

/// Residency parsed from an order's or an upload request's `residency` field: `eea`, `us` or
/// `any` (empty means `any`).
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
