//! Weight lookup for model construction: a `VarBuilder` that remembers which component it
//! loads, so a missing or misshapen tensor fails with an error naming the full tensor path.
//!
//! Safetensors are read into memory (`std::fs::read`): mmap needs `unsafe`, which the
//! workspace forbids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use super::ModelError;

#[derive(Clone)]
pub(crate) struct Weights<'a> {
    vb: VarBuilder<'a>,
    component: String,
}

impl<'a> Weights<'a> {
    pub(crate) fn new(vb: VarBuilder<'a>, component: &str) -> Self {
        Self {
            vb,
            component: component.to_string(),
        }
    }

    /// Loads `diffusion_pytorch_model.safetensors` / `model.safetensors` (or their fp16
    /// variant, or the shards of an index) from a component folder.
    pub(crate) fn from_dir(
        dir: &Path,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Weights<'static>, ModelError> {
        let files = weight_files(dir)?;
        let mut tensors = HashMap::new();
        for file in files {
            let loaded = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|source| {
                ModelError::ReadWeights {
                    path: file.clone(),
                    source: Box::new(super::one_line(source)),
                }
            })?;
            tensors.extend(loaded);
        }
        Ok(Weights::new(
            VarBuilder::from_tensors(tensors, dtype, device),
            component,
        ))
    }

    pub(crate) fn pp(&self, s: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(s),
            component: self.component.clone(),
        }
    }

    pub(crate) fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor, ModelError> {
        self.vb
            .get(shape, name)
            .map_err(|source| ModelError::LoadTensor {
                component: self.component.clone(),
                tensor: self.path(name),
                source: Box::new(super::one_line(source)),
            })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub(crate) fn path(&self, name: &str) -> String {
        let prefix = self.vb.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }

    /// The full prefix, i.e. the diffusers module path of the layer this builder points at.
    pub(crate) fn path_prefix(&self) -> String {
        self.vb.prefix()
    }

    pub(crate) fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub(crate) fn device(&self) -> &Device {
        self.vb.device()
    }
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    for stem in ["diffusion_pytorch_model", "model"] {
        for variant in ["safetensors", "fp16.safetensors"] {
            let single = dir.join(format!("{stem}.{variant}"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{stem}.{variant}.index.json"));
            if index.is_file() {
                let idx: ShardIndex = super::read_config(&index)?;
                let mut files: Vec<PathBuf> =
                    idx.weight_map.values().map(|f| dir.join(f)).collect();
                files.sort();
                files.dedup();
                return Ok(files);
            }
        }
    }
    Err(ModelError::ReadFile {
        path: dir.join("diffusion_pytorch_model.safetensors"),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no *.safetensors weights in this folder (pickled .bin checkpoints are not supported)",
        ),
    })
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}
