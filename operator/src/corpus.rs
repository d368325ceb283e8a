//! The consented corpus, the I/O part: copying a consenting job's dataset and LoRA files into
//! its region's corpus bucket, and deleting that copy. `lifecycle` decides when.
//!
//! The corpus bucket is the one of the region that holds the job's dataset, which residency
//! already allows, so the copy never leaves the jurisdiction the customer chose. A copy lies
//! under the job's own prefix (`<namespace>/<name>-<uid>/`): the dataset as `dataset.zip`,
//! each LoRA file under its own name.

use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::{CORPUS_DATASET, job_prefix};
use loraplane_runtime::storage::{Deleted, Storage, StorageError, parse_uri};

use crate::resources::JobIds;

/// The corpus bucket a job's copy goes to: that of its dataset's region, if it has one.
pub fn bucket_for<'s>(storage: &'s Storage, job: &LoRATrainingJob) -> Option<&'s str> {
    let (bucket, _) = parse_uri(&job.spec.dataset.uri).ok()?;
    storage.region_of_bucket(bucket)?.buckets.corpus.as_deref()
}

/// Copies the job's dataset and LoRA files into `corpus`. Returns what was copied; copying
/// again overwrites the same keys, so a repeat after a failure is harmless.
pub async fn copy(
    storage: &Storage,
    job: &LoRATrainingJob,
    ids: &JobIds,
    corpus: &str,
) -> Result<Deleted, StorageError> {
    let prefix = job_prefix(&ids.namespace, &ids.name, &ids.uid);
    let mut sources = vec![(job.spec.dataset.uri.as_str(), CORPUS_DATASET)];
    for artifact in job.status.iter().flat_map(|s| s.artifacts.iter()) {
        if !storage.is_job_output(&artifact.uri, &prefix) {
            continue;
        }
        let file = artifact.uri.rsplit('/').next().unwrap_or_default();
        sources.push((artifact.uri.as_str(), file));
    }
    let mut copied = Deleted::default();
    for (uri, file) in sources {
        let from = parse_uri(uri)?;
        if let Some(bytes) = storage
            .copy_object(from, (corpus, &format!("{prefix}{file}")))
            .await?
        {
            copied.objects += 1;
            copied.bytes += bytes;
        }
    }
    Ok(copied)
}

/// Deletes the job's copy from every region's corpus bucket (a region's configuration may
/// have changed since the copy was made).
pub async fn delete(storage: &Storage, ids: &JobIds) -> Result<Deleted, StorageError> {
    let prefix = job_prefix(&ids.namespace, &ids.name, &ids.uid);
    let mut deleted = Deleted::default();
    for (_, region) in storage.all() {
        if let Some(corpus) = &region.buckets.corpus {
            deleted += storage.delete_prefix(corpus, &prefix).await?;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraplane_runtime::storage::S3Credentials;

    #[test]
    fn only_files_in_the_jobs_own_output_layout_are_copied() {
        let storage = Storage::new(
            &crate::placement::tests::platform(),
            &S3Credentials {
                access_key: "a".into(),
                secret_key: "b".into(),
            },
        );
        let prefix = job_prefix("ns", "job", "uid-1");
        assert!(storage.is_job_output(
            "s3://outputs-eu-west/ns/job-uid-1/lora.safetensors",
            &prefix
        ));
        for other in [
            "s3://outputs-eu-west/ns/job-uid-2/lora.safetensors",
            "s3://outputs-eu-west/other/lora.safetensors",
            "s3://datasets-eu-west/ns/job-uid-1/lora.safetensors",
            "s3://elsewhere/ns/job-uid-1/lora.safetensors",
            "https://outputs-eu-west/ns/job-uid-1/lora.safetensors",
        ] {
            assert!(!storage.is_job_output(other, &prefix), "{other}");
        }
    }
}
