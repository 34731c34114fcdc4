//! Configuration loading, the same for every program: the TOML file, then
//! `CROSSFADE_<SECTION>__<KEY>` environment variables, then `--set KEY=VALUE`
//! flags (later wins), then the program's own [`Validate`]. An invalid
//! configuration is refused with a message naming the key, and where the
//! value came from, before anything is bound ([`load_or_exit`], status 64).
//! A variable without a section (`CROSSFADE_WORKER_ID`) counts only when it
//! names one of the program's top-level keys: `CROSSFADE_COORDINATOR` is
//! the CLI's, and a server in the same shell ignores it.
//!
//! The loader takes its sources as arguments ([`Sources`]), so tests never
//! touch the process environment.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "CROSSFADE_";

/// Separates the sections of a key in an environment variable's name:
/// `CROSSFADE_LISTEN__PUBLIC` is `listen.public`. Single underscores stay
/// part of a name (`CROSSFADE_ENGINE__STATE_DIR` is `engine.state_dir`).
pub const ENV_SEPARATOR: &str = "__";

/// Exit status for an invalid configuration (`EX_USAGE` in sysexits.h).
pub const EXIT_INVALID_CONFIG: i32 = 64;

/// Flags every program takes. Flatten it into the program's clap parser.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Configuration file (TOML). Without one, the defaults and the
    /// environment apply.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Override one key after the file and the environment, e.g.
    /// `--set listen.public=0.0.0.0:8080`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_assignment)]
    pub set: Vec<(String, String)>,
}

fn parse_assignment(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got `{s}`"))?;
    Ok((key.trim().to_owned(), value.to_owned()))
}

/// Where a configuration comes from, in the order they apply.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables (all of them; those without [`ENV_PREFIX`] are ignored).
    pub env: Vec<(String, String)>,
    /// `KEY=VALUE` overrides from flags, in order.
    pub flags: Vec<(String, String)>,
}

impl Sources {
    /// The sources named by the common flags, with the given environment.
    pub fn new(args: &CommonArgs, env: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            file: args.config.clone(),
            env: env.into_iter().collect(),
            flags: args.set.clone(),
        }
    }
}

/// A program's own checks, run after the configuration is parsed.
pub trait Validate {
    /// Every problem found, each naming its key; empty when valid.
    fn validate(&self) -> Vec<FieldError>;
}

/// One invalid key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted key, e.g. `promotion.max_surge_percent`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl FieldError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// An error when `value` lies outside `range`, naming both.
    pub fn check_range<T>(key: &str, value: T, range: RangeInclusive<T>) -> Option<Self>
    where
        T: PartialOrd + fmt::Display,
    {
        (!range.contains(&value)).then(|| {
            Self::new(
                key,
                format!(
                    "must be within {}..={}, got {value}",
                    range.start(),
                    range.end()
                ),
            )
        })
    }
}

impl FieldError {
    /// An error for each listener whose address another one, named before
    /// it, already has.
    pub fn distinct_listeners(listeners: &[(&str, std::net::SocketAddr)]) -> Vec<Self> {
        listeners
            .iter()
            .enumerate()
            .filter_map(|(i, (key, addr))| {
                listeners[..i]
                    .iter()
                    .find(|(_, a)| a == addr)
                    .map(|(other, _)| Self::new(*key, format!("{addr} is also {other}")))
            })
            .collect()
    }

    /// An error when the duration `value` lies outside `range`, naming both
    /// in the units a configuration file uses (`500ms`, `2m`).
    pub fn check_duration(
        key: &str,
        value: std::time::Duration,
        range: RangeInclusive<std::time::Duration>,
    ) -> Option<Self> {
        (!range.contains(&value)).then(|| {
            Self::new(
                key,
                format!(
                    "must be within {}..={}, got {}",
                    humantime::format_duration(*range.start()),
                    humantime::format_duration(*range.end()),
                    humantime::format_duration(value)
                ),
            )
        })
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}: {source}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's error, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// An environment variable or flag could not be applied.
    #[error("{origin}: {message}")]
    Override {
        /// The variable or flag.
        origin: String,
        /// Dotted key it names (may be malformed).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A key has the wrong type, an unknown name, or an unparsable value.
    // `message()`, not the error's Display, which repeats the key on a
    // second line.
    #[error("`{key}`{}: {}", origin.as_ref().map(|o| format!(" (from {o})")).unwrap_or_default(), source.message())]
    Invalid {
        /// Dotted key (the enclosing section, for an unknown key).
        key: String,
        /// Where the value came from, when not the file.
        origin: Option<String>,
        /// The deserializer's error.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The program's own checks failed.
    #[error("{}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Validation {
        /// Every problem found.
        errors: Vec<FieldError>,
    },
}

impl ConfigError {
    /// The keys this error is about, for tests and tooling.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Self::Read { .. } | Self::Syntax { .. } => Vec::new(),
            Self::Override { key, .. } | Self::Invalid { key, .. } => vec![key.as_str()],
            Self::Validation { errors } => errors.iter().map(|e| e.key.as_str()).collect(),
        }
    }
}

/// Loads, merges and validates a configuration.
///
/// `C` needs `Default` so that the type of a key set from the environment
/// can be read off the defaults: `CROSSFADE_AGENT__WORKER_ID=0042` stays the
/// string `"0042"` when `worker_id` is a string, and becomes a number only
/// where the key is one.
pub fn load<C>(sources: &Sources) -> Result<C, ConfigError>
where
    C: DeserializeOwned + Serialize + Default + Validate,
{
    let mut table = match &sources.file {
        Some(path) => read_file(path)?,
        None => toml::Table::new(),
    };
    let defaults = toml::Table::try_from(C::default()).unwrap_or_default();
    let mut origins = BTreeMap::new();

    for (origin, key, raw, from_env) in overrides(sources) {
        let path = parse_key(&key).map_err(|message| ConfigError::Override {
            origin: origin.clone(),
            key: key.clone(),
            message,
        })?;
        let existing = lookup(&table, &path).or_else(|| lookup(&defaults, &path));
        // `CROSSFADE_NAME` without a section is this program's only when
        // it names one of its top-level keys; otherwise it is another
        // program's (the CLI's `CROSSFADE_COORDINATOR`), not a mistake.
        if from_env && path.len() == 1 && existing.is_none() {
            continue;
        }
        let value = typed_value(&raw, existing).map_err(|message| ConfigError::Override {
            origin: origin.clone(),
            key: key.clone(),
            message: format!("`{key}` {message}"),
        })?;
        set(&mut table, &path, value).map_err(|message| ConfigError::Override {
            origin: origin.clone(),
            key: key.clone(),
            message,
        })?;
        origins.insert(path.join("."), origin);
    }

    let config: C = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = match e.path().to_string() {
            p if p == "." => "(top level)".to_owned(),
            p => p,
        };
        let origin = origins
            .iter()
            .find(|(k, _)| **k == key || k.starts_with(&format!("{key}.")))
            .map(|(_, o)| o.clone());
        ConfigError::Invalid {
            key,
            origin,
            source: Box::new(e.into_inner()),
        }
    })?;

    let errors = config.validate();
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Validation { errors })
    }
}

/// The whole start-up sequence of a program's configuration: load it from the
/// common flags and the process environment; with `--print-config`, print it
/// (secrets redacted) and exit 0; when invalid, print why and exit 64 before
/// the program binds anything.
pub fn load_or_exit<C>(program: &str, args: &CommonArgs) -> C
where
    C: DeserializeOwned + Serialize + Default + Validate,
{
    match load::<C>(&Sources::new(args, process_env())) {
        Ok(config) if args.print_config => {
            match toml::to_string_pretty(&config) {
                Ok(text) => print!("{text}"),
                Err(e) => {
                    eprintln!("{program}: cannot print the configuration: {e}");
                    std::process::exit(1);
                }
            }
            std::process::exit(0);
        }
        Ok(config) => config,
        Err(e) => {
            eprintln!("{program}: invalid configuration: {e}");
            std::process::exit(EXIT_INVALID_CONFIG);
        }
    }
}

/// The process environment, for [`Sources::new`]. Variables that are not
/// valid UTF-8 cannot be ours; they are skipped rather than a panic.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|source| ConfigError::Syntax {
            path: path.to_owned(),
            source: Box::new(source),
        })
}

/// Environment overrides (sorted by name, so the result never depends on the
/// order the OS lists them in), then flags in the order given.
fn overrides(sources: &Sources) -> Vec<(String, String, String, bool)> {
    let mut env: Vec<_> = sources
        .env
        .iter()
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            let key = rest
                .split(ENV_SEPARATOR)
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
                .join(".");
            Some((
                format!("environment variable {name}"),
                key,
                value.clone(),
                true,
            ))
        })
        .collect();
    env.sort();
    let flags = sources
        .flags
        .iter()
        .map(|(key, value)| (format!("--set {key}"), key.clone(), value.clone(), false));
    env.into_iter().chain(flags).collect()
}

fn parse_key(key: &str) -> Result<Vec<String>, String> {
    let segments: Vec<String> = key.split('.').map(str::to_owned).collect();
    let well_formed = segments.iter().all(|s| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    });
    if well_formed {
        Ok(segments)
    } else {
        Err(format!(
            "`{key}` is not a key: expected sections and a name of lowercase letters, \
             digits and `_`, joined by `.` (in a variable name, by `__`)"
        ))
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut table = table;
    for segment in parents {
        table = table.get(segment)?.as_table()?;
    }
    table.get(last)
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".to_owned());
    };
    let mut table = table;
    for (i, segment) in parents.iter().enumerate() {
        let entry = table
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is not a section", path[..=i].join(".")))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

/// Turns a raw string from the environment or a flag into a TOML value of the
/// type the key already has (from the file or the defaults). A key of unknown
/// type takes the value as TOML when it parses (`42`, `true`, `["a", "b"]`)
/// and as a string otherwise.
fn typed_value(raw: &str, existing: Option<&toml::Value>) -> Result<toml::Value, String> {
    match existing {
        Some(toml::Value::String(_)) => Ok(toml::Value::String(raw.to_owned())),
        Some(toml::Value::Array(items)) => match parse_literal(raw) {
            Some(v @ toml::Value::Array(_)) => Ok(v),
            // A list of strings may be written `a,b,c`, as is usual in the environment.
            _ if items.iter().all(toml::Value::is_str) => Ok(comma_list(raw)),
            _ => Err(format!("expects a TOML array, got `{raw}`")),
        },
        Some(other) => match parse_literal(raw) {
            Some(v) if v.same_type(other) => Ok(v),
            // Integers are accepted where floats are expected.
            Some(toml::Value::Integer(i)) if other.is_float() => Ok(toml::Value::Float(i as f64)),
            _ => Err(format!("expects {}, got `{raw}`", type_name(other))),
        },
        None => Ok(parse_literal(raw).unwrap_or_else(|| toml::Value::String(raw.to_owned()))),
    }
}

fn parse_literal(raw: &str) -> Option<toml::Value> {
    let mut doc = format!("v = {raw}").parse::<toml::Table>().ok()?;
    // A value with a newline could smuggle in more keys; accept exactly one.
    if doc.len() != 1 {
        return None;
    }
    doc.remove("v")
}

fn comma_list(raw: &str) -> toml::Value {
    toml::Value::Array(
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| toml::Value::String(s.to_owned()))
            .collect(),
    )
}

fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a section",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
