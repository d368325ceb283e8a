//! Training checkpoints: one safetensors file per checkpoint holding the adapters, the
//! optimiser moments and, in its metadata, the step, the RNG state and a fingerprint of
//! everything that shapes the run. A restarted trainer (possibly in another region) resumes
//! from the newest checkpoint whose fingerprint matches, and continues exactly as the
//! interrupted run would have. The work dir keeps the two newest as `checkpoint-<step>`
//! (a torn local write leaves the older one); the job's bucket keeps one object,
//! `layout::CHECKPOINT_FILE`, replaced at each checkpoint.

use std::collections::BTreeMap;

use loraplane_crds::trainer::TrainerConfig;
use sha2::{Digest, Sha256};

use crate::tensors::{HostTensor, TensorFile};

/// Why a checkpoint file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A metadata field is missing or malformed.
    #[error("checkpoint metadata {key} is missing or malformed")]
    ReadMetadata {
        /// The key.
        key: &'static str,
    },
}

const STEP: &str = "loraplane.step";
const RNG: &str = "loraplane.rng";
const FINGERPRINT: &str = "loraplane.fingerprint";
const OPTIM_STEP: &str = "loraplane.optimizer_step";

/// A training state.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Steps completed.
    pub step: u64,
    /// Optimiser steps taken (equal to `step` today; kept apart so they may differ).
    pub optimizer_step: u64,
    /// Saved RNG state.
    pub rng: String,
    /// Fingerprint of the run configuration.
    pub fingerprint: String,
    /// Adapter tensors as `{module path}.down` / `.up`.
    pub adapters: BTreeMap<String, HostTensor>,
    /// Optimiser moments as `m.<param>` / `v.<param>`.
    pub optimizer: BTreeMap<String, HostTensor>,
}

/// Local file name of the checkpoint at `step` (zero-padded so names sort by step).
pub fn file_name(step: u64) -> String {
    format!("checkpoint-{step:010}.safetensors")
}

/// The step of a checkpoint file name, `None` for other files.
pub fn step_of(name: &str) -> Option<u64> {
    let base = name.rsplit('/').next()?;
    base.strip_prefix("checkpoint-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// Hash of everything that must be equal for a checkpoint to be resumable: hyperparameters,
/// base model, dataset checksum and concept (hashed, so nothing sensitive is stored).
pub fn fingerprint(c: &TrainerConfig) -> String {
    let parts = serde_json::json!({
        "training": c.training,
        "baseModel": c.base_model,
        "dataset": c.dataset.sha256,
        "concept": c.concept,
    });
    let digest = Sha256::digest(parts.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Checkpoint {
    /// As a tensor file.
    pub fn to_file(&self) -> TensorFile {
        let mut f = TensorFile::default();
        for (k, t) in &self.adapters {
            f.tensors.insert(format!("adapter.{k}"), t.clone());
        }
        for (k, t) in &self.optimizer {
            f.tensors.insert(format!("optimizer.{k}"), t.clone());
        }
        f.metadata.insert(STEP.into(), self.step.to_string());
        f.metadata
            .insert(OPTIM_STEP.into(), self.optimizer_step.to_string());
        f.metadata.insert(RNG.into(), self.rng.clone());
        f.metadata
            .insert(FINGERPRINT.into(), self.fingerprint.clone());
        f
    }

    /// From a tensor file written by [`Checkpoint::to_file`].
    pub fn from_file(f: TensorFile) -> Result<Checkpoint, CheckpointError> {
        let get = |key: &'static str| {
            f.metadata
                .get(key)
                .cloned()
                .ok_or(CheckpointError::ReadMetadata { key })
        };
        let num = |key: &'static str| {
            get(key)?
                .parse::<u64>()
                .map_err(|_| CheckpointError::ReadMetadata { key })
        };
        let step = num(STEP)?;
        let optimizer_step = num(OPTIM_STEP)?;
        let rng = get(RNG)?;
        let fingerprint = get(FINGERPRINT)?;
        let mut adapters = BTreeMap::new();
        let mut optimizer = BTreeMap::new();
        for (k, t) in f.tensors {
            if let Some(name) = k.strip_prefix("adapter.") {
                adapters.insert(name.to_string(), t);
            } else if let Some(name) = k.strip_prefix("optimizer.") {
                optimizer.insert(name.to_string(), t);
            }
        }
        Ok(Checkpoint {
            step,
            optimizer_step,
            rng,
            fingerprint,
            adapters,
            optimizer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_sort_by_step() {
        assert_eq!(step_of(&file_name(42)), Some(42));
        assert_eq!(step_of("x/checkpoint-0000000007.safetensors"), Some(7));
        assert_eq!(step_of("checkpoint-7.partial"), None);
        assert_eq!(step_of(loraplane_crds::layout::CHECKPOINT_FILE), None);
        assert!(file_name(5) < file_name(100));
    }

    #[test]
    fn checkpoint_round_trips_through_bytes() {
        let t = HostTensor {
            shape: vec![1, 2],
            data: vec![0.5, -0.25],
        };
        let c = Checkpoint {
            step: 30,
            optimizer_step: 30,
            rng: "ab".repeat(32),
            fingerprint: "f".repeat(64),
            adapters: [("a.down".to_string(), t.clone())].into(),
            optimizer: [("m.a.down".to_string(), t)].into(),
        };
        let bytes = c.to_file().to_bytes("c").unwrap();
        let back = Checkpoint::from_file(TensorFile::from_bytes("c", &bytes).unwrap()).unwrap();
        assert_eq!(back, c);
        let mut f = c.to_file();
        f.metadata.remove(RNG);
        assert!(Checkpoint::from_file(f).is_err());
    }

    #[test]
    fn fingerprint_changes_with_hyperparameters_only() {
        let mut c = crate::config::parse(crate::config::tests::SAMPLE).unwrap();
        let a = fingerprint(&c);
        c.output = "/elsewhere".into();
        assert_eq!(fingerprint(&c), a);
        c.training.rank = 8;
        assert_ne!(fingerprint(&c), a);
    }
}
