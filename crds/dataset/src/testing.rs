//! Datasets for tests and benchmarks: real images (they must decode) zipped with captions.

use std::io::{Cursor, Write};

use image::{ImageFormat, RgbImage};

/// A `w`×`h` PNG with a pattern that varies with `seed`.
pub fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    encode(w, h, seed, ImageFormat::Png)
}

/// A `w`×`h` JPEG with a pattern that varies with `seed`.
pub fn jpeg(w: u32, h: u32, seed: u8) -> Vec<u8> {
    encode(w, h, seed, ImageFormat::Jpeg)
}

fn encode(w: u32, h: u32, seed: u8, format: ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x as u8).wrapping_mul(seed), y as u8, seed])
    });
    let mut out = Cursor::new(Vec::new());
    // Encoding an in-memory RGB image into a Vec cannot fail for these formats; an empty
    // result would make the test that uses it fail visibly.
    let _ = img.write_to(&mut out, format);
    out.into_inner()
}

/// A zip with the given (name, bytes) entries, deflated.
pub fn zip_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        if w.start_file(*name, opts).is_err() || w.write_all(bytes).is_err() {
            return Vec::new();
        }
    }
    w.finish().map(|c| c.into_inner()).unwrap_or_default()
}

/// A valid dataset of `n` small PNG images, each with a caption naming the trigger `zxq`.
pub fn dataset(n: usize) -> Vec<u8> {
    let entries: Vec<(String, Vec<u8>)> = (0..n)
        .flat_map(|i| {
            [
                (format!("img{i}.png"), png(16 + i as u32 % 8, 16, i as u8)),
                (format!("img{i}.txt"), b"a photo of zxq".to_vec()),
            ]
        })
        .collect();
    let refs: Vec<(&str, Vec<u8>)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    zip_of(&refs)
}
