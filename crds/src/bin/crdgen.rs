//! Writes the `LoRATrainingJob` CRD generated from the Rust types.
//!
//! `crdgen` prints it to stdout; `crdgen --write` rewrites `crds/loratrainingjob.yaml` (run from
//! the workspace root). A test fails whenever the checked-in file differs from the types.

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
    match std::fs::write(loraplane_crds::CRD_YAML_PATH, yaml) {
        Ok(()) => {
            eprintln!("crdgen: wrote {}", loraplane_crds::CRD_YAML_PATH);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!(
                "crdgen: cannot write {} (run from the workspace root): {err}",
                loraplane_crds::CRD_YAML_PATH
            );
            ExitCode::FAILURE
        }
    }
}
