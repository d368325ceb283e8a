//! The GPU check's plumbing, on the CPU: `bench/gpu-check.sh --dry-run` runs loraplane's side
//! for real on tiny models and the reference side's input checks (no PyTorch here), so the
//! script a lent GPU machine runs cannot rot between the rare runs that have one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/gpu-check.sh")
}

#[test]
fn the_dry_run_trains_both_tiny_models_and_finds_peft_would_adapt_the_same_modules() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(script())
        .args([
            "--dry-run",
            "--bench-bin",
            env!("CARGO_BIN_EXE_trainer-bench"),
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "gpu-check --dry-run failed:\n{stderr}"
    );
    let text = std::fs::read_to_string(out.path().join("gpu-check.json")).unwrap();
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["dry_run"], true);
    let cases = report["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tiny-sd15-64", "tiny-sdxl-64"]);
    for case in cases {
        assert!(case.get("error").is_none(), "{}", case);
        let ours = &case["loraplane"];
        let steps = case["steps"].as_u64().unwrap() as usize;
        let losses = ours["losses"].as_array().unwrap();
        assert_eq!(losses.len(), steps, "{ours}");
        assert!(
            losses
                .iter()
                .all(|l| l.as_f64().is_some_and(|l| l.is_finite() && l > 0.0)),
            "{ours}"
        );
        assert_eq!(ours["step_seconds"].as_array().unwrap().len(), steps);
        assert!(ours["median_step_seconds"].as_f64().unwrap() > 0.0);
        assert_eq!(ours["dtype"], "f32", "the CPU trains in f32");
        assert_eq!(
            ours["gradient_checkpointing"],
            case["gradient_checkpointing"]
        );
        // The reference read the same files: PEFT's target list selects exactly the modules
        // loraplane adapted, with the same number of trainable parameters.
        let theirs = &case["diffusers"];
        assert!(ours["adapters"].as_u64().unwrap() > 0);
        assert_eq!(theirs["adapters"], ours["adapters"]);
        assert_eq!(theirs["trainable_parameters"], ours["trainable_parameters"]);
        assert!(theirs["unet_parameters"].as_u64().unwrap() > 0);
    }
}

#[test]
fn a_real_run_without_the_carried_files_says_how_to_prepare_them() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(script())
        .arg("--out")
        .arg(out.path())
        .arg(out.path().join("no-carry"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("gpu-check.sh --prepare"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
