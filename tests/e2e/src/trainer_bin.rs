//! Finds the real `loraplane-trainer` binary the simulated kubelets run for the trainer image.
//!
//! Tests run under `cargo nextest`, where `CARGO_BIN_EXE_*` exists only for the test's own
//! package. `make test` names the binary its workspace build produced in `LORAPLANE_TRAINER_BIN`
//! (as does the demo script), and that is the normal path. Without it the harness asks cargo:
//! `cargo build -p loraplane-trainer --bin loraplane-trainer --message-format=json` and takes the
//! path cargo reports. That works whatever `CARGO_TARGET_DIR` is, but a `-p` build resolves other
//! features than a workspace build, so on a cold target dir it compiles much of the dependency tree
//! again (minutes on two cores) — fine for a developer running one test, too slow inside a CI run.
//! A missing or unbuildable binary is an error, never a skip.

use std::path::{Path, PathBuf};

/// The environment variable naming a prebuilt trainer binary.
pub const TRAINER_BIN_ENV: &str = "LORAPLANE_TRAINER_BIN";

/// Why the trainer binary could not be found.
#[derive(Debug, thiserror::Error)]
pub enum TrainerBinError {
    /// The binary named by the environment does not exist.
    #[error(
        "{TRAINER_BIN_ENV}={0} is not an executable file; unset it to let the harness build the trainer"
    )]
    MissingPrebuilt(String),
    /// cargo could not be run.
    #[error(
        "run `{cargo} build -p loraplane-trainer`: {source} (is the Rust toolchain installed and on PATH?)"
    )]
    RunCargo {
        /// The cargo binary tried.
        cargo: String,
        /// Why.
        source: std::io::Error,
    },
    /// The build failed.
    #[error(
        "`cargo build -p loraplane-trainer --bin loraplane-trainer` failed ({status}):\n{stderr}"
    )]
    Build {
        /// Exit status.
        status: String,
        /// The tail of cargo's stderr.
        stderr: String,
    },
    /// cargo did not report the executable.
    #[error("cargo built loraplane-trainer but reported no executable path")]
    NoExecutable,
}

/// The workspace root (this crate is `tests/e2e`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The executable path of `loraplane-trainer` in cargo's JSON messages.
pub fn executable_from_messages(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact" && m["target"]["name"] == "loraplane-trainer"
        })
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
}

/// The trainer binary: `LORAPLANE_TRAINER_BIN`, else built (or found fresh) by cargo.
pub async fn trainer_binary() -> Result<PathBuf, TrainerBinError> {
    if let Some(p) = std::env::var_os(TRAINER_BIN_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(TrainerBinError::MissingPrebuilt(path.display().to_string()))
        };
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!(
        "e2e: locating the trainer: {cargo} build -p loraplane-trainer --bin loraplane-trainer (set {TRAINER_BIN_ENV} to skip)"
    );
    let out = tokio::process::Command::new(&cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "-p",
            "loraplane-trainer",
            "--bin",
            "loraplane-trainer",
            "--message-format=json-render-diagnostics",
        ])
        .output()
        .await
        .map_err(|source| TrainerBinError::RunCargo {
            cargo: cargo.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        return Err(TrainerBinError::Build {
            status: out.status.to_string(),
            stderr: lines[lines.len().saturating_sub(40)..].join("\n"),
        });
    }
    let exe = executable_from_messages(&String::from_utf8_lossy(&out.stdout))
        .ok_or(TrainerBinError::NoExecutable)?;
    if is_executable(&exe) {
        Ok(exe)
    } else {
        Err(TrainerBinError::NoExecutable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executable_is_read_from_cargos_messages() {
        let msgs = r#"{"reason":"compiler-artifact","target":{"name":"loraplane_crds"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"loraplane-trainer"},"executable":"/t/debug/loraplane-trainer"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(msgs),
            Some(PathBuf::from("/t/debug/loraplane-trainer"))
        );
        assert_eq!(
            executable_from_messages("{\"reason\":\"build-finished\"}"),
            None
        );
    }
}
