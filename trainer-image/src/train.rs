//! One training run from config to uploaded LoRA: fetch and validate the dataset, load the
//! base model, cache latents and text embeddings, resume from the newest checkpoint, run the
//! DDPM training loop on the LoRA adapters, checkpoint every N steps, export and upload both
//! LoRA formats. Every error says whether retrying can help ([`TrainError::is_bad_input`]).
//!
//! Determinism: all randomness (timesteps, noise, noise offset) comes from one saved [`Rng`],
//! and the sample order of each epoch is a pure function of (seed, epoch), so a resumed run
//! replays exactly what an uninterrupted run would have done.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Tensor};
use loraplane_crds::layout::CHECKPOINT_FILE;
use loraplane_crds::trainer::TrainingConfig;
use loraplane_crds::trainer::{ArtifactInfo, Outcome, TrainerConfig, TrainerEvent, TrainerSummary};
use loraplane_crds::v1alpha1::{LrScheduler, MixedPrecision, ModelFamily, TimestepSampling};
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::dataset::{self, Sample};
use crate::export::{self, ExportAdapter, ExportError, ExportInfo, FluxVariant};
use crate::flow::FlowMatching;
use crate::model::flux::pipeline::FluxOptions;
use crate::model::{self, DiffusionModel, LoraSpec, ModelError, TextConditioning};
use crate::objective::Objective;
use crate::optim::{AdamW, AdamWParams, OptimError};
use crate::progress::{self, Tracker};
use crate::rng::Rng;
use crate::samples::SampleSets;
use crate::schedule::{self, NoiseSchedule, PredictionType, ScheduleError};
use crate::storage::{Location, Storage, StorageError};
use crate::tensors::{HostTensor, TensorFile, TensorFileError};
use loraplane_dataset::{DatasetError, DatasetRules};

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Creating the scratch directories failed.
    #[error("preparing work dir {path}: {source}")]
    PrepareWorkDir {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Reading or writing a location failed.
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// The dataset does not exist.
    #[error("dataset {uri} does not exist")]
    FetchDataset {
        /// Where it was looked for.
        uri: String,
    },
    /// The dataset's checksum differs from the configured one.
    #[error("dataset checksum mismatch: expected {expected}, got {actual}")]
    VerifyDataset {
        /// Configured checksum.
        expected: String,
        /// Actual checksum.
        actual: String,
    },
    /// The dataset is invalid.
    #[error("{0}")]
    ValidateDataset(#[from] DatasetError),
    /// The base model could not be loaded.
    #[error("loading base model: {0}")]
    LoadModel(ModelError),
    /// The base model's noise schedule is unusable.
    #[error("{0}")]
    Schedule(#[from] ScheduleError),
    /// A forward or backward computation failed.
    #[error("training computation: {0}")]
    Compute(String),
    /// The optimiser failed.
    #[error("{0}")]
    Optimize(#[from] OptimError),
    /// A checkpoint could not be used.
    #[error("{0}")]
    ReadCheckpoint(#[from] CheckpointError),
    /// A tensor file could not be written or read.
    #[error("{0}")]
    TensorFile(#[from] TensorFileError),
    /// Exporting the LoRA failed.
    #[error("{0}")]
    Export(#[from] ExportError),
    /// The loss became NaN or infinite.
    #[error("loss diverged at step {step}")]
    Diverged {
        /// The step.
        step: u64,
    },
    /// The run was stopped on request (tests use it to simulate a crash after a checkpoint).
    #[error("stopped after step {step}")]
    Interrupted {
        /// Steps completed.
        step: u64,
    },
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Compute(model::one_line(e).to_string())
    }
}

impl From<ModelError> for TrainError {
    fn from(e: ModelError) -> Self {
        TrainError::Compute(e.to_string())
    }
}

impl TrainError {
    /// True when retrying cannot help (invalid dataset, model or settings).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            TrainError::FetchDataset { .. }
                | TrainError::VerifyDataset { .. }
                | TrainError::ValidateDataset(_)
                | TrainError::LoadModel(_)
                | TrainError::Schedule(_)
                | TrainError::Storage(StorageError::NotFound { .. })
        )
    }
}

/// Knobs that are not part of the job's config.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Stop with [`TrainError::Interrupted`] after this many steps (crash simulation).
    pub stop_after: Option<u64>,
    /// Compute device.
    pub device: Device,
    /// Print event lines on stdout.
    pub emit_events: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            stop_after: None,
            device: default_device(),
            emit_events: true,
        }
    }
}

/// CUDA device 0 when built with `cuda` and a GPU is present, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}

/// One image's cached inputs.
#[derive(Clone, Debug)]
pub struct Cached {
    /// Scaled latents (1, C, h, w).
    pub latent: Tensor,
    /// Text conditioning for its caption.
    pub cond: TextConditioning,
    /// SDXL size/crop conditioning.
    pub time_ids: [f32; 6],
}

/// Encodes every sample once (latents are the VAE posterior mean, so caching is exact).
pub fn cache_samples(
    model: &DiffusionModel,
    samples: &[Sample],
    resolution: u32,
    rules: &DatasetRules,
) -> Result<Vec<Cached>, TrainError> {
    let mut out = Vec::with_capacity(samples.len());
    for s in samples {
        let img = dataset::decode(s, rules)?;
        let prep = dataset::center_crop(&img, resolution);
        let r = resolution as usize;
        let pixels = Tensor::from_vec(prep.pixels.clone(), (1, 3, r, r), model.device())?;
        let latent = model.encode_images(&pixels)?;
        let cond = model.encode_prompts(std::slice::from_ref(&s.caption))?;
        out.push(Cached {
            latent,
            cond,
            time_ids: prep.time_ids(),
        });
    }
    Ok(out)
}

/// Which samples step `step` trains on: each epoch is a fresh permutation that depends only
/// on (seed, epoch).
pub fn batch_indices(step: u64, n: usize, batch: usize, seed: u64) -> Vec<usize> {
    let mut perm_epoch = u64::MAX;
    let mut perm = Vec::new();
    (0..batch)
        .map(|b| {
            let k = step * batch as u64 + b as u64;
            let epoch = k / n as u64;
            if epoch != perm_epoch {
                perm = Rng::new(seed, 1 + epoch).permutation(n);
                perm_epoch = epoch;
            }
            perm[(k % n as u64) as usize]
        })
        .collect()
}

/// A training batch with its noise drawn.
#[derive(Clone, Debug)]
pub struct Batch {
    noisy: Tensor,
    target: Tensor,
    timesteps: Tensor,
    cond: TextConditioning,
    /// The family's extra conditioning (SDXL's size ids, FLUX.1's guidance value).
    extra: Option<Tensor>,
    weights: Tensor,
}

/// Draws noise levels and noise for the given samples and builds the noisy inputs and
/// targets. `guidance` is the value guidance-distilled FLUX.1 models are conditioned on.
pub fn make_batch(
    model: &DiffusionModel,
    cache: &[Cached],
    indices: &[usize],
    objective: &Objective,
    rng: &mut Rng,
    noise_offset: f64,
    guidance: f64,
) -> Result<Batch, TrainError> {
    let dev = model.device();
    let dtype = model.dtype();
    let mut noisy = Vec::new();
    let mut target = Vec::new();
    let mut ts = Vec::new();
    let mut weights = Vec::new();
    let mut hidden = Vec::new();
    let mut pooled = Vec::new();
    let mut ids = Vec::new();
    for &i in indices {
        let c = &cache[i];
        let x0 = c.latent.to_dtype(DType::F32)?;
        let dims = x0.dims().to_vec();
        let (ch, plane) = (dims[1], dims[2] * dims[3]);
        // FLUX.1's shift depends on the packed (2x2) token count.
        let draw = objective.draw(rng, plane / 4);
        let mut noise = rng.normals(ch * plane);
        if noise_offset > 0.0 {
            for c in 0..ch {
                let o = (noise_offset * rng.normal()) as f32;
                noise[c * plane..(c + 1) * plane]
                    .iter_mut()
                    .for_each(|x| *x += o);
            }
        }
        let noise = Tensor::from_vec(noise, dims.as_slice(), dev)?;
        let (xa, nb) = draw.input;
        noisy.push((x0.affine(xa, 0.0)? + noise.affine(nb, 0.0)?)?);
        let (na, xb) = draw.target;
        target.push((noise.affine(na, 0.0)? + x0.affine(xb, 0.0)?)?);
        ts.push(draw.model_time);
        weights.push(draw.weight as f32);
        hidden.push(c.cond.hidden.clone());
        if let Some(p) = &c.cond.pooled {
            pooled.push(p.clone());
        }
        ids.extend_from_slice(&c.time_ids);
    }
    let b = indices.len();
    let cond = TextConditioning {
        hidden: Tensor::cat(&hidden, 0)?,
        pooled: if pooled.is_empty() {
            None
        } else {
            Some(Tensor::cat(&pooled, 0)?)
        },
    };
    let extra = match model.family() {
        model::ModelFamily::Sdxl => Some(Tensor::from_vec(ids, (b, 6), dev)?.to_dtype(dtype)?),
        model::ModelFamily::Flux1 => Some(Tensor::full(guidance as f32, b, dev)?),
        model::ModelFamily::Sd15 => None,
    };
    Ok(Batch {
        noisy: Tensor::cat(&noisy, 0)?.to_dtype(dtype)?,
        target: Tensor::cat(&target, 0)?,
        timesteps: Tensor::from_vec(ts, b, dev)?,
        cond,
        extra,
        weights: Tensor::from_vec(weights, b, dev)?,
    })
}

/// The (weighted) mean squared error of the model on a batch, differentiable w.r.t. the
/// adapters.
pub fn batch_loss(model: &DiffusionModel, batch: &Batch) -> Result<Tensor, TrainError> {
    let pred = model
        .predict(
            &batch.noisy,
            &batch.timesteps,
            &batch.cond,
            batch.extra.as_ref(),
        )?
        // The loss in f32 whatever the model computes in.
        .to_dtype(DType::F32)?;
    let per_sample = (pred - &batch.target)?.sqr()?.flatten_from(1)?.mean(1)?;
    Ok((per_sample * &batch.weights)?.mean_all()?)
}

/// The optimiser's view of the adapters: `{path}.down` / `{path}.up`.
pub fn named_params(model: &DiffusionModel) -> Vec<(String, candle_core::Var)> {
    model::lora::named_variables(model.adapters())
}

/// The precision a run of `family` computes in on a GPU (`on_gpu`) or the CPU, whatever was
/// asked: the delivered LoRA's `ss_mixed_precision` states it, because that is what produced
/// its weights.
///
/// - `bf16` on a GPU: frozen base weights and activations in bf16 (cuBLAS accumulates in
///   f32), LoRA parameters, optimizer state and the loss in f32.
/// - `fp16`: f32. Half-precision gradients underflow without loss scaling, which this trainer
///   does not do; bf16 has f32's range and needs none.
/// - FLUX.1 on a GPU: bf16 whatever was asked. Its transformer is 47.6 GB in f32, beyond the
///   GPUs its family is placed on, and fp16 overflows in its activations.
/// - On the CPU: f32. candle's CPU backend has no bf16 matmul, and f32 is what its kernels
///   (and ours) are fast at.
pub fn effective_precision(
    requested: MixedPrecision,
    family: ModelFamily,
    on_gpu: bool,
) -> MixedPrecision {
    match requested {
        _ if on_gpu && family == ModelFamily::Flux1 => MixedPrecision::Bf16,
        MixedPrecision::Bf16 if on_gpu => MixedPrecision::Bf16,
        _ => MixedPrecision::Fp32,
    }
}

/// The dtype the frozen weights and activations are held in at `precision`.
pub fn compute_dtype(precision: MixedPrecision) -> DType {
    match precision {
        MixedPrecision::Fp32 => DType::F32,
        MixedPrecision::Fp16 => DType::F16,
        MixedPrecision::Bf16 => DType::BF16,
    }
}

/// Whether the trained network's blocks are checkpointed: as the job says, else on where
/// memory is tight and compute plentiful (SDXL and FLUX.1 on a GPU: FLUX.1's memory plan
/// counts on it), off on the CPU, where memory is plentiful and recomputation costs a third
/// more of the scarce compute.
pub fn gradient_checkpointing(requested: Option<bool>, family: ModelFamily, on_gpu: bool) -> bool {
    requested.unwrap_or(on_gpu && matches!(family, ModelFamily::Sdxl | ModelFamily::Flux1))
}

/// The metadata spelling of a precision (kohya's `ss_mixed_precision`, with `fp32` for "no").
fn precision_name(p: MixedPrecision) -> &'static str {
    match p {
        MixedPrecision::Fp32 => "fp32",
        MixedPrecision::Fp16 => "fp16",
        MixedPrecision::Bf16 => "bf16",
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn mkdir(path: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(path).map_err(|source| TrainError::PrepareWorkDir {
        path: path.display().to_string(),
        source,
    })
}

fn layers_per_block(model_dir: &Path) -> usize {
    // Only used for SGM names; SD1.5 and SDXL both have 2.
    std::fs::read_to_string(model_dir.join("unet").join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| match &v["layers_per_block"] {
            serde_json::Value::Array(a) => a.first().and_then(serde_json::Value::as_u64),
            other => other.as_u64(),
        })
        .map_or(2, |n| n as usize)
}

/// Makes the base model available locally (downloads an `s3://` folder into the work dir).
fn fetch_model(
    config: &TrainerConfig,
    storage: &Storage,
    work: &Path,
) -> Result<PathBuf, TrainError> {
    let loc = Location::parse(&config.base_model.path);
    let Location::S3 { .. } = loc else {
        return Ok(PathBuf::from(&config.base_model.path));
    };
    let dir = work.join("base-model");
    let files = storage.list(&loc)?;
    if files.is_empty() {
        return Err(StorageError::NotFound { uri: loc.uri() }.into());
    }
    for f in files {
        let dest = dir.join(&f);
        if !dest.exists() {
            storage.download(&loc.join(&f), &dest)?;
        }
    }
    Ok(dir)
}

/// Finds the newest usable checkpoint: the local ones in the work dir (a retry on the same
/// claim) and the job's checkpoint object (which an attempt in another region may have
/// carried further).
fn find_checkpoint(
    storage: &Storage,
    remote: &Location,
    local_dir: &Path,
    fingerprint: &str,
) -> Result<Option<Checkpoint>, TrainError> {
    let mut local: Vec<(u64, String)> = storage
        .list(&Location::Local(local_dir.to_path_buf()))?
        .into_iter()
        .filter_map(|n| checkpoint::step_of(&n).map(|s| (s, n)))
        .collect();
    local.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    let mut best = local
        .iter()
        .find_map(|(_, name)| usable_checkpoint(&local_dir.join(name), name, fingerprint));
    let fetched = local_dir.join("fetched.safetensors");
    match storage.download(&remote.join(CHECKPOINT_FILE), &fetched) {
        Ok(()) => {
            if let Some(ck) = usable_checkpoint(&fetched, CHECKPOINT_FILE, fingerprint)
                && best.as_ref().is_none_or(|b| ck.step > b.step)
            {
                best = Some(ck);
            }
            let _ = std::fs::remove_file(&fetched);
        }
        Err(StorageError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(best)
}

/// The checkpoint in `path` if it reads and belongs to this configuration.
fn usable_checkpoint(path: &Path, name: &str, fingerprint: &str) -> Option<Checkpoint> {
    let ck = match TensorFile::read(path)
        .map_err(TrainError::from)
        .and_then(|f| Checkpoint::from_file(f).map_err(TrainError::from))
    {
        Ok(ck) => ck,
        Err(e) => {
            tracing::warn!(checkpoint = %name, error = %e, "skipping unreadable checkpoint");
            return None;
        }
    };
    if ck.fingerprint != fingerprint {
        tracing::warn!(checkpoint = %name, "skipping checkpoint of a different configuration");
        return None;
    }
    Some(ck)
}

/// The noise process the model was trained with: flow matching for FLUX.1 (σ drawn as the
/// job asks), DDPM with the job's min-SNR-γ otherwise.
pub fn objective_of(model: &DiffusionModel, t: &TrainingConfig) -> Result<Objective, TrainError> {
    let config = model.scheduler_config();
    Ok(match model.family() {
        model::ModelFamily::Flux1 => Objective::Flow(FlowMatching::new(
            &config,
            t.timestep_sampling.unwrap_or_default(),
        )?),
        model::ModelFamily::Sd15 | model::ModelFamily::Sdxl => Objective::Ddpm {
            schedule: NoiseSchedule::new(&config)?,
            min_snr_gamma: t.min_snr_gamma,
        },
    })
}

/// The guidance value FLUX.1-dev trains with when the job names none (diffusers' and kohya's
/// scripts).
pub const DEFAULT_FLUX_GUIDANCE: f64 = 3.5;

/// Everything a finished run produced.
#[derive(Debug)]
pub struct RunReport {
    /// The summary (also written to the termination-message path by the binary).
    pub summary: TrainerSummary,
    /// Step the run resumed from, if any.
    pub resumed_from: Option<u64>,
    /// Loss of each step this process ran.
    pub losses: Vec<f64>,
}

/// Runs training to the end.
pub fn run(config: &TrainerConfig, opts: &RunOptions) -> Result<RunReport, TrainError> {
    run_tracking(config, opts, &std::cell::Cell::new(0))
}

/// [`run`], keeping `completed` at the number of steps done so far, so a caller can report
/// how far a failed run got.
pub fn run_tracking(
    config: &TrainerConfig,
    opts: &RunOptions,
    completed: &std::cell::Cell<u64>,
) -> Result<RunReport, TrainError> {
    let started_at = now_unix();
    let t = &config.training;
    let work = PathBuf::from(&config.work_dir);
    let ck_dir = work.join("checkpoints");
    let out_dir = work.join("output");
    mkdir(&ck_dir)?;
    mkdir(&out_dir)?;
    let storage = Storage::new(&config.grants)?;
    let emit = |ev: TrainerEvent| {
        if opts.emit_events {
            progress::emit(&ev);
        }
    };

    // Dataset: in memory only, verified and validated before anything else happens.
    let ds_loc = Location::parse(&config.dataset.uri);
    let zip = storage.read(&ds_loc).map_err(|e| match e {
        StorageError::NotFound { uri } => TrainError::FetchDataset { uri },
        other => other.into(),
    })?;
    let actual = hex_sha256(&zip);
    if actual != config.dataset.sha256 {
        return Err(TrainError::VerifyDataset {
            expected: config.dataset.sha256.clone(),
            actual,
        });
    }
    let samples = dataset::validate(
        &zip,
        &config.concept.trigger_word,
        config.concept.description.as_deref(),
        &config.dataset.rules,
    )?;
    drop(zip);
    tracing::info!(images = samples.len(), "dataset validated");

    let model_dir = fetch_model(config, &storage, &work)?;
    let spec = LoraSpec {
        rank: t.rank as usize,
        alpha: t.alpha,
    };
    let on_gpu = opts.device.is_cuda();
    let precision = effective_precision(t.mixed_precision, config.base_model.family, on_gpu);
    let dtype = compute_dtype(precision);
    let mut model = match config.base_model.family {
        ModelFamily::Flux1 => {
            let o = FluxOptions::new(Some(spec), t.lora_targets.as_deref());
            model::load_flux(&model_dir, &o, &opts.device, dtype)
        }
        family => model::load_with_dtype(&model_dir, family, spec, &opts.device, dtype),
    }
    .map_err(TrainError::LoadModel)?;
    let checkpointing =
        gradient_checkpointing(t.gradient_checkpointing, config.base_model.family, on_gpu);
    model.set_gradient_checkpointing(checkpointing);
    if precision != t.mixed_precision {
        tracing::warn!(
            requested = precision_name(t.mixed_precision),
            running = precision_name(precision),
            "this trainer computes in {} on this device; the LoRA's metadata says so",
            precision_name(precision)
        );
    }
    let objective = objective_of(&model, t)?;
    let guidance = t.guidance_scale.unwrap_or(DEFAULT_FLUX_GUIDANCE);
    let flux_variant = (config.base_model.family == ModelFamily::Flux1).then(|| {
        if model.guidance_distilled() {
            FluxVariant::Dev
        } else {
            FluxVariant::Schnell
        }
    });
    if flux_variant == Some(FluxVariant::Schnell) && t.guidance_scale.is_some() {
        tracing::warn!("guidanceScale is ignored: this FLUX.1 checkpoint embeds no guidance");
    }
    let cache = cache_samples(&model, &samples, t.resolution, &config.dataset.rules)?;
    tracing::info!(
        adapters = model.adapters().len(),
        "model loaded, inputs cached"
    );

    // Samples show how training goes; the LoRA is what was paid for, so a decoder that will
    // not load costs the samples, not the run.
    let mut sets = SampleSets::new(config, &model_dir, model.device(), &work).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "samples off: the VAE decoder did not load");
        None
    });
    if let Some(s) = sets.as_mut()
        && let Err(e) = s.prepare(&model)
    {
        tracing::warn!(error = %e, "samples off: the sample prompts could not be encoded");
        sets = None;
    }
    // Inputs and prompts are encoded: only the trained network stays in memory.
    model.release_encoders();

    let params = named_params(&model);
    let mut opt = AdamW::new(params, AdamWParams::default())?;
    let mut rng = Rng::new(t.seed, 0);
    let fingerprint = checkpoint::fingerprint(config);
    let remote_ck = Location::parse(&config.checkpoints);
    let mut start = 0;
    let mut resumed_from = None;
    if let Some(ck) = find_checkpoint(&storage, &remote_ck, &ck_dir, &fingerprint)? {
        let mut map = HashMap::new();
        for (k, h) in &ck.adapters {
            map.insert(k.clone(), h.to_candle(k, model.device())?);
        }
        model.load_adapters(&map)?;
        opt.restore(&ck.optimizer, ck.optimizer_step, model.device())?;
        rng = Rng::from_state(&ck.rng).ok_or(CheckpointError::ReadMetadata {
            key: "loraplane.rng",
        })?;
        start = ck.step;
        resumed_from = Some(ck.step);
        completed.set(ck.step);
        emit(TrainerEvent::Resumed { step: ck.step });
        tracing::info!(step = ck.step, "resumed from checkpoint");
    }

    let mut tracker = Tracker::new(t.steps, config.log_every, start);
    match sets.as_mut() {
        Some(s) if start > 0 => s.restore(start, &storage),
        _ => sample_set(&mut sets, &model, 0, &storage, &mut tracker, &emit),
    }
    let mut losses = Vec::new();
    let n = cache.len();
    for step in start..t.steps {
        let idx = batch_indices(step, n, t.batch_size as usize, t.seed);
        let batch = make_batch(
            &model,
            &cache,
            &idx,
            &objective,
            &mut rng,
            t.noise_offset,
            guidance,
        )?;
        let loss = batch_loss(&model, &batch)?;
        let loss_value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        if !loss_value.is_finite() {
            return Err(TrainError::Diverged { step: step + 1 });
        }
        let grads = model.backward(&loss)?;
        let lr = schedule::learning_rate(
            t.learning_rate,
            t.lr_scheduler,
            t.lr_warmup_steps,
            t.steps,
            step,
        );
        opt.step(&grads, lr)?;
        losses.push(loss_value);
        let done = step + 1;
        completed.set(done);
        if let Some(ev) = tracker.record(done, loss_value) {
            emit(ev);
        }
        // Before the checkpoint: a pod lost while rendering resumes from the checkpoint before
        // and renders this set again, instead of resuming past a set nobody rendered.
        if done < t.steps {
            sample_set(&mut sets, &model, done, &storage, &mut tracker, &emit);
        }
        if done.is_multiple_of(t.checkpoint_every) && done < t.steps {
            let uri = save_checkpoint(
                &storage,
                &model,
                &opt,
                &rng,
                &fingerprint,
                done,
                &ck_dir,
                &remote_ck,
            )?;
            emit(TrainerEvent::Checkpoint { step: done, uri });
        }
        if opts.stop_after == Some(done) {
            return Err(TrainError::Interrupted { step: done });
        }
    }

    let adapters = export_adapters(&model)?;
    let info = ExportInfo {
        family: config.base_model.family,
        layers_per_block: layers_per_block(&model_dir),
        rank: t.rank,
        alpha: t.alpha,
        resolution: t.resolution,
        steps: t.steps,
        started_at,
        finished_at: now_unix(),
        title: config.job.name.clone(),
        trigger_word: config.concept.trigger_word.clone(),
        learning_rate: t.learning_rate,
        lr_scheduler: match t.lr_scheduler {
            LrScheduler::Constant => "constant".into(),
            LrScheduler::Cosine => "cosine".into(),
        },
        lr_warmup_steps: t.lr_warmup_steps,
        seed: t.seed,
        num_images: samples.len(),
        batch_size: t.batch_size,
        mixed_precision: precision_name(precision).into(),
        gradient_checkpointing: checkpointing,
        noise_offset: t.noise_offset,
        min_snr_gamma: t.min_snr_gamma,
        prediction_type: match &objective {
            Objective::Ddpm { schedule, .. } => match schedule.prediction {
                PredictionType::Epsilon => "epsilon".into(),
                PredictionType::VPrediction => "v".into(),
            },
            Objective::Flow(_) => "flow".into(),
        },
        flux_variant,
        guidance_scale: (flux_variant == Some(FluxVariant::Dev)).then_some(guidance),
        licence: config.base_model.licence.clone(),
        timestep_sampling: flux_variant.map(|_| {
            // kohya's `--timestep_sampling` names for the same draws.
            match t.timestep_sampling.unwrap_or_default() {
                TimestepSampling::Uniform => "uniform",
                TimestepSampling::LogitNormal => "sigmoid",
                TimestepSampling::FluxShift => "flux_shift",
            }
            .to_string()
        }),
    };
    let out_loc = Location::parse(&config.output);
    let mut artifacts = Vec::new();
    let [(kohya_format, kohya_name), (peft_format, peft_name)] =
        loraplane_crds::layout::output_files(&config.job.name);
    for (format, name, file) in [
        (kohya_format, kohya_name, export::kohya(&adapters, &info)?),
        (peft_format, peft_name, export::peft(&adapters, &info)?),
    ] {
        let path = out_dir.join(&name);
        file.write(&path)?;
        let bytes = std::fs::read(&path).map_err(|source| TrainError::PrepareWorkDir {
            path: path.display().to_string(),
            source,
        })?;
        let dest = out_loc.join(&name);
        storage.upload(&path, &dest)?;
        artifacts.push(ArtifactInfo {
            format: format.into(),
            uri: dest.uri(),
            sha256: hex_sha256(&bytes),
            bytes: bytes.len() as u64,
        });
    }
    // The final set once the LoRA is safe: samples show it, they are not what was paid for.
    sample_set(&mut sets, &model, t.steps, &storage, &mut tracker, &emit);
    Ok(RunReport {
        summary: TrainerSummary {
            outcome: Outcome::Succeeded,
            step: t.steps,
            artifacts,
            error: None,
        },
        resumed_from,
        losses,
    })
}

/// Renders the sample set due after `step` (0: before training), if one is. A set that fails
/// is logged and skipped: samples show how training goes, the LoRA is what was paid for.
fn sample_set(
    sets: &mut Option<SampleSets>,
    model: &DiffusionModel,
    step: u64,
    storage: &Storage,
    tracker: &mut Tracker,
    emit: &impl Fn(TrainerEvent),
) {
    let Some(s) = sets.as_mut().filter(|s| s.due(step)) else {
        return;
    };
    match s.render(model, step, storage) {
        Ok((images, seconds)) => {
            tracker.exclude(seconds, s.left_after(step) as f64 * seconds);
            emit(TrainerEvent::Samples {
                step,
                images,
                seconds,
            });
        }
        Err(e) => tracing::warn!(step, error = %e, "sample set failed; training goes on"),
    }
}

/// The adapters on the host, for export.
pub fn export_adapters(model: &DiffusionModel) -> Result<Vec<ExportAdapter>, TrainError> {
    model
        .adapters()
        .into_iter()
        .map(|(path, a)| {
            Ok(ExportAdapter {
                down: HostTensor::from_candle(&path, a.down.as_tensor())?,
                up: HostTensor::from_candle(&path, a.up.as_tensor())?,
                alpha: a.alpha,
                conv1x1: a.conv1x1,
                path,
            })
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    storage: &Storage,
    model: &DiffusionModel,
    opt: &AdamW,
    rng: &Rng,
    fingerprint: &str,
    step: u64,
    dir: &Path,
    remote: &Location,
) -> Result<String, TrainError> {
    let mut adapters = std::collections::BTreeMap::new();
    for (name, t) in model.adapter_tensors() {
        adapters.insert(name.clone(), HostTensor::from_candle(&name, &t)?);
    }
    let (optimizer, optimizer_step) = opt.state()?;
    let ck = Checkpoint {
        step,
        optimizer_step,
        rng: rng.to_state(),
        fingerprint: fingerprint.to_string(),
        adapters,
        optimizer,
    };
    let name = checkpoint::file_name(step);
    let path = dir.join(&name);
    ck.to_file().write(&path)?;
    // The job's one checkpoint object is replaced whole (an S3 PUT is atomic).
    let dest = remote.join(CHECKPOINT_FILE);
    storage.upload(&path, &dest)?;
    // Keep the two newest local checkpoints: enough to survive a torn write of the newest.
    let mut old: Vec<u64> = storage
        .list(&Location::Local(dir.to_path_buf()))?
        .iter()
        .filter_map(|n| checkpoint::step_of(n))
        .filter(|s| *s < step)
        .collect();
    old.sort_unstable();
    old.pop();
    for s in old {
        let _ = std::fs::remove_file(dir.join(checkpoint::file_name(s)));
    }
    Ok(dest.uri())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpointing_follows_the_job_else_sdxl_and_flux1_on_a_gpu_only() {
        use ModelFamily::{Flux1, Sd15, Sdxl};
        for family in [Sd15, Sdxl, Flux1] {
            assert!(!gradient_checkpointing(None, family, false), "{family:?}");
            assert!(gradient_checkpointing(Some(true), family, false));
            assert!(!gradient_checkpointing(Some(false), family, true));
        }
        assert!(gradient_checkpointing(None, Sdxl, true));
        assert!(gradient_checkpointing(None, Flux1, true));
        assert!(!gradient_checkpointing(None, Sd15, true));
    }

    #[test]
    fn precision_is_f32_on_the_cpu_bf16_when_asked_on_a_gpu_and_always_for_flux1_there() {
        use MixedPrecision::{Bf16, Fp16, Fp32};
        use ModelFamily::{Flux1, Sd15, Sdxl};
        for family in [Sd15, Sdxl, Flux1] {
            for asked in [Fp32, Fp16, Bf16] {
                assert_eq!(effective_precision(asked, family, false), Fp32);
            }
        }
        for family in [Sd15, Sdxl] {
            assert_eq!(effective_precision(Bf16, family, true), Bf16);
            assert_eq!(effective_precision(Fp16, family, true), Fp32);
            assert_eq!(effective_precision(Fp32, family, true), Fp32);
        }
        for asked in [Fp32, Fp16, Bf16] {
            assert_eq!(effective_precision(asked, Flux1, true), Bf16);
        }
    }

    #[test]
    fn batches_cover_each_epoch_once_and_are_stable() {
        let n = 7;
        let mut seen: Vec<usize> = (0..7).flat_map(|s| batch_indices(s, n, 2, 9)).collect();
        assert_eq!(seen.len(), 14);
        let first: Vec<usize> = seen.drain(..7).collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        assert_eq!(batch_indices(3, n, 2, 9), batch_indices(3, n, 2, 9));
        assert_ne!(
            (0..7)
                .flat_map(|s| batch_indices(s, n, 1, 9))
                .collect::<Vec<_>>(),
            (0..7)
                .flat_map(|s| batch_indices(s, n, 1, 10))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_input_errors_are_told_apart_from_crashes() {
        assert!(
            TrainError::VerifyDataset {
                expected: "a".into(),
                actual: "b".into()
            }
            .is_bad_input()
        );
        assert!(
            TrainError::ValidateDataset(DatasetError::ImageCount {
                count: 1,
                min: 5,
                max: 200
            })
            .is_bad_input()
        );
        assert!(!TrainError::Compute("oom".into()).is_bad_input());
        assert!(!TrainError::Interrupted { step: 3 }.is_bad_input());
    }
}
