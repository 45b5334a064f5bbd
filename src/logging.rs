//! Process-wide tracing setup: `--log-level` (a level or a full `EnvFilter` directive such
//! as `info,berth_scheduler=debug`; `RUST_LOG` wins when set) and `--log-format text|json`.

use anyhow::Context;
use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Installs the global subscriber. Fails with the directive's error when it does not parse.
pub(crate) fn init(level: &str, format: LogFormat) -> anyhow::Result<()> {
    // EnvFilter reads a lone word as a target name ("verbose" = everything from a module
    // called verbose), which silently logs nothing useful: a lone word must be a level.
    if !level.contains([',', '=']) && !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
        anyhow::bail!(
            "--log-level {level:?} is not a level ({}) or a filter like \"info,berth_scheduler=debug\"",
            LEVELS.join(", ")
        );
    }
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => EnvFilter::try_new(&directive)
            .with_context(|| format!("RUST_LOG={directive:?} is not a valid log filter"))?,
        _ => EnvFilter::try_new(level)
            .with_context(|| format!("--log-level {level:?} is not a level or log filter"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}
