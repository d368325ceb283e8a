//! The customer's dataset: a zip of jpeg/png/webp images with optional same-name `.txt`
//! captions. It is checked before any training starts by `loraplane-dataset`, under the rules
//! the operator copied from the platform config (the ones the API checked the upload
//! against), and read in memory (never extracted), so a rejected dataset leaves nothing
//! behind. Here: captions with the trigger word, and the crop to the training resolution.
//!
//! Images are then centre-cropped to the training resolution; the crop geometry is kept for
//! SDXL's size/crop conditioning.

use image::{DynamicImage, imageops::FilterType};
use loraplane_dataset::{DatasetError, DatasetRules, Entry, Item};

/// One training image: its encoded bytes and final caption.
#[derive(Clone)]
pub struct Sample {
    /// Its entry in the zip (messages name it by number only).
    pub entry: Entry,
    /// The encoded image (decoded again when latents are cached, to keep memory low).
    pub bytes: Vec<u8>,
    /// Caption with the trigger word (sensitive: never logged).
    pub caption: String,
}

impl std::fmt::Debug for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sample")
            .field("entry", &self.entry)
            .field("bytes", &self.bytes.len())
            .field("caption", &"<redacted>")
            .finish()
    }
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

/// Checks a dataset zip under the platform's rules (the API's own checks, from
/// `loraplane-dataset`) and captions its images; returns them in archive order.
pub fn validate(
    zip_bytes: &[u8],
    trigger: &str,
    description: Option<&str>,
    rules: &DatasetRules,
) -> Result<Vec<Sample>, DatasetError> {
    let items = loraplane_dataset::read(
        std::io::Cursor::new(zip_bytes),
        zip_bytes.len() as u64,
        rules,
    )?;
    Ok(items
        .into_iter()
        .map(
            |Item {
                 entry,
                 bytes,
                 caption,
             }| Sample {
                caption: caption_for(caption.as_deref(), trigger, description),
                entry,
                bytes,
            },
        )
        .collect())
}

/// Decodes a sample's image under the same limits it was checked with.
pub fn decode(sample: &Sample, rules: &DatasetRules) -> Result<DynamicImage, DatasetError> {
    loraplane_dataset::decode(&sample.entry, &sample.bytes, rules)
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
    use loraplane_dataset::testing::{png, zip_of};

    #[test]
    fn images_get_captions_with_the_trigger_word() {
        let zip = zip_of(&[
            ("a.png", png(40, 30, 1)),
            ("b.png", png(30, 40, 2)),
            ("b.txt", b"a photo of zqx on a beach".to_vec()),
            ("sub/c.PNG", png(32, 32, 3)),
            ("sub/c.txt", b"red hat".to_vec()),
            ("d.png", png(20, 20, 4)),
            ("e.png", png(50, 20, 5)),
        ]);
        let s = validate(&zip, "zqx", Some("my dog"), &DatasetRules::default()).unwrap();
        assert_eq!(s.len(), 5);
        let cap = |n: &str| {
            s.iter()
                .find(|x| x.entry.name == n)
                .unwrap()
                .caption
                .clone()
        };
        assert_eq!(cap("a.png"), "zqx, my dog");
        assert_eq!(cap("b.png"), "a photo of zqx on a beach");
        assert_eq!(cap("sub/c.PNG"), "zqx, red hat");
        assert!(!format!("{:?}", s[0]).contains("zqx"));
        let few = validate(
            &zip,
            "zqx",
            None,
            &DatasetRules {
                min_images: 6,
                ..DatasetRules::default()
            },
        );
        assert_eq!(few.err().map(|e| e.code()), Some("upload_image_count"));
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
