//! Shared fixtures for the pipeline tests: a tiny generated dataset zip, a tiny random model
//! in the diffusers layout and a config pointing at them.

#![allow(dead_code)]

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use loraplane_crds::trainer::TrainerConfig;
use loraplane_crds::v1alpha1::ModelFamily;
use loraplane_trainer::model::tiny::write_tiny_model;
use sha2::{Digest, Sha256};

/// The trigger word; tests check it never reaches stdout/stderr.
pub const TRIGGER: &str = "zqxtrigger";
/// A caption word that must never be printed either.
pub const CAPTION_WORD: &str = "sekritcaption";

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn png(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = x
            .wrapping_mul(31 + seed)
            .wrapping_add(y.wrapping_mul(17 + 3 * seed));
        image::Rgb([
            (v % 251) as u8,
            ((v / 3 + seed * 40) % 256) as u8,
            ((x + y) * 4 % 256) as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// `n` images of mixed aspect ratios, half with captions.
pub fn dataset_entries(n: u32) -> Vec<(String, Vec<u8>)> {
    let mut e = Vec::new();
    for i in 0..n {
        let (w, h) = if i % 2 == 0 { (48, 40) } else { (40, 56) };
        e.push((format!("img{i}.png"), png(w, h, i)));
        if i % 2 == 0 {
            e.push((
                format!("img{i}.txt"),
                format!("a photo with {CAPTION_WORD}").into_bytes(),
            ));
        }
    }
    e
}

/// Writes a zip and returns (path, sha256).
pub fn write_zip(dir: &Path, entries: &[(String, Vec<u8>)]) -> (PathBuf, String) {
    let bytes = zip_of(entries);
    let path = dir.join("dataset.zip");
    std::fs::write(&path, &bytes).unwrap();
    (path, sha256_hex(&bytes))
}

/// A tiny model of `family` under `dir/model-<family>`.
pub fn tiny_model(dir: &Path, family: ModelFamily) -> PathBuf {
    let p = dir.join(format!("model-{}", family.as_str()));
    if family == ModelFamily::Flux1 {
        // The tiny FLUX.1-dev pipeline diffusers itself made (bench/make_flux_fixtures.py).
        copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux"),
            &p,
        );
    } else {
        write_tiny_model(&p, family, 1234).unwrap();
    }
    p
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

pub struct Setup {
    pub model: PathBuf,
    pub zip: PathBuf,
    pub sha: String,
    pub family: ModelFamily,
}

/// A tiny model of `family` and a dataset of `images` images, written into `dir`.
pub fn setup(dir: &Path, family: ModelFamily, images: u32) -> Setup {
    let model = tiny_model(dir, family);
    let (zip, sha) = write_zip(dir, &dataset_entries(images));
    Setup {
        model,
        zip,
        sha,
        family,
    }
}

/// A config for a run in `run_dir` (work dir, checkpoints and output all inside it).
pub fn config(s: &Setup, run_dir: &Path, steps: u64, checkpoint_every: u64) -> TrainerConfig {
    let mut v = serde_json::json!({
        "job": {"namespace": "ns", "name": "job-1", "uid": "u-1"},
        "baseModel": {"family": s.family.as_str(), "path": s.model},
        "dataset": {"uri": s.zip, "sha256": s.sha},
        "concept": {"type": "character", "triggerWord": TRIGGER, "description": format!("{CAPTION_WORD} description")},
        "training": {
            "steps": steps, "rank": 4, "alpha": 2.0, "learningRate": 0.001,
            "lrScheduler": "cosine", "lrWarmupSteps": 1, "batchSize": 2, "resolution": 64,
            "seed": 11, "checkpointEvery": checkpoint_every, "mixedPrecision": "fp32",
            "noiseOffset": 0.05, "minSnrGamma": 5.0
        },
        "checkpoints": run_dir.join("remote-ckpt"),
        "output": run_dir.join("out"),
        "workDir": run_dir.join("work"),
        "terminationMessagePath": run_dir.join("termination-log"),
        "logEvery": 1
    });
    if s.family == ModelFamily::Flux1 {
        // Flow matching has its own knobs: σ drawn with the resolution shift, dev's guidance.
        let t = &mut v["training"];
        t.as_object_mut().unwrap().remove("minSnrGamma");
        t["timestepSampling"] = "fluxShift".into();
        t["guidanceScale"] = 3.5.into();
    }
    loraplane_trainer::config::parse(&v.to_string()).unwrap()
}
