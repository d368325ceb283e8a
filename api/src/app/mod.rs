//! The API's behaviour behind the HTTP layer: turning orders into jobs (idempotently, with
//! refund tombstones), and stating the customer's intent on a job's spec: cancel
//! (`spec.cancel`), erase (`spec.erasure`) and withdraw training consent
//! (`spec.dataUse.consentWithdrawn`). The operator acts on all three; the API never writes a
//! job's status and never deletes its pods, claims, Secret or data. Kubernetes and S3 hold all
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
//!
//! One upload, one order: before an order's job is created the API creates the upload's claim,
//! a Lease `ltj-upload-<hash of the dataset URI>` held by the order's hash. A second order on
//! the same upload finds the claim held and is refused (`upload_consumed`); the operator
//! deletes the claim with the job's data.
//!
//! This file holds the shared state and helpers (tombstones, hashing, the apiserver handles);
//! the behaviour is by resource: `orders` (webhook, drafts, jobs from orders, the upload
//! claim), `jobs` (intent on a job, its downloads), `uploads` (the dataset check).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use loraplane_crds::layout::{
    LABEL_MANAGED_BY, LABEL_RECORD, UPLOAD_CLAIM_RECORD, s3_uri, upload_claim_name,
};
use loraplane_crds::platform::PlatformConfig;
use loraplane_crds::v1alpha1::{
    ErasureReason, ErasureRequest, LoRATrainingJob, LoRATrainingJobSpec,
};
use loraplane_runtime::storage::{Marker, Storage, StorageError, parse_uri};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::ApiConfig;
use crate::dataset_check::{self, CheckError};
use crate::ledger::{self, LedgerError};
use crate::metrics::Metrics;
use crate::order::{
    self, ANNOTATION_REQUEST, Draft, DraftId, LABEL_IDEMPOTENCY, LABEL_ORDER, LABEL_PAYMENT,
    LABEL_PLAN, LABEL_SOURCE, LABEL_TOMBSTONE_OF, Order, OrderError, SpecInputs, UploadId,
};
use crate::outbox;
use crate::receipt;
use crate::refunds::{RefundError, RefundReason, Stripe};
use crate::stripe::{RevokeReason, WebhookEvent};
use loraplane_dataset::{DatasetError, DatasetRules};

mod jobs;
mod orders;
mod uploads;

/// Secrets the API holds in memory only.
#[derive(Clone)]
pub struct Secrets {
    /// Stripe endpoint secrets (several while rolling).
    pub webhook: Vec<Vec<u8>>,
    /// Key for hashing payment and order ids.
    pub id_key: Vec<u8>,
    /// Notification signing secrets by tenant name (tenants with a notification endpoint).
    pub notify: BTreeMap<String, Vec<u8>>,
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
    Upload(#[from] DatasetError),
    /// The upload id names nothing.
    #[error("upload {0:?} does not exist or was not uploaded yet")]
    UploadNotFound(String),
    /// Another order already consumed the upload.
    #[error(
        "upload {0:?} was already used by another order; upload the dataset again for a new order"
    )]
    UploadConsumed(String),
    /// The upload id is malformed or in an unknown region.
    #[error("upload id {0:?} is not valid")]
    BadUploadId(String),
    /// The `continue` token is not one a previous page handed out (or it expired).
    #[error("the continue token is not valid (or has expired); list again from the start")]
    BadContinue,
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
    /// A dataset check could not run to its end (the API is shutting down).
    #[error("the dataset check was interrupted; retry")]
    CheckDataset,
    /// A paid order could not be refunded (yet): the webhook fails, Stripe delivers it again.
    #[error(transparent)]
    Refund(#[from] RefundError),
    /// The order's ledger could not be read or written.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
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
            AppError::Ledger(LedgerError::Kube {
                action,
                source: kube::Error::Api(status),
            }) => format!(
                "{action} the order ledger: HTTP {} {}",
                status.code, status.reason
            ),
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

/// Shared state of every handler.
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
    /// One permit per dataset check allowed at once (`limits.maxConcurrentValidations`).
    pub validations: Arc<tokio::sync::Semaphore>,
    /// Stripe's API, for refunds.
    pub stripe: Stripe,
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
    /// The order's job was asked to stop and be erased.
    Erased,
    /// A revocation recorded with no job (yet).
    Tombstoned,
    /// Acknowledged, nothing to do.
    Ignored,
    /// The order is unusable (bad metadata or dataset) and there was no payment to refund;
    /// acknowledged so Stripe stops retrying.
    Rejected,
    /// The order is unusable and its payment was refunded in full.
    Refunded,
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
            Outcome::Refunded => "refunded",
        }
    }
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
    /// The permits that bound concurrent dataset checks, as the configuration sets them.
    pub fn validation_permits(config: &ApiConfig) -> Arc<tokio::sync::Semaphore> {
        Arc::new(tokio::sync::Semaphore::new(
            config.limits.max_concurrent_validations,
        ))
    }

    /// The dataset rules: the platform's, the trainer's too.
    pub fn dataset_rules(&self) -> &DatasetRules {
        &self.platform.dataset
    }

    fn jobs(&self, ns: &str) -> Api<LoRATrainingJob> {
        Api::namespaced(self.kube.clone(), ns)
    }

    fn configmaps(&self, ns: &str) -> Api<ConfigMap> {
        Api::namespaced(self.kube.clone(), ns)
    }

    fn leases(&self, ns: &str) -> Api<Lease> {
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
                    (LABEL_MANAGED_BY.to_string(), "loraplane-api".to_string()),
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

    /// The dataset bucket of a region, if the platform has the region.
    fn dataset_bucket(&self, region: &str) -> Option<String> {
        self.platform
            .region(region)
            .map(|r| r.buckets.datasets.clone())
    }
}
