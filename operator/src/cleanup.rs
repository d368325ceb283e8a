//! The lifecycle's I/O: releasing an ended job's Secret and finished pods, deleting its inputs,
//! purging everything a job being deleted still has, writing its audit record and removing its
//! finalizer. `lifecycle` decides when; the controller calls these.
//!
//! Every function is idempotent (a 404 counts as done), so a purge cut short by an error or an
//! operator restart is simply run again: the finalizer keeps the job, and with it the list of
//! what to delete, until the last step has succeeded.

use std::collections::BTreeSet;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::{DATA_FINALIZER, LABEL_JOB_UID, job_prefix, upload_claim_name};
use loraplane_runtime::storage::{Deleted, Storage, StorageError, parse_uri};

use crate::resources::{self, JobIds};

/// Why a cleanup step failed. Variants name the step.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Adding the data finalizer failed.
    #[error("could not add the data finalizer: {0}")]
    AddFinalizer(#[source] kube::Error),
    /// Removing the data finalizer failed.
    #[error("could not remove the data finalizer: {0}")]
    RemoveFinalizer(#[source] kube::Error),
    /// Listing the job's pods failed.
    #[error("could not list the job's pods: {0}")]
    ListPods(#[source] kube::Error),
    /// Deleting a pod failed.
    #[error("could not delete pod {0}: {1}")]
    DeletePod(String, #[source] kube::Error),
    /// Deleting the trainer-config Secret failed.
    #[error("could not delete the trainer-config Secret: {0}")]
    DeleteSecret(#[source] kube::Error),
    /// Deleting a scratch claim failed.
    #[error("could not delete claim {0}: {1}")]
    DeleteClaim(String, #[source] kube::Error),
    /// Deleting the upload's claim (a Lease) failed.
    #[error("could not delete the upload claim: {0}")]
    DeleteUploadClaim(#[source] kube::Error),
    /// Deleting objects in S3 failed.
    #[error("could not delete the job's objects in S3: {0}")]
    DeleteObjects(#[from] StorageError),
    /// Copying the dataset and LoRA into the consented corpus failed.
    #[error("could not copy the job's data into the consented corpus: {0}")]
    CopyToCorpus(#[source] StorageError),
    /// Writing the audit record failed.
    #[error("could not write the audit record: {0}")]
    WriteAudit(#[source] kube::Error),
    /// Deleting the job object failed.
    #[error("could not delete the job: {0}")]
    DeleteJob(#[source] kube::Error),
}

impl CleanupError {
    /// The metric label of the failed step.
    pub fn step(&self) -> &'static str {
        match self {
            CleanupError::AddFinalizer(_) => "AddFinalizer",
            CleanupError::RemoveFinalizer(_) => "RemoveFinalizer",
            CleanupError::ListPods(_) => "ListPods",
            CleanupError::DeletePod(..) => "DeletePod",
            CleanupError::DeleteSecret(_) => "DeleteSecret",
            CleanupError::DeleteClaim(..) => "DeleteClaim",
            CleanupError::DeleteUploadClaim(_) => "DeleteUploadClaim",
            CleanupError::DeleteObjects(_) => "DeleteObjects",
            CleanupError::CopyToCorpus(_) => "CopyToCorpus",
            CleanupError::WriteAudit(_) => "WriteAudit",
            CleanupError::DeleteJob(_) => "DeleteJob",
        }
    }

    /// The error as it may be shown in a condition: an apiserver message is cut to its code
    /// and reason (it can quote object contents); S3 errors name buckets and keys, which hold
    /// only namespaces, job names, uids and upload ids.
    pub fn log_safe(&self) -> String {
        let api = |action: &str, e: &kube::Error| match e {
            kube::Error::Api(s) => format!("{action}: HTTP {} {}", s.code, s.reason),
            other => format!("{action}: {other}"),
        };
        match self {
            CleanupError::AddFinalizer(e) => api("add the data finalizer", e),
            CleanupError::RemoveFinalizer(e) => api("remove the data finalizer", e),
            CleanupError::ListPods(e) => api("list the job's pods", e),
            CleanupError::DeletePod(n, e) => api(&format!("delete pod {n}"), e),
            CleanupError::DeleteSecret(e) => api("delete the trainer-config Secret", e),
            CleanupError::DeleteClaim(n, e) => api(&format!("delete claim {n}"), e),
            CleanupError::DeleteUploadClaim(e) => api("delete the upload claim", e),
            CleanupError::DeleteObjects(e) => format!("delete the job's objects in S3: {e}"),
            CleanupError::CopyToCorpus(e) => format!("copy the job's data into the corpus: {e}"),
            CleanupError::WriteAudit(e) => api("write the audit record", e),
            CleanupError::DeleteJob(e) => api("delete the job", e),
        }
    }
}

fn gone_ok(r: Result<impl Sized, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Puts the data finalizer on a job (before its first pod can write anything), returning the
/// job as stored. A merge patch on the list with the read resourceVersion: a concurrent change
/// makes it fail (409) and the next reconcile tries again, so no other finalizer is dropped.
pub async fn add_finalizer(
    client: &Client,
    job: &LoRATrainingJob,
    ids: &JobIds,
) -> Result<LoRATrainingJob, CleanupError> {
    let mut list = job.metadata.finalizers.clone().unwrap_or_default();
    list.push(DATA_FINALIZER.to_string());
    let patch = serde_json::json!({"metadata": {
        "finalizers": list,
        "resourceVersion": job.metadata.resource_version,
    }});
    Api::<LoRATrainingJob>::namespaced(client.clone(), &ids.namespace)
        .patch(&ids.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(CleanupError::AddFinalizer)
}

/// Removes the data finalizer: the last step of a purge, after which the object goes.
pub async fn remove_finalizer(
    client: &Client,
    job: &LoRATrainingJob,
    ids: &JobIds,
) -> Result<(), CleanupError> {
    let list: Vec<String> = job
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != DATA_FINALIZER)
        .cloned()
        .collect();
    let patch = serde_json::json!({"metadata": {
        "finalizers": list,
        "resourceVersion": job.metadata.resource_version,
    }});
    let r = Api::<LoRATrainingJob>::namespaced(client.clone(), &ids.namespace)
        .patch(&ids.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    gone_ok(r).map_err(CleanupError::RemoveFinalizer)
}

/// Deletes the job object (retention ran out, or erasure was requested); the finalizer keeps it
/// until the purge is done. Returns the job as now stored (being deleted), if it still is.
pub async fn delete_job(
    client: &Client,
    ids: &JobIds,
) -> Result<Option<LoRATrainingJob>, CleanupError> {
    match Api::<LoRATrainingJob>::namespaced(client.clone(), &ids.namespace)
        .delete(&ids.name, &DeleteParams::default())
        .await
    {
        Ok(either) => Ok(either.left()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(CleanupError::DeleteJob(e)),
    }
}

/// Deletes the trainer-config Secret and the named pods (an ended job's finished pods).
pub async fn release(client: &Client, ids: &JobIds, pods: &[String]) -> Result<(), CleanupError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ids.namespace);
    gone_ok(
        secrets
            .delete(&resources::secret_name(&ids.name), &DeleteParams::default())
            .await,
    )
    .map_err(CleanupError::DeleteSecret)?;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ids.namespace);
    for name in pods {
        gone_ok(api.delete(name, &DeleteParams::default()).await)
            .map_err(|e| CleanupError::DeletePod(name.clone(), e))?;
    }
    Ok(())
}

/// How the pods of a job that is stopped for good (cancel, erasure, deletion) are deleted: a
/// second's grace rather than the pod's own. A checkpoint written on the way out would only be
/// deleted again; the kubelet still confirms the container is gone before the pod object goes,
/// so the purge's wait for the pods stays a wait for the processes.
pub fn stop_params() -> DeleteParams {
    DeleteParams::default().grace_period(1)
}

/// Deletes every pod of the job and says how many are still there (terminating). Nothing in S3
/// may be deleted while one is: a trainer still writing a checkpoint would outlive the sweep.
pub async fn stop_pods(client: &Client, ids: &JobIds) -> Result<usize, CleanupError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &ids.namespace);
    let lp = ListParams::default().labels(&format!("{LABEL_JOB_UID}={}", ids.uid));
    let pods = api.list(&lp).await.map_err(CleanupError::ListPods)?;
    for pod in &pods.items {
        if pod.metadata.deletion_timestamp.is_none()
            && let Some(name) = &pod.metadata.name
        {
            gone_ok(api.delete(name, &stop_params()).await)
                .map_err(|e| CleanupError::DeletePod(name.clone(), e))?;
        }
    }
    Ok(pods.items.len())
}

/// What of a job's data a deletion covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Dataset, checkpoints and scratch claims (retention of inputs).
    Inputs,
    /// Everything: inputs, outputs and the Secret (the purge).
    All,
}

/// Deletes a job's data in S3 and its scratch claims; with `Scope::All`, its Secret and its
/// upload's claim too. The dataset is left alone while `dataset_shared`
/// (another live job reads the same upload); checkpoints and outputs are searched in every
/// configured region, since a job's home region is recorded only in its trainer config.
pub async fn delete_data(
    client: &Client,
    storage: &Storage,
    job: &LoRATrainingJob,
    ids: &JobIds,
    scope: Scope,
    dataset_shared: bool,
) -> Result<Deleted, CleanupError> {
    let mut deleted = Deleted::default();
    if !dataset_shared && let Ok((bucket, key)) = parse_uri(&job.spec.dataset.uri) {
        // Only a key in a configured dataset bucket: a job pointing elsewhere never makes
        // the operator delete someone else's object.
        if storage.is_dataset_bucket(bucket) {
            deleted += storage.delete_object(bucket, key).await?;
        }
    }
    let prefix = job_prefix(&ids.namespace, &ids.name, &ids.uid);
    for (_, region) in storage.all() {
        deleted += storage
            .delete_prefix(&region.buckets.checkpoints, &prefix)
            .await?;
        if scope == Scope::All {
            deleted += storage
                .delete_prefix(&region.buckets.outputs, &prefix)
                .await?;
        }
    }
    // What the status records as deleted was deleted before it was recorded: the purge skips
    // it rather than ask the apiserver again.
    let recorded = job.status.as_ref().and_then(|s| s.retention.as_ref());
    if recorded.is_none_or(|r| r.inputs_deleted_at.is_none()) {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ids.namespace);
        let regions: BTreeSet<String> = job
            .status
            .iter()
            .flat_map(|s| s.attempts.iter().map(|a| a.region.clone()))
            .collect();
        for region in regions {
            let name = resources::claim_name(&ids.name, &region);
            gone_ok(claims.delete(&name, &DeleteParams::default()).await)
                .map_err(|e| CleanupError::DeleteClaim(name.clone(), e))?;
        }
    }
    if scope == Scope::All && recorded.is_none_or(|r| r.released_at.is_none()) {
        release(client, ids, &[]).await?;
    }
    // The upload's claim (the API's "one upload, one order" record) goes with the upload.
    if scope == Scope::All && !dataset_shared {
        let claim = upload_claim_name(&job.spec.dataset.uri);
        let leases: Api<Lease> = Api::namespaced(client.clone(), &ids.namespace);
        gone_ok(leases.delete(&claim, &DeleteParams::default()).await)
            .map_err(CleanupError::DeleteUploadClaim)?;
    }
    Ok(deleted)
}

/// Writes the audit record (an existing one, from a purge repeated after a crash, stays).
pub async fn write_audit(client: &Client, record: &ConfigMap) -> Result<(), CleanupError> {
    let ns = record.metadata.namespace.clone().unwrap_or_default();
    match Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), record)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(CleanupError::WriteAudit(e)),
    }
}
