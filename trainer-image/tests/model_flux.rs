//! The trainer's FLUX.1 transformer computes what diffusers computes, and trains.
//!
//! `bench/make_flux_fixtures.py` had diffusers make a tiny random `FluxTransformer2DModel`
//! (saved in `fixtures/flux/transformer`) and run it on fixed inputs
//! (`fixtures/flux/reference.safetensors`); the trainer loads the same folder through its own
//! loader and must reproduce the outputs (f32 on the CPU). Every adapter then gets a gradient
//! that agrees with finite differences (f64), with and without gradient checkpointing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod model_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loraplane_trainer::model::flux::transformer::{self, FluxInputs, LoraTargets};
use loraplane_trainer::model::{self, LoraSpec};
use model_support::max_abs_diff;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The fixture's (T text + N image) positions, read back from its id tensors.
fn positions(r: &HashMap<String, Tensor>) -> Vec<Vec<f64>> {
    let rows = |k: &str| -> Vec<Vec<f64>> {
        r[k].to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|row| row.into_iter().map(f64::from).collect())
            .collect()
    };
    let mut out = rows("transformer.txt_ids");
    out.extend(rows("transformer.img_ids"));
    out
}

#[test]
fn rope_tables_match_diffusers_flux_pos_embed() {
    let r = reference();
    let t = model::load_flux_transformer(
        &fixture_dir(),
        None,
        &LoraTargets::default(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let tables =
        transformer::rope_tables(t.config(), &positions(&r), DType::F32, &Device::Cpu).unwrap();
    assert!(max_abs_diff(&tables.cos, &r["rope.cos"]) < 1e-6);
    assert!(max_abs_diff(&tables.sin, &r["rope.sin"]) < 1e-6);
    // The fixture's ids are the grid `positions` builds: 5 text tokens, 4 x 3 image tokens.
    assert_eq!(transformer::positions(5, 4, 3), positions(&r));
}

#[test]
fn transformer_matches_diffusers_with_and_without_fresh_adapters() {
    let r = reference();
    let rope = |t: &transformer::FluxTransformer| {
        transformer::rope_tables(t.config(), &positions(&r), DType::F32, &Device::Cpu).unwrap()
    };
    let lora = LoraSpec {
        rank: 4,
        alpha: 4.0,
    };
    for spec in [None, Some(&lora)] {
        let t = model::load_flux_transformer(
            &fixture_dir(),
            spec,
            &LoraTargets::default(),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let tables = rope(&t);
        let out = t
            .forward(&FluxInputs {
                image: &r["transformer.hidden_states"],
                text: &r["transformer.encoder_hidden_states"],
                pooled: &r["transformer.pooled_projections"],
                sigma: &r["transformer.timestep"],
                guidance: Some(&r["transformer.guidance"]),
                rope: &tables,
            })
            .unwrap();
        let want = &r["transformer.output"];
        let diff = max_abs_diff(&out, want);
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!(
            "FLUX.1 transformer (adapters: {}): max abs difference {diff} (outputs up to {scale})",
            spec.is_some()
        );
        // Fresh adapters (up = 0) leave the base model's output as it is.
        assert!(
            diff < 1e-4,
            "the transformer differs from diffusers' by {diff}"
        );
    }
}

/// The loss of one prediction in f64: mean squared error against a fixed target.
fn loss(t: &transformer::FluxTransformer, r: &HashMap<String, Tensor>) -> Tensor {
    let f64 = |k: &str| r[k].to_dtype(DType::F64).unwrap();
    let tables =
        transformer::rope_tables(t.config(), &positions(r), DType::F64, &Device::Cpu).unwrap();
    let (image, text, pooled) = (
        f64("transformer.hidden_states"),
        f64("transformer.encoder_hidden_states"),
        f64("transformer.pooled_projections"),
    );
    let (sigma, guidance) = (f64("transformer.timestep"), f64("transformer.guidance"));
    let pred = t
        .forward(&FluxInputs {
            image: &image,
            text: &text,
            pooled: &pooled,
            sigma: &sigma,
            guidance: Some(&guidance),
            rope: &tables,
        })
        .unwrap();
    let target = (f64("transformer.output") * 0.5).unwrap();
    (pred - target).unwrap().sqr().unwrap().mean_all().unwrap()
}

/// The tiny transformer in f64 with rank-2 adapters whose `up` is not zero (so `down` has a
/// gradient too), checkpointed or not.
fn trainable(checkpointing: bool) -> transformer::FluxTransformer {
    let lora = LoraSpec {
        rank: 2,
        alpha: 2.0,
    };
    let mut t = model::load_flux_transformer(
        &fixture_dir(),
        Some(&lora),
        &LoraTargets::default(),
        &Device::Cpu,
        DType::F64,
    )
    .unwrap();
    for (i, (_, a)) in t.adapters().iter().enumerate() {
        let up = (a.up.as_tensor().ones_like().unwrap() * (0.05 + 0.01 * i as f64)).unwrap();
        a.up.set(&up).unwrap();
    }
    t.set_gradient_checkpointing(checkpointing);
    t
}

/// Every adapter's (down, up) gradient, by module path.
fn gradients(
    t: &transformer::FluxTransformer,
    r: &HashMap<String, Tensor>,
) -> Vec<(String, Tensor, Tensor)> {
    let l = loss(t, r);
    let mut grads = l.backward().unwrap();
    t.merge_checkpointed_grads(&mut grads).unwrap();
    t.adapters()
        .into_iter()
        .map(|(name, a)| {
            let g = |v: &candle_core::Var| {
                grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient"))
                    .clone()
            };
            let (down, up) = (g(&a.down), g(&a.up));
            (name, down, up)
        })
        .collect()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

#[test]
fn every_adapter_gets_the_finite_difference_gradient_with_and_without_checkpointing() {
    let r = reference();
    let t = trainable(false);
    let adapters = t.adapters();
    // The default targets: 12 layers per double block (each stream's q, k, v, output and two
    // feed-forward layers), 5 per single block (q, k, v, proj_mlp, proj_out).
    assert_eq!(
        adapters.len(),
        2 * 12 + 2 * 5,
        "{:?}",
        adapters.iter().map(|a| &a.0).collect::<Vec<_>>()
    );
    assert!(
        adapters
            .iter()
            .any(|(n, _)| n == "transformer_blocks.0.attn.add_k_proj")
    );
    assert!(
        adapters
            .iter()
            .any(|(n, _)| n == "single_transformer_blocks.1.proj_out")
    );
    assert!(
        !adapters
            .iter()
            .any(|(n, _)| n.contains("norm") || n == "proj_out")
    );

    let plain = gradients(&t, &r);
    for (name, down, up) in &plain {
        for (which, g) in [("down", down), ("up", up)] {
            let norm = scalar(&g.sqr().unwrap().sum_all().unwrap());
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}.{which}: gradient norm {norm}"
            );
        }
    }

    // Central differences on the first entry of a few adapters' down and up.
    let h = 1e-5;
    for (name, a) in adapters.iter().step_by(7) {
        for (which, var) in [("down", &a.down), ("up", &a.up)] {
            let original = var.as_tensor().copy().unwrap();
            let (rows, cols) = original.dims2().unwrap();
            let bump = |delta: f64| {
                let mut v = original.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                v[0] += delta;
                var.set(&Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap())
                    .unwrap();
                let l = scalar(&loss(&t, &r));
                var.set(&original).unwrap();
                l
            };
            let numeric = (bump(h) - bump(-h)) / (2.0 * h);
            let entry = plain.iter().find(|p| &p.0 == name).unwrap();
            let g = if which == "down" { &entry.1 } else { &entry.2 };
            let analytic = g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
            let err = (numeric - analytic).abs() / analytic.abs().max(1e-8);
            assert!(
                err < 1e-5,
                "{name}.{which}: analytic {analytic}, finite differences {numeric}"
            );
        }
    }

    // Checkpointed blocks recompute their activations and give the same gradients.
    let checkpointed = gradients(&trainable(true), &r);
    assert_eq!(checkpointed.len(), plain.len());
    for ((name, d0, u0), (_, d1, u1)) in plain.iter().zip(&checkpointed) {
        for (a, b) in [(d0, d1), (u0, u1)] {
            let diff = scalar(&(a - b).unwrap().abs().unwrap().max_all().unwrap());
            let size = scalar(&a.abs().unwrap().max_all().unwrap());
            assert!(
                diff <= 1e-10 * size.max(1e-12),
                "{name}: checkpointing changed a gradient by {diff}"
            );
        }
    }
}
