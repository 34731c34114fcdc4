//! Counts per key of what is in progress (requests per client, requests
//! held per endpoint), bounded per key: a key is in the map only while its
//! count is above 0, so the map stays as small as what is in flight.
//!
//! A request that does not wait adds and removes its client once each:
//! the map hashes with foldhash (seeded per process, as hashbrown's
//! default), not SipHash, which cost a fifth of admission's instructions.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// See the module.
#[derive(Debug)]
pub struct Tally<K>(Mutex<Counts<K>>);

/// The counts, by key.
pub type Counts<K> = HashMap<K, u32, foldhash::fast::RandomState>;

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::default()))
    }
}

impl<K: Hash + Eq + Clone> Tally<K> {
    /// The counts now.
    pub fn lock(&self) -> MutexGuard<'_, Counts<K>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One more under `key`, unless it already has `limit`: the new count.
    pub fn add(&self, key: &K, limit: u32) -> Option<u32> {
        let mut counts = self.lock();
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= limit {
            if *count == 0 {
                counts.remove(key);
            }
            return None;
        }
        *count += 1;
        Some(*count)
    }

    /// One fewer under `key`: the count left.
    pub fn remove(&self, key: &K) -> u32 {
        let mut counts = self.lock();
        let Some(count) = counts.get_mut(key) else {
            return 0;
        };
        *count = count.saturating_sub(1);
        let left = *count;
        if left == 0 {
            counts.remove(key);
        }
        left
    }
}
