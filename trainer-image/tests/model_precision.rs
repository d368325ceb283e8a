//! A model whose frozen weights are stored in half precision computes the same loss and the
//! same adapter gradients as in f32, within half precision's error (tiny SD1.5 and SDXL on the
//! CPU): the reduced-precision path mixed precision takes on GPUs is the same model, not a
//! different one.
//!
//! f16 stands in for bf16 here: candle's CPU backend has no bf16 matmul ("unsupported dtype
//! BF16 for op matmul"), so a bf16 model cannot run on the CPU at all. f16 goes through the
//! same code (half-precision weights, f32 adapters and loss).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod model_support;

use candle_core::{DType, Device, Tensor};
use loraplane_trainer::model::{self, DiffusionModel, LoraSpec, ModelFamily, tiny};
use model_support::wave;

/// The loss of one fixed batch and the gradient of every adapter's `up`, flattened.
fn loss_and_grads(m: &DiffusionModel) -> (f32, Vec<Vec<f32>>) {
    let dev = Device::Cpu;
    let captions = vec!["a photo of sks dog".to_string(), "red car".to_string()];
    let cond = m.encode_prompts(&captions).unwrap();
    let noisy = wave(&[2, 4, 16, 16], 0.731, 0.3, 1.0)
        .to_dtype(m.dtype())
        .unwrap();
    let target = wave(&[2, 4, 16, 16], 0.731, 1.7, 1.0);
    let t = Tensor::new(&[37f32, 611.0], &dev).unwrap();
    let ids = Tensor::new(&[[128f32, 128., 0., 0., 128., 128.]; 2], &dev).unwrap();
    let time_ids = (m.family() == ModelFamily::Sdxl).then_some(&ids);
    let pred = m.predict(&noisy, &t, &cond, time_ids).unwrap();
    let loss = (pred.to_dtype(DType::F32).unwrap() - target)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = m.backward(&loss).unwrap();
    let ups = m
        .adapters()
        .iter()
        .map(|(name, a)| {
            let g = grads
                .get(a.up.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            g.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), ups)
}

fn same_in_half_precision(family: ModelFamily) {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_model(dir.path(), family, 3).unwrap();
    let lora = LoraSpec {
        rank: 2,
        alpha: 2.0,
    };
    let load =
        |dtype| model::load_with_dtype(dir.path(), family, lora, &Device::Cpu, dtype).unwrap();
    let (full, full_grads) = loss_and_grads(&load(DType::F32));
    let (half, half_grads) = loss_and_grads(&load(DType::F16));
    assert!(full.is_finite() && full > 0.0);
    // Measured: 2e-4 (SD1.5) and 3e-4 (SDXL) relative.
    assert!(
        (full - half).abs() <= 2e-3 * full,
        "{family:?}: loss {full} in f32, {half} with f16 weights"
    );
    // Gradients against the largest of the step (f16 keeps about three significant digits of
    // each product, so an adapter with tiny gradients differs more, relatively, than the step).
    let scale = full_grads
        .iter()
        .flatten()
        .fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0);
    let mut worst = 0f32;
    for (i, (a, b)) in full_grads.iter().zip(&half_grads).enumerate() {
        assert!(
            a.iter().any(|x| *x != 0.0),
            "{family:?} adapter {i}: no gradient"
        );
        worst = a
            .iter()
            .zip(b)
            .fold(worst, |m, (x, y)| m.max((x - y).abs()));
    }
    println!(
        "{family:?}: loss {full} / {half}, worst gradient difference {}",
        worst / scale
    );
    // Measured: 1.9e-3 (SD1.5) and 5.3e-3 (SDXL) of the largest gradient.
    assert!(
        worst <= 1e-2 * scale,
        "{family:?}: up gradients differ by {worst} (largest gradient {scale})"
    );
}

#[test]
fn sd15_with_f16_weights_has_the_f32_loss_and_gradients() {
    same_in_half_precision(ModelFamily::Sd15);
}

#[test]
fn sdxl_with_f16_weights_has_the_f32_loss_and_gradients() {
    same_in_half_precision(ModelFamily::Sdxl);
}
