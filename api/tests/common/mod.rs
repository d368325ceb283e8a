//! Test harness: a real kube-sim apiserver, a real SeaweedFS and the API served over loopback
//! HTTP, plus a plain HTTP/1.1 client (hyper, no S3 or Kubernetes library) for presigned URLs.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)] // each test binary uses part of it

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use loraplane_api::app::{App, Secrets};
use loraplane_api::config::ApiConfig;
use loraplane_api::metrics::Metrics;
use loraplane_crds::platform::PlatformConfig;
use loraplane_dataset::DatasetRules;
use loraplane_runtime::storage::{S3Credentials, Storage};
use loraplane_testkit::api_config as api_fixtures;
pub use loraplane_testkit::stripe_events::{
    dispute_created, now, paid_draft, paid_draft_at_its_price, refunded,
};
use loraplane_testkit::{Cluster, Family, Platform, Region};
use serde_json::Value;

pub const WEBHOOK_SECRET: &[u8] = b"whsec_test_secret";
/// The secret the storefront tenant's notifications are signed with (when configured).
pub const NOTIFY_SECRET: &[u8] = b"whsec_storefront_notifications";
pub const ACME: &str = "acme-token";
pub const GLOBEX: &str = "globex-token";
pub const STOREFRONT: &str = "storefront-token";

pub struct Harness {
    pub sim: kube_sim::KubeSim,
    pub s3: seaweed::SeaweedFs,
    pub stripe: stripe_sim::StripeSim,
    pub app: Arc<App>,
    pub base: String,
}

pub fn api_config() -> ApiConfig {
    let plans = serde_json::json!({
        "basic": {"retention": "standard", "keepInputsSeconds": 3600, "keepOutputsSeconds": 7200,
                  "maxSteps": 500, "price": {"amount": 1900, "currency": "eur"}},
        "fast": {"retention": "standard", "keepInputsSeconds": 1, "keepOutputsSeconds": 2, "maxSteps": 100},
        "zero": {"retention": "zeroRetention", "keepOutputsSeconds": 2, "maxSteps": 100,
                 "allowedRegions": ["eu-west"]},
    });
    let tenants = vec![
        api_fixtures::tenant("acme", "acme", ACME),
        api_fixtures::tenant("globex", "globex", GLOBEX),
        api_fixtures::tenant("storefront", "orders", STOREFRONT),
    ];
    let limits = api_fixtures::loose_limits(8192, 900);
    ApiConfig::from_yaml(&api_fixtures::yaml(
        "orders",
        plans,
        tenants,
        limits,
        Value::Null,
    ))
    .unwrap()
}

/// Two regions with short bucket names (`ds-eu`, `out-us`, …), no pools, the SD families (the
/// API sells only families the platform trains), small dataset limits.
pub fn platform(endpoint: &str) -> PlatformConfig {
    let mut p = Platform::new(endpoint);
    p.s3_region = Some("us-east-1".into());
    p.buckets = short_bucket;
    p.pools = false;
    p.families = Family::sdxl_and_sd15("/models", "trainer:t");
    p.dataset = Some(serde_json::json!({
        "maxZipBytes": 200000, "maxTotalBytes": 2000000, "minImages": 2, "maxImages": 10,
    }));
    let cluster = Cluster {
        regions: vec![
            Region::new("eu-west", "eea", vec![]),
            Region::new("us-east", "us", vec![]),
        ],
    };
    cluster.platform(&p).unwrap()
}

/// `ds-eu` for the datasets of `eu-west`, `out-us` for the outputs of `us-east`.
fn short_bucket(kind: &str, region: &str) -> String {
    let kind = match kind {
        "datasets" => "ds",
        "checkpoints" => "ck",
        _ => "out",
    };
    let region = region.split('-').next().unwrap_or(region);
    format!("{kind}-{region}")
}

fn new_app(
    sim: &kube_sim::KubeSim,
    s3: &seaweed::SeaweedFs,
    stripe: &stripe_sim::StripeSim,
    config: ApiConfig,
    rules: Option<DatasetRules>,
) -> Arc<App> {
    let mut platform = platform(s3.endpoint());
    if let Some(rules) = rules {
        platform.dataset = rules;
    }
    let storage = Storage::new(
        &platform,
        &S3Credentials {
            access_key: s3.access_key().into(),
            secret_key: s3.secret_key().into(),
        },
    );
    let validations = App::validation_permits(&config);
    let notify = config
        .tenants
        .iter()
        .filter(|t| t.notifications.is_some())
        .map(|t| (t.name.clone(), NOTIFY_SECRET.to_vec()))
        .collect();
    let stripe = loraplane_api::refunds::Stripe::new(
        &stripe.url(),
        stripe_sim::SECRET_KEY,
        std::time::Duration::from_secs(config.stripe_api.timeout_seconds),
    )
    .unwrap();
    Arc::new(App {
        kube: kube_sim::client_for(&sim.url()).unwrap(),
        storage,
        config,
        platform,
        secrets: Secrets {
            webhook: vec![WEBHOOK_SECRET.to_vec()],
            id_key: b"test-id-key".to_vec(),
            notify,
        },
        metrics: Metrics::new().unwrap(),
        validations,
        stripe,
    })
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ApiConfig)) -> Harness {
        loraplane_api::install_crypto_provider();
        let sim = kube_sim::KubeSim::start(kube_sim::SimConfig::default().with_loraplane_crd())
            .await
            .unwrap();
        let s3 = seaweed::SeaweedFs::start().await.unwrap();
        for b in ["ds-eu", "ck-eu", "out-eu", "ds-us", "ck-us", "out-us"] {
            s3.create_bucket(b).await.unwrap();
        }
        let nss: Api<Namespace> = Api::all(sim.client());
        for ns in ["orders", "acme", "globex", "loraplane-system"] {
            let obj: Namespace =
                serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
            nss.create(&PostParams::default(), &obj).await.unwrap();
        }
        let mut config = api_config();
        tweak(&mut config);
        let stripe = stripe_sim::StripeSim::start().await.unwrap();
        let app = new_app(&sim, &s3, &stripe, config, None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(loraplane_api::http::serve(
            listener,
            app.clone(),
            std::future::pending(),
        ));
        Harness {
            sim,
            s3,
            stripe,
            app,
            base: format!("http://{addr}"),
        }
    }

    /// Another replica of the API (same cluster, storage, configuration and secrets, its own
    /// clients and metrics), not serving HTTP.
    pub fn replica(&self) -> Arc<App> {
        new_app(
            &self.sim,
            &self.s3,
            &self.stripe,
            self.app.config.clone(),
            None,
        )
    }

    /// Starts the notifier of a fresh replica (as a restarted API would); abort the handle to
    /// stop it.
    pub fn notifier(&self, holder: &str) -> tokio::task::JoinHandle<()> {
        let n = loraplane_api::notifier::Notifier::new(self.replica(), holder).unwrap();
        tokio::spawn(Arc::new(n).run())
    }

    /// [`Harness::replica`] with other dataset rules in its platform configuration.
    pub fn replica_with_rules(&self, rules: DatasetRules) -> Arc<App> {
        new_app(
            &self.sim,
            &self.s3,
            &self.stripe,
            self.app.config.clone(),
            Some(rules),
        )
    }

    /// An API call with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        extra: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut headers: Vec<(String, String)> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(t) = token {
            headers.push(("authorization".into(), format!("Bearer {t}")));
        }
        let bytes = match body {
            Some(v) => {
                headers.push(("content-type".into(), "application/json".into()));
                serde_json::to_vec(&v).unwrap()
            }
            None => Vec::new(),
        };
        let (status, h, body) =
            http(method, &format!("{}{path}", self.base), &headers, bytes).await;
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, h, json)
    }

    /// Posts a signed webhook event.
    pub async fn webhook(&self, event: &Value, t: i64, secret: &[u8]) -> (StatusCode, Value) {
        let body = serde_json::to_vec(event).unwrap();
        let sig = loraplane_api::stripe::header(secret, t, &body);
        let (s, _, b) = http(
            "POST",
            &format!("{}/v1/webhooks/stripe", self.base),
            &[
                ("stripe-signature".into(), sig),
                ("content-type".into(), "application/json".into()),
            ],
            body,
        )
        .await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    /// Creates an upload slot and PUTs `zip` to it with a plain HTTP client.
    pub async fn upload(&self, token: &str, residency: &str, zip: Vec<u8>) -> String {
        let (status, _, ticket) = self
            .call(
                "POST",
                "/v1/uploads",
                Some(token),
                &[],
                Some(serde_json::json!({"residency": residency})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{ticket}");
        let url = ticket["url"].as_str().unwrap();
        let (s, _, body) = http("PUT", url, &[], zip).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        ticket["uploadId"].as_str().unwrap().to_string()
    }

    /// Records a draft order of `plan` on `upload` as the storefront does before checkout (the
    /// session id as the cart's Idempotency-Key) and returns the paid checkout completing it at
    /// the quoted price.
    pub async fn paid_draft(
        &self,
        session: &str,
        payment: &str,
        upload: &str,
        plan: &str,
    ) -> Value {
        let order = serde_json::json!({"family": "sdxl", "conceptType": "character",
            "triggerWord": "zxq", "description": "my grey cat", "plan": plan, "residency": "eea",
            "uploadId": upload, "trainingConsent": true});
        let (s, _, t) = self
            .call(
                "POST",
                "/v1/orders",
                Some(STOREFRONT),
                &[("idempotency-key", session)],
                Some(order),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{t}");
        paid_draft_at_its_price(session, payment, &t)
    }

    /// Every object key in a bucket.
    pub async fn keys(&self, bucket: &str) -> Vec<String> {
        let out = self
            .s3
            .client()
            .list_objects_v2()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect()
    }

    pub async fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        self.s3
            .client()
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(bytes.to_vec().into())
            .send()
            .await
            .unwrap();
    }
}

/// A plain HTTP/1.1 request on a fresh connection (no signing, no S3 or Kubernetes library).
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    http_from(None, method, url, headers, body).await
}

/// [`http`] from a chosen local address (any of 127.0.0.0/8 works on Linux), to look like
/// another client to per-address rate limits.
pub async fn http_from(
    source: Option<std::net::Ipv4Addr>,
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let headers: Vec<(&str, String)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let resp = loraplane_testkit::http::request_from(source, method, url, &headers, body)
        .await
        .unwrap();
    let mut map = HeaderMap::new();
    for (k, v) in &resp.headers {
        map.append(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    (StatusCode::from_u16(resp.status).unwrap(), map, resp.body)
}

/// Runs a test body with a timeout so a hang fails instead of blocking CI.
pub async fn within<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(std::time::Duration::from_secs(secs), f)
        .await
        .expect("test timed out");
}
