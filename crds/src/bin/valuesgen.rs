//! Writes the Helm chart's `values.schema.json` generated from the Rust types of its values
//! (`loraplane_crds::chart_values`).
//!
//! `valuesgen` prints it to stdout; `valuesgen --write` rewrites
//! `charts/loraplane/values.schema.json` (run from the workspace root). A test fails whenever
//! the checked-in file differs from the types.

use std::process::ExitCode;

fn main() -> ExitCode {
    let json = match loraplane_crds::values_schema_json() {
        Ok(json) => json,
        Err(err) => {
            eprintln!("valuesgen: {err}");
            return ExitCode::FAILURE;
        }
    };
    let write = std::env::args().skip(1).any(|a| a == "--write");
    if !write {
        print!("{json}");
        return ExitCode::SUCCESS;
    }
    let path = loraplane_crds::VALUES_SCHEMA_PATH;
    if let Err(err) = std::fs::write(path, &json) {
        eprintln!("valuesgen: cannot write {path} (run from the workspace root): {err}");
        return ExitCode::FAILURE;
    }
    eprintln!("valuesgen: wrote {path}");
    ExitCode::SUCCESS
}
