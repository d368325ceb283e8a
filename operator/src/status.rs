//! The decision half of reconciliation, as pure functions: from the job, what was observed of
//! its current pod, the ranked placement candidates and the clock, compute the new status and
//! what must change in the cluster (create the next attempt's pod, delete the current one).
//!
//! Failure classification, the heart of failover:
//! - exit code 2 (bad input) fails the job at once: retrying cannot help;
//! - any other non-zero exit is a trainer crash and counts against `spec.backoffLimit`, retried
//!   after an exponential back-off;
//! - a pod disrupted by the platform (DisruptionTarget condition, its node gone, the pod
//!   deleted under us) is a preemption or node loss: the job moves on from its last checkpoint
//!   without consuming `backoffLimit`;
//! - a pod unschedulable for longer than the scheduling timeout is deleted and the next pool of
//!   the failover round is tried.
//!
//! `decide` is a short sequence of named steps, each a function with a typed outcome: observe
//! the open attempt (`observe_open_attempt`, one function per thing a pod can be doing), close
//! it (`close_attempt`), end the job when something ends it (`end_job`), else hold it or start
//! the next attempt (`next_attempt`: suspended, still running, `backing_off`, `start_attempt`
//! on the pool `next_in_round` picks). End reasons and condition types are enums
//! ([`EndReason`], [`ConditionType`]) written as the strings the CRD documents.
//!
//! The failover round lives here too: `tried_pools` reads it from the attempts, and
//! `next_in_round` takes the best candidate not yet tried, starting over once all were.
//!
//! Attempts are numbered by their index in `status.attempts` and pods are named after it, so a
//! repeated decision (a restarted operator, a lost status write) recreates the same pod name and
//! can never run two pods for one attempt.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::platform::Defaults;
use loraplane_crds::trainer::{EXIT_BAD_INPUT, Outcome, TrainerSummary};
use loraplane_crds::v1alpha1::{Artifact, Attempt, LoRATrainingJobStatus, Phase, PlacementStatus};

use crate::placement::Candidate;
use crate::progress::{self, LogProgress};

/// Why an attempt or the job ended: `status.attempts[].reason`, and the reason of the
/// condition that ends a job (`Complete`, `Failed`, `Cancelled`). Serialised as the CRD
/// documents them ([`EndReason::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The pod waited for a node longer than the scheduling timeout.
    Unschedulable,
    /// The pod was disrupted (spot reclaim, scheduler preemption, eviction).
    Preempted,
    /// The pod's node disappeared or the pod vanished.
    NodeLost,
    /// The trainer exited non-zero.
    TrainerFailed,
    /// The trainer refused its input (exit code 2), or the data lies where it may not be used.
    BadInput,
    /// The job was suspended.
    Suspended,
    /// The job ran out of `activeDeadlineSeconds`.
    DeadlineExceeded,
    /// The trainer finished.
    Completed,
    /// `spec.cancel` was set.
    CancelRequested,
    /// `spec.erasure` was set.
    ErasureRequested,
    /// More trainer crashes than `backoffLimit` (the job's end only).
    BackoffLimitExceeded,
}

impl EndReason {
    /// Every reason, for parsing.
    const ALL: [EndReason; 11] = [
        EndReason::Unschedulable,
        EndReason::Preempted,
        EndReason::NodeLost,
        EndReason::TrainerFailed,
        EndReason::BadInput,
        EndReason::Suspended,
        EndReason::DeadlineExceeded,
        EndReason::Completed,
        EndReason::CancelRequested,
        EndReason::ErasureRequested,
        EndReason::BackoffLimitExceeded,
    ];

    /// The name in the CRD.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Unschedulable => "Unschedulable",
            EndReason::Preempted => "Preempted",
            EndReason::NodeLost => "NodeLost",
            EndReason::TrainerFailed => "TrainerFailed",
            EndReason::BadInput => "BadInput",
            EndReason::Suspended => "Suspended",
            EndReason::DeadlineExceeded => "DeadlineExceeded",
            EndReason::Completed => "Completed",
            EndReason::CancelRequested => "CancelRequested",
            EndReason::ErasureRequested => "ErasureRequested",
            EndReason::BackoffLimitExceeded => "BackoffLimitExceeded",
        }
    }

    /// The reason a stored attempt names, if it is one of ours.
    pub fn parse(s: &str) -> Option<EndReason> {
        EndReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The condition types the operator writes on a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    /// A pod of the current attempt is bound to a node.
    Scheduled,
    /// The trainer runs.
    Running,
    /// The job succeeded.
    Complete,
    /// The job failed for good.
    Failed,
    /// The job is suspended.
    Suspended,
    /// The job was stopped for good on request.
    Cancelled,
    /// True while a job being deleted is purged (reason: why; message: what is left), or
    /// while a deletion keeps failing (reason `DeletionFailed`).
    Deleting,
}

impl ConditionType {
    /// The name in the CRD.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Scheduled => "Scheduled",
            ConditionType::Running => "Running",
            ConditionType::Complete => "Complete",
            ConditionType::Failed => "Failed",
            ConditionType::Suspended => "Suspended",
            ConditionType::Cancelled => "Cancelled",
            ConditionType::Deleting => "Deleting",
        }
    }
}

/// Why the job must stop for good, when its spec asks for it: an erasure request outranks a
/// cancel (it says more about what follows).
pub fn stop_requested(job: &LoRATrainingJob) -> Option<(EndReason, &'static str)> {
    if job.spec.erasure.is_some() {
        Some((
            EndReason::ErasureRequested,
            "erasure of the job's data was requested",
        ))
    } else if job.spec.cancel {
        Some((EndReason::CancelRequested, "the job was cancelled"))
    } else {
        None
    }
}

/// The pod phases the decision cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    /// Not running yet.
    Pending,
    /// Running.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero or was killed.
    Failed,
}

/// What the decision needs to know about the current attempt's pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    /// Pod name.
    pub name: String,
    /// When it was created.
    pub created: Option<Timestamp>,
    /// Phase.
    pub phase: PodPhase,
    /// Bound node.
    pub node: Option<String>,
    /// Whether the bound node still exists (true when unbound).
    pub node_exists: bool,
    /// Set when the pod is being deleted.
    pub deleting: bool,
    /// `PodScheduled=False, reason=Unschedulable` message, if any.
    pub unschedulable: Option<String>,
    /// `DisruptionTarget=True` reason, or a pod status reason that means the platform killed
    /// it (`Evicted`, `NodeLost`, `Preempting`...).
    pub disruption: Option<String>,
    /// The trainer container's exit code, once terminated.
    pub exit_code: Option<i32>,
    /// The trainer's termination message.
    pub summary: Option<TrainerSummary>,
}

impl PodView {
    /// Extracts the view from a pod; `node_exists` comes from the Node cache.
    pub fn from_pod(pod: &Pod, node_exists: impl Fn(&str) -> bool) -> PodView {
        let status = pod.status.as_ref();
        let phase = match status.and_then(|s| s.phase.as_deref()) {
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Pending,
        };
        let conditions = status.and_then(|s| s.conditions.as_ref());
        let find = |t: &str| conditions.and_then(|cs| cs.iter().find(|c| c.type_ == t));
        let unschedulable = find("PodScheduled")
            .filter(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
            .map(|c| c.message.clone().unwrap_or_default());
        let disruption = find("DisruptionTarget")
            .filter(|c| c.status == "True")
            .map(|c| {
                c.reason
                    .clone()
                    .unwrap_or_else(|| "DisruptionTarget".into())
            })
            .or_else(|| {
                status.and_then(|s| s.reason.clone()).filter(|r| {
                    matches!(
                        r.as_str(),
                        "Evicted"
                            | "NodeLost"
                            | "Preempting"
                            | "Shutdown"
                            | "Terminated"
                            | "NodeShutdown"
                    )
                })
            });
        let terminated = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.name == crate::resources::TRAINER_CONTAINER)
                    .or(cs.first())
            })
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.as_ref());
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        PodView {
            name: pod.metadata.name.clone().unwrap_or_default(),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            phase,
            node_exists: node.as_deref().is_none_or(&node_exists),
            node,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            unschedulable,
            disruption,
            exit_code: terminated.map(|t| t.exit_code),
            summary: terminated
                .and_then(|t| t.message.as_deref())
                .and_then(|m| serde_json::from_str(m).ok()),
        }
    }
}

/// Spot reclaims and scheduler preemptions are `Preempted`; an unreachable or vanished node
/// (the taint manager's eviction, a pod with no disruption reason whose node is gone) is
/// `NodeLost`.
fn disruption_reason(pod: &PodView) -> EndReason {
    match pod.disruption.as_deref() {
        Some(
            "TerminationByKubelet"
            | "PreemptionByScheduler"
            | "EvictionByEvictionAPI"
            | "Preempting"
            | "Terminated"
            | "Shutdown"
            | "NodeShutdown"
            | "Evicted",
        ) => EndReason::Preempted,
        Some(_) => EndReason::NodeLost,
        None if pod.deleting && pod.node_exists => EndReason::Preempted,
        None => EndReason::NodeLost,
    }
}

/// Everything the decision is computed from.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The job.
    pub job: &'a LoRATrainingJob,
    /// The current attempt's pod, when one was found.
    pub pod: Option<PodView>,
    /// Placement candidates for a new attempt, best first (see `placement::rank`), or the
    /// reason none can be computed.
    pub candidates: Result<Vec<Candidate>, String>,
    /// The trainer's log tail, when read.
    pub log: Option<LogProgress>,
    /// Whether the job's data lies where its residency allows (`placement::check_data_location`);
    /// a job whose data does not fails as bad input before any pod.
    pub data_location: Result<(), String>,
    /// The `s3://` names of the LoRA files the trainer was granted (`resources::output_uris`):
    /// the only artifacts recorded, whatever else a trainer reports. Its sample images are
    /// recorded under the same prefix.
    pub outputs: &'a [String],
    /// Platform defaults.
    pub defaults: &'a Defaults,
    /// The clock.
    pub now: Timestamp,
    /// How often a running job is polled.
    pub progress_interval: Duration,
}

/// A new attempt to start.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAttempt {
    /// Index in `status.attempts`.
    pub index: usize,
    /// Pod name.
    pub pod_name: String,
    /// Pool.
    pub pool: String,
    /// Region.
    pub region: String,
}

/// A Kubernetes Event to publish on the job.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// Warning rather than Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// Human-readable message (never customer text).
    pub message: String,
}

/// Facts for metrics, emitted only once the status that records them is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// The job started running for the first time, this many seconds after creation.
    FirstRunning(f64),
    /// The job moved from one placement to another.
    Failover {
        /// Region left.
        from: String,
        /// Region entered.
        to: String,
        /// Why.
        reason: String,
    },
    /// A pod was preempted or lost its node.
    Preempted {
        /// Region.
        region: String,
        /// Pool.
        pool: String,
    },
    /// An attempt ended after using GPUs for this long.
    GpuSeconds {
        /// Region.
        region: String,
        /// Pool.
        pool: String,
        /// GPU-seconds.
        seconds: f64,
    },
}

/// The decision.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The status to write.
    pub status: LoRATrainingJobStatus,
    /// A pod to delete.
    pub delete_pod: Option<String>,
    /// An attempt to start.
    pub create: Option<NewAttempt>,
    /// Events to publish.
    pub notes: Vec<Note>,
    /// Metric facts.
    pub signals: Vec<Signal>,
    /// When to look again even if nothing changes.
    pub requeue: Option<Duration>,
}

/// The pod name of attempt `index`.
pub fn pod_name(job_name: &str, index: usize) -> String {
    let suffix = format!("-a{index}");
    let keep = 63usize.saturating_sub(suffix.len());
    let base: String = job_name.chars().take(keep).collect();
    format!("{}{suffix}", base.trim_end_matches(['-', '.']))
}

/// The failover round's rule, in one place: the best candidate not yet tried in this round;
/// once every one has been tried the round starts over, so a job keeps cycling through its
/// allowed pools (and waits) rather than ever leaving them.
pub fn next_in_round<'a>(
    candidates: &'a [Candidate],
    tried: &BTreeSet<String>,
) -> Option<&'a Candidate> {
    candidates
        .iter()
        .find(|c| !tried.contains(&c.pool))
        .or(candidates.first())
}

/// Pools tried in the current failover round: those whose attempts ended `Unschedulable` since
/// the last attempt that actually ran, and that attempt's own pool when the platform took it
/// away (spot reclaim, preemption, lost node): a pool that just lost its capacity is the least
/// likely to have room again at once, so the next attempt goes elsewhere first (the round
/// still comes back to it when nothing else fits).
pub fn tried_pools(status: Option<&LoRATrainingJobStatus>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(st) = status {
        for a in st
            .attempts
            .iter()
            .rev()
            .skip_while(|a| a.end_time.is_none())
        {
            match a.reason.as_deref().and_then(EndReason::parse) {
                Some(EndReason::Unschedulable) => {
                    out.insert(a.pool.clone());
                }
                Some(EndReason::Preempted | EndReason::NodeLost) => {
                    out.insert(a.pool.clone());
                    break;
                }
                _ => break,
            }
        }
    }
    out
}

/// Seconds the job has had a pod, over all attempts: `activeDeadlineSeconds` counts this, so
/// suspended time (and waiting between attempts) is excluded.
pub fn active_seconds(attempts: &[Attempt], now: Timestamp) -> i64 {
    attempts
        .iter()
        .filter_map(|a| {
            let start = a.start_time.as_ref()?.0;
            let end = a.end_time.as_ref().map_or(now, |t| t.0);
            Some((end.as_second() - start.as_second()).max(0))
        })
        .sum()
}

/// The back-off before retrying after the `failures`-th crash: base × 2^(failures-1), at most
/// ten minutes.
pub fn backoff(defaults: &Defaults, failures: i32) -> Duration {
    let exp = u32::try_from(failures.saturating_sub(1).clamp(0, 16)).unwrap_or(0);
    Duration::from_secs(
        defaults
            .backoff_seconds
            .saturating_mul(1u64 << exp)
            .min(600),
    )
}

/// Sets a condition, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: ConditionType,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let type_ = type_.as_str();
    let existing = conditions.iter_mut().find(|c| c.type_ == type_);
    match existing {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

fn condition_true(st: &LoRATrainingJobStatus, type_: ConditionType) -> bool {
    st.conditions
        .iter()
        .any(|c| c.type_ == type_.as_str() && c.status == "True")
}

/// How the open attempt ended: its reason (an [`EndReason`]) and a message.
#[derive(Debug, Clone, PartialEq)]
struct Ended {
    reason: EndReason,
    message: String,
}

/// How the job ends for good: the phase, the condition reason and a message.
#[derive(Debug, Clone, PartialEq)]
struct Terminal {
    phase: Phase,
    reason: EndReason,
    message: String,
}

/// What looking at the open attempt's pod found.
#[derive(Debug, Default)]
struct Observed {
    /// The attempt is over.
    ended: Option<Ended>,
    /// The job is over.
    terminal: Option<Terminal>,
}

/// The state one decision works on: the plan being built and what every step reads.
struct Step<'i, 'a> {
    inputs: &'i Inputs<'a>,
    plan: Plan,
    old_phase: Option<Phase>,
}

impl Step<'_, '_> {
    fn spec(&self) -> &loraplane_crds::v1alpha1::LoRATrainingJobSpec {
        &self.inputs.job.spec
    }

    /// Sets a condition on the status being built, stamped with this decision's time.
    fn cond(&mut self, type_: ConditionType, status: bool, reason: &str, message: &str) {
        let generation = self.inputs.job.metadata.generation;
        set_condition(
            &mut self.plan.status.conditions,
            type_,
            status,
            reason,
            message,
            generation,
            self.inputs.now,
        );
    }

    /// The plan, with the phase-transition event added.
    fn finish(mut self) -> Plan {
        finish_notes(&mut self.plan, self.old_phase);
        self.plan
    }
}

/// Computes the next status and the changes to make, as named steps: merge the trainer's
/// progress, observe the open attempt, close it, end the job if something ends it, and
/// otherwise hold (suspended, running, backing off) or start the next attempt.
pub fn decide(inputs: &Inputs<'_>) -> Plan {
    let old = inputs.job.status.clone().unwrap_or_default();
    let old_phase = old.phase;
    let mut step = Step {
        inputs,
        plan: Plan {
            status: old,
            ..Plan::default()
        },
        old_phase,
    };
    step.plan.status.observed_generation = inputs.job.metadata.generation;
    if old_phase.is_some_and(Phase::is_terminal) {
        return step.plan;
    }
    if let Some(log) = &inputs.log {
        let st = &mut step.plan.status;
        st.progress = progress::merge(
            st.progress.as_ref(),
            log,
            inputs.job.spec.training.steps,
            inputs.now,
        );
        // The LoRA files lie directly under the attempt's output prefix, as its samples do.
        let prefix = inputs.outputs.first().and_then(|u| u.rsplit_once('/'));
        if let Some((prefix, _)) = prefix
            && let Some(samples) = progress::merge_samples(
                &st.samples,
                &log.samples,
                prefix,
                inputs.job.spec.training.steps,
            )
        {
            st.samples = samples;
        }
    }
    let deadline_hit = step
        .spec()
        .active_deadline_seconds
        .is_some_and(|d| active_seconds(&step.plan.status.attempts, inputs.now) >= d);
    let open = step
        .plan
        .status
        .attempts
        .last()
        .is_some_and(|a| a.end_time.is_none());
    let observed = if open {
        observe_open_attempt(&mut step, deadline_hit)
    } else {
        Observed::default()
    };
    let mut terminal = observed.terminal;
    if let Some(ended) = &observed.ended {
        let deadline = close_attempt(&mut step, ended);
        terminal = terminal.or(deadline);
    } else if !open && deadline_hit {
        terminal = Some(deadline_exceeded(step.spec().active_deadline_seconds));
    }
    let terminal = terminal.or_else(|| refused_before_start(&step));
    if let Some(t) = terminal {
        return end_job(step, t);
    }
    next_attempt(step)
}

/// Step 1: what happened to the open attempt (the last one, while it has no end time).
fn observe_open_attempt(step: &mut Step<'_, '_>, deadline_hit: bool) -> Observed {
    let stop = stop_requested(step.inputs.job);
    let stopped = || {
        stop.map(|(reason, message)| Ended {
            reason,
            message: message.to_string(),
        })
    };
    let Some(pod) = &step.inputs.pod else {
        if stop.is_some() {
            return Observed {
                ended: stopped(),
                terminal: None,
            };
        }
        let reason = if step.spec().suspend {
            EndReason::Suspended
        } else {
            EndReason::NodeLost
        };
        return ended(reason, "the training pod disappeared".into());
    };
    if let Some(node) = &pod.node {
        let st = &mut step.plan.status;
        if let Some(a) = st.attempts.last_mut() {
            a.node = Some(node.clone());
        }
        if let Some(p) = st.placement.as_mut() {
            p.node = Some(node.clone());
        }
    }
    // A pod being deleted that we did not delete (its attempt is still open) was taken by
    // the platform: an eviction, a drain, a reclaimed spot node.
    let disrupted = pod.disruption.is_some() || !pod.node_exists || pod.deleting;
    match pod.phase {
        PodPhase::Succeeded => trainer_succeeded(step, pod),
        // A stop request ends the attempt whatever the pod does, unless the LoRA is already
        // written (then the job succeeded; an erasure still follows).
        _ if stop.is_some() => Observed {
            ended: stopped(),
            terminal: None,
        },
        _ if disrupted && pod.exit_code != Some(0) => ended(
            disruption_reason(pod),
            format!(
                "pod {} was disrupted ({})",
                pod.name,
                pod.disruption.clone().unwrap_or_else(|| "node gone".into())
            ),
        ),
        PodPhase::Failed => trainer_failed(step, pod),
        _ if deadline_hit => ended(
            EndReason::DeadlineExceeded,
            "activeDeadlineSeconds reached".into(),
        ),
        _ if step.spec().suspend => ended(EndReason::Suspended, "the job was suspended".into()),
        PodPhase::Pending if pod.node.is_none() => waiting_for_node(step, pod),
        PodPhase::Pending => {
            step.plan.status.phase = Some(Phase::Scheduling);
            let msg = format!(
                "pod {} bound to node {}",
                pod.name,
                pod.node.clone().unwrap_or_default()
            );
            step.cond(ConditionType::Scheduled, true, "Scheduled", &msg);
            step.cond(
                ConditionType::Running,
                false,
                "ContainerCreating",
                "the trainer is starting",
            );
            step.plan.requeue = Some(step.inputs.progress_interval);
            Observed::default()
        }
        PodPhase::Running => {
            trainer_running(step, pod);
            Observed::default()
        }
    }
}

fn ended(reason: EndReason, message: String) -> Observed {
    Observed {
        ended: Some(Ended { reason, message }),
        terminal: None,
    }
}

/// The pod exited 0: the granted LoRA files become the job's artifacts and the job succeeds.
fn trainer_succeeded(step: &mut Step<'_, '_>, pod: &PodView) -> Observed {
    let total_steps = step.spec().training.steps;
    let st = &mut step.plan.status;
    if let Some(summary) = &pod.summary {
        st.artifacts = summary
            .artifacts
            .iter()
            .filter(|a| step.inputs.outputs.contains(&a.uri))
            .map(|a| Artifact {
                format: a.format.clone(),
                uri: a.uri.clone(),
                sha256: a.sha256.clone(),
                bytes: i64::try_from(a.bytes).unwrap_or(i64::MAX),
            })
            .collect();
    }
    let mut p = st.progress.clone().unwrap_or_default();
    p.total_steps = total_steps;
    p.step = total_steps;
    p.eta_seconds = Some(0);
    p.summary = Some(progress::summary(p.step, p.total_steps));
    st.progress = Some(p);
    Observed {
        ended: Some(Ended {
            reason: EndReason::Completed,
            message: "the trainer finished".into(),
        }),
        terminal: Some(Terminal {
            phase: Phase::Succeeded,
            reason: EndReason::Completed,
            message: "the LoRA was trained and uploaded".into(),
        }),
    }
}

/// The trainer exited non-zero: refused input fails the job at once; a crash counts against
/// `backoffLimit`.
fn trainer_failed(step: &mut Step<'_, '_>, pod: &PodView) -> Observed {
    let code = pod.exit_code;
    let detail = pod
        .summary
        .as_ref()
        .and_then(|s| s.error.clone())
        .unwrap_or_else(|| "no summary".into());
    let bad_input = code == Some(EXIT_BAD_INPUT)
        || pod.summary.as_ref().map(|s| s.outcome) == Some(Outcome::BadInput);
    if bad_input {
        return Observed {
            ended: Some(Ended {
                reason: EndReason::BadInput,
                message: detail.clone(),
            }),
            terminal: Some(Terminal {
                phase: Phase::Failed,
                reason: EndReason::BadInput,
                message: format!("the trainer refused its input: {detail}"),
            }),
        };
    }
    let limit = step.spec().backoff_limit;
    let st = &mut step.plan.status;
    let failures = st.failures.unwrap_or(0) + 1;
    st.failures = Some(failures);
    let msg = format!(
        "trainer exited with code {} ({detail}); failure {failures} of backoffLimit {limit}",
        code.map_or("?".into(), |c| c.to_string()),
    );
    Observed {
        ended: Some(Ended {
            reason: EndReason::TrainerFailed,
            message: msg.clone(),
        }),
        terminal: (failures > limit).then_some(Terminal {
            phase: Phase::Failed,
            reason: EndReason::BackoffLimitExceeded,
            message: msg,
        }),
    }
}

/// The pod waits for a node: within the scheduling timeout the job is `Scheduling`; past it
/// the attempt ends `Unschedulable` (and the next one fails over).
fn waiting_for_node(step: &mut Step<'_, '_>, pod: &PodView) -> Observed {
    let now = step.inputs.now;
    let waited = pod
        .created
        .map_or(0, |c| (now.as_second() - c.as_second()).max(0));
    let timeout =
        i64::try_from(step.inputs.defaults.scheduling_timeout_seconds).unwrap_or(i64::MAX);
    // A pod the scheduler has not even marked yet counts as unschedulable too: what matters
    // to the customer is the wait.
    if waited >= timeout {
        return ended(
            EndReason::Unschedulable,
            format!(
                "pod {} found no node for {waited}s: {}",
                pod.name,
                pod.unschedulable.clone().unwrap_or_default()
            ),
        );
    }
    step.plan.status.phase = Some(Phase::Scheduling);
    // "Pod created for pool P" already says the job waits for a node; restating it costs a
    // status write per job for nothing. The scheduler's reason, once it gives one, is news.
    let just_created = step.plan.status.conditions.iter().any(|c| {
        c.type_ == ConditionType::Scheduled.as_str()
            && c.status == "False"
            && c.reason == "PodCreated"
    });
    if pod.unschedulable.is_some() || !just_created {
        let msg = pod
            .unschedulable
            .clone()
            .unwrap_or_else(|| "waiting for a node".into());
        step.cond(ConditionType::Scheduled, false, "WaitingForNode", &msg);
    }
    let left = u64::try_from(timeout - waited).unwrap_or(1).max(1);
    step.plan.requeue = Some(Duration::from_secs(left));
    Observed::default()
}

/// The trainer runs: `Running`, the first start recorded, polled for progress (and no later
/// than the deadline).
fn trainer_running(step: &mut Step<'_, '_>, pod: &PodView) {
    let now = step.inputs.now;
    step.plan.status.phase = Some(Phase::Running);
    let node = pod.node.clone().unwrap_or_default();
    step.cond(
        ConditionType::Scheduled,
        true,
        "Scheduled",
        &format!("pod {} bound to node {node}", pod.name),
    );
    step.cond(
        ConditionType::Running,
        true,
        "TrainerRunning",
        &format!("training on node {node}"),
    );
    if step.plan.status.start_time.is_none() {
        step.plan.status.start_time = Some(Time(now));
        if let Some(created) = step.inputs.job.metadata.creation_timestamp.as_ref() {
            let secs = now.duration_since(created.0).as_secs_f64().max(0.0);
            step.plan.signals.push(Signal::FirstRunning(secs));
        }
    }
    let mut requeue = step.inputs.progress_interval;
    if let Some(d) = step.spec().active_deadline_seconds {
        let left = d - active_seconds(&step.plan.status.attempts, now);
        requeue = requeue.min(Duration::from_secs(u64::try_from(left).unwrap_or(0).max(1)));
    }
    step.plan.requeue = Some(requeue);
}

fn deadline_exceeded(deadline: Option<i64>) -> Terminal {
    Terminal {
        phase: Phase::Failed,
        reason: EndReason::DeadlineExceeded,
        message: format!(
            "the job ran for its activeDeadlineSeconds ({}s)",
            deadline.unwrap_or(0)
        ),
    }
}

/// Step 2: close the open attempt: its end, the GPU time it used, its pod, an Event. Returns
/// the job's end when the attempt ran out the job's deadline.
fn close_attempt(step: &mut Step<'_, '_>, ended: &Ended) -> Option<Terminal> {
    let now = step.inputs.now;
    let gpus = f64::from(step.spec().resources.gpu.count.max(1));
    let plan = &mut step.plan;
    let idx = plan.status.attempts.len() - 1;
    let attempt = &mut plan.status.attempts[idx];
    attempt.reason = Some(ended.reason.as_str().to_string());
    attempt.end_time = Some(Time(now));
    let (region, pool) = (attempt.region.clone(), attempt.pool.clone());
    if let Some(start) = &attempt.start_time {
        let secs = now.duration_since(start.0).as_secs_f64().max(0.0) * gpus;
        plan.signals.push(Signal::GpuSeconds {
            region: region.clone(),
            pool: pool.clone(),
            seconds: secs,
        });
    }
    if let Some(pod) = &step.inputs.pod
        && !pod.deleting
        && !matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed)
    {
        plan.delete_pod = Some(pod.name.clone());
    }
    if matches!(ended.reason, EndReason::Preempted | EndReason::NodeLost) {
        plan.signals.push(Signal::Preempted {
            region: region.clone(),
            pool: pool.clone(),
        });
    }
    let warning = !matches!(
        ended.reason,
        EndReason::Completed
            | EndReason::Suspended
            | EndReason::CancelRequested
            | EndReason::ErasureRequested
    );
    plan.notes.push(Note {
        warning,
        reason: format!("Attempt{}", ended.reason.as_str()),
        message: format!(
            "attempt {idx} in {pool} ({region}) ended: {}",
            ended.message
        ),
    });
    (ended.reason == EndReason::DeadlineExceeded)
        .then(|| deadline_exceeded(step.spec().active_deadline_seconds))
}

/// A job that ends before (another) attempt: a stop request, or data lying where the job may
/// not use it (refused before the first pod could read it).
fn refused_before_start(step: &Step<'_, '_>) -> Option<Terminal> {
    if let Some((reason, message)) = stop_requested(step.inputs.job) {
        return Some(Terminal {
            phase: Phase::Cancelled,
            reason,
            message: message.to_string(),
        });
    }
    match &step.inputs.data_location {
        Err(rule) if step.plan.status.attempts.is_empty() => Some(Terminal {
            phase: Phase::Failed,
            reason: EndReason::BadInput,
            message: format!("the job's data is not where it may be used: {rule}"),
        }),
        _ => None,
    }
}

/// Step 3: the job ends: its phase, completion time and conditions.
fn end_job(mut step: Step<'_, '_>, t: Terminal) -> Plan {
    step.plan.status.phase = Some(t.phase);
    step.plan.status.completion_time = Some(Time(step.inputs.now));
    match t.phase {
        Phase::Succeeded => {
            step.cond(
                ConditionType::Running,
                false,
                "Completed",
                "the trainer finished",
            );
            step.cond(ConditionType::Complete, true, t.reason.as_str(), &t.message);
        }
        Phase::Cancelled => {
            step.cond(ConditionType::Running, false, t.reason.as_str(), &t.message);
            step.cond(
                ConditionType::Cancelled,
                true,
                t.reason.as_str(),
                &t.message,
            );
        }
        _ => {
            step.cond(ConditionType::Running, false, t.reason.as_str(), &t.message);
            step.cond(ConditionType::Failed, true, t.reason.as_str(), &t.message);
        }
    }
    step.plan.requeue = None;
    step.finish()
}

/// Step 4: no attempt ends the job: hold it (suspended, still running, backing off after a
/// crash) or start the next attempt.
fn next_attempt(mut step: Step<'_, '_>) -> Plan {
    let running = step
        .plan
        .status
        .attempts
        .last()
        .is_some_and(|a| a.end_time.is_none());
    if step.spec().suspend {
        step.cond(
            ConditionType::Suspended,
            true,
            "JobSuspended",
            "the pod is removed; the claim and checkpoints are kept",
        );
        if !running {
            step.plan.status.phase = Some(Phase::Pending);
            step.cond(
                ConditionType::Running,
                false,
                "JobSuspended",
                "the job is suspended",
            );
        }
        return step.finish();
    }
    if condition_true(&step.plan.status, ConditionType::Suspended) {
        step.cond(
            ConditionType::Suspended,
            false,
            "JobResumed",
            "the job resumes from its last checkpoint",
        );
    }
    if running || backing_off(&mut step) {
        return step.finish();
    }
    let candidates = match &step.inputs.candidates {
        Ok(c) => c,
        Err(why) => {
            step.plan.status.phase = Some(Phase::Failed);
            step.plan.status.completion_time = Some(Time(step.inputs.now));
            step.cond(ConditionType::Failed, true, "InvalidSpec", why);
            return step.finish();
        }
    };
    // The attempt that just ended may have added its pool to the failover round.
    let tried = tried_pools(Some(&step.plan.status));
    let next = next_in_round(candidates, &tried);
    let Some(next) = next else {
        step.plan.status.phase = Some(Phase::Pending);
        step.cond(
            ConditionType::Scheduled,
            false,
            "NoEligiblePool",
            "no configured node pool satisfies the job's residency, region allow-list, GPU and spot policy",
        );
        step.plan.requeue = Some(Duration::from_secs(60));
        return step.finish();
    };
    start_attempt(&mut step, next);
    step.finish()
}

/// After a trainer crash the next attempt waits its backoff; true while it does.
fn backing_off(step: &mut Step<'_, '_>) -> bool {
    let st = &step.plan.status;
    let Some(end) = st
        .attempts
        .last()
        .filter(|a| a.reason.as_deref() == Some(EndReason::TrainerFailed.as_str()))
        .and_then(|a| a.end_time.as_ref())
    else {
        return false;
    };
    let wait = backoff(step.inputs.defaults, st.failures.unwrap_or(1));
    let since = step.inputs.now.duration_since(end.0).as_secs_f64().max(0.0);
    if since >= wait.as_secs_f64() {
        return false;
    }
    step.plan.status.phase = Some(Phase::Pending);
    step.cond(
        ConditionType::Running,
        false,
        "BackOff",
        &format!(
            "retrying after a trainer failure in {}s",
            (wait.as_secs_f64() - since).ceil()
        ),
    );
    step.plan.requeue = Some(Duration::from_secs_f64(
        (wait.as_secs_f64() - since).max(0.05),
    ));
    true
}

/// Starts the next attempt on `next`: resumed from the last checkpoint, a failover Event when
/// it follows another attempt, `Scheduling` until its pod finds a node.
fn start_attempt(step: &mut Step<'_, '_>, next: &Candidate) {
    let now = step.inputs.now;
    let total_steps = step.spec().training.steps;
    let job_name = step.inputs.job.metadata.name.as_deref().unwrap_or("job");
    let plan = &mut step.plan;
    let st = &mut plan.status;
    let index = st.attempts.len();
    let name = pod_name(job_name, index);
    let resumed = st
        .progress
        .as_ref()
        .and_then(|p| p.last_checkpoint_step)
        .unwrap_or(0);
    if let Some(prev) = st.attempts.last()
        && let Some(why) = prev.reason.clone()
    {
        plan.signals.push(Signal::Failover {
            from: prev.region.clone(),
            to: next.region.clone(),
            reason: why.clone(),
        });
        plan.notes.push(Note {
            warning: false,
            reason: "Failover".into(),
            message: format!("attempt {index} moves from {} ({}) to {} ({}) after {why}, resuming from step {resumed}", prev.pool, prev.region, next.pool, next.region),
        });
    }
    st.attempts.push(Attempt {
        region: next.region.clone(),
        pool: next.pool.clone(),
        node: None,
        reason: None,
        start_time: Some(Time(now)),
        end_time: None,
        resumed_from_step: Some(resumed),
    });
    st.placement = Some(PlacementStatus {
        region: next.region.clone(),
        pool: next.pool.clone(),
        node: None,
        pod: Some(name.clone()),
    });
    st.phase = Some(Phase::Scheduling);
    if st.progress.is_none() {
        st.progress = Some(loraplane_crds::v1alpha1::Progress {
            step: 0,
            total_steps,
            summary: Some(progress::summary(0, total_steps)),
            ..Default::default()
        });
    }
    plan.create = Some(NewAttempt {
        index,
        pod_name: name.clone(),
        pool: next.pool.clone(),
        region: next.region.clone(),
    });
    plan.requeue = Some(Duration::from_secs(
        step.inputs.defaults.scheduling_timeout_seconds.max(1),
    ));
    step.cond(
        ConditionType::Scheduled,
        false,
        "PodCreated",
        &format!(
            "pod {name} created for pool {} in {}",
            next.pool, next.region
        ),
    );
    step.cond(
        ConditionType::Running,
        false,
        "WaitingForNode",
        "the trainer has not started yet",
    );
}

/// Adds the phase-transition event.
fn finish_notes(plan: &mut Plan, old_phase: Option<Phase>) {
    let new_phase = plan.status.phase;
    if new_phase != old_phase
        && let Some(phase) = new_phase
    {
        let message = plan
            .status
            .conditions
            .iter()
            .filter(|c| c.status == "True" || phase == Phase::Pending)
            .max_by_key(|c| c.last_transition_time.0)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        plan.notes.push(Note {
            warning: phase == Phase::Failed,
            reason: phase.as_str().to_string(),
            message: format!(
                "phase {} -> {}: {message}",
                old_phase.map_or("<none>", Phase::as_str),
                phase.as_str()
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::{Rng, platform, spec};
    use crate::placement::{self, PoolCapacity};
    use loraplane_crds::platform::Jurisdiction;
    use loraplane_crds::trainer::ArtifactInfo;
    use loraplane_crds::v1alpha1::Residency;
    use std::collections::BTreeMap;

    const T0: i64 = 1_800_000_000;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(T0 + s).unwrap()
    }

    /// The LoRA file the test job's trainer is granted.
    const OWN_OUTPUT: &str = "s3://outputs-eu-west/ns/order-1-uid-1/order-1.safetensors";

    fn job(residency: Residency) -> LoRATrainingJob {
        let mut j = LoRATrainingJob::new("order-1", spec(residency));
        j.metadata.namespace = Some("jobs".into());
        j.metadata.uid = Some("uid-1".into());
        j.metadata.generation = Some(1);
        j.metadata.creation_timestamp = Some(Time(at(0)));
        j
    }

    fn cands(names: &[(&str, &str)]) -> Result<Vec<Candidate>, String> {
        Ok(names
            .iter()
            .map(|(p, r)| Candidate {
                pool: p.to_string(),
                region: r.to_string(),
                spot: false,
                capacity: PoolCapacity::default(),
            })
            .collect())
    }

    fn pod(name: &str, phase: PodPhase) -> PodView {
        PodView {
            name: name.into(),
            created: Some(at(0)),
            phase,
            node: (phase != PodPhase::Pending).then(|| "node-1".to_string()),
            node_exists: true,
            deleting: false,
            unschedulable: None,
            disruption: None,
            exit_code: None,
            summary: None,
        }
    }

    struct Run {
        job: LoRATrainingJob,
        defaults: Defaults,
    }

    impl Run {
        fn new(residency: Residency) -> Run {
            let defaults = Defaults {
                scheduling_timeout_seconds: 60,
                backoff_seconds: 10,
                ..Defaults::default()
            };
            Run {
                job: job(residency),
                defaults,
            }
        }
        /// Decides and stores the status, as the controller would after a successful write.
        fn step(&mut self, now: i64, pod: Option<PodView>, log: Option<LogProgress>) -> Plan {
            let plan = decide(&Inputs {
                job: &self.job,
                pod,
                candidates: cands(&[("eu-west-l4", "eu-west"), ("eu-north-a100", "eu-north")]),
                log,
                data_location: Ok(()),
                outputs: &[OWN_OUTPUT.to_string()],
                defaults: &self.defaults,
                now: at(now),
                progress_interval: Duration::from_secs(10),
            });
            self.job.status = Some(plan.status.clone());
            plan
        }
        fn status(&self) -> &LoRATrainingJobStatus {
            self.job.status.as_ref().unwrap()
        }
        fn cond(&self, t: &str) -> Condition {
            self.status()
                .conditions
                .iter()
                .find(|c| c.type_ == t)
                .cloned()
                .unwrap()
        }
    }

    #[test]
    fn a_new_job_gets_its_first_attempt_and_a_repeat_decision_changes_nothing() {
        let mut r = Run::new(Residency::Eea);
        let plan = r.step(1, None, None);
        let create = plan.create.unwrap();
        assert_eq!((create.index, create.pod_name.as_str()), (0, "order-1-a0"));
        assert_eq!(create.pool, "eu-west-l4");
        let st = r.status().clone();
        assert_eq!(st.phase, Some(Phase::Scheduling));
        assert_eq!(
            st.progress.as_ref().unwrap().summary.as_deref(),
            Some("0/1000 0%")
        );
        assert_eq!(
            st.placement.as_ref().unwrap().pod.as_deref(),
            Some("order-1-a0")
        );
        assert_eq!(r.cond("Scheduled").observed_generation, Some(1));
        assert!(plan.notes.iter().any(|n| n.reason == "Scheduling"));

        // The pod waits for a node: nothing new to do, and the same decision again is stable.
        let plan = r.step(5, Some(pod("order-1-a0", PodPhase::Pending)), None);
        assert!(plan.create.is_none() && plan.delete_pod.is_none());
        let once = r.status().clone();
        let plan = r.step(6, Some(pod("order-1-a0", PodPhase::Pending)), None);
        assert!(plan.create.is_none() && plan.notes.is_empty());
        assert_eq!(r.status(), &once);
        assert_eq!(plan.requeue, Some(Duration::from_secs(54)));
    }

    #[test]
    fn running_reports_progress_and_success_records_artifacts() {
        let mut r = Run::new(Residency::Eea);
        r.step(1, None, None);
        let log = crate::progress::parse_log(
            &loraplane_crds::trainer::TrainerEvent::Progress {
                step: 450,
                total_steps: 1000,
                loss: 0.2,
                steps_per_second: 1.0,
                eta_seconds: 550,
            }
            .to_line(),
        );
        let plan = r.step(20, Some(pod("order-1-a0", PodPhase::Running)), Some(log));
        assert_eq!(plan.signals, vec![Signal::FirstRunning(20.0)]);
        let st = r.status();
        assert_eq!(st.phase, Some(Phase::Running));
        assert_eq!(
            st.progress.as_ref().unwrap().summary.as_deref(),
            Some("450/1000 45%")
        );
        assert_eq!(st.attempts[0].node.as_deref(), Some("node-1"));
        let running_since = r.cond("Running").last_transition_time;

        let mut done = pod("order-1-a0", PodPhase::Succeeded);
        done.exit_code = Some(0);
        done.summary = Some(TrainerSummary {
            outcome: Outcome::Succeeded,
            step: 1000,
            artifacts: vec![
                ArtifactInfo {
                    format: "kohya".into(),
                    uri: OWN_OUTPUT.into(),
                    sha256: "ab".repeat(32),
                    bytes: 1234,
                },
                // A compromised trainer naming another job's file: not recorded, so the API
                // never presigns it.
                ArtifactInfo {
                    format: "diffusers".into(),
                    uri: "s3://outputs-eu-west/ns/other-job-uid-9/lora.safetensors".into(),
                    sha256: "cd".repeat(32),
                    bytes: 99,
                },
            ],
            error: None,
        });
        let plan = r.step(30, Some(done), None);
        let st = r.status();
        assert_eq!(st.phase, Some(Phase::Succeeded));
        assert_eq!(st.artifacts.len(), 1);
        assert_eq!(st.artifacts[0].uri, OWN_OUTPUT);
        assert_eq!(st.artifacts[0].bytes, 1234);
        assert_eq!(st.attempts[0].reason.as_deref(), Some("Completed"));
        assert_eq!(
            st.progress.as_ref().unwrap().summary.as_deref(),
            Some("1000/1000 100%")
        );
        assert_eq!(r.cond("Complete").status, "True");
        assert!(r.cond("Running").last_transition_time.0 > running_since.0);
        assert!(plan.notes.iter().any(|n| n.reason == "Succeeded"));
        assert!(plan.requeue.is_none());
        // Terminal: nothing more happens.
        let plan = r.step(40, None, None);
        assert!(plan.create.is_none() && plan.notes.is_empty());
    }

    #[test]
    fn a_waiting_pod_changes_the_status_only_when_the_scheduler_says_why() {
        let mut r = Run::new(Residency::Eea);
        r.step(0, None, None);
        let created = r.status().clone();
        assert_eq!(r.cond("Scheduled").reason, "PodCreated");
        // Seen pending and unbound, no verdict yet: nothing new to write.
        r.step(2, Some(pod("order-1-a0", PodPhase::Pending)), None);
        assert_eq!(r.status(), &created);
        let mut p = pod("order-1-a0", PodPhase::Pending);
        p.unschedulable = Some("0/4 nodes are available: insufficient nvidia.com/gpu".into());
        r.step(3, Some(p), None);
        let c = r.cond("Scheduled");
        assert_eq!(c.reason, "WaitingForNode");
        assert!(
            c.message.contains("insufficient nvidia.com/gpu"),
            "{}",
            c.message
        );
    }

    #[test]
    fn an_unschedulable_pod_moves_to_the_next_pool_after_the_timeout() {
        let mut r = Run::new(Residency::Eea);
        r.step(0, None, None);
        let mut p = pod("order-1-a0", PodPhase::Pending);
        p.unschedulable = Some("0/4 nodes are available: insufficient nvidia.com/gpu".into());
        let plan = r.step(30, Some(p.clone()), None);
        assert!(plan.create.is_none());
        assert_eq!(r.cond("Scheduled").reason, "WaitingForNode");
        let plan = r.step(61, Some(p), None);
        assert_eq!(plan.delete_pod.as_deref(), Some("order-1-a0"));
        let next = plan.create.unwrap();
        assert_eq!((next.index, next.pool.as_str()), (1, "eu-north-a100"));
        assert_eq!(
            r.status().attempts[0].reason.as_deref(),
            Some("Unschedulable")
        );
        assert_eq!(
            r.status().failures,
            None,
            "capacity is not the trainer's fault"
        );
        assert!(plan.signals.contains(&Signal::Failover {
            from: "eu-west".into(),
            to: "eu-north".into(),
            reason: "Unschedulable".into()
        }));
        assert_eq!(
            tried_pools(r.job.status.as_ref()),
            BTreeSet::from(["eu-west-l4".to_string()])
        );
    }

    #[test]
    fn preemption_and_node_loss_resume_from_the_checkpoint_without_using_backoff() {
        let mut r = Run::new(Residency::Eea);
        r.job.spec.backoff_limit = 0;
        r.step(0, None, None);
        let log = LogProgress {
            latest: Some((130, 1000, 0.3, 100)),
            checkpoint: Some(100),
            resumed_from: None,
            samples: Vec::new(),
        };
        r.step(10, Some(pod("order-1-a0", PodPhase::Running)), Some(log));
        let mut p = pod("order-1-a0", PodPhase::Failed);
        p.disruption = Some("TerminationByKubelet".into());
        p.node_exists = false;
        p.exit_code = Some(143);
        let plan = r.step(20, Some(p), None);
        let st = r.status();
        assert_eq!(st.attempts[0].reason.as_deref(), Some("Preempted"));
        assert_eq!(st.attempts[1].resumed_from_step, Some(100));
        assert_eq!(st.failures, None);
        assert_eq!(st.phase, Some(Phase::Scheduling));
        assert!(
            plan.signals
                .iter()
                .any(|s| matches!(s, Signal::Preempted { .. }))
        );
        assert!(
            plan.signals
                .iter()
                .any(|s| matches!(s, Signal::GpuSeconds { seconds, .. } if *seconds == 20.0))
        );
        assert!(
            plan.delete_pod.is_none(),
            "a terminated pod is kept for its logs"
        );

        // Node lost under a running pod: the taint manager's marks.
        r.step(30, Some(pod("order-1-a1", PodPhase::Running)), None);
        let mut p = pod("order-1-a1", PodPhase::Failed);
        p.disruption = Some("DeletionByTaintManager".into());
        p.exit_code = Some(137);
        let plan = r.step(40, Some(p), None);
        assert_eq!(r.status().attempts[1].reason.as_deref(), Some("NodeLost"));
        assert_eq!(plan.create.unwrap().index, 2);

        // A pod that vanished while its attempt was open.
        let plan = r.step(50, None, None);
        assert_eq!(r.status().attempts[2].reason.as_deref(), Some("NodeLost"));
        assert_eq!(plan.create.unwrap().index, 3);
        assert_eq!(r.status().failures, None);
    }

    #[test]
    fn a_reclaimed_pool_is_tried_last_in_the_next_round() {
        let ended = |pool: &str, why: EndReason| Attempt {
            pool: pool.into(),
            reason: Some(why.as_str().into()),
            end_time: Some(Time(Timestamp::UNIX_EPOCH)),
            ..Attempt::default()
        };
        let with = |attempts: Vec<Attempt>| LoRATrainingJobStatus {
            attempts,
            ..LoRATrainingJobStatus::default()
        };
        let names = |s: &[&str]| s.iter().map(|p| p.to_string()).collect::<BTreeSet<_>>();
        let st = with(vec![ended("spot-a", EndReason::Preempted)]);
        assert_eq!(tried_pools(Some(&st)), names(&["spot-a"]));
        let st = with(vec![
            ended("old", EndReason::Unschedulable),
            ended("spot-a", EndReason::NodeLost),
            ended("b", EndReason::Unschedulable),
        ]);
        assert_eq!(
            tried_pools(Some(&st)),
            names(&["spot-a", "b"]),
            "the round starts at the reclaimed attempt"
        );
        let st = with(vec![ended("a", EndReason::TrainerFailed)]);
        assert!(
            tried_pools(Some(&st)).is_empty(),
            "a crash says nothing about the pool"
        );
    }

    #[test]
    fn bad_input_fails_at_once_and_crashes_back_off_until_the_limit() {
        let mut r = Run::new(Residency::Eea);
        r.step(0, None, None);
        let mut p = pod("order-1-a0", PodPhase::Failed);
        p.exit_code = Some(2);
        let plan = r.step(10, Some(p), None);
        assert_eq!(r.status().phase, Some(Phase::Failed));
        assert_eq!(r.cond("Failed").reason, "BadInput");
        assert!(plan.create.is_none());

        let mut r = Run::new(Residency::Eea);
        r.job.spec.backoff_limit = 1;
        r.step(0, None, None);
        let mut crash = pod("order-1-a0", PodPhase::Failed);
        crash.exit_code = Some(1);
        let plan = r.step(10, Some(crash.clone()), None);
        assert!(plan.create.is_none(), "waits for the back-off");
        assert_eq!(r.status().failures, Some(1));
        assert_eq!(r.cond("Running").reason, "BackOff");
        assert_eq!(plan.requeue, Some(Duration::from_secs(10)));
        let plan = r.step(15, None, None);
        assert!(plan.create.is_none());
        let plan = r.step(20, None, None);
        assert_eq!(plan.create.unwrap().index, 1);
        crash.name = "order-1-a1".into();
        r.step(30, Some(crash), None);
        assert_eq!(r.status().phase, Some(Phase::Failed));
        assert_eq!(r.cond("Failed").reason, "BackoffLimitExceeded");
        assert_eq!(r.status().failures, Some(2));
    }

    #[test]
    fn the_deadline_counts_only_time_with_a_pod() {
        let mut r = Run::new(Residency::Eea);
        r.job.spec.active_deadline_seconds = Some(100);
        r.job.spec.suspend = true;
        r.step(0, None, None);
        assert_eq!(r.cond("Suspended").status, "True");
        // Suspended for a long time: no attempt, no deadline.
        r.job.spec.suspend = false;
        let plan = r.step(1000, None, None);
        assert!(plan.create.is_some());
        assert_eq!(r.cond("Suspended").status, "False");
        let plan = r.step(1050, Some(pod("order-1-a0", PodPhase::Running)), None);
        assert_eq!(plan.requeue, Some(Duration::from_secs(10)));
        let plan = r.step(1100, Some(pod("order-1-a0", PodPhase::Running)), None);
        assert_eq!(plan.delete_pod.as_deref(), Some("order-1-a0"));
        assert_eq!(r.status().phase, Some(Phase::Failed));
        assert_eq!(r.cond("Failed").reason, "DeadlineExceeded");
    }

    #[test]
    fn suspend_removes_the_pod_and_resume_continues_from_the_checkpoint() {
        let mut r = Run::new(Residency::Eea);
        r.step(0, None, None);
        let log = LogProgress {
            latest: Some((250, 1000, 0.3, 100)),
            checkpoint: Some(200),
            resumed_from: None,
            samples: Vec::new(),
        };
        r.step(10, Some(pod("order-1-a0", PodPhase::Running)), Some(log));
        r.job.spec.suspend = true;
        let plan = r.step(20, Some(pod("order-1-a0", PodPhase::Running)), None);
        assert_eq!(plan.delete_pod.as_deref(), Some("order-1-a0"));
        assert!(plan.create.is_none());
        assert_eq!(r.status().phase, Some(Phase::Pending));
        assert_eq!(r.cond("Suspended").status, "True");
        assert_eq!(r.status().attempts[0].reason.as_deref(), Some("Suspended"));
        let plan = r.step(25, None, None);
        assert!(plan.create.is_none() && plan.delete_pod.is_none());
        r.job.spec.suspend = false;
        let plan = r.step(30, None, None);
        assert_eq!(plan.create.unwrap().index, 1);
        assert_eq!(r.status().attempts[1].resumed_from_step, Some(200));
        assert_eq!(r.status().failures, None);
    }

    #[test]
    fn data_outside_the_residency_fails_as_bad_input_before_any_pod() {
        let r = Run::new(Residency::Eea);
        let plan = decide(&Inputs {
            job: &r.job,
            pod: None,
            candidates: cands(&[("eu-west-l4", "eu-west")]),
            log: None,
            data_location: Err(
                "the dataset lies in region us-east (us), which residency eea does not allow"
                    .into(),
            ),
            outputs: &[],
            defaults: &r.defaults,
            now: at(0),
            progress_interval: Duration::from_secs(10),
        });
        assert!(plan.create.is_none(), "no pod may read the data");
        assert_eq!(plan.status.phase, Some(Phase::Failed));
        let failed = plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .unwrap();
        assert_eq!(failed.reason, "BadInput");
        assert!(
            failed.message.contains("residency eea does not allow"),
            "{}",
            failed.message
        );
        assert!(plan.requeue.is_none());
    }

    #[test]
    fn a_stop_request_ends_the_attempt_and_no_attempt_follows() {
        for (erase, why) in [(false, "CancelRequested"), (true, "ErasureRequested")] {
            let mut r = Run::new(Residency::Eea);
            r.step(0, None, None);
            r.step(5, Some(pod("order-1-a0", PodPhase::Running)), None);
            if erase {
                r.job.spec.erasure = Some(loraplane_crds::v1alpha1::ErasureRequest {
                    requested_at: Time(at(6)),
                    reason: loraplane_crds::v1alpha1::ErasureReason::Refund,
                });
            } else {
                r.job.spec.cancel = true;
            }
            let plan = r.step(7, Some(pod("order-1-a0", PodPhase::Running)), None);
            assert_eq!(plan.delete_pod.as_deref(), Some("order-1-a0"));
            assert!(plan.create.is_none());
            assert_eq!(r.status().phase, Some(Phase::Cancelled));
            assert_eq!(r.cond("Cancelled").reason, why);
            assert_eq!(r.status().attempts[0].reason.as_deref(), Some(why));
            // Whatever happens next, nothing starts again.
            let plan = r.step(60, None, None);
            assert!(plan.create.is_none());
            assert_eq!(r.status().attempts.len(), 1);
        }
    }

    #[test]
    fn an_unknown_family_fails_once_and_no_pool_waits() {
        let mut r = Run::new(Residency::Eea);
        let plan = decide(&Inputs {
            job: &r.job,
            pod: None,
            candidates: Err("model family sdxl is not configured on this platform".into()),
            log: None,
            data_location: Ok(()),
            outputs: &[],
            defaults: &r.defaults,
            now: at(0),
            progress_interval: Duration::from_secs(10),
        });
        assert_eq!(plan.status.phase, Some(Phase::Failed));
        assert!(plan.requeue.is_none(), "an invalid job must not hot-loop");
        let plan = decide(&Inputs {
            job: &r.job,
            pod: None,
            candidates: Ok(vec![]),
            log: None,
            data_location: Ok(()),
            outputs: &[],
            defaults: &r.defaults,
            now: at(0),
            progress_interval: Duration::from_secs(10),
        });
        r.job.status = Some(plan.status.clone());
        assert_eq!(r.status().phase, Some(Phase::Pending));
        assert_eq!(r.cond("Scheduled").reason, "NoEligiblePool");
        assert_eq!(plan.requeue, Some(Duration::from_secs(60)));
    }

    #[test]
    fn pod_names_are_valid_and_stable() {
        assert_eq!(pod_name("order-1", 3), "order-1-a3");
        let long = "x".repeat(300);
        assert!(pod_name(&long, 12).len() <= 63);
        assert_eq!(pod_name(&long, 12), pod_name(&long, 12));
    }

    /// Whatever fails, in any order, an `eea` job's attempts all land in EEA regions.
    #[test]
    fn property_eea_residency_holds_through_any_failure_sequence() {
        let mut cfg = platform();
        cfg.regions.push(crate::placement::tests::region(
            "ap-south",
            Jurisdiction::Other,
        ));
        cfg.pools.push(crate::placement::tests::pool(
            "ap-south-h100",
            "ap-south",
            80,
            true,
            0.1,
        ));
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
            let mut r = Run::new(Residency::Eea);
            r.job.spec.backoff_limit = 20;
            let mut t = 0;
            for _ in 0..30 {
                t += 1 + rng.below(120) as i64;
                let capacity: BTreeMap<_, _> = cfg
                    .pools
                    .iter()
                    .map(|p| {
                        (
                            p.name.clone(),
                            PoolCapacity {
                                total: 8,
                                free: rng.below(3) as i64,
                                max_free_on_node: rng.below(2) as i64,
                            },
                        )
                    })
                    .collect();
                let candidates =
                    placement::rank(&r.job.spec, &cfg, &capacity).map_err(|e| e.to_string());
                let open = r
                    .job
                    .status
                    .as_ref()
                    .and_then(|s| s.placement.clone())
                    .and_then(|p| p.pod);
                let pod = open.map(|name| {
                    let phase = [PodPhase::Pending, PodPhase::Running, PodPhase::Failed]
                        [rng.below(3) as usize];
                    let mut p = pod(&name, phase);
                    p.created = Some(at(t - rng.below(200) as i64));
                    match rng.below(4) {
                        0 => p.disruption = Some("TerminationByKubelet".into()),
                        1 => p.node_exists = false,
                        2 => p.exit_code = Some(1),
                        _ => {}
                    }
                    p
                });
                let pod = if rng.below(10) == 0 { None } else { pod };
                let plan = decide(&Inputs {
                    job: &r.job,
                    pod,
                    candidates,
                    log: None,
                    data_location: Ok(()),
                    outputs: &[],
                    defaults: &r.defaults,
                    now: at(t),
                    progress_interval: Duration::from_secs(10),
                });
                r.job.status = Some(plan.status.clone());
                for a in &plan.status.attempts {
                    let j = cfg.region(&a.region).map(|x| x.jurisdiction);
                    assert_eq!(
                        j,
                        Some(Jurisdiction::Eea),
                        "seed {seed}: attempt in {}",
                        a.region
                    );
                }
                if plan.status.phase.is_some_and(Phase::is_terminal) {
                    break;
                }
            }
        }
    }
}
