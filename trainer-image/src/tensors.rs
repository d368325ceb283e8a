//! safetensors files with metadata, for checkpoints and the exported LoRA files. candle's own
//! writer drops the `__metadata__` header that kohya/ComfyUI/A1111 read (`ss_*`,
//! `modelspec.*`), so files are written with the `safetensors` crate directly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};

/// Why a tensor file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    /// Building the file contents failed.
    #[error("serialising {name}: {message}")]
    Serialize {
        /// File name.
        name: String,
        /// Why.
        message: String,
    },
    /// Reading or parsing failed.
    #[error("reading {name}: {message}")]
    Read {
        /// File name.
        name: String,
        /// Why.
        message: String,
    },
    /// Writing the file failed.
    #[error("writing {name}: {source}")]
    Write {
        /// File name.
        name: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Converting to or from a candle tensor failed.
    #[error("converting tensor {name}: {source}")]
    Convert {
        /// Tensor name.
        name: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// A named f32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Copies a candle tensor to the host as f32.
    pub fn from_candle(name: &str, t: &Tensor) -> Result<HostTensor, TensorFileError> {
        let conv = |source| TensorFileError::Convert {
            name: name.to_string(),
            source,
        };
        let data = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(conv)?;
        Ok(HostTensor {
            shape: t.dims().to_vec(),
            data,
        })
    }

    /// A candle tensor with these values on `device`.
    pub fn to_candle(&self, name: &str, device: &Device) -> Result<Tensor, TensorFileError> {
        Tensor::from_vec(self.data.clone(), self.shape.as_slice(), device).map_err(|source| {
            TensorFileError::Convert {
                name: name.to_string(),
                source,
            }
        })
    }
}

/// Tensors by name (sorted, so files are byte-for-byte reproducible) plus string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorFile {
    /// The tensors.
    pub tensors: BTreeMap<String, HostTensor>,
    /// The `__metadata__` header.
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// The file's bytes.
    pub fn to_bytes(&self, name: &str) -> Result<Vec<u8>, TensorFileError> {
        let err = |message: String| TensorFileError::Serialize {
            name: name.to_string(),
            message,
        };
        let raw: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
                let bytes = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
                (k.clone(), t.shape.clone(), bytes)
            })
            .collect();
        let mut views = Vec::with_capacity(raw.len());
        for (k, shape, bytes) in &raw {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map_err(|e| err(format!("{k}: {e}")))?;
            views.push((k.clone(), view));
        }
        let meta: HashMap<String, String> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        safetensors::tensor::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))
    }

    /// Parses a file's bytes (f32, f16 and bf16 tensors are read as f32).
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<TensorFile, TensorFileError> {
        let err = |message: String| TensorFileError::Read {
            name: name.to_string(),
            message,
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| err(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (k, view) in st.tensors() {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                    .collect(),
                Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => return Err(err(format!("{k}: unsupported dtype {other:?}"))),
            };
            tensors.insert(
                k,
                HostTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        let metadata = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(TensorFile { tensors, metadata })
    }

    /// Writes the file atomically (temporary name, then rename), so a crash never leaves a
    /// half-written checkpoint that a restart would pick up.
    pub fn write(&self, path: &Path) -> Result<(), TensorFileError> {
        let name = path.display().to_string();
        let bytes = self.to_bytes(&name)?;
        let tmp = path.with_extension("partial");
        let werr = |source| TensorFileError::Write {
            name: name.clone(),
            source,
        };
        std::fs::write(&tmp, bytes).map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(werr)
    }

    /// Reads a file.
    pub fn read(path: &Path) -> Result<TensorFile, TensorFileError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| TensorFileError::Read {
            name: name.clone(),
            message: e.to_string(),
        })?;
        TensorFile::from_bytes(&name, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_and_metadata_round_trip() {
        let mut f = TensorFile::default();
        f.tensors.insert(
            "a.weight".into(),
            HostTensor {
                shape: vec![2, 3],
                data: vec![1.0, -2.0, 3.5, 0.0, 1e-7, 9.0],
            },
        );
        f.tensors.insert(
            "b".into(),
            HostTensor {
                shape: vec![],
                data: vec![4.0],
            },
        );
        f.metadata.insert("ss_network_dim".into(), "4".into());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        f.write(&p).unwrap();
        assert!(!dir.path().join("x.partial").exists());
        let g = TensorFile::read(&p).unwrap();
        assert_eq!(f, g);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes, f.to_bytes("x").unwrap(), "files are reproducible");
        assert!(TensorFile::from_bytes("junk", b"not a file").is_err());
    }

    #[test]
    fn candle_conversion_round_trips() {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let h = HostTensor::from_candle("t", &t).unwrap();
        assert_eq!(h.shape, vec![2, 3]);
        let back = h.to_candle("t", &Device::Cpu).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }
}
