//! `STATE_DIR/engine.json`: the engine this agent started, so that a
//! restarted agent can find it, check it is the same process, and adopt it
//! instead of reloading the model.
//!
//! The file holds the whole deployment (to restart the engine after a later
//! crash), secrets included, so it is written with mode 0600, atomically
//! (a temporary file renamed over the old one).

use std::path::{Path, PathBuf};

use crossfade_proto::v1;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use super::runtime::Identity;

const FILE: &str = "engine.json";
const FORMAT: u32 = 1;

/// What the state file records.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The engine process.
    pub identity: Identity,
    /// Its loopback port.
    pub port: u16,
    /// The runtime that started it.
    pub runtime: String,
    /// The deployment it runs.
    pub spec: v1::EngineSpec,
    /// When it was launched, in seconds since the Unix epoch.
    pub launched_at_unix: u64,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    pid: u32,
    start_ticks: u64,
    /// The container's name (container runtime).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    container: String,
    port: u16,
    runtime: String,
    deployment_id: String,
    launched_at_unix: u64,
    /// The `EngineSpec`, protobuf-encoded, in hex.
    spec: String,
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not one this agent wrote.
    #[error("{path}: not a state file of this agent ({reason})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The state file in `dir`.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file in `dir` (created when first written).
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join(FILE),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record, if there is one.
    pub fn load(&self) -> Result<Option<Record>, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let disk: OnDisk = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if disk.format != FORMAT {
            return Err(corrupt(format!(
                "format {} (expected {FORMAT})",
                disk.format
            )));
        }
        let bytes = crossfade_common::files::unhex(&disk.spec)
            .ok_or_else(|| corrupt("`spec` is not hex".into()))?;
        let spec = v1::EngineSpec::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        if spec.deployment_id != disk.deployment_id {
            return Err(corrupt("`spec` is of another deployment".into()));
        }
        Ok(Some(Record {
            identity: Identity {
                pid: disk.pid,
                start_ticks: disk.start_ticks,
                container: disk.container,
            },
            port: disk.port,
            runtime: disk.runtime,
            spec,
            launched_at_unix: disk.launched_at_unix,
        }))
    }

    /// Writes `record`, replacing any earlier one.
    pub fn save(&self, record: &Record) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let disk = OnDisk {
            format: FORMAT,
            pid: record.identity.pid,
            start_ticks: record.identity.start_ticks,
            container: record.identity.container.clone(),
            port: record.port,
            runtime: record.runtime.clone(),
            deployment_id: record.spec.deployment_id.clone(),
            launched_at_unix: record.launched_at_unix,
            spec: crossfade_common::files::hex(&record.spec.encode_to_vec()),
        };
        let text = serde_json::to_string_pretty(&disk).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        crossfade_common::files::write_private(&self.path, text.as_bytes()).map_err(io)
    }

    /// Forgets the engine (it was stopped).
    pub fn remove(&self) -> Result<(), StateError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("crossfade-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_record_survives_the_round_trip_in_a_private_file() {
        let dir = dir("round-trip");
        let file = StateFile::new(&dir);
        assert_eq!(file.load().unwrap(), None);
        let record = Record {
            identity: Identity {
                pid: 4242,
                start_ticks: 987_654,
                container: String::new(),
            },
            port: 8100,
            runtime: "process".into(),
            spec: v1::EngineSpec {
                deployment_id: "dep-1".into(),
                endpoint: "chat".into(),
                aliases: vec!["qwen".into()],
                template: Some(v1::Template {
                    model: "Qwen/Qwen3-8B".into(),
                    vllm_args: "--max-model-len 4096".into(),
                    ..Default::default()
                }),
                ready_timeout: None,
            },
            launched_at_unix: 1_700_000_000,
        };
        file.save(&record).unwrap();
        assert_eq!(file.load().unwrap(), Some(record));
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        file.remove().unwrap();
        assert_eq!(file.load().unwrap(), None);
        file.remove().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_foreign_file_is_refused_with_the_reason() {
        let dir = dir("foreign");
        std::fs::create_dir_all(&dir).unwrap();
        let file = StateFile::new(&dir);
        std::fs::write(file.path(), "{\"pid\": 1}").unwrap();
        let error = file.load().unwrap_err().to_string();
        assert!(error.contains("not a state file of this agent"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
