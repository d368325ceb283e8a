//! Dataset receipts: what `POST /v1/uploads/{id}/validate` hands back so that an order can
//! prove its upload was already checked, without the webhook asking S3 again.
//!
//! A receipt is `v1.<issued unix seconds>.<sha256 of the zip>.<tag>`, where the tag is a keyed
//! MAC (the API's `ID_HASH_KEY`) over the tenant namespace, the upload id, the validation
//! marker (the dataset rules' fingerprint and the SHA-256) and the issue time. It vouches for those
//! bytes only: the job spec pins the SHA-256 and the trainer verifies it before unpacking, so
//! a zip replaced after its receipt was issued is refused at start, never trained on
//! unchecked. A receipt made for another tenant, another upload, other rules, or longer ago
//! than [`MAX_AGE_SECS`] does not count; the caller then checks the upload in S3 as before.
//!
//! Pure functions; the clock is an argument.

use hmac::Mac;

use crate::order::{hash_parts, keyed_mac};
use loraplane_dataset::DatasetRules;

use crate::dataset_check::{marker, vouched_sha256};

/// The MAC's purpose, so a receipt tag can never equal a name the same key hashes.
const KIND: &str = "dataset-receipt";

/// How long a receipt vouches for an upload. Checkout follows validation within minutes; a
/// day covers an abandoned cart that is paid later without stretching what a receipt means.
pub const MAX_AGE_SECS: i64 = 24 * 3600;

/// Hex digits of the tag (`order::hash_parts`' 128 bits).
const TAG_HEX: usize = 32;

/// What the tag covers: one list, so issuing and verifying cannot drift apart.
fn tagged<'a>(ns: &'a str, upload_id: &'a str, marker: &'a str, issued: &'a str) -> [&'a str; 4] {
    [ns, upload_id, marker, issued]
}

/// The receipt for an upload that passed under `rules` with this SHA-256.
pub fn issue(
    key: &[u8],
    ns: &str,
    upload_id: &str,
    rules: &DatasetRules,
    sha256: &str,
    now: i64,
) -> String {
    let (marker, issued) = (marker(rules, sha256), now.to_string());
    let tag = hash_parts(key, KIND, &tagged(ns, upload_id, &marker, &issued));
    format!("v1.{now}.{sha256}.{tag}")
}

/// The SHA-256 a receipt vouches for, if it is genuine, for this tenant's upload, made under
/// these rules and young enough.
pub fn verify<'r>(
    key: &[u8],
    receipt: &'r str,
    ns: &str,
    upload_id: &str,
    rules: &DatasetRules,
    now: i64,
) -> Option<&'r str> {
    let mut parts = receipt.split('.');
    let (Some("v1"), Some(issued), Some(sha), Some(tag), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let age = now - issued.parse::<i64>().ok()?;
    // A little skew between replicas' clocks is fine; a receipt from the future is not.
    if !(-60..=MAX_AGE_SECS).contains(&age) {
        return None;
    }
    let marker = marker(rules, sha);
    // The marker check also insists on a well-formed SHA-256.
    vouched_sha256(rules, &marker)?;
    if tag.len() != TAG_HEX {
        return None;
    }
    let tag = hex::decode(tag).ok()?;
    // Constant-time comparison of the truncated tag.
    keyed_mac(key, KIND, &tagged(ns, upload_id, &marker, issued))?
        .verify_truncated_left(&tag)
        .ok()?;
    Some(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"test-id-hash-key";
    const NS: &str = "tenant-a";
    const UPLOAD: &str = "eu-west.0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    fn sha() -> String {
        "ab".repeat(32)
    }

    fn limits() -> DatasetRules {
        DatasetRules {
            max_images: 50,
            ..DatasetRules::default()
        }
    }

    #[test]
    fn a_fresh_receipt_vouches_for_its_sha256() {
        let r = issue(KEY, NS, UPLOAD, &limits(), &sha(), NOW);
        assert_eq!(
            verify(KEY, &r, NS, UPLOAD, &limits(), NOW + 5),
            Some(sha().as_str())
        );
        // Short enough for a Stripe metadata value (500 characters).
        assert!(r.len() < 120, "{r}");
    }

    #[test]
    fn a_receipt_counts_only_for_its_tenant_upload_limits_and_key() {
        let r = issue(KEY, NS, UPLOAD, &limits(), &sha(), NOW);
        let other_upload = "eu-west.ffffffffffffffffffffffffffffffff";
        assert_eq!(verify(KEY, &r, "tenant-b", UPLOAD, &limits(), NOW), None);
        assert_eq!(verify(KEY, &r, NS, other_upload, &limits(), NOW), None);
        let stricter = DatasetRules {
            max_images: 10,
            ..limits()
        };
        assert_eq!(verify(KEY, &r, NS, UPLOAD, &stricter, NOW), None);
        assert_eq!(verify(b"another key", &r, NS, UPLOAD, &limits(), NOW), None);
    }

    #[test]
    fn a_tampered_receipt_is_refused() {
        let r = issue(KEY, NS, UPLOAD, &limits(), &sha(), NOW);
        // Another dataset's hash under the same tag.
        let swapped = r.replace(&sha(), &"cd".repeat(32));
        assert_eq!(verify(KEY, &swapped, NS, UPLOAD, &limits(), NOW), None);
        // A later issue time, to stretch its life.
        let backdated = r.replacen(&NOW.to_string(), &(NOW + 3600).to_string(), 1);
        assert_eq!(
            verify(KEY, &backdated, NS, UPLOAD, &limits(), NOW + 3600),
            None
        );
        for junk in ["", "v1", "v2.1.2.3", "v1.x.y.z", &format!("{r}.extra")] {
            assert_eq!(
                verify(KEY, junk, NS, UPLOAD, &limits(), NOW),
                None,
                "{junk}"
            );
        }
    }

    #[test]
    fn a_receipt_expires_and_one_from_the_future_is_refused() {
        let r = issue(KEY, NS, UPLOAD, &limits(), &sha(), NOW);
        assert!(verify(KEY, &r, NS, UPLOAD, &limits(), NOW + MAX_AGE_SECS).is_some());
        assert_eq!(
            verify(KEY, &r, NS, UPLOAD, &limits(), NOW + MAX_AGE_SECS + 1),
            None
        );
        assert_eq!(verify(KEY, &r, NS, UPLOAD, &limits(), NOW - 3600), None);
    }
}
