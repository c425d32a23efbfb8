//! Log setup: tracing to stderr, as text or JSON, at `--log-level` unless
//! `RUST_LOG` says otherwise. Secrets never reach a log: credentials are held
//! in types whose `Debug` output is redacted, and no code logs them.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        // Our own crate at the requested level, dependencies one step quieter.
        let deps = match level {
            "trace" | "debug" => "info",
            _ => "warn",
        };
        // fuser warns about expected events (unmounting an already unmounted
        // file system); its errors still show.
        EnvFilter::new(format!("{deps},fuser=error,bucketfs={level}"))
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
