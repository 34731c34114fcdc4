//! The embedded backend: SQLite (bundled), one file at `[store] path`,
//! private to the coordinator (mode 0600: templates may hold secrets).
//! Every write is one transaction, durable when it commits (rollback
//! journal, `synchronous = FULL`): a coordinator killed at any instant
//! finds the records before a change or after it. Deleted records are
//! overwritten (`secure_delete`), so a deleted template's secrets do not
//! linger in free pages. The file stays locked while the coordinator runs
//! (`locking_mode = EXCLUSIVE`): a second coordinator on it is refused.
//!
//! A store of the first format (the whole state as one JSON file) is
//! migrated on first start, at the same path or from `state.json` beside a
//! new default path; the JSON file is kept beside it as `*.v1.json`.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode};
use serde::Deserialize;

use super::{Backend, Batch, StoreError};
use crate::state::State;

/// The first format's file.
#[derive(Deserialize)]
struct V1<S> {
    format: u32,
    state: S,
}

/// SQLite at one path.
pub struct Embedded {
    db: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("path", &self.path)
            .finish()
    }
}

impl Embedded {
    /// Opens (or creates) the store at `path`, migrating a JSON store of
    /// the first format found there or beside it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let io = |reason: String| StoreError::Io {
            store: path.display().to_string(),
            reason,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
        if is_json(path) {
            migrate(path, path)?;
        } else if !path.exists() {
            let legacy = path.with_file_name("state.json");
            if legacy != path && is_json(&legacy) {
                migrate(&legacy, path)?;
            }
        }
        let db = create(path)?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }
}

fn is_json(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| bytes.first() == Some(&b'{'))
}

/// The database at `path`, created private when there is none, locked.
fn create(path: &Path) -> Result<Connection, StoreError> {
    let io = |reason: String| StoreError::Io {
        store: path.display().to_string(),
        reason,
    };
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(e.to_string()))?;
    let db = Connection::open(path).map_err(|e| io(e.to_string()))?;
    // The lock is taken by the empty exclusive transaction and kept.
    db.execute_batch(
        "PRAGMA locking_mode = EXCLUSIVE;
         PRAGMA journal_mode = DELETE;
         PRAGMA synchronous = FULL;
         PRAGMA secure_delete = ON;
         BEGIN EXCLUSIVE;
         CREATE TABLE IF NOT EXISTS records (
             key TEXT PRIMARY KEY NOT NULL,
             value BLOB NOT NULL
         ) WITHOUT ROWID;
         COMMIT;",
    )
    .map_err(|e| match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            io("another coordinator has this store open (it is locked)".into())
        }
        _ => io(e.to_string()),
    })?;
    Ok(db)
}

/// Writes the JSON store at `from` as records into a new database at `to`
/// (through a temporary file renamed into place), keeping the JSON file
/// as `*.v1.json`. Interrupted at any point, the next start migrates again.
fn migrate(from: &Path, to: &Path) -> Result<(), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        store: from.display().to_string(),
        reason,
    };
    let io = |reason: String| StoreError::Io {
        store: from.display().to_string(),
        reason,
    };
    let text = std::fs::read(from).map_err(|e| io(e.to_string()))?;
    let v1: V1<serde_json::Value> =
        serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    if v1.format != 1 {
        return Err(corrupt(format!(
            "a JSON store of format {} (this coordinator migrates format 1)",
            v1.format
        )));
    }
    let v1 = V1::<State> {
        format: v1.format,
        state: serde_json::from_value(v1.state).map_err(|e| corrupt(e.to_string()))?,
    };
    let mut temporary = to.as_os_str().to_owned();
    temporary.push(".migrating");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    {
        let mut db = Embedded {
            db: create(&temporary)?,
            path: temporary.clone(),
        };
        let mut batch = Batch::default();
        super::records::Written::default().diff(&v1.state, &mut batch);
        db.write_now(&batch)?;
    }
    let mut backup = from.as_os_str().to_owned();
    backup.push(".v1.json");
    let backup = PathBuf::from(backup);
    if from == to {
        if !backup.exists() {
            std::fs::hard_link(from, &backup).map_err(|e| io(e.to_string()))?;
        }
        std::fs::rename(&temporary, to).map_err(|e| io(e.to_string()))?;
    } else {
        std::fs::rename(&temporary, to).map_err(|e| io(e.to_string()))?;
        std::fs::rename(from, &backup).map_err(|e| io(e.to_string()))?;
    }
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(e.to_string()))?;
    }
    tracing::info!(
        from = %from.display(),
        to = %to.display(),
        backup = %backup.display(),
        endpoints = v1.state.endpoints.len(),
        workers = v1.state.workers.len(),
        "migrated the JSON store of the first format to records"
    );
    Ok(())
}

impl Embedded {
    fn write_now(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let txn = self.db.transaction().map_err(|e| io_of(&self.path, e))?;
        {
            let io = |e| io_of(&self.path, e);
            let mut range = txn
                .prepare_cached("DELETE FROM records WHERE key >= ?1 AND key < ?2")
                .map_err(io)?;
            for prefix in &batch.delete_prefixes {
                range
                    .execute((prefix, super::prefix_end(prefix)))
                    .map_err(io)?;
            }
            let mut delete = txn
                .prepare_cached("DELETE FROM records WHERE key = ?1")
                .map_err(io)?;
            for key in &batch.deletes {
                delete.execute([key]).map_err(io)?;
            }
            let mut put = txn
                .prepare_cached(
                    "INSERT INTO records (key, value) VALUES (?1, ?2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .map_err(io)?;
            for (key, value) in &batch.puts {
                put.execute((key, value)).map_err(io)?;
            }
        }
        txn.commit().map_err(|e| io_of(&self.path, e))
    }

    fn load_now(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let io = |e| io_of(&self.path, e);
        let mut select = self
            .db
            .prepare_cached("SELECT key, value FROM records ORDER BY key")
            .map_err(io)?;
        let rows = select
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(io)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(io)
    }
}

fn io_of(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::Io {
        store: path.display().to_string(),
        reason: e.to_string(),
    }
}

impl Backend for Embedded {
    async fn load(&mut self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.load_now()
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.write_now(batch)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
