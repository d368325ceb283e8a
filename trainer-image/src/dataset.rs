//! The customer's dataset: a zip of jpeg/png/webp images with optional same-name `.txt`
//! captions. Everything is checked before any training starts, and the zip is read in memory
//! (never extracted), so a rejected dataset leaves nothing behind. Checks: unsafe paths
//! (zip-slip), unsupported files, decompression bombs (declared sizes, compression ratio,
//! total size, real vs declared size, pixel dimensions), corrupt images, and the image count.
//!
//! Images are then centre-cropped to the training resolution; the crop geometry is kept for
//! SDXL's size/crop conditioning.

use std::io::{Cursor, Read};

use image::{DynamicImage, ImageFormat, imageops::FilterType};

/// Fewest images a LoRA is trained from.
pub const MIN_IMAGES: usize = 5;
/// Most images accepted.
pub const MAX_IMAGES: usize = 200;

/// Why a dataset was rejected. Every variant names the file (never its caption).
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The bytes are not a readable zip archive.
    #[error("dataset is not a readable zip archive: {0}")]
    OpenZip(String),
    /// An entry could not be read.
    #[error("dataset entry {file}: cannot be read: {reason}")]
    ReadEntry {
        /// Entry name.
        file: String,
        /// Why.
        reason: String,
    },
    /// An entry's path escapes the archive (zip-slip) or is absolute.
    #[error("dataset entry {file}: unsafe path (absolute or containing '..')")]
    UnsafePath {
        /// Entry name.
        file: String,
    },
    /// Not an image or caption the trainer accepts.
    #[error(
        "dataset entry {file}: unsupported file type (expected .jpg, .jpeg, .png, .webp or .txt)"
    )]
    UnsupportedFile {
        /// Entry name.
        file: String,
    },
    /// The extension says image but the content is another format.
    #[error("dataset entry {file}: unsupported image format {format} (expected jpeg, png or webp)")]
    UnsupportedImage {
        /// Entry name.
        file: String,
        /// What the content is.
        format: String,
    },
    /// An entry declares more uncompressed bytes than allowed.
    #[error(
        "dataset entry {file}: {bytes} bytes uncompressed exceeds the {limit}-byte limit per file"
    )]
    EntryTooLarge {
        /// Entry name.
        file: String,
        /// Declared size.
        bytes: u64,
        /// Limit.
        limit: u64,
    },
    /// An entry's compression ratio is that of a decompression bomb.
    #[error(
        "dataset entry {file}: compression ratio {ratio:.0}:1 exceeds {limit:.0}:1 (decompression bomb?)"
    )]
    CompressionRatio {
        /// Entry name.
        file: String,
        /// Observed ratio.
        ratio: f64,
        /// Limit.
        limit: f64,
    },
    /// An entry inflates to a different size than its header says.
    #[error(
        "dataset entry {file}: inflates to more or fewer bytes than the {declared} its header declares"
    )]
    SizeMismatch {
        /// Entry name.
        file: String,
        /// Declared size.
        declared: u64,
    },
    /// All entries together declare too many bytes.
    #[error(
        "dataset: {bytes} bytes uncompressed in total exceeds the {limit}-byte limit (at {file})"
    )]
    TotalTooLarge {
        /// The entry that crossed the limit.
        file: String,
        /// Running total.
        bytes: u64,
        /// Limit.
        limit: u64,
    },
    /// The image does not decode.
    #[error("dataset entry {file}: corrupt image: {reason}")]
    CorruptImage {
        /// Entry name.
        file: String,
        /// The decoder's message.
        reason: String,
    },
    /// The image's pixel dimensions are beyond the limits.
    #[error("dataset entry {file}: image too large: {reason}")]
    ImageTooLarge {
        /// Entry name.
        file: String,
        /// Why.
        reason: String,
    },
    /// A caption is not UTF-8 text.
    #[error("dataset entry {file}: caption is not UTF-8 text")]
    BadCaption {
        /// Entry name.
        file: String,
    },
    /// Fewer images than a LoRA needs.
    #[error("dataset has {count} images; at least {min} are needed")]
    TooFewImages {
        /// Images found.
        count: usize,
        /// Minimum.
        min: usize,
    },
    /// More images than accepted.
    #[error("dataset has {count} images; at most {max} are accepted")]
    TooManyImages {
        /// Images found.
        count: usize,
        /// Maximum.
        max: usize,
    },
}

/// Size limits that stop decompression bombs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Uncompressed bytes per entry.
    pub max_entry_bytes: u64,
    /// Uncompressed bytes in total.
    pub max_total_bytes: u64,
    /// Uncompressed/compressed ratio, checked for entries above `ratio_floor_bytes`.
    pub max_ratio: f64,
    /// Entries smaller than this skip the ratio check (tiny captions compress well).
    pub ratio_floor_bytes: u64,
    /// Width and height limit in pixels.
    pub max_side: u32,
    /// Decoder allocation limit in bytes.
    pub max_alloc: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entry_bytes: 64 << 20,
            max_total_bytes: 2 << 30,
            max_ratio: 50.0,
            ratio_floor_bytes: 1 << 20,
            max_side: 12_000,
            max_alloc: 1 << 30,
        }
    }
}

/// One validated training image: its encoded bytes and final caption.
#[derive(Clone)]
pub struct Sample {
    /// Entry name in the zip.
    pub name: String,
    /// The encoded image (decoded again when latents are cached, to keep memory low).
    pub bytes: Vec<u8>,
    /// Caption with the trigger word (sensitive: never logged).
    pub caption: String,
}

impl std::fmt::Debug for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sample")
            .field("name", &self.name)
            .field("bytes", &self.bytes.len())
            .field("caption", &"<redacted>")
            .finish()
    }
}

enum Kind {
    Image,
    Caption,
    Ignored,
}

fn kind_of(name: &str) -> Option<Kind> {
    let base = name.rsplit('/').next().unwrap_or(name);
    if name.ends_with('/') || name.starts_with("__MACOSX/") || base.starts_with('.') {
        return Some(Kind::Ignored);
    }
    let ext = base.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("jpg" | "jpeg" | "png" | "webp") => Some(Kind::Image),
        Some("txt") => Some(Kind::Caption),
        _ => None,
    }
}

fn is_unsafe_path(name: &str) -> bool {
    name.starts_with('/')
        || name.starts_with('\\')
        || name.as_bytes().get(1) == Some(&b':')
        || name.split(['/', '\\']).any(|c| c == "..")
}

fn stem(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

/// The caption for an image: its `.txt` (trigger word prepended when missing) or, without
/// one, the trigger word and the concept description.
pub fn caption_for(text: Option<&str>, trigger: &str, description: Option<&str>) -> String {
    let text = text.map(str::trim).filter(|t| !t.is_empty());
    match text {
        Some(t) if t.to_lowercase().contains(&trigger.to_lowercase()) => t.to_string(),
        Some(t) => format!("{trigger}, {t}"),
        None => match description.map(str::trim).filter(|d| !d.is_empty()) {
            Some(d) => format!("{trigger}, {d}"),
            None => trigger.to_string(),
        },
    }
}

/// Reads and checks a dataset zip; returns the images in archive order.
pub fn validate(
    zip_bytes: &[u8],
    trigger: &str,
    description: Option<&str>,
    limits: &Limits,
) -> Result<Vec<Sample>, DatasetError> {
    let mut archive = zip::ZipArchive::new(Cursor::new(zip_bytes))
        .map_err(|e| DatasetError::OpenZip(e.to_string()))?;
    let mut images: Vec<(String, Vec<u8>)> = Vec::new();
    let mut captions: std::collections::HashMap<String, String> = Default::default();
    let mut total = 0u64;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| DatasetError::ReadEntry {
            file: format!("#{i}"),
            reason: e.to_string(),
        })?;
        let file = match entry.name() {
            Ok(n) => n.to_string(),
            Err(_) => String::from_utf8_lossy(entry.name_raw()).into_owned(),
        };
        if is_unsafe_path(&file) || entry.enclosed_name().is_none() {
            return Err(DatasetError::UnsafePath { file });
        }
        let kind =
            kind_of(&file).ok_or_else(|| DatasetError::UnsupportedFile { file: file.clone() })?;
        if entry.is_dir() || matches!(kind, Kind::Ignored) {
            continue;
        }
        let declared = entry.size();
        if declared > limits.max_entry_bytes {
            return Err(DatasetError::EntryTooLarge {
                file,
                bytes: declared,
                limit: limits.max_entry_bytes,
            });
        }
        let ratio = declared as f64 / entry.compressed_size().max(1) as f64;
        if declared >= limits.ratio_floor_bytes && ratio > limits.max_ratio {
            return Err(DatasetError::CompressionRatio {
                file,
                ratio,
                limit: limits.max_ratio,
            });
        }
        total += declared;
        if total > limits.max_total_bytes {
            return Err(DatasetError::TotalTooLarge {
                file,
                bytes: total,
                limit: limits.max_total_bytes,
            });
        }
        // Never trust the header: read at most one byte more than declared.
        let mut bytes = Vec::with_capacity(declared as usize);
        (&mut entry)
            .take(declared + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| DatasetError::ReadEntry {
                file: file.clone(),
                reason: e.to_string(),
            })?;
        if bytes.len() as u64 != declared {
            return Err(DatasetError::SizeMismatch { file, declared });
        }
        match kind {
            Kind::Image => {
                check_image(&file, &bytes, limits)?;
                images.push((file, bytes));
            }
            Kind::Caption => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| DatasetError::BadCaption { file: file.clone() })?;
                captions.insert(stem(&file).to_string(), text);
            }
            Kind::Ignored => {}
        }
    }
    if images.len() < MIN_IMAGES {
        return Err(DatasetError::TooFewImages {
            count: images.len(),
            min: MIN_IMAGES,
        });
    }
    if images.len() > MAX_IMAGES {
        return Err(DatasetError::TooManyImages {
            count: images.len(),
            max: MAX_IMAGES,
        });
    }
    Ok(images
        .into_iter()
        .map(|(name, bytes)| {
            let caption = caption_for(
                captions.get(stem(&name)).map(String::as_str),
                trigger,
                description,
            );
            Sample {
                name,
                bytes,
                caption,
            }
        })
        .collect())
}

fn image_limits(limits: &Limits) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_alloc);
    l
}

/// Decodes an image with the dimension and allocation limits, accepting only jpeg/png/webp
/// by content (not by extension).
pub fn decode(file: &str, bytes: &[u8], limits: &Limits) -> Result<DynamicImage, DatasetError> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DatasetError::CorruptImage {
            file: file.to_string(),
            reason: e.to_string(),
        })?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => {}
        Some(other) => {
            return Err(DatasetError::UnsupportedImage {
                file: file.to_string(),
                format: format!("{other:?}").to_lowercase(),
            });
        }
        None => {
            return Err(DatasetError::CorruptImage {
                file: file.to_string(),
                reason: "not a recognisable image".into(),
            });
        }
    }
    reader.limits(image_limits(limits));
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => DatasetError::ImageTooLarge {
            file: file.to_string(),
            reason: l.to_string(),
        },
        other => DatasetError::CorruptImage {
            file: file.to_string(),
            reason: other.to_string(),
        },
    })
}

fn check_image(file: &str, bytes: &[u8], limits: &Limits) -> Result<(), DatasetError> {
    let img = decode(file, bytes, limits)?;
    if img.width() == 0 || img.height() == 0 {
        return Err(DatasetError::CorruptImage {
            file: file.to_string(),
            reason: "image has no pixels".into(),
        });
    }
    Ok(())
}

/// An image ready for the VAE, with SDXL's size conditioning.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// (3, res, res) channel-major pixels in [-1, 1].
    pub pixels: Vec<f32>,
    /// Side length.
    pub resolution: u32,
    /// Original (height, width).
    pub original_size: (u32, u32),
    /// Crop top-left (top, left) in the resized image.
    pub crop_top_left: (u32, u32),
}

impl Prepared {
    /// SDXL's `add_time_ids`: original size, crop top-left, target size.
    pub fn time_ids(&self) -> [f32; 6] {
        let r = self.resolution as f32;
        [
            self.original_size.0 as f32,
            self.original_size.1 as f32,
            self.crop_top_left.0 as f32,
            self.crop_top_left.1 as f32,
            r,
            r,
        ]
    }
}

/// Resizes the short side to `res` and takes the centre `res`×`res` square.
pub fn center_crop(img: &DynamicImage, res: u32) -> Prepared {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let scale = res as f64 / w.min(h) as f64;
    let nw = ((w as f64 * scale).round() as u32).max(res);
    let nh = ((h as f64 * scale).round() as u32).max(res);
    let resized = img.resize_exact(nw, nh, FilterType::CatmullRom).to_rgb8();
    let left = (nw - res) / 2;
    let top = (nh - res) / 2;
    let plane = (res * res) as usize;
    let mut pixels = vec![0f32; 3 * plane];
    for y in 0..res {
        for x in 0..res {
            let p = resized.get_pixel(left + x, top + y);
            let i = (y * res + x) as usize;
            for c in 0..3 {
                pixels[c * plane + i] = f32::from(p[c]) / 127.5 - 1.0;
            }
        }
    }
    Prepared {
        pixels,
        resolution: res,
        original_size: (h, w),
        crop_top_left: (top, left),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x as u8).wrapping_mul(seed), y as u8, seed])
        });
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn zip_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn five() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("a.png", png(40, 30, 1)),
            ("b.png", png(30, 40, 2)),
            ("b.txt", b"a photo of zqx on a beach".to_vec()),
            ("sub/c.PNG", png(32, 32, 3)),
            ("sub/c.txt", b"red hat".to_vec()),
            ("d.png", png(20, 20, 4)),
            ("e.png", png(50, 20, 5)),
            ("__MACOSX/._a.png", vec![0, 1, 2]),
            (".DS_Store", vec![0]),
        ]
    }

    fn err(entries: &[(&str, Vec<u8>)]) -> String {
        match validate(&zip_of(entries), "zqx", None, &Limits::default()) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn valid_dataset_gets_captions_with_trigger_word() {
        let s = validate(&zip_of(&five()), "zqx", Some("my dog"), &Limits::default()).unwrap();
        assert_eq!(s.len(), 5);
        let cap = |n: &str| s.iter().find(|x| x.name == n).unwrap().caption.clone();
        assert_eq!(cap("a.png"), "zqx, my dog");
        assert_eq!(cap("b.png"), "a photo of zqx on a beach");
        assert_eq!(cap("sub/c.PNG"), "zqx, red hat");
        assert!(!format!("{:?}", s[0]).contains("zqx"));
    }

    #[test]
    fn each_bad_input_is_named() {
        let mut e = five();
        e.push(("../evil.png", png(8, 8, 1)));
        assert!(err(&e).contains("../evil.png: unsafe path"), "{}", err(&e));
        let mut e = five();
        e.push(("notes.pdf", vec![1, 2, 3]));
        assert!(
            err(&e).contains("notes.pdf: unsupported file type"),
            "{}",
            err(&e)
        );
        let mut e = five();
        e.push(("broken.jpg", b"\xff\xd8\xff\xe0 not really".to_vec()));
        assert!(err(&e).contains("broken.jpg: corrupt image"), "{}", err(&e));
        let mut e = five();
        let mut gif = Vec::from(&b"GIF89a"[..]);
        gif.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0]);
        e.push(("anim.png", gif));
        assert!(
            err(&e).contains("anim.png: unsupported image format gif"),
            "{}",
            err(&e)
        );
        let mut e = five();
        e.push(("x.txt", vec![0xff, 0xfe, 0x00]));
        assert!(
            err(&e).contains("x.txt: caption is not UTF-8"),
            "{}",
            err(&e)
        );
        assert!(err(&five()[..4]).contains("has 3 images; at least 5"));
        let many: Vec<(String, Vec<u8>)> = (0..201)
            .map(|i| (format!("{i}.png"), png(4, 4, 1)))
            .collect();
        let refs: Vec<(&str, Vec<u8>)> =
            many.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
        assert!(err(&refs).contains("has 201 images; at most 200"));
        assert!(validate(b"PK not a zip", "t", None, &Limits::default()).is_err());
    }

    #[test]
    fn decompression_bombs_are_refused() {
        let mut e = five();
        e.push(("zeros.txt", vec![b'a'; 3 << 20]));
        let msg = err(&e);
        assert!(msg.contains("zeros.txt: compression ratio"), "{msg}");
        let small = Limits {
            max_entry_bytes: 100,
            ..Limits::default()
        };
        let msg = validate(&zip_of(&five()), "t", None, &small)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("a.png") && msg.contains("exceeds the 100-byte limit"),
            "{msg}"
        );
        let total = Limits {
            max_total_bytes: 300,
            ..Limits::default()
        };
        let msg = validate(&zip_of(&five()), "t", None, &total)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("in total exceeds"), "{msg}");
        let pixels = Limits {
            max_side: 35,
            ..Limits::default()
        };
        let msg = validate(&zip_of(&five()), "t", None, &pixels)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("a.png: image too large"), "{msg}");
    }

    #[test]
    fn header_lying_about_size_is_caught() {
        // Stored (uncompressed) entry whose declared sizes are patched to be smaller than
        // the real data, as a bomb would declare.
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (n, d) in five() {
            w.start_file(n, stored).unwrap();
            w.write_all(&d).unwrap();
        }
        w.start_file("liar.txt", stored).unwrap();
        w.write_all(&[b'x'; 4000]).unwrap();
        let mut bytes = w.finish().unwrap().into_inner();
        patch_sizes(&mut bytes, "liar.txt", 100);
        let msg = validate(&bytes, "t", None, &Limits::default())
            .err()
            .unwrap()
            .to_string();
        // zip's reader notices the extra bytes before our own size comparison does.
        assert!(
            msg.contains("liar.txt") && msg.contains("larger than its declared"),
            "{msg}"
        );
    }

    /// Rewrites the uncompressed size of `name` in its local and central headers.
    fn patch_sizes(bytes: &mut [u8], name: &str, size: u32) {
        let n = name.as_bytes();
        for sig_off in 0..bytes.len().saturating_sub(46) {
            let sig = &bytes[sig_off..sig_off + 4];
            let (size_at, name_at) = if sig == b"PK\x03\x04" {
                (sig_off + 22, sig_off + 30)
            } else if sig == b"PK\x01\x02" {
                (sig_off + 24, sig_off + 46)
            } else {
                continue;
            };
            if bytes.get(name_at..name_at + n.len()) == Some(n) {
                bytes[size_at..size_at + 4].copy_from_slice(&size.to_le_bytes());
            }
        }
    }

    #[test]
    fn center_crop_keeps_the_middle_and_reports_geometry() {
        // 80x40 image, left half black, right half white: the centre 40x40 straddles both.
        let img = image::RgbImage::from_fn(80, 40, |x, _| {
            if x < 40 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let p = center_crop(&DynamicImage::ImageRgb8(img), 32);
        assert_eq!(p.pixels.len(), 3 * 32 * 32);
        assert_eq!(p.original_size, (40, 80));
        assert_eq!(p.crop_top_left, (0, 16));
        assert_eq!(p.time_ids(), [40.0, 80.0, 0.0, 16.0, 32.0, 32.0]);
        assert!(p.pixels[0] < -0.9 && p.pixels[31] > 0.9);
        assert!(p.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
    }
}
