//! The trainer renders what diffusers renders. `bench/make_preview_fixtures.py` ran diffusers
//! itself on the tiny SD1.5 and SDXL models these tests build (same writer, same seed) and
//! stored its outputs in `fixtures/previews.safetensors`; here the trainer's VAE decoder, and
//! its whole render (text encoders, classifier-free guidance, Euler and DDIM, UNet, decoder)
//! from the same `latents=`, must match them. f32 on the CPU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod model_support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use loraplane_trainer::model::{self, LoraSpec, ModelFamily, tiny};
use loraplane_trainer::preview::{RenderOptions, render_image};
use loraplane_trainer::sampler::Sampler;
use model_support::{max_abs_diff, wave};

// As in bench/make_preview_fixtures.py.
const SEED: u64 = 9;
const PROMPT: &str = "a photo of zxq dog";
const LATENT: [usize; 4] = [1, 4, 8, 8];

/// The fixture script's inputs: `scale·sin(a·i + b)` in the latents' shape.
fn latents(a: f64, b: f64, scale: f64) -> Tensor {
    wave(&LATENT, a, b, scale)
}

fn fixtures() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/previews.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn matches_diffusers(family: ModelFamily) {
    let name = family.as_str();
    let want = fixtures();
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_model(dir.path(), family, SEED).unwrap();
    let lora = LoraSpec {
        rank: 2,
        alpha: 2.0,
    };
    let m = model::load(dir.path(), family, lora, &Device::Cpu).unwrap();
    let decoder = model::load_vae_decoder(dir.path(), &Device::Cpu).unwrap();

    let decoded = decoder.decode(&latents(0.37, 0.5, 1.2)).unwrap();
    let diff = max_abs_diff(&decoded, &want[&format!("{name}.vae_decode")]);
    println!("{name} VAE decoder: max abs difference {diff}");
    assert!(
        diff < 1e-4,
        "{name}: the decoder differs from diffusers' by {diff}"
    );

    for (sampler, key) in [(Sampler::Euler, "euler"), (Sampler::Ddim, "ddim")] {
        let opts = RenderOptions {
            sampler: Some(sampler),
            steps: 3,
            guidance: 5.0,
            seed: 0,
            resolution: 64,
        };
        let image = render_image(&m, &decoder, PROMPT, &latents(0.61, 0.3, 1.1), &opts).unwrap();
        // diffusers' `output_type="pt"`: (x / 2 + 0.5) clamped to [0, 1].
        let image = ((image + 1.0).unwrap() * 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let reference = want[&format!("{name}.{key}")].to_dtype(DType::F32).unwrap();
        let diff = max_abs_diff(&image, &reference);
        println!("{name} {key}: max abs pixel difference {diff}");
        assert!(
            diff < 1e-3,
            "{name} {key}: the image differs from diffusers' by {diff}"
        );
    }
}

#[test]
fn sd15_renders_as_diffusers_does() {
    matches_diffusers(ModelFamily::Sd15);
}

#[test]
fn sdxl_renders_as_diffusers_does() {
    matches_diffusers(ModelFamily::Sdxl);
}
