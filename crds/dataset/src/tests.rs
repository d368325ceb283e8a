//! The rules, each refusal with its code, and a property test of the reader on hostile bytes.

use std::io::{Cursor, Write};

use proptest::prelude::*;

use super::testing::{dataset, jpeg, png, zip_of};
use super::*;

const RULES: DatasetRules = DatasetRules {
    max_zip_bytes: 1 << 22,
    max_entry_bytes: 1 << 22,
    max_total_bytes: 1 << 23,
    max_ratio: 50,
    ratio_floor_bytes: 1 << 16,
    max_side: 4096,
    max_decode_bytes: 64 << 20,
    min_images: 2,
    max_images: 5,
};

fn checked(zip: &[u8], rules: &DatasetRules) -> Result<Summary, DatasetError> {
    check(Cursor::new(zip), zip.len() as u64, rules)
}

fn code(zip: &[u8]) -> &'static str {
    checked(zip, &RULES).map_or_else(|e| e.code(), |_| "ok")
}

#[test]
fn a_good_dataset_passes_and_captions_pair_with_their_images() {
    let zip = zip_of(&[
        ("a.png", png(40, 30, 1)),
        ("sub/b.JPG", jpeg(30, 40, 2)),
        ("sub/b.txt", b"red hat".to_vec()),
        ("__MACOSX/._a.png", vec![0, 1, 2]),
        ("sub/.DS_Store", vec![0]),
        ("dir/", vec![]),
    ]);
    let s = checked(&zip, &RULES).unwrap();
    assert_eq!((s.images, s.captions), (2, 1));
    let items = read(Cursor::new(&zip), zip.len() as u64, &RULES).unwrap();
    let names: Vec<(&str, Option<&str>)> = items
        .iter()
        .map(|i| (i.entry.name.as_str(), i.caption.as_deref()))
        .collect();
    assert_eq!(names, [("a.png", None), ("sub/b.JPG", Some("red hat"))]);
    assert!(!format!("{items:?}").contains("red hat"));
}

#[test]
fn each_problem_gets_its_own_code_and_names_the_entry_by_number_only() {
    let good = || vec![("a.png", png(8, 8, 1)), ("b.png", png(8, 8, 2))];
    let with = |extra: (&'static str, Vec<u8>)| {
        let mut e = good();
        e.push(extra);
        zip_of(&e)
    };
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"PK not really".to_vec(), "upload_not_zip"),
        (with(("../evil.png", png(4, 4, 1))), "upload_unsafe_path"),
        (with(("/abs.png", png(4, 4, 1))), "upload_unsafe_path"),
        (with(("run.sh", b"#!".to_vec())), "upload_unsupported_file"),
        (
            with(("fake.jpg", png(4, 4, 1)[..20].to_vec())),
            "upload_bad_image",
        ),
        (with(("anim.png", gif)), "upload_bad_image"),
        (with(("x.txt", vec![0xff, 0xfe])), "upload_bad_caption"),
        (
            with(("wide.png", png(5000, 1, 1))),
            "upload_image_too_large",
        ),
        (zip_of(&good()[..1]), "upload_image_count"),
        // 2 MiB of one byte deflates to a few KiB: far beyond a 50x ratio.
        (
            with(("zeros.txt", vec![b'a'; 2 << 20])),
            "upload_decompression_bomb",
        ),
    ];
    for (zip, want) in cases {
        let err = checked(&zip, &RULES).err();
        assert_eq!(err.as_ref().map(|e| e.code()), Some(want), "{err:?}");
        if let Some(entry) = err.as_ref().and_then(|e| e.entry()) {
            let msg = err.as_ref().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("entry #3"), "{msg}");
            assert!(!msg.contains(&entry.name), "{msg}");
            assert!(!entry.name.is_empty());
        }
    }
    let small = DatasetRules {
        max_zip_bytes: 10,
        ..RULES
    };
    assert_eq!(
        checked(&dataset(3), &small).map_err(|e| e.code()).err(),
        Some("upload_too_large")
    );
    assert_eq!(code(&dataset(6)), "upload_image_count");
    let per_file = DatasetRules {
        max_entry_bytes: 50,
        ..RULES
    };
    assert_eq!(
        checked(&dataset(3), &per_file).map_err(|e| e.code()).err(),
        Some("upload_entry_too_large")
    );
    let total = DatasetRules {
        max_total_bytes: 100,
        ..RULES
    };
    assert_eq!(
        checked(&dataset(3), &total).map_err(|e| e.code()).err(),
        Some("upload_decompression_bomb")
    );
}

#[test]
fn a_header_lying_about_its_size_is_caught() {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (n, d) in [("a.png", png(8, 8, 1)), ("b.png", png(8, 8, 2))] {
        w.start_file(n, opts).unwrap();
        w.write_all(&d).unwrap();
    }
    w.start_file("liar.txt", opts).unwrap();
    w.write_all(&[b'x'; 4000]).unwrap();
    let mut bytes = w.finish().unwrap().into_inner();
    patch_sizes(&mut bytes, "liar.txt", 100);
    let err = checked(&bytes, &RULES).err().unwrap();
    assert!(
        matches!(
            err,
            DatasetError::SizeMismatch { .. } | DatasetError::ReadEntry { .. }
        ),
        "{err}"
    );
    assert_eq!(err.entry().map(|e| e.number), Some(3));
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any corruption of a valid dataset is refused or accepted, never a panic, and no message
    /// quotes an entry's name.
    #[test]
    fn corrupted_zips_never_panic_or_leak_names(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut zip = zip_of(&[
            ("SECRETNAME-a.png", png(8, 8, 1)),
            ("SECRETNAME-a.txt", b"caption".to_vec()),
            ("SECRETNAME-b.png", png(9, 7, 2)),
        ]);
        for (at, byte) in flips {
            let i = at.index(zip.len());
            zip[i] = byte;
        }
        if let Some(at) = cut {
            zip.truncate(at.index(zip.len()));
        }
        if let Err(e) = checked(&zip, &RULES) {
            prop_assert!(!e.to_string().contains("SECRETNAME"), "{}", e);
        }
    }

    /// Arbitrary bytes are refused with a code, never a panic.
    #[test]
    fn arbitrary_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(checked(&bytes, &RULES).is_err());
    }
}
