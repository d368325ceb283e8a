//! The trainer contract: the config file the operator writes and the trainer reads, the
//! progress lines the trainer prints on stdout, the summary it leaves in the container's
//! termination-message file, and the exit codes that tell "bad input, do not retry" from
//! "crashed, retry".
//!
//! The operator mounts the config file (from a Secret, since it holds the customer's trigger
//! word and description and the attempt's presigned URLs) and passes `--config PATH`. The pod
//! holds no S3 credential: its only access to S3 is [`Grants`], one presigned URL per object
//! it may read or write, all inside its own job's layout (and the platform's base weights),
//! valid until the attempt's deadline. Nothing else about the job reaches the pod.
//!
//! Progress travels through the pod's log: the operator reads the newest lines through the
//! `pods/log` subresource, which works on a locked-down pod (no network path from the pod to
//! the operator, no extra credentials) and on any conformant cluster.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dataset::DatasetRules;
use crate::v1alpha1::{ConceptType, LrScheduler, MixedPrecision, ModelFamily, TimestepSampling};

/// Exit code of a successful run.
pub const EXIT_OK: i32 = 0;
/// Exit code for input that can never succeed (invalid config, dataset or base model): the
/// operator fails the job without retrying.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Any other non-zero exit code (including 137 for a kill) is a crash the operator retries
/// within `backoffLimit`.
pub const EXIT_CRASH: i32 = 1;

/// Prefix of every machine-readable line on the trainer's stdout, so that other output (a
/// library's warning) never parses as progress.
pub const EVENT_PREFIX: &str = "LORAPLANE ";

/// The trainer's whole input, one file. Unknown keys are rejected.
#[derive(Serialize, Deserialize, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainerConfig {
    /// The job this run belongs to (namespace/name/uid), for object keys and metadata.
    pub job: JobRef,
    /// The base model to adapt.
    pub base_model: BaseModelSource,
    /// The dataset zip and its checksum.
    pub dataset: DatasetSource,
    /// The concept: type and trigger word (sensitive) and description (sensitive).
    pub concept: ConceptConfig,
    /// Hyperparameters, fully resolved (no defaults left to the trainer's judgement).
    pub training: TrainingConfig,
    /// Where checkpoints go (`s3://bucket/prefix/` or a local directory); the newest one is
    /// resumed from when present.
    pub checkpoints: String,
    /// Where the LoRA files go (`s3://bucket/prefix/` or a local directory).
    pub output: String,
    /// The attempt's access to `s3://` locations; empty means local paths only.
    #[serde(default, skip_serializing_if = "Grants::is_empty")]
    pub grants: Grants,
    /// Scratch directory (the job's claim, or a memory-backed volume for zero retention).
    pub work_dir: String,
    /// Where to write the final summary (Kubernetes' `terminationMessagePath`).
    #[serde(default = "default_termination_message_path")]
    pub termination_message_path: String,
    /// Print a progress line every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u32,
    /// Sample images rendered while training (none when absent).
    #[serde(default, skip_serializing_if = "SamplesConfig::is_never")]
    pub samples: SamplesConfig,
}

/// Which sample images a run renders, fully resolved: the trainer renders a set (one image per
/// prompt) at each step [`crate::layout::sample_steps`] names, writes them under the output
/// location ([`crate::layout::sample_file`]) with a contact sheet of every set so far
/// ([`crate::layout::CONTACT_SHEET_FILE`]), and reports each set in a progress line.
#[derive(Serialize, Deserialize, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SamplesConfig {
    /// Whether sets are rendered at all.
    pub when: SampleWhen,
    /// The prompts, one image each (customer text: never logged).
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Seed of the first prompt's initial noise; prompt `i` uses `seed + i`.
    #[serde(default)]
    pub seed: u64,
    /// Sampler steps per image.
    #[serde(default = "default_sample_steps")]
    pub steps: u32,
    /// Guidance: SD's classifier-free scale, or the value FLUX.1-dev's transformer embeds
    /// (see [`SamplesConfig::default_guidance`]).
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    /// Image side in pixels (0: the training resolution).
    #[serde(default)]
    pub resolution: u32,
    /// A set every this many training steps (0: none between), besides the base model's
    /// before training and the final one.
    #[serde(default)]
    pub every: u64,
}

impl SamplesConfig {
    /// Whether no set is rendered.
    pub fn is_never(&self) -> bool {
        self.when == SampleWhen::Never
    }

    /// The guidance a family's samples get when a job names none: diffusers' pipeline defaults,
    /// 7.5 (classifier-free) for SD, 3.5 (embedded) for FLUX.1-dev, what it trains with.
    pub fn default_guidance(family: ModelFamily) -> f64 {
        match family {
            ModelFamily::Flux1 => 3.5,
            ModelFamily::Sd15 | ModelFamily::Sdxl => default_guidance(),
        }
    }

    /// The interval between sets when a job names none: the checkpoint interval, widened to a
    /// multiple of it so that at most two sets fall between the base's and the last one: with
    /// the default sampler steps that keeps a 1000-step run's samples under 10 % of its wall
    /// time at full size (trainer README, "Preview rendering").
    pub fn default_every(total_steps: u64, checkpoint_every: u64) -> u64 {
        let interval = checkpoint_every.max(1);
        total_steps.div_ceil(3).div_ceil(interval).max(1) * interval
    }

    /// The prompts a set renders: the configured ones, else two built from the trigger word
    /// (one close, one in a scene) so the images show whether the LoRA learnt it. The trainer
    /// renders them and the operator grants a file for each, so both count them here.
    pub fn prompts_for(&self, concept: ConceptType, trigger_word: &str) -> Vec<String> {
        if !self.prompts.is_empty() {
            return self.prompts.clone();
        }
        let t = trigger_word;
        match concept {
            ConceptType::Character => vec![
                format!("a photo of {t}, portrait, looking at the camera"),
                format!("{t} walking in a park, full body"),
            ],
            ConceptType::Style => vec![
                format!("a mountain landscape at sunset, {t} style"),
                format!("a portrait of an old man, {t} style"),
            ],
            ConceptType::Object => vec![
                format!("a photo of {t} on a wooden table"),
                format!("{t} on a city street, daylight"),
            ],
        }
    }
}

impl Default for SamplesConfig {
    fn default() -> Self {
        SamplesConfig {
            when: SampleWhen::Never,
            prompts: Vec::new(),
            seed: 0,
            steps: default_sample_steps(),
            guidance: default_guidance(),
            resolution: 0,
            every: 0,
        }
    }
}

impl std::fmt::Debug for SamplesConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamplesConfig")
            .field("when", &self.when)
            .field("prompts", &self.prompts.len())
            .field("seed", &self.seed)
            .field("steps", &self.steps)
            .field("guidance", &self.guidance)
            .field("resolution", &self.resolution)
            .field("every", &self.every)
            .finish()
    }
}

/// When a run renders sample sets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum SampleWhen {
    /// No samples.
    #[default]
    Never,
    /// Before training (the base model), every `every` steps, and at the end.
    Checkpoints,
}

/// Sampler steps per image when a job names none: 12 keeps the default sets within 10 % of a
/// run's wall time at full size (measured on SD1.5 at 512 px, 1000 steps: 20 steps took 14.9 %;
/// trainer README, "Preview rendering").
fn default_sample_steps() -> u32 {
    12
}

fn default_guidance() -> f64 {
    7.5
}

impl std::fmt::Debug for TrainerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The concept holds customer text; everything else is safe to show.
        f.debug_struct("TrainerConfig")
            .field("job", &self.job)
            .field("base_model", &self.base_model)
            .field("dataset", &self.dataset)
            .field("concept", &"<redacted>")
            .field("training", &self.training)
            .field("checkpoints", &self.checkpoints)
            .field("output", &self.output)
            .field("grants", &self.grants)
            .field("work_dir", &self.work_dir)
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

fn default_termination_message_path() -> String {
    "/dev/termination-log".to_string()
}

fn default_log_every() -> u32 {
    10
}

/// Which job a run belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobRef {
    /// Namespace of the LoRATrainingJob.
    pub namespace: String,
    /// Name of the LoRATrainingJob.
    pub name: String,
    /// UID of the LoRATrainingJob.
    pub uid: String,
}

/// The base model: family and a diffusers-layout folder (local path or `s3://` prefix).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BaseModelSource {
    /// `sd15`, `sdxl` or `flux1`.
    pub family: ModelFamily,
    /// Folder with `model_index.json`, `unet/` or `transformer/`, `vae/`, `text_encoder/`,
    /// `tokenizer/`...
    pub path: String,
    /// The weights' licence as the platform states it (`families[].licence.name`), written
    /// into the LoRA's `modelspec.license`; absent: the family's published licence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
}

/// The dataset zip.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatasetSource {
    /// `s3://bucket/key.zip` or a local path.
    pub uri: String,
    /// Lowercase hex SHA-256 the zip must have.
    pub sha256: String,
    /// The platform's dataset rules, the same the API checked the upload against.
    #[serde(default)]
    pub rules: DatasetRules,
}

/// The concept. Sensitive: never logged.
#[derive(Serialize, Deserialize, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConceptConfig {
    /// Character, style or object.
    #[serde(rename = "type")]
    pub concept_type: ConceptType,
    /// Trigger word prepended to captions that lack it.
    pub trigger_word: String,
    /// Free-text description (may seed captions of images without a `.txt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Fully resolved hyperparameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingConfig {
    /// Optimiser steps.
    pub steps: u64,
    /// LoRA rank.
    pub rank: u32,
    /// LoRA alpha (adapter scale = alpha / rank).
    pub alpha: f64,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// `constant` or `cosine`.
    pub lr_scheduler: LrScheduler,
    /// Linear warmup steps.
    #[serde(default)]
    pub lr_warmup_steps: u64,
    /// Images per step.
    pub batch_size: u32,
    /// Training resolution (long side of each bucket), a multiple of 64.
    pub resolution: u32,
    /// Random seed.
    pub seed: u64,
    /// Checkpoint every this many steps.
    pub checkpoint_every: u64,
    /// `fp32`, `fp16` or `bf16` (CPU runs compute in fp32 whatever is asked, flux1 on a GPU
    /// in bf16).
    pub mixed_precision: MixedPrecision,
    /// Gradient checkpointing of the trained network's blocks; absent: the trainer's default
    /// for the family and device (on for SDXL and flux1 on a GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// Noise offset (0 disables it).
    #[serde(default)]
    pub noise_offset: f64,
    /// Min-SNR gamma; absent disables the weighting (SD families only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_snr_gamma: Option<f64>,
    /// How flow-matching models draw the training noise level (flux1 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_sampling: Option<TimestepSampling>,
    /// The guidance value guidance-distilled (dev) models train with; absent: 3.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    /// flux1 only: the block layers that get adapters (`v1alpha1::FLUX_LORA_TARGETS` names);
    /// absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_targets: Option<Vec<String>>,
}

/// Presigned URLs: the trainer's whole access to S3. Keys are the `s3://bucket/key` names the
/// rest of the config uses (and the trainer reports back); values are the URLs that grant
/// one method on that one object. A location with no grant cannot be reached, so "listing"
/// a prefix means the granted objects under it.
#[derive(Serialize, Deserialize, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Grants {
    /// Objects the trainer may read (presigned GET).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub get: BTreeMap<String, String>,
    /// Objects the trainer may write (presigned PUT).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub put: BTreeMap<String, String>,
    /// When the URLs stop working (RFC 3339), for messages; a trainer still running then
    /// fails its next transfer and the operator's next attempt gets fresh grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl Grants {
    /// Whether nothing is granted (local paths only).
    pub fn is_empty(&self) -> bool {
        self.get.is_empty() && self.put.is_empty()
    }
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URLs are bearer credentials: show what they reach, never the signatures.
        f.debug_struct("Grants")
            .field("get", &self.get.keys().collect::<Vec<_>>())
            .field("put", &self.put.keys().collect::<Vec<_>>())
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// An S3-compatible endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Endpoint {
    /// Endpoint URL, e.g. `https://s3.eu-west-1.amazonaws.com` or `http://127.0.0.1:8333`.
    #[schemars(pattern(crate::patterns::HTTP_URL_PATTERN))]
    pub endpoint: String,
    /// Signing region.
    #[schemars(length(min = 1))]
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by SeaweedFS and MinIO.
    #[serde(default)]
    pub force_path_style: bool,
}

/// One machine-readable line on the trainer's stdout: `LORAPLANE {json}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum TrainerEvent {
    /// Training progress.
    #[serde(rename_all = "camelCase")]
    Progress {
        /// Steps completed.
        step: u64,
        /// Steps in total.
        total_steps: u64,
        /// Smoothed loss.
        loss: f64,
        /// Recent throughput.
        steps_per_second: f64,
        /// Estimated seconds left.
        eta_seconds: u64,
    },
    /// A checkpoint was written.
    #[serde(rename_all = "camelCase")]
    Checkpoint {
        /// The step it holds.
        step: u64,
        /// Where it is.
        uri: String,
    },
    /// A set of sample images was rendered and written (its files are named by the step:
    /// [`crate::layout::sample_file`]).
    #[serde(rename_all = "camelCase")]
    Samples {
        /// The training step the set shows (0: the base model).
        step: u64,
        /// Images in the set (one per prompt).
        images: u32,
        /// Seconds the set took to render and write.
        seconds: f64,
    },
    /// Training resumed from a checkpoint.
    #[serde(rename_all = "camelCase")]
    Resumed {
        /// The step resumed from.
        step: u64,
    },
}

impl TrainerEvent {
    /// The stdout line for this event.
    pub fn to_line(&self) -> String {
        // Serialising these plain structs cannot fail; fall back to an empty object anyway.
        format!(
            "{EVENT_PREFIX}{}",
            serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
        )
    }

    /// Parses a stdout line; `None` for lines that are not trainer events.
    pub fn parse_line(line: &str) -> Option<TrainerEvent> {
        serde_json::from_str(line.trim_end().strip_prefix(EVENT_PREFIX)?).ok()
    }
}

/// How a run ended, as written to the termination-message file (at most 4 KiB, Kubernetes'
/// limit).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerSummary {
    /// `succeeded`, `badInput` or `crashed`.
    pub outcome: Outcome,
    /// Steps completed.
    pub step: u64,
    /// The LoRA files written (empty unless succeeded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactInfo>,
    /// One line saying what went wrong (never customer text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a run ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// The LoRA was written and uploaded.
    Succeeded,
    /// The input can never work: do not retry.
    BadInput,
    /// Something broke: retry.
    Crashed,
}

/// One output file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactInfo {
    /// `kohya` or `diffusers`.
    pub format: String,
    /// Where it is.
    pub uri: String,
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_sample_interval_is_a_checkpoint_multiple_with_at_most_two_sets_between() {
        use crate::layout::sample_steps;
        for (total, every, want) in [
            (1000, 100, 400),
            (1000, 250, 500),
            (100, 100, 100),
            (2000, 1, 667),
            (7, 2, 4),
        ] {
            let got = SamplesConfig::default_every(total, every);
            assert_eq!(got, want, "{total} steps, checkpoints every {every}");
            assert!(sample_steps(total, got).len() <= 4);
        }
    }

    #[test]
    fn default_sample_prompts_use_the_trigger_word_and_given_ones_win() {
        let never = SamplesConfig::default();
        for concept in [
            ConceptType::Character,
            ConceptType::Style,
            ConceptType::Object,
        ] {
            let prompts = never.prompts_for(concept, "zxq person");
            assert_eq!(prompts.len(), 2);
            assert!(
                prompts.iter().all(|p| p.contains("zxq person")),
                "{prompts:?}"
            );
            assert_ne!(prompts[0], prompts[1]);
        }
        let given = SamplesConfig {
            prompts: vec!["one".into()],
            ..SamplesConfig::default()
        };
        assert_eq!(given.prompts_for(ConceptType::Style, "t"), ["one"]);
    }

    #[test]
    fn event_lines_round_trip_and_ignore_other_output() {
        let ev = TrainerEvent::Progress {
            step: 10,
            total_steps: 100,
            loss: 0.25,
            steps_per_second: 2.0,
            eta_seconds: 45,
        };
        let line = ev.to_line();
        assert!(
            line.starts_with("LORAPLANE {\"event\":\"progress\""),
            "{line}"
        );
        assert_eq!(TrainerEvent::parse_line(&line), Some(ev));
        assert_eq!(TrainerEvent::parse_line("warning: something"), None);
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        let err =
            serde_json::from_str::<JobRef>(r#"{"namespace":"a","name":"b","uid":"c","extra":1}"#)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        assert!(err.contains("unknown field `extra`"), "{err}");
    }
}
