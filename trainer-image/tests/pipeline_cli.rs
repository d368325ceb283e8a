//! The real `loraplane-trainer` binary as the operator runs it: exit codes 0 / 2 / 1, progress
//! lines on stdout, the summary in the termination-message file, one-line config errors, and
//! no customer text in any output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pipeline_support;

use std::path::Path;
use std::process::{Command, Output};

use loraplane_crds::trainer::{
    EXIT_BAD_INPUT, EXIT_CRASH, EXIT_OK, Outcome, TrainerEvent, TrainerSummary,
};
use loraplane_crds::v1alpha1::ModelFamily;
use pipeline_support::*;

fn trainer(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loraplane-trainer"))
        .arg("--config")
        .arg(config)
        .env_remove("AWS_ACCESS_KEY_ID")
        .output()
        .unwrap()
}

fn write_config(dir: &Path, value: &serde_json::Value, yaml: bool) -> std::path::PathBuf {
    let path = dir.join(if yaml { "trainer.yaml" } else { "trainer.json" });
    let text = if yaml {
        serde_yaml::to_string(value).unwrap()
    } else {
        value.to_string()
    };
    std::fs::write(&path, text).unwrap();
    path
}

fn summary(path: &Path) -> TrainerSummary {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.len() <= 4096);
    serde_json::from_str(&text).unwrap()
}

fn no_secrets(out: &Output) {
    for stream in [&out.stdout, &out.stderr] {
        let s = String::from_utf8_lossy(stream);
        assert!(
            !s.contains(TRIGGER) && !s.contains(CAPTION_WORD),
            "customer text printed:\n{s}"
        );
    }
}

/// The event lines of a run that must have succeeded without printing customer text.
fn succeeded(out: &Output) -> Vec<TrainerEvent> {
    assert_eq!(
        out.status.code(),
        Some(EXIT_OK),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    no_secrets(out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(TrainerEvent::parse_line)
        .collect()
}

#[test]
fn successful_run_prints_progress_and_writes_summary() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Sd15, 5);
    let run = dir.path().join("run");
    let cfg = serde_json::to_value(config(&s, &run, 3, 2)).unwrap();
    let events = succeeded(&trainer(&write_config(dir.path(), &cfg, true)));
    let steps: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            TrainerEvent::Progress {
                step,
                total_steps: 3,
                loss,
                ..
            } if loss.is_finite() => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TrainerEvent::Checkpoint { step: 2, .. }))
    );
    let sum = summary(&run.join("termination-log"));
    assert_eq!(sum.outcome, Outcome::Succeeded);
    assert_eq!(sum.step, 3);
    let formats: Vec<&str> = sum.artifacts.iter().map(|a| a.format.as_str()).collect();
    assert_eq!(formats, ["kohya", "diffusers"]);
    assert!(
        sum.artifacts
            .iter()
            .all(|a| a.bytes > 0 && a.sha256.len() == 64)
    );
}

#[test]
fn bad_config_key_exits_2_with_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Setup {
        model: dir.path().join("m"),
        zip: dir.path().join("d.zip"),
        sha: "0".repeat(64),
        family: ModelFamily::Sd15,
    };
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut cfg = serde_json::to_value(config(&s, &run, 3, 2)).unwrap();
    cfg["training"]["learningRat"] = 0.1.into();
    for yaml in [true, false] {
        let out = trainer(&write_config(dir.path(), &cfg, yaml));
        assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("training.learningRat"), "{err}");
        no_secrets(&out);
        let sum = summary(&run.join("termination-log"));
        assert_eq!(sum.outcome, Outcome::BadInput);
    }
    let mut cfg = serde_json::to_value(config(&s, &run, 3, 2)).unwrap();
    cfg["training"]["resolution"] = 100.into();
    let out = trainer(&write_config(dir.path(), &cfg, true));
    assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT));
    assert!(String::from_utf8_lossy(&out.stderr).contains("training.resolution"));
}

#[test]
fn invalid_dataset_exits_2_and_crash_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), ModelFamily::Sd15);
    let mut entries = dataset_entries(5);
    entries.push(("bad.jpg".into(), b"\xff\xd8\xff\xe0 truncated".to_vec()));
    let (zip, sha) = write_zip(dir.path(), &entries);
    let s = Setup {
        model: model.clone(),
        zip,
        sha,
        family: ModelFamily::Sd15,
    };
    let run = dir.path().join("bad");
    let cfg = serde_json::to_value(config(&s, &run, 2, 1)).unwrap();
    let out = trainer(&write_config(dir.path(), &cfg, false));
    assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT));
    no_secrets(&out);
    let sum = summary(&run.join("termination-log"));
    assert_eq!(sum.outcome, Outcome::BadInput);
    // What reaches the job's status names the entry by number, never the customer's file name.
    let error = sum.error.unwrap();
    let numbered = format!("entry #{}: corrupt image", entries.len());
    assert!(
        error.contains(&numbered) && !error.contains("bad.jpg"),
        "{error}"
    );

    // The checkpoint location is unusable (a path under a regular file): a crash, retried.
    let (zip, sha) = write_zip(dir.path(), &dataset_entries(5));
    let s = Setup {
        model,
        zip,
        sha,
        family: ModelFamily::Sd15,
    };
    let run = dir.path().join("crash");
    let mut cfg = serde_json::to_value(config(&s, &run, 2, 1)).unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    cfg["checkpoints"] = blocker.join("ckpt").display().to_string().into();
    let out = trainer(&write_config(dir.path(), &cfg, false));
    assert_eq!(
        out.status.code(),
        Some(EXIT_CRASH),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum = summary(&run.join("termination-log"));
    assert_eq!(sum.outcome, Outcome::Crashed);
    assert_eq!(sum.step, 1, "the summary says how far the run got");
}

/// A base model that lacks a tensor is bad input (exit 2), reported on one line naming the
/// component and the tensor, even with `RUST_BACKTRACE` set (candle then captures a backtrace
/// into its errors, which must not reach stderr's last line or the job's status).
#[test]
fn a_model_missing_a_tensor_fails_on_one_line_naming_it_even_with_backtraces_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Sd15, 5);
    let missing = "mid_block.attentions.0.proj_in.weight";
    let weights = s.model.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    assert!(tensors.remove(missing).is_some());
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let run = dir.path().join("run");
    let cfg = serde_json::to_value(config(&s, &run, 2, 1)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loraplane-trainer"))
        .arg("--config")
        .arg(write_config(dir.path(), &cfg, false))
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_BAD_INPUT));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("unet") && last.contains(missing),
        "last line of stderr: {last}\n{stderr}"
    );
    assert!(!stderr.contains("backtrace"), "{stderr}");
    let error = summary(&run.join("termination-log")).error.unwrap();
    assert!(!error.contains('\n') && error.contains(missing), "{error}");
}

/// Dataset, base model, checkpoints and outputs all in a real S3 (SeaweedFS on loopback),
/// reached only through presigned URLs (no credential in the trainer's environment); a second
/// run on a fresh work dir resumes from the bucket and produces the same adapters; a grant
/// bent to another object is refused by S3.
#[test]
fn s3_round_trip_and_resume_from_bucket() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sw = rt.block_on(seaweed::SeaweedFs::start()).unwrap();
    rt.block_on(sw.create_bucket("jobs")).unwrap();
    let client = sw.client();
    let put = |key: String, bytes: Vec<u8>| {
        rt.block_on(
            client
                .put_object()
                .bucket("jobs")
                .key(key)
                .body(bytes.into())
                .send(),
        )
        .unwrap();
    };
    let get = |key: &str| -> Vec<u8> {
        rt.block_on(async {
            let o = client
                .get_object()
                .bucket("jobs")
                .key(key)
                .send()
                .await
                .unwrap();
            o.body.collect().await.unwrap().into_bytes().to_vec()
        })
    };

    let presign = |method: &str, key: &str| -> String {
        let conf = aws_sdk_s3::presigning::PresigningConfig::expires_in(
            std::time::Duration::from_secs(600),
        )
        .unwrap();
        rt.block_on(async {
            if method == "PUT" {
                let req = client.put_object().bucket("jobs").key(key);
                req.presigned(conf).await.unwrap().uri().to_string()
            } else {
                let req = client.get_object().bucket("jobs").key(key);
                req.presigned(conf).await.unwrap().uri().to_string()
            }
        })
    };
    let mut grants = serde_json::json!({"get": {}, "put": {}});
    let mut grant = |method: &str, key: &str| {
        let table = if method == "PUT" { "put" } else { "get" };
        grants[table][format!("s3://jobs/{key}")] = presign(method, key).into();
    };

    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), ModelFamily::Sd15);
    for entry in walk(&model) {
        let rel = entry
            .strip_prefix(&model)
            .unwrap()
            .to_string_lossy()
            .to_string();
        put(format!("models/sd15/{rel}"), std::fs::read(&entry).unwrap());
        grant("GET", &format!("models/sd15/{rel}"));
    }
    grant("GET", "in/dataset.zip");
    grant("GET", "ckpt/checkpoint.safetensors");
    grant("PUT", "ckpt/checkpoint.safetensors");
    grant("PUT", "out/job-1.safetensors");
    grant("PUT", "out/pytorch_lora_weights.safetensors");
    let zip = zip_of(&dataset_entries(5));
    let sha = sha256_hex(&zip);
    put("in/dataset.zip".into(), zip);

    let s = Setup {
        model,
        zip: dir.path().join("unused"),
        sha,
        family: ModelFamily::Sd15,
    };
    let mut outputs = Vec::new();
    for attempt in ["first", "second"] {
        let run = dir.path().join(attempt);
        let mut cfg = serde_json::to_value(config(&s, &run, 3, 2)).unwrap();
        cfg["baseModel"]["path"] = "s3://jobs/models/sd15".into();
        cfg["dataset"]["uri"] = "s3://jobs/in/dataset.zip".into();
        cfg["checkpoints"] = "s3://jobs/ckpt/".into();
        cfg["output"] = "s3://jobs/out/".into();
        cfg["grants"] = grants.clone();
        let out = Command::new(env!("CARGO_BIN_EXE_loraplane-trainer"))
            .arg("--config")
            .arg(write_config(dir.path(), &cfg, true))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(EXIT_OK),
            "{attempt}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        no_secrets(&out);
        let events: Vec<TrainerEvent> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(TrainerEvent::parse_line)
            .collect();
        let resumed = events
            .iter()
            .any(|e| matches!(e, TrainerEvent::Resumed { step: 2 }));
        assert_eq!(resumed, attempt == "second", "{attempt}: {events:?}");
        let sum = summary(&run.join("termination-log"));
        assert_eq!(
            sum.artifacts[1].uri,
            "s3://jobs/out/pytorch_lora_weights.safetensors"
        );
        for a in &sum.artifacts {
            let bytes = get(a.uri.strip_prefix("s3://jobs/").unwrap());
            assert_eq!(sha256_hex(&bytes), a.sha256);
            assert_eq!(bytes.len() as u64, a.bytes);
        }
        let peft = get("out/pytorch_lora_weights.safetensors");
        outputs.push(
            loraplane_trainer::tensors::TensorFile::from_bytes("peft", &peft)
                .unwrap()
                .tensors,
        );
    }
    assert!(!get("ckpt/checkpoint.safetensors").is_empty());
    assert_eq!(
        outputs[0], outputs[1],
        "resuming from the bucket changed the result"
    );

    // A compromised config that points the dataset's grant at another customer's object: the
    // signature covers the key, so S3 refuses it, and the trainer says so without the URL.
    put("in/other-customer.zip".into(), b"not yours".to_vec());
    let run = dir.path().join("bent");
    let mut cfg = serde_json::to_value(config(&s, &run, 3, 2)).unwrap();
    cfg["baseModel"]["path"] = "s3://jobs/models/sd15".into();
    cfg["dataset"]["uri"] = "s3://jobs/in/dataset.zip".into();
    cfg["checkpoints"] = "s3://jobs/ckpt-bent/".into();
    cfg["output"] = "s3://jobs/out/".into();
    let mut bent = grants.clone();
    let url = bent["get"]["s3://jobs/in/dataset.zip"].as_str().unwrap();
    let url = url.replace("/in/dataset.zip", "/in/other-customer.zip");
    bent["get"]["s3://jobs/in/dataset.zip"] = url.into();
    bent["put"]["s3://jobs/ckpt-bent/checkpoint.safetensors"] = "http://unused".into();
    cfg["grants"] = bent;
    let out = Command::new(env!("CARGO_BIN_EXE_loraplane-trainer"))
        .arg("--config")
        .arg(write_config(dir.path(), &cfg, true))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(EXIT_OK));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("downloading s3://jobs/in/dataset.zip: 403 Forbidden"),
        "{err}"
    );
    assert!(!err.contains("Signature"), "a presigned URL leaked: {err}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_run_with_samples_writes_the_base_each_set_and_a_contact_sheet() {
    use loraplane_crds::layout::{CONTACT_SHEET_FILE, sample_file};
    let dir = tempfile::tempdir().unwrap();
    let s = setup(dir.path(), ModelFamily::Sd15, 5);
    let run = dir.path().join("run");
    let mut cfg = serde_json::to_value(config(&s, &run, 4, 2)).unwrap();
    // Two prompts built from the trigger word (customer text), a set every 2 steps.
    cfg["samples"] =
        serde_json::json!({"when": "checkpoints", "every": 2, "steps": 4, "guidance": 3.0});
    let sets: Vec<(u64, u32)> = succeeded(&trainer(&write_config(dir.path(), &cfg, false)))
        .into_iter()
        .filter_map(|e| match e {
            TrainerEvent::Samples {
                step,
                images,
                seconds,
            } if seconds > 0.0 => Some((step, images)),
            _ => None,
        })
        .collect();
    assert_eq!(sets, [(0, 2), (2, 2), (4, 2)]);
    let outputs = run.join("out");
    let image = |step, prompt| {
        let path = outputs.join(sample_file(step, prompt));
        image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8()
    };
    for step in [0, 2, 4] {
        for prompt in [0, 1] {
            assert_eq!(
                image(step, prompt).dimensions(),
                (64, 64),
                "training resolution"
            );
        }
    }
    // Before and after: the trained LoRA changes the picture; the two prompts differ.
    assert_ne!(image(0, 0), image(4, 0));
    assert_ne!(image(4, 0), image(4, 1));
    let sheet = image::open(outputs.join(CONTACT_SHEET_FILE)).unwrap();
    let (w, h) = (sheet.width(), sheet.height());
    assert!(w > 2 * 256 && w < 3 * 256, "two columns: {w}");
    assert!(h > 3 * 256 && h < 4 * 256, "three rows: {h}");
}
