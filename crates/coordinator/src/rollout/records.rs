//! A rollout as the store keeps it (and as a lost store is rebuilt): its head (every scalar) and one record
//! per entry of each collection, so that a change writes the entries that
//! changed. A worker's view is kept only while it says something the
//! coordinator cannot learn again from the agent's next status: the worker
//! runs or starts an engine, or the rollout uses it. An idle worker's view
//! is not kept.

use serde::Serialize;

use super::*;

/// Where a rollout's records go.
pub trait Records {
    /// Entry `key` of collection `field` is now `value` (JSON; empty for a
    /// set's member).
    fn put(&mut self, field: &str, key: &str, value: Vec<u8>);
    /// Entry `key` of collection `field` is gone.
    fn delete(&mut self, field: &str, key: &str);
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn diff_map<V: PartialEq + Serialize>(
    field: &str,
    old: Option<&BTreeMap<String, V>>,
    new: &BTreeMap<String, V>,
    keep_old: impl Fn(&str, &V) -> bool,
    keep_new: impl Fn(&str, &V) -> bool,
    out: &mut dyn Records,
) {
    if let Some(old) = old {
        for (key, value) in old {
            if keep_old(key, value) && !new.get(key).is_some_and(|v| keep_new(key, v)) {
                out.delete(field, key);
            }
        }
    }
    for (key, value) in new {
        if !keep_new(key, value) {
            continue;
        }
        let before = old.and_then(|o| o.get(key)).filter(|v| keep_old(key, v));
        if before != Some(value) {
            out.put(field, key, json(value));
        }
    }
}

fn diff_set(
    field: &str,
    old: Option<&BTreeSet<String>>,
    new: &BTreeSet<String>,
    out: &mut dyn Records,
) {
    if let Some(old) = old {
        for key in old.difference(new) {
            out.delete(field, key);
        }
    }
    for key in new {
        if !old.is_some_and(|o| o.contains(key)) {
            out.put(field, key, Vec::new());
        }
    }
}

/// A worker's view worth keeping (see the module's documentation).
fn keeps(claimed: &BTreeSet<String>, id: &str, worker: &Worker) -> bool {
    worker.deployment.is_some() || worker.engine != Engine::Idle || claimed.contains(id)
}

impl Rollout {
    /// A rollout that has ended with `routed` (worker → `deployment`) in
    /// the table: what a coordinator on a lost store adopts from a router's
    /// table, so that the endpoint keeps serving.
    pub fn adopted(
        deployment: &str,
        settings: PromotionSettings,
        routed: BTreeMap<String, String>,
    ) -> Self {
        let target = u32::try_from(routed.len()).unwrap_or(u32::MAX);
        let mut rollout = Self::new("", deployment, settings, target, BTreeMap::new(), routed);
        rollout.status = Status::Succeeded;
        rollout.step = 1;
        rollout.phase = Phase::Stabilizing;
        rollout.overhead_done = true;
        rollout
    }

    /// What history keeps of a rollout that no longer decides anything:
    /// its state and its table, not its view of every worker.
    pub fn archive(&mut self) {
        self.workers.clear();
        self.applied_over.clear();
        self.starting.clear();
        self.ready.clear();
        self.scaling.clear();
        self.removes.clear();
        self.leaving.clear();
        self.failed.clear();
    }

    /// Takes `other`'s clock: the store compares what it keeps, and does
    /// not keep the clock.
    pub fn sync_clock(&mut self, other: &Self) {
        self.now_ms = other.now_ms;
    }

    /// A copy without its collections: what the head record holds.
    pub fn head(&self) -> Self {
        Self {
            from: self.from.clone(),
            to: self.to.clone(),
            settings: self.settings,
            target: self.target,
            status: self.status,
            step: self.step,
            phase: self.phase,
            reason: self.reason.clone(),
            waiting: self.waiting.clone(),
            workers: BTreeMap::new(),
            routed: BTreeMap::new(),
            seq: self.seq,
            acked: self.acked,
            direction: self.direction,
            pause: self.pause.clone(),
            overhead_done: self.overhead_done,
            starting: BTreeSet::new(),
            ready: BTreeSet::new(),
            scaling: BTreeMap::new(),
            applied_over: BTreeMap::new(),
            removes: BTreeSet::new(),
            leaving: BTreeMap::new(),
            failed: BTreeSet::new(),
            now_ms: self.now_ms,
            stabilize_until: self.stabilize_until,
            judge_until: self.judge_until,
        }
    }

    /// This rollout as the store gives it back: without the views it does
    /// not keep (and without its clock).
    #[cfg(test)]
    pub fn as_stored(&self) -> Self {
        let claimed = self.claimed();
        let mut stored = self.clone();
        stored
            .workers
            .retain(|id, worker| keeps(&claimed, id, worker));
        stored.now_ms = 0;
        stored
    }

    /// The entries that turn `old`'s records into `new`'s (all of them when
    /// there is no `old`). Compares without allocating; serializes only
    /// what changed.
    pub fn diff_records(old: Option<&Self>, new: &Self, out: &mut dyn Records) {
        let old_claimed = old.map(Self::claimed).unwrap_or_default();
        let new_claimed = new.claimed();
        diff_map(
            "workers",
            old.map(|o| &o.workers),
            &new.workers,
            |id, w| keeps(&old_claimed, id, w),
            |id, w| keeps(&new_claimed, id, w),
            out,
        );
        let all = |_: &str, _: &_| true;
        diff_map("routed", old.map(|o| &o.routed), &new.routed, all, all, out);
        diff_map(
            "applied_over",
            old.map(|o| &o.applied_over),
            &new.applied_over,
            |_, _| true,
            |_, _| true,
            out,
        );
        diff_map(
            "scaling",
            old.map(|o| &o.scaling),
            &new.scaling,
            all,
            all,
            out,
        );
        diff_map(
            "leaving",
            old.map(|o| &o.leaving),
            &new.leaving,
            |_, _| true,
            |_, _| true,
            out,
        );
        diff_set("starting", old.map(|o| &o.starting), &new.starting, out);
        diff_set("ready", old.map(|o| &o.ready), &new.ready, out);
        diff_set("removes", old.map(|o| &o.removes), &new.removes, out);
        diff_set("failed", old.map(|o| &o.failed), &new.failed, out);
    }

    /// Takes one entry back from the store.
    pub fn load_record(&mut self, field: &str, key: &str, value: &[u8]) -> Result<(), String> {
        fn parse<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, String> {
            serde_json::from_slice(value).map_err(|e| e.to_string())
        }
        let key = key.to_owned();
        match field {
            "workers" => {
                self.workers.insert(key, parse(value)?);
            }
            "routed" => {
                self.routed.insert(key, parse(value)?);
            }
            "applied_over" => {
                self.applied_over.insert(key, parse(value)?);
            }
            "scaling" => {
                self.scaling.insert(key, parse(value)?);
            }
            "leaving" => {
                self.leaving.insert(key, parse(value)?);
            }
            "starting" => {
                self.starting.insert(key);
            }
            "ready" => {
                self.ready.insert(key);
            }
            "removes" => {
                self.removes.insert(key);
            }
            "failed" => {
                self.failed.insert(key);
            }
            other => return Err(format!("a rollout has no collection `{other}`")),
        }
        Ok(())
    }
}
