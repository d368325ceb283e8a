//! The reconcile loop: a kube-runtime `Controller` over LoRATrainingJobs (and the pods they
//! own), run only while this replica holds the leader Lease.
//!
//! Each reconcile is four named steps:
//! 1. **observe**: the current attempt's pod (from the pod watch cache when that is at least as
//!    new as anything this job was last decided on, else read from the API, so an older copy
//!    never walks the phase back or starts a duplicate), whether its node still exists, the
//!    tail of the trainer's log (see `progress` for why `pods/log`), and free GPU capacity per
//!    pool from the Node and Pod caches;
//! 2. **decide**: `status::decide`, a pure function;
//! 3. **apply**: delete the pod being left, server-side apply the Secret and claim, then the
//!    new attempt's pod (deterministic names, so a repeated apply is a no-op);
//! 4. **record**: server-side apply the status (with apiVersion/kind), then Events and metrics.
//!
//! Status writes retrigger the controller; `decide` is idempotent, so the second pass writes
//! nothing. Children carry owner references, so a job's pods, claims and Secret are never
//! orphaned; but a job also owns data in S3, which no garbage collector knows of, so every job
//! carries the `loraplane.io/data` finalizer from its first reconcile on.
//!
//! Once a job has ended, the reconcile runs the lifecycle instead (`lifecycle` decides,
//! `cleanup` acts): release the Secret and finished pods, delete the inputs when they fall due,
//! delete the job object when its outputs do or when erasure is requested; each job is requeued
//! for its own next due time. A job being deleted is *purged*: its pods are deleted and waited
//! for, then its data in every region, its claims and Secret; then the audit record is
//! written and the finalizer removed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use loraplane_crds::LoRATrainingJob;
use tokio::sync::watch;

use crate::audit;
use crate::cleanup::{self, CleanupError, Scope};
use crate::config::Settings;
use crate::corpus;
use crate::grants::{self, GrantError};
use crate::lifecycle::{self, Facts};
use crate::metrics::Metrics;
use crate::placement::{self, PoolCapacity};
use crate::podcache::{self, PodCache, PodSummary, WatchTask};
use crate::progress::{self, TAIL_LINES};
use crate::resources::{self, BuildError};
use crate::status::{self, Inputs, PodPhase, PodView};
use crate::uploads;
use loraplane_crds::LoRATrainingJobStatus;
use loraplane_runtime::leader::Election;
use loraplane_runtime::storage::{Deleted, Storage};

/// `spec.managedBy` values that mean this operator.
const OUR_MANAGERS: [&str; 2] = ["", "loraplane.io/operator"];

/// Reconciles running at once. Unbounded, 10,000 new jobs meant 10,000 reconciles in flight,
/// each holding its job and responses, competing for the apiserver; a bound keeps memory flat
/// and latency fair (first come, first placed).
const CONCURRENCY: u16 = 32;

/// Why a reconcile failed. Variants name the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading the job failed.
    #[error("could not read the job: {0}")]
    GetJob(#[source] kube::Error),
    /// Reading the current pod failed.
    #[error("could not read pod {0}: {1}")]
    GetPod(String, #[source] kube::Error),
    /// Reading a node failed.
    #[error("could not read node {0}: {1}")]
    GetNode(String, #[source] kube::Error),
    /// A child object could not be built.
    #[error("could not build a child object: {0}")]
    Build(#[from] BuildError),
    /// Granting the attempt its objects (presigned URLs) failed.
    #[error("could not grant the attempt its S3 objects: {0}")]
    Grant(#[from] GrantError),
    /// Applying the trainer-config Secret failed.
    #[error("could not apply the trainer-config Secret: {0}")]
    ApplySecret(#[source] kube::Error),
    /// Applying the scratch claim failed.
    #[error("could not apply the scratch claim: {0}")]
    ApplyClaim(#[source] kube::Error),
    /// Creating the training pod failed.
    #[error("could not create pod {0}: {1}")]
    CreatePod(String, #[source] kube::Error),
    /// Deleting a training pod failed.
    #[error("could not delete pod {0}: {1}")]
    DeletePod(String, #[source] kube::Error),
    /// Writing the status failed.
    #[error("could not patch the job status: {0}")]
    PatchStatus(#[source] kube::Error),
    /// A lifecycle step (finalizer, release, deletion, audit) failed.
    #[error(transparent)]
    Cleanup(#[from] CleanupError),
}

impl ReconcileError {
    /// The metric label of the failed step.
    pub fn reason(&self) -> &'static str {
        match self {
            ReconcileError::GetJob(_) => "GetJob",
            ReconcileError::GetPod(..) => "GetPod",
            ReconcileError::GetNode(..) => "GetNode",
            ReconcileError::Build(_) => "Build",
            ReconcileError::Grant(_) => "Grant",
            ReconcileError::ApplySecret(_) => "ApplySecret",
            ReconcileError::ApplyClaim(_) => "ApplyClaim",
            ReconcileError::CreatePod(..) => "CreatePod",
            ReconcileError::DeletePod(..) => "DeletePod",
            ReconcileError::PatchStatus(_) => "PatchStatus",
            ReconcileError::Cleanup(e) => e.step(),
        }
    }
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The CRD never became available before shutdown.
    #[error("stopped while waiting for the LoRATrainingJob CRD")]
    WaitForCrd,
    /// Leadership was lost; the process should exit and start over as a standby.
    #[error("lost the leader Lease")]
    LostLeadership,
    /// The metrics registry could not be built.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// Shared state of every reconcile.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Operator settings.
    pub settings: Arc<Settings>,
    /// The one event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Node cache.
    pub nodes: Store<Node>,
    /// What is known of every pod: GPUs in use per node, pods per job.
    pub pods: PodCache,
    /// S3 in every region: where a job's data is deleted.
    pub storage: Storage,
    /// The controller's job cache: which other jobs read the same dataset.
    pub jobs: Store<LoRATrainingJob>,
    /// The resourceVersion of the last status this replica wrote, per job uid.
    written: std::sync::Mutex<HashMap<String, String>>,
    /// Per job uid, its current pod and the newest resourceVersion of it a decision was
    /// based on: the pod cache serves the next decision only once it has caught up to that.
    pod_floors: std::sync::Mutex<HashMap<String, (String, u64)>>,
}

/// The watch caches a reconcile reads instead of the apiserver.
pub struct Caches {
    /// Nodes.
    pub nodes: Store<Node>,
    /// Pods.
    pub pods: PodCache,
    /// Jobs (the controller's own store).
    pub jobs: Store<LoRATrainingJob>,
}

impl Context {
    /// Shared state for a reconciler with these caches.
    pub fn new(
        client: Client,
        settings: Arc<Settings>,
        recorder: Recorder,
        metrics: Metrics,
        storage: Storage,
        caches: Caches,
    ) -> Context {
        let Caches { nodes, pods, jobs } = caches;
        Context {
            client,
            settings,
            recorder,
            metrics,
            nodes,
            pods,
            storage,
            jobs,
            written: std::sync::Mutex::new(HashMap::new()),
            pod_floors: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn pod_floors(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, u64)>> {
        self.pod_floors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that a decision for job `uid` is being based on `pod` at resourceVersion `rv`.
    fn raise_pod_floor(&self, uid: &str, pod: &str, rv: Option<u64>) {
        if let Some(rv) = rv {
            self.pod_floors()
                .insert(uid.to_string(), (pod.to_string(), rv));
        }
    }

    fn forget(&self, uid: &str) {
        self.written().remove(uid);
        self.pod_floors().remove(uid);
    }

    /// The current attempt's pod as the decision sees it. The watch cache answers when it is
    /// at least as new as anything this job was decided on (the pod as created, or as last
    /// read); otherwise (not seen yet, or behind) the API does. A decision on an older copy
    /// could walk the job's phase backwards.
    async fn current_pod(
        &self,
        pods: &Api<Pod>,
        ids: &resources::JobIds,
        name: &str,
    ) -> Result<Option<PodView>, ReconcileError> {
        let floor = self
            .pod_floors()
            .get(&ids.uid)
            .filter(|(pod, _)| pod == name)
            .map(|(_, rv)| *rv);
        let cached = self.pods.read(|index| index.view(&ids.namespace, name));
        let mut view = match cached {
            Some(c) if podcache::cache_serves(c.1, floor) => {
                self.raise_pod_floor(&ids.uid, name, c.1);
                c.0.clone()
            }
            _ => {
                let Some(pod) = pods
                    .get_opt(name)
                    .await
                    .map_err(|e| ReconcileError::GetPod(name.to_string(), e))?
                else {
                    return Ok(None);
                };
                self.raise_pod_floor(&ids.uid, name, podcache::resource_version(&pod));
                PodView::from_pod(&pod, |_| true)
            }
        };
        if let Some(node) = &view.node {
            view.node_exists = self.node_exists(node).await?;
        }
        Ok(Some(view))
    }

    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.written.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the cached job is exactly the one our last status write produced: then it is
    /// current as far as this replica's own writes go, and the read can be skipped (any later
    /// write by someone else changes the resourceVersion and brings a new event anyway).
    fn cache_is_our_last_write(&self, job: &LoRATrainingJob, uid: &str) -> bool {
        job.metadata
            .resource_version
            .as_ref()
            .is_some_and(|rv| self.written().get(uid) == Some(rv))
    }

    /// Free GPUs per pool, from the Node cache and the GPUs in use the pod index maintains
    /// (a few dozen nodes to walk, never every pod).
    fn capacity(&self) -> BTreeMap<String, PoolCapacity> {
        let nodes = self.nodes.state();
        self.pods.read(|index| {
            placement::pool_capacity_with_usage(
                &self.settings.platform,
                nodes.iter().map(|n| n.as_ref()),
                |node| index.used_gpus(node),
            )
        })
    }

    async fn node_exists(&self, name: &str) -> Result<bool, ReconcileError> {
        if self.nodes.get(&reflector::ObjectRef::new(name)).is_some() {
            return Ok(true);
        }
        // The cache may simply not have seen a new node yet: ask before declaring it lost.
        Api::<Node>::all(self.client.clone())
            .get_opt(name)
            .await
            .map(|n| n.is_some())
            .map_err(|e| ReconcileError::GetNode(name.to_string(), e))
    }
}

fn is_ours(job: &LoRATrainingJob) -> bool {
    OUR_MANAGERS.contains(&job.spec.managed_by.as_deref().unwrap_or(""))
}

/// One reconcile of one job.
pub async fn reconcile(
    job: Arc<LoRATrainingJob>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_inner(&job, &ctx).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconcile_duration
        .with_label_values(&[outcome])
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(
    cached: &LoRATrainingJob,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let Ok(ids) = resources::JobIds::of(cached) else {
        return Ok(Action::await_change());
    };
    // Decide from the stored object, not the cache: a status written a moment ago may not
    // have reached the cache, and acting on the older one would undo it (the status write's
    // resourceVersion precondition catches what races remain).
    let fresh = if ctx.cache_is_our_last_write(cached, &ids.uid) {
        Some(cached.clone())
    } else {
        Api::<LoRATrainingJob>::namespaced(ctx.client.clone(), &ids.namespace)
            .get_opt(&ids.name)
            .await
            .map_err(ReconcileError::GetJob)?
    };
    let Some(fresh) = fresh else {
        ctx.forget(&ids.uid);
        return Ok(Action::await_change());
    };
    if !is_ours(&fresh) {
        return Ok(Action::await_change());
    }
    let facts = Facts::of(&fresh);
    if facts.deleting {
        if !facts.guarded {
            return Ok(Action::await_change());
        }
        return purge(ctx, &fresh, &ids, &facts).await;
    }
    // The finalizer goes on before the first pod can write anything to S3.
    let fresh = if facts.guarded {
        fresh
    } else {
        cleanup::add_finalizer(&ctx.client, &fresh, &ids).await?
    };
    let job = &fresh;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ids.namespace);
    if facts.ended {
        // Whatever ended the job, no training pod may keep running.
        delete_stray_pods(ctx, &pods, &ids, None, None).await?;
        return run_chores(ctx, job, &ids, &facts).await;
    }
    let settings = &ctx.settings;

    // Step 1: observe.
    let status = job.status.as_ref();
    let open_pod = status
        .filter(|s| s.attempts.last().is_some_and(|a| a.end_time.is_none()))
        .and_then(|s| s.placement.as_ref())
        .and_then(|p| p.pod.clone());
    let mut view = None;
    let mut log = None;
    if let Some(name) = &open_pod
        && let Some(v) = ctx.current_pod(&pods, &ids, name).await?
    {
        if v.phase != PodPhase::Pending {
            log = read_log(&pods, name).await;
        }
        view = Some(v);
    }
    let capacity = ctx.capacity();
    let candidates =
        placement::rank(&job.spec, &settings.platform, &capacity).map_err(|e| e.to_string());

    let data_location =
        placement::check_data_location(&job.spec, &settings.platform).map_err(|e| e.to_string());

    // Step 2: decide.
    let now = Timestamp::now();
    // The LoRA files this job's trainer may write (home region per its first attempt).
    let current_region = job
        .status
        .as_ref()
        .and_then(|s| s.attempts.last())
        .map_or("", |a| a.region.as_str());
    let outputs =
        resources::output_uris(job, &settings.platform, current_region).unwrap_or_default();
    let plan = status::decide(&Inputs {
        job,
        outputs: &outputs,
        pod: view,
        candidates,
        log,
        data_location,
        defaults: &settings.platform.defaults,
        now,
        progress_interval: settings.progress_interval,
    });

    // Step 3: apply.
    if let Some(name) = &plan.delete_pod {
        // A job stopped for good needs no graceful checkpoint: the trainer gets a second.
        let params = if status::stop_requested(job).is_some() {
            cleanup::stop_params()
        } else {
            DeleteParams::default()
        };
        match pods.delete(name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(ReconcileError::DeletePod(name.clone(), e)),
        }
    }
    if let Some(next) = &plan.create {
        start_attempt(ctx, job, &ids, &pods, &plan, next, now).await?;
    }

    // A pod of this job that is neither the current attempt's nor finished is left over
    // from a decision whose status write was lost: remove it, so a job never runs twice.
    let current = plan.status.placement.as_ref().and_then(|p| p.pod.clone());
    let open_now = plan
        .status
        .attempts
        .last()
        .is_some_and(|a| a.end_time.is_none());
    let keep = current.as_deref().filter(|_| open_now);
    delete_stray_pods(ctx, &pods, &ids, keep, plan.delete_pod.as_deref()).await?;

    // Step 4: record.
    record(ctx, job, &ids, &plan).await?;
    Ok(match plan.requeue {
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    })
}

/// Starts the attempt the decision asked for: its trainer config (with presigned grants) in
/// the job's Secret, its scratch claim, its pod, all server-side applied, so a repeat is a
/// no-op.
async fn start_attempt(
    ctx: &Context,
    job: &LoRATrainingJob,
    ids: &resources::JobIds,
    pods: &Api<Pod>,
    plan: &status::Plan,
    next: &status::NewAttempt,
    now: Timestamp,
) -> Result<(), ReconcileError> {
    let settings = &ctx.settings;
    let pool = settings
        .platform
        .pools
        .iter()
        .find(|p| p.name == next.pool)
        .ok_or_else(|| BuildError::UnknownPool(next.pool.clone()))?;
    // The next attempt's config is built from the job as it will be after this status
    // write, so its home region is the one status will record.
    let mut future_job = job.clone();
    future_job.status = Some(plan.status.clone());
    let params = PatchParams::apply(&settings.field_manager).force();
    // The attempt's whole access to S3: presigned URLs for its own objects, in the
    // Secret beside the customer's text.
    let mut trainer = resources::trainer_config(&future_job, &settings.platform, &next.region)?;
    let family_weights = settings
        .platform
        .family(job.spec.base_model.family)
        .map_or("", |f| f.weights.as_str());
    let grant_plan = grants::plan(&trainer, family_weights)?;
    trainer.grants = grants::presign(
        &ctx.storage,
        &grant_plan,
        grants::lifetime(&future_job, now),
        now,
    )
    .await?;
    let secret = resources::config_secret(&future_job, &trainer)?;
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(ctx.client.clone(), &ids.namespace)
        .patch(
            &resources::secret_name(&ids.name),
            &params,
            &Patch::Apply(&secret),
        )
        .await
        .map_err(ReconcileError::ApplySecret)?;
    if let Some(claim) = resources::scratch_claim(&future_job, &settings.platform, &next.region)? {
        let name = claim.name_any();
        Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(
            ctx.client.clone(),
            &ids.namespace,
        )
        .patch(&name, &params, &Patch::Apply(&claim))
        .await
        .map_err(ReconcileError::ApplyClaim)?;
    }
    let pod = resources::trainer_pod(
        &future_job,
        &settings.platform,
        pool,
        &next.pod_name,
        next.index,
    )?;
    let created = pods
        .patch(&next.pod_name, &params, &Patch::Apply(&pod))
        .await
        .map_err(|e| ReconcileError::CreatePod(next.pod_name.clone(), e))?;
    ctx.raise_pod_floor(
        &ids.uid,
        &next.pod_name,
        podcache::resource_version(&created),
    );
    if next.index == 0
        && let Some(created) = job.metadata.creation_timestamp.as_ref()
    {
        let secs = now.duration_since(created.0).as_secs_f64().max(0.0);
        ctx.metrics.creation_to_pod.observe(secs);
    }
    tracing::info!(job = %ids.name, namespace = %ids.namespace, pod = %next.pod_name,
        pool = %next.pool, region = %next.region, attempt = next.index, "started attempt");
    Ok(())
}

/// Writes the decided status if it changed, then what it implies: metrics, Events, the log
/// line of a phase change (only once the status that records them is stored).
async fn record(
    ctx: &Context,
    job: &LoRATrainingJob,
    ids: &resources::JobIds,
    plan: &status::Plan,
) -> Result<(), ReconcileError> {
    if job.status.as_ref() != Some(&plan.status) {
        write_status(ctx, job, ids, &plan.status).await?;
        ctx.metrics.record(&plan.signals);
        let reference = job.object_ref(&());
        for note in &plan.notes {
            let event = Event {
                type_: if note.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: note.reason.clone(),
                note: Some(note.message.clone()),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                tracing::debug!(error = %e, "could not publish an event");
            }
        }
        if let Some(phase) = plan.status.phase
            && job.status.as_ref().and_then(|s| s.phase) != Some(phase)
        {
            tracing::info!(job = %ids.name, namespace = %ids.namespace, phase = phase.as_str(), "phase changed");
        }
    }
    Ok(())
}

/// Server-side applies the job's whole status, as of the job version it was decided from
/// (a concurrent change makes it fail with 409, and the next reconcile decides again).
async fn write_status(
    ctx: &Context,
    job: &LoRATrainingJob,
    ids: &resources::JobIds,
    status: &LoRATrainingJobStatus,
) -> Result<(), ReconcileError> {
    let body = serde_json::json!({
        "apiVersion": LoRATrainingJob::api_version(&()),
        "kind": LoRATrainingJob::kind(&()),
        "metadata": {"resourceVersion": job.metadata.resource_version},
        "status": status,
    });
    let stored = Api::<LoRATrainingJob>::namespaced(ctx.client.clone(), &ids.namespace)
        .patch_status(
            &ids.name,
            &PatchParams::apply(&ctx.settings.field_manager).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(ReconcileError::PatchStatus)?;
    if let Some(rv) = stored.metadata.resource_version {
        ctx.written().insert(ids.uid.clone(), rv);
    }
    Ok(())
}

/// Whether another job that is not being deleted reads the same dataset (from the cache: the
/// API refuses a second order on one upload, this is the second line of defence).
fn dataset_shared(ctx: &Context, job: &LoRATrainingJob, ids: &resources::JobIds) -> bool {
    ctx.jobs.state().iter().any(|other| {
        other.metadata.uid.as_deref() != Some(ids.uid.as_str())
            && other.metadata.deletion_timestamp.is_none()
            && other.spec.dataset.uri == job.spec.dataset.uri
    })
}

fn time_at(secs: i64) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    Timestamp::from_second(secs)
        .ok()
        .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
}

/// Adds what a deletion removed to the job's running totals (the audit record's counts).
fn count_deleted(ret: &mut loraplane_crds::v1alpha1::RetentionStatus, d: Deleted) {
    let add = |total: Option<i64>, n: u64| {
        Some(
            total
                .unwrap_or(0)
                .saturating_add(i64::try_from(n).unwrap_or(i64::MAX)),
        )
    };
    ret.deleted_objects = add(ret.deleted_objects, d.objects);
    ret.deleted_bytes = add(ret.deleted_bytes, d.bytes);
}

/// Records a failed deletion on the job (condition `Deleting`, reason `DeletionFailed`), so a
/// stalled cleanup is visible in `kubectl describe`; the error itself goes on to the error
/// policy, which retries.
async fn record_deletion_failure(
    ctx: &Context,
    job: &LoRATrainingJob,
    ids: &resources::JobIds,
    error: &CleanupError,
) {
    let mut st = job.status.clone().unwrap_or_default();
    status::set_condition(
        &mut st.conditions,
        status::ConditionType::Deleting,
        true,
        "DeletionFailed",
        &format!("{}; retrying", error.log_safe()),
        job.metadata.generation,
        Timestamp::now(),
    );
    if job.status.as_ref() != Some(&st)
        && let Err(e) = write_status(ctx, job, ids, &st).await
    {
        tracing::debug!(job = %ids.name, error = %e, "could not record the deletion failure");
    }
}

/// An ended job's lifecycle: release what no pod needs, delete inputs when due, delete the job
/// object when its outputs are due or erasure was requested; then wait for the next due time.
async fn run_chores(
    ctx: &Context,
    job: &LoRATrainingJob,
    ids: &resources::JobIds,
    facts: &Facts,
) -> Result<Action, ReconcileError> {
    let now = lifecycle::now_secs();
    let chores = lifecycle::chores(facts, now);
    let schedule = lifecycle::schedule(facts);
    let mut st = job.status.clone().unwrap_or_default();
    let mut ret = st.retention.clone().unwrap_or_default();
    if let Some(s) = schedule {
        ret.inputs_expire_at = time_at(s.inputs_expire_at);
        ret.outputs_expire_at = time_at(s.outputs_expire_at);
    }
    let result = async {
        if chores.release {
            let finished: Vec<String> = ctx
                .pods
                .read(|index| index.pods_of_job(&ids.uid))
                .into_iter()
                .filter(|p| p.namespace == ids.namespace && !p.deleting)
                .map(|p| p.name)
                .collect();
            cleanup::release(&ctx.client, ids, &finished).await?;
            ret.released_at = time_at(now);
        }
        if chores.copy_to_corpus
            && let Some(corpus) = corpus::bucket_for(&ctx.storage, job)
        {
            let copied = corpus::copy(&ctx.storage, job, ids, corpus)
                .await
                .map_err(CleanupError::CopyToCorpus)?;
            tracing::info!(job = %ids.name, namespace = %ids.namespace, objects = copied.objects,
                bytes = copied.bytes, "copied into the consented corpus");
            ret.corpus_copied_at = time_at(now);
        }
        if chores.delete_corpus {
            let deleted = corpus::delete(&ctx.storage, ids).await?;
            count_deleted(&mut ret, deleted);
            ret.corpus_deleted_at = time_at(now);
            ctx.metrics
                .record_deletion("corpus", "withdrawal", deleted.bytes, 0.0);
        }
        if chores.delete_inputs {
            let shared = dataset_shared(ctx, job, ids);
            let deleted =
                cleanup::delete_data(&ctx.client, &ctx.storage, job, ids, Scope::Inputs, shared)
                    .await?;
            count_deleted(&mut ret, deleted);
            ret.inputs_deleted_at = time_at(now);
            let due = schedule.map_or(now, |s| s.inputs_expire_at);
            ctx.metrics
                .record_deletion("inputs", "retention", deleted.bytes, (now - due) as f64);
        }
        Ok::<(), CleanupError>(())
    }
    .await;
    if let Err(e) = result {
        record_deletion_failure(ctx, job, ids, &e).await;
        return Err(e.into());
    }
    if st.retention.as_ref() != Some(&ret) {
        st.retention = Some(ret);
        write_status(ctx, job, ids, &st).await?;
    }
    if let Some(cause) = chores.delete_job {
        tracing::info!(job = %ids.name, namespace = %ids.namespace, reason = cause.as_str(), "deleting the job and its data");
        // The purge starts in this reconcile, on the object the delete returned, rather
        // than after a round through the queue.
        return match cleanup::delete_job(&ctx.client, ids).await? {
            Some(deleting) => purge(ctx, &deleting, ids, &Facts::of(&deleting)).await,
            None => Ok(Action::await_change()),
        };
    }
    ctx.pod_floors().remove(&ids.uid);
    Ok(match chores.wake_at {
        // Just after the due second, so the decision sees it as due.
        Some(at) => Action::requeue(Duration::from_millis(
            u64::try_from(at - now).unwrap_or(0) * 1000 + 50,
        )),
        None => Action::await_change(),
    })
}

/// A job being deleted: stop its pods and wait for them, delete its data everywhere, write the
/// audit record, remove the finalizer. Each step is idempotent; a failure is recorded on the
/// job and retried.
async fn purge(
    ctx: &Context,
    job: &LoRATrainingJob,
    ids: &resources::JobIds,
    facts: &Facts,
) -> Result<Action, ReconcileError> {
    let now = Timestamp::now();
    let cause = lifecycle::cause(facts, now.as_second());
    let mut st = job.status.clone().unwrap_or_default();
    let progress = |st: &mut LoRATrainingJobStatus, message: &str| {
        status::set_condition(
            &mut st.conditions,
            status::ConditionType::Deleting,
            true,
            cause.condition_reason(),
            message,
            job.metadata.generation,
            now,
        );
    };
    let left = match cleanup::stop_pods(&ctx.client, ids).await {
        Ok(n) => n,
        Err(e) => {
            record_deletion_failure(ctx, job, ids, &e).await;
            return Err(e.into());
        }
    };
    if left > 0 {
        progress(
            &mut st,
            &format!("waiting for {left} pod(s) to stop before the data is deleted"),
        );
        if job.status.as_ref() != Some(&st) {
            write_status(ctx, job, ids, &st).await?;
        }
        // Pod deletions wake the controller; the requeue is only a safety net.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let shared = dataset_shared(ctx, job, ids);
    let takes_corpus = lifecycle::purge_takes_corpus(facts);
    let deleted = async {
        let mut deleted =
            cleanup::delete_data(&ctx.client, &ctx.storage, job, ids, Scope::All, shared).await?;
        if takes_corpus {
            deleted += corpus::delete(&ctx.storage, ids).await?;
        }
        Ok::<_, CleanupError>(deleted)
    }
    .await;
    let deleted = match deleted {
        Ok(d) => d,
        Err(e) => {
            record_deletion_failure(ctx, job, ids, &e).await;
            return Err(e.into());
        }
    };
    let record = audit::record(
        &ctx.settings.audit_namespace,
        &audit::Entry {
            job,
            cause,
            deleted,
            corpus_kept: facts.corpus_copied && !facts.corpus_deleted && !takes_corpus,
            at: Timestamp::now(),
            keep: ctx.settings.audit_keep,
        },
    );
    cleanup::write_audit(&ctx.client, &record).await?;
    cleanup::remove_finalizer(&ctx.client, job, ids).await?;
    let since = match (cause, &job.spec.erasure) {
        (lifecycle::Cause::Erasure(_), Some(e)) => e.requested_at.0.as_second(),
        _ => lifecycle::schedule(facts).map_or(now.as_second(), |s| s.outputs_expire_at),
    };
    let lag =
        (Timestamp::now().as_millisecond() - since.saturating_mul(1000)).max(0) as f64 / 1000.0;
    ctx.metrics
        .record_deletion("job", cause.as_str(), deleted.bytes, lag);
    ctx.forget(&ids.uid);
    tracing::info!(job = %ids.name, namespace = %ids.namespace, reason = cause.as_str(),
        objects = deleted.objects, bytes = deleted.bytes, audit = %record.metadata.name.as_deref().unwrap_or_default(),
        "job and its data deleted");
    Ok(Action::await_change())
}

async fn read_log(pods: &Api<Pod>, name: &str) -> Option<progress::LogProgress> {
    let params = LogParams {
        container: Some(resources::TRAINER_CONTAINER.into()),
        tail_lines: Some(TAIL_LINES),
        ..LogParams::default()
    };
    match pods.logs(name, &params).await {
        Ok(text) => Some(progress::parse_log(&text)),
        Err(e) => {
            // Progress is best effort: a missing log must not stall the lifecycle.
            tracing::debug!(pod = %name, error = %e, "could not read the trainer log");
            None
        }
    }
}

/// Requeues a failed reconcile after a pause, so an error never hot-loops.
pub fn error_policy(
    job: Arc<LoRATrainingJob>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.reason()])
        .inc();
    tracing::warn!(job = %job.name_any(), namespace = ?job.namespace(), error = %error, "reconcile failed");
    Action::requeue(ctx.settings.error_requeue)
}

/// Waits until the LoRATrainingJob API is served, saying what to do meanwhile.
pub async fn wait_for_crd(
    client: &Client,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let api: Api<LoRATrainingJob> = Api::all(client.clone());
    let mut warned = false;
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e,
                        "waiting for the CRD loratrainingjobs.loraplane.io to be installed \
                         (kubectl apply -f crds/loratrainingjob.yaml, or install the Helm chart)");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return Err(RunError::WaitForCrd),
        }
        if *shutdown.borrow() {
            return Err(RunError::WaitForCrd);
        }
    }
}

/// Health flags served on `/healthz` and `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// The CRD was found and the election is running.
    pub ready: AtomicBool,
    /// This replica currently leads.
    pub leading: AtomicBool,
}

fn reflect<K>(api: Api<K>, cfg: watcher::Config) -> (Store<K>, WatchTask)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, cfg).modify(|o| o.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();
    let task = tokio::spawn(async move {
        stream.for_each(|_| futures::future::ready(())).await;
    });
    (reader, WatchTask(task))
}

/// Runs the operator until `shutdown` fires (`Ok`) or leadership is lost (`Err`).
pub async fn run(
    client: Client,
    settings: Settings,
    storage: Storage,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    wait_for_crd(&client, shutdown.clone()).await?;
    let settings = Arc::new(settings);
    let (leading_tx, mut leading_rx) = watch::channel(false);
    let election = Election {
        namespace: settings.lease_namespace.clone(),
        name: settings.lease_name.clone(),
        identity: settings.identity.clone(),
        lease_duration: settings.lease_duration,
    };
    let election_task = tokio::spawn(election.run(client.clone(), leading_tx, shutdown.clone()));
    health.ready.store(true, Ordering::SeqCst);
    tracing::info!(identity = %settings.identity, "waiting to become the leader");
    let mut stop = shutdown.clone();
    loop {
        if *leading_rx.borrow() {
            break;
        }
        tokio::select! {
            changed = leading_rx.changed() => if changed.is_err() { return Err(RunError::LostLeadership) },
            _ = stop.changed() => {
                let _ = election_task.await;
                return Ok(());
            }
        }
    }
    health.leading.store(true, Ordering::SeqCst);
    metrics.leader.set(1);

    let (nodes, _nodes_watch) =
        reflect(Api::<Node>::all(client.clone()), watcher::Config::default());
    let (all_pods, pod_triggers, _pods_watch) = PodCache::spawn(client.clone());
    let jobs: Api<LoRATrainingJob> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let reporter = Reporter {
        controller: crate::config::FIELD_MANAGER.into(),
        instance: Some(settings.identity.clone()),
    };
    // Pod events reach the controller through the pod cache, after the cache has them (not
    // through a second watch that could run ahead of it): the decision reads the pod from
    // the cache, and must see the very change that woke it.
    let controller = Controller::new(jobs, watcher::Config::default())
        .reconcile_on(pod_triggers)
        .with_config(controller::Config::default().concurrency(CONCURRENCY));
    metrics.watch_jobs(controller.store());
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings.clone(),
        Recorder::new(client.clone(), reporter),
        metrics.clone(),
        storage,
        Caches {
            nodes,
            pods: all_pods,
            jobs: controller.store(),
        },
    ));
    let _audit_sweep = WatchTask(tokio::spawn(sweep_audit_records(
        client.clone(),
        settings.clone(),
    )));
    let _upload_sweep = WatchTask(tokio::spawn(sweep_uploads(ctx.clone())));

    let lost = Arc::new(AtomicBool::new(false));
    let lost_flag = lost.clone();
    let mut stop = shutdown.clone();
    let (stopping_tx, mut stopping) = watch::channel(false);
    let stop_signal = async move {
        loop {
            tokio::select! {
                r = leading_rx.changed() => {
                    if r.is_err() || !*leading_rx.borrow() {
                        lost_flag.store(true, Ordering::SeqCst);
                        break;
                    }
                }
                _ = stop.changed() => break,
            }
        }
        stopping_tx.send_replace(true);
    };
    tracing::info!("leading: reconciling LoRATrainingJobs");
    let reconciling = controller
        .graceful_shutdown_on(stop_signal)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
            futures::future::ready(())
        });
    // A graceful shutdown waits for the reconciles in flight, but kube-runtime's runner also
    // waits, with nothing left to wake it, for a job store that has not finished its first
    // list when the shutdown begins (the watch that would fill it has stopped). So the wait
    // is bounded; a reconcile cut short is repeated by the next leader, as after a crash.
    let grace = settings.shutdown_grace;
    let deadline = async move {
        if stopping.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = reconciling => {}
        () = deadline => tracing::warn!(?grace, "reconciles still in flight after the shutdown grace period; stopping without them"),
    }
    health.leading.store(false, Ordering::SeqCst);
    metrics.leader.set(0);
    // Releasing the Lease on shutdown also flips `leading`; that is not a loss.
    if lost.load(Ordering::SeqCst) && !*shutdown.borrow() {
        election_task.abort();
        return Err(RunError::LostLeadership);
    }
    let _ = election_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Deletes audit records whose `keepUntil` has passed, once at start and then every
/// `audit_sweep`: one list of the records (never of the jobs) per sweep.
async fn sweep_audit_records(client: Client, settings: Arc<Settings>) {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client, &settings.audit_namespace);
    let selector = format!(
        "{}={}",
        loraplane_crds::layout::LABEL_RECORD,
        loraplane_crds::layout::AUDIT_RECORD
    );
    loop {
        match api.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => {
                let now = Timestamp::now();
                for record in list.items.iter().filter(|r| audit::expired(r, now)) {
                    let name = record.name_any();
                    if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
                        tracing::warn!(record = %name, error = %e, "could not delete an expired audit record");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list audit records"),
        }
        tokio::time::sleep(settings.audit_sweep).await;
    }
}

/// Deletes uploads no order consumed once they are `uploadTtlSeconds` old, every
/// `upload_sweep`, and only once the job cache has been filled (an empty cache would make
/// every upload look unordered).
async fn sweep_uploads(ctx: Arc<Context>) {
    let ttl = i64::try_from(ctx.settings.platform.defaults.upload_ttl_seconds).unwrap_or(i64::MAX);
    loop {
        tokio::time::sleep(ctx.settings.upload_sweep).await;
        // The store's readiness is a oneshot that wakes only its latest waiter, and the
        // controller's runner waits on it too: look without waiting, a whole interval after
        // the start, when the first list is long done.
        let ready = tokio::time::timeout(Duration::ZERO, ctx.jobs.wait_until_ready()).await;
        if !matches!(ready, Ok(Ok(()))) {
            continue;
        }
        let now = lifecycle::now_secs();
        match uploads::sweep(&ctx.storage, &ctx.jobs.state(), now, ttl).await {
            Ok(swept) if !swept.is_empty() => {
                tracing::info!(
                    objects = swept.len(),
                    bytes = swept.iter().map(|o| o.bytes).sum::<u64>(),
                    "deleted uploads no order consumed and expired drafts"
                );
                // One deletion each, as a job's data is one deletion.
                for o in swept {
                    ctx.metrics
                        .record_deletion("upload", "unordered", o.bytes, o.lag as f64);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not sweep unordered uploads"),
        }
    }
}

/// Deletes this job's unfinished pods other than `keep`. `just_deleted` is a pod this
/// reconcile already deleted (it may still look alive in the cache).
async fn delete_stray_pods(
    ctx: &Context,
    pods: &Api<Pod>,
    ids: &resources::JobIds,
    keep: Option<&str>,
    just_deleted: Option<&str>,
) -> Result<(), ReconcileError> {
    let mine = ctx.pods.read(|index| index.pods_of_job(&ids.uid));
    for pod in mine {
        let name = pod.name;
        if pod.namespace == ids.namespace
            && !pod.finished
            && keep != Some(name.as_str())
            && just_deleted != Some(name.as_str())
            && !pod.deleting
        {
            // The cache may not have seen the pod finish yet, and a finished pod goes at once
            // when deleted (taking its exit code and summary with it): confirm from the API,
            // and delete only that version of the pod.
            let live = pods
                .get_opt(&name)
                .await
                .map_err(|e| ReconcileError::GetPod(name.clone(), e))?;
            let Some(live) = live else { continue };
            let live_view = PodSummary::of(&live);
            if live_view.finished || live_view.deleting {
                continue;
            }
            tracing::warn!(job = %ids.name, pod = %name, "deleting a stray training pod");
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: live.metadata.resource_version.clone(),
                    uid: live.metadata.uid.clone(),
                }),
                ..DeleteParams::default()
            };
            match pods.delete(&name, &params).await {
                Ok(_) => {}
                // Gone, or changed since read: the next reconcile looks again.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => return Err(ReconcileError::DeletePod(name, e)),
            }
        }
    }
    Ok(())
}
