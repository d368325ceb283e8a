//! The API's one background worker: it keeps every job's [`Ledger`] (rules in `outbox`):
//! records the events the job lives, refunds a paid job that ended badly, delivers the events
//! to the tenant's storefront signed as Stripe signs its own, and removes the API's finalizer
//! once nothing is owed.
//!
//! One kube-runtime controller per namespace served (the Stripe namespace, and each tenant's
//! with a notification endpoint): a watch wakes it on every change of a job, and a requeue at
//! the ledger's next retry time. All state is in the cluster (the ledger Secret), so a restart
//! resumes where the last write left off: events are delivered at least once (the storefront
//! de-duplicates on the event id) and a refund is asked for again with the same
//! `Idempotency-Key`, which Stripe answers with the same refund. Every replica runs it; a
//! short claim written on the ledger keeps two replicas from delivering one job's events at
//! once, which is what keeps them in order.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use http_body_util::Full;
use hyper::body::Bytes;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::{ANNOTATION_REFUND, DATA_FINALIZER, LABEL_PAYMENT, refund_annotation};
use loraplane_crds::v1alpha1::{Phase, SampleKind};
use serde_json::json;

use crate::app::{App, AppError};
use crate::config::Tenant;
use crate::ledger::{self, LedgerError, Stored};
use crate::outbox::{
    self, ANNOTATION_CANCELLED_BY, CANCELLED_BY_CUSTOMER, Claim, FINALIZER, JobRefundReason,
    JobView, Policy, Refund, RefundProgress,
};
use crate::refunds::{HttpsClient, RefundError, RefundReason, https_client};

/// The header carrying a notification's signature (`t=…,v1=…`, as `Stripe-Signature`).
pub const SIGNATURE_HEADER: &str = "loraplane-signature";

/// Why one look at a job failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// Reading or writing the ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Presigning the download links failed.
    #[error("presign the download links: {0}")]
    Presign(#[from] AppError),
    /// Updating the job's finalizer or refund annotation failed.
    #[error("{action}: {source}")]
    Job {
        /// What was being done.
        action: &'static str,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// The job changed since it was read (its finalizers were patched at a stale version).
    #[error("the job changed since it was read")]
    Stale,
    /// The HTTP client could not be set up.
    #[error(transparent)]
    Client(#[from] RefundError),
}

/// The worker's shared state.
pub struct Notifier {
    app: Arc<App>,
    holder: String,
    policy: Policy,
    client: HttpsClient,
    timeout: Duration,
    concurrency: u16,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    Timestamp::now().as_second()
}

impl Notifier {
    /// A worker for `app`, identified as `holder` in its delivery claims (the pod's name).
    pub fn new(app: Arc<App>, holder: &str) -> Result<Notifier, NotifyError> {
        let n = &app.config.notifications;
        Ok(Notifier {
            policy: crate::outbox::Policy::from(n),
            timeout: Duration::from_secs(n.timeout_seconds.max(1)),
            concurrency: n.concurrency.max(1),
            holder: holder.to_string(),
            client: https_client()?,
            app,
        })
    }

    /// The namespaces whose jobs may owe something: the Stripe namespace's (paid), and those
    /// of tenants with a notification endpoint.
    pub fn namespaces(&self) -> Vec<String> {
        let cfg = &self.app.config;
        let mut out = vec![cfg.stripe_namespace.clone()];
        for t in cfg.tenants.iter().filter(|t| t.notifications.is_some()) {
            if !out.contains(&t.namespace) {
                out.push(t.namespace.clone());
            }
        }
        out
    }

    /// Runs until the process ends.
    pub async fn run(self: Arc<Self>) {
        let controllers = self.namespaces().into_iter().map(|ns| {
            let api: Api<LoRATrainingJob> = Api::namespaced(self.app.kube.clone(), &ns);
            // A bounded number of jobs at once: a burst (a restart facing thousands of jobs)
            // must not open thousands of connections to one storefront, whose slowed answers
            // would time out and be sent again.
            Controller::new(api, watcher::Config::default())
                .with_config(controller::Config::default().concurrency(self.concurrency))
                .run(reconcile, error_policy, self.clone())
                .for_each(|_| async {})
        });
        futures::future::join_all(controllers).await;
    }

    fn tenant(&self, ns: &str) -> Option<(&Tenant, &[u8])> {
        let t = self
            .app
            .config
            .tenants
            .iter()
            .find(|t| t.namespace == ns && t.notifications.is_some())?;
        let secret = self.app.secrets.notify.get(&t.name)?;
        Some((t, secret.as_slice()))
    }

    /// Sends one event; the storefront's status, or `None` when it did not answer in time.
    async fn post(&self, url: &str, secret: &[u8], body: Vec<u8>) -> Option<u16> {
        let signature = crate::stripe::header(secret, now(), &body);
        let req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("user-agent", "loraplane-notifications/1")
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        let exchange = async {
            let resp = self.client.request(req).await.ok()?;
            Some(resp.status().as_u16())
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .ok()
            .flatten()
    }
}

/// What the decision needs to know about a job.
pub fn view_of(job: &LoRATrainingJob, notify: bool) -> JobView {
    let status = job.status.clone().unwrap_or_default();
    let phase = status.phase;
    let end_reason = status
        .conditions
        .iter()
        .find(|c| (c.type_ == "Failed" || c.type_ == "Cancelled") && c.status == "True")
        .map(|c| c.reason.clone());
    let percent = status
        .progress
        .as_ref()
        .filter(|p| p.total_steps > 0)
        .map(|p| (p.step.clamp(0, p.total_steps) * 100 / p.total_steps) as u8);
    let deleting = job.metadata.deletion_timestamp.is_some();
    let finalizers = job.finalizers();
    JobView {
        uid: job.uid().unwrap_or_default(),
        phase,
        started: phase == Some(Phase::Running)
            || status.attempts.iter().any(|a| a.node.is_some())
            || status.progress.is_some_and(|p| p.step > 0),
        percent,
        end_reason,
        cancelled_by_customer: job
            .annotations()
            .get(ANNOTATION_CANCELLED_BY)
            .is_some_and(|v| v == CANCELLED_BY_CUSTOMER),
        deleting,
        purged: deleting && !finalizers.iter().any(|f| f == DATA_FINALIZER),
        erasure: job.spec.erasure.as_ref().map(|e| e.reason),
        notify,
    }
}

fn refund_reason(r: JobRefundReason) -> RefundReason {
    match r {
        JobRefundReason::JobFailed => RefundReason::JobFailed,
        JobRefundReason::JobCancelled => RefundReason::JobCancelled,
    }
}

/// Records the refund on the job ([`ANNOTATION_REFUND`]), unless it says so already.
async fn annotate_refund(
    n: &Notifier,
    job: &LoRATrainingJob,
    r: &Refund,
) -> Result<(), NotifyError> {
    let value = refund_annotation(r.reason.as_str(), r.state.as_str());
    if job.annotations().get(ANNOTATION_REFUND) == Some(&value) {
        return Ok(());
    }
    let patch = json!({"metadata": {"annotations": {ANNOTATION_REFUND: value}}});
    patch_job(n, job, "record the refund on the job", patch).await
}

fn error_code(e: &RefundError) -> String {
    match e {
        RefundError::Timeout => "timeout".into(),
        RefundError::Refused { status, code } => format!("refused_{status}_{code}"),
        RefundError::Send(_) | RefundError::SetupClient(_) => "unreachable".into(),
        RefundError::ReadAnswer(_) => "bad_answer".into(),
    }
}

async fn patch_job(
    n: &Notifier,
    job: &LoRATrainingJob,
    action: &'static str,
    patch: serde_json::Value,
) -> Result<(), NotifyError> {
    let api: Api<LoRATrainingJob> =
        Api::namespaced(n.app.kube.clone(), &job.namespace().unwrap_or_default());
    match api
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(NotifyError::Stale),
        Err(source) => Err(NotifyError::Job { action, source }),
    }
}

/// One look at a job: observe (the job, its ledger), decide (`outbox::decide`), apply (write
/// the ledger, refund, deliver, release).
async fn reconcile(job: Arc<LoRATrainingJob>, n: Arc<Notifier>) -> Result<Action, NotifyError> {
    let ns = job.namespace().unwrap_or_default();
    let tenant = n.tenant(&ns);
    let ours = job.finalizers().iter().any(|f| f == FINALIZER);
    let mut stored = ledger::read(&n.app.kube, &ns, &job.name_any()).await?;
    if stored.version.is_none() && tenant.is_none() && !ours {
        return Ok(Action::await_change());
    }
    // A paid job's ledger is first written by the webhook that made the job, with the payment
    // intent; writing it first here would only make the two collide. Give the webhook a few
    // seconds (a lost write is made good by the redelivered webhook, or by this after that).
    let paid = job.labels().contains_key(LABEL_PAYMENT);
    let age = job
        .creation_timestamp()
        .map_or(i64::MAX, |t| now() - t.0.as_second());
    if stored.version.is_none() && paid && age < 30 {
        return Ok(Action::requeue(Duration::from_millis(250)));
    }
    let view = view_of(&job, tenant.is_some());
    let d = outbox::decide(&view, &stored.ledger, now(), &n.policy);
    if d.release {
        if ours {
            let rest: Vec<String> = job
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            let patch = json!({"metadata": {
                "finalizers": rest,
                "resourceVersion": job.metadata.resource_version,
            }});
            patch_job(&n, &job, "release the job's finalizer", patch).await?;
        }
        return Ok(Action::await_change());
    }
    let mut changed = !d.append.is_empty();
    stored.ledger.events.extend(d.append);
    if let Some(reason) = d.refund {
        stored.ledger.refund = Some(Refund::owed(reason, now()));
        changed = true;
    }
    // The claim on the deliveries rides on the same write (one apiserver request less per
    // event on the hot path).
    let mut claimed = false;
    if tenant.is_some()
        && outbox::next_delivery(&stored.ledger, now()).is_some_and(|(_, due)| due)
        && outbox::may_deliver(&stored.ledger, &n.holder, now())
        && changed
    {
        stored.ledger.claim = Some(claim(&n));
        claimed = true;
    }
    if changed {
        ledger::write(&n.app.kube, &job, &mut stored).await?;
    }
    settle_refund(&n, &job, &mut stored).await?;
    if let Some((t, secret)) = tenant
        && let Some(endpoint) = &t.notifications
    {
        deliver(&n, &job, &mut stored, &endpoint.url, secret, claimed).await?;
    }
    // A refund that went through, or a delivery, may owe a next event or the release.
    let next = outbox::decide(&view, &stored.ledger, now(), &n.policy);
    if !next.append.is_empty() || next.release {
        return Ok(Action::requeue(Duration::from_millis(10)));
    }
    // Another replica is delivering this job's events: look again when it should be done,
    // rather than at the (already due) retry time.
    if !outbox::may_deliver(&stored.ledger, &n.holder, now()) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    Ok(match outbox::wake_at(&stored.ledger) {
        Some(at) => Action::requeue(Duration::from_millis(
            u64::try_from(at - now()).unwrap_or(0) * 1000 + 50,
        )),
        // A safety net: nothing is owed until the job changes.
        None => Action::requeue(Duration::from_secs(600)),
    })
}

/// Asks Stripe for a refund that is due, and records the outcome on the ledger and the job.
async fn settle_refund(
    n: &Notifier,
    job: &LoRATrainingJob,
    stored: &mut Stored,
) -> Result<(), NotifyError> {
    let now = now();
    let Some(refund) = stored.ledger.refund.clone() else {
        return Ok(());
    };
    // The job's annotation follows the ledger (also after a write lost to a restart).
    annotate_refund(n, job, &refund).await?;
    if refund.state == RefundProgress::Succeeded || refund.next_at > now {
        return Ok(());
    }
    let (Some(pi), Some(order)) = (
        stored.ledger.payment_intent.clone(),
        stored.ledger.order_hash.clone(),
    ) else {
        return Ok(());
    };
    let reason = refund_reason(refund.reason);
    let outcome = n.app.stripe.refund(&pi, &order, reason).await;
    let error = outcome.as_ref().err().map(error_code);
    n.app
        .metrics
        .refunds
        .with_label_values(&[
            reason.as_str(),
            if error.is_none() {
                "succeeded"
            } else {
                "failed"
            },
        ])
        .inc();
    let mut refund = refund;
    outbox::refund_tried(&mut refund, error.clone(), now, &n.policy);
    match &error {
        None => {
            tracing::info!(namespace = %job.namespace().unwrap_or_default(), job = %job.name_any(), reason = reason.as_str(), "paid job refunded")
        }
        Some(code) => {
            tracing::warn!(namespace = %job.namespace().unwrap_or_default(), job = %job.name_any(), reason = reason.as_str(), error = %code, "refund failed; will retry")
        }
    }
    stored.ledger.refund = Some(refund.clone());
    ledger::write(&n.app.kube, job, stored).await?;
    if refund.state == RefundProgress::Succeeded {
        annotate_refund(n, job, &refund).await?;
    }
    Ok(())
}

/// This replica's claim on a job's deliveries, long enough for a few deliveries.
fn claim(n: &Notifier) -> Claim {
    Claim {
        holder: n.holder.clone(),
        until: now() + i64::try_from(n.timeout.as_secs()).unwrap_or(10) * 4 + 5,
    }
}

/// Delivers the job's due events, oldest first, under a claim on the ledger (`claimed`: the
/// claim is already written).
async fn deliver(
    n: &Notifier,
    job: &LoRATrainingJob,
    stored: &mut Stored,
    url: &str,
    secret: &[u8],
    mut claimed: bool,
) -> Result<(), NotifyError> {
    let mut sent = Vec::new();
    while let Some((i, true)) = outbox::next_delivery(&stored.ledger, now()) {
        if !claimed {
            if !outbox::may_deliver(&stored.ledger, &n.holder, now()) {
                return Ok(());
            }
            stored.ledger.claim = Some(claim(n));
            ledger::write(&n.app.kube, job, stored).await?;
            claimed = true;
        }
        let event = stored.ledger.events[i].clone();
        let links = if event.kind == outbox::EventKind::Succeeded {
            let (downloads, expire_at) = n.app.downloads(job).await?;
            let (samples, _) = n.app.sample_links(job).await?;
            outbox::Links {
                downloads,
                contact_sheet: samples
                    .into_iter()
                    .find(|(a, _)| a.kind == SampleKind::ContactSheet)
                    .map(|(_, url)| url),
                expire_at: Some(expire_at),
            }
        } else {
            outbox::Links::default()
        };
        let body = outbox::body(&event, &job.name_any(), &stored.ledger, &links);
        let status = n.post(url, secret, body).await;
        let now = now();
        let e = &mut stored.ledger.events[i];
        outbox::delivered(e, status, now, &n.policy);
        sent.push(e.clone());
        let outcome = match e.delivery {
            outbox::Delivery::Delivered => "delivered",
            outbox::Delivery::Abandoned => "abandoned",
            outbox::Delivery::Pending => "retry",
        };
        n.app
            .metrics
            .notifications
            .with_label_values(&[e.kind.as_str(), outcome])
            .inc();
        if e.delivery == outbox::Delivery::Delivered {
            n.app
                .metrics
                .notification_lag
                .observe((now - e.created).max(0) as f64);
        }
        let delivered = e.delivery != outbox::Delivery::Pending;
        if !delivered {
            break;
        }
        if outbox::next_delivery(&stored.ledger, now).is_none() {
            break;
        }
        record_sent(n, job, stored, &mut sent).await?;
    }
    if claimed {
        stored.ledger.claim = None;
        record_sent(n, job, stored, &mut sent).await?;
    }
    Ok(())
}

/// Writes the ledger after deliveries. The storefront has the events already: should someone
/// have written the ledger meanwhile (the webhook recording the payment, a refund), their
/// outcome is applied to the ledger as it is now rather than lost, which would send them
/// again.
async fn record_sent(
    n: &Notifier,
    job: &LoRATrainingJob,
    stored: &mut Stored,
    sent: &mut Vec<outbox::Event>,
) -> Result<(), NotifyError> {
    for _ in 0..5 {
        match ledger::write(&n.app.kube, job, stored).await {
            Err(LedgerError::Conflict) => {
                let claim = stored.ledger.claim.clone();
                *stored = ledger::read(
                    &n.app.kube,
                    &job.namespace().unwrap_or_default(),
                    &job.name_any(),
                )
                .await?;
                for done in sent.iter() {
                    if let Some(e) = stored.ledger.events.iter_mut().find(|e| e.id == done.id) {
                        *e = done.clone();
                    }
                }
                stored.ledger.claim = claim;
            }
            other => {
                sent.clear();
                return Ok(other?);
            }
        }
    }
    Err(LedgerError::Conflict.into())
}

fn error_policy(job: Arc<LoRATrainingJob>, err: &NotifyError, _n: Arc<Notifier>) -> Action {
    // Conflicts are someone else's write (another replica, the webhook, the operator): look
    // again at once.
    if matches!(
        err,
        NotifyError::Ledger(LedgerError::Conflict) | NotifyError::Stale
    ) {
        return Action::requeue(Duration::from_millis(200));
    }
    tracing::warn!(namespace = %job.namespace().unwrap_or_default(), job = %job.name_any(), error = %err, "notifier: will retry");
    Action::requeue(Duration::from_secs(5))
}
