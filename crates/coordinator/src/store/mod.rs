//! The coordinator's store: the [`State`] as records (endpoints,
//! deployments, promotions, workers, routers, each event of the history),
//! each pass writing only the records that changed, in one transaction,
//! and nothing when nothing changed.
//!
//! Two backends behind [`Backend`]: the embedded one (SQLite, one file in
//! `[store] path`, crash-safe at every commit; a JSON store of the first
//! format is migrated on first start) and etcd, whose writes are guarded
//! by the coordinator's leadership ([`etcd`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Instant;

use crate::state::State;

pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
mod records;
#[cfg(test)]
mod tests;

pub use embedded::Embedded;
#[cfg(feature = "etcd")]
pub use etcd::Etcd;

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system or database error.
    #[error("{store}: {reason}")]
    Io {
        /// The store (its path, or etcd's endpoints and prefix).
        store: String,
        /// Why.
        reason: String,
    },
    /// The store holds what this coordinator cannot read.
    #[error("{store}: not a crossfade coordinator store ({reason})")]
    Corrupt {
        /// The store.
        store: String,
        /// What is wrong.
        reason: String,
    },
    /// The store cannot be reached now (etcd down or cut off); the write
    /// may be tried again.
    #[error("{store}: unavailable: {reason}")]
    Unavailable {
        /// The store.
        store: String,
        /// Why.
        reason: String,
    },
    /// This coordinator is no longer the leader: the write was refused.
    #[error("{store}: this coordinator is no longer the leader; the write was refused")]
    Deposed {
        /// The store.
        store: String,
    },
}

impl StoreError {
    /// Trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// One transaction's changes, each key once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Records written.
    pub puts: BTreeMap<String, Vec<u8>>,
    /// Records deleted.
    pub deletes: BTreeSet<String>,
    /// Every record under each of these prefixes is deleted.
    pub delete_prefixes: BTreeSet<String>,
}

impl Batch {
    fn put(&mut self, key: String, value: Vec<u8>) {
        self.deletes.remove(&key);
        self.puts.insert(key, value);
    }

    fn delete(&mut self, key: String) {
        self.puts.remove(&key);
        self.deletes.insert(key);
    }

    fn delete_prefix(&mut self, prefix: String) {
        self.puts.retain(|k, _| !k.starts_with(&prefix));
        self.deletes.retain(|k| !k.starts_with(&prefix));
        self.delete_prefixes.insert(prefix);
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty() && self.delete_prefixes.is_empty()
    }

    /// Bytes of keys and values it writes.
    pub fn bytes(&self) -> usize {
        self.puts
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            + self.deletes.iter().map(String::len).sum::<usize>()
            + self.delete_prefixes.iter().map(String::len).sum::<usize>()
    }

    /// Operations in it.
    pub fn operations(&self) -> usize {
        self.puts.len() + self.deletes.len() + self.delete_prefixes.len()
    }
}

/// Where records live.
pub trait Backend: Send {
    /// Every record, in key order.
    fn load(&mut self) -> impl Future<Output = Result<Vec<(String, Vec<u8>)>, StoreError>> + Send;
    /// Applies `batch` as one transaction: all of it or none.
    fn write(&mut self, batch: &Batch) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The store, for messages: a path, or etcd's endpoints and prefix.
    fn describe(&self) -> String;
}

/// One of the backends.
#[derive(Debug)]
pub enum Backends {
    /// SQLite.
    Embedded(Embedded),
    /// etcd.
    #[cfg(feature = "etcd")]
    Etcd(Box<Etcd>),
}

impl Backend for Backends {
    async fn load(&mut self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self {
            Self::Embedded(b) => b.load().await,
            #[cfg(feature = "etcd")]
            Self::Etcd(b) => b.load().await,
        }
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), StoreError> {
        match self {
            Self::Embedded(b) => b.write(batch).await,
            #[cfg(feature = "etcd")]
            Self::Etcd(b) => b.write(batch).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Embedded(b) => b.describe(),
            #[cfg(feature = "etcd")]
            Self::Etcd(b) => b.describe(),
        }
    }
}

/// The store: a backend and what was written to it last.
#[derive(Debug)]
pub struct Store<B = Backends> {
    backend: B,
    /// What the backend holds; `None` after a failed write, when it is read
    /// back before the next diff.
    written: Option<records::Written>,
}

impl<B: Backend> Store<B> {
    /// Reads every record of `backend`: the store and the state it holds
    /// (the empty state for an empty store).
    pub async fn open(mut backend: B) -> Result<(Self, State), StoreError> {
        let (written, state) = read(&mut backend).await?;
        Ok((
            Self {
                backend,
                written: Some(written),
            },
            state,
        ))
    }

    /// The store, for messages.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Writes the records that changed since the last save, in one
    /// transaction; nothing when nothing changed. On an error nothing is
    /// written and the next save tries the same changes again.
    pub async fn save(&mut self, state: &State) -> Result<(), StoreError> {
        let mut written = match self.written.take() {
            Some(written) => written,
            None => read(&mut self.backend).await?.0,
        };
        let mut batch = Batch::default();
        written.diff(state, &mut batch);
        if batch.is_empty() {
            self.written = Some(written);
            return Ok(());
        }
        let started = Instant::now();
        self.backend.write(&batch).await?;
        // Only now: after a failure, what the backend holds is read back
        // at the next save instead of believed.
        self.written = Some(written);
        crate::metrics::store_written(&batch, started.elapsed());
        Ok(())
    }

    /// The backend.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }
}

/// The first key after every key that starts with `prefix` (a text key:
/// its last character is not `char::MAX`).
fn prefix_end(prefix: &str) -> String {
    let mut end: Vec<char> = prefix.chars().collect();
    if let Some(last) = end.pop() {
        end.push(char::from_u32(u32::from(last) + 1).unwrap_or(char::MAX));
    }
    end.into_iter().collect()
}

async fn read<B: Backend>(backend: &mut B) -> Result<(records::Written, State), StoreError> {
    let records = backend.load().await?;
    records::Written::load(records).map_err(|reason| StoreError::Corrupt {
        store: backend.describe(),
        reason,
    })
}
