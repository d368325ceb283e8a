//! Where inputs come from and outputs go: a local directory or an S3 bucket (`s3://bucket/key`,
//! path-style for SeaweedFS/MinIO endpoints). Credentials come only from the standard
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`) variables the
//! operator sets from a Secret. The trainer is synchronous; S3 calls run on a private
//! single-threaded runtime.

use std::path::{Path, PathBuf};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use loraplane_crds::trainer::S3Endpoint;
use tokio::io::AsyncWriteExt;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The S3 client could not be set up.
    #[error("setting up S3: {0}")]
    SetupS3(String),
    /// A local file operation failed.
    #[error("{action} {path}: {source}")]
    LocalIo {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Reading an object failed.
    #[error("downloading {uri}: {message}")]
    GetObject {
        /// The object.
        uri: String,
        /// Why.
        message: String,
    },
    /// Writing an object failed.
    #[error("uploading {uri}: {message}")]
    PutObject {
        /// The object.
        uri: String,
        /// Why.
        message: String,
    },
    /// Listing a prefix failed.
    #[error("listing {uri}: {message}")]
    ListObjects {
        /// The prefix.
        uri: String,
        /// Why.
        message: String,
    },
    /// The object does not exist.
    #[error("{uri} does not exist")]
    NotFound {
        /// The location.
        uri: String,
    },
}

/// A parsed location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local path.
    Local(PathBuf),
    /// An S3 object or prefix.
    S3 {
        /// Bucket.
        bucket: String,
        /// Key or prefix (no leading `/`).
        key: String,
    },
}

impl Location {
    /// Parses `s3://bucket/key` or a local path.
    pub fn parse(uri: &str) -> Location {
        match uri.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
                Location::S3 {
                    bucket: bucket.to_string(),
                    key: key.trim_start_matches('/').to_string(),
                }
            }
            None => Location::Local(PathBuf::from(uri)),
        }
    }

    /// The location of `name` inside this directory/prefix.
    pub fn join(&self, name: &str) -> Location {
        match self {
            Location::Local(p) => Location::Local(p.join(name)),
            Location::S3 { bucket, key } => {
                let key = if key.is_empty() || key.ends_with('/') {
                    format!("{key}{name}")
                } else {
                    format!("{key}/{name}")
                };
                Location::S3 {
                    bucket: bucket.clone(),
                    key,
                }
            }
        }
    }

    /// The URI form.
    pub fn uri(&self) -> String {
        match self {
            Location::Local(p) => p.display().to_string(),
            Location::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
        }
    }
}

/// Local and S3 access.
pub struct Storage {
    s3: Option<(aws_sdk_s3::Client, tokio::runtime::Runtime)>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("s3", &self.s3.is_some())
            .finish()
    }
}

fn local_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.display().to_string();
    move |source| StorageError::LocalIo {
        action,
        path,
        source,
    }
}

impl Storage {
    /// Storage for local paths and, when `endpoint` is set, S3 with credentials from the
    /// environment.
    pub fn new(endpoint: Option<&S3Endpoint>) -> Result<Storage, StorageError> {
        let Some(ep) = endpoint else {
            return Ok(Storage { s3: None });
        };
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let (Some(key), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(StorageError::SetupS3(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set".into(),
            ));
        };
        let creds = Credentials::new(key, secret, var("AWS_SESSION_TOKEN"), None, "environment");
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&ep.endpoint)
            .region(Region::new(ep.region.clone()))
            .force_path_style(ep.force_path_style)
            .credentials_provider(creds)
            .build();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StorageError::SetupS3(e.to_string()))?;
        Ok(Storage {
            s3: Some((aws_sdk_s3::Client::from_conf(config), rt)),
        })
    }

    fn s3(
        &self,
        uri: &str,
    ) -> Result<&(aws_sdk_s3::Client, tokio::runtime::Runtime), StorageError> {
        self.s3
            .as_ref()
            .ok_or_else(|| StorageError::SetupS3(format!("{uri} needs an S3 endpoint")))
    }

    /// Reads a whole object or file into memory.
    pub fn read(&self, loc: &Location) -> Result<Vec<u8>, StorageError> {
        match loc {
            Location::Local(p) => std::fs::read(p).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    StorageError::NotFound { uri: loc.uri() }
                } else {
                    local_err("reading", p)(e)
                }
            }),
            Location::S3 { bucket, key } => {
                let uri = loc.uri();
                let (client, rt) = self.s3(&uri)?;
                rt.block_on(async {
                    let out = client
                        .get_object()
                        .bucket(bucket)
                        .key(key)
                        .send()
                        .await
                        .map_err(|e| {
                            let e = e.into_service_error();
                            if e.is_no_such_key() {
                                StorageError::NotFound { uri: uri.clone() }
                            } else {
                                StorageError::GetObject {
                                    uri: uri.clone(),
                                    message: e.to_string(),
                                }
                            }
                        })?;
                    let bytes = out
                        .body
                        .collect()
                        .await
                        .map_err(|e| StorageError::GetObject {
                            uri: uri.clone(),
                            message: e.to_string(),
                        })?;
                    Ok(bytes.into_bytes().to_vec())
                })
            }
        }
    }

    /// Copies an object or file to a local file (through a temporary name).
    pub fn download(&self, loc: &Location, dest: &Path) -> Result<(), StorageError> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(local_err("creating", parent))?;
        }
        let tmp = dest.with_extension("download");
        match loc {
            Location::Local(p) => {
                std::fs::copy(p, &tmp).map_err(local_err("copying", p))?;
            }
            Location::S3 { bucket, key } => {
                let uri = loc.uri();
                let (client, rt) = self.s3(&uri)?;
                rt.block_on(async {
                    let get = |message: String| StorageError::GetObject {
                        uri: uri.clone(),
                        message,
                    };
                    let out = client
                        .get_object()
                        .bucket(bucket)
                        .key(key)
                        .send()
                        .await
                        .map_err(|e| get(e.into_service_error().to_string()))?;
                    let mut file = tokio::fs::File::create(&tmp)
                        .await
                        .map_err(local_err("creating", &tmp))?;
                    let mut body = out.body;
                    while let Some(chunk) = body.try_next().await.map_err(|e| get(e.to_string()))? {
                        file.write_all(&chunk)
                            .await
                            .map_err(local_err("writing", &tmp))?;
                    }
                    file.flush().await.map_err(local_err("writing", &tmp))
                })?;
            }
        }
        std::fs::rename(&tmp, dest).map_err(local_err("renaming", &tmp))
    }

    /// Copies a local file to a location.
    pub fn upload(&self, src: &Path, loc: &Location) -> Result<(), StorageError> {
        match loc {
            Location::Local(p) => {
                if p == src {
                    return Ok(());
                }
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(local_err("creating", parent))?;
                }
                let tmp = p.with_extension("upload");
                std::fs::copy(src, &tmp).map_err(local_err("copying", src))?;
                std::fs::rename(&tmp, p).map_err(local_err("renaming", &tmp))
            }
            Location::S3 { bucket, key } => {
                let uri = loc.uri();
                let (client, rt) = self.s3(&uri)?;
                rt.block_on(async {
                    let put = |message: String| StorageError::PutObject {
                        uri: uri.clone(),
                        message,
                    };
                    let body = ByteStream::from_path(src)
                        .await
                        .map_err(|e| put(e.to_string()))?;
                    client
                        .put_object()
                        .bucket(bucket)
                        .key(key)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| put(e.into_service_error().to_string()))?;
                    Ok(())
                })
            }
        }
    }

    /// Names (relative to the prefix, recursively) of the files under a directory/prefix.
    pub fn list(&self, loc: &Location) -> Result<Vec<String>, StorageError> {
        match loc {
            Location::Local(p) => {
                let mut out = Vec::new();
                if p.is_dir() {
                    list_local(p, p, &mut out)?;
                }
                out.sort();
                Ok(out)
            }
            Location::S3 { bucket, key } => {
                let uri = loc.uri();
                let (client, rt) = self.s3(&uri)?;
                let prefix = if key.is_empty() || key.ends_with('/') {
                    key.clone()
                } else {
                    format!("{key}/")
                };
                rt.block_on(async {
                    let mut out = Vec::new();
                    let mut token = None;
                    loop {
                        let page = client
                            .list_objects_v2()
                            .bucket(bucket)
                            .prefix(&prefix)
                            .set_continuation_token(token.take())
                            .send()
                            .await
                            .map_err(|e| StorageError::ListObjects {
                                uri: uri.clone(),
                                message: e.into_service_error().to_string(),
                            })?;
                        for obj in page.contents() {
                            if let Some(k) = obj.key().and_then(|k| k.strip_prefix(&prefix)) {
                                out.push(k.to_string());
                            }
                        }
                        match page.next_continuation_token() {
                            Some(t) if page.is_truncated() == Some(true) => {
                                token = Some(t.to_string())
                            }
                            _ => break,
                        }
                    }
                    out.sort();
                    Ok(out)
                })
            }
        }
    }
}

fn list_local(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), StorageError> {
    for entry in std::fs::read_dir(dir).map_err(local_err("listing", dir))? {
        let entry = entry.map_err(local_err("listing", dir))?;
        let path = entry.path();
        if path.is_dir() {
            list_local(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_join() {
        let l = Location::parse("s3://bkt/jobs/a/");
        assert_eq!(
            l,
            Location::S3 {
                bucket: "bkt".into(),
                key: "jobs/a/".into()
            }
        );
        assert_eq!(
            l.join("x.safetensors").uri(),
            "s3://bkt/jobs/a/x.safetensors"
        );
        assert_eq!(Location::parse("s3://bkt").join("k").uri(), "s3://bkt/k");
        assert_eq!(
            Location::parse("s3://bkt/p").join("k").uri(),
            "s3://bkt/p/k"
        );
        assert_eq!(
            Location::parse("/tmp/x").join("y"),
            Location::Local("/tmp/x/y".into())
        );
    }

    #[test]
    fn local_round_trip_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::new(None).unwrap();
        let src = dir.path().join("a.bin");
        std::fs::write(&src, b"hello").unwrap();
        let dst = Location::Local(dir.path().join("out/sub/a.bin"));
        s.upload(&src, &dst).unwrap();
        assert_eq!(s.read(&dst).unwrap(), b"hello");
        assert_eq!(
            s.list(&Location::Local(dir.path().join("out"))).unwrap(),
            vec!["sub/a.bin"]
        );
        let missing = s
            .read(&Location::Local(dir.path().join("nope")))
            .err()
            .unwrap();
        assert!(matches!(missing, StorageError::NotFound { .. }));
        let got = dir.path().join("dl/a.bin");
        s.download(&dst, &got).unwrap();
        assert_eq!(std::fs::read(got).unwrap(), b"hello");
        let e = s.read(&Location::parse("s3://b/k")).err().unwrap();
        assert!(e.to_string().contains("needs an S3 endpoint"));
    }
}
