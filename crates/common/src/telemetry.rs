//! Log set-up: `tracing` to standard error (the journal, under systemd), as
//! text for people or JSON for machines, filtered the `RUST_LOG` way.

use std::io::IsTerminal as _;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

use crate::config::FieldError;

/// Filter used when neither `RUST_LOG` nor `log.filter` says otherwise.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// The `[log]` section every program's configuration embeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter, e.g. `info,hyper=warn`. `RUST_LOG`, when
    /// set, wins: it is what an operator reaches for while debugging.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: DEFAULT_LOG_FILTER.to_owned(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl LogConfig {
    /// Checks the filter; `key` is where this section sits (usually `log`).
    pub fn validate(&self, key: &str) -> Vec<FieldError> {
        match EnvFilter::try_new(&self.filter) {
            Ok(_) => Vec::new(),
            Err(e) => vec![FieldError::new(
                format!("{key}.filter"),
                format!("not a valid log filter ({e}); e.g. `info,hyper=warn`"),
            )],
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter does not parse.
    #[error("invalid log filter `{filter}`")]
    Filter {
        /// The filter as given.
        filter: String,
        /// The parser's error.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("a log subscriber is already installed")]
    AlreadyInstalled(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Installs the global subscriber. `rust_log` is the `RUST_LOG` variable's
/// value, passed in so that callers (and tests) decide where it comes from.
pub fn init(config: &LogConfig, rust_log: Option<&str>) -> Result<(), TelemetryError> {
    let filter = rust_log
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(&config.filter);
    let env_filter = EnvFilter::try_new(filter).map_err(|source| TelemetryError::Filter {
        filter: filter.to_owned(),
        source,
    })?;
    // Colours only for a person at a terminal, never in the journal or a file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(TelemetryError::AlreadyInstalled)
}

/// The body of every program's `main`: sets up logs (`RUST_LOG` wins over
/// `log`), starts a multi-threaded Tokio runtime, runs `program` on it, and
/// turns the outcome into an exit status, logging the error chain of a
/// failure.
pub fn run_program<F>(name: &str, log: &LogConfig, program: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::process::ExitCode;
    if let Err(e) = init(log, std::env::var("RUST_LOG").ok().as_deref()) {
        eprintln!("{name}: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the Tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(program) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_is_named_by_its_key() {
        let config = LogConfig {
            filter: "info,hyper=loud".into(),
            ..Default::default()
        };
        let errors = config.validate("log");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "log.filter");
        assert!(LogConfig::default().validate("log").is_empty());
    }

    #[test]
    fn format_reads_as_snake_case() {
        let config: LogConfig = toml::from_str("format = \"json\"").expect("valid");
        assert_eq!(config.format, LogFormat::Json);
        assert!(toml::from_str::<LogConfig>("format = \"xml\"").is_err());
    }
}
