//! Agents' statuses on their way to the actor, coalesced per agent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use crossfade_proto::v1;

use crate::rollout::Action;

/// Each agent's latest status, as its watch delivered it: only the latest
/// matters, so a burst of statuses from one agent is one entry (bounded by
/// the fleet, however fast agents report), and the actor takes them all at
/// once, in one pass.
#[derive(Default)]
pub(super) struct Statuses {
    /// By agent: its status, or `None` when it cannot be reached.
    latest: std::sync::Mutex<BTreeMap<String, Option<Box<v1::WorkerStatus>>>>,
    /// Wakes the actor (a permit is kept when it is busy).
    pub(super) arrived: tokio::sync::Notify,
}

impl Statuses {
    pub(super) fn put(&self, address: &str, status: Option<Box<v1::WorkerStatus>>) {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(address.to_owned(), status);
        self.arrived.notify_one();
    }

    pub(super) fn take(&self) -> BTreeMap<String, Option<Box<v1::WorkerStatus>>> {
        std::mem::take(
            &mut *self
                .latest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl super::Actor {
    /// Takes in every agent's latest status, then lets rollouts see the
    /// workers once.
    pub(super) fn statuses_arrived(&mut self, actions: &mut Vec<(String, Action)>) {
        let mut changed = BTreeSet::new();
        for (address, status) in self.statuses.take() {
            if let Some(engine) = status.as_ref().and_then(|s| s.engine.as_ref()) {
                self.learn_id(&engine.deployment_id, &address);
            }
            let observed = self.observed.entry(address.clone()).or_default();
            let obeyed = status.as_ref().map_or(0, |s| s.coordinator_epoch);
            match status {
                Some(mut status) => {
                    // Kept in the store: a restarted coordinator builds
                    // the same table before the agent reports again.
                    if let Some(record) = self.state.workers.get_mut(&address)
                        && record.gate_address != status.gate_address
                    {
                        record.gate_address.clone_from(&status.gate_address);
                    }
                    // A heartbeat that says nothing new changes nothing.
                    let news = !observed.reachable
                        || observed.status.as_ref().is_none_or(|before| {
                            let at = std::mem::replace(&mut status.observed_at, before.observed_at);
                            let differs = **before != *status;
                            status.observed_at = at;
                            differs
                        });
                    if news {
                        changed.insert(address.clone());
                    }
                    observed.status = Some(Arc::new(*status));
                    observed.reachable = true;
                    observed.last_seen = Some(SystemTime::now());
                }
                None => {
                    if observed.reachable {
                        changed.insert(address.clone());
                    }
                    observed.reachable = false;
                }
            }
            self.learn_epoch(obeyed, &format!("agent {address}"), actions);
        }
        if !changed.is_empty() {
            self.refresh_workers(Some(&changed), actions);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn status(revision: u64) -> Option<Box<v1::WorkerStatus>> {
        Some(Box::new(v1::WorkerStatus {
            revision,
            ..Default::default()
        }))
    }

    #[tokio::test]
    async fn a_burst_from_one_agent_is_its_latest_status_and_wakes_once() {
        let statuses = Statuses::default();
        for revision in 1..=100 {
            statuses.put("a:1", status(revision));
        }
        statuses.put("b:1", None);
        statuses.put("b:1", status(7));
        // The permit kept for the actor, which was busy.
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            statuses.arrived.notified(),
        )
        .await
        .unwrap();
        let taken = statuses.take();
        assert_eq!(taken.len(), 2);
        assert_eq!(taken["a:1"].as_ref().map(|s| s.revision), Some(100));
        assert_eq!(taken["b:1"].as_ref().map(|s| s.revision), Some(7));
        assert!(statuses.take().is_empty());
        statuses.put("a:1", None);
        assert_eq!(statuses.take()["a:1"], None);
    }
}
