//! `crossfade keys`: the router's API keys file. A key is printed once,
//! when it is made; the file keeps only its salted hash. A router reads
//! the file again within seconds of a change.

use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use crossfade_router::keys::KeyFile;

use crate::output::{Output, say};

/// The keys file when `--file` is not given.
const DEFAULT_FILE: &str = "/etc/crossfade/api-keys.toml";

/// `crossfade keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it (once: only its hash is kept).
    Add {
        /// The keys file (the router's `auth.api_keys`).
        #[arg(long, default_value = DEFAULT_FILE)]
        file: PathBuf,
        /// Who or what holds it (letters, digits, `-`, `_`, `.`).
        #[arg(long)]
        name: String,
        /// Its requests in flight at once (0: the router's per-client limit).
        #[arg(long, default_value_t = 0)]
        max_concurrent: u32,
        /// An endpoint it may call (repeatable; every endpoint when none).
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
    },
    /// List the keys (never their secrets).
    List {
        /// The keys file.
        #[arg(long, default_value = DEFAULT_FILE)]
        file: PathBuf,
    },
    /// Revoke a key, by id or name: routers refuse it within seconds.
    Revoke {
        /// The keys file.
        #[arg(long, default_value = DEFAULT_FILE)]
        file: PathBuf,
        /// The key's id or name.
        #[arg(value_name = "ID_OR_NAME")]
        which: String,
    },
}

/// Runs a `keys` command.
pub fn run(command: KeysCommand, out: Output) -> anyhow::Result<()> {
    match command {
        KeysCommand::Add {
            file,
            name,
            max_concurrent,
            endpoints,
        } => {
            let valid = |s: &str| {
                !s.is_empty()
                    && s.len() <= 64
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            };
            if !valid(&name) {
                bail!("--name: 1 to 64 letters, digits, `-`, `_` and `.`");
            }
            if let Some(bad) = endpoints.iter().find(|e| !valid(e)) {
                bail!(
                    "--endpoint `{}`: 1 to 64 letters, digits, `-`, `_` and `.`",
                    crate::output::clean(bad)
                );
            }
            let mut keys = KeyFile::load(&file).map_err(anyhow::Error::msg)?;
            let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            let key = keys
                .add(&name, max_concurrent, endpoints, created.to_string())
                .map_err(anyhow::Error::msg)?;
            keys.save(&file).map_err(anyhow::Error::msg)?;
            match out {
                Output::Json => println!("{}", serde_json::json!({"name": name, "key": key})),
                Output::Text => {
                    eprintln!("the key of `{name}`; it is not stored, so keep it now:");
                    println!("{key}");
                }
            }
        }
        KeysCommand::List { file } => {
            let keys = KeyFile::load(&file).map_err(anyhow::Error::msg)?;
            match out {
                Output::Json => println!("{}", serde_json::to_string(&keys.keys)?),
                Output::Text => {
                    say!(
                        "{:<14} {:<20} {:<22} {:<8} {:>8}  ENDPOINTS",
                        "ID",
                        "NAME",
                        "CREATED",
                        "STATE",
                        "MAX"
                    );
                    for key in &keys.keys {
                        say!(
                            "{:<14} {:<20} {:<22} {:<8} {:>8}  {}",
                            key.id,
                            key.name,
                            key.created,
                            if key.revoked { "revoked" } else { "active" },
                            key.max_concurrent,
                            if key.endpoints.is_empty() {
                                "all".to_owned()
                            } else {
                                key.endpoints.join(",")
                            }
                        );
                    }
                }
            }
        }
        KeysCommand::Revoke { file, which } => {
            let mut keys = KeyFile::load(&file).map_err(anyhow::Error::msg)?;
            let revoked = keys.revoke(&which);
            if revoked == 0 {
                bail!(
                    "no active key has the id or name `{}`",
                    crate::output::clean(&which)
                );
            }
            keys.save(&file).map_err(anyhow::Error::msg)?;
            say!("revoked {revoked} key(s)");
        }
    }
    Ok(())
}
