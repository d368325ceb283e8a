//! What the crds tests share: where the workspace's checked-in files are.

use std::path::{Path, PathBuf};

/// The workspace root (the crate lives in `crds/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}
