//! The trainer's FLUX.1 transformer computes what diffusers computes, and trains.
//!
//! `bench/make_flux_fixtures.py` had diffusers and transformers make a tiny random FLUX.1-dev
//! pipeline (saved in `fixtures/flux/` as current libraries save it) and run its parts on fixed
//! inputs (`fixtures/flux/reference.safetensors`); the trainer loads the same folder through its
//! own loader and must reproduce the outputs (f32 on the CPU): tokenizers, T5, CLIP's pooled
//! output, the 16-channel VAE both ways, the transformer. Every adapter then gets a gradient
//! that agrees with finite differences (f64), with and without gradient checkpointing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod model_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use loraplane_trainer::model::flux::pipeline::{self, FluxModel, FluxOptions};
use loraplane_trainer::model::flux::transformer::{self, FluxInputs, LoraTargets};
use loraplane_trainer::model::{self, FamilyModel, LoraSpec};
use loraplane_trainer::preview::{self, RenderOptions};
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

// As in bench/make_flux_fixtures.py.
const PROMPTS: [&str; 2] = [
    "a photo of zxq dog",
    "red car in the  snow, portrait style!",
];
const T5_MAX_LENGTH: usize = 16;

fn pipeline() -> FluxModel {
    let opts = FluxOptions {
        lora: None,
        targets: LoraTargets::default(),
        t5_max_length: Some(T5_MAX_LENGTH),
    };
    FluxModel::load(&fixture_dir(), &opts, &Device::Cpu, DType::F32).unwrap()
}

fn ids(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

#[test]
fn text_encoders_match_transformers_through_their_tokenizers() {
    let r = reference();
    let dir = fixture_dir();
    // Both tokenizers read tokenizer.json, the only form transformers 5 writes.
    let t5 = loraplane_trainer::model::flux::tokenizer::T5Tokenizer::from_dir(
        &dir.join("tokenizer_2"),
        T5_MAX_LENGTH,
    )
    .unwrap();
    let t5_ids: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| t5.encode_padded(p).unwrap())
        .collect();
    assert_eq!(t5_ids, ids(&r["t5.ids"]), "T5 token ids");
    // The same vocabulary as SentencePiece's spiece.model, the form older folders ship.
    let spm = loraplane_trainer::model::flux::tokenizer::T5Tokenizer::from_dir(
        &dir.join("spiece"),
        T5_MAX_LENGTH,
    )
    .unwrap();
    let spm_ids: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| spm.encode_padded(p).unwrap())
        .collect();
    assert_eq!(
        spm_ids, t5_ids,
        "spiece.model tokenizes as tokenizer.json does"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = loraplane_trainer::model::flux::tokenizer::T5Tokenizer::from_dir(empty.path(), 8)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("neither tokenizer.json nor spiece.model"),
        "{err}"
    );
    let clip = loraplane_trainer::model::tokenizer::ClipTokenizer::from_dir(&dir.join("tokenizer"))
        .unwrap();
    let clip_ids: Vec<Vec<u32>> = PROMPTS.iter().map(|p| clip.encode_padded(p).0).collect();
    assert_eq!(clip_ids, ids(&r["clip.ids"]), "CLIP token ids");

    // text_encoder was saved by transformers 5: no `text_model.` prefix on its keys.
    let captions: Vec<String> = PROMPTS.iter().map(|p| p.to_string()).collect();
    let cond = pipeline().encode_prompts(&captions).unwrap();
    let t5_diff = max_abs_diff(&cond.hidden, &r["t5.hidden"]);
    let clip_diff = max_abs_diff(cond.pooled.as_ref().unwrap(), &r["clip.pooled"]);
    println!("T5 encoder: max abs difference {t5_diff}; CLIP pooled: {clip_diff}");
    assert!(t5_diff < 1e-4, "T5 differs from transformers' by {t5_diff}");
    assert!(
        clip_diff < 1e-4,
        "CLIP's pooled output differs by {clip_diff}"
    );
}

#[test]
fn sixteen_channel_vae_matches_diffusers_both_ways() {
    let r = reference();
    let m = pipeline();
    assert_eq!((m.latent_channels(), m.vae_scale_factor()), (16, 8));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("vae/config.json")).unwrap(),
    )
    .unwrap();
    let (shift, scale) = (
        cfg["shift_factor"].as_f64().unwrap(),
        cfg["scaling_factor"].as_f64().unwrap(),
    );
    // The encoder gives (mean − shift) · scale, what training caches.
    let latent = m.encode_images(&r["vae.image"]).unwrap();
    let want = ((&r["vae.latent"] - shift).unwrap() * scale).unwrap();
    let enc = max_abs_diff(&latent, &want);
    let decoder = model::load_vae_decoder(&fixture_dir(), &Device::Cpu).unwrap();
    let z = ((&r["vae.z"] - shift).unwrap() * scale).unwrap();
    let dec = max_abs_diff(&decoder.decode(&z).unwrap(), &r["vae.decoded"]);
    println!("16-channel VAE: encoder max abs difference {enc}, decoder {dec}");
    assert!(
        (enc as f64) < 1e-4 * scale,
        "the encoder differs from diffusers' by {enc}"
    );
    assert!(dec < 1e-4, "the decoder differs from diffusers' by {dec}");
}

#[test]
fn packing_is_diffusers_2x2_patch_order_and_unpacks_exactly() {
    // One latent (1, 2, 2, 4): channel c, row y, column x holds 100c + 10y + x.
    let v: Vec<f32> = (0..2)
        .flat_map(|c| (0..2).flat_map(move |y| (0..4).map(move |x| (100 * c + 10 * y + x) as f32)))
        .collect();
    let latent = Tensor::from_vec(v, (1, 2, 2, 4), &Device::Cpu).unwrap();
    let tokens = pipeline::pack(&latent).unwrap();
    assert_eq!(tokens.dims(), &[1, 2, 8]);
    // Token 1 is the patch at columns 2..4; its channels run (c, dy, dx).
    let second: Vec<f32> = tokens.get(0).unwrap().get(1).unwrap().to_vec1().unwrap();
    assert_eq!(second, [2., 3., 12., 13., 102., 103., 112., 113.]);
    let back = pipeline::unpack(&tokens, 2, 4).unwrap();
    assert_eq!(max_abs_diff(&back, &latent), 0.0);
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

/// The trainer's FLUX.1 preview is FluxPipeline's image: the same flow-matching Euler steps
/// (sigmas shifted by μ from the image's token count), the guidance value embedded, the
/// 16-channel decoder, from the same `latents=`. The conditioning is encoded before the text
/// encoders are released, as training does, and the released model refuses to encode.
#[test]
fn preview_render_matches_flux_pipeline_and_survives_releasing_the_encoders() {
    let r = reference();
    let opts = FluxOptions {
        lora: Some(LoraSpec {
            rank: 2,
            alpha: 2.0,
        }),
        targets: LoraTargets::default(),
        t5_max_length: Some(T5_MAX_LENGTH),
    };
    let mut m = model::load_flux(&fixture_dir(), &opts, &Device::Cpu, DType::F32).unwrap();
    let decoder = model::load_vae_decoder(&fixture_dir(), &Device::Cpu).unwrap();
    let cond = preview::conditioning(&m, PROMPTS[0]).unwrap();
    m.release_encoders();
    let err = m.encode_prompts(&[PROMPTS[0].to_string()]).unwrap_err();
    assert!(
        matches!(err, model::ModelError::EncoderReleased(_)),
        "{err}"
    );

    let o = RenderOptions {
        sampler: None,
        steps: 3,
        guidance: 3.5,
        seed: 0,
        resolution: 32,
    };
    let image = preview::render_conditioned(&m, &decoder, &cond, &r["render.noise"], &o).unwrap();
    // FluxPipeline's `output_type="pt"`: (x / 2 + 0.5) clamped to [0, 1].
    let ours = ((image / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    let diff = max_abs_diff(&ours, &r["render.image"]);
    println!(
        "FLUX.1 preview (3 Euler steps, guidance 3.5, 32 px): max abs pixel difference {diff}"
    );
    assert!(
        diff < 1e-4,
        "the preview differs from FluxPipeline's by {diff}"
    );
    // And as the sample sets write it: a PNG.
    let png = preview::render_with(&m, &decoder, &cond, &o).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
}

/// A folder mixing parts of different models is refused at load, naming both sides, before
/// any weight is read (rather than after caching every input, at the first prediction).
#[test]
fn mismatched_components_are_refused_naming_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["transformer", "text_encoder", "text_encoder_2", "vae"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        std::fs::copy(
            fixture_dir().join(sub).join("config.json"),
            dir.path().join(sub).join("config.json"),
        )
        .unwrap();
    }
    let path = dir.path().join("transformer/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["pooled_projection_dim"] = 12.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let opts = FluxOptions {
        lora: None,
        targets: LoraTargets::default(),
        t5_max_length: Some(T5_MAX_LENGTH),
    };
    // No weights in the folder at all: the configs alone must fail it.
    let err = match FluxModel::load(dir.path(), &opts, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("a mismatched folder loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("pooled_projection_dim 12") && err.contains("hidden_size 16"),
        "{err}"
    );
}
