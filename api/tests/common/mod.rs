//! Test harness: a real kube-sim apiserver, a real SeaweedFS and the API served over loopback
//! HTTP, plus a plain HTTP/1.1 client (hyper, no S3 or Kubernetes library) for presigned URLs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use loraplane_api::app::{App, Secrets};
use loraplane_api::config::ApiConfig;
use loraplane_api::metrics::Metrics;
use loraplane_crds::platform::PlatformConfig;
use loraplane_dataset::DatasetRules;
use loraplane_runtime::storage::{S3Credentials, Storage};
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

fn sha(s: &str) -> String {
    loraplane_api::app::sha256_hex(s.as_bytes())
}

pub fn api_config() -> ApiConfig {
    ApiConfig::from_yaml(&format!(
        r#"
stripeNamespace: orders
plans:
  basic: {{retention: standard, keepInputsSeconds: 3600, keepOutputsSeconds: 7200, maxSteps: 500, price: {{amount: 1900, currency: eur}}}}
  fast: {{retention: standard, keepInputsSeconds: 1, keepOutputsSeconds: 2, maxSteps: 100}}
  zero: {{retention: zeroRetention, keepOutputsSeconds: 2, maxSteps: 100, allowedRegions: [eu-west]}}
tenants:
  - {{name: acme, namespace: acme, tokenSha256: "{}"}}
  - {{name: globex, namespace: globex, tokenSha256: "{}"}}
  - {{name: storefront, namespace: orders, tokenSha256: "{}"}}
limits:
  webhookMaxBytes: 8192
  jsonMaxBytes: 8192
  presignSeconds: 900
  tenantRps: 1000
  ipRps: 1000
"#,
        sha(ACME),
        sha(GLOBEX),
        sha(STOREFRONT)
    ))
    .unwrap()
}

pub fn platform(endpoint: &str) -> PlatformConfig {
    PlatformConfig::from_yaml(&format!(
        r#"
regions:
  - name: eu-west
    jurisdiction: eea
    s3: {{endpoint: "{endpoint}", region: us-east-1, forcePathStyle: true}}
    buckets: {{datasets: ds-eu, checkpoints: ck-eu, outputs: out-eu}}
  - name: us-east
    jurisdiction: us
    s3: {{endpoint: "{endpoint}", region: us-east-1, forcePathStyle: true}}
    buckets: {{datasets: ds-us, checkpoints: ck-us, outputs: out-us}}
pools: []
families: []
dataset:
  maxZipBytes: 200000
  maxTotalBytes: 2000000
  minImages: 2
  maxImages: 10
"#
    ))
    .unwrap()
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
        paid_draft_event(
            session,
            payment,
            t["orderId"].as_str().unwrap(),
            t["price"]["amount"].as_i64().unwrap(),
            t["price"]["currency"].as_str().unwrap(),
        )
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

/// A plain HTTP/1.1 request with hyper (no signing, no S3 or Kubernetes library).
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
    let uri: hyper::Uri = url.parse().unwrap();
    let host = uri.host().unwrap().to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = match source {
        None => tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .unwrap(),
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((ip, 0))).unwrap();
            let addr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .unwrap()
                .find(SocketAddr::is_ipv4)
                .unwrap();
            socket.connect(addr).await.unwrap()
        }
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path)
        .header("host", format!("{host}:{port}"));
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A checkout.session.completed event.
/// A paid checkout of a draft order, as the storefront creates it: only the draft's id in the
/// metadata, and what Stripe charged.
pub fn paid_draft_event(
    session: &str,
    payment: &str,
    order_id: &str,
    amount: i64,
    currency: &str,
) -> Value {
    serde_json::json!({
        "id": format!("evt_{session}"),
        "type": "checkout.session.completed",
        "data": {"object": {
            "id": session,
            "object": "checkout.session",
            "payment_status": "paid",
            "payment_intent": payment,
            "amount_total": amount,
            "currency": currency,
            "metadata": {"order_id": order_id}
        }}
    })
}

pub fn refund_event(payment: &str) -> Value {
    serde_json::json!({
        "id": format!("evt_refund_{payment}"),
        "type": "charge.refunded",
        "data": {"object": {"id": "ch_1", "object": "charge", "refunded": true, "payment_intent": payment}}
    })
}

pub fn dispute_event(payment: &str) -> Value {
    serde_json::json!({
        "id": format!("evt_dispute_{payment}"),
        "type": "charge.dispute.created",
        "data": {"object": {"id": "dp_1", "object": "dispute", "charge": "ch_1", "payment_intent": payment}}
    })
}

/// Runs a test body with a timeout so a hang fails instead of blocking CI.
pub async fn within<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(std::time::Duration::from_secs(secs), f)
        .await
        .expect("test timed out");
}
