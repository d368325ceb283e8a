//! The API's behaviour behind the HTTP layer: turning orders into jobs (idempotently, with
//! refund tombstones), cancelling, erasing, and the retention pass. Kubernetes and S3 hold all
//! state, so any number of replicas can run this.
//!
//! Refund tombstones: a refund or dispute can reach us before the checkout completion it
//! revokes, when there is no job to cancel yet. It is recorded as a ConfigMap
//! `ltj-revoked-<hashed payment intent>` in the Stripe namespace: durable (it survives restarts
//! and is seen by every replica), non-personal (a keyed hash, no amounts or ids in clear), and
//! found with one list on their `loraplane.io/tombstone-of` label. Both sides write before they read (refund: tombstone, then look for
//! jobs; completion: job, then look for a tombstone), so whatever the interleaving one of them
//! sees the other and the refund wins. Erasure leaves a similar `ltj-erased-<hashed order>`
//! record, which is also the audit record and stops a replayed order from recreating the job.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Event, ObjectReference, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use loraplane_crds::platform::PlatformConfig;
use loraplane_crds::v1alpha1::{LoRATrainingJob, LoRATrainingJobSpec, Phase};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::config::ApiConfig;
use crate::metrics::Metrics;
use crate::order::{
    self, ANNOTATION_REQUEST, LABEL_IDEMPOTENCY, LABEL_ORDER, LABEL_PAYMENT, LABEL_PLAN,
    LABEL_SOURCE, LABEL_TOMBSTONE_OF, Order, OrderError, SpecInputs, UploadId,
};
use crate::receipt;
use crate::retention::{self, RetentionFacts};
use crate::storage::{Deleted, Marker, Storage, StorageError, parse_uri};
use crate::stripe::{RevokeReason, WebhookEvent};
use crate::zipcheck::{self, ZipError, ZipLimits};

/// The label the operator puts on a job's pods and claims.
pub const LABEL_JOB_UID: &str = "loraplane.io/job-uid";

/// Jobs the retention pass works on at once.
const GC_PARALLELISM: usize = 8;

/// Secrets the API holds in memory only.
#[derive(Clone)]
pub struct Secrets {
    /// Stripe endpoint secrets (several while rolling).
    pub webhook: Vec<Vec<u8>>,
    /// Key for hashing payment and order ids.
    pub id_key: Vec<u8>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").finish_non_exhaustive()
    }
}

/// Why an operation failed; the HTTP layer maps each to a status and code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The order is unusable.
    #[error(transparent)]
    Order(#[from] OrderError),
    /// The upload is unusable.
    #[error(transparent)]
    Upload(#[from] ZipError),
    /// The upload id names nothing.
    #[error("upload {0:?} does not exist or was not uploaded yet")]
    UploadNotFound(String),
    /// The upload id is malformed or in an unknown region.
    #[error("upload id {0:?} is not valid")]
    BadUploadId(String),
    /// No such job in the caller's namespace.
    #[error("job {0:?} not found")]
    JobNotFound(String),
    /// The Idempotency-Key was used with a different request.
    #[error("the Idempotency-Key was already used with a different request")]
    IdempotencyMismatch,
    /// The order already has a job created by another request.
    #[error("order already has job {0:?}")]
    OrderExists(String),
    /// The order was refunded, disputed or erased.
    #[error("the order was revoked ({0}) and cannot be (re)created")]
    Revoked(String),
    /// A Kubernetes call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// An S3 call failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl AppError {
    /// The error as it may be logged: apiserver messages can quote rejected field values
    /// (a trigger word, a description), so only their code and reason are kept.
    pub fn log_safe(&self) -> String {
        match self {
            AppError::Kube {
                action,
                source: kube::Error::Api(status),
            } => format!("{action}: HTTP {} {}", status.code, status.reason),
            other => other.to_string(),
        }
    }
}

fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> AppError {
    move |source| AppError::Kube { action, source }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Shared state of every handler and the retention loop.
pub struct App {
    /// Kubernetes client.
    pub kube: kube::Client,
    /// S3 per region.
    pub storage: Storage,
    /// API configuration.
    pub config: ApiConfig,
    /// Platform configuration.
    pub platform: PlatformConfig,
    /// Secrets.
    pub secrets: Secrets,
    /// Metrics.
    pub metrics: Metrics,
    /// Wakes the retention loop early (a job changed).
    pub gc_wake: Notify,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("stripe_namespace", &self.config.stripe_namespace)
            .finish_non_exhaustive()
    }
}

/// Where an order came from, and the ids that make it idempotent.
#[derive(Debug, Clone)]
pub struct OrderIds {
    /// `stripe` or `api`.
    pub source: &'static str,
    /// Keyed hash of the order (checkout session or tenant order id).
    pub order_hash: String,
    /// Keyed hash of the payment intent, when known.
    pub payment_hash: Option<String>,
    /// Keyed hashes of the Idempotency-Key and the request body.
    pub idempotency: Option<(String, String)>,
}

/// What the webhook did with an event (the metric's outcome label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A job was created.
    Created,
    /// The job already existed.
    Duplicate,
    /// The order had been revoked before it completed: no job.
    RevokedFirst,
    /// A job was cancelled and erased.
    Erased,
    /// A revocation recorded with no job (yet).
    Tombstoned,
    /// Acknowledged, nothing to do.
    Ignored,
    /// The order is unusable (bad metadata or dataset); acknowledged so Stripe stops retrying.
    Rejected,
}

impl Outcome {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Duplicate => "duplicate",
            Outcome::RevokedFirst => "revoked_first",
            Outcome::Erased => "erased",
            Outcome::Tombstoned => "tombstoned",
            Outcome::Ignored => "ignored",
            Outcome::Rejected => "rejected",
        }
    }
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

fn ts(secs: i64) -> Option<Time> {
    Timestamp::from_second(secs).ok().map(Time)
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn revoked_name(payment_hash: &str) -> String {
    format!("ltj-revoked-{payment_hash}")
}

fn erased_name(order_hash: &str) -> String {
    format!("ltj-erased-{order_hash}")
}

impl App {
    /// The dataset limits from the configuration.
    pub fn zip_limits(&self) -> ZipLimits {
        let l = &self.config.limits;
        ZipLimits {
            max_bytes: l.upload_max_bytes,
            max_uncompressed: l.upload_max_uncompressed_bytes,
            max_ratio: l.upload_max_ratio,
            min_images: l.min_images,
            max_images: l.max_images,
        }
    }

    fn jobs(&self, ns: &str) -> Api<LoRATrainingJob> {
        Api::namespaced(self.kube.clone(), ns)
    }

    fn configmaps(&self, ns: &str) -> Api<ConfigMap> {
        Api::namespaced(self.kube.clone(), ns)
    }

    /// Hashes an id with the API's key.
    pub fn hash(&self, kind: &str, id: &str) -> String {
        order::hash_id(&self.secrets.id_key, kind, id)
    }

    async fn write_tombstone(
        &self,
        ns: &str,
        name: &str,
        stands_for: &str,
        data: BTreeMap<String, String>,
    ) -> Result<(), AppError> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(ns.to_string()),
                labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "loraplane-api".to_string(),
                    ),
                    (LABEL_TOMBSTONE_OF.to_string(), stands_for.to_string()),
                ])),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        };
        match self
            .configmaps(ns)
            .create(&PostParams::default(), &cm)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(kube_err("create tombstone")(e)),
        }
    }

    /// Why an order may not have a job: its payment was refunded or disputed, or it was
    /// erased. One list by label finds both tombstones (this runs twice on every order, and
    /// a round trip saved here is saved on every webhook); the names are checked too, so a
    /// stray ConfigMap that merely carries the label does not revoke an order.
    async fn revoked(&self, ns: &str, ids: &OrderIds) -> Result<Option<String>, AppError> {
        let selector = match &ids.payment_hash {
            Some(p) => format!("{LABEL_TOMBSTONE_OF} in ({p},{})", ids.order_hash),
            None => format!("{LABEL_TOMBSTONE_OF}={}", ids.order_hash),
        };
        let found = self
            .configmaps(ns)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_err("list tombstones"))?;
        let names: Vec<String> = found.items.iter().map(|cm| cm.name_any()).collect();
        let has = |n: String| names.contains(&n);
        if ids
            .payment_hash
            .as_deref()
            .is_some_and(|p| has(revoked_name(p)))
        {
            return Ok(Some("refund or dispute".into()));
        }
        if has(erased_name(&ids.order_hash)) {
            return Ok(Some("erased".into()));
        }
        Ok(None)
    }

    /// The receipt for an upload that just passed, for the storefront to carry into the order.
    pub fn dataset_receipt(&self, ns: &str, upload_id: &str, sha256: &str) -> String {
        receipt::issue(
            &self.secrets.id_key,
            ns,
            upload_id,
            &self.zip_limits(),
            sha256,
            Timestamp::now().as_second(),
        )
    }

    /// Validates an upload and returns its SHA-256. A genuine receipt from an earlier check
    /// answers without a request; otherwise the marker on the object, or the bytes themselves.
    pub async fn validate_upload(
        &self,
        ns: &str,
        upload_id: &str,
        receipt: Option<&str>,
    ) -> Result<String, AppError> {
        let upload =
            UploadId::parse(upload_id).ok_or_else(|| AppError::BadUploadId(upload_id.into()))?;
        let limits = self.zip_limits();
        if let Some(sha) = receipt.and_then(|r| {
            receipt::verify(
                &self.secrets.id_key,
                r,
                ns,
                upload_id,
                &limits,
                Timestamp::now().as_second(),
            )
        }) {
            self.metrics
                .dataset_checks
                .with_label_values(&["receipt"])
                .inc();
            return Ok(sha.to_string());
        }
        let store = self
            .storage
            .region(&upload.region)
            .map_err(|_| AppError::BadUploadId(upload_id.into()))?;
        let bucket = store.buckets.datasets.clone();
        let key = upload.key(ns);
        // An upload is checked once: a passing check leaves a marker on the object, and S3
        // drops it if the object is replaced. The marker costs one small request instead of a
        // download and an inflate per order, on whichever replica the order lands.
        match self
            .storage
            .validation_marker(&upload.region, &bucket, &key)
            .await?
        {
            Marker::Missing => return Err(AppError::UploadNotFound(upload_id.into())),
            Marker::Marked(m) => {
                if let Some(sha) = limits.vouched_sha256(&m) {
                    self.metrics
                        .dataset_checks
                        .with_label_values(&["marker"])
                        .inc();
                    return Ok(sha.to_string());
                }
            }
            Marker::Unmarked => {}
        }
        let max = self.config.limits.upload_max_bytes;
        let bytes = match self
            .storage
            .fetch(&upload.region, &bucket, &key, max)
            .await?
        {
            None => return Err(AppError::UploadNotFound(upload_id.into())),
            Some(Err(size)) => return Err(ZipError::TooLarge { size, limit: max }.into()),
            Some(Ok(b)) => b,
        };
        self.metrics
            .dataset_checks
            .with_label_values(&["download"])
            .inc();
        // Inflating is CPU work; keep it off the async workers.
        let checked = tokio::task::spawn_blocking(move || {
            zipcheck::validate(&bytes, &limits).map(|_| sha256_hex(&bytes))
        })
        .await
        .map_err(|e| ZipError::Corrupt("archive".into(), e.to_string()))?;
        let sha = checked?;
        // Should the object be replaced between our read and this write, the marker names the
        // old bytes' hash, which the job spec pins and the trainer verifies before unpacking:
        // the replacement is refused at start, never trained on unchecked.
        if let Err(e) = self
            .storage
            .set_validation_marker(&upload.region, &bucket, &key, &limits.marker(&sha))
            .await
        {
            // Only an optimisation is lost: the next order checks the bytes again.
            tracing::warn!(error = %e, "could not record the dataset's validation");
        }
        Ok(sha)
    }

    /// Creates the job of an order, or returns the existing one (`false`).
    pub async fn create_job(
        &self,
        ns: &str,
        order: &Order,
        ids: &OrderIds,
    ) -> Result<(LoRATrainingJob, bool), AppError> {
        let name = order::job_name(&ids.order_hash);
        let api = self.jobs(ns);
        // The revocation lookup and the dataset check (a receipt, or a marker read) are
        // independent: run them together. No lookup of an existing job first: `create`
        // answers that (409), and a redelivery only costs the same lookup and check.
        let (revoked, spec) = tokio::join!(self.revoked(ns, ids), self.job_spec(ns, order));
        if let Some(why) = revoked? {
            return Err(AppError::Revoked(why));
        }
        let spec = match spec {
            Ok(spec) => spec,
            Err(e) => {
                // A redelivery of an order whose dataset retention already deleted (or whose
                // plan changed since) still has its job.
                if let Some(existing) = api.get_opt(&name).await.map_err(kube_err("get job"))? {
                    return Ok((existing, false));
                }
                return Err(e);
            }
        };
        let mut job = LoRATrainingJob::new(&name, spec);
        job.metadata.namespace = Some(ns.to_string());
        let mut labels = BTreeMap::from([
            (LABEL_ORDER.to_string(), ids.order_hash.clone()),
            (LABEL_SOURCE.to_string(), ids.source.to_string()),
            (LABEL_PLAN.to_string(), order.plan.clone()),
            (
                "app.kubernetes.io/managed-by".to_string(),
                "loraplane-api".to_string(),
            ),
        ]);
        if let Some(p) = &ids.payment_hash {
            labels.insert(LABEL_PAYMENT.to_string(), p.clone());
        }
        if let Some((key, body)) = &ids.idempotency {
            labels.insert(LABEL_IDEMPOTENCY.to_string(), key.clone());
            job.metadata.annotations = Some(BTreeMap::from([(
                ANNOTATION_REQUEST.to_string(),
                body.clone(),
            )]));
        }
        job.metadata.labels = Some(labels);
        match api.create(&PostParams::default(), &job).await {
            Ok(created) => {
                self.gc_wake.notify_one();
                Ok((created, true))
            }
            Err(e) if is_status(&e, 409) => {
                let existing = api.get(&name).await.map_err(kube_err("get job"))?;
                Ok((existing, false))
            }
            Err(e) => Err(kube_err("create job")(e)),
        }
    }

    /// The spec of an order: its plan's policy (cheap checks first) and its validated dataset.
    async fn job_spec(&self, ns: &str, order: &Order) -> Result<LoRATrainingJobSpec, AppError> {
        let plan = self
            .config
            .plans
            .get(&order.plan)
            .ok_or_else(|| OrderError::UnknownPlan(order.plan.clone()))?;
        let upload = UploadId::parse(&order.upload_id)
            .ok_or_else(|| AppError::BadUploadId(order.upload_id.clone()))?;
        let bucket = self
            .platform
            .region(&upload.region)
            .map(|r| r.buckets.datasets.clone())
            .ok_or_else(|| AppError::BadUploadId(order.upload_id.clone()))?;
        // Policy first (cheap), then the dataset (a marker read, or a download and inflate).
        let placeholder = "0".repeat(64);
        let mut spec = order::build_spec(
            order,
            &SpecInputs {
                plan,
                platform: &self.platform,
                upload: &upload,
                dataset_bucket: &bucket,
                namespace: ns,
                dataset_sha256: &placeholder,
            },
        )?;
        spec.dataset.sha256 = self
            .validate_upload(ns, &order.upload_id, order.dataset_receipt.as_deref())
            .await?;
        Ok(spec)
    }

    /// Finds the job an Idempotency-Key created in a namespace.
    pub async fn job_by_idempotency_key(
        &self,
        ns: &str,
        key_hash: &str,
    ) -> Result<Option<LoRATrainingJob>, AppError> {
        let list = self
            .jobs(ns)
            .list(&ListParams::default().labels(&format!("{LABEL_IDEMPOTENCY}={key_hash}")))
            .await
            .map_err(kube_err("list jobs"))?;
        Ok(list.items.into_iter().next())
    }

    /// Handles one verified webhook event.
    pub async fn handle_event(&self, event: WebhookEvent) -> Result<Outcome, AppError> {
        let ns = self.config.stripe_namespace.clone();
        match event {
            WebhookEvent::Paid {
                session_id,
                payment_intent,
                metadata,
            } => {
                let ids = OrderIds {
                    source: "stripe",
                    order_hash: self.hash("session", &session_id),
                    payment_hash: payment_intent.as_deref().map(|p| self.hash("payment", p)),
                    idempotency: None,
                };
                let order = match Order::from_metadata(&metadata) {
                    Ok(o) => o,
                    Err(_) => return Ok(Outcome::Rejected),
                };
                let (job, created) = match self.create_job(&ns, &order, &ids).await {
                    Ok(r) => r,
                    Err(AppError::Revoked(_)) => {
                        // The refund came first; the upload is the order's only data.
                        self.delete_upload(&ns, &order.upload_id).await?;
                        return Ok(Outcome::RevokedFirst);
                    }
                    Err(
                        AppError::Order(_)
                        | AppError::Upload(_)
                        | AppError::UploadNotFound(_)
                        | AppError::BadUploadId(_),
                    ) => return Ok(Outcome::Rejected),
                    Err(e) => return Err(e),
                };
                // Write-then-read: a refund that raced past our tombstone check is seen here.
                if created && self.revoked(&ns, &ids).await?.is_some() {
                    self.erase(&ns, &job.name_any(), "refund").await?;
                    return Ok(Outcome::RevokedFirst);
                }
                Ok(if created {
                    Outcome::Created
                } else {
                    Outcome::Duplicate
                })
            }
            WebhookEvent::Revoked {
                reason,
                payment_intent,
            } => {
                let hash = self.hash("payment", &payment_intent);
                self.write_tombstone(
                    &ns,
                    &revoked_name(&hash),
                    &hash,
                    BTreeMap::from([
                        ("reason".to_string(), reason.as_str().to_string()),
                        ("recordedAt".to_string(), Timestamp::now().to_string()),
                    ]),
                )
                .await?;
                let jobs = self
                    .jobs(&ns)
                    .list(&ListParams::default().labels(&format!("{LABEL_PAYMENT}={hash}")))
                    .await
                    .map_err(kube_err("list jobs"))?;
                if jobs.items.is_empty() {
                    return Ok(Outcome::Tombstoned);
                }
                for job in jobs.items {
                    self.erase(&ns, &job.name_any(), reason_str(reason)).await?;
                }
                Ok(Outcome::Erased)
            }
            WebhookEvent::AwaitingPayment | WebhookEvent::PartialRefund | WebhookEvent::Ignored => {
                Ok(Outcome::Ignored)
            }
        }
    }

    async fn delete_upload(&self, ns: &str, upload_id: &str) -> Result<(), AppError> {
        let Some(upload) = UploadId::parse(upload_id) else {
            return Ok(());
        };
        let Some(region) = self.platform.region(&upload.region) else {
            return Ok(());
        };
        let d = self
            .storage
            .delete_prefix(&region.buckets.datasets, &upload.key(ns))
            .await?;
        self.metrics.bytes_erased.inc_by(d.bytes);
        Ok(())
    }

    /// Gets a job in a namespace.
    pub async fn get_job(&self, ns: &str, name: &str) -> Result<LoRATrainingJob, AppError> {
        self.jobs(ns)
            .get_opt(name)
            .await
            .map_err(kube_err("get job"))?
            .ok_or_else(|| AppError::JobNotFound(name.into()))
    }

    /// Lists a namespace's jobs, a page at a time.
    pub async fn list_jobs(
        &self,
        ns: &str,
        limit: u32,
        continue_token: Option<String>,
    ) -> Result<(Vec<LoRATrainingJob>, Option<String>), AppError> {
        let mut lp = ListParams::default().limit(limit);
        if let Some(c) = continue_token {
            lp = lp.continue_token(&c);
        }
        let list = self
            .jobs(ns)
            .list(&lp)
            .await
            .map_err(kube_err("list jobs"))?;
        let next = list.metadata.continue_.filter(|c| !c.is_empty());
        Ok((list.items, next))
    }

    /// Cancels a job: suspends it (the operator removes its pod) and marks it Cancelled.
    pub async fn cancel(
        &self,
        ns: &str,
        name: &str,
        reason: &str,
    ) -> Result<LoRATrainingJob, AppError> {
        let job = self.get_job(ns, name).await?;
        let phase = job.status.as_ref().and_then(|s| s.phase);
        if phase.is_some_and(Phase::is_terminal) {
            return Ok(job);
        }
        let api = self.jobs(ns);
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .map_err(kube_err("suspend job"))?;
        let now = now_time();
        let cond = Condition {
            type_: "Cancelled".into(),
            status: "True".into(),
            reason: "Cancelled".into(),
            message: format!("cancelled by the API ({reason})"),
            last_transition_time: now.clone(),
            observed_generation: job.metadata.generation,
        };
        let patched = api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "phase": Phase::Cancelled,
                    "completionTime": now,
                    "conditions": [cond],
                }})),
            )
            .await
            .map_err(kube_err("patch status"))?;
        self.gc_wake.notify_one();
        Ok(patched)
    }

    async fn delete_inputs(&self, job: &LoRATrainingJob) -> Result<Deleted, AppError> {
        let mut d = Deleted::default();
        if let Ok((bucket, key)) = parse_uri(&job.spec.dataset.uri) {
            d += self.storage.delete_prefix(bucket, key).await?;
        }
        let prefix = job_prefix(job);
        for (_, r) in self.storage.all() {
            d += self
                .storage
                .delete_prefix(&r.buckets.checkpoints, &prefix)
                .await?;
        }
        let ns = job.namespace().unwrap_or_default();
        if let Some(uid) = job.uid() {
            let lp = ListParams::default().labels(&format!("{LABEL_JOB_UID}={uid}"));
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.kube.clone(), &ns);
            for pvc in pvcs.list(&lp).await.map_err(kube_err("list claims"))?.items {
                match pvcs.delete(&pvc.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => return Err(kube_err("delete claim")(e)),
                }
            }
        }
        Ok(d)
    }

    async fn delete_outputs(&self, job: &LoRATrainingJob) -> Result<Deleted, AppError> {
        let mut d = Deleted::default();
        let prefix = job_prefix(job);
        for (_, r) in self.storage.all() {
            d += self
                .storage
                .delete_prefix(&r.buckets.outputs, &prefix)
                .await?;
        }
        Ok(d)
    }

    async fn audit(&self, job: &LoRATrainingJob, reason: &str, message: String) {
        let ns = job.namespace().unwrap_or_default();
        let now = now_time();
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", job.name_any())),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some(LoRATrainingJob::api_version(&()).into_owned()),
                kind: Some(LoRATrainingJob::kind(&()).into_owned()),
                name: Some(job.name_any()),
                namespace: Some(ns.clone()),
                uid: job.uid(),
                ..ObjectReference::default()
            },
            reason: Some(reason.into()),
            message: Some(message),
            type_: Some("Normal".into()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            reporting_component: Some("loraplane-api".into()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some("loraplane-api".into()),
                host: None,
            }),
            ..Event::default()
        };
        let events: Api<Event> = Api::namespaced(self.kube.clone(), &ns);
        if let Err(e) = events.create(&PostParams::default(), &ev).await {
            tracing::warn!(job = %job.name_any(), error = %e, "could not record audit event");
        }
    }

    /// Erases every byte of a job (S3 objects, claims, pods, then the job itself), leaving
    /// only the audit record: an Event, a log line and the `ltj-erased-…` ConfigMap.
    pub async fn erase(&self, ns: &str, name: &str, reason: &str) -> Result<bool, AppError> {
        let Some(job) = self
            .jobs(ns)
            .get_opt(name)
            .await
            .map_err(kube_err("get job"))?
        else {
            return Ok(false);
        };
        let order_hash = job
            .labels()
            .get(LABEL_ORDER)
            .cloned()
            .unwrap_or_else(|| name.to_string());
        let uid = job.uid().unwrap_or_default();
        let erased_at = Timestamp::now();
        self.write_tombstone(
            ns,
            &erased_name(&order_hash),
            &order_hash,
            BTreeMap::from([
                ("job".to_string(), name.to_string()),
                ("uid".to_string(), uid.clone()),
                ("reason".to_string(), reason.to_string()),
                ("erasedAt".to_string(), erased_at.to_string()),
            ]),
        )
        .await?;
        // Stop the trainer first so it cannot write new checkpoints after the sweep.
        if !uid.is_empty() {
            let pods: Api<Pod> = Api::namespaced(self.kube.clone(), ns);
            let lp = ListParams::default().labels(&format!("{LABEL_JOB_UID}={uid}"));
            for pod in pods.list(&lp).await.map_err(kube_err("list pods"))?.items {
                match pods.delete(&pod.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => return Err(kube_err("delete pod")(e)),
                }
            }
        }
        let mut d = self.delete_inputs(&job).await?;
        d += self.delete_outputs(&job).await?;
        let stamp = Time(erased_at);
        let _ = self
            .jobs(ns)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"retention": {
                    "erasedAt": stamp, "inputsDeletedAt": stamp, "outputsDeletedAt": stamp
                }}})),
            )
            .await;
        self.audit(
            &job,
            "Erased",
            format!(
                "all job data erased ({reason}): {} objects, {} bytes",
                d.objects, d.bytes
            ),
        )
        .await;
        match self.jobs(ns).delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(kube_err("delete job")(e)),
        }
        self.metrics
            .retention_deletions
            .with_label_values(&["erasure"])
            .inc();
        self.metrics.bytes_erased.inc_by(d.bytes);
        tracing::info!(
            audit = "erased",
            namespace = ns,
            job = name,
            uid = %uid,
            reason,
            objects = d.objects,
            bytes = d.bytes,
            "job data erased"
        );
        Ok(true)
    }

    /// One retention pass over every job; returns the next due time (Unix seconds).
    pub async fn retention_pass(&self) -> Result<Option<i64>, AppError> {
        let api: Api<LoRATrainingJob> = Api::all(self.kube.clone());
        let jobs = api
            .list(&ListParams::default())
            .await
            .map_err(kube_err("list jobs"))?;
        // Jobs that fall due together (a batch finishing at once) are deleted a few at a time,
        // so the last one's lag is not the sum of everyone's S3 round trips.
        use futures::StreamExt;
        let mut results = futures::stream::iter(jobs.items)
            .map(|job| async move {
                let r = self.retain_one(&job).await;
                (job, r)
            })
            .buffer_unordered(GC_PARALLELISM);
        let mut next: Option<i64> = None;
        while let Some((job, r)) = results.next().await {
            match r {
                Ok(Some(t)) => next = Some(next.map_or(t, |n| n.min(t))),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(job = %job.name_any(), error = %e.log_safe(), "retention failed; retrying soon");
                    let soon = Timestamp::now().as_second() + 5;
                    next = Some(next.map_or(soon, |n| n.min(soon)));
                }
            }
        }
        Ok(next)
    }

    async fn retain_one(&self, job: &LoRATrainingJob) -> Result<Option<i64>, AppError> {
        let facts = RetentionFacts::of(job);
        let now = Timestamp::now().as_second();
        let d = retention::decide(&facts, now);
        let Some(in_at) = d.inputs_expire_at else {
            return Ok(None);
        };
        let out_at = d.outputs_expire_at.unwrap_or(in_at);
        let ret = job
            .status
            .as_ref()
            .and_then(|s| s.retention.clone())
            .unwrap_or_default();
        let mut patch = serde_json::Map::new();
        if ret.inputs_expire_at.is_none() {
            patch.insert("inputsExpireAt".into(), json!(ts(in_at)));
        }
        if ret.outputs_expire_at.is_none() {
            patch.insert("outputsExpireAt".into(), json!(ts(out_at)));
        }
        let mut deleted = Deleted::default();
        let stamp = now_time();
        if d.delete_inputs {
            deleted += self.delete_inputs(job).await?;
            patch.insert("inputsDeletedAt".into(), json!(stamp));
            self.metrics
                .record_retention_deletion("inputs", lag_secs(in_at));
        }
        if d.delete_outputs {
            deleted += self.delete_outputs(job).await?;
            patch.insert("outputsDeletedAt".into(), json!(stamp));
            self.metrics
                .record_retention_deletion("outputs", lag_secs(out_at));
        }
        if !patch.is_empty() {
            self.jobs(&job.namespace().unwrap_or_default())
                .patch_status(
                    &job.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"retention": patch}})),
                )
                .await
                .map_err(kube_err("patch status"))?;
        }
        if d.delete_inputs || d.delete_outputs {
            let what = match (d.delete_inputs, d.delete_outputs) {
                (true, true) => "inputs and outputs",
                (true, false) => "inputs",
                _ => "outputs",
            };
            self.metrics.bytes_erased.inc_by(deleted.bytes);
            self.audit(
                job,
                "RetentionExpired",
                format!(
                    "retention expired: {what} deleted ({} objects, {} bytes)",
                    deleted.objects, deleted.bytes
                ),
            )
            .await;
            tracing::info!(
                audit = "retention",
                namespace = %job.namespace().unwrap_or_default(),
                job = %job.name_any(),
                deleted = what,
                objects = deleted.objects,
                bytes = deleted.bytes,
                "retention deletion"
            );
        }
        Ok(d.next_due)
    }
}

fn lag_secs(due: i64) -> f64 {
    let now = Timestamp::now();
    let due_ms = due.saturating_mul(1000);
    ((now.as_millisecond() - due_ms).max(0) as f64) / 1000.0
}

fn reason_str(r: RevokeReason) -> &'static str {
    r.as_str()
}

/// The prefix of a job's checkpoints and outputs (as the operator lays them out).
pub fn job_prefix(job: &LoRATrainingJob) -> String {
    format!(
        "{}/{}-{}/",
        job.namespace().unwrap_or_default(),
        job.name_any(),
        job.uid().unwrap_or_default()
    )
}

/// Runs the retention loop forever: a pass whenever a job changes or the next expiry comes,
/// and at least every `resync`, but only while this replica holds the lease.
pub async fn retention_loop(app: Arc<App>, leader: Arc<crate::leader::Leader>, resync: Duration) {
    loop {
        let mut wait = resync;
        if leader.is_leader() {
            match app.retention_pass().await {
                Ok(Some(due)) => {
                    let until = (due - Timestamp::now().as_second()).max(0) as u64;
                    // Wake just after the due second so the decision sees it as due.
                    wait = wait.min(Duration::from_millis(until * 1000 + 50));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e.log_safe(), "retention pass failed");
                    wait = wait.min(Duration::from_secs(5));
                }
            }
        } else {
            wait = wait.min(leader.retry_period());
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = app.gc_wake.notified() => {
                // Progress reports change jobs every few seconds; coalesce a burst of changes
                // into one pass instead of listing every job per change.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Wakes the retention loop on every job change (completion sets the retention clock).
pub async fn watch_jobs(app: Arc<App>) {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let api: Api<LoRATrainingJob> = Api::all(app.kube.clone());
    let mut stream = kube::runtime::watcher(api, kube::runtime::watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        if ev.is_ok() {
            app.gc_wake.notify_one();
        }
    }
}
