//! S3, the I/O part: one client per region (each region has its own endpoint and buckets),
//! presigned URLs, fetching an upload for validation, listing and copying objects, and deleting
//! every object under a prefix (old versions too, where a bucket keeps them).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::presigning::PresigningConfig;
use loraplane_crds::platform::{Buckets, PlatformConfig};

/// Static S3 credentials of a service (the operator's or the API's).
#[derive(Clone)]
pub struct S3Credentials {
    /// Access key id.
    pub access_key: String,
    /// Secret key.
    pub secret_key: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials").finish_non_exhaustive()
    }
}

/// Why an S3 operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The region is not configured.
    #[error("region {0:?} is not configured")]
    UnknownRegion(String),
    /// Presigning failed.
    #[error("presign {0}: {1}")]
    Presign(&'static str, String),
    /// The object was replaced between two range reads.
    #[error("the object changed while it was being read")]
    Changed,
    /// Reading an object failed.
    #[error("get object: {0}")]
    GetObject(String),
    /// Listing objects failed.
    #[error("list objects: {0}")]
    ListObjects(String),
    /// Deleting an object failed.
    #[error("delete object: {0}")]
    DeleteObject(String),
    /// Reading an object's tags failed.
    #[error("get object tagging: {0}")]
    GetTagging(String),
    /// Writing an object's tags failed.
    #[error("put object tagging: {0}")]
    PutTagging(String),
    /// Listing object versions failed.
    #[error("list object versions: {0}")]
    ListVersions(String),
    /// Copying an object failed.
    #[error("copy object: {0}")]
    CopyObject(String),
    /// Writing an object failed.
    #[error("put object: {0}")]
    PutObject(String),
    /// A URI is not `s3://bucket/key`.
    #[error("not an s3:// URI")]
    BadUri,
}

/// The object tag that records a dataset's validation (see [`Storage::validation_marker`]).
pub const VALIDATED_TAG: &str = "loraplane-validated";

/// What an upload object's tags say about its validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// The object does not exist.
    Missing,
    /// The object exists and was never validated (or was replaced since).
    Unmarked,
    /// The object carries a validation marker with this value.
    Marked(String),
}

fn err_text<E: std::error::Error + 'static>(e: &E) -> String {
    format!("{}", aws_sdk_s3::error::DisplayErrorContext(e))
}

/// A region's client and buckets.
#[derive(Debug, Clone)]
pub struct RegionStore {
    /// The client.
    pub client: aws_sdk_s3::Client,
    /// The endpoint the client talks to (two regions may share one).
    pub endpoint: String,
    /// The buckets.
    pub buckets: Buckets,
}

/// S3 access for every configured region.
#[derive(Debug, Clone)]
pub struct Storage {
    regions: HashMap<String, RegionStore>,
}

/// An object's size and version, as [`Object::stat`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStat {
    /// Length in bytes.
    pub size: u64,
    /// The ETag range reads must match.
    pub etag: String,
}

/// One object, read in byte ranges: how the API checks a 512 MiB dataset without holding it.
#[derive(Clone)]
pub struct Object {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
}

impl Object {
    /// Its size and ETag, or `None` when it does not exist.
    pub async fn stat(&self) -> Result<Option<ObjectStat>, StorageError> {
        head(&self.client, &self.bucket, &self.key).await
    }

    /// Bytes `start..start + len`, provided the object still has `etag`: a replaced object is
    /// an error ([`StorageError::Changed`]), never a mix of two versions.
    pub async fn read_range(
        &self,
        etag: &str,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .if_match(etag)
            .range(format!("bytes={start}-{}", start + len - 1))
            .send()
            .await
            .map_err(|e| {
                if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) {
                    StorageError::Changed
                } else {
                    StorageError::GetObject(err_text(&e))
                }
            })?;
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| StorageError::GetObject(e.to_string()))?
            .into_bytes();
        Ok(bytes.to_vec())
    }
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// What a prefix deletion removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Objects deleted.
    pub objects: u64,
    /// Bytes deleted.
    pub bytes: u64,
}

impl std::ops::AddAssign for Deleted {
    fn add_assign(&mut self, o: Deleted) {
        self.objects += o.objects;
        self.bytes += o.bytes;
    }
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, Unix seconds.
    pub modified: i64,
}

/// An object's size and ETag, or `None` when it does not exist.
async fn head(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<Option<ObjectStat>, StorageError> {
    match client.head_object().bucket(bucket).key(key).send().await {
        Ok(h) => Ok(Some(ObjectStat {
            size: h.content_length().unwrap_or(0).max(0) as u64,
            etag: h.e_tag().unwrap_or_default().to_string(),
        })),
        Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
        Err(e) => Err(StorageError::GetObject(err_text(&e))),
    }
}

/// The size of an object, or `None` when it does not exist.
async fn object_size(
    store: &RegionStore,
    bucket: &str,
    key: &str,
) -> Result<Option<u64>, StorageError> {
    Ok(head(&store.client, bucket, key).await?.map(|o| o.size))
}

/// Splits `s3://bucket/key` into bucket and key.
pub fn parse_uri(uri: &str) -> Result<(&str, &str), StorageError> {
    uri.strip_prefix("s3://")
        .and_then(|r| r.split_once('/'))
        .filter(|(b, _)| !b.is_empty())
        .ok_or(StorageError::BadUri)
}

impl Storage {
    /// Builds a client per region of the platform.
    pub fn new(platform: &PlatformConfig, creds: &S3Credentials) -> Storage {
        let mut regions = HashMap::new();
        for r in &platform.regions {
            let conf = aws_sdk_s3::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .endpoint_url(&r.s3.endpoint)
                .region(Region::new(r.s3.region.clone()))
                .credentials_provider(Credentials::new(
                    creds.access_key.clone(),
                    creds.secret_key.clone(),
                    None,
                    None,
                    "loraplane",
                ))
                .force_path_style(r.s3.force_path_style)
                // Presigned PUTs must be usable by any HTTP client, which will not add
                // flexible-checksum headers.
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .build();
            regions.insert(
                r.name.clone(),
                RegionStore {
                    client: aws_sdk_s3::Client::from_conf(conf),
                    endpoint: r.s3.endpoint.clone(),
                    buckets: r.buckets.clone(),
                },
            );
        }
        Storage { regions }
    }

    /// The store of a region.
    pub fn region(&self, name: &str) -> Result<&RegionStore, StorageError> {
        self.regions
            .get(name)
            .ok_or_else(|| StorageError::UnknownRegion(name.to_string()))
    }

    /// Every region's store.
    pub fn all(&self) -> impl Iterator<Item = (&String, &RegionStore)> {
        self.regions.iter()
    }

    /// The region whose buckets include `bucket`.
    pub fn region_of_bucket(&self, bucket: &str) -> Option<&RegionStore> {
        self.regions.values().find(|r| {
            r.buckets.datasets == bucket
                || r.buckets.checkpoints == bucket
                || r.buckets.outputs == bucket
                || r.buckets.corpus.as_deref() == Some(bucket)
        })
    }

    /// Whether `uri` lies under a job's `prefix` (`layout::job_prefix`) in some region's
    /// outputs bucket: the only files the API presigns for a job and the corpus copies, so a
    /// status naming another job's file (a trainer's lie) reaches nobody.
    pub fn is_job_output(&self, uri: &str, prefix: &str) -> bool {
        parse_uri(uri).is_ok_and(|(bucket, key)| {
            key.starts_with(prefix)
                && self
                    .region_of_bucket(bucket)
                    .is_some_and(|r| r.buckets.outputs == bucket)
        })
    }

    /// Whether `bucket` is some region's dataset bucket.
    pub fn is_dataset_bucket(&self, bucket: &str) -> bool {
        self.regions.values().any(|r| r.buckets.datasets == bucket)
    }

    /// A presigned PUT URL for an object in any configured bucket.
    pub async fn presign_put(
        &self,
        bucket: &str,
        key: &str,
        expires: Duration,
    ) -> Result<String, StorageError> {
        let conf = PresigningConfig::expires_in(expires)
            .map_err(|e| StorageError::Presign("put", e.to_string()))?;
        let req = self
            .store_of(bucket)?
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .presigned(conf)
            .await
            .map_err(|e| StorageError::Presign("put", err_text(&e)))?;
        Ok(req.uri().to_string())
    }

    /// A presigned GET URL for an object in any configured bucket.
    pub async fn presign_get(
        &self,
        bucket: &str,
        key: &str,
        expires: Duration,
    ) -> Result<String, StorageError> {
        let store = self.store_of(bucket)?;
        let conf = PresigningConfig::expires_in(expires)
            .map_err(|e| StorageError::Presign("get", e.to_string()))?;
        let req = store
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .presigned(conf)
            .await
            .map_err(|e| StorageError::Presign("get", err_text(&e)))?;
        Ok(req.uri().to_string())
    }

    /// One object of a region, to be read in byte ranges (from any thread: the handle owns
    /// its client).
    pub fn object(&self, region: &str, bucket: &str, key: &str) -> Result<Object, StorageError> {
        Ok(Object {
            client: self.region(region)?.client.clone(),
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The validation marker of an object: one small request that neither downloads the object
    /// nor inflates it. S3 drops an object's tags when the object is overwritten, so a marker
    /// always describes the bytes currently stored.
    pub async fn validation_marker(
        &self,
        region: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Marker, StorageError> {
        let client = &self.region(region)?.client;
        match client
            .get_object_tagging()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .tag_set()
                .iter()
                .find(|t| t.key() == VALIDATED_TAG)
                .map_or(Marker::Unmarked, |t| Marker::Marked(t.value().to_string()))),
            Err(e) => {
                if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) {
                    return Ok(Marker::Missing);
                }
                Err(StorageError::GetTagging(err_text(&e)))
            }
        }
    }

    /// Records a validation marker on an object (replacing its tags: uploads carry no others).
    pub async fn set_validation_marker(
        &self,
        region: &str,
        bucket: &str,
        key: &str,
        value: &str,
    ) -> Result<(), StorageError> {
        let client = &self.region(region)?.client;
        let tag = aws_sdk_s3::types::Tag::builder()
            .key(VALIDATED_TAG)
            .value(value)
            .build()
            .map_err(|e| StorageError::PutTagging(e.to_string()))?;
        let tagging = aws_sdk_s3::types::Tagging::builder()
            .tag_set(tag)
            .build()
            .map_err(|e| StorageError::PutTagging(e.to_string()))?;
        client
            .put_object_tagging()
            .bucket(bucket)
            .key(key)
            .tagging(tagging)
            .send()
            .await
            .map_err(|e| StorageError::PutTagging(err_text(&e)))?;
        Ok(())
    }

    /// Deletes one object (of whichever region owns the bucket); a missing object is no error.
    pub async fn delete_object(&self, bucket: &str, key: &str) -> Result<Deleted, StorageError> {
        let store = self.store_of(bucket)?;
        let Some(size) = object_size(store, bucket, key).await? else {
            return Ok(Deleted::default());
        };
        self.delete_record(bucket, key).await?;
        Ok(Deleted {
            objects: 1,
            bytes: size,
        })
    }

    /// Every object under `prefix` in `bucket` (of whichever region owns the bucket); a missing
    /// bucket holds nothing.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        let store = self.store_of(bucket)?;
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = match store
                .client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token.clone())
                .send()
                .await
            {
                Ok(p) => p,
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_bucket()) => {
                    return Ok(out);
                }
                Err(e) => return Err(StorageError::ListObjects(err_text(&e))),
            };
            out.extend(page.contents().iter().filter_map(|o| {
                Some(Listed {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified: o.last_modified().map_or(0, |t| t.secs()),
                })
            }));
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() || page.is_truncated() != Some(true) {
                return Ok(out);
            }
        }
    }

    /// Copies one object to another bucket of any region: a server-side copy when both lie
    /// behind the same endpoint, else a streamed GET and PUT. Returns the bytes copied, or
    /// `None` when the source does not exist.
    pub async fn copy_object(
        &self,
        (from_bucket, from_key): (&str, &str),
        (to_bucket, to_key): (&str, &str),
    ) -> Result<Option<u64>, StorageError> {
        let from = self.store_of(from_bucket)?;
        let to = self.store_of(to_bucket)?;
        let Some(size) = object_size(from, from_bucket, from_key).await? else {
            return Ok(None);
        };
        if from.endpoint == to.endpoint {
            to.client
                .copy_object()
                .copy_source(format!("{from_bucket}/{from_key}"))
                .bucket(to_bucket)
                .key(to_key)
                .send()
                .await
                .map_err(|e| StorageError::CopyObject(err_text(&e)))?;
            return Ok(Some(size));
        }
        let body = from
            .client
            .get_object()
            .bucket(from_bucket)
            .key(from_key)
            .send()
            .await
            .map_err(|e| StorageError::GetObject(err_text(&e)))?;
        to.client
            .put_object()
            .bucket(to_bucket)
            .key(to_key)
            .content_length(body.content_length().unwrap_or(0))
            .body(body.body)
            .send()
            .await
            .map_err(|e| StorageError::PutObject(err_text(&e)))?;
        Ok(Some(size))
    }

    /// Writes a small object (a record, not a dataset) to whichever region owns the bucket.
    pub async fn put_record(
        &self,
        bucket: &str,
        key: &str,
        bytes: Vec<u8>,
    ) -> Result<(), StorageError> {
        self.store_of(bucket)?
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("application/json")
            .body(bytes.into())
            .send()
            .await
            .map_err(|e| StorageError::PutObject(err_text(&e)))?;
        Ok(())
    }

    /// Reads a small object written by [`Storage::put_record`]; `None` when it does not exist.
    pub async fn get_record(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let out = match self
            .store_of(bucket)?
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                return Ok(None);
            }
            Err(e) => return Err(StorageError::GetObject(err_text(&e))),
        };
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| StorageError::GetObject(e.to_string()))?
            .into_bytes();
        Ok(Some(bytes.to_vec()))
    }

    /// Deletes a small object written by [`Storage::put_record`] in one request (S3 answers a
    /// missing key as deleted); unlike [`Storage::delete_object`] it does not learn the size.
    pub async fn delete_record(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
        self.store_of(bucket)?
            .client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| StorageError::DeleteObject(err_text(&e)))?;
        Ok(())
    }

    fn store_of(&self, bucket: &str) -> Result<&RegionStore, StorageError> {
        self.region_of_bucket(bucket)
            .ok_or_else(|| StorageError::UnknownRegion(bucket.to_string()))
    }

    /// Deletes every object under `prefix` in `bucket` (of whichever region owns the bucket),
    /// then every older version and delete marker left under it, so a bucket with versioning
    /// enabled keeps nothing either.
    pub async fn delete_prefix(&self, bucket: &str, prefix: &str) -> Result<Deleted, StorageError> {
        let store = self.store_of(bucket)?;
        let mut deleted = Deleted::default();
        for obj in self.list(bucket, prefix).await? {
            store
                .client
                .delete_object()
                .bucket(bucket)
                .key(&obj.key)
                .send()
                .await
                .map_err(|e| StorageError::DeleteObject(err_text(&e)))?;
            deleted.objects += 1;
            deleted.bytes += obj.size;
        }
        deleted += self.delete_versions(store, bucket, prefix).await?;
        Ok(deleted)
    }

    /// Deletes the noncurrent versions and delete markers under `prefix`. In a bucket without
    /// versioning nothing is left by then, and the listing comes back empty.
    async fn delete_versions(
        &self,
        store: &RegionStore,
        bucket: &str,
        prefix: &str,
    ) -> Result<Deleted, StorageError> {
        let mut deleted = Deleted::default();
        // Each round deletes what one page listed and lists again from the start, so no
        // marker is needed across rounds; a round that lists nothing ends it, and one that
        // lists only what was deleted already means the store ignores version deletes.
        let mut gone = std::collections::HashSet::new();
        loop {
            let page = match store
                .client
                .list_object_versions()
                .bucket(bucket)
                .prefix(prefix)
                .send()
                .await
            {
                Ok(p) => p,
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                    return Ok(deleted);
                }
                Err(e) => return Err(StorageError::ListVersions(err_text(&e))),
            };
            let versions = page
                .versions()
                .iter()
                .map(|v| (v.key(), v.version_id(), v.size().unwrap_or(0).max(0) as u64));
            let markers = page
                .delete_markers()
                .iter()
                .map(|m| (m.key(), m.version_id(), 0));
            let mut any = false;
            for (key, version, size) in versions.chain(markers) {
                let (Some(key), Some(version)) = (key, version) else {
                    continue;
                };
                if !gone.insert((key.to_string(), version.to_string())) {
                    continue;
                }
                any = true;
                store
                    .client
                    .delete_object()
                    .bucket(bucket)
                    .key(key)
                    .version_id(version)
                    .send()
                    .await
                    .map_err(|e| StorageError::DeleteObject(err_text(&e)))?;
                if size > 0 {
                    deleted.objects += 1;
                    deleted.bytes += size;
                }
            }
            if !any {
                return if page.versions().is_empty() && page.delete_markers().is_empty() {
                    Ok(deleted)
                } else {
                    Err(StorageError::DeleteObject(format!(
                        "versions under {prefix:?} in {bucket} remain after deletion"
                    )))
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_uris_split_into_bucket_and_key() {
        assert_eq!(parse_uri("s3://b/k/x.zip").unwrap(), ("b", "k/x.zip"));
        assert!(parse_uri("s3:///k").is_err());
        assert!(parse_uri("http://b/k").is_err());
    }
}
