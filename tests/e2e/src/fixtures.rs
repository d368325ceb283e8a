//! What the customer and the platform bring, generated on the spot (no downloads): tiny random
//! SD1.5 and SDXL base models in the diffusers layout (the trainer's own generator), the tiny
//! FLUX.1-dev pipeline diffusers made for the trainer's tests (committed), a small image dataset
//! zip with captions, and the checks a customer runs on the LoRA they receive.

use std::io::{Cursor, Write};
use std::path::Path;

use loraplane_crds::v1alpha1::ModelFamily;
use sha2::{Digest, Sha256};

/// A word that appears only in the dataset's captions: it must never show up in logs,
/// labels, annotations or env.
pub const CAPTION_WORD: &str = "qwcaptionsecret";

/// Why a fixture could not be made or a LoRA does not check out.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// Writing a tiny model failed.
    #[error("write the tiny {family} model to {dir}: {message}")]
    WriteModel {
        /// Family.
        family: &'static str,
        /// Directory.
        dir: String,
        /// Why.
        message: String,
    },
    /// Encoding an image or the zip failed.
    #[error("build the dataset zip: {0}")]
    BuildDataset(String),
    /// The downloaded LoRA is not what was promised.
    #[error("the LoRA file does not check out: {0}")]
    CheckLora(String),
}

/// Writes tiny SDXL, SD1.5 and FLUX.1 models to `models_dir/sdxl`, `/sd15` and `/flux1`.
pub fn write_models(models_dir: &Path) -> Result<(), FixtureError> {
    let flux =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../trainer-image/tests/fixtures/flux");
    copy_dir(&flux, &models_dir.join("flux1")).map_err(|e| FixtureError::WriteModel {
        family: "flux1",
        dir: models_dir.join("flux1").display().to_string(),
        message: e.to_string(),
    })?;
    for family in [ModelFamily::Sdxl, ModelFamily::Sd15] {
        let dir = models_dir.join(family.as_str());
        loraplane_trainer::model::tiny::write_tiny_model(&dir, family, 20_261_122).map_err(
            |e| FixtureError::WriteModel {
                family: family.as_str(),
                dir: dir.display().to_string(),
                message: e.to_string(),
            },
        )?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

fn png(w: u32, h: u32, seed: u32) -> Result<Vec<u8>, FixtureError> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = x
            .wrapping_mul(29 + seed)
            .wrapping_add(y.wrapping_mul(13 + 5 * seed));
        image::Rgb([
            (v % 251) as u8,
            ((v / 5 + seed * 37) % 256) as u8,
            ((x * 3 + y * 2) % 256) as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| FixtureError::BuildDataset(e.to_string()))?;
    Ok(out.into_inner())
}

/// A dataset zip of `n` small PNGs (mixed aspect ratios), each with a caption file.
pub fn dataset_zip(n: u32) -> Result<Vec<u8>, FixtureError> {
    let err = |e: &dyn std::fmt::Display| FixtureError::BuildDataset(e.to_string());
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for i in 0..n {
        let (wd, ht) = if i % 2 == 0 { (72, 64) } else { (64, 80) };
        w.start_file(format!("cat_{i:02}.png"), opts)
            .map_err(|e| err(&e))?;
        w.write_all(&png(wd, ht, i)?).map_err(|e| err(&e))?;
        w.start_file(format!("cat_{i:02}.txt"), opts)
            .map_err(|e| err(&e))?;
        w.write_all(format!("a photo of a grey cat, {CAPTION_WORD}").as_bytes())
            .map_err(|e| err(&e))?;
    }
    Ok(w.finish().map_err(|e| err(&e))?.into_inner())
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What a customer can tell about a LoRA file they downloaded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFacts {
    /// Number of tensors.
    pub tensors: usize,
    /// `ss_base_model_version` from the metadata (kohya files).
    pub base_model_version: Option<String>,
    /// `ss_max_train_steps` from the metadata.
    pub steps: Option<String>,
    /// The tensor names.
    pub names: Vec<String>,
}

/// Checks a downloaded LoRA: its SHA-256 is the one the API announced and it parses as
/// safetensors with at least one LoRA tensor.
pub fn check_lora(bytes: &[u8], expected_sha256: &str) -> Result<LoraFacts, FixtureError> {
    let got = sha256_hex(bytes);
    if got != expected_sha256 {
        return Err(FixtureError::CheckLora(format!(
            "sha256 {got} differs from the announced {expected_sha256}"
        )));
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| FixtureError::CheckLora(format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| FixtureError::CheckLora(format!("not a safetensors file: {e}")))?;
    let names = st.names();
    if !names.iter().any(|n| n.contains("lora")) {
        return Err(FixtureError::CheckLora(
            "no LoRA tensors in the file".into(),
        ));
    }
    let md = meta.metadata().clone().unwrap_or_default();
    Ok(LoraFacts {
        names: names.iter().map(|n| n.to_string()).collect(),
        tensors: names.len(),
        base_model_version: md.get("ss_base_model_version").cloned(),
        steps: md.get("ss_max_train_steps").cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dataset_passes_the_platforms_default_rules() {
        let zip = dataset_zip(6).unwrap();
        let rules = loraplane_dataset::DatasetRules::default();
        let size = zip.len() as u64;
        loraplane_dataset::check(std::io::Cursor::new(zip), size, &rules).unwrap();
    }

    #[test]
    fn check_lora_refuses_a_wrong_checksum_and_garbage() {
        let err = check_lora(b"not a lora", &sha256_hex(b"not a lora")).unwrap_err();
        assert!(err.to_string().contains("not a safetensors file"), "{err}");
        let err = check_lora(b"x", &"0".repeat(64)).unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
    }
}
