//! The life of a job's data after training, the pure part: when its inputs and outputs fall
//! due, what an ended job still needs doing, why a job's data is being deleted, and how late
//! any of it is. Times are Unix seconds. `cleanup` does the I/O; the controller calls both.
//!
//! The rules, in the order a job meets them:
//! - once the job has ended (and its outcome is in the status), nothing needs its
//!   trainer-config Secret or its finished pods again: they are *released* at once;
//! - its inputs (dataset, checkpoints, scratch claims) go when `keepInputsSeconds` has passed
//!   since completion, at once for zero retention;
//! - when `keepOutputsSeconds` has passed, or on an erasure request, the job object itself is
//!   deleted; its finalizer then *purges* whatever is left and writes the audit record.
//!
//! With the customer's training consent, a job that succeeds has its dataset and LoRA copied
//! into its region's consented corpus, before its inputs can go. That copy outlives the job's
//! retention (it is what the customer consented to); withdrawing consent or requesting erasure
//! deletes it.

use k8s_openapi::jiff::Timestamp;
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::DATA_FINALIZER;
use loraplane_crds::v1alpha1::{ErasureReason, Phase, RetentionMode};

/// Default input retention when the spec leaves it empty (standard mode).
pub const DEFAULT_KEEP_INPUTS: i64 = 7 * 86_400;
/// Default output retention when the spec leaves it empty (standard mode).
pub const DEFAULT_KEEP_OUTPUTS: i64 = 30 * 86_400;
/// Output retention of zero-retention jobs when the spec leaves it empty, and their cap.
pub const ZERO_RETENTION_OUTPUTS: i64 = 86_400;

/// Why a job's data is being deleted (the audit record's and the metrics' `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Its retention ran out.
    Retention,
    /// Erasure was requested.
    Erasure(ErasureReason),
    /// Someone deleted the job object (for example with `kubectl delete`).
    Deleted,
}

impl Cause {
    /// The name in audit records, condition reasons and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Retention => "retention",
            Cause::Erasure(r) => r.as_str(),
            Cause::Deleted => "deleted",
        }
    }

    /// The `Deleting` condition's reason while the purge runs.
    pub fn condition_reason(self) -> &'static str {
        match self {
            Cause::Retention => "RetentionExpired",
            Cause::Erasure(_) => "ErasureRequested",
            Cause::Deleted => "JobDeleted",
        }
    }
}

/// The lifecycle facts of one job, read from its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Facts {
    /// The job carries the data finalizer.
    pub guarded: bool,
    /// The job object is being deleted.
    pub deleting: bool,
    /// The stored phase is Succeeded, Failed or Cancelled.
    pub ended: bool,
    /// `status.completionTime`.
    pub completed_at: Option<i64>,
    /// `zeroRetention` mode.
    pub zero_retention: bool,
    /// `spec.retention.keepInputsSeconds`.
    pub keep_inputs: Option<i64>,
    /// `spec.retention.keepOutputsSeconds`.
    pub keep_outputs: Option<i64>,
    /// `status.retention.inputsDeletedAt` is set.
    pub inputs_deleted: bool,
    /// `status.retention.releasedAt` is set.
    pub released: bool,
    /// `spec.erasure`: why and when.
    pub erasure: Option<(ErasureReason, i64)>,
    /// The stored phase is Succeeded.
    pub succeeded: bool,
    /// `spec.dataUse.trainingConsent`.
    pub consent: bool,
    /// `spec.dataUse.consentWithdrawn`.
    pub consent_withdrawn: bool,
    /// `status.retention.corpusCopiedAt` is set.
    pub corpus_copied: bool,
    /// `status.retention.corpusDeletedAt` is set.
    pub corpus_deleted: bool,
}

impl Facts {
    /// Reads the facts from a job.
    pub fn of(job: &LoRATrainingJob) -> Facts {
        let status = job.status.as_ref();
        let ret = status.and_then(|s| s.retention.as_ref());
        Facts {
            guarded: job
                .metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == DATA_FINALIZER)),
            deleting: job.metadata.deletion_timestamp.is_some(),
            ended: status
                .and_then(|s| s.phase)
                .is_some_and(|p| p.is_terminal()),
            completed_at: status
                .and_then(|s| s.completion_time.as_ref())
                .map(|t| t.0.as_second()),
            zero_retention: job.spec.retention.mode == RetentionMode::ZeroRetention,
            keep_inputs: job.spec.retention.keep_inputs_seconds,
            keep_outputs: job.spec.retention.keep_outputs_seconds,
            inputs_deleted: ret.is_some_and(|r| r.inputs_deleted_at.is_some()),
            released: ret.is_some_and(|r| r.released_at.is_some()),
            erasure: job
                .spec
                .erasure
                .as_ref()
                .map(|e| (e.reason, e.requested_at.0.as_second())),
            succeeded: status.and_then(|s| s.phase) == Some(Phase::Succeeded),
            consent: job.spec.data_use.training_consent,
            consent_withdrawn: job.spec.data_use.consent_withdrawn,
            corpus_copied: ret.is_some_and(|r| r.corpus_copied_at.is_some()),
            corpus_deleted: ret.is_some_and(|r| r.corpus_deleted_at.is_some()),
        }
    }
}

/// When an ended job's inputs and outputs fall due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// When the dataset, checkpoints and claims are due.
    pub inputs_expire_at: i64,
    /// When the LoRA files, and with them the job object, are due.
    pub outputs_expire_at: i64,
}

/// The due times of a job, once it has completed.
pub fn schedule(f: &Facts) -> Option<Schedule> {
    let done = f.completed_at?;
    let keep_in = if f.zero_retention {
        0
    } else {
        f.keep_inputs.unwrap_or(DEFAULT_KEEP_INPUTS).max(0)
    };
    let keep_out = if f.zero_retention {
        f.keep_outputs
            .unwrap_or(ZERO_RETENTION_OUTPUTS)
            .clamp(0, ZERO_RETENTION_OUTPUTS)
    } else {
        f.keep_outputs.unwrap_or(DEFAULT_KEEP_OUTPUTS).max(0)
    };
    Some(Schedule {
        inputs_expire_at: done.saturating_add(keep_in),
        outputs_expire_at: done.saturating_add(keep_out),
    })
}

/// What an ended job (not being deleted) needs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chores {
    /// Delete the trainer-config Secret and the finished pods.
    pub release: bool,
    /// Copy the dataset and LoRA into the consented corpus (before the inputs go).
    pub copy_to_corpus: bool,
    /// Delete the corpus copy: consent was withdrawn after it was made.
    pub delete_corpus: bool,
    /// Delete the dataset, checkpoints and claims.
    pub delete_inputs: bool,
    /// Delete the job object (its finalizer purges the rest), and why.
    pub delete_job: Option<Cause>,
    /// When to look again (the next due time).
    pub wake_at: Option<i64>,
}

/// Decides what an ended job needs at `now`. A job that has not ended needs nothing here: an
/// erasure request first stops it (see `status::stop_requested`), and the chores follow once
/// its end is recorded.
pub fn chores(f: &Facts, now: i64) -> Chores {
    if !f.ended || f.deleting {
        return Chores::default();
    }
    let mut c = Chores {
        release: !f.released,
        ..Chores::default()
    };
    if let Some((reason, _)) = f.erasure {
        c.delete_job = Some(Cause::Erasure(reason));
        return c;
    }
    c.copy_to_corpus =
        f.succeeded && f.consent && !f.consent_withdrawn && !f.corpus_copied && !f.inputs_deleted;
    c.delete_corpus = f.consent_withdrawn && f.corpus_copied && !f.corpus_deleted;
    let Some(s) = schedule(f) else {
        return c;
    };
    c.delete_inputs = !f.inputs_deleted && now >= s.inputs_expire_at;
    if now >= s.outputs_expire_at {
        c.delete_job = Some(Cause::Retention);
        return c;
    }
    let inputs_pending = !f.inputs_deleted && !c.delete_inputs;
    c.wake_at = Some(if inputs_pending {
        s.inputs_expire_at.min(s.outputs_expire_at)
    } else {
        s.outputs_expire_at
    });
    c
}

/// Why a job being deleted loses its data: an erasure request says so itself; a job whose
/// outputs are due was deleted by retention; anything else was deleted by someone.
pub fn cause(f: &Facts, now: i64) -> Cause {
    if let Some((reason, _)) = f.erasure {
        return Cause::Erasure(reason);
    }
    match schedule(f) {
        Some(s) if now >= s.outputs_expire_at => Cause::Retention,
        _ => Cause::Deleted,
    }
}

/// Whether the purge of a job deletes its corpus copy too: only when the customer asked
/// (erasure, or consent withdrawn). Retention, and an administrator's `kubectl delete`, leave
/// what the customer consented to.
pub fn purge_takes_corpus(f: &Facts) -> bool {
    f.erasure.is_some() || f.consent_withdrawn
}

/// One piece of work past its due time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overdue {
    /// `inputs`, `outputs` or `erasure`.
    pub what: &'static str,
    /// Seconds since it fell due.
    pub seconds: i64,
}

/// What of a job is overdue at `now`: inputs kept past their expiry, a job object (and its
/// outputs) kept past the outputs' expiry, an erasure not finished. A job whose deletion
/// stalls (S3 down, a pod that will not stop) shows here until it is gone, which is what the
/// `LoraplaneRetentionDeletionOverdue` and `LoraplaneErasureStalled` alerts watch.
pub fn overdue(f: &Facts, now: i64) -> Vec<Overdue> {
    let mut out = Vec::new();
    if let Some((_, requested)) = f.erasure {
        out.push(Overdue {
            what: "erasure",
            seconds: (now - requested).max(0),
        });
        return out;
    }
    if let Some(s) = schedule(f) {
        if !f.inputs_deleted && now > s.inputs_expire_at {
            out.push(Overdue {
                what: "inputs",
                seconds: now - s.inputs_expire_at,
            });
        }
        if now > s.outputs_expire_at {
            out.push(Overdue {
                what: "outputs",
                seconds: now - s.outputs_expire_at,
            });
        }
    }
    out
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    Timestamp::now().as_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended_at(at: i64) -> Facts {
        Facts {
            guarded: true,
            ended: true,
            completed_at: Some(at),
            keep_inputs: Some(100),
            keep_outputs: Some(1000),
            ..Facts::default()
        }
    }

    #[test]
    fn a_running_job_has_no_chores() {
        let f = Facts {
            keep_inputs: Some(0),
            ..Facts::default()
        };
        assert_eq!(chores(&f, 1_000_000), Chores::default());
    }

    #[test]
    fn an_ended_job_is_released_then_loses_inputs_then_the_job_goes() {
        let f = ended_at(10);
        let c = chores(&f, 50);
        assert!(c.release && !c.delete_inputs && c.delete_job.is_none());
        assert_eq!(c.wake_at, Some(110));
        let released = Facts {
            released: true,
            ..f
        };
        let c = chores(&released, 110);
        assert!(!c.release && c.delete_inputs && c.delete_job.is_none());
        assert_eq!(c.wake_at, Some(1010));
        let inputs_gone = Facts {
            inputs_deleted: true,
            ..released
        };
        let c = chores(&inputs_gone, 500);
        assert_eq!(
            c,
            Chores {
                wake_at: Some(1010),
                ..Chores::default()
            }
        );
        let c = chores(&inputs_gone, 1010);
        assert_eq!(c.delete_job, Some(Cause::Retention));
        assert_eq!(c.wake_at, None);
    }

    #[test]
    fn outputs_due_before_inputs_take_everything_at_once() {
        let f = Facts {
            keep_inputs: Some(5000),
            ..ended_at(0)
        };
        let c = chores(&f, 1000);
        assert_eq!(c.delete_job, Some(Cause::Retention));
    }

    #[test]
    fn zero_retention_deletes_inputs_at_once_and_caps_outputs_at_a_day() {
        let f = Facts {
            zero_retention: true,
            keep_inputs: Some(500),
            keep_outputs: Some(10 * 86_400),
            ..ended_at(0)
        };
        let c = chores(&f, 0);
        assert!(c.delete_inputs);
        assert_eq!(
            schedule(&f).map(|s| s.outputs_expire_at),
            Some(ZERO_RETENTION_OUTPUTS)
        );
        assert_eq!(c.wake_at, Some(ZERO_RETENTION_OUTPUTS));
    }

    #[test]
    fn defaults_apply_when_the_spec_is_silent() {
        let f = Facts {
            completed_at: Some(0),
            ..Facts::default()
        };
        let s = schedule(&f).unwrap();
        assert_eq!(s.inputs_expire_at, DEFAULT_KEEP_INPUTS);
        assert_eq!(s.outputs_expire_at, DEFAULT_KEEP_OUTPUTS);
    }

    #[test]
    fn an_erasure_request_deletes_the_job_whatever_the_retention_says() {
        let f = Facts {
            erasure: Some((ErasureReason::Refund, 20)),
            ..ended_at(10)
        };
        let c = chores(&f, 30);
        assert_eq!(c.delete_job, Some(Cause::Erasure(ErasureReason::Refund)));
        assert!(c.release);
        assert_eq!(cause(&f, 30), Cause::Erasure(ErasureReason::Refund));
    }

    #[test]
    fn a_deleted_job_says_why_its_data_went() {
        let f = Facts {
            deleting: true,
            ..ended_at(0)
        };
        assert_eq!(chores(&f, 5000), Chores::default());
        assert_eq!(cause(&f, 10), Cause::Deleted);
        assert_eq!(cause(&f, 1000), Cause::Retention);
        let unfinished = Facts {
            deleting: true,
            ..Facts::default()
        };
        assert_eq!(cause(&unfinished, 0), Cause::Deleted);
    }

    #[test]
    fn a_consenting_job_is_copied_to_the_corpus_once_before_its_inputs_go() {
        let f = Facts {
            succeeded: true,
            consent: true,
            keep_inputs: Some(0),
            ..ended_at(10)
        };
        let c = chores(&f, 10);
        assert!(c.copy_to_corpus && c.delete_inputs && !c.delete_corpus);
        let copied = Facts {
            corpus_copied: true,
            ..f
        };
        assert!(!chores(&copied, 10).copy_to_corpus);
        // Retention leaves the copy; the customer's erasure takes it.
        assert!(!purge_takes_corpus(&copied));
        let erased = Facts {
            erasure: Some((ErasureReason::CustomerRequest, 11)),
            ..copied
        };
        assert!(!chores(&erased, 11).copy_to_corpus);
        assert!(purge_takes_corpus(&erased));
    }

    #[test]
    fn no_consent_no_failure_no_copy_and_withdrawal_deletes_it() {
        let base = Facts {
            succeeded: true,
            ..ended_at(10)
        };
        assert!(!chores(&base, 10).copy_to_corpus);
        let failed = Facts {
            succeeded: false,
            consent: true,
            ..base
        };
        assert!(!chores(&failed, 10).copy_to_corpus);
        let withdrawn_first = Facts {
            consent: true,
            consent_withdrawn: true,
            ..base
        };
        let c = chores(&withdrawn_first, 10);
        assert!(!c.copy_to_corpus && !c.delete_corpus);
        let withdrawn_after = Facts {
            corpus_copied: true,
            ..withdrawn_first
        };
        assert!(chores(&withdrawn_after, 10).delete_corpus);
        assert!(purge_takes_corpus(&withdrawn_after));
        let done = Facts {
            corpus_deleted: true,
            ..withdrawn_after
        };
        assert!(!chores(&done, 10).delete_corpus);
    }

    #[test]
    fn overdue_work_is_measured_from_its_due_time() {
        let f = ended_at(0);
        assert!(overdue(&f, 100).is_empty());
        assert_eq!(
            overdue(&f, 130),
            vec![Overdue {
                what: "inputs",
                seconds: 30
            }]
        );
        let gone = Facts {
            inputs_deleted: true,
            ..f
        };
        assert_eq!(
            overdue(&gone, 1060),
            vec![Overdue {
                what: "outputs",
                seconds: 60
            }]
        );
        let erasing = Facts {
            erasure: Some((ErasureReason::CustomerRequest, 40)),
            ..Facts::default()
        };
        assert_eq!(
            overdue(&erasing, 45),
            vec![Overdue {
                what: "erasure",
                seconds: 5
            }]
        );
    }
}
