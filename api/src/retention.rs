//! Retention, the pure part: given a job's policy and status and the time now, what is due for
//! deletion and when the retention loop must look at the job next. Times are Unix seconds.
//!
//! Periods count from completion (`status.completionTime`); a job that has not ended keeps
//! everything. Erasure (request, refund, dispute) is not a retention decision: it deletes
//! everything at once through the same deletion path.

use loraplane_crds::v1alpha1::{LoRATrainingJob, RetentionMode};

/// Default input retention when the spec leaves it empty (standard mode).
pub const DEFAULT_KEEP_INPUTS: i64 = 7 * 86_400;
/// Default output retention when the spec leaves it empty (standard mode).
pub const DEFAULT_KEEP_OUTPUTS: i64 = 30 * 86_400;
/// Output retention of zero-retention jobs when the spec leaves it empty.
pub const ZERO_RETENTION_OUTPUTS: i64 = 86_400;

/// The retention facts of one job, extracted from its CR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionFacts {
    /// `zeroRetention` mode.
    pub zero_retention: bool,
    /// `spec.retention.keepInputsSeconds`.
    pub keep_inputs: Option<i64>,
    /// `spec.retention.keepOutputsSeconds`.
    pub keep_outputs: Option<i64>,
    /// `status.completionTime`.
    pub completed_at: Option<i64>,
    /// `status.retention.inputsDeletedAt` is set.
    pub inputs_deleted: bool,
    /// `status.retention.outputsDeletedAt` is set.
    pub outputs_deleted: bool,
}

impl RetentionFacts {
    /// Reads the facts from a job.
    pub fn of(job: &LoRATrainingJob) -> RetentionFacts {
        let status = job.status.as_ref();
        let ret = status.and_then(|s| s.retention.as_ref());
        RetentionFacts {
            zero_retention: job.spec.retention.mode == RetentionMode::ZeroRetention,
            keep_inputs: job.spec.retention.keep_inputs_seconds,
            keep_outputs: job.spec.retention.keep_outputs_seconds,
            completed_at: status
                .and_then(|s| s.completion_time.as_ref())
                .map(|t| t.0.as_second()),
            inputs_deleted: ret.is_some_and(|r| r.inputs_deleted_at.is_some()),
            outputs_deleted: ret.is_some_and(|r| r.outputs_deleted_at.is_some()),
        }
    }
}

/// What the retention loop should do with a job now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    /// When inputs expire (once the job has completed).
    pub inputs_expire_at: Option<i64>,
    /// When outputs expire (once the job has completed).
    pub outputs_expire_at: Option<i64>,
    /// Delete the dataset, checkpoints and claims now.
    pub delete_inputs: bool,
    /// Delete the trained LoRA files now.
    pub delete_outputs: bool,
    /// The next time something becomes due (None: nothing left, or not completed yet).
    pub next_due: Option<i64>,
}

/// Decides what is due for a job at `now`.
pub fn decide(f: &RetentionFacts, now: i64) -> Decision {
    let Some(done) = f.completed_at else {
        return Decision::default();
    };
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
    let in_at = done.saturating_add(keep_in);
    let out_at = done.saturating_add(keep_out);
    let delete_inputs = !f.inputs_deleted && now >= in_at;
    let delete_outputs = !f.outputs_deleted && now >= out_at;
    let pending = [
        (!f.inputs_deleted && !delete_inputs).then_some(in_at),
        (!f.outputs_deleted && !delete_outputs).then_some(out_at),
    ];
    Decision {
        inputs_expire_at: Some(in_at),
        outputs_expire_at: Some(out_at),
        delete_inputs,
        delete_outputs,
        next_due: pending.into_iter().flatten().min(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(at: i64) -> RetentionFacts {
        RetentionFacts {
            keep_inputs: Some(100),
            keep_outputs: Some(1000),
            completed_at: Some(at),
            ..RetentionFacts::default()
        }
    }

    #[test]
    fn nothing_is_due_before_completion() {
        let f = RetentionFacts {
            keep_inputs: Some(0),
            ..RetentionFacts::default()
        };
        assert_eq!(decide(&f, 1_000_000), Decision::default());
    }

    #[test]
    fn inputs_then_outputs_fall_due_in_order() {
        let f = done(10);
        let d = decide(&f, 50);
        assert!(!d.delete_inputs && !d.delete_outputs);
        assert_eq!(d.next_due, Some(110));
        let d = decide(&f, 110);
        assert!(d.delete_inputs && !d.delete_outputs);
        assert_eq!(d.next_due, Some(1010));
        let after_inputs = RetentionFacts {
            inputs_deleted: true,
            ..f
        };
        let d = decide(&after_inputs, 500);
        assert!(!d.delete_inputs);
        assert_eq!(d.next_due, Some(1010));
        let d = decide(&after_inputs, 2000);
        assert!(d.delete_outputs);
        assert_eq!(d.next_due, None);
        let all = RetentionFacts {
            outputs_deleted: true,
            ..after_inputs
        };
        assert_eq!(decide(&all, 5000).next_due, None);
        assert!(!decide(&all, 5000).delete_outputs);
    }

    #[test]
    fn zero_retention_deletes_inputs_at_once_and_caps_outputs_at_a_day() {
        let f = RetentionFacts {
            zero_retention: true,
            keep_inputs: Some(500),
            keep_outputs: Some(10 * 86_400),
            completed_at: Some(0),
            ..RetentionFacts::default()
        };
        let d = decide(&f, 0);
        assert!(d.delete_inputs);
        assert_eq!(d.outputs_expire_at, Some(86_400));
    }

    #[test]
    fn defaults_apply_when_the_spec_is_silent() {
        let f = RetentionFacts {
            completed_at: Some(0),
            ..RetentionFacts::default()
        };
        let d = decide(&f, 0);
        assert_eq!(d.inputs_expire_at, Some(DEFAULT_KEEP_INPUTS));
        assert_eq!(d.outputs_expire_at, Some(DEFAULT_KEEP_OUTPUTS));
    }
}
