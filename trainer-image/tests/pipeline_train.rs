//! End-to-end training on tiny generated models and datasets (CPU): every family trains and
//! writes loadable LoRA files, loss falls on a fixed batch, a resumed run equals an
//! uninterrupted one (SD1.5 and FLUX.1), and invalid datasets are refused before anything is
//! written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pipeline_support;

use candle_core::Device;
use loraplane_crds::trainer::Outcome;
use loraplane_crds::v1alpha1::{MixedPrecision, ModelFamily};
use loraplane_trainer::model::{self, LoraSpec};
use loraplane_trainer::optim::{AdamW, AdamWParams};
use loraplane_trainer::rng::Rng;
use loraplane_trainer::tensors::TensorFile;
use loraplane_trainer::train::{self, RunOptions, TrainError};
use pipeline_support::*;

fn opts() -> RunOptions {
    RunOptions {
        emit_events: false,
        device: Device::Cpu,
        ..RunOptions::default()
    }
}

fn read(path: &std::path::Path) -> TensorFile {
    TensorFile::read(path).unwrap()
}

#[test]
fn sd15_run_writes_kohya_and_peft_files_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Sd15, 6);
    let run = dir.path().join("run");
    let cfg = config(&s, &run, 3, 2);
    let report = train::run(&cfg, &opts()).unwrap();
    assert_eq!(report.summary.outcome, Outcome::Succeeded);
    assert_eq!(report.losses.len(), 3);
    assert_eq!(report.summary.artifacts.len(), 2);
    for a in &report.summary.artifacts {
        let bytes = std::fs::read(&a.uri).unwrap();
        assert_eq!(a.bytes, bytes.len() as u64);
        assert_eq!(a.sha256, sha256_hex(&bytes));
    }
    // A checkpoint went to the checkpoint location.
    assert!(
        run.join("remote-ckpt")
            .join(loraplane_crds::layout::CHECKPOINT_FILE)
            .exists()
    );

    let kohya = read(&run.join("out/job-1.safetensors"));
    let peft = read(&run.join("out/pytorch_lora_weights.safetensors"));
    let m = model::load(
        &s.model,
        s.family,
        LoraSpec {
            rank: 4,
            alpha: 2.0,
        },
        &Device::Cpu,
    )
    .unwrap();
    let adapters = m.adapters();
    assert!(!adapters.is_empty());
    assert_eq!(kohya.tensors.len(), 3 * adapters.len());
    assert_eq!(peft.tensors.len(), 2 * adapters.len());
    let mut moved = 0;
    for (path, a) in &adapters {
        let k = format!("lora_unet_{}", path.replace('.', "_"));
        let down = &kohya.tensors[&format!("{k}.lora_down.weight")];
        let up = &kohya.tensors[&format!("{k}.lora_up.weight")];
        let alpha = &kohya.tensors[&format!("{k}.alpha")];
        let (r, inp) = (a.down.dims()[0], a.down.dims()[1]);
        let out = a.up.dims()[0];
        let conv: &[usize] = if a.conv1x1 { &[1, 1] } else { &[] };
        assert_eq!(down.shape, [&[r, inp][..], conv].concat(), "{k}");
        assert_eq!(up.shape, [&[out, r][..], conv].concat(), "{k}");
        assert_eq!(alpha.data, vec![2.0]);
        let pa = &peft.tensors[&format!("unet.{path}.lora_A.weight")];
        let pb = &peft.tensors[&format!("unet.{path}.lora_B.weight")];
        assert_eq!(pa, down);
        // alpha/rank = 0.5 is folded into lora_B.
        for (x, y) in pb.data.iter().zip(&up.data) {
            assert!((x - 0.5 * y).abs() < 1e-7);
        }
        if up.data.iter().any(|v| *v != 0.0) {
            moved += 1;
        }
    }
    assert_eq!(moved, adapters.len(), "every up matrix trained off zero");
    let md = &kohya.metadata;
    assert_eq!(md["ss_network_module"], "networks.lora");
    assert_eq!(md["ss_network_dim"], "4");
    assert_eq!(md["ss_network_alpha"], "2.0");
    assert_eq!(md["ss_base_model_version"], "sd_v1");
    assert_eq!(md["ss_resolution"], "(64, 64)");
    assert_eq!(md["ss_max_train_steps"], "3");
    assert_eq!(md["modelspec.architecture"], "stable-diffusion-v1/lora");
    assert_eq!(md["modelspec.sai_model_spec"], "1.0.0");
    assert_eq!(md["modelspec.trigger_phrase"], TRIGGER);
    assert_eq!(md["modelspec.title"], "job-1");
    assert!(
        md["ss_training_finished_at"].parse::<f64>().unwrap()
            >= md["ss_training_started_at"].parse::<f64>().unwrap()
    );
    assert!(
        !md.values().any(|v| v.contains(CAPTION_WORD)),
        "captions stay out of metadata"
    );
    assert_eq!(peft.metadata["ss_network_dim"], "4");
}

#[test]
fn the_metadata_states_the_precision_that_ran_not_the_one_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Sd15, 6);
    let run = dir.path().join("run");
    let mut cfg = config(&s, &run, 1, 1);
    cfg.training.mixed_precision = MixedPrecision::Bf16;
    let report = train::run(&cfg, &opts()).unwrap();
    assert_eq!(report.summary.outcome, Outcome::Succeeded);
    for a in &report.summary.artifacts {
        let file = read(std::path::Path::new(&a.uri));
        assert_eq!(
            file.metadata["ss_mixed_precision"], "fp32",
            "{}: bf16 was asked for, f32 ran on the CPU",
            a.uri
        );
        assert_eq!(
            file.metadata["ss_gradient_checkpointing"], "False",
            "{}: checkpointing is off by default on the CPU",
            a.uri
        );
    }
}

#[test]
fn a_checkpointed_run_trains_the_same_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Sdxl, 6);
    let run_with = |on: bool| {
        let mut cfg = config(&s, &dir.path().join(format!("run-{on}")), 3, 3);
        cfg.training.gradient_checkpointing = Some(on);
        train::run(&cfg, &opts()).unwrap()
    };
    let (plain, checkpointed) = (run_with(false), run_with(true));
    assert_eq!(plain.losses.len(), 3);
    for (step, (a, b)) in plain.losses.iter().zip(&checkpointed.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "step {}: loss {a} without checkpointing, {b} with",
            step + 1
        );
    }
    for a in &checkpointed.summary.artifacts {
        let file = read(std::path::Path::new(&a.uri));
        assert_eq!(
            file.metadata["ss_gradient_checkpointing"], "True",
            "{}",
            a.uri
        );
    }
}

#[test]
fn sdxl_run_names_kohya_modules_in_sgm_layout() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Sdxl, 6);
    let run = dir.path().join("run");
    let cfg = config(&s, &run, 2, 5);
    let report = train::run(&cfg, &opts()).unwrap();
    assert!(report.losses.iter().all(|l| l.is_finite()));
    let kohya = read(&run.join("out/job-1.safetensors"));
    let peft = read(&run.join("out/pytorch_lora_weights.safetensors"));
    assert_eq!(kohya.metadata["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(
        kohya.metadata["modelspec.architecture"],
        "stable-diffusion-xl-v1-base/lora"
    );
    let modules: Vec<&str> = kohya
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".alpha"))
        .collect();
    assert_eq!(modules.len() * 2, peft.tensors.len());
    for m in &modules {
        assert!(
            m.starts_with("lora_unet_input_blocks_")
                || m.starts_with("lora_unet_middle_block_1_")
                || m.starts_with("lora_unet_output_blocks_"),
            "{m}"
        );
    }
    // Every PEFT (diffusers) module has its SGM twin with the same down weights.
    let unet_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.model.join("unet/config.json")).unwrap())
            .unwrap();
    let layers = unet_cfg["layers_per_block"].as_u64().unwrap() as usize;
    for (k, t) in &peft.tensors {
        let Some(path) = k
            .strip_prefix("unet.")
            .and_then(|k| k.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let sgm = loraplane_trainer::export::kohya_name(path, ModelFamily::Sdxl, layers).unwrap();
        assert_eq!(&kohya.tensors[&format!("{sgm}.lora_down.weight")], t);
    }
}

#[test]
fn loss_decreases_on_a_fixed_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Sd15, 6);
    let m = model::load(
        &s.model,
        s.family,
        LoraSpec {
            rank: 4,
            alpha: 4.0,
        },
        &Device::Cpu,
    )
    .unwrap();
    let zip = std::fs::read(&s.zip).unwrap();
    let rules = Default::default();
    let samples = loraplane_trainer::dataset::validate(&zip, TRIGGER, None, &rules).unwrap();
    let cache = train::cache_samples(&m, &samples, 64, &rules).unwrap();
    let objective = loraplane_trainer::objective::Objective::Ddpm {
        schedule: loraplane_trainer::schedule::NoiseSchedule::new(&Default::default()).unwrap(),
        min_snr_gamma: None,
    };
    let batch = train::make_batch(
        &m,
        &cache,
        &[0, 1],
        &objective,
        &mut Rng::new(3, 0),
        0.0,
        1.0,
    )
    .unwrap();
    let mut opt = AdamW::new(train::named_params(&m), AdamWParams::default()).unwrap();
    let mut losses = Vec::new();
    for _ in 0..12 {
        let loss = train::batch_loss(&m, &batch).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        opt.step(&grads, 5e-3).unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first * 0.9, "loss did not fall: {losses:?}");
}

/// FLUX.1 (the tiny dev pipeline diffusers made) trains with flow matching and exports both
/// files: PEFT keys on `transformer.`, and Black Forest Labs' modules in the kohya file with
/// q, k, v (and the single blocks' MLP input) fused into one block-diagonal adapter.
#[test]
fn flux1_run_writes_bfl_and_peft_files_with_fused_qkv() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Flux1, 5);
    let run = dir.path().join("run");
    let report = train::run(&config(&s, &run, 3, 5), &opts()).unwrap();
    assert_eq!(report.losses.len(), 3);
    assert!(report.losses.iter().all(|l| l.is_finite() && *l > 0.0));
    let kohya = read(&run.join("out/job-1.safetensors"));
    let peft = read(&run.join("out/pytorch_lora_weights.safetensors"));
    let md = &kohya.metadata;
    assert_eq!(md["modelspec.architecture"], "flux-1-dev/lora");
    assert_eq!(md["modelspec.license"], "flux-1-dev-non-commercial-license");
    assert_eq!(md["modelspec.prediction_type"], "flow");
    assert_eq!(md["ss_base_model_version"], "flux1");
    assert_eq!(md["ss_guidance_scale"], "3.5");
    assert_eq!(md["ss_timestep_sampling"], "flux_shift");

    // PEFT: every adapted layer of the transformer, rank 4, alpha/rank folded into lora_B.
    let q = &peft.tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"];
    assert_eq!(q.shape, vec![4, 16]);
    assert_eq!(peft.tensors.len(), 2 * (2 * 12 + 2 * 5));
    assert!(peft.tensors.keys().all(|k| k.starts_with("transformer.")));

    // kohya: img/txt qkv fused at rank 12 (3 x 4), alpha 3 x 2; linear1 at rank 16.
    let qkv = "lora_unet_double_blocks_0_img_attn_qkv";
    assert_eq!(
        kohya.tensors[&format!("{qkv}.lora_down.weight")].shape,
        vec![12, 16]
    );
    assert_eq!(
        kohya.tensors[&format!("{qkv}.lora_up.weight")].shape,
        vec![48, 12]
    );
    assert_eq!(kohya.tensors[&format!("{qkv}.alpha")].data, vec![6.0]);
    let l1 = "lora_unet_single_blocks_1_linear1";
    assert_eq!(
        kohya.tensors[&format!("{l1}.lora_up.weight")].shape,
        vec![3 * 16 + 64, 16]
    );
    for m in [
        "double_blocks_1_txt_attn_proj",
        "double_blocks_0_img_mlp_2",
        "single_blocks_0_linear2",
    ] {
        assert!(
            kohya.tensors.contains_key(&format!("lora_unet_{m}.alpha")),
            "{m}"
        );
    }
    // Both files hold the same update: the fused down rows are the PEFT parts' A matrices,
    // and the fused up is block-diagonal with the parts' B (unfolded: alpha/rank is 0.5).
    let down = &kohya.tensors[&format!("{qkv}.lora_down.weight")];
    let k_a = &peft.tensors["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"];
    assert_eq!(&down.data[4 * 16..8 * 16], &k_a.data[..]);
    let up = &kohya.tensors[&format!("{qkv}.lora_up.weight")];
    let v_b = &peft.tensors["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"];
    for o in 0..16 {
        let row = &up.data[(32 + o) * 12..(33 + o) * 12];
        assert!(
            row[..8].iter().all(|x| *x == 0.0),
            "off-diagonal block not zero"
        );
        for j in 0..4 {
            assert!((row[8 + j] * 0.5 - v_b.data[o * 4 + j]).abs() < 1e-7);
        }
    }
}

/// FLUX.1 with adapters on some layers only (`loraTargets`): the PEFT file has just those, and
/// the kohya file still writes each fused module whole, the untrained parts as zero blocks.
#[test]
fn flux1_lora_targets_choose_the_adapted_layers() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Flux1, 5);
    let run = dir.path().join("run");
    let mut cfg = config(&s, &run, 1, 5);
    cfg.training.lora_targets = Some(vec!["attn.to_q".into(), "proj_mlp".into()]);
    train::run(&cfg, &opts()).unwrap();
    let peft = read(&run.join("out/pytorch_lora_weights.safetensors"));
    let mut modules: Vec<&str> = peft
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_A.weight"))
        .collect();
    modules.sort();
    assert_eq!(
        modules,
        [
            "transformer.single_transformer_blocks.0.attn.to_q",
            "transformer.single_transformer_blocks.0.proj_mlp",
            "transformer.single_transformer_blocks.1.attn.to_q",
            "transformer.single_transformer_blocks.1.proj_mlp",
            "transformer.transformer_blocks.0.attn.to_q",
            "transformer.transformer_blocks.1.attn.to_q",
        ]
    );
    let kohya = read(&run.join("out/job-1.safetensors"));
    let down = &kohya.tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"];
    assert_eq!(down.shape, vec![16, 16], "q, k, v, MLP parts of rank 4");
    // k's and v's rows are zero: nothing trained them.
    assert!(down.data[4 * 16..12 * 16].iter().all(|x| *x == 0.0));
    assert!(down.data[..4 * 16].iter().any(|x| *x != 0.0));
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    for family in [ModelFamily::Sd15, ModelFamily::Flux1] {
        resumed_run_equals_uninterrupted(family);
    }
}

fn resumed_run_equals_uninterrupted(family: ModelFamily) {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), family, 6);
    let whole = dir.path().join("whole");
    train::run(&config(&s, &whole, 5, 2), &opts()).unwrap();

    let split = dir.path().join("split");
    let cfg = config(&s, &split, 5, 2);
    let crash = train::run(
        &cfg,
        &RunOptions {
            stop_after: Some(3),
            ..opts()
        },
    )
    .unwrap_err();
    assert!(
        matches!(crash, TrainError::Interrupted { step: 3 }),
        "{crash}"
    );
    // A restart on a fresh node: the local work dir is gone, the checkpoint location is not.
    std::fs::remove_dir_all(split.join("work")).unwrap();
    let report = train::run(&cfg, &opts()).unwrap();
    assert_eq!(report.resumed_from, Some(2));
    assert_eq!(report.losses.len(), 3);

    let a = read(&whole.join("out/pytorch_lora_weights.safetensors"));
    let b = read(&split.join("out/pytorch_lora_weights.safetensors"));
    let keys: Vec<&String> = a.tensors.keys().collect();
    assert_eq!(keys, b.tensors.keys().collect::<Vec<_>>());
    let mut max_diff = 0f32;
    for (k, t) in &a.tensors {
        for (x, y) in t.data.iter().zip(&b.tensors[k].data) {
            max_diff = max_diff.max((x - y).abs());
        }
    }
    assert!(
        max_diff <= 1e-6,
        "{family:?}: resumed adapters differ by {max_diff}"
    );
}

#[test]
fn a_resumed_run_puts_the_earlier_sample_sets_back_on_its_contact_sheet() {
    use loraplane_crds::layout::CONTACT_SHEET_FILE;
    use loraplane_crds::trainer::{SampleWhen, SamplesConfig};
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Sd15, 6);
    let with_samples = |run: &std::path::Path| {
        let mut cfg = config(&s, run, 4, 2);
        cfg.samples = SamplesConfig {
            when: SampleWhen::Checkpoints,
            every: 2,
            steps: 3,
            ..SamplesConfig::default()
        };
        cfg
    };
    let whole = dir.path().join("whole");
    train::run(&with_samples(&whole), &opts()).unwrap();

    let split = dir.path().join("split");
    let cfg = with_samples(&split);
    let stop = RunOptions {
        stop_after: Some(3),
        ..opts()
    };
    train::run(&cfg, &stop).unwrap_err();
    // On a fresh node the base and step-2 sets come back from the output location.
    std::fs::remove_dir_all(split.join("work")).unwrap();
    let report = train::run(&cfg, &opts()).unwrap();
    assert_eq!(report.resumed_from, Some(2));

    let sheet = |run: &std::path::Path| {
        image::open(run.join("out").join(CONTACT_SHEET_FILE))
            .unwrap()
            .to_rgb8()
    };
    let (a, b) = (sheet(&whole), sheet(&split));
    assert_eq!(a.dimensions(), b.dimensions(), "the same three rows");
    // The resumed adapters match to 1e-6, so the last row may differ by a rounding step.
    let worst = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(worst <= 2, "sheets differ by {worst} levels");
}

type Entries = Vec<(String, Vec<u8>)>;

#[test]
fn invalid_datasets_are_bad_input_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), ModelFamily::Sd15);
    // The failing entry is the last of each zip: errors name it by number, never by name.
    let n = dataset_entries(5).len() + 1;
    let (slip, corrupt, bomb) = (
        format!("entry #{n}: unsafe path"),
        format!("entry #{n}: corrupt image"),
        format!("entry #{n}: compression ratio"),
    );
    let cases: Vec<(&str, Entries, &str)> = vec![
        (
            "slip",
            {
                let mut e = dataset_entries(5);
                e.push(("../../etc/evil.png".into(), png(8, 8, 1)));
                e
            },
            &slip,
        ),
        (
            "corrupt",
            {
                let mut e = dataset_entries(5);
                e.push((
                    "broken.webp".into(),
                    b"RIFF\x10\0\0\0WEBPVP8 garbage".to_vec(),
                ));
                e
            },
            &corrupt,
        ),
        ("few", dataset_entries(4), "has 4 images; between 5 and 200"),
        (
            "bomb",
            {
                let mut e = dataset_entries(5);
                e.push(("pad.txt".into(), vec![b' '; 4 << 20]));
                e
            },
            &bomb,
        ),
    ];
    for (name, entries, expected) in cases {
        let case_dir = dir.path().join(name);
        std::fs::create_dir_all(&case_dir).unwrap();
        let (zip, sha) = write_zip(&case_dir, &entries);
        let s = Setup {
            model: model.clone(),
            zip,
            sha,
            family: ModelFamily::Sd15,
        };
        let run = case_dir.join("run");
        let err = train::run(&config(&s, &run, 2, 1), &opts()).unwrap_err();
        assert!(err.is_bad_input(), "{name}: {err}");
        assert!(err.to_string().contains(expected), "{name}: {err}");
        for file in ["evil.png", "broken.webp", "pad.txt"] {
            assert!(!err.to_string().contains(file), "{name}: {err}");
        }
        let out: Vec<_> = std::fs::read_dir(run.join("work"))
            .unwrap()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).unwrap())
            .collect();
        assert!(out.is_empty(), "{name}: files left behind: {out:?}");
        assert!(!run.join("out").exists() && !run.join("remote-ckpt").exists());
    }
    // Checksum mismatch.
    let (zip, _) = write_zip(dir.path(), &dataset_entries(5));
    let s = Setup {
        model,
        zip,
        sha: "0".repeat(64),
        family: ModelFamily::Sd15,
    };
    let err = train::run(&config(&s, &dir.path().join("sha"), 2, 1), &opts()).unwrap_err();
    assert!(
        err.is_bad_input() && err.to_string().contains("checksum mismatch"),
        "{err}"
    );
}
