//! What the API still owes the outside world once an order is a job, decided by pure functions:
//! the storefront's notifications (accepted, running, progress, succeeded, failed, cancelled,
//! refunded, erased) and the refund of a paid job that ends `Failed` or is cancelled by us.
//!
//! The state is one [`Ledger`] per job, kept in a Secret next to the job (it holds the payment
//! intent a refund needs; see `notifier` for the I/O). The rules:
//! - events are appended in the order the job lives them and delivered one at a time, oldest
//!   first, so a storefront sees them in order per job; a failed delivery is retried after an
//!   exponential backoff ([`retry_delay`]) until [`Policy::give_up_after`] has passed since the
//!   event was created (three days by default, as Stripe does), then it is *abandoned* and the
//!   next one goes;
//! - progress is reported at every [`Policy::progress_every`] per cent crossed, once per
//!   threshold, only the highest when several were crossed between two looks;
//! - a paid job that fails, or that is cancelled by anyone but the customer (a platform team's
//!   `spec.cancel`), is refunded once; a job the customer stopped, or whose payment was refunded
//!   or disputed at Stripe, is not. Refunds are retried with the same backoff and never given
//!   up on: money owed is alerted on, not forgotten;
//! - the job keeps the API's finalizer ([`FINALIZER`]) until its final events are delivered (or
//!   abandoned) and its refund is settled, so nothing owed is lost with the object.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use loraplane_crds::v1alpha1::{ErasureReason, Phase};

/// The API's finalizer on the jobs it owes something for.
pub const FINALIZER: &str = "loraplane.io/settlement";

/// Annotation the API sets, with `spec.cancel`, when the customer cancels: a job cancelled
/// without it was cancelled by the platform, and is refunded.
pub const ANNOTATION_CANCELLED_BY: &str = "loraplane.io/cancelled-by";
/// The value of [`ANNOTATION_CANCELLED_BY`] for a customer's cancel.
pub const CANCELLED_BY_CUSTOMER: &str = "customer";

/// What a notification says happened.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The order is a job.
    #[serde(rename = "job.accepted")]
    Accepted,
    /// Training started.
    #[serde(rename = "job.running")]
    Running,
    /// Training crossed a progress threshold.
    #[serde(rename = "job.progress")]
    Progress,
    /// The LoRA is ready (the notification carries its download links).
    #[serde(rename = "job.succeeded")]
    Succeeded,
    /// The job failed for good (with a reason code).
    #[serde(rename = "job.failed")]
    Failed,
    /// The job was cancelled.
    #[serde(rename = "job.cancelled")]
    Cancelled,
    /// The order's payment was refunded by us.
    #[serde(rename = "job.refunded")]
    Refunded,
    /// Every byte of the job was erased on request.
    #[serde(rename = "job.erased")]
    Erased,
}

impl EventKind {
    /// The event's `type`, as storefronts match on it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "job.accepted",
            EventKind::Running => "job.running",
            EventKind::Progress => "job.progress",
            EventKind::Succeeded => "job.succeeded",
            EventKind::Failed => "job.failed",
            EventKind::Cancelled => "job.cancelled",
            EventKind::Refunded => "job.refunded",
            EventKind::Erased => "job.erased",
        }
    }
}

/// Where one event's delivery stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Delivery {
    /// Not delivered yet (next try at `next_at`).
    Pending,
    /// The storefront answered 2xx.
    Delivered,
    /// Not delivered within [`Policy::give_up_after`].
    Abandoned,
}

/// One notification and its delivery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `evt_…`, stable: the storefront de-duplicates on it.
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// When it was recorded (Unix seconds).
    pub created: i64,
    /// The threshold crossed, for progress events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// The end reason code, for failed and cancelled events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Delivery state.
    pub delivery: Delivery,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// When the next attempt is due (Unix seconds).
    pub next_at: i64,
    /// The storefront's last HTTP status, if it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    /// When it was delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<i64>,
}

/// Why a job's payment goes back.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum JobRefundReason {
    /// The job failed for good (bad input, backoff exhausted, deadline).
    JobFailed,
    /// The job was cancelled by the platform, not by the customer.
    JobCancelled,
}

/// Where a job's refund stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RefundProgress {
    /// Not accepted by Stripe yet (next try at `next_at`).
    Pending,
    /// Stripe accepted it (or the payment had been refunded already).
    Succeeded,
}

/// A job's refund.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Refund {
    /// Why.
    pub reason: JobRefundReason,
    /// Where it stands.
    pub state: RefundProgress,
    /// Calls to Stripe so far.
    pub attempts: u32,
    /// When the next call is due (Unix seconds).
    pub next_at: i64,
    /// The last failure's code (`timeout`, `refused_500_unknown`, `unreachable`…), never a
    /// payment id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When Stripe accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<i64>,
}

impl Refund {
    /// A refund just found owed, due at `now`.
    pub fn owed(reason: JobRefundReason, now: i64) -> Refund {
        Refund {
            reason,
            state: RefundProgress::Pending,
            attempts: 0,
            next_at: now,
            last_error: None,
            settled_at: None,
        }
    }
}

impl Delivery {
    /// The name stored in the ledger and shown in the delivery log.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Pending => "pending",
            Delivery::Delivered => "delivered",
            Delivery::Abandoned => "abandoned",
        }
    }
}

impl JobRefundReason {
    /// The name stored in the ledger, shown to storefronts and recorded on the job.
    pub fn as_str(self) -> &'static str {
        match self {
            JobRefundReason::JobFailed => "jobFailed",
            JobRefundReason::JobCancelled => "jobCancelled",
        }
    }
}

impl RefundProgress {
    /// The name stored in the ledger and recorded on the job.
    pub fn as_str(self) -> &'static str {
        match self {
            RefundProgress::Pending => "pending",
            RefundProgress::Succeeded => "succeeded",
        }
    }
}

/// A replica's claim on a job's deliveries, so two replicas never send its events at once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    /// The replica.
    pub holder: String,
    /// When the claim lapses (Unix seconds), should the replica die mid-delivery.
    pub until: i64,
}

/// Everything the API keeps about a job's order after the job exists.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Ledger {
    /// The draft order id the storefront holds (`POST /v1/orders`), echoed in notifications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// The payment intent a refund names (paid orders only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_intent: Option<String>,
    /// The keyed hash of the order, from which the refund's idempotency key is derived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_hash: Option<String>,
    /// The refund, once one is owed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund: Option<Refund>,
    /// Notifications, oldest first.
    #[serde(default)]
    pub events: Vec<Event>,
    /// Which replica is delivering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
}

/// What the decision needs to know about the job.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobView {
    /// The job's uid (event ids derive from it).
    pub uid: String,
    /// Its phase.
    pub phase: Option<Phase>,
    /// Whether an attempt ever started running.
    pub started: bool,
    /// Training progress in per cent, if reported.
    pub percent: Option<u8>,
    /// The reason of the condition that ended it (`Failed` or `Cancelled`).
    pub end_reason: Option<String>,
    /// The customer cancelled it through the API ([`ANNOTATION_CANCELLED_BY`]).
    pub cancelled_by_customer: bool,
    /// The job is being deleted.
    pub deleting: bool,
    /// Being deleted, and the operator has finished purging its data.
    pub purged: bool,
    /// Why its erasure was requested, if it was.
    pub erasure: Option<ErasureReason>,
    /// The tenant has a notification endpoint.
    pub notify: bool,
}

/// Timings and thresholds (from the configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Progress is reported at every multiple of this many per cent (0: never).
    pub progress_every: u8,
    /// The first retry's delay in seconds; each next one doubles it.
    pub retry_base: i64,
    /// The longest delay between two tries in seconds.
    pub retry_max: i64,
    /// Seconds after which an undelivered event is abandoned.
    pub give_up_after: i64,
}

impl From<&crate::config::Notifications> for Policy {
    /// The policy a configuration's `notifications` section sets.
    fn from(n: &crate::config::Notifications) -> Policy {
        let secs = |s: u64| i64::try_from(s).unwrap_or(i64::MAX);
        Policy {
            progress_every: n.progress_every_percent,
            retry_base: secs(n.retry_base_seconds),
            retry_max: secs(n.retry_max_seconds),
            give_up_after: secs(n.give_up_after_seconds),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            progress_every: 25,
            retry_base: 30,
            retry_max: 3600,
            give_up_after: 3 * 86_400,
        }
    }
}

/// What to do for a job now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// Events to append to the ledger, in order.
    pub append: Vec<Event>,
    /// A refund to start.
    pub refund: Option<JobRefundReason>,
    /// The ledger owes nothing more: the finalizer may go.
    pub release: bool,
}

/// A stable event id: the same job, position and kind always give the same id, so an event
/// recorded twice (a lost write retried) is the same event to the storefront.
pub fn event_id(uid: &str, seq: usize, kind: EventKind) -> String {
    let digest = Sha256::digest(format!("{uid}/{seq}/{}", kind.as_str()).as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("evt_{hex}")
}

/// The delay before try number `attempts + 1`, after `attempts` failures.
pub fn retry_delay(attempts: u32, policy: &Policy) -> i64 {
    let doublings = attempts.saturating_sub(1).min(30);
    policy
        .retry_base
        .saturating_mul(1_i64 << doublings)
        .min(policy.retry_max)
        .max(1)
}

fn has(ledger: &Ledger, kind: EventKind) -> bool {
    ledger.events.iter().any(|e| e.kind == kind)
}

/// The refund a job's end owes, if any.
pub fn refund_owed(view: &JobView, ledger: &Ledger) -> Option<JobRefundReason> {
    if ledger.payment_intent.is_none() || ledger.refund.is_some() || view.cancelled_by_customer {
        return None;
    }
    // Money that went back at Stripe (refund, dispute) is not sent back twice; an erasure the
    // customer asked for is their choice.
    if view.erasure.is_some() {
        return None;
    }
    match view.phase {
        Some(Phase::Failed) => Some(JobRefundReason::JobFailed),
        Some(Phase::Cancelled) => Some(JobRefundReason::JobCancelled),
        _ => None,
    }
}

/// Decides what a job's ledger needs at `now`.
pub fn decide(view: &JobView, ledger: &Ledger, now: i64, policy: &Policy) -> Decision {
    let mut d = Decision {
        refund: refund_owed(view, ledger),
        ..Decision::default()
    };
    if view.notify {
        let mut next = |kind: EventKind, percent: Option<u8>, reason: Option<String>| {
            let seq = ledger.events.len() + d.append.len();
            d.append.push(Event {
                id: event_id(&view.uid, seq, kind),
                kind,
                created: now,
                percent,
                reason,
                delivery: Delivery::Pending,
                attempts: 0,
                next_at: now,
                last_status: None,
                delivered_at: None,
            });
        };
        if !has(ledger, EventKind::Accepted) {
            next(EventKind::Accepted, None, None);
        }
        if view.started && !has(ledger, EventKind::Running) {
            next(EventKind::Running, None, None);
        }
        let ended = view.phase.is_some_and(Phase::is_terminal);
        if let Some(p) = view.percent.filter(|_| !ended && policy.progress_every > 0) {
            let reached = p / policy.progress_every * policy.progress_every;
            let reported = ledger
                .events
                .iter()
                .filter_map(|e| e.percent)
                .max()
                .unwrap_or(0);
            if reached > reported && reached < 100 {
                next(EventKind::Progress, Some(reached), None);
            }
        }
        let end = match view.phase {
            Some(Phase::Succeeded) => Some(EventKind::Succeeded),
            Some(Phase::Failed) => Some(EventKind::Failed),
            Some(Phase::Cancelled) => Some(EventKind::Cancelled),
            _ => None,
        };
        if let Some(kind) = end.filter(|k| !has(ledger, *k)) {
            let reason = (kind != EventKind::Succeeded)
                .then(|| view.end_reason.clone())
                .flatten();
            next(kind, None, reason);
        }
        let refunded = ledger
            .refund
            .as_ref()
            .is_some_and(|r| r.state == RefundProgress::Succeeded);
        if refunded && !has(ledger, EventKind::Refunded) {
            next(EventKind::Refunded, None, None);
        }
        if view.purged && view.erasure.is_some() && !has(ledger, EventKind::Erased) {
            next(EventKind::Erased, None, None);
        }
    }
    let refund_settled = d.refund.is_none()
        && ledger
            .refund
            .as_ref()
            .is_none_or(|r| r.state == RefundProgress::Succeeded);
    let delivered = d.append.is_empty()
        && ledger
            .events
            .iter()
            .all(|e| e.delivery != Delivery::Pending);
    d.release = view.purged && refund_settled && delivered;
    d
}

/// The next event to send and whether it is due: the oldest pending one (later ones wait
/// behind it, which is what keeps them in order).
pub fn next_delivery(ledger: &Ledger, now: i64) -> Option<(usize, bool)> {
    let i = ledger
        .events
        .iter()
        .position(|e| e.delivery == Delivery::Pending)?;
    Some((i, ledger.events[i].next_at <= now))
}

/// Records one delivery attempt's outcome on the event (`status` is the storefront's HTTP
/// status, `None` when it did not answer).
pub fn delivered(event: &mut Event, status: Option<u16>, now: i64, policy: &Policy) {
    event.attempts += 1;
    event.last_status = status;
    if status.is_some_and(|s| (200..300).contains(&s)) {
        event.delivery = Delivery::Delivered;
        event.delivered_at = Some(now);
    } else if now - event.created >= policy.give_up_after {
        event.delivery = Delivery::Abandoned;
    } else {
        event.next_at = now + retry_delay(event.attempts, policy);
    }
}

/// Records one refund call's outcome (`error` is a failure's code).
pub fn refund_tried(refund: &mut Refund, error: Option<String>, now: i64, policy: &Policy) {
    refund.attempts += 1;
    match error {
        None => {
            refund.state = RefundProgress::Succeeded;
            refund.settled_at = Some(now);
            refund.last_error = None;
        }
        Some(code) => {
            refund.last_error = Some(code);
            refund.next_at = now + retry_delay(refund.attempts, policy);
        }
    }
}

/// When the ledger next needs a look (the earliest pending retry), if ever.
pub fn wake_at(ledger: &Ledger) -> Option<i64> {
    let event = ledger
        .events
        .iter()
        .find(|e| e.delivery == Delivery::Pending)
        .map(|e| e.next_at);
    let refund = ledger
        .refund
        .as_ref()
        .filter(|r| r.state == RefundProgress::Pending)
        .map(|r| r.next_at);
    event.into_iter().chain(refund).min()
}

/// Whether `ledger`'s claim lets `holder` deliver at `now`.
pub fn may_deliver(ledger: &Ledger, holder: &str, now: i64) -> bool {
    ledger
        .claim
        .as_ref()
        .is_none_or(|c| c.holder == holder || c.until <= now)
}

/// A LoRA file's download link, carried by a `job.succeeded` notification.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Download {
    /// `kohya` or `diffusers`.
    pub format: String,
    /// Presigned GET URL.
    pub url: String,
    /// SHA-256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: i64,
}

/// What a storefront receives at its notification endpoint, shaped as a Stripe event (`id`,
/// `object`, `type`, `created`, `data.object`) so that its webhook code reads ours too; signed
/// in the `Loraplane-Signature` header as Stripe signs `Stripe-Signature`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct Notification {
    /// `evt_…`, the same on every delivery of the event: de-duplicate on it.
    pub id: String,
    /// Always `event`.
    pub object: String,
    /// `job.accepted`, `job.running`, `job.progress`, `job.succeeded`, `job.failed`,
    /// `job.cancelled`, `job.refunded` or `job.erased`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the event happened (Unix seconds).
    pub created: i64,
    /// The job.
    pub data: NotificationData,
}

/// The `data` of a [`Notification`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct NotificationData {
    /// The job the event is about.
    pub object: NotifiedJob,
}

/// The job in a [`Notification`]: its id and the storefront's own order id, never customer
/// text.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct NotifiedJob {
    /// Always `job`.
    pub object: String,
    /// The job id (`GET /v1/jobs/{id}`).
    pub id: String,
    /// The draft order id the storefront put in the checkout's metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// `job.progress`: the threshold crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// `job.failed`, `job.cancelled`: the end reason code (`BackoffLimitExceeded`,
    /// `DeadlineExceeded`, `BadInput`, `CancelRequested`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `job.refunded`: `jobFailed` or `jobCancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_reason: Option<String>,
    /// `job.succeeded`: presigned links to the LoRA files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloads: Option<Vec<Download>>,
    /// `job.succeeded`: when the links stop working (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloads_expire_at: Option<i64>,
    /// `job.succeeded`: a presigned link to the contact sheet of the sample images rendered
    /// while training (the base model's, then each sampled step's), when the job rendered
    /// any; every image is at `GET /v1/jobs/{id}/samples`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_sheet: Option<String>,
}

/// The presigned links a `job.succeeded` notification carries, made fresh at each attempt.
#[derive(Debug, Clone, Default)]
pub struct Links {
    /// The LoRA files.
    pub downloads: Vec<Download>,
    /// The samples' contact sheet, when the job rendered any.
    pub contact_sheet: Option<String>,
    /// When the links stop working (Unix seconds).
    pub expire_at: Option<i64>,
}

/// The notification a storefront receives for `event`. Built at each attempt, so the download
/// links in it are fresh.
pub fn notification(event: &Event, job_name: &str, ledger: &Ledger, links: &Links) -> Notification {
    let succeeded = event.kind == EventKind::Succeeded;
    let refund_reason = ledger
        .refund
        .as_ref()
        .filter(|_| event.kind == EventKind::Refunded)
        .map(|r| r.reason.as_str().to_string());
    Notification {
        id: event.id.clone(),
        object: "event".into(),
        kind: event.kind.as_str().into(),
        created: event.created,
        data: NotificationData {
            object: NotifiedJob {
                object: "job".into(),
                id: job_name.to_string(),
                order_id: ledger.order_id.clone(),
                percent: event.percent,
                reason: event.reason.clone(),
                refund_reason,
                downloads: succeeded.then(|| links.downloads.clone()),
                downloads_expire_at: links.expire_at.filter(|_| succeeded),
                contact_sheet: links.contact_sheet.clone().filter(|_| succeeded),
            },
        },
    }
}

/// The bytes of [`notification`], as sent and signed.
pub fn body(event: &Event, job_name: &str, ledger: &Ledger, links: &Links) -> Vec<u8> {
    let n = notification(event, job_name, ledger, links);
    serde_json::to_vec(&n).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(phase: Phase) -> JobView {
        JobView {
            uid: "u1".into(),
            phase: Some(phase),
            notify: true,
            ..JobView::default()
        }
    }

    fn kinds(d: &Decision) -> Vec<EventKind> {
        d.append.iter().map(|e| e.kind).collect()
    }

    fn apply(ledger: &mut Ledger, d: &Decision) {
        ledger.events.extend(d.append.iter().cloned());
    }

    fn pending_refund() -> Refund {
        Refund::owed(JobRefundReason::JobFailed, 1)
    }

    fn paid() -> Ledger {
        Ledger {
            payment_intent: Some("pi_1".into()),
            order_hash: Some("h".into()),
            ..Ledger::default()
        }
    }

    #[test]
    fn a_job_is_told_in_order_once_each_and_only_the_highest_progress_crossed() {
        let p = Policy::default();
        let mut ledger = Ledger::default();
        let d = decide(&view(Phase::Pending), &ledger, 10, &p);
        assert_eq!(kinds(&d), [EventKind::Accepted]);
        apply(&mut ledger, &d);
        assert!(
            decide(&view(Phase::Pending), &ledger, 11, &p)
                .append
                .is_empty()
        );

        let mut running = view(Phase::Running);
        running.started = true;
        running.percent = Some(60);
        let d = decide(&running, &ledger, 12, &p);
        assert_eq!(kinds(&d), [EventKind::Running, EventKind::Progress]);
        assert_eq!(d.append[1].percent, Some(50));
        apply(&mut ledger, &d);
        running.percent = Some(74);
        assert!(decide(&running, &ledger, 13, &p).append.is_empty());
        running.percent = Some(99);
        assert_eq!(
            decide(&running, &ledger, 14, &p).append[0].percent,
            Some(75)
        );

        let mut done = view(Phase::Succeeded);
        done.started = true;
        done.percent = Some(100);
        let d = decide(&done, &ledger, 15, &p);
        assert_eq!(kinds(&d), [EventKind::Succeeded]);
        assert_eq!(d.append[0].reason, None);
        let ids: Vec<_> = ledger
            .events
            .iter()
            .chain(&d.append)
            .map(|e| &e.id)
            .collect();
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(ids.len(), unique.len());
    }

    #[test]
    fn a_tenant_without_an_endpoint_is_sent_nothing() {
        let mut v = view(Phase::Succeeded);
        v.notify = false;
        assert!(
            decide(&v, &Ledger::default(), 1, &Policy::default())
                .append
                .is_empty()
        );
    }

    #[test]
    fn a_paid_job_that_fails_or_that_we_cancel_is_refunded_once() {
        let p = Policy::default();
        let mut failed = view(Phase::Failed);
        failed.end_reason = Some("BackoffLimitExceeded".into());
        let d = decide(&failed, &paid(), 1, &p);
        assert_eq!(d.refund, Some(JobRefundReason::JobFailed));
        assert_eq!(d.append[1].reason.as_deref(), Some("BackoffLimitExceeded"));
        assert_eq!(
            decide(&view(Phase::Cancelled), &paid(), 1, &p).refund,
            Some(JobRefundReason::JobCancelled)
        );
        // Once recorded, never again.
        let mut ledger = paid();
        ledger.refund = Some(pending_refund());
        assert_eq!(decide(&failed, &ledger, 2, &p).refund, None);
    }

    #[test]
    fn no_refund_when_the_customer_stopped_it_the_money_went_back_or_it_succeeded() {
        let p = Policy::default();
        let mut stopped = view(Phase::Cancelled);
        stopped.cancelled_by_customer = true;
        assert_eq!(decide(&stopped, &paid(), 1, &p).refund, None);
        let mut revoked = view(Phase::Cancelled);
        revoked.erasure = Some(ErasureReason::Dispute);
        assert_eq!(decide(&revoked, &paid(), 1, &p).refund, None);
        assert_eq!(decide(&view(Phase::Succeeded), &paid(), 1, &p).refund, None);
        // Unpaid (tenant API) jobs are never refunded.
        assert_eq!(
            decide(&view(Phase::Failed), &Ledger::default(), 1, &p).refund,
            None
        );
    }

    #[test]
    fn the_finalizer_waits_for_delivery_and_the_refund() {
        let p = Policy::default();
        let mut v = view(Phase::Failed);
        v.deleting = true;
        v.purged = true;
        v.erasure = Some(ErasureReason::CustomerRequest);
        let mut ledger = paid();
        let d = decide(&v, &ledger, 1, &p);
        assert!(!d.release);
        assert_eq!(
            kinds(&d),
            [EventKind::Accepted, EventKind::Failed, EventKind::Erased]
        );
        apply(&mut ledger, &d);
        assert!(!decide(&v, &ledger, 2, &p).release);
        for e in &mut ledger.events {
            delivered(e, Some(204), 3, &p);
        }
        assert!(decide(&v, &ledger, 4, &p).release);
        // Not before the operator has purged the data.
        v.purged = false;
        assert!(!decide(&v, &ledger, 4, &p).release);
    }

    #[test]
    fn an_unsettled_refund_holds_the_finalizer_until_stripe_accepts_it() {
        let p = Policy::default();
        let mut v = view(Phase::Failed);
        v.notify = false;
        v.deleting = true;
        v.purged = true;
        let mut ledger = paid();
        assert!(!decide(&v, &ledger, 1, &p).release);
        let mut r = pending_refund();
        refund_tried(&mut r, Some("timeout".into()), 1, &p);
        ledger.refund = Some(r.clone());
        assert!(!decide(&v, &ledger, 2, &p).release);
        assert_eq!(wake_at(&ledger), Some(1 + p.retry_base));
        refund_tried(&mut r, None, 40, &p);
        ledger.refund = Some(r);
        assert!(decide(&v, &ledger, 41, &p).release);
        assert_eq!(wake_at(&ledger), None);
    }

    #[test]
    fn deliveries_back_off_exponentially_and_are_abandoned_after_the_limit() {
        let p = Policy {
            retry_base: 10,
            retry_max: 100,
            give_up_after: 1000,
            ..Policy::default()
        };
        assert_eq!(
            (1..=6).map(|a| retry_delay(a, &p)).collect::<Vec<_>>(),
            [10, 20, 40, 80, 100, 100]
        );
        assert_eq!(retry_delay(u32::MAX, &p), 100);
        let mut ledger = Ledger::default();
        let d = decide(&view(Phase::Succeeded), &ledger, 0, &p);
        apply(&mut ledger, &d);
        assert_eq!(next_delivery(&ledger, 0), Some((0, true)));
        delivered(&mut ledger.events[0], Some(503), 0, &p);
        assert_eq!(ledger.events[0].delivery, Delivery::Pending);
        // The second event waits behind the first.
        assert_eq!(next_delivery(&ledger, 5), Some((0, false)));
        delivered(&mut ledger.events[0], None, 1000, &p);
        assert_eq!(ledger.events[0].delivery, Delivery::Abandoned);
        assert_eq!(next_delivery(&ledger, 1000), Some((1, true)));
        delivered(&mut ledger.events[1], Some(200), 1000, &p);
        assert_eq!(ledger.events[1].delivery, Delivery::Delivered);
        assert_eq!(next_delivery(&ledger, 1000), None);
    }

    #[test]
    fn a_claim_keeps_other_replicas_out_until_it_lapses() {
        let mut ledger = Ledger::default();
        assert!(may_deliver(&ledger, "a", 0));
        ledger.claim = Some(Claim {
            holder: "a".into(),
            until: 10,
        });
        assert!(may_deliver(&ledger, "a", 5));
        assert!(!may_deliver(&ledger, "b", 5));
        assert!(may_deliver(&ledger, "b", 10));
    }

    #[test]
    fn a_notification_is_a_stripe_shaped_event_with_links_only_on_success() {
        let mut ledger = paid();
        ledger.order_id = Some("ord_x".into());
        let d = decide(&view(Phase::Succeeded), &ledger, 7, &Policy::default());
        let links = Links {
            downloads: vec![Download {
                format: "kohya".into(),
                url: "http://s3/x?sig".into(),
                sha256: "ab".into(),
                bytes: 3,
            }],
            contact_sheet: Some("http://s3/sheet?sig".into()),
            expire_at: Some(9),
        };
        let accepted: serde_json::Value =
            serde_json::from_slice(&body(&d.append[0], "job-1", &ledger, &links)).unwrap();
        assert_eq!(accepted["object"], "event");
        assert_eq!(accepted["type"], "job.accepted");
        assert_eq!(accepted["id"], d.append[0].id);
        assert_eq!(accepted["data"]["object"]["order_id"], "ord_x");
        assert!(accepted["data"]["object"].get("downloads").is_none());
        assert!(accepted["data"]["object"].get("contact_sheet").is_none());
        assert!(!accepted.to_string().contains("pi_1"));
        let done: serde_json::Value =
            serde_json::from_slice(&body(&d.append[1], "job-1", &ledger, &links)).unwrap();
        assert_eq!(done["type"], "job.succeeded");
        assert_eq!(
            done["data"]["object"]["downloads"][0]["url"],
            "http://s3/x?sig"
        );
        assert_eq!(done["data"]["object"]["downloads_expire_at"], 9);
        assert_eq!(
            done["data"]["object"]["contact_sheet"],
            "http://s3/sheet?sig"
        );
    }

    #[test]
    fn stored_names_are_the_names_shown() {
        for d in [Delivery::Pending, Delivery::Delivered, Delivery::Abandoned] {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
        for r in [JobRefundReason::JobFailed, JobRefundReason::JobCancelled] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        for p in [RefundProgress::Pending, RefundProgress::Succeeded] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
    }

    #[test]
    fn the_ledger_is_stored_as_camel_case_json_with_event_types() {
        let mut ledger = paid();
        let d = decide(&view(Phase::Pending), &ledger, 7, &Policy::default());
        apply(&mut ledger, &d);
        let json = serde_json::to_value(&ledger).unwrap();
        assert_eq!(json["paymentIntent"], "pi_1");
        assert_eq!(json["events"][0]["type"], "job.accepted");
        assert_eq!(json["events"][0]["delivery"], "pending");
        let back: Ledger = serde_json::from_value(json).unwrap();
        assert_eq!(back, ledger);
    }
}
