//! Where inputs come from and outputs go: a local directory, or an `s3://bucket/key` location
//! reached only through the presigned URL the operator granted for it ([`Grants`]). The pod
//! holds no S3 credential, so an object nobody granted (another job's data, another region)
//! cannot be read or written at all. The trainer is synchronous; transfers run on a private
//! single-threaded runtime and stream, so a checkpoint or dataset never sits in memory twice.
//! Error messages name the `s3://` location, never the URL (its signature is a credential).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use loraplane_crds::trainer::Grants;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

type Body = BoxBody<Bytes, std::io::Error>;
type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The HTTP client could not be set up.
    #[error("setting up HTTPS: {0}")]
    SetupHttp(String),
    /// The config grants no access to the location.
    #[error("{uri} is not granted to this attempt ({method})")]
    NotGranted {
        /// The location.
        uri: String,
        /// `GET` or `PUT`.
        method: &'static str,
    },
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

/// Local and granted S3 access.
pub struct Storage {
    grants: Grants,
    http: Option<(HttpClient, tokio::runtime::Runtime)>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("grants", &self.grants)
            .finish_non_exhaustive()
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

/// Whether a local read failed because nothing is there (a path through a file included).
fn missing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// What a refused transfer says: the status, and for 403 the likely cause.
fn refusal(status: StatusCode, grants: &Grants) -> String {
    match (status, &grants.expires_at) {
        (StatusCode::FORBIDDEN, Some(at)) => {
            format!("{status} (the grant does not cover it, or expired at {at})")
        }
        _ => status.to_string(),
    }
}

impl Storage {
    /// Storage for local paths and the granted `s3://` objects.
    pub fn new(grants: &Grants) -> Result<Storage, StorageError> {
        if grants.is_empty() {
            return Ok(Storage {
                grants: Grants::default(),
                http: None,
            });
        }
        // Pick ring explicitly: a build that also links aws-lc-rs has no default provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| StorageError::SetupHttp(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StorageError::SetupHttp(e.to_string()))?;
        let client = Client::builder(TokioExecutor::new()).build(https);
        Ok(Storage {
            grants: grants.clone(),
            http: Some((client, rt)),
        })
    }

    /// The URL granting `method` on `uri`, and the client to use it with.
    fn granted(
        &self,
        uri: &str,
        method: &'static str,
    ) -> Result<(&str, &(HttpClient, tokio::runtime::Runtime)), StorageError> {
        let table = if method == "PUT" {
            &self.grants.put
        } else {
            &self.grants.get
        };
        let not_granted = || StorageError::NotGranted {
            uri: uri.to_string(),
            method,
        };
        let url = table.get(uri).ok_or_else(not_granted)?;
        let http = self.http.as_ref().ok_or_else(not_granted)?;
        Ok((url, http))
    }

    /// Sends a GET for a granted object; `NotFound` for 404, an error for any other refusal.
    async fn get(
        &self,
        client: &HttpClient,
        url: &str,
        uri: &str,
    ) -> Result<hyper::body::Incoming, StorageError> {
        let get = |message: String| StorageError::GetObject {
            uri: uri.to_string(),
            message,
        };
        let req = Request::builder()
            .method(Method::GET)
            .uri(url)
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .map_err(|e| get(e.to_string()))?;
        let resp = client.request(req).await.map_err(|e| get(e.to_string()))?;
        match resp.status() {
            s if s.is_success() => Ok(resp.into_body()),
            StatusCode::NOT_FOUND => Err(StorageError::NotFound {
                uri: uri.to_string(),
            }),
            s => Err(get(refusal(s, &self.grants))),
        }
    }

    /// Reads a whole object or file into memory.
    pub fn read(&self, loc: &Location) -> Result<Vec<u8>, StorageError> {
        match loc {
            Location::Local(p) => std::fs::read(p).map_err(|e| {
                if missing(&e) {
                    StorageError::NotFound { uri: loc.uri() }
                } else {
                    local_err("reading", p)(e)
                }
            }),
            Location::S3 { .. } => {
                let uri = loc.uri();
                let (url, (client, rt)) = self.granted(&uri, "GET")?;
                rt.block_on(async {
                    let body = self.get(client, url, &uri).await?;
                    let bytes = body.collect().await.map_err(|e| StorageError::GetObject {
                        uri: uri.clone(),
                        message: e.to_string(),
                    })?;
                    Ok(bytes.to_bytes().to_vec())
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
                std::fs::copy(p, &tmp).map_err(|e| {
                    if missing(&e) {
                        StorageError::NotFound { uri: loc.uri() }
                    } else {
                        local_err("copying", p)(e)
                    }
                })?;
            }
            Location::S3 { .. } => {
                let uri = loc.uri();
                let (url, (client, rt)) = self.granted(&uri, "GET")?;
                rt.block_on(async {
                    let get = |message: String| StorageError::GetObject {
                        uri: uri.clone(),
                        message,
                    };
                    let mut body = self.get(client, url, &uri).await?;
                    let mut file = tokio::fs::File::create(&tmp)
                        .await
                        .map_err(local_err("creating", &tmp))?;
                    while let Some(frame) = body.frame().await {
                        let frame = frame.map_err(|e| get(e.to_string()))?;
                        if let Ok(chunk) = frame.into_data() {
                            file.write_all(&chunk)
                                .await
                                .map_err(local_err("writing", &tmp))?;
                        }
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
            Location::S3 { .. } => {
                let uri = loc.uri();
                let (url, (client, rt)) = self.granted(&uri, "PUT")?;
                rt.block_on(async {
                    let put = |message: String| StorageError::PutObject {
                        uri: uri.clone(),
                        message,
                    };
                    let file = tokio::fs::File::open(src)
                        .await
                        .map_err(local_err("opening", src))?;
                    let len = file
                        .metadata()
                        .await
                        .map_err(local_err("reading", src))?
                        .len();
                    // S3 wants the length up front (no chunked uploads to a presigned PUT).
                    let stream = frames(file);
                    let req = Request::builder()
                        .method(Method::PUT)
                        .uri(url)
                        .header(hyper::header::CONTENT_LENGTH, len)
                        .body(BodyExt::boxed(StreamBody::new(stream)))
                        .map_err(|e| put(e.to_string()))?;
                    let resp = client.request(req).await.map_err(|e| put(e.to_string()))?;
                    if !resp.status().is_success() {
                        return Err(put(refusal(resp.status(), &self.grants)));
                    }
                    Ok(())
                })
            }
        }
    }

    /// Names (relative to the prefix, recursively) of the files under a directory, or of the
    /// granted objects under an `s3://` prefix (granted to read; whether each exists shows
    /// when it is read).
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
                let prefix = if key.is_empty() || key.ends_with('/') {
                    key.clone()
                } else {
                    format!("{key}/")
                };
                let base = format!("s3://{bucket}/{prefix}");
                // BTreeMap keys come sorted.
                Ok(self
                    .grants
                    .get
                    .keys()
                    .filter_map(|k| k.strip_prefix(&base))
                    .filter(|rest| !rest.is_empty())
                    .map(str::to_string)
                    .collect())
            }
        }
    }
}

/// A file's chunks as body frames.
fn frames(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    use futures::StreamExt;
    ReaderStream::new(file).map(|chunk| chunk.map(Frame::data))
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
        let s = Storage::new(&Grants::default()).unwrap();
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
        assert_eq!(
            e.to_string(),
            "s3://b/k is not granted to this attempt (GET)"
        );
    }
}
