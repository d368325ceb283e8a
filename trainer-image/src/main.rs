//! `loraplane-trainer`: placeholder entry point. The real binary arrives with its issue; until then it
//! sets up logging the project's way and says what it is.

use clap::Parser;
use loraplane_crds::logging::{self, LogFormat};

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT")]
    log_format: LogFormat,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(err) = logging::init(args.log_format) {
        eprintln!("loraplane-trainer: {err}");
        return std::process::ExitCode::FAILURE;
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "loraplane-trainer is not implemented yet"
    );
    std::process::ExitCode::SUCCESS
}
