//! The regular expressions the generated schemas share (the chart's values schema and the
//! configuration types behind it), so a rule is spelt once.

/// A DNS label (RFC 1123): what region, pool and namespace names must be. The schema form of
/// what `validate` checks for region names.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// An S3 bucket name: 3 to 63 lowercase letters, digits, dots and dashes (what `validate`
/// checks), starting and ending with a letter or digit (as S3 requires).
pub const BUCKET_PATTERN: &str = "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$";
/// An `http://` or `https://` URL.
pub const HTTP_URL_PATTERN: &str = "^https?://";
