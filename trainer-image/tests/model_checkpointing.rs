//! Gradient checkpointing changes memory, not maths: with it on, every LoRA parameter gets the
//! same gradient as without (a tiny SDXL UNet on the CPU, both runs in this process), and the
//! backward pass starts from a smaller live set, because the blocks' activations were not kept.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod model_support;

use candle_core::{DType, Device, Tensor};
use loraplane_trainer::alloc::{self, TrainerAllocator};
use loraplane_trainer::model::{self, DiffusionModel, LoraSpec, ModelFamily, tiny};
use model_support::wave;

// Counts the bytes the test holds (`alloc::peak_bytes`).
#[global_allocator]
static ALLOCATOR: TrainerAllocator = TrainerAllocator;

/// The model with every adapter's `up` set off zero (LoRA starts at zero, where `down` would
/// get no gradient and the comparison would prove nothing for it).
fn model(dir: &std::path::Path) -> DiffusionModel {
    tiny::write_tiny_model(dir, ModelFamily::Sdxl, 5).unwrap();
    let lora = LoraSpec {
        rank: 2,
        alpha: 2.0,
    };
    let m = model::load_with_dtype(dir, ModelFamily::Sdxl, lora, &Device::Cpu, DType::F32).unwrap();
    for (i, (_, a)) in m.adapters().iter().enumerate() {
        let dims = a.up.as_tensor().dims().to_vec();
        a.up.set(&(wave(&dims, 0.731, i as f64, 1.0) * 0.05).unwrap())
            .unwrap();
    }
    m
}

/// An adapter's name and the gradients of its `down` and `up`, flattened.
type AdapterGrads = (String, Vec<f32>, Vec<f32>);

/// Memory of one step, in bytes above what was held before it.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// Held after the forward pass: what the backward pass starts from.
    after_forward: usize,
    /// The most held at once during the forward and backward passes.
    peak: usize,
}

/// One fixed batch at 32×32 latents: the step's memory and every adapter's (name, down
/// gradient, up gradient).
fn run(m: &DiffusionModel) -> (Memory, Vec<AdapterGrads>) {
    let dev = Device::Cpu;
    let captions = vec!["a photo of sks dog".to_string(), "red car".to_string()];
    let cond = m.encode_prompts(&captions).unwrap();
    let noisy = wave(&[2, 4, 32, 32], 0.731, 0.3, 1.0);
    let target = wave(&[2, 4, 32, 32], 0.731, 1.7, 1.0);
    let t = Tensor::new(&[37f32, 611.0], &dev).unwrap();
    let ids = Tensor::new(&[[256f32, 256., 0., 0., 256., 256.]; 2], &dev).unwrap();
    let before = alloc::live_bytes();
    alloc::reset_peak();
    let pred = m.predict(&noisy, &t, &cond, Some(&ids)).unwrap();
    let loss = (pred - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let after_forward = alloc::live_bytes().saturating_sub(before);
    let grads = m.backward(&loss).unwrap();
    let peak = alloc::peak_bytes().saturating_sub(before);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let per_adapter = m
        .adapters()
        .into_iter()
        .map(|(name, a)| {
            let g = |v: &candle_core::Var| {
                flat(
                    grads
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("{name}: no gradient")),
                )
            };
            (name.clone(), g(&a.down), g(&a.up))
        })
        .collect();
    (
        Memory {
            after_forward,
            peak,
        },
        per_adapter,
    )
}

#[test]
fn checkpointing_gives_the_same_gradients_from_less_kept_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = model(dir.path());
    let (plain_mem, plain) = run(&m);
    m.set_gradient_checkpointing(true);
    let (ckpt_mem, ckpt) = run(&m);
    println!("without checkpointing {plain_mem:?}, with {ckpt_mem:?}");

    assert_eq!(plain.len(), ckpt.len());
    assert!(!plain.is_empty());
    for ((name, down_a, up_a), (_, down_b, up_b)) in plain.iter().zip(&ckpt) {
        for (which, a, b) in [("down", down_a, down_b), ("up", up_a, up_b)] {
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}.{which}: zero gradient proves nothing");
            let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            // The same ops on the same values; only summation order may differ.
            assert!(
                worst <= 1e-5 * scale.max(1.0),
                "{name}.{which}: gradients differ by {worst} (scale {scale})"
            );
        }
    }
    // What the forward pass leaves for the backward pass: every block's activations without
    // checkpointing, only the blocks' outputs with it.
    assert!(
        ckpt_mem.after_forward * 2 < plain_mem.after_forward,
        "after the forward pass: {ckpt_mem:?} with checkpointing, {plain_mem:?} without"
    );
    assert!(
        ckpt_mem.peak < plain_mem.peak,
        "peak: {ckpt_mem:?} with checkpointing, {plain_mem:?} without"
    );
}
