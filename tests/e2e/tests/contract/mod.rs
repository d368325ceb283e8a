//! The scenario behind the contract tests (`rbac_contract.rs`, `metrics_contract.rs`): kube-sim
//! with simulated GPU nodes (scripted kubelets: the trainer's behaviour, not its maths),
//! SeaweedFS, two operator replicas and the API in this process, each component with its own
//! `kube::Client` whose User-Agent names it in kube-sim's audit log. `run` drives the paths the
//! chart's RBAC and dashboards are about: a paid webhook order placed on spot, preempted,
//! resumed elsewhere and finished, then released and deleted by the operator's retention; a
//! service-API order whose node is lost, then cancelled and erased (and a second order on its
//! upload refused); an expired audit record swept; a dispute and a refund leaving tombstones;
//! the API's notifier telling a storefront stub about the paid job; leader election and
//! hand-over.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use kube_sim::apiserver::audit::AuditRecord;
use kube_sim::cluster::{KubeletConfig, Script, ScriptRule};
use kube_sim::{KubeSim, SimConfig};
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::platform::PlatformConfig;
use loraplane_testkit::api_config as api_fixtures;
use loraplane_testkit::{Cluster, Family, Platform, phase, stripe_events};
use serde_json::{Value, json};
use tokio::sync::watch;

/// The chart's release namespace: leases live here.
pub const RELEASE_NS: &str = "loraplane-system";
/// Where webhook orders land (the API's `stripeNamespace`).
pub const ORDERS_NS: &str = "orders";
/// A service-API tenant's namespace.
pub const TENANT_NS: &str = "acme";
pub const OPERATOR_AGENT: &str = "loraplane-operator";
pub const API_AGENT: &str = "loraplane-api";
const TRAINER_IMAGE: &str = "trainer:contract";
const WEBHOOK_SECRET: &[u8] = b"whsec_contract";
const STOREFRONT: &str = "storefront-token";
const ACME: &str = "acme-token";
const WAIT: Duration = Duration::from_secs(45);

/// Two EEA regions: `eu-west` with an on-demand and a spot L4 pool, `eu-north` with one.
fn cluster() -> Cluster {
    Cluster::three_regions(false).without_region("us-east")
}

/// One platform configuration for the operator and the API, as the chart's ConfigMap shares.
fn platform(s3: &str) -> PlatformConfig {
    let mut p = Platform::new(s3);
    p.s3_region = Some("us-east-1".into());
    p.families = Family::sdxl_and_sd15("/models", TRAINER_IMAGE);
    p.defaults =
        Some(json!({"schedulingTimeoutSeconds": 20, "backoffSeconds": 0, "checkpointEvery": 10}));
    p.dataset = Some(json!({"minImages": 2}));
    cluster().platform(&p).unwrap()
}

const NOTIFY_SECRET: &[u8] = b"whsec_contract_notifications";

fn api_config(storefront: &str) -> loraplane_api::config::ApiConfig {
    let plans = json!({
        "basic": {"retention": "standard", "keepInputsSeconds": 3600, "keepOutputsSeconds": 7200,
                  "maxSteps": 500},
        "fast": {"retention": "standard", "keepInputsSeconds": 1, "keepOutputsSeconds": 2,
                 "maxSteps": 100, "price": {"amount": 500, "currency": "eur"}},
    });
    let tenants = vec![
        api_fixtures::tenant("acme", TENANT_NS, ACME),
        api_fixtures::notified_tenant(
            "storefront",
            ORDERS_NS,
            STOREFRONT,
            storefront,
            "NOTIFY_SECRET_1",
        ),
    ];
    let yaml = api_fixtures::yaml(
        ORDERS_NS,
        plans,
        tenants,
        api_fixtures::loose_limits(8192, 900),
        json!({"notifications": {"retryBaseSeconds": 1, "retryMaxSeconds": 2}}),
    );
    loraplane_api::config::ApiConfig::from_yaml(&yaml).unwrap()
}

/// The chart values the scenario's RBAC is rendered with: the tenants and Stripe namespace of
/// [`api_config`], so the per-namespace Roles land where the scenario's jobs live (plus the
/// one value the chart cannot default, the S3 CIDRs of its NetworkPolicies).
pub fn chart_values() -> Value {
    let sha = api_fixtures::token_sha256;
    json!({
        "networkPolicy": {"s3Cidrs": ["203.0.113.0/24"], "stripeCidrs": ["198.51.100.0/24"],
                          "storefrontCidrs": ["192.0.2.0/24"]},
        "api": {
            "stripe": {"namespace": ORDERS_NS},
            "tenants": [
                {"name": "acme", "namespace": TENANT_NS, "tokenSha256": sha(ACME)},
                {"name": "storefront", "namespace": ORDERS_NS, "tokenSha256": sha(STOREFRONT),
                 "notifications": {"url": "https://shop.example.com/hooks",
                                   "secretRef": {"name": "storefront-hooks", "key": "secret"}}},
            ],
        },
    })
}

/// The trainer as the scripted kubelet plays it: a checkpoint at step 40 at once, then 20
/// progress lines over 4 s and a successful summary.
fn trainer_script() -> ScriptRule {
    ScriptRule {
        image: TRAINER_IMAGE.into(),
        script: Script {
            duration: Some(Duration::from_secs(4)),
            exit_code: 0,
            progress_steps: 20,
            log_lines: vec![
                loraplane_crds::trainer::TrainerEvent::Checkpoint {
                    step: 40,
                    uri: "s3://checkpoints-eu-west/orders/job/step-40".into(),
                }
                .to_line(),
            ],
            termination_message: None,
        },
    }
}

/// An operator replica in this process, serving `/metrics` on loopback.
struct Operator {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), loraplane_operator::controller::RunError>>,
    health: Arc<loraplane_operator::controller::Health>,
    metrics_url: String,
}

impl Operator {
    async fn start(
        client: Client,
        platform: PlatformConfig,
        storage: loraplane_runtime::storage::Storage,
        identity: &str,
    ) -> Operator {
        use loraplane_operator::controller::{self, Health};
        let settings =
            loraplane_operator::config::Settings::for_tests(platform, RELEASE_NS, identity);
        let metrics = loraplane_operator::metrics::Metrics::new().unwrap();
        let health = Arc::new(Health::default());
        let (stop, rx) = watch::channel(false);
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(loraplane_operator::server::serve(
            "127.0.0.1:0".parse().unwrap(),
            metrics.clone(),
            health.clone(),
            rx.clone(),
            Some(bound_tx),
        ));
        let addr = bound_rx.await.expect("the operator's metrics server binds");
        let task = tokio::spawn(controller::run(
            client,
            settings,
            storage,
            metrics,
            health.clone(),
            rx,
        ));
        Operator {
            stop,
            task,
            health,
            metrics_url: format!("http://{addr}/metrics"),
        }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        // Generous: graceful shutdown waits for in-flight reconciles, slow on a loaded machine.
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the operator stops within 60 s")
            .unwrap()
            .unwrap();
    }
}

/// What a scenario run leaves for the assertions.
pub struct Outcome {
    /// Every audited request, of every client.
    pub audit: Vec<AuditRecord>,
    /// `/metrics` of the operator replica that led, scraped over HTTP.
    pub operator_metrics: String,
    /// `/metrics` of the API, scraped over HTTP.
    pub api_metrics: String,
}

/// A plain HTTP/1.1 request (what a browser or Prometheus does), through the e2e crate's
/// client; the status and body.
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let resp = loraplane_e2e::http::request(method, url, headers, body)
        .await
        .unwrap();
    (resp.status, resp.body)
}

struct ApiClient {
    base: String,
}

impl ApiClient {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut headers = vec![("authorization", format!("Bearer {token}"))];
        // One Idempotency-Key per order.
        let key = body
            .as_ref()
            .and_then(|v| v["orderId"].as_str())
            .map_or_else(|| "contract".to_string(), |o| format!("contract-{o}"));
        let bytes = match body {
            Some(v) => {
                headers.push(("content-type", "application/json".into()));
                serde_json::to_vec(&v).unwrap()
            }
            None => Vec::new(),
        };
        if method == "POST" && (path == "/v1/jobs" || path == "/v1/orders") {
            headers.push(("idempotency-key", key));
        }
        let (status, body) = http(method, &format!("{}{path}", self.base), &headers, bytes).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn webhook(&self, event: &Value) -> Value {
        let body = serde_json::to_vec(event).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let sig = loraplane_api::stripe::header(WEBHOOK_SECRET, now, &body);
        let (status, reply) = http(
            "POST",
            &format!("{}/v1/webhooks/stripe", self.base),
            &[
                ("stripe-signature", sig),
                ("content-type", "application/json".into()),
            ],
            body,
        )
        .await;
        assert_eq!(
            status,
            200,
            "webhook refused: {}",
            String::from_utf8_lossy(&reply)
        );
        serde_json::from_slice(&reply).unwrap()
    }

    /// A presigned upload of a small valid dataset, validated; returns the upload id.
    async fn upload(&self, token: &str) -> String {
        let (status, ticket) = self
            .call(
                "POST",
                "/v1/uploads",
                token,
                Some(json!({"residency": "eea"})),
            )
            .await;
        assert_eq!(status, 201, "{ticket}");
        let zip = loraplane_dataset::testing::dataset(2);
        let (status, body) = http("PUT", ticket["url"].as_str().unwrap(), &[], zip).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let id = ticket["uploadId"].as_str().unwrap().to_string();
        let (status, report) = self
            .call("POST", &format!("/v1/uploads/{id}/validate"), token, None)
            .await;
        assert_eq!(status, 200, "{report}");
        id
    }
}

async fn wait_job(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&LoRATrainingJob) -> bool,
) -> LoRATrainingJob {
    loraplane_testkit::wait_job(client, ns, name, WAIT, what, pred).await
}

async fn wait_gone(client: &Client, ns: &str, name: &str) {
    loraplane_testkit::wait_gone(client, ns, name, WAIT).await
}

async fn wait_until(what: &str, check: impl AsyncFnMut() -> bool) {
    loraplane_testkit::wait_until(what, WAIT, check).await
}

/// Runs the whole scenario and returns the audit log and both `/metrics` texts.
pub async fn run() -> Outcome {
    let sim = KubeSim::start(
        SimConfig {
            topology: Some(cluster().topology().unwrap()),
            kubelet: KubeletConfig {
                scripts: vec![trainer_script()],
                shutdown_grace_period: Duration::from_millis(200),
                ..KubeletConfig::default()
            },
            crds: vec![],
        }
        .with_loraplane_crd(),
    )
    .await
    .unwrap();
    let stripe = stripe_sim::StripeSim::start().await.unwrap();
    let storefront = stripe_sim::storefront::Storefront::start(NOTIFY_SECRET)
        .await
        .unwrap();
    let s3 = seaweed::SeaweedFs::start()
        .await
        .expect("SeaweedFS starts (`weed` comes from `make bootstrap`)");
    for region in &platform(s3.endpoint()).regions {
        let b = &region.buckets;
        for bucket in [&b.datasets, &b.checkpoints, &b.outputs] {
            s3.create_bucket(bucket).await.unwrap();
        }
    }
    // Set-up as the cluster admin and Helm would do it; these calls are nobody's RBAC.
    let admin = sim.client();
    for ns in [RELEASE_NS, ORDERS_NS, TENANT_NS] {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &obj)
            .await
            .unwrap();
    }
    // An audit record from long ago, which the operator's sweep deletes at start.
    let expired: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "ltj-audit-expired", "labels": {"loraplane.io/record": "job-audit"}},
        "data": {"keepUntil": "2020-01-01T00:00:00Z", "reason": "retention"}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin.clone(), RELEASE_NS)
        .create(&PostParams::default(), &expired)
        .await
        .unwrap();
    sim.audit().enable();

    let platform = platform(s3.endpoint());
    let operator_client = sim.client_as(OPERATOR_AGENT).unwrap();
    let api_client = sim.client_as(API_AGENT).unwrap();

    // Two operator replicas: one leads, the other stands by.
    let storage = loraplane_runtime::storage::Storage::new(
        &platform,
        &loraplane_runtime::storage::S3Credentials {
            access_key: s3.access_key().into(),
            secret_key: s3.secret_key().into(),
        },
    );
    let op_a = Operator::start(
        operator_client.clone(),
        platform.clone(),
        storage.clone(),
        "op-a",
    )
    .await;
    wait_until("operator leader", async || {
        op_a.health.leading.load(Ordering::SeqCst)
    })
    .await;
    let op_b = Operator::start(
        operator_client.clone(),
        platform.clone(),
        storage.clone(),
        "op-b",
    )
    .await;
    wait_until("standby operator ready", async || {
        op_b.health.ready.load(Ordering::SeqCst)
    })
    .await;

    // The API as `loraplane-api` runs it: HTTP and the notifier (no lease).
    let config = api_config(&storefront.url());
    let app = Arc::new(loraplane_api::app::App {
        kube: api_client.clone(),
        storage: storage.clone(),
        validations: loraplane_api::app::App::validation_permits(&config),
        config,
        platform: platform.clone(),
        secrets: loraplane_api::app::Secrets {
            webhook: vec![WEBHOOK_SECRET.to_vec()],
            id_key: b"contract-id-key".to_vec(),
            notify: std::collections::BTreeMap::from([(
                "storefront".to_string(),
                NOTIFY_SECRET.to_vec(),
            )]),
        },
        metrics: loraplane_api::metrics::Metrics::new().unwrap(),
        stripe: loraplane_api::refunds::Stripe::new(
            &stripe.url(),
            stripe_sim::SECRET_KEY,
            std::time::Duration::from_secs(5),
        )
        .unwrap(),
    });
    let mut background = Vec::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = listener.local_addr().unwrap();
    let svc = loraplane_api::http::router(loraplane_api::http::HttpState::new(app.clone()))
        .into_make_service_with_connect_info::<SocketAddr>();
    background.push(tokio::spawn(async move {
        let _ = axum::serve(listener, svc).await;
    }));
    let notifier = loraplane_api::notifier::Notifier::new(app.clone(), "api-0").unwrap();
    background.push(tokio::spawn(Arc::new(notifier).run()));
    let api = ApiClient {
        base: format!("http://{api_addr}"),
    };

    // A paid checkout: the webhook creates job A; it lands on spot, is preempted, resumes
    // elsewhere from its checkpoint and succeeds.
    let upload = api.upload(STOREFRONT).await;
    let order = json!({"family": "sdxl", "conceptType": "character", "triggerWord": "zxq",
        "description": "my grey cat", "plan": "fast", "residency": "eea", "uploadId": upload});
    let (status, draft) = api
        .call("POST", "/v1/orders", STOREFRONT, Some(order))
        .await;
    assert_eq!(status, 201, "{draft}");
    let paid = stripe_events::paid_draft_at_its_price("cs_contract", "pi_contract", &draft);
    let ack = api.webhook(&paid).await;
    assert_eq!(ack["outcome"], "created", "{ack}");
    // Stripe delivers at least once: the redelivery finds the order's own upload claim.
    let ack = api.webhook(&paid).await;
    assert_eq!(ack["outcome"], "duplicate", "{ack}");
    let jobs = Api::<LoRATrainingJob>::namespaced(admin.clone(), ORDERS_NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(jobs.len(), 1);
    let a = jobs[0].name_any();
    let on_spot = wait_job(&admin, ORDERS_NS, &a, "Running with a checkpoint", |j| {
        phase(j) == Some("Running")
            && j.status
                .as_ref()
                .and_then(|s| s.progress.as_ref())
                .and_then(|p| p.last_checkpoint_step)
                == Some(40)
    })
    .await;
    let placement = on_spot.status.unwrap().placement.unwrap();
    assert_eq!(
        placement.pool, "eu-west-l4-spot",
        "the cheapest EEA pool is spot"
    );
    sim.cluster()
        .unwrap()
        .preempt_node(placement.node.as_deref().unwrap(), None)
        .await
        .unwrap();
    let done = wait_job(&admin, ORDERS_NS, &a, "success after a failover", |j| {
        phase(j) == Some("Succeeded")
    })
    .await;
    let st = done.status.unwrap();
    assert_eq!(
        st.attempts[0].reason.as_deref(),
        Some("Preempted"),
        "{:?}",
        st.attempts
    );
    // Retention: the plan keeps inputs 1 s and outputs 2 s after completion; the operator
    // deletes the inputs, then the job, purges what is left and writes the audit record (on a
    // loaded machine both can fall in one reconcile, so only the end is waited for).
    wait_gone(&admin, ORDERS_NS, &a).await;
    // The storefront was told, in order (the notifier let the job go only once it was).
    let told: Vec<String> = storefront
        .events()
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        told.first().map(String::as_str),
        Some("job.accepted"),
        "{told:?}"
    );
    assert_eq!(
        told.last().map(String::as_str),
        Some("job.succeeded"),
        "{told:?}"
    );
    assert!(
        storefront.refused().is_empty(),
        "{:?}",
        storefront.refused()
    );

    // A service-API order: created, running, cancelled, then erased on request.
    let upload = api.upload(ACME).await;
    let order = json!({"orderId": "contract-b", "family": "sdxl", "conceptType": "object",
        "triggerWord": "mug", "plan": "basic", "uploadId": upload});
    let (status, job) = api.call("POST", "/v1/jobs", ACME, Some(order)).await;
    assert_eq!(status, 201, "{job}");
    let b = job["id"].as_str().unwrap().to_string();
    // Another order on the same upload finds it consumed (the claim is read to tell).
    let again = json!({"orderId": "contract-b2", "family": "sdxl", "conceptType": "object",
        "triggerWord": "mug", "plan": "basic", "uploadId": upload});
    let (status, body) = api.call("POST", "/v1/jobs", ACME, Some(again)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "upload_consumed", "{body}");
    let running = wait_job(&admin, TENANT_NS, &b, "Running", |j| {
        phase(j) == Some("Running")
    })
    .await;
    // Its node is lost: the operator, not finding the node in its cache, asks the apiserver,
    // then restarts the job elsewhere.
    let node = running.status.unwrap().placement.unwrap().node.unwrap();
    sim.cluster().unwrap().lose_node(&node).await.unwrap();
    wait_job(
        &admin,
        TENANT_NS,
        &b,
        "a restart after the node loss",
        |j| phase(j) == Some("Running") && j.status.as_ref().is_some_and(|s| s.attempts.len() >= 2),
    )
    .await;
    let (status, body) = api.call("GET", "/v1/jobs", ACME, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.call("GET", &format!("/v1/jobs/{b}"), ACME, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api
        .call("POST", &format!("/v1/jobs/{b}/cancel"), ACME, None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api
        .call("DELETE", &format!("/v1/jobs/{b}"), ACME, None)
        .await;
    assert_eq!(status, 202, "{body}");
    wait_gone(&admin, TENANT_NS, &b).await;
    let records =
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin.clone(), RELEASE_NS)
            .list(&ListParams::default().labels("loraplane.io/record=job-audit"))
            .await
            .unwrap()
            .items;
    let reasons: BTreeSet<String> = records
        .iter()
        .filter_map(|r| r.data.as_ref()?.get("reason").cloned())
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["retention".to_string(), "customerRequest".to_string()]),
        "one record per deleted job, the expired one swept: {records:?}"
    );

    // A dispute of job A, whose retention already deleted it, and a refund of an unknown
    // payment: tombstones only.
    let ack = api
        .webhook(
            &json!({"id": "evt_dispute", "type": "charge.dispute.created",
            "data": {"object": {"id": "dp_1", "object": "dispute", "charge": "ch_1",
                                "payment_intent": "pi_contract"}}}),
        )
        .await;
    assert_eq!(ack["outcome"], "tombstoned", "{ack}");
    let ack = api
        .webhook(&json!({"id": "evt_refund", "type": "charge.refunded",
            "data": {"object": {"id": "ch_2", "object": "charge", "refunded": true,
                                "payment_intent": "pi_unknown"}}}))
        .await;
    assert_eq!(ack["outcome"], "tombstoned", "{ack}");

    // What Prometheus would scrape, while both are still up.
    let (status, operator_metrics) = http("GET", &op_a.metrics_url, &[], Vec::new()).await;
    assert_eq!(status, 200);
    let (status, api_metrics) =
        http("GET", &format!("{}/metrics", api.base), &[], Vec::new()).await;
    assert_eq!(status, 200);

    // Hand-over: the leader releases its Lease on shutdown and the standby takes it.
    op_a.stop().await;
    wait_until("standby takes over", async || {
        op_b.health.leading.load(Ordering::SeqCst)
    })
    .await;
    op_b.stop().await;
    for task in background {
        task.abort();
    }
    let audit = sim.audit().snapshot();
    sim.shutdown().await;
    Outcome {
        audit,
        operator_metrics: String::from_utf8(operator_metrics).unwrap(),
        api_metrics: String::from_utf8(api_metrics).unwrap(),
    }
}
