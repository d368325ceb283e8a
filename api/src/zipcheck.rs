//! Dataset validation, the pure part: is this zip a dataset the trainer can use, and is it safe
//! to unpack? Runs on the bytes before a job is created, so a bad upload is refused with a
//! precise error instead of failing a paid GPU job later.
//!
//! Declared sizes in a zip can lie, so the bomb guard counts the bytes actually inflated, with a
//! hard stop, rather than trusting the central directory.

use std::io::{Cursor, Read};

/// What a dataset may be.
#[derive(Debug, Clone, Copy)]
pub struct ZipLimits {
    /// Largest zip.
    pub max_bytes: u64,
    /// Largest total inflated size.
    pub max_uncompressed: u64,
    /// Largest inflated/compressed ratio of one entry.
    pub max_ratio: u64,
    /// Fewest images.
    pub min_images: usize,
    /// Most images.
    pub max_images: usize,
}

impl ZipLimits {
    /// The validation marker recorded on an upload that passed under these limits: the
    /// limits it was checked against and the SHA-256 of the bytes. A marker made under other
    /// limits (the configuration changed) does not count, so the upload is checked again.
    pub fn marker(&self, sha256: &str) -> String {
        format!("v1:{}:{sha256}", self.fingerprint())
    }

    /// The SHA-256 a marker vouches for, if it was made under these limits.
    pub fn vouched_sha256<'m>(&self, marker: &'m str) -> Option<&'m str> {
        let rest = marker.strip_prefix("v1:")?;
        let (fp, sha) = rest.split_once(':')?;
        let well_formed = sha.len() == 64
            && sha
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (fp == self.fingerprint() && well_formed).then_some(sha)
    }

    fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let text = format!(
            "{}/{}/{}/{}/{}",
            self.max_bytes, self.max_uncompressed, self.max_ratio, self.min_images, self.max_images
        );
        let mut h = hex::encode(Sha256::digest(text.as_bytes()));
        h.truncate(16);
        h
    }
}

/// What a valid dataset contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSummary {
    /// Number of images.
    pub images: usize,
    /// Number of caption files.
    pub captions: usize,
    /// Total inflated bytes.
    pub uncompressed_bytes: u64,
}

/// Why a dataset was refused. `code()` is the API error code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZipError {
    /// Larger than allowed.
    #[error("the upload is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// Actual size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// Not a zip archive.
    #[error("the upload is not a zip archive: {0}")]
    NotZip(String),
    /// An entry escapes the archive's root (zip-slip) or is a link.
    #[error("entry {0:?} has an unsafe path (absolute, `..` or a link)")]
    UnsafePath(String),
    /// An entry is encrypted.
    #[error("entry {0:?} is encrypted")]
    Encrypted(String),
    /// An entry is neither an image nor a caption.
    #[error("entry {0:?} is not a .png, .jpg, .jpeg, .webp image or a .txt caption")]
    UnsupportedFile(String),
    /// An image's bytes do not match its extension.
    #[error("entry {0:?} is not a valid image of its type")]
    BadImage(String),
    /// Inflates far beyond its compressed size or the total limit.
    #[error("entry {0:?} inflates beyond the allowed size or ratio (decompression bomb)")]
    Bomb(String),
    /// A caption is not UTF-8 text.
    #[error("caption {0:?} is not UTF-8 text")]
    BadCaption(String),
    /// Too few or too many images.
    #[error("the dataset has {count} images; between {min} and {max} are required")]
    ImageCount {
        /// Images found.
        count: usize,
        /// Fewest allowed.
        min: usize,
        /// Most allowed.
        max: usize,
    },
    /// Reading an entry failed.
    #[error("entry {0:?} could not be read: {1}")]
    Corrupt(String, String),
}

impl ZipError {
    /// The machine code.
    pub fn code(&self) -> &'static str {
        match self {
            ZipError::TooLarge { .. } => "upload_too_large",
            ZipError::NotZip(_) => "upload_not_zip",
            ZipError::UnsafePath(_) => "upload_unsafe_path",
            ZipError::Encrypted(_) => "upload_encrypted",
            ZipError::UnsupportedFile(_) => "upload_unsupported_file",
            ZipError::BadImage(_) => "upload_bad_image",
            ZipError::Bomb(_) => "upload_decompression_bomb",
            ZipError::BadCaption(_) => "upload_bad_caption",
            ZipError::ImageCount { .. } => "upload_image_count",
            ZipError::Corrupt(..) => "upload_corrupt",
        }
    }
}

enum Kind {
    Png,
    Jpeg,
    Webp,
    Caption,
}

fn kind_of(name: &str) -> Option<Kind> {
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit_once('.').map(|(_, e)| e)?;
    match ext {
        "png" => Some(Kind::Png),
        "jpg" | "jpeg" => Some(Kind::Jpeg),
        "webp" => Some(Kind::Webp),
        "txt" => Some(Kind::Caption),
        _ => None,
    }
}

fn magic_ok(kind: &Kind, head: &[u8]) -> bool {
    match kind {
        Kind::Png => head.starts_with(b"\x89PNG\r\n\x1a\n"),
        Kind::Jpeg => head.starts_with(&[0xFF, 0xD8, 0xFF]),
        Kind::Webp => head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP",
        Kind::Caption => true,
    }
}

fn unsafe_path(name: &str) -> bool {
    name.starts_with('/')
        || name.starts_with('\\')
        || name.contains('\0')
        || name.as_bytes().get(1) == Some(&b':')
        || name.split(['/', '\\']).any(|c| c == "..")
}

/// Macs add these to every zip; they are neither data nor a risk.
fn is_os_junk(name: &str) -> bool {
    name.starts_with("__MACOSX/") || name.rsplit('/').next() == Some(".DS_Store")
}

/// Validates a dataset zip.
pub fn validate(bytes: &[u8], limits: &ZipLimits) -> Result<DatasetSummary, ZipError> {
    let size = bytes.len() as u64;
    if size > limits.max_bytes {
        return Err(ZipError::TooLarge {
            size,
            limit: limits.max_bytes,
        });
    }
    let mut archive =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| ZipError::NotZip(e.to_string()))?;
    let mut total: u64 = 0;
    let mut images = 0usize;
    let mut captions = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| ZipError::Corrupt(format!("#{i}"), e.to_string()))?;
        let name = entry
            .name()
            .map(|n| n.into_owned())
            .map_err(|e| ZipError::Corrupt(format!("#{i}"), e.to_string()))?;
        if unsafe_path(&name) || entry.enclosed_name().is_none() || entry.is_symlink() {
            return Err(ZipError::UnsafePath(name));
        }
        if entry.is_dir() || is_os_junk(&name) {
            continue;
        }
        if entry.encrypted() {
            return Err(ZipError::Encrypted(name));
        }
        let kind = kind_of(&name).ok_or_else(|| ZipError::UnsupportedFile(name.clone()))?;
        // Stop inflating as soon as the entry exceeds its ratio or the total budget.
        let per_entry_cap = entry
            .compressed_size()
            .max(1)
            .saturating_mul(limits.max_ratio)
            .max(4096);
        let mut inflated: u64 = 0;
        let mut head = Vec::with_capacity(16);
        let mut text = Vec::new();
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| ZipError::Corrupt(name.clone(), e.to_string()))?;
            if n == 0 {
                break;
            }
            if head.len() < 16 {
                let take = (16 - head.len()).min(n);
                head.extend_from_slice(&buf[..take]);
            }
            if matches!(kind, Kind::Caption) {
                text.extend_from_slice(&buf[..n]);
            }
            inflated += n as u64;
            if inflated > per_entry_cap || total + inflated > limits.max_uncompressed {
                return Err(ZipError::Bomb(name));
            }
        }
        total += inflated;
        match kind {
            Kind::Caption => {
                if std::str::from_utf8(&text).is_err() {
                    return Err(ZipError::BadCaption(name));
                }
                captions += 1;
            }
            _ => {
                if !magic_ok(&kind, &head) {
                    return Err(ZipError::BadImage(name));
                }
                images += 1;
            }
        }
    }
    if images < limits.min_images || images > limits.max_images {
        return Err(ZipError::ImageCount {
            count: images,
            min: limits.min_images,
            max: limits.max_images,
        });
    }
    Ok(DatasetSummary {
        images,
        captions,
        uncompressed_bytes: total,
    })
}

/// Builds zips for tests and the bench.
pub mod testing {
    use std::io::Write;

    /// A tiny valid PNG header followed by filler: enough for the magic-byte check.
    pub fn png(fill: usize) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
        v.extend(std::iter::repeat_n(7u8, fill));
        v
    }

    /// A zip with the given (name, bytes) entries, deflated.
    pub fn zip_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in entries {
            if w.start_file(*name, opts).is_err() || w.write_all(bytes).is_err() {
                return Vec::new();
            }
        }
        w.finish().map(|c| c.into_inner()).unwrap_or_default()
    }

    /// A valid dataset of `n` images, each with a caption.
    pub fn dataset(n: usize) -> Vec<u8> {
        let mut entries = Vec::new();
        for i in 0..n {
            entries.push((format!("img{i}.png"), png(200 + i)));
            entries.push((format!("img{i}.txt"), b"a photo of zxq".to_vec()));
        }
        let refs: Vec<(&str, Vec<u8>)> = entries
            .iter()
            .map(|(n, b)| (n.as_str(), b.clone()))
            .collect();
        zip_of(&refs)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    const LIMITS: ZipLimits = ZipLimits {
        max_bytes: 1 << 20,
        max_uncompressed: 1 << 22,
        max_ratio: 100,
        min_images: 2,
        max_images: 5,
    };

    #[test]
    fn a_marker_vouches_only_under_the_limits_it_was_made_with() {
        let sha = "ab".repeat(32);
        let m = LIMITS.marker(&sha);
        assert_eq!(LIMITS.vouched_sha256(&m), Some(sha.as_str()));
        let stricter = ZipLimits {
            max_images: 4,
            ..LIMITS
        };
        assert_eq!(stricter.vouched_sha256(&m), None);
        assert_eq!(LIMITS.vouched_sha256(&m.replace("v1:", "v2:")), None);
        assert_eq!(LIMITS.vouched_sha256(&m[..m.len() - 1]), None);
        assert_eq!(LIMITS.vouched_sha256("garbage"), None);
    }

    #[test]
    fn a_good_dataset_passes_and_is_counted() {
        let s = validate(&dataset(3), &LIMITS).unwrap();
        assert_eq!((s.images, s.captions), (3, 3));
    }

    #[test]
    fn each_problem_gets_its_own_code() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"PK not really".to_vec(), "upload_not_zip"),
            (
                zip_of(&[("../evil.png", png(10)), ("a.png", png(10))]),
                "upload_unsafe_path",
            ),
            (zip_of(&[("/abs.png", png(10))]), "upload_unsafe_path"),
            (
                zip_of(&[("a.png", png(10)), ("run.sh", b"#!".to_vec())]),
                "upload_unsupported_file",
            ),
            (
                zip_of(&[("a.png", png(10)), ("b.jpg", png(10))]),
                "upload_bad_image",
            ),
            (zip_of(&[("a.png", png(10))]), "upload_image_count"),
            (
                zip_of(&[
                    ("a.png", png(10)),
                    ("b.png", png(10)),
                    ("a.txt", vec![0xff, 0xfe]),
                ]),
                "upload_bad_caption",
            ),
            // 2 MiB of one byte deflates to a few KiB: far beyond a 100x ratio.
            (
                zip_of(&[("a.png", png(2 << 20)), ("b.png", png(10))]),
                "upload_decompression_bomb",
            ),
        ];
        for (bytes, code) in cases {
            assert_eq!(validate(&bytes, &LIMITS).map_err(|e| e.code()), Err(code));
        }
        let big = ZipLimits {
            max_bytes: 10,
            ..LIMITS
        };
        assert_eq!(
            validate(&dataset(3), &big).map_err(|e| e.code()),
            Err("upload_too_large")
        );
        let too_many = dataset(6);
        assert_eq!(
            validate(&too_many, &LIMITS).map_err(|e| e.code()),
            Err("upload_image_count")
        );
    }

    #[test]
    fn mac_junk_is_ignored() {
        let z = zip_of(&[
            ("a.png", png(10)),
            ("b.png", png(10)),
            ("__MACOSX/._a.png", vec![0, 1]),
            ("sub/.DS_Store", vec![0]),
        ]);
        assert_eq!(validate(&z, &LIMITS).unwrap().images, 2);
    }
}
