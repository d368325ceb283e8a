//! Benchmark: the API's memory while it checks the largest dataset the default rules allow.
//! A zip just under `maxZipBytes` (512 MiB: incompressible 2400×2400 PNGs, plus one
//! 8000×8000 RGBA PNG whose decode needs 256 MB, the most `maxDecodeBytes` lets one image
//! take) is written to a file and streamed into SeaweedFS under 8 upload ids. Then the API's
//! own `validate_upload` checks one, and afterwards all 8 at once, with the default limit on
//! concurrent checks. Peak RSS is the kernel's high-water mark (`VmHWM`), reset before each
//! phase (`/proc/self/clear_refs`), of this process, which also hosts the test harness.
//! Prints one JSON object (and writes it to `--json PATH`); no assertions.
//!
//! `cargo run --release -p loraplane-api --example dataset-bench -- [--copies 8] [--json PATH]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use common::*;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use loraplane_dataset::DatasetRules;
use serde_json::json;

// As in production: the API binary uses mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// Uploads checked at once in the second phase.
    #[arg(long, default_value_t = 8)]
    copies: usize,
    /// Also write the report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets `VmHWM` to the current RSS.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the RSS high-water mark");
}

fn png_bytes(
    w: u32,
    h: u32,
    channels: usize,
    small: bool,
    mut pixel: impl FnMut(u32, u32, usize) -> u8,
) -> Vec<u8> {
    let mut raw = Vec::with_capacity(w as usize * h as usize * channels);
    for y in 0..h {
        for x in 0..w {
            for c in 0..channels {
                raw.push(pixel(x, y, c));
            }
        }
    }
    let mut out = Vec::new();
    let color = if channels == 4 {
        ExtendedColorType::Rgba8
    } else {
        ExtendedColorType::Rgb8
    };
    // Noise cannot be compressed, so it is written fast; the pattern is filtered and deflated
    // properly, so 256 MB of pixels fit in a small file.
    let (compression, filter) = if small {
        (CompressionType::Default, FilterType::Sub)
    } else {
        (CompressionType::Fast, FilterType::NoFilter)
    };
    PngEncoder::new_with_quality(&mut out, compression, filter)
        .write_image(&raw, w, h, color)
        .unwrap();
    out
}

/// Writes the largest dataset the default rules allow; returns its size and image count.
fn write_dataset(path: &Path, limit: u64) -> (u64, usize) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    // The decode-heavy one first: 8000×8000 RGBA is 256 MB of pixels from a small file.
    let big = png_bytes(8000, 8000, 4, true, |x, y, c| {
        ((x / 64 + y / 64) as u8) ^ (c as u8)
    });
    zip.start_file("huge.png", stored).unwrap();
    zip.write_all(&big).unwrap();
    eprintln!("the 8000x8000 RGBA image is {} bytes", big.len());
    let mut written = big.len() as u64;
    drop(big);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut images = 1;
    loop {
        // xorshift noise: PNG cannot compress it, so the file is as large as its pixels.
        let noise = png_bytes(2400, 2400, 3, false, |_, _, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        });
        // Leave room for the headers and the central directory.
        if written + noise.len() as u64 + 64 * 1024 > limit {
            break;
        }
        zip.start_file(format!("noise{images}.png"), stored)
            .unwrap();
        zip.write_all(&noise).unwrap();
        zip.start_file(format!("noise{images}.txt"), stored)
            .unwrap();
        zip.write_all(b"a photo of zxq").unwrap();
        written += noise.len() as u64;
        images += 1;
    }
    zip.finish().unwrap().flush().unwrap();
    (std::fs::metadata(path).unwrap().len(), images)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let rules = DatasetRules::default();
    let dir = tempfile_dir();
    let path = dir.join("dataset.zip");
    let t = Instant::now();
    let (size, images) = write_dataset(&path, rules.max_zip_bytes);
    eprintln!(
        "wrote a {size}-byte dataset of {images} images in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let h = Harness::start().await;
    let app = h.replica_with_rules(rules);
    let bucket = app
        .platform
        .region("eu-west")
        .unwrap()
        .buckets
        .datasets
        .clone();
    let mut ids = Vec::new();
    // One upload for the single check, then `copies` more for the checks at once (a checked
    // upload answers from its marker after, without a download).
    for i in 0..=args.copies.max(1) {
        let token = format!("{i:032x}");
        let key = loraplane_crds::layout::upload_key("acme", &token);
        h.s3.client()
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .body(
                aws_sdk_s3::primitives::ByteStream::from_path(&path)
                    .await
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        ids.push(format!("eu-west.{token}"));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let (idle, _) = rss();
    reset_peak();
    let t = Instant::now();
    app.validate_upload("acme", &ids[0], None).await.unwrap();
    let one_s = t.elapsed().as_secs_f64();
    let (_, one_peak) = rss();

    reset_peak();
    let t = Instant::now();
    let all = futures::future::join_all(
        ids[1..]
            .iter()
            .map(|id| app.validate_upload("acme", id, None)),
    )
    .await;
    let many_s = t.elapsed().as_secs_f64();
    let (_, many_peak) = rss();
    let passed = all.iter().filter(|r| r.is_ok()).count();

    let report = json!({
        "dataset_bytes": size,
        "dataset_images": images,
        "rules": {"max_zip_bytes": rules.max_zip_bytes, "max_entry_bytes": rules.max_entry_bytes,
                  "max_decode_bytes": rules.max_decode_bytes},
        "max_concurrent_validations": app.config.limits.max_concurrent_validations,
        "rss_idle_mib": idle,
        "one": {"seconds": one_s, "peak_rss_mib": one_peak, "over_idle_mib": one_peak - idle},
        "at_once": {"uploads": ids.len() - 1, "passed": passed, "seconds": many_s,
                    "peak_rss_mib": many_peak, "over_idle_mib": many_peak - idle},
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    if let Some(p) = args.json {
        std::fs::write(p, text).unwrap();
    }
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dataset-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
