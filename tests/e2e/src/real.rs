//! The journey's stage on a real cluster (kind or k3d on a workstation, see
//! `tests/e2e/REAL_CLUSTER.md`): the Helm values that make the installed chart look like the
//! local stack (same regions, pools, buckets, namespaces, tenant and plans), the set-up a
//! platform team does next to the chart (namespaces, Secrets, buckets, GPU node pools), and
//! the one thing a journey does differently there: a spot preemption is an eviction of the
//! trainer pod from a cordoned node instead of kube-sim's node reclaim.
//!
//! Our CI machines cannot run a real cluster; `make test` compiles this and renders the
//! values through the chart (`tests/real_cluster_values.rs`), `make e2e-real` runs it.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube_sim::cluster::node_for;
use serde_json::{Value, json};

use crate::config::{
    self, ID_HASH_KEY, ORDERS_NS, PlatformKnobs, RetentionKnobs, STOREFRONT_TOKEN, SYSTEM_NS,
    WEBHOOK_SECRET,
};
use crate::endpoints::Endpoints;
use crate::stack::StackError;

/// The Helm release name the set-up guide installs (its API Service is `loraplane-api`).
pub const RELEASE: &str = "loraplane";
/// Where the trainer image keeps the tiny models (`families[].weights` point below it).
pub const MODELS_DIR: &str = "/models";
/// The Secret the chart's API reads the Stripe endpoint secret from (the chart default).
pub const STRIPE_SECRET: &str = "loraplane-stripe";
/// The Secret the chart's API reads the id hash key from (the chart default).
pub const API_SECRET: &str = "loraplane-api";
/// The Secret with S3 keys the operator and API read (the chart default).
pub const PLATFORM_S3_SECRET: &str = "loraplane-s3";
/// Field manager of the set-up's node patches.
const MANAGER: &str = "loraplane-e2e-real";

/// What differs between one real cluster and another.
#[derive(Debug, Clone)]
pub struct RealSettings {
    /// S3 endpoint as both the trainer pods and this machine reach it (presigned URLs carry
    /// it to the customer side), e.g. SeaweedFS on the kind network's gateway address.
    pub s3_endpoint: String,
    /// S3 signing region.
    pub s3_region: String,
    /// Image registry of the three images (`<registry>/loraplane-operator:<tag>`...).
    pub registry: String,
    /// Image tag.
    pub tag: String,
}

/// Retention of the real-cluster plans: long enough for a download over port-forward, short
/// enough to wait out in the run.
pub fn retention() -> RetentionKnobs {
    RetentionKnobs {
        keep_inputs_seconds: 20,
        keep_outputs_seconds: 60,
        zero_keep_outputs_seconds: 60,
    }
}

/// Why the set-up or a real-cluster step failed.
#[derive(Debug, thiserror::Error)]
pub enum RealError {
    /// A configuration could not be built.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The cluster has too few worker nodes for the topology's pools.
    #[error(
        "the cluster has {found} worker node(s); the journey needs one per GPU pool ({needed}): create it with tests/e2e/kind.yaml"
    )]
    TooFewWorkers {
        /// Workers found.
        found: usize,
        /// Pools to place.
        needed: usize,
    },
    /// The stack's own platform or API YAML did not read back as values.
    #[error("turn the {what} into Helm values: {message}")]
    BuildValues {
        /// Which text.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// An object the set-up creates could not be built.
    #[error("build {what}: {message}")]
    BuildObject {
        /// Which object.
        what: String,
        /// Why.
        message: String,
    },
    /// A Kubernetes call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// Why.
        source: kube::Error,
    },
    /// An S3 call failed.
    #[error("create bucket {bucket}: {message}")]
    CreateBucket {
        /// The bucket.
        bucket: String,
        /// Why.
        message: String,
    },
    /// A stack-level call failed.
    #[error(transparent)]
    Stack(#[from] StackError),
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> RealError {
    let action = action.into();
    move |source| RealError::Kube { action, source }
}

/// The Helm values that install loraplane as the journey expects it: the local stack's
/// platform (regions on `s3_endpoint`, the topology's pools, tiny models under
/// [`MODELS_DIR`]), the storefront tenant, short-retention plans, orders in [`ORDERS_NS`].
/// Network policies are off (kind's CNI does not enforce them) and so is monitoring (no
/// Prometheus operator CRDs in a bare cluster).
pub fn helm_values(s: &RealSettings) -> Result<Value, RealError> {
    let knobs = PlatformKnobs {
        checkpoint_every: 5,
        scheduling_timeout_seconds: 20,
    };
    let yaml = config::platform_yaml(&s.s3_endpoint, &s.s3_region, Path::new(MODELS_DIR), &knobs);
    let mut platform: Value = serde_yaml::from_str(&yaml).map_err(|e| RealError::BuildValues {
        what: "platform YAML",
        message: e.to_string(),
    })?;
    // Empty: the chart's own trainer image (`<registry>/loraplane-trainer:<tag>`).
    if let Some(families) = platform["families"].as_array_mut() {
        for f in families {
            f["trainerImage"] = json!("");
        }
    }
    let api: Value = serde_yaml::from_str(&config::api_yaml(&retention(), None)).map_err(|e| {
        RealError::BuildValues {
            what: "API YAML",
            message: e.to_string(),
        }
    })?;
    Ok(json!({
        "image": {"registry": s.registry, "tag": s.tag, "pullPolicy": "IfNotPresent"},
        "operator": {"replicas": 1, "podDisruptionBudget": {"minAvailable": 0}},
        "api": {
            "replicas": 1,
            "podDisruptionBudget": {"minAvailable": 0},
            "stripe": {"webhookSecretRef": {"name": STRIPE_SECRET, "key": "webhook-secret"},
                "apiKeySecretRef": {"name": STRIPE_SECRET, "key": "api-key"}, "namespace": ORDERS_NS},
            "idHashKeySecretRef": {"name": API_SECRET, "key": "id-hash-key"},
            "tenants": api["tenants"],
            "plans": api["plans"],
            "limits": api["limits"],
        },
        "s3": {
            "credentialsSecretRef": {
                "name": PLATFORM_S3_SECRET,
                "accessKeyIdKey": "AWS_ACCESS_KEY_ID",
                "secretAccessKeyKey": "AWS_SECRET_ACCESS_KEY",
            },
        },
        "platform": platform,
        "networkPolicy": {"enabled": false},
        "monitoring": {
            "serviceMonitor": {"enabled": false},
            "prometheusRule": {"enabled": false},
            "grafanaDashboard": {"enabled": false},
        },
    }))
}

/// S3 keys the set-up stores in the cluster's Secrets.
#[derive(Debug, Clone)]
pub struct S3Keys {
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

/// What a platform team creates next to the chart, done through the cluster's API: the two
/// namespaces, the Secrets the chart references, every region's buckets, and one worker node
/// per GPU pool of the topology, labelled, tainted and advertising `nvidia.com/gpu` as the
/// pool's nodes would (kind nodes have no GPUs; the trainer runs on their CPUs). Idempotent.
/// Returns (node, pool) pairs.
pub async fn prepare(
    client: &kube::Client,
    s3: &aws_sdk_s3::Client,
    keys: &S3Keys,
) -> Result<Vec<(String, String)>, RealError> {
    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in [ORDERS_NS, SYSTEM_NS] {
        let obj: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns}})).map_err(|e| {
                RealError::BuildObject {
                    what: format!("namespace {ns}"),
                    message: e.to_string(),
                }
            })?;
        match nss.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube_err(format!("create namespace {ns}"))(e)),
        }
    }
    let s3_data =
        json!({"AWS_ACCESS_KEY_ID": keys.access_key, "AWS_SECRET_ACCESS_KEY": keys.secret_key});
    let secrets = [
        (
            SYSTEM_NS,
            STRIPE_SECRET,
            // The API needs a Stripe key to start; nothing here is refunded, so it is never used.
            json!({"webhook-secret": WEBHOOK_SECRET, "api-key": "sk_test_unused_in_e2e_real"}),
        ),
        (SYSTEM_NS, API_SECRET, json!({"id-hash-key": ID_HASH_KEY})),
        (SYSTEM_NS, PLATFORM_S3_SECRET, s3_data),
    ];
    for (ns, name, data) in secrets {
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns},
            "stringData": data,
        }))
        .map_err(|e| RealError::BuildObject {
            what: format!("Secret {ns}/{name}"),
            message: e.to_string(),
        })?;
        Api::<Secret>::namespaced(client.clone(), ns)
            .patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(kube_err(format!("apply Secret {ns}/{name}")))?;
    }
    for bucket in config::all_buckets() {
        if let Err(e) = s3.create_bucket().bucket(&bucket).send().await {
            let exists = e.as_service_error().is_some_and(|s| {
                s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()
            });
            if !exists {
                return Err(RealError::CreateBucket {
                    bucket,
                    message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
                });
            }
        }
    }
    label_gpu_nodes(client).await
}

/// Gives each pool of the topology one worker node (by name order) and makes it look like that
/// pool's node: labels, taints and GPU capacity.
async fn label_gpu_nodes(client: &kube::Client) -> Result<Vec<(String, String)>, RealError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut workers: Vec<String> = nodes
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list nodes"))?
        .items
        .into_iter()
        .filter(|n| {
            let labels = n.metadata.labels.clone().unwrap_or_default();
            !labels.contains_key("node-role.kubernetes.io/control-plane")
        })
        .filter_map(|n| n.metadata.name)
        .collect();
    workers.sort();
    let topology = config::topology()?;
    let pools: Vec<_> = topology
        .regions
        .iter()
        .flat_map(|r| r.pools.iter().map(move |p| (r, p)))
        .collect();
    if workers.len() < pools.len() {
        return Err(RealError::TooFewWorkers {
            found: workers.len(),
            needed: pools.len(),
        });
    }
    let mut placed = Vec::new();
    for (worker, (region, pool)) in workers.iter().zip(pools) {
        let like = node_for(region, pool, 0);
        let mut labels: BTreeMap<String, String> = like.metadata.labels.unwrap_or_default();
        // The hostname label is the kubelet's, never ours.
        labels.remove("kubernetes.io/hostname");
        let taints = like.spec.and_then(|s| s.taints).unwrap_or_default();
        let spec = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": worker, "labels": labels},
            "spec": {"taints": taints},
        });
        nodes
            .patch(
                worker,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&spec),
            )
            .await
            .map_err(kube_err(format!("label node {worker}")))?;
        // Extended resources are advertised by patching the node's status capacity (what a
        // device plugin would report); the kubelet then offers them as allocatable.
        let gpus = pool.gpus_per_node.to_string();
        nodes
            .patch_status(
                worker,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"capacity": {"nvidia.com/gpu": gpus}}})),
            )
            .await
            .map_err(kube_err(format!("advertise GPUs on node {worker}")))?;
        placed.push((worker.clone(), pool.name.clone()));
    }
    Ok(placed)
}

/// Endpoints of a real cluster: `KUBECONFIG`'s current context, the API at `api_url` (e.g. a
/// `kubectl port-forward` of the `loraplane-api` Service), S3 at `s3_endpoint`. Waits are
/// `patience` times the local stack's (images to pull, real scheduling).
pub fn endpoints(
    client: kube::Client,
    kubeconfig: &Path,
    api_url: &str,
    s3: aws_sdk_s3::Client,
    patience: u32,
) -> Endpoints {
    let e = Endpoints::new(
        client,
        kubeconfig.to_path_buf(),
        STOREFRONT_TOKEN,
        WEBHOOK_SECRET,
        s3,
        patience,
    );
    e.set_api_urls(vec![api_url.trim_end_matches('/').to_string()]);
    e
}

/// An S3 client for a static-key endpoint with path-style addressing (SeaweedFS, MinIO).
pub fn s3_client(endpoint: &str, region: &str, keys: &S3Keys) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_sdk_s3::config::Region::new(region.to_string()))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            &keys.access_key,
            &keys.secret_key,
            None,
            None,
            "loraplane-e2e-real",
        ))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// A spot reclaim as a real cluster shows it: the node is cordoned (no new pods) and the
/// trainer pod is evicted through the Eviction API, which marks it `DisruptionTarget`.
pub async fn reclaim(client: &kube::Client, node: &str, job: &str) -> Result<(), RealError> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .map_err(kube_err(format!("cordon node {node}")))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ORDERS_NS);
    let list = pods
        .list(&ListParams::default().labels(&format!("loraplane.io/job={job}")))
        .await
        .map_err(kube_err("list the trainer pods"))?;
    for p in list.items {
        let on_node = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
        if let (true, Some(name)) = (on_node, p.metadata.name) {
            pods.evict(&name, &EvictParams::default())
                .await
                .map_err(kube_err(format!("evict pod {name}")))?;
        }
    }
    Ok(())
}

/// Undoes [`reclaim`]'s cordon.
pub async fn restore(client: &kube::Client, node: &str) -> Result<(), RealError> {
    Api::<Node>::all(client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": false}})),
        )
        .await
        .map_err(kube_err(format!("uncordon node {node}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RealSettings {
        RealSettings {
            s3_endpoint: "http://172.18.0.1:8333".into(),
            s3_region: "us-east-1".into(),
            registry: "loraplane.local".into(),
            tag: "dev".into(),
        }
    }

    #[test]
    fn values_carry_the_stacks_regions_pools_tenant_and_plans() {
        let v = helm_values(&settings()).unwrap();
        let regions: Vec<&str> = v["platform"]["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(regions, ["eu-west", "eu-central", "us-east"]);
        assert_eq!(
            v["platform"]["regions"][0]["s3"]["endpoint"],
            "http://172.18.0.1:8333"
        );
        let pools = v["platform"]["pools"].as_array().unwrap();
        let topology = config::topology().unwrap();
        let pool_count: usize = topology.regions.iter().map(|r| r.pools.len()).sum();
        assert_eq!(pools.len(), pool_count);
        assert!(
            v["platform"]["families"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f["trainerImage"] == ""
                    && f["weights"].as_str().unwrap().starts_with("/models/"))
        );
        assert_eq!(v["api"]["stripe"]["namespace"], ORDERS_NS);
        assert_eq!(
            v["api"]["tenants"][0]["tokenSha256"],
            loraplane_testkit::api_config::token_sha256(STOREFRONT_TOKEN)
        );
        assert_eq!(v["api"]["plans"]["standard"]["keepOutputsSeconds"], 60);
        assert!(v["s3"].get("trainerSecretName").is_none());
    }
}
