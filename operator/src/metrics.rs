//! Prometheus metrics of the operator, all named `loraplane_…`, in a registry of their own (so
//! tests can run several operators in one process).
//!
//! Jobs by phase is a collector over the controller's cache rather than a gauge kept by hand:
//! it is always exactly what the cluster holds, including after a restart.

use std::sync::{Arc, Mutex};

use kube::runtime::reflector::Store;
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::v1alpha1::Phase;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::lifecycle;
use crate::status::Signal;

/// Why metrics could not be set up or rendered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered.
    #[error("could not register metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconcile duration.
    pub reconcile_duration: HistogramVec,
    /// Reconcile errors by reason.
    pub reconcile_errors: IntCounterVec,
    /// Seconds from job creation to its first Running.
    pub creation_to_running: Histogram,
    /// Seconds from job creation to its first pod.
    pub creation_to_pod: Histogram,
    /// Failovers by from/to region and reason.
    pub failovers: IntCounterVec,
    /// Preemptions and node losses by region and pool.
    pub preemptions: IntCounterVec,
    /// GPU-seconds used by region and pool.
    pub gpu_seconds: CounterVec,
    /// 1 while this replica holds the leader Lease (the "operator not leading" alert sums it).
    pub leader: IntGauge,
    /// Deletions of a job's inputs, and of whole jobs, by what and why.
    pub deletions: IntCounterVec,
    /// Bytes deleted from S3 by retention and erasure.
    pub deleted_bytes: IntCounter,
    /// Seconds from a deletion's due time (or erasure request) to its completion.
    pub deletion_lag: HistogramVec,
    jobs: Arc<Mutex<Option<Store<LoRATrainingJob>>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Overdue deletions at scrape time, from the job cache: the oldest overdue item's age and the
/// number of jobs with something overdue, by what (`inputs`, `outputs`, `erasure`). A job whose
/// cleanup stalls stays here, and ages, until it is gone.
struct Overdue {
    oldest: IntGaugeVec,
    count: IntGaugeVec,
    jobs: Arc<Mutex<Option<Store<LoRATrainingJob>>>>,
}

impl Collector for Overdue {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.oldest.desc();
        d.extend(self.count.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        for what in ["inputs", "outputs", "erasure"] {
            self.oldest.with_label_values(&[what]).set(0);
            self.count.with_label_values(&[what]).set(0);
        }
        if let Ok(guard) = self.jobs.lock()
            && let Some(store) = guard.as_ref()
        {
            let now = lifecycle::now_secs();
            for job in store.state() {
                for o in lifecycle::overdue(&lifecycle::Facts::of(&job), now) {
                    let oldest = self.oldest.with_label_values(&[o.what]);
                    oldest.set(oldest.get().max(o.seconds));
                    self.count.with_label_values(&[o.what]).inc();
                }
            }
        }
        let mut out = self.oldest.collect();
        out.extend(self.count.collect());
        out
    }
}

/// Counts cached jobs by phase at scrape time.
struct JobsByPhase {
    gauge: IntGaugeVec,
    jobs: Arc<Mutex<Option<Store<LoRATrainingJob>>>>,
}

impl Collector for JobsByPhase {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauge.reset();
        let phases = [
            Phase::Pending,
            Phase::Scheduling,
            Phase::Running,
            Phase::Succeeded,
            Phase::Failed,
            Phase::Cancelled,
        ];
        for p in phases {
            self.gauge.with_label_values(&[p.as_str()]).set(0);
        }
        if let Ok(guard) = self.jobs.lock()
            && let Some(store) = guard.as_ref()
        {
            for job in store.state() {
                let phase = job
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .unwrap_or(Phase::Pending);
                self.gauge.with_label_values(&[phase.as_str()]).inc();
            }
        }
        self.gauge.collect()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let latency_buckets = vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "loraplane_reconcile_duration_seconds",
                "Time spent in one reconcile of a LoRATrainingJob.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            &["outcome"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "loraplane_reconcile_errors_total",
                "Failed reconciles, by the step that failed.",
            ),
            &["reason"],
        )?;
        let creation_to_running = Histogram::with_opts(
            HistogramOpts::new(
                "loraplane_job_creation_to_running_seconds",
                "Seconds from a job's creation to its trainer first running.",
            )
            .buckets(latency_buckets.clone()),
        )?;
        let creation_to_pod = Histogram::with_opts(
            HistogramOpts::new(
                "loraplane_job_creation_to_pod_seconds",
                "Seconds from a job's creation to its first pod being created.",
            )
            .buckets(latency_buckets),
        )?;
        let failovers = IntCounterVec::new(
            Opts::new(
                "loraplane_failovers_total",
                "Jobs moved to a new placement, by region left, region entered and reason.",
            ),
            &["from_region", "to_region", "reason"],
        )?;
        let preemptions = IntCounterVec::new(
            Opts::new(
                "loraplane_preemptions_total",
                "Training pods lost to spot preemption, eviction or node loss.",
            ),
            &["region", "pool"],
        )?;
        let gpu_seconds = CounterVec::new(
            Opts::new(
                "loraplane_gpu_seconds_total",
                "GPU-seconds held by finished attempts, by region and pool.",
            ),
            &["region", "pool"],
        )?;
        let leader = IntGauge::new(
            "loraplane_operator_leader",
            "1 while this replica holds the leader Lease, else 0.",
        )?;
        let deletions = IntCounterVec::new(
            Opts::new(
                "loraplane_retention_deletions_total",
                "Deletions of a job's inputs (what=inputs), of whole jobs with all their data \
                 (what=job), of a corpus copy (what=corpus, reason=withdrawal) and of uploads \
                 no order consumed (what=upload, reason=unordered; one per object), by \
                 reason (retention, customerRequest, refund, dispute, deleted).",
            ),
            &["what", "reason"],
        )?;
        let deleted_bytes = IntCounter::new(
            "loraplane_retention_deleted_bytes_total",
            "Bytes deleted from S3 by retention and erasure.",
        )?;
        let deletion_lag = HistogramVec::new(
            HistogramOpts::new(
                "loraplane_retention_lag_seconds",
                "Seconds from a deletion's due time (or the erasure request) to its completion.",
            )
            .buckets(vec![
                0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            ]),
            &["what"],
        )?;
        let jobs = Arc::new(Mutex::new(None));
        let overdue = Overdue {
            oldest: IntGaugeVec::new(
                Opts::new(
                    "loraplane_retention_overdue_seconds",
                    "Age of the oldest overdue deletion, by what (inputs, outputs, erasure).",
                ),
                &["what"],
            )?,
            count: IntGaugeVec::new(
                Opts::new(
                    "loraplane_retention_overdue_jobs",
                    "Jobs with an overdue deletion, by what (inputs, outputs, erasure).",
                ),
                &["what"],
            )?,
            jobs: jobs.clone(),
        };
        let by_phase = JobsByPhase {
            gauge: IntGaugeVec::new(
                Opts::new("loraplane_jobs", "LoRATrainingJobs by phase."),
                &["phase"],
            )?,
            jobs: jobs.clone(),
        };
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(creation_to_running.clone()))?;
        registry.register(Box::new(creation_to_pod.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(preemptions.clone()))?;
        registry.register(Box::new(gpu_seconds.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(by_phase))?;
        registry.register(Box::new(deletions.clone()))?;
        registry.register(Box::new(deleted_bytes.clone()))?;
        registry.register(Box::new(deletion_lag.clone()))?;
        registry.register(Box::new(overdue))?;
        Ok(Metrics {
            registry,
            reconcile_duration,
            reconcile_errors,
            creation_to_running,
            creation_to_pod,
            failovers,
            preemptions,
            gpu_seconds,
            leader,
            deletions,
            deleted_bytes,
            deletion_lag,
            jobs,
        })
    }

    /// Records one deletion of `what` (`inputs`, `job`, `corpus`, `upload`) for `reason`, `lag` seconds after it
    /// fell due.
    pub fn record_deletion(&self, what: &str, reason: &str, bytes: u64, lag: f64) {
        self.deletions.with_label_values(&[what, reason]).inc();
        self.deleted_bytes.inc_by(bytes);
        self.deletion_lag
            .with_label_values(&[what])
            .observe(lag.max(0.0));
    }

    /// Lets the jobs-by-phase gauge read the controller's cache.
    pub fn watch_jobs(&self, store: Store<LoRATrainingJob>) {
        if let Ok(mut guard) = self.jobs.lock() {
            *guard = Some(store);
        }
    }

    /// Records the facts of a written status.
    pub fn record(&self, signals: &[Signal]) {
        for s in signals {
            match s {
                Signal::FirstRunning(secs) => self.creation_to_running.observe(*secs),
                Signal::Failover { from, to, reason } => {
                    self.failovers.with_label_values(&[from, to, reason]).inc();
                }
                Signal::Preempted { region, pool } => {
                    self.preemptions.with_label_values(&[region, pool]).inc();
                }
                Signal::GpuSeconds {
                    region,
                    pool,
                    seconds,
                } => self
                    .gpu_seconds
                    .with_label_values(&[region, pool])
                    .inc_by(seconds.max(0.0)),
            }
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_show_up_under_loraplane_names() {
        let m = Metrics::new().unwrap();
        m.record(&[
            Signal::Failover {
                from: "eu-west".into(),
                to: "eu-north".into(),
                reason: "Preempted".into(),
            },
            Signal::Preempted {
                region: "eu-west".into(),
                pool: "spot".into(),
            },
            Signal::GpuSeconds {
                region: "eu-west".into(),
                pool: "spot".into(),
                seconds: 12.5,
            },
            Signal::FirstRunning(1.5),
        ]);
        m.reconcile_errors.with_label_values(&["CreatePod"]).inc();
        let text = m.render();
        for needle in [
            r#"loraplane_failovers_total{from_region="eu-west",reason="Preempted",to_region="eu-north"} 1"#,
            r#"loraplane_preemptions_total{pool="spot",region="eu-west"} 1"#,
            r#"loraplane_gpu_seconds_total{pool="spot",region="eu-west"} 12.5"#,
            "loraplane_job_creation_to_running_seconds_count 1",
            r#"loraplane_reconcile_errors_total{reason="CreatePod"} 1"#,
            r#"loraplane_jobs{phase="Running"} 0"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
