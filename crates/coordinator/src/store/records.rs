//! How the [`State`] is laid out as records, and which records a change
//! touches.
//!
//! Keys (each part percent-escaped, so a `/` in a name cannot collide):
//!
//! | key | value |
//! |---|---|
//! | `meta` | format, epoch, table version, next id |
//! | `deployments/{id}` | a deployment |
//! | `workers/{address}`, `routers/{address}` | an agent, a router |
//! | `endpoints/{name}` | the endpoint's settings and pointers |
//! | `endpoints/{name}/events/{seq}` | one event of its history |
//! | `endpoints/{name}/past/{started}-{id}` | an ended promotion (its state, no worker) |
//! | `endpoints/{name}/promotion`, `.../last` | the live rollouts, without their collections |
//! | `endpoints/{name}/promotion/{field}/{key}` | one entry of a rollout's collection |
//!
//! A rollout's collections (its view of each worker, the table it wants,
//! the replicas starting, ready, leaving, ...) are split into one record
//! per entry, so that a step writes what it moved, not the endpoint.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Batch;
use crate::rollout::Rollout;
use crate::rollout::records::Records;
use crate::settings::{PromotionSettings, Scaling};
use crate::state::{Endpoint, EventRecord, Promotion, Selector, State};

/// The layout's version; a store of another one is refused.
pub const FORMAT: u32 = 2;

/// The two live rollouts of an endpoint.
const SLOTS: [&str; 2] = ["promotion", "last"];

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    epoch: u64,
    table_version: u64,
    next_id: u64,
}

/// An endpoint without its history and rollouts.
#[derive(Serialize, Deserialize)]
struct Head {
    name: String,
    aliases: Vec<String>,
    scaling: Scaling,
    settings: PromotionSettings,
    selector: Selector,
    active: Option<String>,
    candidate: Option<String>,
    event_seq: u64,
    created_at_ms: u64,
    updated_at_ms: u64,
}

impl Head {
    fn of(e: &Endpoint) -> Self {
        Self {
            name: e.name.clone(),
            aliases: e.aliases.clone(),
            scaling: e.scaling,
            settings: e.settings,
            selector: e.selector.clone(),
            active: e.active.clone(),
            candidate: e.candidate.clone(),
            event_seq: e.event_seq,
            created_at_ms: e.created_at_ms,
            updated_at_ms: e.updated_at_ms,
        }
    }

    fn same(a: &Endpoint, b: &Endpoint) -> bool {
        a.name == b.name
            && a.aliases == b.aliases
            && a.scaling == b.scaling
            && a.settings == b.settings
            && a.selector == b.selector
            && a.active == b.active
            && a.candidate == b.candidate
            && a.event_seq == b.event_seq
            && a.created_at_ms == b.created_at_ms
            && a.updated_at_ms == b.updated_at_ms
    }

    fn into_endpoint(self) -> Endpoint {
        Endpoint {
            name: self.name,
            aliases: self.aliases,
            scaling: self.scaling,
            settings: self.settings,
            selector: self.selector,
            active: self.active,
            candidate: self.candidate,
            promotion: None,
            last_promotion: None,
            past_promotions: VecDeque::new(),
            events: std::sync::Arc::default(),
            event_seq: self.event_seq,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        }
    }
}

/// A key part with `%` and `/` escaped.
fn escape(part: &str) -> String {
    part.replace('%', "%25").replace('/', "%2F")
}

fn unescape(part: &str) -> String {
    part.replace("%2F", "/").replace("%25", "%")
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn endpoint_key(name: &str) -> String {
    format!("endpoints/{}", escape(name))
}

fn event_key(name: &str, sequence: u64) -> String {
    format!("endpoints/{}/events/{sequence:020}", escape(name))
}

fn past_key(name: &str, promotion: &Promotion) -> String {
    format!(
        "endpoints/{}/past/{:020}-{}",
        escape(name),
        promotion.started_at_ms,
        escape(&promotion.id)
    )
}

/// A live promotion's head record: the promotion with its rollout's
/// collections emptied ([`Rollout::head`]); each entry is a record of its
/// own ([`Rollout::diff_records`]).
fn promotion_head(promotion: &Promotion) -> Vec<u8> {
    json(&Promotion {
        id: promotion.id.clone(),
        rollout: promotion.rollout.head(),
        started_at_ms: promotion.started_at_ms,
        updated_at_ms: promotion.updated_at_ms,
        finished_at_ms: promotion.finished_at_ms,
        forced: promotion.forced,
        rollback: promotion.rollback,
        splits: promotion.splits.clone(),
    })
}

/// A rollout's entries as records under `prefix`.
struct SlotRecords<'b> {
    prefix: &'b str,
    batch: &'b mut Batch,
}

impl Records for SlotRecords<'_> {
    fn put(&mut self, field: &str, key: &str, value: Vec<u8>) {
        self.batch
            .put(format!("{}/{field}/{}", self.prefix, escape(key)), value);
    }

    fn delete(&mut self, field: &str, key: &str) {
        self.batch
            .delete(format!("{}/{field}/{}", self.prefix, escape(key)));
    }
}

/// Adds to `batch` what turns `old` into `new`, for a map stored one record
/// per entry under `prefix`; clones what changed into `old`.
fn diff_map<V: Clone + PartialEq + Serialize>(
    prefix: &str,
    old: &mut BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
    batch: &mut Batch,
) {
    // Both maps in key order, side by side: one comparison per entry, and
    // nothing allocated unless an entry changed.
    let mut removed = Vec::new();
    let mut changed = Vec::new();
    let mut olds = old.iter().peekable();
    let mut news = new.iter().peekable();
    loop {
        match (olds.peek(), news.peek()) {
            (None, None) => break,
            (Some((key, _)), None) => {
                removed.push((*key).clone());
                olds.next();
            }
            (None, Some(&(key, value))) => {
                changed.push((key, value));
                news.next();
            }
            (Some(&(old_key, old_value)), Some(&(new_key, new_value))) => {
                match old_key.cmp(new_key) {
                    std::cmp::Ordering::Less => {
                        removed.push(old_key.clone());
                        olds.next();
                    }
                    std::cmp::Ordering::Greater => {
                        changed.push((new_key, new_value));
                        news.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if old_value != new_value {
                            changed.push((new_key, new_value));
                        }
                        olds.next();
                        news.next();
                    }
                }
            }
        }
    }
    for key in removed {
        batch.delete(format!("{prefix}/{}", escape(&key)));
        old.remove(&key);
    }
    for (key, value) in changed {
        batch.put(format!("{prefix}/{}", escape(key)), json(value));
        old.insert(key.clone(), value.clone());
    }
}

/// Whether what is stored of `a` and `b` is the same, cheaply: a history
/// is appended to with rising numbers, and ended promotions never change,
/// so their ends say whether they moved.
fn same_endpoint(a: &Endpoint, b: &Endpoint) -> bool {
    let ends = |e: &Endpoint| {
        (
            e.events.len(),
            e.events.front().map(|x| x.sequence),
            e.events.back().map(|x| x.sequence),
            e.past_promotions.len(),
        )
    };
    Head::same(a, b)
        && ends(a) == ends(b)
        && a.past_promotions.back().map(|p| &p.id) == b.past_promotions.back().map(|p| &p.id)
        && a.promotion == b.promotion
        && a.last_promotion == b.last_promotion
}

/// What was written last, to diff the next state against.
#[derive(Debug, Default)]
pub(super) struct Written {
    state: State,
    /// The `meta` record exists.
    meta_written: bool,
    /// Each endpoint's live promotions' head records: (endpoint, slot) →
    /// the head as written.
    heads: BTreeMap<(String, &'static str), Vec<u8>>,
}

impl Written {
    /// What `records` (a whole store) hold.
    pub(super) fn load(records: Vec<(String, Vec<u8>)>) -> Result<(Self, State), String> {
        let mut state = State::default();
        let mut meta = None;
        let mut heads: BTreeMap<(String, &'static str), Vec<u8>> = BTreeMap::new();
        let mut entries: Vec<(String, &'static str, String, String, Vec<u8>)> = Vec::new();
        let mut events: BTreeMap<String, Vec<EventRecord>> = BTreeMap::new();
        let mut past: BTreeMap<String, Vec<Promotion>> = BTreeMap::new();
        let parse = |key: &str, bytes: &[u8]| -> Result<Value, String> {
            serde_json::from_slice(bytes).map_err(|e| format!("record `{key}`: {e}"))
        };
        fn typed<T: serde::de::DeserializeOwned>(key: &str, value: Value) -> Result<T, String> {
            serde_json::from_value(value).map_err(|e| format!("record `{key}`: {e}"))
        }
        for (key, bytes) in records {
            let parts: Vec<&str> = key.split('/').collect();
            match parts.as_slice() {
                ["meta"] => meta = Some(typed::<Meta>(&key, parse(&key, &bytes)?)?),
                ["deployments", id] => {
                    state
                        .deployments
                        .insert(unescape(id), typed(&key, parse(&key, &bytes)?)?);
                }
                ["workers", address] => {
                    state
                        .workers
                        .insert(unescape(address), typed(&key, parse(&key, &bytes)?)?);
                }
                ["routers", address] => {
                    state
                        .routers
                        .insert(unescape(address), typed(&key, parse(&key, &bytes)?)?);
                }
                ["endpoints", name] => {
                    let head: Head = typed(&key, parse(&key, &bytes)?)?;
                    state.endpoints.insert(unescape(name), head.into_endpoint());
                }
                ["endpoints", name, "events", _] => events
                    .entry(unescape(name))
                    .or_default()
                    .push(typed(&key, parse(&key, &bytes)?)?),
                ["endpoints", name, "past", _] => past
                    .entry(unescape(name))
                    .or_default()
                    .push(typed(&key, parse(&key, &bytes)?)?),
                ["endpoints", name, slot, rest @ ..] => {
                    let slot = SLOTS
                        .into_iter()
                        .find(|s| s == slot)
                        .ok_or_else(|| format!("unknown record `{key}`"))?;
                    match rest {
                        [] => {
                            heads.insert((unescape(name), slot), bytes);
                        }
                        [field, entry] => entries.push((
                            unescape(name),
                            slot,
                            (*field).to_owned(),
                            unescape(entry),
                            bytes,
                        )),
                        _ => return Err(format!("unknown record `{key}`")),
                    }
                }
                _ => return Err(format!("unknown record `{key}`")),
            }
        }
        let meta = match meta {
            Some(meta) if meta.format == FORMAT => meta,
            Some(meta) => {
                return Err(format!(
                    "format {} (this coordinator reads {FORMAT})",
                    meta.format
                ));
            }
            None if state.endpoints.is_empty()
                && state.workers.is_empty()
                && state.routers.is_empty() =>
            {
                Meta {
                    format: FORMAT,
                    epoch: 0,
                    table_version: 0,
                    next_id: 0,
                }
            }
            None => return Err("records without their `meta` record".into()),
        };
        state.epoch = meta.epoch;
        state.table_version = meta.table_version;
        state.next_id = meta.next_id;
        for (name, list) in events {
            let endpoint = state
                .endpoints
                .get_mut(&name)
                .ok_or_else(|| format!("events of no endpoint `{name}`"))?;
            endpoint.events = std::sync::Arc::new(list.into());
        }
        for (name, list) in past {
            let endpoint = state
                .endpoints
                .get_mut(&name)
                .ok_or_else(|| format!("promotions of no endpoint `{name}`"))?;
            endpoint.past_promotions = list.into();
        }
        for ((name, slot), head) in &heads {
            let promotion: Promotion = serde_json::from_slice(head)
                .map_err(|e| format!("the {slot} rollout of `{name}`: {e}"))?;
            let endpoint = state
                .endpoints
                .get_mut(name)
                .ok_or_else(|| format!("a rollout of no endpoint `{name}`"))?;
            *slot_of(endpoint, slot) = Some(promotion);
        }
        for (name, slot, field, entry, bytes) in entries {
            let promotion = state
                .endpoints
                .get_mut(&name)
                .and_then(|e| slot_of(e, slot).as_mut())
                .ok_or_else(|| format!("an entry of no {slot} rollout of `{name}`"))?;
            promotion
                .rollout
                .load_record(&field, &entry, &bytes)
                .map_err(|e| format!("the {slot} rollout of `{name}`, `{field}/{entry}`: {e}"))?;
        }
        let written = Self {
            state: state.clone(),
            meta_written: true,
            heads,
        };
        Ok((written, state))
    }

    /// Adds to `batch` every record that turns what was written into
    /// `state`, and takes `state` as written. Compares each record with
    /// what was written (no allocation when equal); serializes only what
    /// changed.
    pub(super) fn diff(&mut self, state: &State, batch: &mut Batch) {
        let old = &mut self.state;
        if (old.epoch, old.table_version, old.next_id)
            != (state.epoch, state.table_version, state.next_id)
            || !self.meta_written
        {
            batch.put(
                "meta".into(),
                json(&Meta {
                    format: FORMAT,
                    epoch: state.epoch,
                    table_version: state.table_version,
                    next_id: state.next_id,
                }),
            );
            old.epoch = state.epoch;
            old.table_version = state.table_version;
            old.next_id = state.next_id;
            self.meta_written = true;
        }
        diff_map(
            "deployments",
            &mut old.deployments,
            &state.deployments,
            batch,
        );
        diff_map("workers", &mut old.workers, &state.workers, batch);
        diff_map("routers", &mut old.routers, &state.routers, batch);
        let heads = &mut self.heads;
        old.endpoints.retain(|name, _| {
            let keep = state.endpoints.contains_key(name);
            if !keep {
                let key = endpoint_key(name);
                batch.delete_prefix(format!("{key}/"));
                batch.delete(key);
                heads.retain(|(endpoint, _), _| endpoint != name);
            }
            keep
        });
        for (name, new) in &state.endpoints {
            match old.endpoints.get_mut(name) {
                Some(old) => {
                    sync_clocks(old, new);
                    if !same_endpoint(old, new) {
                        diff_endpoint(name, old, new, heads, batch);
                    }
                }
                None => {
                    // Never written: every record of `new` is.
                    let mut empty = Endpoint::new(name, 0);
                    batch.put(endpoint_key(name), json(&Head::of(new)));
                    diff_endpoint(name, &mut empty, new, heads, batch);
                    old.endpoints.insert(name.clone(), empty);
                }
            }
        }
    }
}

/// The rollouts' clocks are not stored: what was written takes the new
/// ones, so that a tick alone is no change.
fn sync_clocks(old: &mut Endpoint, new: &Endpoint) {
    for (before, after) in [
        (&mut old.promotion, &new.promotion),
        (&mut old.last_promotion, &new.last_promotion),
    ] {
        if let (Some(before), Some(after)) = (before, after) {
            before.rollout.sync_clock(&after.rollout);
        }
    }
}

fn slot_of<'e>(endpoint: &'e mut Endpoint, slot: &str) -> &'e mut Option<Promotion> {
    if slot == "promotion" {
        &mut endpoint.promotion
    } else {
        &mut endpoint.last_promotion
    }
}

fn diff_endpoint(
    name: &str,
    old: &mut Endpoint,
    new: &Endpoint,
    heads: &mut BTreeMap<(String, &'static str), Vec<u8>>,
    batch: &mut Batch,
) {
    let key = endpoint_key(name);
    if !Head::same(old, new) {
        batch.put(key.clone(), json(&Head::of(new)));
    }
    // Events: appended with rising numbers, the oldest dropped.
    let first_kept = new.events.front().map_or(u64::MAX, |e| e.sequence);
    for event in old.events.iter().take_while(|e| e.sequence < first_kept) {
        batch.delete(event_key(name, event.sequence));
    }
    let last_written = old.events.back().map_or(0, |e| e.sequence);
    for event in new.events.iter().filter(|e| e.sequence > last_written) {
        batch.put(event_key(name, event.sequence), json(event));
    }
    // Ended promotions never change: written once, deleted when dropped.
    for promotion in &old.past_promotions {
        if !new.past_promotions.iter().any(|p| p.id == promotion.id) {
            batch.delete(past_key(name, promotion));
        }
    }
    for promotion in &new.past_promotions {
        if !old.past_promotions.iter().any(|p| p.id == promotion.id) {
            batch.put(past_key(name, promotion), json(promotion));
        }
    }
    for slot in SLOTS {
        let (before, after) = if slot == "promotion" {
            (&old.promotion, &new.promotion)
        } else {
            (&old.last_promotion, &new.last_promotion)
        };
        if before == after {
            continue;
        }
        let prefix = format!("{key}/{slot}");
        let Some(promotion) = after else {
            batch.delete(prefix.clone());
            batch.delete_prefix(format!("{prefix}/"));
            heads.remove(&(name.to_owned(), slot));
            continue;
        };
        let head = promotion_head(promotion);
        if heads.get(&(name.to_owned(), slot)) != Some(&head) {
            batch.put(prefix.clone(), head.clone());
            heads.insert((name.to_owned(), slot), head);
        }
        Rollout::diff_records(
            before.as_ref().map(|p| &p.rollout),
            &promotion.rollout,
            &mut SlotRecords {
                prefix: &prefix,
                batch,
            },
        );
    }
    old.clone_from(new);
}
