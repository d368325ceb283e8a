//! A preview renders through the real model, sampler and decoder: a PNG of the asked size,
//! the same for the same seed and prompt, different for another seed or prompt (tiny SD1.5
//! and SDXL on the CPU). Whether the pixels match diffusers' pipeline is a separate check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::Device;
use loraplane_trainer::model::{self, LoraSpec, ModelFamily, tiny};
use loraplane_trainer::preview::{RenderError, RenderOptions, render, render_image};

fn renders_deterministic_pngs(family: ModelFamily) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_model(dir.path(), family, 9).unwrap();
    let lora = LoraSpec {
        rank: 2,
        alpha: 2.0,
    };
    let m = model::load(dir.path(), family, lora, &Device::Cpu).unwrap();
    let decoder = model::load_vae_decoder(dir.path(), &Device::Cpu).unwrap();
    let opts = RenderOptions {
        sampler: None,
        steps: 3,
        guidance: 5.0,
        seed: 1,
        resolution: 64,
    };
    let png = |prompt: &str, seed: u64| {
        render(&m, &decoder, prompt, &RenderOptions { seed, ..opts }).unwrap()
    };
    let first = png("a photo of zxq dog", 1);
    let img = image::load_from_memory_with_format(&first, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (64, 64), "{family:?}");
    let (lo, hi) = img
        .pixels()
        .flat_map(|p| p.0)
        .fold((255u8, 0u8), |(lo, hi), v| (lo.min(v), hi.max(v)));
    assert!(hi > lo, "{family:?}: a flat image");
    assert_eq!(
        first,
        png("a photo of zxq dog", 1),
        "{family:?}: same seed, other image"
    );
    assert_ne!(
        first,
        png("a photo of zxq dog", 2),
        "{family:?}: the seed changed nothing"
    );
    assert_ne!(
        first,
        png("a red car", 1),
        "{family:?}: the prompt changed nothing"
    );

    let err = render(
        &m,
        &decoder,
        "x",
        &RenderOptions {
            resolution: 60,
            ..opts
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, RenderError::CheckResolution { factor: 8, .. }),
        "{err}"
    );
    let small =
        candle_core::Tensor::zeros((1, 4, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = render_image(&m, &decoder, "x", &small, &opts).unwrap_err();
    assert!(matches!(err, RenderError::CheckNoise { .. }), "{err}");
}

#[test]
fn sd15_renders_deterministic_pngs() {
    renders_deterministic_pngs(ModelFamily::Sd15);
}

#[test]
fn sdxl_renders_deterministic_pngs() {
    renders_deterministic_pngs(ModelFamily::Sdxl);
}
