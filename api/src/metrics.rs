//! Prometheus metrics of the API: requests by route and status, webhook events by type and
//! outcome, erasure requests and dataset checks (deletions are the operator's, and so are
//! their metrics). Labels carry only route templates,
//! event types and outcomes: never ids.

use crate::outbox::EventKind;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// The API's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by route template, method and status.
    pub requests: IntCounterVec,
    /// Request latency by route template.
    pub request_duration: HistogramVec,
    /// Webhook events by type and outcome.
    pub webhook_events: IntCounterVec,
    /// Erasure requests written on jobs, by reason.
    pub erasure_requests: IntCounterVec,
    /// Dataset checks by how they were answered: `receipt` (a verified receipt, no request),
    /// `marker` (an earlier validation of the same bytes) or `download` (fetched and inflated).
    pub dataset_checks: IntCounterVec,
    /// Refund calls for jobs that ended badly, by reason and outcome.
    pub refunds: IntCounterVec,
    /// Notification delivery attempts by event type and outcome (delivered, retry, abandoned).
    pub notifications: IntCounterVec,
    /// Seconds from an event being recorded to its delivery.
    pub notification_lag: Histogram,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "loraplane_api_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "method", "status"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "loraplane_api_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            &["route"],
        )?;
        let webhook_events = IntCounterVec::new(
            Opts::new(
                "loraplane_api_webhook_events_total",
                "Stripe webhook events by type and outcome",
            ),
            &["type", "outcome"],
        )?;
        let erasure_requests = IntCounterVec::new(
            Opts::new(
                "loraplane_api_erasure_requests_total",
                "Erasure requests written on jobs, by reason (customerRequest, refund, dispute)",
            ),
            &["reason"],
        )?;
        let dataset_checks = IntCounterVec::new(
            Opts::new(
                "loraplane_api_dataset_checks_total",
                "Dataset validations by how they were answered (receipt, marker or download)",
            ),
            &["how"],
        )?;
        let refunds = IntCounterVec::new(
            Opts::new(
                "loraplane_api_job_refunds_total",
                "Refund calls to Stripe for paid jobs that failed or were cancelled by the platform",
            ),
            &["reason", "outcome"],
        )?;
        let notifications = IntCounterVec::new(
            Opts::new(
                "loraplane_api_notifications_total",
                "Storefront notification delivery attempts by event type and outcome",
            ),
            &["type", "outcome"],
        )?;
        let notification_lag = Histogram::with_opts(
            HistogramOpts::new(
                "loraplane_api_notification_lag_seconds",
                "Seconds from a job event being recorded to its delivery",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 30.0, 120.0, 600.0, 3600.0, 21600.0, 86400.0,
            ]),
        )?;
        // Every series exists from the start (at zero), so alerts on `increase` see the
        // first failure and dashboards show a flat line rather than nothing.
        for reason in ["job_failed", "job_cancelled"] {
            for outcome in ["succeeded", "failed"] {
                refunds.with_label_values(&[reason, outcome]);
            }
        }
        for kind in [
            EventKind::Accepted,
            EventKind::Running,
            EventKind::Progress,
            EventKind::Succeeded,
            EventKind::Failed,
            EventKind::Cancelled,
            EventKind::Refunded,
            EventKind::Erased,
        ] {
            for outcome in ["delivered", "retry", "abandoned"] {
                notifications.with_label_values(&[kind.as_str(), outcome]);
            }
        }
        registry.register(Box::new(refunds.clone()))?;
        registry.register(Box::new(notifications.clone()))?;
        registry.register(Box::new(notification_lag.clone()))?;
        registry.register(Box::new(dataset_checks.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(webhook_events.clone()))?;
        registry.register(Box::new(erasure_requests.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            webhook_events,
            erasure_requests,
            dataset_checks,
            refunds,
            notifications,
            notification_lag,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
