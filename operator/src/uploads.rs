//! Uploads no order consumed: the API hands out upload slots, and a dataset uploaded but never
//! ordered is deleted once `defaults.uploadTtlSeconds` (default 24 h) has passed since it was
//! written. The decision is pure ([`expired`]); [`sweep`] lists each region's `uploads/` prefix
//! and deletes, under the operator's Lease, on a timer.
//!
//! An upload is "ordered" when a job in the operator's cache names it as its dataset; the cache
//! must have completed its first list before a sweep, or every upload would look unordered.

use std::collections::HashSet;

use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::{UPLOADS_PREFIX, s3_uri};
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

/// What one sweep deleted, and how late (seconds past the TTL) the latest deletion was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Objects and bytes deleted.
    pub deleted: Deleted,
    /// The largest delay past an upload's expiry.
    pub max_lag: i64,
}

/// Deletes every expired, unordered upload in every region's dataset bucket.
pub async fn sweep(
    storage: &Storage,
    jobs: &[std::sync::Arc<LoRATrainingJob>],
    now: i64,
    ttl: i64,
) -> Result<Swept, StorageError> {
    let referenced: HashSet<String> = jobs.iter().map(|j| j.spec.dataset.uri.clone()).collect();
    let mut swept = Swept::default();
    for (_, region) in storage.all() {
        let bucket = &region.buckets.datasets;
        let listed = storage.list(bucket, UPLOADS_PREFIX).await?;
        for upload in expired(&listed, bucket, &referenced, now, ttl) {
            swept.deleted += storage.delete_object(bucket, &upload.key).await?;
            swept.max_lag = swept.max_lag.max(now - upload.modified - ttl);
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
