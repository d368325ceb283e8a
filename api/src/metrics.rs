//! Prometheus metrics of the API: requests by route and status, webhook events by type and
//! outcome, retention deletions, GC lag and bytes erased. Labels carry only route templates,
//! event types and outcomes: never ids.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
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
    /// Retention deletions by what was deleted (`inputs`, `outputs`, `erasure`).
    pub retention_deletions: IntCounterVec,
    /// Seconds between a deletion's due time and the deletion.
    pub gc_lag: Histogram,
    /// Bytes deleted from S3 by retention and erasure.
    pub bytes_erased: IntCounter,
    /// Dataset checks by how they were answered: `marker` (an earlier validation of the same
    /// bytes) or `download` (fetched and inflated).
    pub dataset_checks: IntCounterVec,
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
        let retention_deletions = IntCounterVec::new(
            Opts::new(
                "loraplane_api_retention_deletions_total",
                "Retention and erasure deletions by what was deleted",
            ),
            &["what"],
        )?;
        let gc_lag = Histogram::with_opts(
            HistogramOpts::new(
                "loraplane_api_gc_lag_seconds",
                "Seconds between a retention due time and the deletion",
            )
            .buckets(vec![
                0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
            ]),
        )?;
        let bytes_erased = IntCounter::new(
            "loraplane_api_bytes_erased_total",
            "Bytes deleted from S3 by retention and erasure",
        )?;
        let dataset_checks = IntCounterVec::new(
            Opts::new(
                "loraplane_api_dataset_checks_total",
                "Dataset validations by how they were answered (receipt, marker or download)",
            ),
            &["how"],
        )?;
        registry.register(Box::new(dataset_checks.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(webhook_events.clone()))?;
        registry.register(Box::new(retention_deletions.clone()))?;
        registry.register(Box::new(gc_lag.clone()))?;
        registry.register(Box::new(bytes_erased.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            webhook_events,
            retention_deletions,
            gc_lag,
            bytes_erased,
            dataset_checks,
        })
    }

    /// Records one retention deletion of `what` (`inputs`, `outputs`) done `lag_secs` after
    /// it was due.
    pub fn record_retention_deletion(&self, what: &str, lag_secs: f64) {
        self.retention_deletions.with_label_values(&[what]).inc();
        self.gc_lag.observe(lag_secs);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
