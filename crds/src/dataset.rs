//! The dataset contract: what a customer's zip may contain and how large it may be. One set of
//! rules in the platform config, read by the API when it checks an upload and handed by the
//! operator to the trainer in its config, so a dataset the API accepted is one the trainer
//! trains on. The checks themselves are `loraplane-dataset`'s; this module holds only the
//! numbers and the naming rules, so the operator does not link an image decoder.

use serde::{Deserialize, Serialize};

/// The limits of a dataset. Every field has a default; the platform config may tighten them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DatasetRules {
    /// Largest zip in bytes (larger uploads are refused and deleted).
    #[schemars(range(min = 1))]
    pub max_zip_bytes: u64,
    /// Largest inflated size of one entry in bytes.
    #[schemars(range(min = 1))]
    pub max_entry_bytes: u64,
    /// Largest inflated size of all entries together in bytes.
    #[schemars(range(min = 1))]
    pub max_total_bytes: u64,
    /// Largest inflated/compressed ratio of an entry of at least `ratioFloorBytes`.
    #[schemars(range(min = 1))]
    pub max_ratio: u32,
    /// Entries smaller than this skip the ratio check (short captions compress well).
    pub ratio_floor_bytes: u64,
    /// Largest width and height of an image in pixels.
    #[schemars(range(min = 1))]
    pub max_side: u32,
    /// Most bytes the decoder may allocate for one image (a 16-bit RGBA 50 MP PNG needs 400 MB,
    /// an 8-bit RGB one 150 MB): the memory one check needs besides the entry itself.
    #[schemars(range(min = 1))]
    pub max_decode_bytes: u64,
    /// Fewest images.
    #[schemars(range(min = 1))]
    pub min_images: u32,
    /// Most images.
    #[schemars(range(min = 1))]
    pub max_images: u32,
}

impl Default for DatasetRules {
    fn default() -> Self {
        DatasetRules {
            max_zip_bytes: 512 << 20,
            max_entry_bytes: 64 << 20,
            max_total_bytes: 2 << 30,
            max_ratio: 50,
            ratio_floor_bytes: 1 << 20,
            max_side: 12_000,
            max_decode_bytes: 256 << 20,
            min_images: 5,
            max_images: 200,
        }
    }
}

/// Why a set of rules is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RulesError {
    /// A limit is zero or the image counts are reversed.
    #[error("dataset rules: {0}")]
    Invalid(&'static str),
}

impl DatasetRules {
    /// Refuses rules no dataset could pass.
    pub fn validate(&self) -> Result<(), RulesError> {
        let positive = [
            self.max_zip_bytes,
            self.max_entry_bytes,
            self.max_total_bytes,
            u64::from(self.max_ratio),
            u64::from(self.max_side),
            self.max_decode_bytes,
            u64::from(self.min_images),
        ];
        if positive.contains(&0) {
            return Err(RulesError::Invalid(
                "every limit and minImages must be positive",
            ));
        }
        if self.min_images > self.max_images {
            return Err(RulesError::Invalid("minImages must not exceed maxImages"));
        }
        Ok(())
    }

    /// A short stable digest of the rules. A check recorded under one fingerprint does not
    /// vouch for a dataset once the rules change.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let text = format!(
            "{}/{}/{}/{}/{}/{}/{}/{}/{}",
            self.max_zip_bytes,
            self.max_entry_bytes,
            self.max_total_bytes,
            self.max_ratio,
            self.ratio_floor_bytes,
            self.max_side,
            self.max_decode_bytes,
            self.min_images,
            self.max_images
        );
        let mut h = hex::encode(Sha256::digest(text.as_bytes()));
        h.truncate(16);
        h
    }
}

/// What an entry of the zip is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A `.png`, `.jpg`, `.jpeg` or `.webp` image (the content is checked too).
    Image,
    /// A `.txt` caption for the image with the same stem.
    Caption,
    /// A directory, a hidden file (`.DS_Store`, `._x`) or macOS's `__MACOSX/` folder: skipped.
    Skipped,
    /// Anything else: the dataset is refused.
    Unsupported,
}

/// Classifies an entry by its name (case-insensitive extension).
pub fn entry_kind(name: &str) -> EntryKind {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    if name.ends_with('/') || name.starts_with("__MACOSX/") || base.starts_with('.') {
        return EntryKind::Skipped;
    }
    let ext = base.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("jpg" | "jpeg" | "png" | "webp") => EntryKind::Image,
        Some("txt") => EntryKind::Caption,
        _ => EntryKind::Unsupported,
    }
}

/// Whether a name could escape the folder it is unpacked into (absolute, a drive letter, a NUL
/// or a `..` component).
pub fn is_unsafe_path(name: &str) -> bool {
    name.starts_with('/')
        || name.starts_with('\\')
        || name.contains('\0')
        || name.as_bytes().get(1) == Some(&b':')
        || name.split(['/', '\\']).any(|c| c == "..")
}

/// The name without its extension: an image and its caption share it.
pub fn stem(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_classified_as_both_sides_read_them() {
        assert_eq!(entry_kind("a.PNG"), EntryKind::Image);
        assert_eq!(entry_kind("dir/b.jpeg"), EntryKind::Image);
        assert_eq!(entry_kind("b.txt"), EntryKind::Caption);
        assert_eq!(entry_kind("__MACOSX/._a.png"), EntryKind::Skipped);
        assert_eq!(entry_kind("sub/.hidden.png"), EntryKind::Skipped);
        assert_eq!(entry_kind("sub/"), EntryKind::Skipped);
        assert_eq!(entry_kind("run.sh"), EntryKind::Unsupported);
        assert_eq!(entry_kind("noext"), EntryKind::Unsupported);
        for bad in [
            "../x.png",
            "/x.png",
            "\\x.png",
            "C:x.png",
            "a/../../x.png",
            "a\0.png",
        ] {
            assert!(is_unsafe_path(bad), "{bad}");
        }
        assert!(!is_unsafe_path("a/b..c.png"));
        assert_eq!(stem("a/b.c.png"), "a/b.c");
    }

    #[test]
    fn rules_that_refuse_everything_are_refused_and_changes_change_the_fingerprint() {
        let d = DatasetRules::default();
        assert_eq!(d.validate(), Ok(()));
        let reversed = DatasetRules {
            min_images: 10,
            max_images: 2,
            ..d
        };
        assert!(reversed.validate().is_err());
        let zero = DatasetRules { max_side: 0, ..d };
        assert!(zero.validate().is_err());
        let tighter = DatasetRules {
            max_images: 199,
            ..d
        };
        assert_ne!(d.fingerprint(), tighter.fingerprint());
        assert_eq!(d.fingerprint(), DatasetRules::default().fingerprint());
        let yaml: DatasetRules = serde_yaml::from_str("maxImages: 20\n").unwrap();
        assert_eq!((yaml.max_images, yaml.min_images), (20, 5));
    }
}
