//! Uploads no order consumed, and draft orders: the API hands out upload slots and stores
//! drafts (the customer's choices before payment), and a dataset uploaded but never ordered,
//! like every draft, is deleted once `defaults.uploadTtlSeconds` (default 24 h) has passed since
//! it was written (a paid draft's job holds its own copy of the order). The decision is pure
//! ([`expired`]); [`sweep`] lists each region's `uploads/` and `drafts/` prefixes and deletes,
//! under the operator's Lease, on a timer.
//!
//! An upload is "ordered" when a job in the operator's cache names it as its dataset; the cache
//! must have completed its first list before a sweep, or every upload would look unordered.

use std::collections::HashSet;

use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::{DRAFTS_PREFIX, UPLOADS_PREFIX, s3_uri};
use loraplane_runtime::storage::{Deleted, Listed, Storage, StorageError};

/// The uploads in `bucket` that no job references and that are at least `ttl` seconds old at
/// `now`.
pub fn expired<'l>(
    listed: &'l [Listed],
    bucket: &str,
    referenced: &HashSet<String>,
    now: i64,
    ttl: i64,
) -> Vec<&'l Listed> {
    listed
        .iter()
        .filter(|o| now.saturating_sub(o.modified) >= ttl)
        .filter(|o| !referenced.contains(&s3_uri(bucket, &o.key)))
        .collect()
}

/// One object a sweep deleted: its size, and how late (seconds past its TTL) it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Bytes deleted.
    pub bytes: u64,
    /// Seconds past the object's expiry.
    pub lag: i64,
}

/// Deletes every expired, unordered upload and every expired draft in every region's dataset
/// bucket; returns each object deleted.
pub async fn sweep(
    storage: &Storage,
    jobs: &[std::sync::Arc<LoRATrainingJob>],
    now: i64,
    ttl: i64,
) -> Result<Vec<Swept>, StorageError> {
    let referenced: HashSet<String> = jobs.iter().map(|j| j.spec.dataset.uri.clone()).collect();
    let mut swept = Vec::new();
    for (_, region) in storage.all() {
        let bucket = &region.buckets.datasets;
        // No job names a draft as its dataset: every expired draft goes.
        for prefix in [UPLOADS_PREFIX, DRAFTS_PREFIX] {
            let listed = storage.list(bucket, prefix).await?;
            for object in expired(&listed, bucket, &referenced, now, ttl) {
                let Deleted { bytes, .. } = storage.delete_object(bucket, &object.key).await?;
                swept.push(Swept {
                    bytes,
                    lag: now - object.modified - ttl,
                });
            }
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(key: &str, modified: i64) -> Listed {
        Listed {
            key: key.into(),
            size: 10,
            modified,
        }
    }

    #[test]
    fn only_old_unordered_uploads_expire() {
        let listed = vec![
            upload("uploads/acme/old.zip", 0),
            upload("uploads/acme/ordered.zip", 0),
            upload("uploads/acme/young.zip", 500),
        ];
        let referenced = HashSet::from(["s3://ds/uploads/acme/ordered.zip".to_string()]);
        let out: Vec<&str> = expired(&listed, "ds", &referenced, 1000, 1000)
            .into_iter()
            .map(|o| o.key.as_str())
            .collect();
        assert_eq!(out, vec!["uploads/acme/old.zip"]);
        // The same key in another bucket is another upload.
        assert_eq!(expired(&listed, "other", &referenced, 1000, 1000).len(), 2);
    }
}
