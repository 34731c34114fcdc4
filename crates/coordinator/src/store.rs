//! The embedded, file-backed store: the whole [`State`] as one JSON file,
//! replaced atomically (written to a temporary file, synced, renamed over
//! the old one, the directory synced). A coordinator killed at any instant
//! finds either the state before a change or the state after it, never a
//! mix. Written with mode 0600: templates may hold secrets.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::State;

/// The file's format; a file of another one is refused, not guessed at.
const FORMAT: u32 = 1;

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a store this coordinator can read.
    #[error("{path}: not a crossfade coordinator store ({reason})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct OnDisk<S> {
    format: u32,
    state: S,
}

/// The store at one path.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// The store at `path` (created at the first save).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state saved last, or the empty state when there is no file yet.
    pub fn load(&self) -> Result<State, StoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let disk: OnDisk<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if disk.format != FORMAT {
            return Err(corrupt(format!(
                "format {} (this coordinator reads {FORMAT})",
                disk.format
            )));
        }
        serde_json::from_value(disk.state).map_err(|e| corrupt(e.to_string()))
    }

    /// Replaces the saved state with `state`, durably.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        let text = serde_json::to_vec(&OnDisk {
            format: FORMAT,
            state,
        })
        .map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        crossfade_common::files::write_private(&self.path, &text).map_err(io)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::state::{Endpoint, RouterRecord, WorkerRecord};

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("crossfade-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_state_survives_a_reload_in_a_private_file() {
        let dir = dir("reload");
        let store = Store::new(dir.join("coordinator.json"));
        assert_eq!(store.load().unwrap(), State::default());
        let mut state = State {
            epoch: 3,
            table_version: 17,
            ..State::default()
        };
        let mut endpoint = Endpoint::new("chat", 1000);
        endpoint.record(1001, "created", "endpoint created".into(), "");
        state.endpoints.insert("chat".into(), endpoint);
        state.workers.insert(
            "10.0.0.1:7002".into(),
            WorkerRecord {
                address: "10.0.0.1:7002".into(),
                cordoned: true,
                cordon_reason: "GPU unhealthy".into(),
                gate_address: "10.0.0.1:8000".into(),
                stop_pending: true,
            },
        );
        state.routers.insert(
            "10.0.0.9:7001".into(),
            RouterRecord {
                address: "10.0.0.9:7001".into(),
                acknowledged_version: 17,
            },
        );
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut temporary = store.path().as_os_str().to_owned();
        temporary.push(".tmp");
        assert!(!PathBuf::from(temporary).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_foreign_or_future_file_is_refused_not_overwritten() {
        let dir = dir("foreign");
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::new(dir.join("coordinator.json"));
        std::fs::write(store.path(), r#"{"format": 9, "state": {}}"#).unwrap();
        let error = store.load().unwrap_err().to_string();
        assert!(
            error.contains("format 9 (this coordinator reads 1)"),
            "{error}"
        );
        std::fs::write(store.path(), "{").unwrap();
        assert!(
            store
                .load()
                .unwrap_err()
                .to_string()
                .contains("not a crossfade coordinator store")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
