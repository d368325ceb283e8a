//! The child objects of a job, built as pure functions: the scratch PersistentVolumeClaim (none
//! for zero-retention jobs, which get a memory-backed emptyDir), the Secret holding the
//! trainer's config file, and the locked-down GPU Pod.
//!
//! Privacy rule: the customer's words (trigger word, description) reach only the Secret's data,
//! mounted as the trainer's config file. Labels carry only non-sensitive ids (job name and uid,
//! pool, region). The pod has no environment and no credential: its S3 access is the
//! presigned URLs in its config (`grants`).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EmptyDirVolumeSource, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Toleration, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::s3_uri;
use loraplane_crds::platform::{FamilyConfig, PlatformConfig, PoolConfig, RegionConfig};
use loraplane_crds::trainer::{
    BaseModelSource, ConceptConfig, DatasetSource, Grants, JobRef, SampleWhen, SamplesConfig,
    TrainerConfig, TrainingConfig,
};
use loraplane_crds::v1alpha1::{ModelFamily, RetentionMode, Samples};

use crate::placement::GPU_RESOURCE;

/// Name of the trainer container.
pub const TRAINER_CONTAINER: &str = "trainer";
/// Where the config Secret is mounted.
pub const CONFIG_DIR: &str = "/etc/loraplane/trainer";
/// The config file's key in the Secret (and name in `CONFIG_DIR`).
pub const CONFIG_KEY: &str = "config.json";
/// The scratch directory.
pub const WORK_DIR: &str = "/work";
/// The termination-message file.
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
pub use loraplane_crds::layout::{
    LABEL_COMPONENT, LABEL_JOB, LABEL_JOB_UID, LABEL_MANAGED_BY, LABEL_POOL, LABEL_REGION,
    TRAINER_COMPONENT,
};
/// Value of `LABEL_MANAGED_BY`.
pub const MANAGED_BY: &str = "loraplane-operator";
/// The region label of nodes.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The uid the trainer runs as.
pub const TRAINER_UID: i64 = 65532;

/// Why a child object could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The job lacks a name, namespace or uid (it was never stored).
    #[error("the job has no {0} yet")]
    MissingMetadata(&'static str),
    /// The model family is not configured.
    #[error("model family {0} is not configured")]
    UnknownFamily(&'static str),
    /// The pool or region of the placement is not configured.
    #[error("pool {0:?} or its region is not configured")]
    UnknownPool(String),
    /// The trainer config could not be serialised.
    #[error("could not serialise the trainer config: {0}")]
    SerializeConfig(#[from] serde_json::Error),
}

/// Name, namespace and uid of a stored job.
#[derive(Debug, Clone)]
pub struct JobIds {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// UID.
    pub uid: String,
}

impl JobIds {
    /// The ids of a job, or which one is missing.
    pub fn of(job: &LoRATrainingJob) -> Result<JobIds, BuildError> {
        Ok(JobIds {
            name: job
                .metadata
                .name
                .clone()
                .ok_or(BuildError::MissingMetadata("name"))?,
            namespace: job
                .metadata
                .namespace
                .clone()
                .ok_or(BuildError::MissingMetadata("namespace"))?,
            uid: job
                .metadata
                .uid
                .clone()
                .ok_or(BuildError::MissingMetadata("uid"))?,
        })
    }
}

fn owner(ids: &JobIds) -> OwnerReference {
    OwnerReference {
        api_version: LoRATrainingJob::api_version(&()).into_owned(),
        kind: LoRATrainingJob::kind(&()).into_owned(),
        name: ids.name.clone(),
        uid: ids.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Labels every child carries: only ids, never customer text.
pub fn base_labels(ids: &JobIds) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
        (LABEL_JOB.to_string(), label_value(&ids.name)),
        (LABEL_JOB_UID.to_string(), ids.uid.clone()),
    ])
}

/// A label value is at most 63 characters.
fn label_value(s: &str) -> String {
    let v: String = s.chars().take(63).collect();
    v.trim_end_matches(['-', '.', '_']).to_string()
}

fn dns_name(base: &str, suffix: &str) -> String {
    let keep = 253usize.saturating_sub(suffix.len() + 1);
    let b: String = base.chars().take(keep).collect();
    format!("{}-{suffix}", b.trim_end_matches(['-', '.']))
}

/// Name of the trainer-config Secret.
pub fn secret_name(job_name: &str) -> String {
    dns_name(job_name, "trainer-config")
}

/// Name of the scratch claim in a region (claims are zonal, so each region gets its own).
pub fn claim_name(job_name: &str, region: &str) -> String {
    dns_name(job_name, &format!("work-{region}"))
}

/// The region whose buckets hold the job's checkpoints and outputs: the dataset's region when
/// configured, else where the job first ran. Keeping it fixed across failovers is what lets a
/// new attempt elsewhere resume from the last checkpoint.
pub fn home_region<'a>(
    job: &LoRATrainingJob,
    config: &'a PlatformConfig,
    current_region: &str,
) -> Option<&'a RegionConfig> {
    job.spec
        .dataset
        .region
        .as_deref()
        .and_then(|r| config.region(r))
        .or_else(|| {
            job.status
                .as_ref()
                .and_then(|s| s.attempts.first())
                .and_then(|a| config.region(&a.region))
        })
        .or_else(|| config.region(current_region))
}

fn derived_seed(uid: &str) -> u64 {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & (i64::MAX as u64)
}

fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The `s3://` names of the LoRA files the job's trainer writes (the only artifacts the
/// operator records, and the only objects besides its checkpoint it may write).
pub fn output_uris(
    job: &LoRATrainingJob,
    config: &PlatformConfig,
    region: &str,
) -> Result<Vec<String>, BuildError> {
    let ids = JobIds::of(job)?;
    let home =
        home_region(job, config, region).ok_or_else(|| BuildError::UnknownPool(region.into()))?;
    let prefix = loraplane_crds::layout::job_prefix(&ids.namespace, &ids.name, &ids.uid);
    Ok(loraplane_crds::layout::output_files(&ids.name)
        .into_iter()
        .map(|(_, file)| s3_uri(&home.buckets.outputs, &format!("{prefix}{file}")))
        .collect())
}

/// The trainer's config file for the job's attempt in `region`, without its grants
/// (`grants::plan` derives them from this config, the controller signs them).
pub fn trainer_config(
    job: &LoRATrainingJob,
    config: &PlatformConfig,
    region: &str,
) -> Result<TrainerConfig, BuildError> {
    let ids = JobIds::of(job)?;
    let spec = &job.spec;
    let family = config
        .family(spec.base_model.family)
        .ok_or(BuildError::UnknownFamily(spec.base_model.family.as_str()))?;
    let home =
        home_region(job, config, region).ok_or_else(|| BuildError::UnknownPool(region.into()))?;
    let prefix = loraplane_crds::layout::job_prefix(&ids.namespace, &ids.name, &ids.uid);
    let t = &spec.training;
    let training = TrainingConfig {
        steps: non_negative(t.steps),
        rank: u32::try_from(t.rank).unwrap_or(1),
        alpha: t.alpha,
        learning_rate: t.learning_rate,
        lr_scheduler: t.lr_scheduler,
        lr_warmup_steps: non_negative(t.lr_warmup_steps.unwrap_or(0)),
        batch_size: u32::try_from(t.batch_size).unwrap_or(1),
        resolution: t
            .resolution
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or_else(|| spec.base_model.family.default_resolution()),
        seed: t
            .seed
            .map(non_negative)
            .unwrap_or_else(|| derived_seed(&ids.uid)),
        checkpoint_every: t
            .checkpoint_every
            .map(non_negative)
            .unwrap_or(config.defaults.checkpoint_every),
        mixed_precision: t.mixed_precision,
        gradient_checkpointing: t.gradient_checkpointing,
        noise_offset: t.noise_offset.unwrap_or(0.0),
        min_snr_gamma: t.min_snr_gamma,
        timestep_sampling: t.timestep_sampling,
        guidance_scale: t.guidance_scale,
        lora_targets: t.lora_targets.clone(),
    };
    Ok(TrainerConfig {
        job: JobRef {
            namespace: ids.namespace.clone(),
            name: ids.name.clone(),
            uid: ids.uid.clone(),
        },
        base_model: BaseModelSource {
            family: spec.base_model.family,
            path: spec
                .base_model
                .weights
                .clone()
                .unwrap_or_else(|| family.weights.clone()),
            licence: family.licence.as_ref().map(|l| l.name.clone()),
        },
        dataset: DatasetSource {
            uri: spec.dataset.uri.clone(),
            sha256: spec.dataset.sha256.clone(),
            rules: config.dataset,
        },
        concept: ConceptConfig {
            concept_type: spec.concept.concept_type,
            trigger_word: spec.concept.trigger_word.clone(),
            description: spec.concept.description.clone(),
        },
        checkpoints: s3_uri(&home.buckets.checkpoints, &prefix),
        output: s3_uri(&home.buckets.outputs, &prefix),
        grants: Grants::default(),
        work_dir: WORK_DIR.to_string(),
        termination_message_path: TERMINATION_MESSAGE_PATH.to_string(),
        log_every: 10,
        samples: samples_config(spec.samples.as_ref(), &training, spec.base_model.family),
        training,
    })
}

/// The trainer's sample settings for a job's `spec.samples` (none when absent), with the
/// defaults filled in against its resolved training settings.
fn samples_config(
    samples: Option<&Samples>,
    t: &TrainingConfig,
    family: ModelFamily,
) -> SamplesConfig {
    let Some(s) = samples else {
        return SamplesConfig::default();
    };
    let defaults = SamplesConfig::default();
    SamplesConfig {
        when: SampleWhen::Checkpoints,
        prompts: s.prompts.clone(),
        seed: s.seed.map_or(0, non_negative),
        steps: s
            .steps
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(defaults.steps),
        guidance: s
            .guidance
            .unwrap_or_else(|| SamplesConfig::default_guidance(family)),
        resolution: s
            .resolution
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(0),
        every: s.every.map_or_else(
            || SamplesConfig::default_every(t.steps, t.checkpoint_every),
            non_negative,
        ),
    }
}

/// The Secret holding the trainer's config file (with its grants: presigned URLs are bearer
/// credentials, as the customer's text is sensitive).
pub fn config_secret(job: &LoRATrainingJob, trainer: &TrainerConfig) -> Result<Secret, BuildError> {
    let ids = JobIds::of(job)?;
    let body = serde_json::to_vec_pretty(trainer)?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&ids.name)),
            namespace: Some(ids.namespace.clone()),
            labels: Some(base_labels(&ids)),
            owner_references: Some(vec![owner(&ids)]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        immutable: Some(false),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), ByteString(body))])),
        ..Secret::default()
    })
}

/// Whether the job keeps its inputs only in memory.
pub fn zero_retention(job: &LoRATrainingJob) -> bool {
    job.spec.retention.mode == RetentionMode::ZeroRetention
}

/// The scratch claim for an attempt in `region` (`None` for zero-retention jobs).
pub fn scratch_claim(
    job: &LoRATrainingJob,
    config: &PlatformConfig,
    region: &str,
) -> Result<Option<PersistentVolumeClaim>, BuildError> {
    if zero_retention(job) {
        return Ok(None);
    }
    let ids = JobIds::of(job)?;
    let mut labels = base_labels(&ids);
    labels.insert(LABEL_REGION.into(), region.into());
    Ok(Some(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name(&ids.name, region)),
            namespace: Some(ids.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![owner(&ids)]),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(format!("{}Gi", config.defaults.scratch_gib)),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }))
}

fn toleration(t: &loraplane_crds::platform::TolerationConfig) -> Toleration {
    Toleration {
        key: Some(t.key.clone()),
        operator: t.operator.clone(),
        value: t.value.clone(),
        effect: t.effect.clone(),
        toleration_seconds: None,
    }
}

/// The attempt's working directory: memory for zero-retention jobs (nothing lands on a
/// disk), else the job's scratch claim in the pool's region.
fn work_volume(
    job: &LoRATrainingJob,
    config: &PlatformConfig,
    ids: &JobIds,
    pool: &PoolConfig,
) -> Volume {
    if zero_retention(job) {
        Volume {
            name: "work".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity(format!("{}Gi", config.defaults.scratch_gib))),
            }),
            ..Volume::default()
        }
    } else {
        Volume {
            name: "work".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&ids.name, &pool.region),
                read_only: Some(false),
            }),
            ..Volume::default()
        }
    }
}

/// The trainer container: the family's image and resources (requests equal limits), locked
/// down, no environment.
fn trainer_container(family: &FamilyConfig, gpu_count: i32) -> Container {
    let gpus = Quantity(gpu_count.max(1).to_string());
    let mut args = vec!["--config".to_string(), format!("{CONFIG_DIR}/{CONFIG_KEY}")];
    args.extend(family.trainer_args.iter().cloned());
    Container {
        name: TRAINER_CONTAINER.into(),
        image: Some(family.trainer_image.clone()),
        args: Some(args),
        // No environment at all: S3 access is the config's presigned URLs, nothing else.
        resources: Some({
            // Requests equal limits: a trainer decoding hostile images cannot take more of
            // the node than it was scheduled with.
            let amounts = BTreeMap::from([
                (GPU_RESOURCE.to_string(), gpus),
                ("cpu".to_string(), Quantity(family.cpu.to_string())),
                (
                    "memory".to_string(),
                    Quantity(format!("{}Gi", family.memory_gib)),
                ),
            ]);
            ResourceRequirements {
                limits: Some(amounts.clone()),
                requests: Some(amounts),
                ..ResourceRequirements::default()
            }
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(TRAINER_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "work".into(),
                mount_path: WORK_DIR.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ]),
        termination_message_path: Some(TERMINATION_MESSAGE_PATH.into()),
        termination_message_policy: Some("File".into()),
        ..Container::default()
    }
}

/// A required node affinity to the nodes of `region`.
fn in_region(region: &str) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: REGION_LABEL.into(),
                        operator: "In".into(),
                        values: Some(vec![region.to_string()]),
                    }]),
                    match_fields: None,
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The training pod of an attempt.
pub fn trainer_pod(
    job: &LoRATrainingJob,
    config: &PlatformConfig,
    pool: &PoolConfig,
    pod_name: &str,
    attempt: usize,
) -> Result<Pod, BuildError> {
    let ids = JobIds::of(job)?;
    let spec = &job.spec;
    let family = config
        .family(spec.base_model.family)
        .ok_or(BuildError::UnknownFamily(spec.base_model.family.as_str()))?;
    let mut labels = base_labels(&ids);
    labels.insert("app.kubernetes.io/name".into(), "loraplane-trainer".into());
    // What the chart's trainer NetworkPolicy selects (with the managed-by label).
    labels.insert(LABEL_COMPONENT.into(), TRAINER_COMPONENT.into());
    labels.insert(LABEL_POOL.into(), label_value(&pool.name));
    labels.insert(LABEL_REGION.into(), label_value(&pool.region));
    labels.insert("loraplane.io/attempt".into(), attempt.to_string());
    let work = work_volume(job, config, &ids, pool);
    let container = trainer_container(family, spec.resources.gpu.count);
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name.to_string()),
            namespace: Some(ids.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![owner(&ids)]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            node_selector: Some(pool.node_selector.clone()),
            tolerations: Some(pool.tolerations.iter().map(toleration).collect()),
            affinity: Some(in_region(&pool.region)),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(TRAINER_UID),
                run_as_group: Some(TRAINER_UID),
                fs_group: Some(TRAINER_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            containers: vec![container],
            volumes: Some(vec![
                Volume {
                    name: "config".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(secret_name(&ids.name)),
                        default_mode: Some(0o440),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                work,
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        size_limit: Some(Quantity(format!("{}Gi", family.tmp_gib))),
                        ..EmptyDirVolumeSource::default()
                    }),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::placement::tests::{platform, spec};
    use loraplane_crds::v1alpha1::Residency;

    const TRIGGER: &str = "zxqsecretword";
    const DESCRIPTION: &str = "my private description of alice@example.com";

    pub(crate) fn job(zero: bool) -> LoRATrainingJob {
        let mut s = spec(Residency::Eea);
        s.concept.trigger_word = TRIGGER.into();
        s.concept.description = Some(DESCRIPTION.into());
        s.dataset.region = Some("eu-west".into());
        if zero {
            s.retention.mode = RetentionMode::ZeroRetention;
        }
        let mut j = LoRATrainingJob::new("order-42", s);
        j.metadata.namespace = Some("customers".into());
        j.metadata.uid = Some("uid-42".into());
        j.metadata.annotations = Some(BTreeMap::from([(
            "loraplane.io/payment-id".into(),
            "pi_secret123".into(),
        )]));
        j
    }

    #[test]
    fn a_jobs_samples_reach_the_trainer_with_defaults_filled_in() {
        use loraplane_crds::v1alpha1::Samples;
        let platform = crate::placement::tests::platform();
        let mut j = job(false);
        let none = trainer_config(&j, &platform, "eu-west").unwrap();
        assert!(none.samples.is_never(), "no spec.samples, no samples");
        j.spec.training.steps = 1000;
        j.spec.training.checkpoint_every = Some(100);
        j.spec.samples = Some(Samples {
            prompts: vec!["a red zxq".into()],
            ..Samples::default()
        });
        let c = trainer_config(&j, &platform, "eu-west").unwrap();
        assert_eq!(c.samples.when, SampleWhen::Checkpoints);
        assert_eq!(c.samples.prompts, ["a red zxq"]);
        assert_eq!((c.samples.steps, c.samples.guidance), (12, 7.5));
        assert_eq!(
            c.samples.every, 400,
            "at most two sets between base and end"
        );
        assert_eq!(c.samples.resolution, 0, "the training resolution");
        j.spec.samples = Some(Samples {
            every: Some(200),
            steps: Some(8),
            resolution: Some(512),
            ..Samples::default()
        });
        let c = trainer_config(&j, &platform, "eu-west").unwrap();
        assert_eq!(
            (c.samples.every, c.samples.steps, c.samples.resolution),
            (200, 8, 512)
        );
        // FLUX.1-dev's samples get the guidance it trains with, its pipeline's default; the
        // platform's licence name travels to the LoRA's metadata.
        j.spec.base_model.family = ModelFamily::Flux1;
        j.spec.samples = Some(Samples::default());
        let mut platform = platform;
        if let Some(f) = platform
            .families
            .iter_mut()
            .find(|f| f.family == ModelFamily::Flux1)
        {
            f.licence = Some(loraplane_crds::platform::Licence {
                name: "flux-1-dev-commercial".into(),
                commercial_use: true,
            });
        }
        let c = trainer_config(&j, &platform, "eu-west").unwrap();
        assert_eq!(c.samples.guidance, 3.5);
        assert_eq!(
            c.base_model.licence.as_deref(),
            Some("flux-1-dev-commercial")
        );
    }

    /// Every string anywhere in a JSON value.
    fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| {
                out.push(k.clone());
                strings(x, out)
            }),
            _ => {}
        }
    }

    /// The trainer pod's labels, as the chart's NetworkPolicy test reads them
    /// (`charts/loraplane/tests/test_chart.py`): generated here and diffed, like the CRD, so the
    /// policies are checked against the labels the operator really puts on its pods.
    #[test]
    fn the_trainer_pod_labels_the_chart_checks_are_current() {
        let cfg = platform();
        let pod = trainer_pod(&job(false), &cfg, &cfg.pools[0], "order-42-a0", 0).unwrap();
        let labels = serde_json::to_string_pretty(&pod.metadata.labels).unwrap() + "\n";
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/loraplane/tests/trainer-pod-labels.json");
        if std::env::var_os("LORAPLANE_WRITE_GOLDEN").is_some() {
            std::fs::write(&path, &labels).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            checked_in,
            labels,
            "{} is stale: run `LORAPLANE_WRITE_GOLDEN=1 cargo test -p loraplane-operator trainer_pod_labels`",
            path.display()
        );
    }

    #[test]
    fn no_customer_text_reaches_the_pod_or_the_claim() {
        let cfg = platform();
        for zero in [false, true] {
            let j = job(zero);
            let pod = trainer_pod(&j, &cfg, &cfg.pools[0], "order-42-a0", 0).unwrap();
            let claim = scratch_claim(&j, &cfg, "eu-west").unwrap();
            let secret = config_secret(&j, &trainer_config(&j, &cfg, "eu-west").unwrap()).unwrap();
            let mut all = Vec::new();
            strings(&serde_json::to_value(&pod).unwrap(), &mut all);
            strings(&serde_json::to_value(&claim).unwrap(), &mut all);
            strings(&serde_json::to_value(&secret.metadata).unwrap(), &mut all);
            assert!(all.len() > 40, "the walk saw the whole pod");
            for s in &all {
                for secret_text in [
                    TRIGGER,
                    "private description",
                    "alice@example.com",
                    "pi_secret123",
                    "payment",
                ] {
                    assert!(!s.contains(secret_text), "{secret_text:?} leaked in {s:?}");
                }
            }
            // The config file, and only it, carries the concept.
            let body = String::from_utf8(secret.data.unwrap()[CONFIG_KEY].0.clone()).unwrap();
            assert!(body.contains(TRIGGER) && body.contains("alice@example.com"));
            assert!(!body.contains("pi_secret123"));
        }
    }

    #[test]
    fn the_pod_is_locked_down_and_pinned_to_its_pool_and_region() {
        let mut cfg = platform();
        cfg.pools[1].tolerations = vec![loraplane_crds::platform::TolerationConfig {
            key: "loraplane.io/spot".into(),
            operator: Some("Equal".into()),
            value: Some("true".into()),
            effect: Some("NoSchedule".into()),
        }];
        let j = job(false);
        let pod = trainer_pod(&j, &cfg, &cfg.pools[1], "order-42-a3", 3).unwrap();
        let v = serde_json::to_value(&pod).unwrap();
        let spec = &v["spec"];
        assert_eq!(spec["automountServiceAccountToken"], false);
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(
            spec["nodeSelector"]["loraplane.io/node-pool"],
            "eu-west-l4-spot"
        );
        assert_eq!(spec["tolerations"][0]["key"], "loraplane.io/spot");
        let term = &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0];
        assert_eq!(term["key"], REGION_LABEL);
        assert_eq!(term["values"][0], "eu-west");
        let c = &spec["containers"][0];
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
        assert_eq!(c["resources"]["limits"]["memory"], "32Gi");
        assert_eq!(c["resources"]["requests"]["cpu"], "4");
        let tmp = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "tmp")
            .unwrap();
        assert_eq!(tmp["emptyDir"]["sizeLimit"], "1Gi");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(c["terminationMessagePath"], TERMINATION_MESSAGE_PATH);
        // No credential of any kind: no environment, no Secret but the config file.
        assert!(c.get("env").is_none() && c.get("envFrom").is_none(), "{c}");
        let secrets: Vec<&serde_json::Value> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.get("secret"))
            .collect();
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[0]["secretName"], secret_name("order-42"));
        assert_eq!(
            v["metadata"]["ownerReferences"][0]["kind"],
            "LoRATrainingJob"
        );
        assert_eq!(v["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(v["metadata"]["labels"][LABEL_JOB_UID], "uid-42");
        assert_eq!(
            spec["volumes"][1]["persistentVolumeClaim"]["claimName"],
            "order-42-work-eu-west"
        );
    }

    #[test]
    fn zero_retention_uses_memory_and_no_claim() {
        let cfg = platform();
        let j = job(true);
        assert!(scratch_claim(&j, &cfg, "eu-west").unwrap().is_none());
        let pod = trainer_pod(&j, &cfg, &cfg.pools[0], "p", 0).unwrap();
        let v = serde_json::to_value(&pod).unwrap();
        assert_eq!(v["spec"]["volumes"][1]["emptyDir"]["medium"], "Memory");
    }

    #[test]
    fn checkpoints_stay_in_the_home_region_across_failover() {
        let cfg = platform();
        let mut j = job(false);
        j.spec.dataset.region = None;
        j.status = Some(loraplane_crds::LoRATrainingJobStatus {
            attempts: vec![loraplane_crds::v1alpha1::Attempt {
                region: "eu-north".into(),
                pool: "eu-north-a100".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let c = trainer_config(&j, &cfg, "eu-west").unwrap();
        assert_eq!(
            c.checkpoints,
            "s3://checkpoints-eu-north/customers/order-42-uid-42/"
        );
        assert_eq!(c.training.checkpoint_every, 100);
        assert_eq!(c.training.resolution, 1024);
        assert_eq!(c.training.seed, derived_seed("uid-42"));
    }

    #[test]
    fn the_trainer_checks_the_dataset_under_the_platforms_rules() {
        let mut cfg = platform();
        cfg.dataset.max_images = 42;
        let c = trainer_config(&job(false), &cfg, "eu-west").unwrap();
        assert_eq!(c.dataset.rules, cfg.dataset);
    }
}
