//! The logging convention every loraplane binary follows: `tracing` with a human format by
//! default and one JSON object per line with `--log-format json` (what log collectors want),
//! filtered by `RUST_LOG` (default `info`).
//!
//! Never pass sensitive fields (concept description, trigger word, captions, emails, payment
//! ids) to a log macro; the types that hold them redact their `Debug` output as a second line
//! of defence.

use tracing_subscriber::EnvFilter;

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Errors of setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// A global subscriber was already installed.
    #[error("could not install the log subscriber: {0}")]
    InstallSubscriber(String),
}

/// Installs the global subscriber. Call once at the start of `main`.
pub fn init(format: LogFormat) -> Result<(), LoggingError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| LoggingError::InstallSubscriber(e.to_string()))
}
