//! Operator start-up configuration: the command-line flags and the platform configuration file
//! they point at. Everything here is read once; a bad file stops the operator before it touches
//! the cluster, with a message naming the offending field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use loraplane_crds::platform::{ConfigError, PlatformConfig};
use loraplane_runtime::logging::LogFormat;

/// Command-line flags of `loraplane-operator`.
#[derive(Debug, Clone, Parser)]
#[command(name = "loraplane-operator", version, about)]
pub struct Args {
    /// The platform configuration file (regions, pools, families, defaults).
    #[arg(
        long,
        env = "LORAPLANE_CONFIG",
        default_value = "/etc/loraplane/platform.yaml"
    )]
    pub config: PathBuf,

    /// Only watch jobs in this namespace; watches every namespace when absent.
    #[arg(long, env = "WATCH_NAMESPACE", conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,

    /// Watch every namespace (the default; the flag exists to make it explicit).
    #[arg(long)]
    pub all_namespaces: bool,

    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoints.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "loraplane-system")]
    pub leader_election_namespace: String,

    /// This replica's identity in the Lease (defaults to the pod name, then the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Seconds between reads of a running trainer's progress.
    #[arg(long, default_value_t = 10)]
    pub progress_interval_seconds: u64,

    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    pub log_format: LogFormat,

    /// Days an audit record of a deleted job is kept (records live in the operator's own
    /// namespace, `--leader-election-namespace`).
    #[arg(long, env = "AUDIT_RETENTION_DAYS", default_value_t = 3 * 365)]
    pub audit_retention_days: u64,
}

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The config file could not be read.
    #[error("could not read the platform config {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is invalid.
    #[error("{path}: {source}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        source: ConfigError,
    },
}

/// Reads and validates the platform configuration.
pub fn load_platform_config(path: &Path) -> Result<PlatformConfig, StartupError> {
    let text = std::fs::read_to_string(path).map_err(|source| StartupError::ReadConfig {
        path: path.to_path_buf(),
        source,
    })?;
    PlatformConfig::from_yaml(&text).map_err(|source| StartupError::ParseConfig {
        path: path.to_path_buf(),
        source,
    })
}

/// The settings the controller runs with, independent of how they were given.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The platform configuration.
    pub platform: PlatformConfig,
    /// Namespace to watch; `None` for all.
    pub namespace: Option<String>,
    /// Namespace of the leader-election Lease.
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity.
    pub identity: String,
    /// How long a Lease is valid without renewal.
    pub lease_duration: Duration,
    /// How often a running job's progress is read.
    pub progress_interval: Duration,
    /// Requeue delay after a failed reconcile.
    pub error_requeue: Duration,
    /// The controller's field manager for server-side apply.
    pub field_manager: String,
    /// How long a stopping replica waits for reconciles in flight before it abandons them.
    pub shutdown_grace: Duration,
    /// Where audit records of deleted jobs are written (the operator's namespace).
    pub audit_namespace: String,
    /// How long an audit record is kept.
    pub audit_keep: Duration,
    /// How often expired audit records are looked for.
    pub audit_sweep: Duration,
    /// How often unordered uploads past their TTL are looked for.
    pub upload_sweep: Duration,
}

impl Settings {
    /// Settings from the flags and an already-loaded platform configuration.
    pub fn from_args(args: &Args, platform: PlatformConfig) -> Settings {
        let identity = args
            .identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("loraplane-operator-{}", std::process::id()));
        Settings {
            platform,
            namespace: args.namespace.clone(),
            lease_namespace: args.leader_election_namespace.clone(),
            lease_name: "loraplane-operator".to_string(),
            identity,
            lease_duration: Duration::from_secs(15),
            progress_interval: Duration::from_secs(args.progress_interval_seconds.max(1)),
            error_requeue: Duration::from_secs(5),
            field_manager: FIELD_MANAGER.to_string(),
            // Inside the chart's terminationGracePeriodSeconds (30), so the Lease is still
            // released before the kubelet kills the container.
            shutdown_grace: Duration::from_secs(20),
            audit_namespace: args.leader_election_namespace.clone(),
            audit_keep: Duration::from_secs(args.audit_retention_days.saturating_mul(86_400)),
            audit_sweep: Duration::from_secs(3600),
            upload_sweep: Duration::from_secs(600),
        }
    }

    /// Settings suited to tests: fast progress reads and retries.
    pub fn for_tests(platform: PlatformConfig, lease_namespace: &str, identity: &str) -> Settings {
        Settings {
            platform,
            namespace: None,
            lease_namespace: lease_namespace.to_string(),
            lease_name: "loraplane-operator".to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(3),
            progress_interval: Duration::from_millis(300),
            error_requeue: Duration::from_millis(200),
            field_manager: FIELD_MANAGER.to_string(),
            shutdown_grace: Duration::from_secs(5),
            audit_namespace: lease_namespace.to_string(),
            audit_keep: Duration::from_secs(3 * 365 * 86_400),
            audit_sweep: Duration::from_secs(3600),
            upload_sweep: Duration::from_secs(3600),
        }
    }
}

/// The stable server-side-apply field manager of the operator.
pub const FIELD_MANAGER: &str = "loraplane-operator";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let args = Args::try_parse_from(["loraplane-operator", "--namespace", "jobs"]).unwrap();
        assert_eq!(args.namespace.as_deref(), Some("jobs"));
        assert_eq!(args.metrics_addr.port(), 8080);
        assert_eq!(args.log_format, LogFormat::Text);
        let err = Args::try_parse_from([
            "loraplane-operator",
            "--namespace",
            "jobs",
            "--all-namespaces",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot be used with"), "{err}");
    }

    #[test]
    fn a_bad_config_file_names_the_file_and_the_field() {
        let dir = std::env::temp_dir().join(format!("lp-op-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("platform.yaml");
        std::fs::write(&path, "regions: []\npools: []\nfamilies: []\n").unwrap();
        let err = load_platform_config(&path).unwrap_err().to_string();
        assert!(err.contains("platform.yaml"), "{err}");
        assert!(
            err.contains("regions: at least one region is required"),
            "{err}"
        );
        let missing = load_platform_config(&dir.join("absent.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("could not read the platform config"),
            "{missing}"
        );
    }
}
