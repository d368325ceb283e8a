//! The chart rendered by Helm's own Go SDK (helm-python-sdk in `.tools/venv`, installed by
//! `make bootstrap`), the way the chart tests render it: for tests that hold the chart's
//! output against the running product (RBAC contract) or against the values a guide tells
//! platform teams to use (real-cluster values).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Why the chart could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum HelmError {
    /// The venv with helm-python-sdk is missing.
    #[error("{0} is missing: run `make bootstrap` (installs helm-python-sdk into .tools/venv)")]
    MissingPython(String),
    /// Python could not be started.
    #[error("run {python}: {source}")]
    RunPython {
        /// The interpreter.
        python: String,
        /// Why.
        source: std::io::Error,
    },
    /// Helm refused the chart or the values.
    #[error("helm could not render the chart: {0}")]
    Render(String),
    /// The output was not the expected JSON.
    #[error("read the rendered chart: {0}")]
    Parse(#[from] serde_json::Error),
}

const SCRIPT: &str = r#"
import json, sys
import helm_python as helm
import yaml
values = json.loads(sys.argv[2])
with helm.Chart.load(sys.argv[1]) as chart:
    out = chart.render(values, name=sys.argv[3], namespace=sys.argv[4])
docs = [d for text in out.values() for d in yaml.safe_load_all(text) if d]
json.dump(docs, sys.stdout)
"#;

/// Every object `helm template <release> charts/loraplane -n <namespace>` renders with
/// `values` (the chart's values.schema.json applies).
pub fn render(values: &Value, release: &str, namespace: &str) -> Result<Vec<Value>, HelmError> {
    let repo = crate::trainer_bin::workspace_root();
    let python = repo.join(".tools/venv/bin/python");
    if !python.exists() {
        return Err(HelmError::MissingPython(python.display().to_string()));
    }
    let chart: PathBuf = repo.join("charts/loraplane");
    let out = Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&chart)
        .arg(values.to_string())
        .arg(release)
        .arg(namespace)
        .output()
        .map_err(|source| HelmError::RunPython {
            python: python.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(HelmError::Render(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
