//! What an attempt's trainer may touch in S3, and the presigned URLs that grant it: GET of its
//! dataset, of the platform's base weights when they lie in S3 and of its own checkpoint; PUT
//! of its own checkpoint and LoRA files; both of its sample images, when it renders any.
//! Nothing else: the pod holds no credential, so a
//! compromised trainer can reach no other job's data and no other region.
//!
//! [`plan`] and [`lifetime`] are pure; [`presign`] signs with the operator's credentials (and
//! lists the base weights' prefix, the one read it makes).

use std::time::Duration;

use k8s_openapi::jiff::{self, Timestamp};
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::{CHECKPOINT_FILE, object_in, output_files, s3_uri, sample_files};
use loraplane_crds::trainer::{Grants, TrainerConfig};
use loraplane_runtime::storage::{Storage, StorageError, parse_uri};

use crate::status::active_seconds;

/// The longest a presigned URL can live (SigV4's limit, seven days).
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Added to the attempt's remaining deadline, so the final upload is not cut off by the
/// same second that ends the job.
const SLACK: Duration = Duration::from_secs(600);

/// Why grants could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The job names its own S3 weights; only the platform's configured weights are granted,
    /// or a job could name another customer's prefix and have the operator sign it.
    #[error("spec.baseModel.weights in S3 must be the family's configured weights")]
    CheckWeights,
    /// Listing the base weights failed.
    #[error("listing the base weights: {0}")]
    ListWeights(StorageError),
    /// Signing a URL failed.
    #[error("signing {0}: {1}")]
    Sign(&'static str, StorageError),
}

/// The objects an attempt may read and write, as `s3://` names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GrantPlan {
    /// Objects to GET.
    pub get: Vec<String>,
    /// Objects to PUT.
    pub put: Vec<String>,
    /// A base-weights prefix whose every object may be read (listed at signing time).
    pub weights_prefix: Option<String>,
}

/// The grants a trainer config needs. `family_weights` is the platform's configured weights
/// for the job's family: an `s3://` base model is granted only when it is that one.
pub fn plan(config: &TrainerConfig, family_weights: &str) -> Result<GrantPlan, GrantError> {
    let mut plan = GrantPlan::default();
    if config.dataset.uri.starts_with("s3://") {
        plan.get.push(config.dataset.uri.clone());
    }
    let checkpoint = object_in(&config.checkpoints, CHECKPOINT_FILE);
    if checkpoint.starts_with("s3://") {
        plan.get.push(checkpoint.clone());
        plan.put.push(checkpoint);
    }
    for (_, file) in output_files(&config.job.name) {
        let uri = object_in(&config.output, &file);
        if uri.starts_with("s3://") {
            plan.put.push(uri);
        }
    }
    if !config.samples.is_never() {
        let concept = &config.concept;
        let prompts = config
            .samples
            .prompts_for(concept.concept_type, &concept.trigger_word)
            .len();
        for file in sample_files(config.training.steps, config.samples.every, prompts) {
            let uri = object_in(&config.output, &file);
            if uri.starts_with("s3://") {
                // Read too: a resumed attempt puts the earlier sets back on its contact sheet.
                plan.get.push(uri.clone());
                plan.put.push(uri);
            }
        }
    }
    let weights = &config.base_model.path;
    if weights.starts_with("s3://") {
        let prefix = object_in(weights, "");
        if prefix != object_in(family_weights, "") {
            return Err(GrantError::CheckWeights);
        }
        plan.weights_prefix = Some(prefix);
    }
    Ok(plan)
}

/// How long an attempt's URLs live: what is left of the job's `activeDeadlineSeconds` (plus
/// a little), at most [`MAX_LIFETIME`]. A trainer outliving its URLs fails its next transfer
/// as a crash, and the retry gets fresh ones.
pub fn lifetime(job: &LoRATrainingJob, now: Timestamp) -> Duration {
    let Some(deadline) = job.spec.active_deadline_seconds else {
        return MAX_LIFETIME;
    };
    let used = job
        .status
        .as_ref()
        .map_or(0, |s| active_seconds(&s.attempts, now));
    let left = u64::try_from(deadline.saturating_sub(used)).unwrap_or(0);
    (Duration::from_secs(left) + SLACK).min(MAX_LIFETIME)
}

/// Signs the plan: one URL per object, all valid for `lifetime` from `now`.
pub async fn presign(
    storage: &Storage,
    plan: &GrantPlan,
    lifetime: Duration,
    now: Timestamp,
) -> Result<Grants, GrantError> {
    let mut grants = Grants::default();
    let mut get = plan.get.clone();
    if let Some(prefix) = &plan.weights_prefix {
        let (bucket, key) = parse_uri(prefix).map_err(GrantError::ListWeights)?;
        let listed = storage
            .list(bucket, key)
            .await
            .map_err(GrantError::ListWeights)?;
        get.extend(listed.into_iter().map(|o| s3_uri(bucket, &o.key)));
    }
    for uri in get {
        let (bucket, key) = parse_uri(&uri).map_err(|e| GrantError::Sign("GET", e))?;
        let url = storage
            .presign_get(bucket, key, lifetime)
            .await
            .map_err(|e| GrantError::Sign("GET", e))?;
        grants.get.insert(uri, url);
    }
    for uri in &plan.put {
        let (bucket, key) = parse_uri(uri).map_err(|e| GrantError::Sign("PUT", e))?;
        let url = storage
            .presign_put(bucket, key, lifetime)
            .await
            .map_err(|e| GrantError::Sign("PUT", e))?;
        grants.put.insert(uri.clone(), url);
    }
    grants.expires_at = now
        .checked_add(jiff::SignedDuration::try_from(lifetime).unwrap_or_default())
        .ok()
        .map(|t| t.to_string());
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraplane_crds::v1alpha1::{Attempt, LoRATrainingJobStatus};

    fn config() -> TrainerConfig {
        let job = crate::resources::tests::job(false);
        let platform = crate::placement::tests::platform();
        crate::resources::trainer_config(&job, &platform, "eu-west").unwrap()
    }

    #[test]
    fn a_trainer_is_granted_its_own_objects_and_nothing_else() {
        let c = config();
        let p = plan(&c, "/models/sdxl").unwrap();
        let prefix = c.checkpoints.clone();
        assert!(prefix.starts_with("s3://checkpoints-"), "{prefix}");
        assert_eq!(
            p.get,
            vec![
                c.dataset.uri.clone(),
                format!("{prefix}checkpoint.safetensors")
            ]
        );
        let out = c.output.clone();
        assert_eq!(
            p.put,
            vec![
                format!("{prefix}checkpoint.safetensors"),
                format!("{out}{}.safetensors", c.job.name),
                format!("{out}pytorch_lora_weights.safetensors"),
            ]
        );
        assert_eq!(p.weights_prefix, None);
        for uri in p.get.iter().chain(&p.put).skip(1) {
            assert!(
                uri.contains(&format!(
                    "/{}/{}-{}/",
                    c.job.namespace, c.job.name, c.job.uid
                )),
                "{uri} is outside the job's layout"
            );
        }
    }

    #[test]
    fn a_trainer_that_renders_samples_is_granted_each_sample_file_in_its_outputs() {
        use loraplane_crds::trainer::{SampleWhen, SamplesConfig};
        let mut c = config();
        let without = plan(&c, "/models/sdxl").unwrap();
        c.training.steps = 200;
        c.samples = SamplesConfig {
            when: SampleWhen::Checkpoints,
            every: 100,
            ..SamplesConfig::default()
        };
        let with = plan(&c, "/models/sdxl").unwrap();
        let out = c.output.clone();
        let added: Vec<&String> = with
            .put
            .iter()
            .filter(|u| !without.put.contains(u))
            .collect();
        // Base, step 100 and step 200, two default prompts each, and the contact sheet.
        assert_eq!(added.len(), 3 * 2 + 1, "{added:?}");
        assert!(
            added
                .iter()
                .all(|u| u.starts_with(&format!("{out}samples/"))),
            "{added:?}"
        );
        assert!(added.contains(&&format!("{out}samples/step-000100-1.png")));
        assert!(
            added.iter().all(|u| with.get.contains(u)),
            "sample files are readable back"
        );
    }

    #[test]
    fn s3_weights_are_granted_only_when_they_are_the_platforms() {
        let mut c = config();
        c.base_model.path = "s3://models-eu/sdxl".into();
        let p = plan(&c, "s3://models-eu/sdxl/").unwrap();
        assert_eq!(p.weights_prefix.as_deref(), Some("s3://models-eu/sdxl/"));
        c.base_model.path = "s3://datasets-eu-west/uploads/other-tenant/".into();
        assert!(matches!(
            plan(&c, "s3://models-eu/sdxl/"),
            Err(GrantError::CheckWeights)
        ));
    }

    #[test]
    fn urls_live_as_long_as_the_deadline_allows() {
        let now: Timestamp = "2026-01-01T10:00:00Z".parse().unwrap();
        let mut job = crate::resources::tests::job(false);
        assert_eq!(lifetime(&job, now), MAX_LIFETIME);
        job.spec.active_deadline_seconds = Some(3600);
        assert_eq!(lifetime(&job, now), Duration::from_secs(3600 + 600));
        job.status = Some(LoRATrainingJobStatus {
            attempts: vec![Attempt {
                start_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-01-01T09:30:00Z".parse().unwrap(),
                )),
                ..Attempt::default()
            }],
            ..LoRATrainingJobStatus::default()
        });
        assert_eq!(lifetime(&job, now), Duration::from_secs(1800 + 600));
        job.spec.active_deadline_seconds = Some(30 * 24 * 3600);
        assert_eq!(lifetime(&job, now), MAX_LIFETIME);
    }
}
