//! Writes the `LoRATrainingJob` CRD generated from the Rust types.
//!
//! `crdgen` prints it to stdout; `crdgen --write` rewrites `crds/loratrainingjob.yaml` and the
//! chart's copy (run from the workspace root). A test fails whenever a checked-in file differs
//! from the types.

use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match loraplane_crds::crd_yaml() {
        Ok(yaml) => yaml,
        Err(err) => {
            eprintln!("crdgen: {err}");
            return ExitCode::FAILURE;
        }
    };
    let write = std::env::args().skip(1).any(|a| a == "--write");
    if !write {
        print!("{yaml}");
        return ExitCode::SUCCESS;
    }
    for path in [
        loraplane_crds::CRD_YAML_PATH,
        loraplane_crds::CHART_CRD_YAML_PATH,
    ] {
        if let Err(err) = std::fs::write(path, &yaml) {
            eprintln!("crdgen: cannot write {path} (run from the workspace root): {err}");
            return ExitCode::FAILURE;
        }
        eprintln!("crdgen: wrote {path}");
    }
    ExitCode::SUCCESS
}
