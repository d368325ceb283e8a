//! The API's configuration as the tests write it: tenants (with the SHA-256 of their token, as
//! the chart stores it), limits loose enough not to throttle a test, and the document they go
//! into. Plans stay with each test: they are what a test is about.

use serde_json::{Value, json};
use sha2::Digest;

/// Lowercase hex SHA-256 of a token (the `tokenSha256` the API compares against).
pub fn token_sha256(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A tenant of `namespace` whose bearer token is `token`.
pub fn tenant(name: &str, namespace: &str, token: &str) -> Value {
    json!({"name": name, "namespace": namespace, "tokenSha256": token_sha256(token)})
}

/// `tenant` whose storefront hears job events at `url`, signed with the secret in env
/// `secret_env`.
pub fn notified_tenant(
    name: &str,
    namespace: &str,
    token: &str,
    url: &str,
    secret_env: &str,
) -> Value {
    let mut t = tenant(name, namespace, token);
    t["notifications"] = json!({"url": url, "secretEnv": secret_env});
    t
}

/// Bodies up to `max_body_bytes`, presigned links valid `presign_seconds`, and rate limits no
/// test reaches unless it means to.
pub fn loose_limits(max_body_bytes: u64, presign_seconds: u64) -> Value {
    json!({"webhookMaxBytes": max_body_bytes, "jsonMaxBytes": max_body_bytes,
           "presignSeconds": presign_seconds, "tenantRps": 1000, "ipRps": 1000})
}

/// The API configuration YAML: Stripe orders in `stripe_namespace`, `plans` (an object of
/// plan name → plan), `tenants`, `limits`, and any `extra` top-level sections (an object).
pub fn yaml(
    stripe_namespace: &str,
    plans: Value,
    tenants: Vec<Value>,
    limits: Value,
    extra: Value,
) -> String {
    let mut config = json!({"stripeNamespace": stripe_namespace, "plans": plans,
                            "tenants": tenants, "limits": limits});
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            config[k] = v;
        }
    }
    // A JSON value always serialises to YAML.
    serde_yaml::to_string(&config).unwrap_or_default()
}
