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

/// Why a paid draft cannot be fulfilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PaidDraft {
    /// Its id is malformed, or it expired or never existed.
    Gone,
    /// The checkout charged another amount or currency than the draft quoted.
    WrongPrice,
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

/// Who holds an upload's claim, as [`App::claim_upload`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// This order holds it (just created, or from an earlier delivery).
    Ours,
    /// Another order holds it.
    Theirs,
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

    /// The receipt for an upload that just passed, for the storefront to carry into the order.
    pub fn dataset_receipt(&self, ns: &str, upload_id: &str, sha256: &str) -> String {
        receipt::issue(
            &self.secrets.id_key,
            ns,
            upload_id,
            self.dataset_rules(),
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
        let rules = *self.dataset_rules();
        if let Some(sha) = receipt.and_then(|r| {
            receipt::verify(
                &self.secrets.id_key,
                r,
                ns,
                upload_id,
                &rules,
                Timestamp::now().as_second(),
            )
        }) {
            self.metrics
                .dataset_checks
                .with_label_values(&["receipt"])
                .inc();
            return Ok(sha.to_string());
        }
        let bucket = self
            .dataset_bucket(&upload.region)
            .ok_or_else(|| AppError::BadUploadId(upload_id.into()))?;
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
                if let Some(sha) = dataset_check::vouched_sha256(&rules, &m) {
                    self.metrics
                        .dataset_checks
                        .with_label_values(&["marker"])
                        .inc();
                    return Ok(sha.to_string());
                }
            }
            Marker::Unmarked => {}
        }
        let object = self.storage.object(&upload.region, &bucket, &key)?;
        let Some(stat) = object.stat().await? else {
            return Err(AppError::UploadNotFound(upload_id.into()));
        };
        if stat.size > rules.max_zip_bytes {
            // A presigned PUT cannot bound its body, so the bound is kept here: the oversized
            // object goes now rather than waiting for the upload sweep.
            if let Err(e) = self.storage.delete_object(&bucket, &key).await {
                tracing::warn!(error = %e, "could not delete an oversized upload");
            }
            return Err(DatasetError::ZipTooLarge {
                size: stat.size,
                limit: rules.max_zip_bytes,
            }
            .into());
        }
        // A check holds an entry and a decoded image in memory: the permit bounds how many run
        // at once. It moves into the blocking task, so a client that hangs up does not free it
        // before the memory is.
        let permit = self
            .validations
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AppError::CheckDataset)?;
        self.metrics
            .dataset_checks
            .with_label_values(&["download"])
            .inc();
        let runtime = tokio::runtime::Handle::current();
        let checked = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            dataset_check::check_object(runtime, object, stat.etag, stat.size, &rules)
        })
        .await
        .map_err(|_| AppError::CheckDataset)?;
        let sha = checked.map_err(|e| match e {
            CheckError::Invalid(e) => AppError::Upload(e),
            CheckError::Read(e) => AppError::Storage(e),
        })?;
        // Should the object be replaced between our read and this write, the marker names the
        // old bytes' hash, which the job spec pins and the trainer verifies before unpacking:
        // the replacement is refused at start, never trained on unchecked.
        if let Err(e) = self
            .storage
            .set_validation_marker(
                &upload.region,
                &bucket,
                &key,
                &dataset_check::marker(&rules, &sha),
            )
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
        // One upload, one order: the claim is created before the job, so of two orders on one
        // upload exactly one gets it (the apiserver's create is the arbiter).
        let claim = upload_claim_name(&spec.dataset.uri);
        if self.claim_upload(ns, &claim, &ids.order_hash).await? == Claim::Theirs {
            return Err(AppError::UploadConsumed(order.upload_id.clone()));
        }
        let mut job = LoRATrainingJob::new(&name, spec);
        job.metadata.namespace = Some(ns.to_string());
        let mut labels = BTreeMap::from([
            (LABEL_ORDER.to_string(), ids.order_hash.clone()),
            (LABEL_SOURCE.to_string(), ids.source.to_string()),
            (LABEL_PLAN.to_string(), order.plan.clone()),
            (LABEL_MANAGED_BY.to_string(), "loraplane-api".to_string()),
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
        // What the API owes after the job exists (a refund, notifications) keeps the job
        // until it is paid out; see `notifier`.
        if self.owes_after_job(ns, ids) {
            job.metadata.finalizers = Some(vec![outbox::FINALIZER.to_string()]);
        }
        match api.create(&PostParams::default(), &job).await {
            Ok(created) => Ok((created, true)),
            Err(e) if is_status(&e, 409) => {
                let existing = api.get(&name).await.map_err(kube_err("get job"))?;
                Ok((existing, false))
            }
            Err(e) => Err(kube_err("create job")(e)),
        }
    }

    /// Claims an upload for an order: the Lease `claim` (see
    /// `loraplane_crds::layout::upload_claim_name`) held by the order's hash. A Lease, not a
    /// ConfigMap: the tombstone lookups list the namespace's ConfigMaps on every order, and a
    /// claim per order there would make each of them slower. Claiming twice for the same
    /// order is harmless (a redelivery); for another order it is refused.
    async fn claim_upload(
        &self,
        ns: &str,
        claim: &str,
        order_hash: &str,
    ) -> Result<Claim, AppError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(claim.to_string()),
                namespace: Some(ns.to_string()),
                labels: Some(BTreeMap::from([
                    (LABEL_MANAGED_BY.to_string(), "loraplane-api".to_string()),
                    (LABEL_RECORD.to_string(), UPLOAD_CLAIM_RECORD.to_string()),
                ])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(order_hash.to_string()),
                ..LeaseSpec::default()
            }),
        };
        let holder = match self.leases(ns).create(&PostParams::default(), &lease).await {
            Ok(_) => return Ok(Claim::Ours),
            Err(e) if is_status(&e, 409) => self.claim_holder(ns, claim).await?,
            Err(e) => return Err(kube_err("create upload claim")(e)),
        };
        Ok(if holder.as_deref() == Some(order_hash) {
            Claim::Ours
        } else {
            Claim::Theirs
        })
    }

    /// The order hash holding a claim, if the claim exists.
    async fn claim_holder(&self, ns: &str, claim: &str) -> Result<Option<String>, AppError> {
        Ok(self
            .leases(ns)
            .get_opt(claim)
            .await
            .map_err(kube_err("get upload claim"))?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity))
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
            .dataset_bucket(&upload.region)
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

    /// Refunds a paid order that cannot become a job. Without a payment intent (nothing was
    /// charged) there is nothing to give back.
    async fn refund(
        &self,
        payment_intent: Option<&str>,
        ids: &OrderIds,
        reason: RefundReason,
    ) -> Result<Outcome, AppError> {
        let Some(pi) = payment_intent else {
            return Ok(Outcome::Rejected);
        };
        let state = self.stripe.refund(pi, &ids.order_hash, reason).await?;
        tracing::info!(reason = reason.as_str(), state = ?state, "paid order refunded");
        Ok(Outcome::Refunded)
    }

    /// Creates (or finds again) the draft of an order: everything checked as for a job, the
    /// plan's price quoted, stored in the upload's region. The same Idempotency-Key gives the
    /// same draft; with another order it is refused.
    pub async fn create_draft(
        &self,
        ns: &str,
        order: &Order,
        idempotency_key: &str,
    ) -> Result<(DraftId, Draft), AppError> {
        let plan = self
            .config
            .plans
            .get(&order.plan)
            .ok_or_else(|| OrderError::UnknownPlan(order.plan.clone()))?;
        let price = plan
            .price
            .clone()
            .ok_or_else(|| OrderError::Unpriced(order.plan.clone()))?;
        let upload = UploadId::parse(&order.upload_id)
            .ok_or_else(|| AppError::BadUploadId(order.upload_id.clone()))?;
        // Everything a job would be refused for is refused now, before the customer pays.
        self.job_spec(ns, order).await?;
        let id = DraftId(UploadId {
            region: upload.region.clone(),
            token: self.hash(&format!("draft:{ns}"), idempotency_key),
        });
        let bucket = self
            .dataset_bucket(id.region())
            .ok_or_else(|| AppError::BadUploadId(order.upload_id.clone()))?;
        let key = id.key(ns);
        if let Some(bytes) = self.storage.get_record(&bucket, &key).await? {
            let stored: Draft =
                serde_json::from_slice(&bytes).map_err(|_| AppError::IdempotencyMismatch)?;
            if &stored.order != order {
                return Err(AppError::IdempotencyMismatch);
            }
            return Ok((id, stored));
        }
        let draft = Draft {
            order: order.clone(),
            price,
            created_at: Timestamp::now().as_second(),
        };
        let bytes = serde_json::to_vec(&draft).map_err(|_| AppError::IdempotencyMismatch)?;
        self.storage.put_record(&bucket, &key, bytes).await?;
        Ok((id, draft))
    }

    /// The order of a paid draft, provided the checkout charged exactly the quoted price.
    async fn paid_draft(
        &self,
        ns: &str,
        id: &str,
        amount_total: Option<i64>,
        currency: Option<&str>,
    ) -> Result<Result<Order, PaidDraft>, AppError> {
        let Some(id) = DraftId::parse(id) else {
            return Ok(Err(PaidDraft::Gone));
        };
        let Some(bucket) = self.dataset_bucket(id.region()) else {
            return Ok(Err(PaidDraft::Gone));
        };
        let Some(bytes) = self.storage.get_record(&bucket, &id.key(ns)).await? else {
            return Ok(Err(PaidDraft::Gone));
        };
        let Ok(draft) = serde_json::from_slice::<Draft>(&bytes) else {
            return Ok(Err(PaidDraft::Gone));
        };
        let paid = amount_total == Some(draft.price.amount)
            && currency.is_some_and(|c| c.eq_ignore_ascii_case(&draft.price.currency));
        Ok(if paid {
            Ok(draft.order)
        } else {
            Err(PaidDraft::WrongPrice)
        })
    }

    /// Deletes a draft order (gone already is fine).
    async fn delete_draft(&self, ns: &str, id: &str) -> Result<(), AppError> {
        let Some(id) = DraftId::parse(id) else {
            return Ok(());
        };
        if let Some(bucket) = self.dataset_bucket(id.region()) {
            self.storage.delete_record(&bucket, &id.key(ns)).await?;
        }
        Ok(())
    }

    /// The dataset bucket of a region, if the platform has the region.
    fn dataset_bucket(&self, region: &str) -> Option<String> {
        self.platform
            .region(region)
            .map(|r| r.buckets.datasets.clone())
    }

    /// Handles one verified webhook event.
    pub async fn handle_event(&self, event: WebhookEvent) -> Result<Outcome, AppError> {
        let ns = self.config.stripe_namespace.clone();
        match event {
            WebhookEvent::Paid {
                session_id,
                payment_intent,
                metadata,
                amount_total,
                currency,
            } => {
                let ids = OrderIds {
                    source: "stripe",
                    order_hash: self.hash("session", &session_id),
                    payment_hash: payment_intent.as_deref().map(|p| self.hash("payment", p)),
                    idempotency: None,
                };
                let pi = payment_intent.as_deref();
                // The checkout names a draft order, which holds everything the customer chose:
                // their words never travel through Stripe.
                let Some(id) = metadata.get("order_id") else {
                    return self.refund(pi, &ids, RefundReason::OrderRejected).await;
                };
                let order = match self
                    .paid_draft(&ns, id, amount_total, currency.as_deref())
                    .await?
                {
                    Ok(order) => order,
                    Err(PaidDraft::Gone) => {
                        // A redelivery finds its draft gone (deleted when the job was made, or
                        // expired) and still has its job.
                        let name = order::job_name(&ids.order_hash);
                        let api = self.jobs(&ns);
                        if api
                            .get_opt(&name)
                            .await
                            .map_err(kube_err("get job"))?
                            .is_some()
                        {
                            return Ok(Outcome::Duplicate);
                        }
                        // Its job was erased, or its payment refunded or disputed: replayed, it
                        // is neither a job again nor a second refund.
                        if self.revoked(&ns, &ids).await?.is_some() {
                            return Ok(Outcome::RevokedFirst);
                        }
                        return self.refund(pi, &ids, RefundReason::OrderRejected).await;
                    }
                    // The draft stays: the storefront may still check it out at its price.
                    Err(PaidDraft::WrongPrice) => {
                        return self.refund(pi, &ids, RefundReason::PriceMismatch).await;
                    }
                };
                let (job, created) = match self.create_job(&ns, &order, &ids).await {
                    Ok(r) => r,
                    Err(AppError::Revoked(_)) => {
                        // The refund came first; the upload is the order's only data, unless
                        // another order consumed it.
                        self.delete_unclaimed_upload(&ns, &order.upload_id, &ids.order_hash)
                            .await?;
                        return Ok(Outcome::RevokedFirst);
                    }
                    // Paid for, and it can never become a job: the money goes back before the
                    // event is acknowledged.
                    Err(
                        AppError::Order(_)
                        | AppError::Upload(_)
                        | AppError::UploadNotFound(_)
                        | AppError::UploadConsumed(_)
                        | AppError::BadUploadId(_),
                    ) => return self.refund(pi, &ids, RefundReason::OrderRejected).await,
                    Err(e) => return Err(e),
                };
                // What a refund of the job would need, kept before the event is acknowledged
                // (a redelivery records it again, harmlessly).
                ledger::record_payment(&self.kube, &job, id, pi, &ids.order_hash, created).await?;
                // The job holds the order now: the draft's copy of the customer's words goes at
                // once rather than with its TTL (a redelivery then finds the job).
                self.delete_draft(&ns, id).await?;
                // Write-then-read: a refund that raced past our tombstone check is seen here.
                if created && self.revoked(&ns, &ids).await?.is_some() {
                    self.erase(&ns, &job.name_any(), ErasureReason::Refund)
                        .await?;
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
                    self.erase(&ns, &job.name_any(), erasure_reason(reason))
                        .await?;
                }
                Ok(Outcome::Erased)
            }
            WebhookEvent::AwaitingPayment | WebhookEvent::PartialRefund | WebhookEvent::Ignored => {
                Ok(Outcome::Ignored)
            }
        }
    }

    /// Deletes an upload that no other order holds a claim on.
    async fn delete_unclaimed_upload(
        &self,
        ns: &str,
        upload_id: &str,
        order_hash: &str,
    ) -> Result<(), AppError> {
        let Some(upload) = UploadId::parse(upload_id) else {
            return Ok(());
        };
        let Some(region) = self.platform.region(&upload.region) else {
            return Ok(());
        };
        let key = upload.key(ns);
        let claim = upload_claim_name(&s3_uri(&region.buckets.datasets, &key));
        if self
            .claim_holder(ns, &claim)
            .await?
            .is_some_and(|h| h != order_hash)
        {
            return Ok(());
        }
        self.storage
            .delete_object(&region.buckets.datasets, &key)
            .await?;
        Ok(())
    }

    /// Whether a job of this order can owe something once it exists: a refund (it was paid
    /// for) or notifications (its tenant has an endpoint).
    fn owes_after_job(&self, ns: &str, ids: &OrderIds) -> bool {
        ids.payment_hash.is_some()
            || self
                .config
                .tenants
                .iter()
                .any(|t| t.namespace == ns && t.notifications.is_some())
    }

    /// Presigned links to a job's LoRA files, and when they stop working (Unix seconds). Only
    /// the job's own files: status is the operator's, but the names in it came from a trainer,
    /// and a presigned link is a download for whoever holds it.
    pub async fn downloads(
        &self,
        job: &LoRATrainingJob,
    ) -> Result<(Vec<outbox::Download>, i64), AppError> {
        let secs = self.config.limits.presign_seconds;
        let prefix = loraplane_crds::layout::job_prefix(
            &job.namespace().unwrap_or_default(),
            &job.name_any(),
            job.metadata.uid.as_deref().unwrap_or_default(),
        );
        let mut links = Vec::new();
        let artifacts = job.status.iter().flat_map(|s| &s.artifacts);
        for a in artifacts.filter(|a| self.storage.is_job_output(&a.uri, &prefix)) {
            let (bucket, key) = parse_uri(&a.uri)?;
            let url = self
                .storage
                .presign_get(bucket, key, std::time::Duration::from_secs(secs))
                .await?;
            links.push(outbox::Download {
                format: a.format.clone(),
                url,
                sha256: a.sha256.clone(),
                bytes: a.bytes,
            });
        }
        let expires = Timestamp::now().as_second() + i64::try_from(secs).unwrap_or(i64::MAX / 2);
        Ok((links, expires))
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
        let list = match self.jobs(ns).list(&lp).await {
            Ok(list) => list,
            // The apiserver answers a malformed token 400 and an expired one 410.
            Err(e) if is_status(&e, 400) || is_status(&e, 410) => {
                return Err(AppError::BadContinue);
            }
            Err(e) => return Err(kube_err("list jobs")(e)),
        };
        let next = list.metadata.continue_.filter(|c| !c.is_empty());
        Ok((list.items, next))
    }

    /// Cancels a job: sets `spec.cancel` (one-way), and the operator stops it for good. A job
    /// that has already ended is returned as it is.
    pub async fn cancel(&self, ns: &str, name: &str) -> Result<LoRATrainingJob, AppError> {
        let job = self.get_job(ns, name).await?;
        let ended = job
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_terminal());
        if ended || job.spec.cancel {
            return Ok(job);
        }
        self.jobs(ns)
            .patch(
                name,
                &PatchParams::default(),
                // The customer's own cancel owes no refund; one without this mark (a
                // platform team's) does.
                &Patch::Merge(json!({
                    "metadata": {"annotations": {outbox::ANNOTATION_CANCELLED_BY: outbox::CANCELLED_BY_CUSTOMER}},
                    "spec": {"cancel": true},
                })),
            )
            .await
            .map_err(kube_err("cancel job"))
    }

    /// Withdraws the customer's training consent: sets `spec.dataUse.consentWithdrawn`
    /// (one-way), and the operator deletes the job's copy in the consented corpus (or never
    /// makes it). A job ordered without consent is returned as it is.
    pub async fn withdraw_consent(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<LoRATrainingJob, AppError> {
        let job = self.get_job(ns, name).await?;
        if !job.spec.data_use.training_consent || job.spec.data_use.consent_withdrawn {
            return Ok(job);
        }
        self.jobs(ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"dataUse": {"consentWithdrawn": true}}})),
            )
            .await
            .map_err(kube_err("withdraw consent"))
    }

    /// Requests the erasure of every byte of a job: records the request for the order (so a
    /// replayed order cannot recreate the job), then writes `spec.erasure` (one-way). The
    /// operator stops the job, deletes its data and the job, and leaves the audit record.
    /// Returns false when there is no such job (any more).
    pub async fn erase(
        &self,
        ns: &str,
        name: &str,
        reason: ErasureReason,
    ) -> Result<bool, AppError> {
        let Some(job) = self
            .jobs(ns)
            .get_opt(name)
            .await
            .map_err(kube_err("get job"))?
        else {
            return Ok(false);
        };
        if job.spec.erasure.is_some() {
            return Ok(true);
        }
        let order_hash = job
            .labels()
            .get(LABEL_ORDER)
            .cloned()
            .unwrap_or_else(|| name.to_string());
        let requested = Timestamp::now();
        self.write_tombstone(
            ns,
            &erased_name(&order_hash),
            &order_hash,
            BTreeMap::from([
                ("reason".to_string(), reason.as_str().to_string()),
                ("requestedAt".to_string(), requested.to_string()),
            ]),
        )
        .await?;
        let request = ErasureRequest {
            requested_at: Time(requested),
            reason,
        };
        match self
            .jobs(ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"erasure": request}})),
            )
            .await
        {
            Ok(_) => {}
            // Already being deleted (or gone): the operator's purge takes its data anyway.
            Err(e) if is_status(&e, 404) => return Ok(false),
            // An earlier request won the race; the first request stands.
            Err(e) if is_status(&e, 422) => {}
            Err(e) => return Err(kube_err("request erasure")(e)),
        }
        self.metrics
            .erasure_requests
            .with_label_values(&[reason.as_str()])
            .inc();
        tracing::info!(
            namespace = ns,
            job = name,
            reason = reason.as_str(),
            "erasure requested"
        );
        Ok(true)
    }
}

fn erasure_reason(r: RevokeReason) -> ErasureReason {
    match r {
        RevokeReason::Refund => ErasureReason::Refund,
        RevokeReason::Dispute => ErasureReason::Dispute,
    }
}
