//! The running product as a customer and an auditor reach it, wherever it runs: the
//! Kubernetes API (through a `kube::Client` and a kubeconfig for `kubectl`), the API's base
//! URL with a tenant token and the Stripe endpoint secret, and S3 with read access to every
//! region's buckets. The local [`Stack`](crate::stack::Stack) hands its scenarios these
//! endpoints (it derefs to them); `loraplane-e2e-real` builds them from a real cluster's
//! kubeconfig and addresses, so the journey's steps run unchanged on both.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::v1alpha1::Phase;
use serde_json::{Value, json};

use crate::config::{self, ORDERS_NS};
use crate::http::{self, Response};
use crate::stack::StackError;

/// A draft order as the API answered it: what the checkout session carries and charges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    /// `metadata.order_id` of the checkout session.
    pub order_id: String,
    /// `amount_total` to charge.
    pub amount: i64,
    /// `currency` to charge.
    pub currency: String,
}

/// The product's endpoints and the credentials a scenario uses on them.
pub struct Endpoints {
    client: kube::Client,
    kubeconfig: PathBuf,
    api_urls: Mutex<Vec<String>>,
    token: String,
    webhook_secret: String,
    s3: aws_sdk_s3::Client,
    patience: u32,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("kubeconfig", &self.kubeconfig)
            .field("api_urls", &self.api_urls)
            .finish_non_exhaustive()
    }
}

/// Maps a failed Kubernetes call to [`StackError::Kube`] naming the action.
pub(crate) fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> StackError {
    move |source| StackError::Kube { action, source }
}

fn refused(action: &'static str, r: &Response) -> StackError {
    StackError::ApiRefused {
        action,
        status: r.status,
        body: String::from_utf8_lossy(&r.body).chars().take(500).collect(),
    }
}

impl Endpoints {
    /// Endpoints with no API replica yet (see [`Endpoints::set_api_urls`]). `patience`
    /// multiplies every wait: 1 for the local stack, more where images are pulled and
    /// pods scheduled by a real cluster.
    pub fn new(
        client: kube::Client,
        kubeconfig: PathBuf,
        token: impl Into<String>,
        webhook_secret: impl Into<String>,
        s3: aws_sdk_s3::Client,
        patience: u32,
    ) -> Endpoints {
        Endpoints {
            client,
            kubeconfig,
            api_urls: Mutex::new(Vec::new()),
            token: token.into(),
            webhook_secret: webhook_secret.into(),
            s3,
            patience: patience.max(1),
        }
    }

    /// A `kube::Client` for the cluster.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The kubeconfig file for `kubectl`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Replaces the API base URLs (the first is used).
    pub fn set_api_urls(&self, urls: Vec<String>) {
        *self.api_urls.lock().unwrap_or_else(|p| p.into_inner()) = urls;
    }

    /// Base URL of a live API replica (the oldest).
    pub fn api_url(&self) -> Result<String, StackError> {
        self.api_urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first()
            .cloned()
            .ok_or(StackError::NoApi)
    }

    /// A wait stretched by the endpoints' patience.
    pub fn patient(&self, timeout: Duration) -> Duration {
        timeout * self.patience
    }

    // ---- customer side ----

    /// An API call as the storefront tenant.
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Response, StackError> {
        let mut headers = vec![("authorization", format!("Bearer {}", self.token))];
        let bytes = match body {
            Some(v) => {
                headers.push(("content-type", "application/json".into()));
                serde_json::to_vec(&v).map_err(|e| StackError::StartApi(e.to_string()))?
            }
            None => Vec::new(),
        };
        Ok(http::request(
            method,
            &format!("{}{path}", self.api_url()?),
            &headers,
            bytes,
        )
        .await?)
    }

    /// Uploads a dataset as the customer does: an upload slot from the API, then a plain PUT
    /// of the zip to the presigned URL. Returns the upload id.
    pub async fn upload_dataset(
        &self,
        residency: &str,
        zip: Vec<u8>,
    ) -> Result<String, StackError> {
        let ticket = self
            .api("POST", "/v1/uploads", Some(json!({"residency": residency})))
            .await?;
        if ticket.status != 201 {
            return Err(refused("create an upload slot", &ticket));
        }
        let t = ticket.json();
        let url = t["url"].as_str().unwrap_or_default().to_string();
        let put = http::request("PUT", &url, &[], zip).await?;
        if put.status != 200 {
            return Err(refused("PUT the dataset to the presigned URL", &put));
        }
        Ok(t["uploadId"].as_str().unwrap_or_default().to_string())
    }

    /// Validates an upload as the storefront does before checkout; returns the receipt.
    pub async fn validate_upload(&self, upload_id: &str) -> Result<String, StackError> {
        let resp = self
            .api("POST", &format!("/v1/uploads/{upload_id}/validate"), None)
            .await?;
        if resp.status != 200 {
            return Err(refused("validate the dataset", &resp));
        }
        // A check without a receipt would silently send the order down the marker path.
        match resp.json()["receipt"].as_str() {
            Some(r) if !r.is_empty() => Ok(r.to_string()),
            _ => Err(refused("get a receipt from the dataset check", &resp)),
        }
    }

    /// Records a draft order as the storefront does before checkout (`POST /v1/orders`, the
    /// cart's id as Idempotency-Key); returns the order id and the price to charge.
    pub async fn draft_order(&self, order: &Value, cart: &str) -> Result<Draft, StackError> {
        let body = serde_json::to_vec(order).map_err(|e| StackError::StartApi(e.to_string()))?;
        let resp = http::request(
            "POST",
            &format!("{}/v1/orders", self.api_url()?),
            &[
                ("authorization", format!("Bearer {}", self.token)),
                ("content-type", "application/json".into()),
                ("idempotency-key", cart.to_string()),
            ],
            body,
        )
        .await?;
        let v = resp.json();
        match (
            resp.status,
            v["orderId"].as_str(),
            v["price"]["amount"].as_i64(),
            v["price"]["currency"].as_str(),
        ) {
            (201, Some(id), Some(amount), Some(currency)) => Ok(Draft {
                order_id: id.to_string(),
                amount,
                currency: currency.to_string(),
            }),
            _ => Err(refused("record the draft order", &resp)),
        }
    }

    /// Posts a Stripe event signed with the endpoint secret; returns the webhook's outcome.
    pub async fn webhook(&self, event: &Value) -> Result<String, StackError> {
        let body = serde_json::to_vec(event).map_err(|e| StackError::StartApi(e.to_string()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let sig = loraplane_api::stripe::header(self.webhook_secret.as_bytes(), now, &body);
        let resp = http::request(
            "POST",
            &format!("{}/v1/webhooks/stripe", self.api_url()?),
            &[
                ("stripe-signature", sig),
                ("content-type", "application/json".into()),
            ],
            body,
        )
        .await?;
        if resp.status != 200 {
            return Err(refused("deliver the webhook", &resp));
        }
        Ok(resp.json()["outcome"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    // ---- auditor side ----

    /// The job, if it exists.
    pub async fn job(&self, name: &str) -> Result<Option<LoRATrainingJob>, StackError> {
        Api::<LoRATrainingJob>::namespaced(self.client(), ORDERS_NS)
            .get_opt(name)
            .await
            .map_err(kube_err("get job"))
    }

    /// Polls the job every 200 ms until `pred` holds; fails with its last status after
    /// `timeout`.
    pub async fn wait_job(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&LoRATrainingJob) -> bool,
    ) -> Result<LoRATrainingJob, StackError> {
        let timeout = self.patient(timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("no job");
        loop {
            let mut ended = false;
            if let Ok(Some(job)) = self.job(name).await {
                if pred(&job) {
                    return Ok(job);
                }
                last = serde_json::to_string(&job.status).unwrap_or_default();
                ended = job
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| matches!(p, Phase::Failed | Phase::Cancelled));
            }
            // A failed or cancelled job will not get anywhere: fail now, with its trainer's logs.
            if ended || tokio::time::Instant::now() > deadline {
                let logs = self.job_logs(name).await;
                return Err(StackError::Timeout {
                    what: format!("job {name}: {what}"),
                    secs: timeout.as_secs(),
                    last: format!("{last}\ntrainer logs:\n{logs}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of every trainer pod of a job (for failure messages).
    pub async fn job_logs(&self, job: &str) -> String {
        let api = Api::<Pod>::namespaced(self.client(), ORDERS_NS);
        let Ok(pods) = api
            .list(&ListParams::default().labels(&format!("loraplane.io/job={job}")))
            .await
        else {
            return String::new();
        };
        let mut out = String::new();
        for p in pods.items {
            let n = p.metadata.name.unwrap_or_default();
            let lp = kube::api::LogParams {
                tail_lines: Some(15),
                ..kube::api::LogParams::default()
            };
            let text = api.logs(&n, &lp).await.unwrap_or_else(|e| e.to_string());
            out.push_str(&format!("--- {n}\n{text}\n"));
        }
        out
    }

    /// Polls `probe` every 200 ms until it returns `Some`.
    pub async fn wait_for<T, F, Fut>(
        &self,
        timeout: Duration,
        what: &str,
        mut probe: F,
    ) -> Result<T, StackError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, StackError>>,
    {
        let timeout = self.patient(timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = match probe().await {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => "not yet".to_string(),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() > deadline {
                return Err(StackError::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Pods labelled with a job uid.
    pub async fn pods_of(&self, uid: &str) -> Result<Vec<Pod>, StackError> {
        Ok(Api::<Pod>::namespaced(self.client(), ORDERS_NS)
            .list(&ListParams::default().labels(&format!("loraplane.io/job-uid={uid}")))
            .await
            .map_err(kube_err("list pods"))?
            .items)
    }

    /// Claims labelled with a job uid.
    pub async fn claims_of(&self, uid: &str) -> Result<Vec<PersistentVolumeClaim>, StackError> {
        Ok(
            Api::<PersistentVolumeClaim>::namespaced(self.client(), ORDERS_NS)
                .list(&ListParams::default().labels(&format!("loraplane.io/job-uid={uid}")))
                .await
                .map_err(kube_err("list claims"))?
                .items,
        )
    }

    /// Events about a job (by name), oldest first: (reason, message).
    pub async fn events_of(&self, job: &str) -> Result<Vec<(String, String)>, StackError> {
        let list = Api::<Event>::namespaced(self.client(), ORDERS_NS)
            .list(&ListParams::default())
            .await
            .map_err(kube_err("list events"))?;
        Ok(list
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(job))
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect())
    }

    /// Every object key in a bucket.
    pub async fn keys(&self, bucket: &str) -> Result<Vec<String>, StackError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .s3
                .list_objects_v2()
                .bucket(bucket)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| StackError::S3 {
                    action: "list objects",
                    message: format!("{bucket}: {e:?}"),
                })?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
            token = out.next_continuation_token().map(str::to_string);
            if token.is_none() {
                return Ok(keys);
            }
        }
    }

    /// Every S3 object of a job, as `bucket/key`: its dataset upload and everything under
    /// `<namespace>/<job>-<uid>/` in every region's buckets.
    pub async fn job_objects(
        &self,
        name: &str,
        uid: &str,
        dataset_key: Option<&str>,
    ) -> Result<Vec<String>, StackError> {
        let prefix = format!("{ORDERS_NS}/{name}-{uid}/");
        let mut found = Vec::new();
        for b in config::all_buckets() {
            for k in self.keys(&b).await? {
                if k.starts_with(&prefix) || Some(k.as_str()) == dataset_key {
                    found.push(format!("{b}/{k}"));
                }
            }
        }
        Ok(found)
    }
}
