//! `LoRATrainingJob` v1alpha1: one paid order's LoRA training, as the cluster sees it.
//!
//! The doc comments on every type and field below become the CRD's OpenAPI descriptions, which
//! is what `kubectl explain ltj.spec...` prints: write them for a platform engineer.
//!
//! Validation lives in the schema wherever the API server can enforce it (enums, ranges, string
//! lengths, patterns, CEL rules), so a bad object is rejected at `kubectl apply` time rather than
//! discovered by the operator.
//!
//! Sensitive fields (`spec.concept.description`, `spec.concept.triggerWord`) must never be logged
//! or copied into labels, annotations or environment variables; `Concept`'s `Debug` redacts them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The API group of every loraplane resource.
pub const GROUP: &str = "loraplane.io";
/// The served and stored version of `LoRATrainingJob`.
pub const VERSION: &str = "v1alpha1";

/// Desired state of a LoRA training job: what to train, on which data, where it may run and
/// how long its data may be kept.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "loraplane.io",
    version = "v1alpha1",
    kind = "LoRATrainingJob",
    plural = "loratrainingjobs",
    singular = "loratrainingjob",
    shortname = "ltj",
    category = "loraplane",
    doc = "A LoRA training job: one paid order's training of a LoRA adapter for a Stable Diffusion base model, placed on a GPU node pool in a region its data may go to.",
    namespaced,
    status = "LoRATrainingJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.baseModel.family"}"#,
    printcolumn = r#"{"name":"Region","type":"string","jsonPath":".status.placement.region"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("!has(self.retention) || !has(self.retention.mode) || self.retention.mode != 'zeroRetention' || !has(self.dataUse) || !has(self.dataUse.trainingConsent) || !self.dataUse.trainingConsent")
        .message("spec.dataUse.trainingConsent cannot be true for a zeroRetention job: zero retention keeps no copy to train on")
)]
#[x_kube(
    validation = Rule::new("!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)")
        .message("spec.cancel cannot be undone: a cancelled job stays cancelled")
)]
#[x_kube(
    validation = Rule::new("!has(oldSelf.erasure) || (has(self.erasure) && self.erasure == oldSelf.erasure)")
        .message("spec.erasure cannot be changed or withdrawn once requested")
)]
#[x_kube(
    validation = Rule::new("!has(self.samples) || !has(self.samples.every) || !has(self.training) || (self.training.steps - 1) / self.samples.every <= 48")
        .message("spec.samples.every is too small for spec.training.steps: at most 50 sample sets per job")
)]
#[x_kube(
    validation = Rule::new("!has(self.training) || self.baseModel.family == 'flux1' || (!has(self.training.timestepSampling) && !has(self.training.guidanceScale) && !has(self.training.loraTargets))")
        .message("spec.training.timestepSampling, guidanceScale and loraTargets apply to flux1 only")
)]
#[x_kube(
    validation = Rule::new("!has(self.training) || self.baseModel.family != 'flux1' || !has(self.training.minSnrGamma)")
        .message("spec.training.minSnrGamma applies to the SD families only: flux1 weights every noise level alike")
)]
#[serde(rename_all = "camelCase")]
pub struct LoRATrainingJobSpec {
    /// The base model the LoRA is trained against. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.baseModel is immutable"))]
    pub base_model: BaseModel,

    /// What the LoRA teaches the model. Immutable. Contains sensitive customer text.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.concept is immutable"))]
    pub concept: Concept,

    /// The customer's uploaded images. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.dataset is immutable"))]
    pub dataset: Dataset,

    /// Training hyperparameters. Every field has a default; omit the block for the plan's
    /// defaults. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.training is immutable"))]
    pub training: Training,

    /// Sample images rendered while training, so the customer sees the LoRA at work before
    /// downloading it: a set of one image per prompt before training (the base model, for
    /// before and after), every `every` steps and at the end, each with a contact sheet of
    /// all sets so far. Omit for none. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.samples is immutable"))]
    pub samples: Option<Samples>,

    /// GPU requirements of the training pod. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.resources is immutable"))]
    pub resources: Resources,

    /// Where the job may run. Residency is enforced on every placement, including failover.
    #[serde(default)]
    pub placement: Placement,

    /// How long the job's inputs and outputs are kept.
    #[serde(default)]
    pub retention: Retention,

    /// What the customer allowed us to do with their data beyond this job.
    #[serde(default)]
    pub data_use: DataUse,

    /// Suspends the job: its pod is removed while its claim and checkpoints are kept, and
    /// setting it back to false resumes from the last checkpoint. Works like `Job.spec.suspend`,
    /// so a queueing system (Kueue) can admit the job by flipping it.
    #[serde(default)]
    pub suspend: bool,

    /// The controller that reconciles this job. Empty or `loraplane.io/operator` means the
    /// loraplane operator; any other value (for example `kueue.x-k8s.io/multikueue`) makes the
    /// loraplane operator leave the job alone. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 63),
        regex(
            pattern = r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?/[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
        )
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.managedBy is immutable"))]
    pub managed_by: Option<String>,

    /// Wall-clock limit in seconds for the whole job, counted from its first start and
    /// excluding time suspended. When exceeded the job fails with reason `DeadlineExceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 2_592_000))]
    pub active_deadline_seconds: Option<i64>,

    /// How many genuine trainer failures (crashes, not preemptions or lost nodes) are retried
    /// before the job fails with reason `BackoffLimitExceeded`.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 20))]
    pub backoff_limit: i32,

    /// Stops the job for good: its pod is removed, no attempt starts again, and the job ends
    /// `Cancelled`. One-way: once true it cannot be set back. Retention then runs as for any
    /// ended job (the API sets this when a customer cancels).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,

    /// A request to erase every byte of the job. The operator stops the job for good, deletes
    /// its pods and waits for them, deletes its data in every bucket of every region it
    /// touched, its claims and its Secret, records an audit entry without personal data, and
    /// finally deletes this object. One-way: once set it cannot be changed or removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure: Option<ErasureRequest>,
}

/// Why a job's erasure was requested (recorded in the audit record).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ErasureReason {
    /// The customer asked for their data to be erased.
    CustomerRequest,
    /// The order was refunded.
    Refund,
    /// The payment was disputed.
    Dispute,
}

impl ErasureReason {
    /// The name used in the CRD, audit records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErasureReason::CustomerRequest => "customerRequest",
            ErasureReason::Refund => "refund",
            ErasureReason::Dispute => "dispute",
        }
    }
}

/// A request to erase a job's data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErasureRequest {
    /// When the erasure was requested; the erasure latency is measured from here.
    pub requested_at: Time,
    /// `customerRequest`, `refund` or `dispute`.
    pub reason: ErasureReason,
}

fn default_backoff_limit() -> i32 {
    3
}

/// Base model families the trainer knows how to train.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum ModelFamily {
    /// Stable Diffusion 1.5 (and fine-tunes sharing its architecture).
    #[serde(rename = "sd15")]
    Sd15,
    /// Stable Diffusion XL 1.0 (and fine-tunes sharing its architecture).
    #[serde(rename = "sdxl")]
    Sdxl,
    /// FLUX.1 (dev, schnell and fine-tunes sharing their architecture); the variant comes from
    /// the weights (dev embeds guidance). FLUX.1-dev's licence is non-commercial unless the
    /// service holds a commercial licence: see the platform's `families[].licence`.
    #[serde(rename = "flux1")]
    Flux1,
}

impl ModelFamily {
    /// The name used in the CRD, configuration files and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::Sd15 => "sd15",
            ModelFamily::Sdxl => "sdxl",
            ModelFamily::Flux1 => "flux1",
        }
    }

    /// The training resolution used when `spec.training.resolution` is not set.
    pub fn default_resolution(self) -> u32 {
        match self {
            ModelFamily::Sd15 => 512,
            ModelFamily::Sdxl | ModelFamily::Flux1 => 1024,
        }
    }
}

/// The base model the LoRA adapts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseModel {
    /// Model family: `sd15` or `sdxl`. Decides the architecture, the minimum GPU memory and the
    /// output key naming.
    pub family: ModelFamily,

    /// Where the base weights are, in the diffusers folder layout (for example
    /// `s3://models/sdxl-base-1.0/`). When empty the operator uses the family's configured
    /// weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub weights: Option<String>,
}

/// The kind of concept a LoRA learns; it changes captioning and default hyperparameters.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ConceptType {
    /// A person or a character.
    Character,
    /// An artistic style.
    Style,
    /// A thing.
    Object,
}

/// The sample images of a job (`spec.samples`); every field has a default.
#[derive(Serialize, Deserialize, Clone, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Samples {
    /// The prompts, one image each. Empty: two built from the trigger word and concept type.
    /// Sensitive customer text, like the concept: it reaches only the trainer's config file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::layout::MAX_SAMPLE_PROMPTS), inner(length(min = 1, max = 500)))]
    pub prompts: Vec<String>,

    /// A set every this many training steps, besides the first and the last. Default: the
    /// checkpoint interval, widened to a multiple of it so that at most two sets fall
    /// between, which keeps sampling a small share of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub every: Option<i64>,

    /// Sampler steps per image. Default 12 (a small share of the run's time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 150))]
    pub steps: Option<i32>,

    /// Guidance: the classifier-free scale for SD (default 7.5), the value FLUX.1-dev's
    /// transformer embeds for flux1 (default 3.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 30.0))]
    pub guidance: Option<f64>,

    /// Seed of the first prompt's noise (prompt i uses seed + i, the same in every set).
    /// Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub seed: Option<i64>,

    /// Image side in pixels, a multiple of 64. Default: the training resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 2048), extend("multipleOf" = 64))]
    pub resolution: Option<i32>,
}

impl std::fmt::Debug for Samples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The prompts are customer text.
        f.debug_struct("Samples")
            .field("prompts", &self.prompts.len())
            .field("every", &self.every)
            .field("steps", &self.steps)
            .field("guidance", &self.guidance)
            .field("seed", &self.seed)
            .field("resolution", &self.resolution)
            .finish()
    }
}

/// What the LoRA teaches. Sensitive: never logged, never in labels, annotations or env.
#[derive(Serialize, Deserialize, Clone, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Concept {
    /// Whether the concept is a character, a style or an object.
    #[serde(rename = "type")]
    pub concept_type: ConceptType,

    /// The word that invokes the concept in prompts (for example `zxq`). It is prepended to
    /// captions that lack it. 1 to 64 printable characters: no commas, no control or format
    /// characters (line breaks, NUL, bidi overrides, zero-width marks), no line or paragraph
    /// separators, no surrounding blanks.
    #[schemars(length(min = 1, max = 64), regex(pattern = TRIGGER_WORD_PATTERN))]
    pub trigger_word: String,

    /// The customer's free-text description of the concept. Sensitive: it reaches only the
    /// trainer's config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2000))]
    pub description: Option<String>,
}

impl std::fmt::Debug for Concept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Debug output ends up in logs and panics; the customer's words must not.
        f.debug_struct("Concept")
            .field("concept_type", &self.concept_type)
            .field("trigger_word", &"<redacted>")
            .field(
                "description",
                &self.description.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The customer's uploaded images.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dataset {
    /// The dataset zip in a regional bucket, as `s3://BUCKET/KEY`.
    #[schemars(
        length(max = 1024),
        regex(pattern = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+$")
    )]
    pub uri: String,

    /// Lowercase hex SHA-256 of the zip; the trainer refuses a dataset that does not match.
    #[schemars(regex(pattern = r"^[a-f0-9]{64}$"))]
    pub sha256: String,

    /// The region whose bucket holds the dataset. Placement prefers it (data locality) and
    /// never moves the data out of the job's residency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub region: Option<String>,
}

/// Learning-rate schedules.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum LrScheduler {
    /// The same rate every step (after warmup).
    #[default]
    Constant,
    /// Cosine decay to zero (after warmup).
    Cosine,
}

/// FLUX.1's block layers that can carry LoRA adapters (module-path suffixes, as PEFT's
/// `target_modules`): the image and context attention projections, both feed-forwards, and
/// the single blocks' MLP input and fused output. Every one by default.
pub const FLUX_LORA_TARGETS: [&str; 14] = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
];

/// How a flow-matching model's training noise level σ is drawn (flux1 only; the SD families
/// refuse it).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum TimestepSampling {
    /// σ uniform over the scheduler's training sigmas (diffusers' `weighting_scheme=none`,
    /// the default of its FLUX.1 LoRA script).
    #[default]
    Uniform,
    /// σ = sigmoid(u), u ~ N(0, 1) (diffusers' `logit_normal`; SD3's choice): more steps at
    /// middle noise levels.
    LogitNormal,
    /// σ = sigmoid(u), u ~ N(0, 1), shifted toward noise by the resolution-dependent μ the
    /// model's scheduler uses at inference (kohya's `flux_shift`).
    FluxShift,
}

/// Arithmetic precision of the forward and backward passes.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum MixedPrecision {
    /// Full 32-bit floats. (Named `fp32`, not kohya's `no`: YAML 1.1 tools read a bare `no`
    /// as the boolean false.)
    Fp32,
    /// 16-bit floats.
    Fp16,
    /// bfloat16 (the default on GPUs that support it).
    #[default]
    Bf16,
}

/// Training hyperparameters, named as kohya-ss/sd-scripts users expect.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.checkpointEvery) || self.checkpointEvery <= self.steps")
        .message("spec.training.checkpointEvery must not exceed spec.training.steps")
)]
#[x_kube(
    validation = Rule::new("self.learningRate > 0.0")
        .message("spec.training.learningRate must be greater than 0")
)]
#[x_kube(
    validation = Rule::new("!has(self.lrWarmupSteps) || self.lrWarmupSteps < self.steps")
        .message("spec.training.lrWarmupSteps must be smaller than spec.training.steps")
)]
pub struct Training {
    /// Optimiser steps to train for.
    #[serde(default = "default_steps")]
    #[schemars(range(min = 1, max = 100_000))]
    pub steps: i64,

    /// LoRA rank (the inner dimension of each adapter).
    #[serde(default = "default_rank")]
    #[schemars(range(min = 1, max = 256))]
    pub rank: i32,

    /// LoRA alpha; adapters are scaled by alpha / rank.
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0.001, max = 1024.0))]
    pub alpha: f64,

    /// Peak learning rate of AdamW, greater than 0 and at most 1.
    #[serde(default = "default_learning_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub learning_rate: f64,

    /// Learning-rate schedule: `constant` or `cosine`.
    #[serde(default)]
    pub lr_scheduler: LrScheduler,

    /// Steps of linear warmup before the schedule starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000))]
    pub lr_warmup_steps: Option<i64>,

    /// Images per optimiser step.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 64))]
    pub batch_size: i32,

    /// Training resolution in pixels (the long side of each bucket), a multiple of 64. When
    /// empty, 512 for sd15 and 1024 for sdxl and flux1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 2048), extend("multipleOf" = 64))]
    pub resolution: Option<i32>,

    /// Random seed; the same seed, data and hardware give the same LoRA. When empty the
    /// operator derives one from the job's UID and records it in the trainer's config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub seed: Option<i64>,

    /// Save a resumable checkpoint every this many steps. When empty the operator's configured
    /// interval applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub checkpoint_every: Option<i64>,

    /// Arithmetic precision: `fp32`, `fp16` or `bf16`. What runs is recorded in the LoRA:
    /// fp32 on the CPU, bf16 only when asked on a GPU (fp16 runs as fp32), and bf16 for flux1
    /// on a GPU whatever is asked (its transformer does not fit in fp32).
    #[serde(default)]
    pub mixed_precision: MixedPrecision,

    /// Recompute each block's activations (UNet or FLUX.1 transformer) in the backward pass
    /// instead of keeping them: much less GPU memory for about a third more compute. When
    /// empty: on for SDXL and flux1 on a GPU, off otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,

    /// Noise offset (0 disables it); helps very dark or bright images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub noise_offset: Option<f64>,

    /// Min-SNR loss weighting gamma (5 is the usual choice); empty disables it. SD families
    /// only: flow-matching models (flux1) weight every noise level alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.1, max = 100.0))]
    pub min_snr_gamma: Option<f64>,

    /// flux1 only: how the training noise level is drawn (`uniform`, `logitNormal`,
    /// `fluxShift`). When empty: `uniform`, as diffusers' FLUX.1 LoRA script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_sampling: Option<TimestepSampling>,

    /// flux1 only: which of the transformer's block layers get adapters, as PEFT's
    /// `target_modules` names them (`attn.to_q`, `attn.add_k_proj`, `ff.net.2`, `proj_mlp`,
    /// ...; see [`FLUX_LORA_TARGETS`]). When empty: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 14))]
    pub lora_targets: Option<Vec<String>>,

    /// flux1 dev models only: the guidance value the transformer is conditioned on while
    /// training (guidance-distilled models embed it). When empty: 3.5, as diffusers' and
    /// kohya's FLUX.1 scripts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 30.0))]
    pub guidance_scale: Option<f64>,
}

fn default_steps() -> i64 {
    1000
}
fn default_rank() -> i32 {
    16
}
fn default_alpha() -> f64 {
    16.0
}
fn default_learning_rate() -> f64 {
    1e-4
}
fn default_batch_size() -> i32 {
    1
}

impl Default for Training {
    fn default() -> Self {
        Training {
            steps: default_steps(),
            rank: default_rank(),
            alpha: default_alpha(),
            learning_rate: default_learning_rate(),
            lr_scheduler: LrScheduler::default(),
            lr_warmup_steps: None,
            batch_size: default_batch_size(),
            resolution: None,
            seed: None,
            checkpoint_every: None,
            mixed_precision: MixedPrecision::default(),
            gradient_checkpointing: None,
            noise_offset: None,
            min_snr_gamma: None,
            timestep_sampling: None,
            guidance_scale: None,
            lora_targets: None,
        }
    }
}

/// GPU requirements of the training pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// The GPUs the pod needs.
    #[serde(default)]
    pub gpu: GpuRequirements,
}

/// What kind of GPU, and how many, a job needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuRequirements {
    /// GPUs on one node (the `nvidia.com/gpu` limit). The trainer trains on one GPU (there is
    /// no data-parallel training yet), so a job asks for exactly one: more would be paid for
    /// and left idle.
    #[serde(default = "default_gpu_count")]
    #[schemars(range(min = 1))]
    #[x_kube(validation = Rule::new("self == 1").message("the trainer trains on one GPU: resources.gpu.count must be 1 (multi-GPU data-parallel training is not supported yet)"))]
    pub count: i32,

    /// Minimum memory per GPU in GiB. When empty the model family's configured minimum
    /// applies (the larger of the two always wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub min_memory_gi_b: Option<i32>,

    /// Acceptable GPU products, as in the `nvidia.com/gpu.product` node label (for example
    /// `NVIDIA-A100-SXM4-80GB`). Empty accepts any product with enough memory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "set"))]
    pub products: Vec<GpuProduct>,
}

fn default_gpu_count() -> i32 {
    1
}

impl Default for GpuRequirements {
    fn default() -> Self {
        GpuRequirements {
            count: default_gpu_count(),
            min_memory_gi_b: None,
            products: Vec::new(),
        }
    }
}

/// A GPU product name as in the `nvidia.com/gpu.product` node label.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(transparent)]
pub struct GpuProduct(
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
    )]
    pub String,
);

/// Jurisdictions a job's data may be processed in.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Residency {
    /// Only regions inside the European Economic Area.
    Eea,
    /// Only regions in the United States.
    Us,
    /// Any configured region.
    #[default]
    Any,
}

/// Whether the job may use spot (preemptible) capacity.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum SpotPolicy {
    /// Only on-demand pools.
    Never,
    /// Spot and on-demand pools ranked by price and capacity.
    #[default]
    Allowed,
    /// Spot pools first; on-demand only when no spot pool fits.
    Preferred,
}

/// Where a job may run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// The jurisdiction the job's data may be processed in: `eea`, `us` or `any`. Enforced on
    /// every placement, including failover: an `eea` job waits rather than leave the EEA.
    /// Immutable: it is the customer's choice, part of what they paid for.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.placement.residency is immutable"))]
    pub residency: Residency,

    /// Optional allow-list of region names, further restricting the residency. Empty allows
    /// every region of the residency.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "set"))]
    pub regions: Vec<RegionName>,

    /// Spot capacity: `never`, `allowed` or `preferred`. Preempted spot pods resume from the
    /// last checkpoint without counting against `backoffLimit`.
    #[serde(default)]
    pub spot: SpotPolicy,
}

/// A region name as in the `topology.kubernetes.io/region` node label.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(transparent)]
pub struct RegionName(
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub String,
);

/// What a trigger word may be (see `Concept::trigger_word`), as the CRD's `pattern` (RE2
/// syntax, which the apiserver uses) and as [`trigger_word_ok`] for the API's own check.
pub const TRIGGER_WORD_PATTERN: &str = r"^[^\s,\p{C}]([^,\p{C}\p{Zl}\p{Zp}]*[^\s,\p{C}])?$";

/// Whether `word` is a valid trigger word: 1 to 64 characters matching
/// [`TRIGGER_WORD_PATTERN`].
pub fn trigger_word_ok(word: &str) -> bool {
    static PATTERN: std::sync::LazyLock<Option<regex::Regex>> =
        std::sync::LazyLock::new(|| regex::Regex::new(TRIGGER_WORD_PATTERN).ok());
    let len = word.chars().count();
    (1..=64).contains(&len) && PATTERN.as_ref().is_some_and(|p| p.is_match(word))
}

/// Retention modes.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum RetentionMode {
    /// Inputs and outputs are kept for the configured periods.
    #[default]
    Standard,
    /// Inputs live only in memory-backed volumes and are deleted when the pod ends; outputs
    /// are kept only for the delivery window (at most 24 hours).
    ZeroRetention,
}

/// How long the job's data is kept. Periods count from the job's completion. Deletion is done
/// by explicit deletes when the time is up; bucket lifecycle rules are only a backstop.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode != 'zeroRetention' || ((!has(self.keepInputsSeconds) || self.keepInputsSeconds == 0) && (!has(self.keepOutputsSeconds) || self.keepOutputsSeconds <= 86400))")
        .message("a zeroRetention job keeps no inputs (keepInputsSeconds must be 0) and outputs for at most 86400 seconds")
)]
pub struct Retention {
    /// `standard` or `zeroRetention`. Immutable: it is the customer's choice.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.retention.mode is immutable"))]
    pub mode: RetentionMode,

    /// Seconds the dataset and checkpoints are kept after completion. When empty: the plan's
    /// period for `standard` (7 days by default), 0 for `zeroRetention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub keep_inputs_seconds: Option<i64>,

    /// Seconds the trained LoRA files are kept after completion. When empty: the plan's period
    /// for `standard` (30 days by default), 24 hours for `zeroRetention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub keep_outputs_seconds: Option<i64>,
}

/// What the customer allowed beyond training their own LoRA.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataUse {
    /// Whether the customer consented to their images being used to improve our models.
    /// Without it nothing is copied anywhere beyond this job. Immutable: it is the customer's
    /// answer on the order.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.dataUse.trainingConsent is immutable"))]
    pub training_consent: bool,
    /// The customer withdrew their consent: the copy in the consented corpus is deleted (or
    /// never made). One-way: once true it cannot be set back.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self || !oldSelf").message("spec.dataUse.consentWithdrawn cannot be undone"))]
    pub consent_withdrawn: bool,
}

/// The lifecycle phase of a job.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Phase {
    /// Accepted, not yet placed.
    Pending,
    /// A pod exists and waits for a node.
    Scheduling,
    /// The trainer runs.
    Running,
    /// The LoRA was written and uploaded.
    Succeeded,
    /// The job gave up; see the `Failed` condition for why.
    Failed,
    /// Cancelled on request, refund or dispute.
    Cancelled,
}

impl Phase {
    /// The name used in the CRD and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Scheduling => "Scheduling",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Cancelled => "Cancelled",
        }
    }

    /// Whether the job has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

/// Observed state of a job, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoRATrainingJobStatus {
    /// Pending, Scheduling, Running, Succeeded, Failed or Cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Standard conditions: Scheduled, Running, Complete, Failed, Suspended, Cancelled, and
    /// Deleting (while a deleted job's data is purged, or its purge keeps failing). Each
    /// carries a reason, a message and the generation it was computed from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Where the current attempt runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStatus>,

    /// Every placement tried, oldest first: where, why it ended, when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub attempts: Vec<Attempt>,

    /// Genuine trainer failures so far, compared with `spec.backoffLimit`. Preemptions and
    /// lost nodes do not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<i32>,

    /// Training progress as last reported by the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// The trained LoRA files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub artifacts: Vec<Artifact>,

    /// The sample images rendered so far (`spec.samples`), in training order, and their
    /// contact sheet. No prompt text: a prompt is named by its index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub samples: Vec<SampleArtifact>,

    /// When the job's data was or will be deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionStatus>,

    /// When the job first started running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the job reached Succeeded, Failed or Cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Where the current attempt runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    /// Region (the `topology.kubernetes.io/region` of the pool's nodes).
    pub region: String,
    /// Node pool name from the operator's configuration.
    pub pool: String,
    /// The node the pod was bound to, once scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The training pod's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// One placement of the job and how it ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// Region of the attempt.
    pub region: String,
    /// Node pool of the attempt.
    pub pool: String,
    /// Node the pod ran on, if it was scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why the attempt ended (for example `Unschedulable`, `Preempted`, `NodeLost`,
    /// `TrainerFailed`, `Completed`); empty while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the attempt's pod was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// The training step the attempt resumed from (0 for a fresh start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<i64>,
}

/// Training progress reported by the trainer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Steps completed.
    pub step: i64,
    /// Steps in total.
    pub total_steps: i64,
    /// Training loss (smoothed) at the last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Estimated seconds until training completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// The step of the newest checkpoint in the job's bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_step: Option<i64>,
    /// Human-readable progress for `kubectl get` (for example `450/1000 45%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// When the trainer last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_time: Option<Time>,
}

/// A trained LoRA file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Format: `kohya` (ComfyUI, Automatic1111) or `diffusers` (PEFT, `load_lora_weights`).
    pub format: String,
    /// Where the file is, as `s3://BUCKET/KEY`.
    pub uri: String,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: i64,
}

/// A sample image, or the contact sheet of them all.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SampleArtifact {
    /// `image` or `contactSheet`.
    pub kind: SampleKind,
    /// The training step the image shows (0: the base model, before training); for the
    /// contact sheet, the newest set's.
    pub step: i64,
    /// The prompt's index in `spec.samples.prompts` (or the default prompts); absent for the
    /// contact sheet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<i32>,
    /// Where the PNG is, as `s3://BUCKET/KEY`.
    pub uri: String,
}

/// What a [`SampleArtifact`] is.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum SampleKind {
    /// One prompt's image in one set.
    #[default]
    Image,
    /// Every set so far side by side.
    ContactSheet,
}

/// When the job's data was or will be deleted. When the outputs are deleted the job object goes
/// too; what survives is the audit record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionStatus {
    /// When the dataset and checkpoints are due for deletion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_expire_at: Option<Time>,
    /// When the dataset, checkpoints and claims were deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_deleted_at: Option<Time>,
    /// When the trained LoRA files are due for deletion; the job object is deleted with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_expire_at: Option<Time>,
    /// When the trainer-config Secret and the finished pods were deleted (once the job ended
    /// and its outcome was recorded: nothing needs them again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<Time>,
    /// When the dataset and LoRA were copied into the consented corpus (consent given, job
    /// succeeded, the region has a corpus bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corpus_copied_at: Option<Time>,
    /// When the corpus copy was deleted (consent withdrawn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corpus_deleted_at: Option<Time>,
    /// Objects deleted from S3 so far while the job lived (its inputs, a withdrawn corpus
    /// copy); the audit record adds what the final purge deletes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_objects: Option<i64>,
    /// Bytes deleted from S3 so far while the job lived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_bytes: Option<i64>,
}
