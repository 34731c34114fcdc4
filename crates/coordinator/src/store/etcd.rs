//! The etcd backend: records as keys under a prefix, every write one etcd
//! transaction. Once the coordinator leads ([`crate::election`]), every
//! write is guarded by its leadership key: the transaction succeeds only
//! while that key exists with the revision it was created at, so a deposed
//! leader's writes fail ([`StoreError::Deposed`]) however late they arrive.
//!
//! etcd refuses a transaction of more than `--max-txn-ops` operations
//! (128 by default) or `--max-request-bytes` (1.5 MiB): a coordinator of a
//! large fleet needs both raised (see `deploy/config/coordinator.toml`);
//! the error says so.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp,
};

use super::{Backend, Batch, StoreError};

/// Records read per request when loading.
const PAGE: i64 = 1000;

/// The leadership that guards writes: the election's key and the revision
/// it was created at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// The leadership key.
    pub key: Vec<u8>,
    /// Its creation revision.
    pub revision: i64,
}

/// etcd at some endpoints, under a prefix.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    endpoints: Vec<String>,
    prefix: String,
    guard: Option<Guard>,
    timeout: Duration,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// A client of etcd at `endpoints` (`host:port` or URLs), for the
    /// records under `prefix`; every call bounded by `timeout`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let describe = describe(endpoints, prefix);
        // No timeout on the client: a campaign waits as long as it takes;
        // every other call is bounded here, and the keep-alive pings find a
        // dead connection.
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout)
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| StoreError::Unavailable {
                store: describe.clone(),
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| classify(&describe, &e))?;
        Ok(Self {
            client,
            endpoints: endpoints.to_vec(),
            prefix: prefix.to_owned(),
            guard: None,
            timeout,
        })
    }

    /// Every later write succeeds only while `guard` holds.
    pub fn guard(&mut self, guard: Guard) {
        self.guard = Some(guard);
    }

    /// The client, for the election.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The prefix of its records.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `call`, bounded by the store's timeout; etcd's errors as the
    /// store's (unreachable etcd is [`StoreError::Unavailable`]).
    pub(crate) async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|e| classify(&self.describe(), &e)),
            Err(_) => Err(StoreError::Unavailable {
                store: self.describe(),
                reason: format!("no answer within {:?}", self.timeout),
            }),
        }
    }
}

fn describe(endpoints: &[String], prefix: &str) -> String {
    format!("etcd {} (prefix `{prefix}`)", endpoints.join(","))
}

/// Errors of etcd worth another try are `Unavailable`.
fn classify(store: &str, e: &etcd_client::Error) -> StoreError {
    use tonic::Code;
    let retryable = match e {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    };
    let mut reason = e.to_string();
    if reason.contains("too many operations") || reason.contains("request is too large") {
        reason.push_str(
            " (raise etcd's --max-txn-ops and --max-request-bytes: a promotion of a large \
             endpoint writes one record per replica it moves)",
        );
    }
    if retryable {
        StoreError::Unavailable {
            store: store.to_owned(),
            reason,
        }
    } else {
        StoreError::Io {
            store: store.to_owned(),
            reason,
        }
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Backend for Etcd {
    async fn load(&mut self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut records = Vec::new();
        let end = prefix_end(self.prefix.as_bytes());
        let mut from = self.prefix.as_bytes().to_vec();
        // Paged, each page at the revision of the first: one consistent read.
        let mut revision = 0;
        loop {
            let mut kv = self.client.kv_client();
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_revision(revision);
            let page = self.bounded(kv.get(from.clone(), Some(options))).await?;
            if revision == 0 {
                revision = page
                    .header()
                    .map_or(0, etcd_client::ResponseHeader::revision);
            }
            for kv in page.kvs() {
                let key = kv.key_str().map_err(|e| StoreError::Corrupt {
                    store: self.describe(),
                    reason: e.to_string(),
                })?;
                let key = key.strip_prefix(&self.prefix).unwrap_or(key);
                records.push((key.to_owned(), kv.value().to_vec()));
            }
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(records),
            }
        }
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let full = |key: &str| format!("{}{key}", self.prefix);
        let mut operations = Vec::with_capacity(batch.operations());
        for prefix in &batch.delete_prefixes {
            operations.push(TxnOp::delete(
                full(prefix),
                Some(DeleteOptions::new().with_prefix()),
            ));
        }
        for key in &batch.deletes {
            operations.push(TxnOp::delete(full(key), None));
        }
        for (key, value) in &batch.puts {
            operations.push(TxnOp::put(full(key), value.clone(), None));
        }
        let compares: Vec<Compare> = self
            .guard
            .iter()
            .map(|g| Compare::create_revision(g.key.clone(), CompareOp::Equal, g.revision))
            .collect();
        let txn = Txn::new().when(compares).and_then(operations);
        let mut kv = self.client.kv_client();
        let response = self.bounded(kv.txn(txn)).await?;
        if response.succeeded() {
            Ok(())
        } else {
            Err(StoreError::Deposed {
                store: self.describe(),
            })
        }
    }

    fn describe(&self) -> String {
        describe(&self.endpoints, &self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_after_every_key_it_starts() {
        assert_eq!(prefix_end(b"/crossfade/"), b"/crossfade0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
