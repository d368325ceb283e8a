//! The dataset checks, shared by the API (before it gives a receipt) and the trainer (before it
//! trains), so a dataset one accepts the other trains on. The rules' numbers are
//! `loraplane_crds::dataset::DatasetRules`, from the platform config.
//!
//! The zip is read through any `Read + Seek`: the API passes a reader over S3 range requests,
//! the trainer a file or its bytes. Memory stays bounded by the rules whatever the zip: one
//! entry at a time (at most `maxEntryBytes`), and one decoded image (at most
//! `maxDecodeBytes`). Declared sizes can lie, so an entry is read to at most one byte past its
//! declared size and refused if the two differ.
//!
//! Errors name an entry by its position in the archive (`entry #3`), never by the customer's
//! file name: their text may reach job status, Events and logs. The name is kept beside it,
//! for the one place that may show it, the API's answer to the customer who uploaded it.

use std::collections::HashMap;
use std::io::{Cursor, Read, Seek};

use image::{DynamicImage, ImageFormat};
use loraplane_crds::dataset::{EntryKind, entry_kind, is_unsafe_path, stem};

pub use loraplane_crds::dataset::DatasetRules;

pub mod testing;

/// An entry of the zip: its 1-based position, shown in messages, and its name, shown only to
/// the customer.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based position in the archive's central directory.
    pub number: usize,
    /// The file name in the zip (customer text).
    pub name: String,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entry #{}", self.number)
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entry(#{})", self.number)
    }
}

/// Why a dataset was refused. The message names entries by number only; `entry()` gives the
/// entry (with its name) for the customer's own answer.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// Larger than the rules allow.
    #[error("the dataset is {size} bytes; the limit is {limit}")]
    ZipTooLarge {
        /// Actual size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// Not a readable zip archive.
    #[error("the dataset is not a readable zip archive: {0}")]
    OpenZip(String),
    /// An entry could not be read.
    #[error("{entry}: cannot be read: {reason}")]
    ReadEntry {
        /// The entry.
        entry: Entry,
        /// Why (the zip reader's message, which never quotes names).
        reason: String,
    },
    /// An entry's path could escape the folder it is unpacked into, or it is a link.
    #[error("{entry}: unsafe path (absolute, containing '..', or a link)")]
    UnsafePath {
        /// The entry.
        entry: Entry,
    },
    /// An entry is encrypted.
    #[error("{entry}: encrypted")]
    Encrypted {
        /// The entry.
        entry: Entry,
    },
    /// Neither an image nor a caption.
    #[error("{entry}: unsupported file type (expected .jpg, .jpeg, .png, .webp or .txt)")]
    UnsupportedFile {
        /// The entry.
        entry: Entry,
    },
    /// An entry inflates beyond the per-entry limit.
    #[error("{entry}: {bytes} bytes uncompressed exceeds the {limit}-byte limit per file")]
    EntryTooLarge {
        /// The entry.
        entry: Entry,
        /// Declared size.
        bytes: u64,
        /// Limit.
        limit: u64,
    },
    /// An entry's compression ratio is that of a decompression bomb.
    #[error("{entry}: compression ratio {ratio}:1 exceeds {limit}:1 (decompression bomb?)")]
    CompressionRatio {
        /// The entry.
        entry: Entry,
        /// Observed ratio, rounded down.
        ratio: u64,
        /// Limit.
        limit: u32,
    },
    /// An entry inflates to another size than its header declares.
    #[error("{entry}: inflates to more or fewer bytes than the {declared} its header declares")]
    SizeMismatch {
        /// The entry.
        entry: Entry,
        /// Declared size.
        declared: u64,
    },
    /// All entries together inflate beyond the limit.
    #[error("{bytes} bytes uncompressed in total exceeds the {limit}-byte limit (at {entry})")]
    TotalTooLarge {
        /// The entry that crossed the limit.
        entry: Entry,
        /// Running total.
        bytes: u64,
        /// Limit.
        limit: u64,
    },
    /// The content is an image of another format than jpeg, png or webp.
    #[error("{entry}: unsupported image format {format} (expected jpeg, png or webp)")]
    UnsupportedImage {
        /// The entry.
        entry: Entry,
        /// The format found.
        format: String,
    },
    /// The image does not decode.
    #[error("{entry}: corrupt image: {reason}")]
    CorruptImage {
        /// The entry.
        entry: Entry,
        /// The decoder's message.
        reason: String,
    },
    /// The image is larger than the decoder may allocate or wider/taller than allowed.
    #[error("{entry}: image too large: {reason}")]
    ImageTooLarge {
        /// The entry.
        entry: Entry,
        /// Why.
        reason: String,
    },
    /// A caption is not UTF-8 text.
    #[error("{entry}: caption is not UTF-8 text")]
    BadCaption {
        /// The entry.
        entry: Entry,
    },
    /// Too few or too many images.
    #[error("the dataset has {count} images; between {min} and {max} are required")]
    ImageCount {
        /// Images found.
        count: usize,
        /// Fewest allowed.
        min: u32,
        /// Most allowed.
        max: u32,
    },
}

impl DatasetError {
    /// The API's machine code for this refusal.
    pub fn code(&self) -> &'static str {
        match self {
            DatasetError::ZipTooLarge { .. } => "upload_too_large",
            DatasetError::OpenZip(_) => "upload_not_zip",
            DatasetError::ReadEntry { .. } => "upload_corrupt",
            DatasetError::UnsafePath { .. } => "upload_unsafe_path",
            DatasetError::Encrypted { .. } => "upload_encrypted",
            DatasetError::UnsupportedFile { .. } => "upload_unsupported_file",
            DatasetError::EntryTooLarge { .. } => "upload_entry_too_large",
            DatasetError::CompressionRatio { .. }
            | DatasetError::SizeMismatch { .. }
            | DatasetError::TotalTooLarge { .. } => "upload_decompression_bomb",
            DatasetError::UnsupportedImage { .. } | DatasetError::CorruptImage { .. } => {
                "upload_bad_image"
            }
            DatasetError::ImageTooLarge { .. } => "upload_image_too_large",
            DatasetError::BadCaption { .. } => "upload_bad_caption",
            DatasetError::ImageCount { .. } => "upload_image_count",
        }
    }

    /// The entry the refusal is about, if it is about one.
    pub fn entry(&self) -> Option<&Entry> {
        match self {
            DatasetError::ReadEntry { entry, .. }
            | DatasetError::UnsafePath { entry }
            | DatasetError::Encrypted { entry }
            | DatasetError::UnsupportedFile { entry }
            | DatasetError::EntryTooLarge { entry, .. }
            | DatasetError::CompressionRatio { entry, .. }
            | DatasetError::SizeMismatch { entry, .. }
            | DatasetError::TotalTooLarge { entry, .. }
            | DatasetError::UnsupportedImage { entry, .. }
            | DatasetError::CorruptImage { entry, .. }
            | DatasetError::ImageTooLarge { entry, .. }
            | DatasetError::BadCaption { entry } => Some(entry),
            DatasetError::ZipTooLarge { .. }
            | DatasetError::OpenZip(_)
            | DatasetError::ImageCount { .. } => None,
        }
    }
}

/// What a valid dataset holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Images.
    pub images: usize,
    /// Caption files.
    pub captions: usize,
    /// Inflated bytes of images and captions.
    pub uncompressed_bytes: u64,
}

/// One image of a valid dataset, with its caption file's text if it has one.
#[derive(Clone)]
pub struct Item {
    /// The entry.
    pub entry: Entry,
    /// The encoded image, checked to decode.
    pub bytes: Vec<u8>,
    /// The text of the `.txt` with the same stem (customer text: never logged).
    pub caption: Option<String>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item")
            .field("entry", &self.entry)
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// Checks a dataset without keeping it: what the API does before it gives a receipt.
/// `size` is the zip's length in bytes, known before any entry is read.
pub fn check<R: Read + Seek>(
    reader: R,
    size: u64,
    rules: &DatasetRules,
) -> Result<Summary, DatasetError> {
    let mut summary = Summary {
        images: 0,
        captions: 0,
        uncompressed_bytes: 0,
    };
    walk(reader, size, rules, |kind, _, _| {
        match kind {
            EntryKind::Image => summary.images += 1,
            _ => summary.captions += 1,
        }
        Ok(())
    })
    .map(|total| Summary {
        uncompressed_bytes: total,
        ..summary
    })
}

/// Checks a dataset and returns its images in archive order, each with its caption text: what
/// the trainer trains on.
pub fn read<R: Read + Seek>(
    reader: R,
    size: u64,
    rules: &DatasetRules,
) -> Result<Vec<Item>, DatasetError> {
    let mut images: Vec<Item> = Vec::new();
    let mut captions: HashMap<String, String> = HashMap::new();
    walk(reader, size, rules, |kind, entry, bytes| {
        match kind {
            EntryKind::Image => images.push(Item {
                entry,
                bytes,
                caption: None,
            }),
            _ => {
                let text = String::from_utf8(bytes).map_err(|_| DatasetError::BadCaption {
                    entry: entry.clone(),
                })?;
                captions.insert(stem(&entry.name).to_string(), text);
            }
        }
        Ok(())
    })?;
    for item in &mut images {
        item.caption = captions.remove(stem(&item.entry.name));
    }
    Ok(images)
}

/// Reads every entry, checks it, and hands images (decoded once to prove they decode) and
/// captions (proved UTF-8) to `keep`. Returns the inflated total.
fn walk<R: Read + Seek>(
    reader: R,
    size: u64,
    rules: &DatasetRules,
    mut keep: impl FnMut(EntryKind, Entry, Vec<u8>) -> Result<(), DatasetError>,
) -> Result<u64, DatasetError> {
    if size > rules.max_zip_bytes {
        return Err(DatasetError::ZipTooLarge {
            size,
            limit: rules.max_zip_bytes,
        });
    }
    let mut archive =
        zip::ZipArchive::new(reader).map_err(|e| DatasetError::OpenZip(e.to_string()))?;
    let mut total = 0u64;
    let mut images = 0usize;
    for i in 0..archive.len() {
        let number = i + 1;
        let unnamed = || Entry {
            number,
            name: String::new(),
        };
        let mut file = archive.by_index(i).map_err(|e| DatasetError::ReadEntry {
            entry: unnamed(),
            reason: e.to_string(),
        })?;
        let entry = Entry {
            number,
            name: String::from_utf8_lossy(file.name_raw()).into_owned(),
        };
        if is_unsafe_path(&entry.name) || file.enclosed_name().is_none() || file.is_symlink() {
            return Err(DatasetError::UnsafePath { entry });
        }
        let kind = if file.is_dir() {
            EntryKind::Skipped
        } else {
            entry_kind(&entry.name)
        };
        match kind {
            EntryKind::Skipped => continue,
            EntryKind::Unsupported => return Err(DatasetError::UnsupportedFile { entry }),
            EntryKind::Image | EntryKind::Caption => {}
        }
        if file.encrypted() {
            return Err(DatasetError::Encrypted { entry });
        }
        let declared = file.size();
        if declared > rules.max_entry_bytes {
            return Err(DatasetError::EntryTooLarge {
                entry,
                bytes: declared,
                limit: rules.max_entry_bytes,
            });
        }
        let ratio = declared / file.compressed_size().max(1);
        if declared >= rules.ratio_floor_bytes && ratio > u64::from(rules.max_ratio) {
            return Err(DatasetError::CompressionRatio {
                entry,
                ratio,
                limit: rules.max_ratio,
            });
        }
        total += declared;
        if total > rules.max_total_bytes {
            return Err(DatasetError::TotalTooLarge {
                entry,
                bytes: total,
                limit: rules.max_total_bytes,
            });
        }
        // Never trust the header: read at most one byte more than it declares.
        let mut bytes = Vec::with_capacity(declared as usize);
        if let Err(e) = (&mut file).take(declared + 1).read_to_end(&mut bytes) {
            return Err(DatasetError::ReadEntry {
                entry,
                reason: e.to_string(),
            });
        }
        if bytes.len() as u64 != declared {
            return Err(DatasetError::SizeMismatch { entry, declared });
        }
        if kind == EntryKind::Image {
            let img = decode(&entry, &bytes, rules)?;
            if img.width() == 0 || img.height() == 0 {
                return Err(DatasetError::CorruptImage {
                    entry,
                    reason: "the image has no pixels".into(),
                });
            }
            images += 1;
        } else if std::str::from_utf8(&bytes).is_err() {
            return Err(DatasetError::BadCaption { entry });
        }
        keep(kind, entry, bytes)?;
    }
    let (min, max) = (rules.min_images, rules.max_images);
    if images < min as usize || images > max as usize {
        return Err(DatasetError::ImageCount {
            count: images,
            min,
            max,
        });
    }
    Ok(total)
}

/// Decodes an image under the rules' pixel and allocation limits, accepting jpeg, png and webp
/// by content (not by extension).
pub fn decode(
    entry: &Entry,
    bytes: &[u8],
    rules: &DatasetRules,
) -> Result<DynamicImage, DatasetError> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DatasetError::CorruptImage {
            entry: entry.clone(),
            reason: e.to_string(),
        })?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => {}
        Some(other) => {
            return Err(DatasetError::UnsupportedImage {
                entry: entry.clone(),
                format: format!("{other:?}").to_lowercase(),
            });
        }
        None => {
            return Err(DatasetError::CorruptImage {
                entry: entry.clone(),
                reason: "not a recognisable image".into(),
            });
        }
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(rules.max_side);
    limits.max_image_height = Some(rules.max_side);
    limits.max_alloc = Some(rules.max_decode_bytes);
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => DatasetError::ImageTooLarge {
            entry: entry.clone(),
            reason: l.to_string(),
        },
        other => DatasetError::CorruptImage {
            entry: entry.clone(),
            reason: other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests;
