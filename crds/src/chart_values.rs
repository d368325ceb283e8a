//! The Helm chart's values (`charts/loraplane/values.yaml`) as Rust types, from which the
//! chart's `values.schema.json` is generated (`valuesgen`, `make values-schema`): the field
//! docs are the schema's descriptions and the `schemars` attributes its rules. A test fails
//! when the checked-in schema differs from these types.
//!
//! Sections the binaries read are their own types: `platform` is the [`PlatformConfig`] the
//! operator and the API load (the chart renders it into their ConfigMap as it is, filling only
//! an empty or missing `trainerImage`), and the API's plans, notifications and limits are the
//! [`crate::api_config`] types. The rest (images, replicas, Secrets, network policies,
//! monitoring) only the chart's templates read.

use std::collections::BTreeMap;

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema, json_schema};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::api_config::{EMPTY_TOKEN_SHA256, Limits, Notifications, Plan};
use crate::patterns::{DNS_LABEL_PATTERN, HTTP_URL_PATTERN};
use crate::platform::PlatformConfig;

/// Where `valuesgen` writes the generated schema, relative to the workspace root.
pub const VALUES_SCHEMA_PATH: &str = "charts/loraplane/values.schema.json";

/// Lowercase hex SHA-256.
const SHA256_HEX_PATTERN: &str = "^[a-f0-9]{64}$";

/// loraplane Helm values. Secrets are never values: every credential is a reference to an
/// existing Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "loraplane chart values")]
pub struct ChartValues {
    /// Image registry and tag shared by the operator, API and trainer images.
    pub image: ImageValues,
    /// Secrets the pods pull their images with (a pod's `imagePullSecrets`).
    pub image_pull_secrets: Option<Vec<ImagePullSecret>>,
    /// The LoRATrainingJob CRD.
    pub crds: CrdValues,
    /// The operator's Deployment.
    pub operator: OperatorValues,
    /// The API's Deployment and configuration.
    pub api: ApiValues,
    /// The trainer image.
    pub trainer: TrainerValues,
    /// Namespaces jobs may run in besides every tenant's and the Stripe order namespace (and
    /// operator.watchNamespace), e.g. for jobs created with kubectl. The operator's Role and the
    /// trainer NetworkPolicy are rendered into each; a job in any other namespace cannot be run.
    #[schemars(inner(pattern(DNS_LABEL_PATTERN)))]
    pub job_namespaces: Option<Vec<String>>,
    /// S3 credentials of the operator and the API. Trainer pods get none: the operator gives
    /// each attempt presigned URLs for exactly its own objects, signed with these (so they must
    /// be long-lived keys, or STS credentials that outlive the longest attempt).
    pub s3: S3Values,
    /// The platform: regions (jurisdiction, S3 endpoint, buckets), GPU node pools, model
    /// families, operator defaults and dataset rules. Rendered into the ConfigMap both the
    /// operator and the API read, with each family's empty `trainerImage` filled with the
    /// chart's trainer image.
    pub platform: PlatformConfig,
    /// Network policies of the trainer pods, the operator and the API.
    pub network_policy: NetworkPolicyValues,
    /// Prometheus Operator and Grafana objects.
    pub monitoring: MonitoringValues,
}

/// The image registry, tag and pull policy of every loraplane image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageValues {
    /// Registry (and path) the images are pulled from, e.g. `ghcr.io/loraplane`.
    #[schemars(length(min = 1))]
    pub registry: String,
    /// Tag of the operator, API and trainer images; empty: the chart's appVersion.
    pub tag: Option<String>,
    /// Pull policy of the operator and API containers.
    pub pull_policy: Option<PullPolicy>,
}

/// A container's image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull when the node lacks the image.
    IfNotPresent,
    /// Never pull.
    Never,
}

/// A Secret holding registry credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePullSecret {
    /// The Secret's name.
    pub name: String,
}

/// How the chart installs the CRD.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CrdValues {
    /// Install the LoRATrainingJob CRD as a template, so `helm upgrade` upgrades it too (Helm's
    /// crds/ folder installs once and never upgrades).
    pub install: Option<bool>,
    /// Keep the CRD (and so every job) when the release is uninstalled.
    pub keep: Option<bool>,
}

/// The operator's Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorValues {
    /// Replicas; one at a time holds the Lease and reconciles, the others wait to take over.
    #[schemars(range(min = 1, max = 5))]
    pub replicas: u32,
    /// Image name under image.registry.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Log output format (`--log-format`).
    pub log_format: Option<LogFormat>,
    /// Namespace to watch (`--namespace`); empty watches all namespaces.
    pub watch_namespace: Option<String>,
    /// The container's resources.
    pub resources: Option<Resources>,
    /// The Deployment's PodDisruptionBudget.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// The pods' nodeSelector.
    pub node_selector: Option<Map<String, Value>>,
    /// The pods' tolerations.
    pub tolerations: Option<Vec<Value>>,
    /// The pods' affinity.
    pub affinity: Option<Map<String, Value>>,
}

/// Output format of the operator's and the API's logs (their `--log-format`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A container's resource requests and limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// Requested quantities by resource (`cpu`, `memory`).
    pub requests: Option<Map<String, Value>>,
    /// Limits by resource (`memory`).
    pub limits: Option<Map<String, Value>>,
}

/// A Deployment's PodDisruptionBudget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodDisruptionBudget {
    /// Pods that must stay available during voluntary disruptions.
    pub min_available: u32,
}

/// A key of an existing Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// The key in the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// The API's Deployment, Service and configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiValues {
    /// Replicas of the API.
    #[schemars(range(min = 1, max = 50))]
    pub replicas: u32,
    /// Image name under image.registry.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Log output format (`--log-format`).
    pub log_format: Option<LogFormat>,
    /// The API's Service.
    pub service: Option<ServiceValues>,
    /// The container's resources. A dataset check holds one file and one decoded image
    /// (platform.dataset maxEntryBytes + maxDecodeBytes, 320 MiB by default) and
    /// limits.maxConcurrentValidations (2) run at once: raise the memory limit with either.
    pub resources: Option<Resources>,
    /// The Deployment's PodDisruptionBudget.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
    /// The pods' nodeSelector.
    pub node_selector: Option<Map<String, Value>>,
    /// The pods' tolerations.
    pub tolerations: Option<Vec<Value>>,
    /// The pods' affinity.
    pub affinity: Option<Map<String, Value>>,
    /// Stripe: the webhook's and the API key's Secrets, the API's URL and the namespace of
    /// webhook orders.
    pub stripe: StripeValues,
    /// Key of the keyed hash that turns order and payment ids into job and tombstone names and
    /// signs dataset receipts (whoever holds it can vouch for a dataset without a check).
    pub id_hash_key_secret_ref: SecretRef,
    /// Service tenants: namespace and the SHA-256 (hex) of their bearer token.
    pub tenants: Option<Vec<TenantValues>>,
    /// Plans an order can buy, by name; the API writes the resolved policy into each job.
    #[schemars(extend(
        "minProperties" = 1,
        "propertyNames" = {"pattern": DNS_LABEL_PATTERN}
    ))]
    pub plans: BTreeMap<String, Plan>,
    /// Retries of storefront notifications and of refunds of jobs that failed or were
    /// cancelled by the platform. Empty: the API's defaults.
    pub notifications: Option<Notifications>,
    /// Request and data limits (api/README.md). Empty: the API's defaults; otherwise the five
    /// without a default must be given.
    #[serde(default, deserialize_with = "empty_map_is_none")]
    #[schemars(schema_with = "empty_or_limits")]
    pub limits: Option<Limits>,
}

/// The API's Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceValues {
    /// The Service's type.
    #[serde(rename = "type")]
    pub service_type: Option<ServiceType>,
    /// The Service's port.
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
}

/// A Service's type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// A cluster-internal address.
    ClusterIP,
    /// A port on every node.
    NodePort,
    /// A cloud load balancer.
    LoadBalancer,
}

/// Stripe: Secrets, API and the namespace of webhook orders.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StripeValues {
    /// Stripe webhook endpoint secret(s); several, comma-separated, are accepted while one is
    /// rolled.
    pub webhook_secret_ref: SecretRef,
    /// Stripe secret key (restricted keys need only "Refunds: write"): the API refunds paid
    /// orders that cannot become jobs.
    pub api_key_secret_ref: SecretRef,
    /// Stripe's API (`https://api.stripe.com`).
    #[schemars(pattern(HTTP_URL_PATTERN))]
    pub api_base_url: Option<String>,
    /// Namespace the jobs of webhook orders live in.
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub namespace: String,
}

/// A tenant of the service API. The API reads it with the notification secret replaced by the
/// environment variable the chart puts it in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantValues {
    /// Tenant name (appears in logs and metrics).
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// The namespace the tenant's jobs live in; one tenant per namespace.
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub namespace: String,
    /// Lowercase hex SHA-256 of the tenant's bearer token; never the token itself.
    #[schemars(schema_with = "token_sha256")]
    pub token_sha256: String,
    /// Hashes of tokens still accepted while the tenant rotates to `tokenSha256`: add the new
    /// token as `tokenSha256`, move the old one here, remove it once the clients switched.
    #[serde(default)]
    #[schemars(schema_with = "token_sha256s")]
    pub previous_token_sha256s: Option<Vec<String>>,
    /// Where the tenant's storefront receives signed job notifications (`job.accepted` …
    /// `job.erased`); none when empty.
    pub notifications: Option<TenantNotificationValues>,
}

/// A storefront's notification endpoint and the Secret holding the signing secret shared
/// with it (verify the notifications as Stripe events).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantNotificationValues {
    /// The storefront's webhook endpoint (`https://…`).
    #[schemars(pattern(HTTP_URL_PATTERN), length(max = 2048))]
    pub url: String,
    /// The signing secret; the API gets it as `NOTIFY_SECRET_<index>`.
    pub secret_ref: SecretRef,
}

/// The trainer image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainerValues {
    /// Image name under image.registry; the image of every family without a trainerImage.
    #[schemars(length(min = 1))]
    pub image: String,
}

/// S3 credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Values {
    /// An existing Secret with the access key id and the secret access key.
    pub credentials_secret_ref: S3CredentialsSecretRef,
}

/// The Secret holding the S3 keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3CredentialsSecretRef {
    /// The Secret's name.
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// The key holding the access key id (`AWS_ACCESS_KEY_ID`).
    #[schemars(length(min = 1))]
    pub access_key_id_key: String,
    /// The key holding the secret access key (`AWS_SECRET_ACCESS_KEY`).
    #[schemars(length(min = 1))]
    pub secret_access_key_key: String,
}

/// Network policies: trainer pods reach only S3 (and DNS); operator and API reach the
/// apiserver and S3; only the ingress namespace reaches the API.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyValues {
    /// Render the policies.
    pub enabled: bool,
    /// CIDRs of the Kubernetes API server.
    #[schemars(length(min = 1))]
    pub api_server_cidrs: Option<Vec<String>>,
    /// CIDRs of the S3 endpoints (all regions). Required (at least one) while policies are
    /// enabled, the template says so: no default, since "anywhere" would let a compromised
    /// trainer reach anything on 80/443. 169.254.169.254 (cloud metadata) is excluded from
    /// whatever is listed.
    pub s3_cidrs: Option<Vec<String>>,
    /// CIDRs of Stripe's API (or of the egress proxy in front of it), for refunds. Required (at
    /// least one) while policies are enabled; the template says so.
    pub stripe_cidrs: Option<Vec<String>>,
    /// CIDRs of the storefronts' notification endpoints (api.tenants[].notifications.url).
    /// Required while policies are enabled and a tenant has notifications; the template says
    /// so.
    pub storefront_cidrs: Option<Vec<String>>,
    /// Namespace labels of the ingress controller allowed to reach the API.
    pub ingress_namespace_selector: Option<BTreeMap<String, String>>,
}

/// Prometheus Operator and Grafana objects.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MonitoringValues {
    /// The ServiceMonitor scraping the operator and the API.
    pub service_monitor: Option<ServiceMonitorValues>,
    /// The PrometheusRule with loraplane's alerts.
    pub prometheus_rule: Option<PrometheusRuleValues>,
    /// The Grafana dashboard ConfigMap.
    pub grafana_dashboard: Option<GrafanaDashboardValues>,
}

/// The ServiceMonitor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitorValues {
    /// Render it.
    pub enabled: Option<bool>,
    /// Scrape interval, in seconds or minutes (`30s`).
    #[schemars(pattern("^[0-9]+(s|m)$"))]
    pub interval: Option<String>,
    /// Extra labels of the ServiceMonitor (e.g. those Prometheus selects ServiceMonitors by).
    pub labels: Option<Map<String, Value>>,
}

/// The PrometheusRule and its alert thresholds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusRuleValues {
    /// Render it.
    pub enabled: Option<bool>,
    /// Extra labels of the PrometheusRule (e.g. those Prometheus selects rules by).
    pub labels: Option<Map<String, Value>>,
    /// Seconds a job's data may be kept past its retention before it pages (critical).
    #[schemars(range(min = 1))]
    pub retention_lag_seconds: Option<u64>,
    /// Seconds an erasure may take before it pages (critical; they normally finish in
    /// seconds).
    #[schemars(range(min = 1))]
    pub erasure_seconds: Option<u64>,
    /// Share of finished jobs that failed above which a warning fires; above 0, at most 1.
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    pub job_failure_ratio: Option<f64>,
    /// Failovers in an hour above which a warning fires.
    #[schemars(range(min = 1))]
    pub failovers_per_hour: Option<u32>,
}

/// The Grafana dashboard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrafanaDashboardValues {
    /// Render it.
    pub enabled: Option<bool>,
    /// The label the Grafana sidecar watches for.
    pub sidecar_label: Option<String>,
    /// The label's value.
    pub sidecar_label_value: Option<String>,
}

/// A token hash: 64 lowercase hex digits, and not the hash of the empty token.
fn token_sha256(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": SHA256_HEX_PATTERN,
        "not": {"const": EMPTY_TOKEN_SHA256},
    })
}

/// A list of token hashes.
fn token_sha256s(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "array", "items": token_sha256(generator)})
}

/// `{}` (the API's defaults) or a full [`Limits`].
fn empty_or_limits(generator: &mut SchemaGenerator) -> Schema {
    let limits = generator.subschema_for::<Limits>();
    json_schema!({"anyOf": [{"type": "object", "maxProperties": 0}, limits]})
}

/// Reads `{}` (or nothing, or null) as `None`, anything else as a `T`.
fn empty_map_is_none<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) if map.is_empty() => Ok(None),
        Some(value) => serde_json::from_value(value)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// The chart's values schema: JSON Schema draft-07, which every Helm 3 and 4 validates.
pub fn values_schema() -> Schema {
    let mut schema = SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<ChartValues>();
    tidy(&mut schema);
    chart_fills_trainer_image(&mut schema);
    schema
}

/// The chart's `values.schema.json` exactly as `valuesgen` writes it: [`values_schema`],
/// pretty-printed, with a trailing newline.
pub fn values_schema_json() -> Result<String, serde_json::Error> {
    let mut text = serde_json::to_string_pretty(&values_schema())?;
    text.push('\n');
    Ok(text)
}

/// Makes the schema describe what Helm values are, and read more easily: values are never
/// null (Helm drops a null key), so `Option` fields allow only their type; numbers carry no
/// Rust `format` (`uint32`…), `true` schemas (anything goes) are left out, and a doc
/// comment's line breaks are spaces (paragraphs stay apart).
fn tidy(schema: &mut Schema) {
    if let Some(object) = schema.as_object_mut() {
        if let Some(Value::String(description)) = object.get_mut("description") {
            *description = description
                .split("\n\n")
                .map(|paragraph| paragraph.replace('\n', " "))
                .collect::<Vec<_>>()
                .join("\n\n");
        }
        if let Some(Value::Array(types)) = object.get_mut("type") {
            types.retain(|t| t != "null");
            if types.len() == 1 {
                let only = types.remove(0);
                object.insert("type".into(), only);
            }
        }
        if matches!(
            object.get("type").and_then(Value::as_str),
            Some("integer" | "number")
        ) {
            object.remove("format");
        }
        if object.get("default") == Some(&Value::Null) {
            object.remove("default");
        }
        if let Some(Value::Array(values)) = object.get_mut("enum") {
            values.retain(|v| !v.is_null());
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(Value::Array(branches)) = object.get_mut(key) {
                branches.retain(|b| b.get("type").and_then(Value::as_str) != Some("null"));
                branches.retain(|b| b.get("const").is_none_or(|c| !c.is_null()));
                if branches.len() == 1 {
                    let only = branches.remove(0);
                    object.remove(key);
                    object.insert("allOf".into(), Value::Array(vec![only]));
                }
            }
        }
        for key in ["additionalProperties", "items"] {
            if object.get(key) == Some(&Value::Bool(true)) {
                object.remove(key);
            }
        }
    }
    schemars::transform::transform_subschemas(&mut tidy, schema);
}

/// The chart fills a family's missing or empty `trainerImage` with its own trainer image, so
/// in the values (unlike in the platform file) the field may be left out.
fn chart_fills_trainer_image(schema: &mut Schema) {
    let Some(family) = schema
        .get_mut("definitions")
        .and_then(|d| d.get_mut("FamilyConfig"))
    else {
        return;
    };
    if let Some(Value::Array(required)) = family.get_mut("required") {
        required.retain(|r| r != "trainerImage");
    }
    if let Some(Value::String(description)) =
        family.pointer_mut("/properties/trainerImage/description")
    {
        description.push_str(" In the chart: empty or unset means trainer.image.");
    }
}
