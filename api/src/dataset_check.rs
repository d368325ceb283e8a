//! Checking an upload where it lies. The rules and the checks are `loraplane-dataset`'s, the
//! trainer's own; what is here is how the API feeds them a zip of up to 512 MiB without
//! holding it: a blocking `Read + Seek` over S3 range reads (4 MiB blocks, one in memory), all
//! pinned to the ETag the object had when the check began, that computes the object's SHA-256
//! as the check reads through it. A zip is read mostly front to back (entries follow one
//! another), so the hash rarely needs more than the bytes the check read anyway; whatever the
//! check skipped is read at the end, for the hash only.
//!
//! Also here: the validation marker, the record on the object that it passed under these
//! rules, and the SHA-256 it passed with.

use std::io::{self, Read, Seek, SeekFrom};

use loraplane_dataset::DatasetRules;
use loraplane_runtime::storage::{Object, StorageError};
use sha2::{Digest, Sha256};

/// Bytes per range request.
const BLOCK: u64 = 4 << 20;

/// Why a check ended without a verdict on the dataset.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The dataset is invalid.
    #[error(transparent)]
    Invalid(#[from] loraplane_dataset::DatasetError),
    /// Reading it failed (S3 unavailable, or the object replaced mid-check).
    #[error(transparent)]
    Read(#[from] StorageError),
}

/// Checks the object of `size` bytes at `etag` under `rules` and returns its SHA-256. Blocks
/// the calling thread (run it on a blocking thread), driving the range reads on `runtime`.
pub fn check_object(
    runtime: tokio::runtime::Handle,
    object: Object,
    etag: String,
    size: u64,
    rules: &DatasetRules,
) -> Result<String, CheckError> {
    let mut reader = RangeReader {
        runtime,
        object,
        etag,
        size,
        pos: 0,
        block: Vec::new(),
        block_start: 0,
        hasher: Sha256::new(),
        hashed: 0,
        failed: None,
    };
    let verdict = loraplane_dataset::check(&mut reader, size, rules);
    // A read failure surfaces in the zip reader as a broken archive; it is ours, not the
    // customer's, so it wins over the verdict it caused.
    if let Some(e) = reader.failed.take() {
        return Err(e.into());
    }
    verdict?;
    Ok(reader.finish()?)
}

/// A `Read + Seek` over an object's byte ranges.
struct RangeReader {
    runtime: tokio::runtime::Handle,
    object: Object,
    etag: String,
    size: u64,
    pos: u64,
    /// The block in memory and where it starts (a multiple of `BLOCK`).
    block: Vec<u8>,
    block_start: u64,
    /// The hash of bytes `0..hashed`.
    hasher: Sha256,
    hashed: u64,
    /// The first storage failure, kept so it is not mistaken for a broken zip.
    failed: Option<StorageError>,
}

impl RangeReader {
    /// Loads the block holding `offset`, hashing it if it continues the hashed prefix.
    fn load(&mut self, offset: u64) -> Result<(), StorageError> {
        let start = offset - offset % BLOCK;
        let len = BLOCK.min(self.size - start);
        let bytes = self
            .runtime
            .block_on(self.object.read_range(&self.etag, start, len))?;
        if bytes.len() as u64 != len {
            return Err(StorageError::GetObject(format!(
                "asked for {len} bytes at {start}, got {}",
                bytes.len()
            )));
        }
        if start <= self.hashed && self.hashed < start + len {
            let from = (self.hashed - start) as usize;
            self.hasher.update(&bytes[from..]);
            self.hashed = start + len;
        }
        self.block = bytes;
        self.block_start = start;
        Ok(())
    }

    /// The SHA-256 of the whole object, reading what the check skipped.
    fn finish(mut self) -> Result<String, StorageError> {
        while self.hashed < self.size {
            self.load(self.hashed)?;
        }
        Ok(hex::encode(self.hasher.finalize()))
    }
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let in_block =
            self.pos >= self.block_start && self.pos < self.block_start + self.block.len() as u64;
        if !in_block && let Err(e) = self.load(self.pos) {
            let msg = e.to_string();
            self.failed.get_or_insert(e);
            return Err(io::Error::other(msg));
        }
        let at = (self.pos - self.block_start) as usize;
        let n = buf.len().min(self.block.len() - at);
        buf[..n].copy_from_slice(&self.block[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RangeReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        self.pos = target;
        Ok(target)
    }
}

/// The marker recorded on an upload that passed under `rules`: their fingerprint and the
/// SHA-256 of the bytes. A marker made under other rules (the configuration changed) does not
/// count, so the upload is checked again.
pub fn marker(rules: &DatasetRules, sha256: &str) -> String {
    format!("v2:{}:{sha256}", rules.fingerprint())
}

/// The SHA-256 a marker vouches for, if it was made under `rules`.
pub fn vouched_sha256<'m>(rules: &DatasetRules, marker: &'m str) -> Option<&'m str> {
    let rest = marker.strip_prefix("v2:")?;
    let (fp, sha) = rest.split_once(':')?;
    let well_formed = sha.len() == 64
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (fp == rules.fingerprint() && well_formed).then_some(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_vouches_only_under_the_rules_it_was_made_with() {
        let rules = DatasetRules::default();
        let sha = "ab".repeat(32);
        let m = marker(&rules, &sha);
        assert_eq!(vouched_sha256(&rules, &m), Some(sha.as_str()));
        let stricter = DatasetRules {
            max_images: 4,
            ..rules
        };
        assert_eq!(vouched_sha256(&stricter, &m), None);
        assert_eq!(vouched_sha256(&rules, &m.replace("v2:", "v1:")), None);
        assert_eq!(vouched_sha256(&rules, &m[..m.len() - 1]), None);
        assert_eq!(vouched_sha256(&rules, "garbage"), None);
    }
}
