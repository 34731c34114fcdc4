//! The coordinator's desired state: endpoints, their deployments and
//! promotions, workers and routers. One value, owned by the coordinator's
//! actor, written to the [`crate::store`] before anything is acted on.

use std::collections::{BTreeMap, VecDeque};

use crossfade_proto::v1;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::rollout::Rollout;
use crate::settings::{PromotionSettings, Scaling};

/// Events kept per endpoint; older ones are dropped.
pub const MAX_EVENTS: usize = 500;
/// Ended promotions kept per endpoint beside the last one.
pub const MAX_PROMOTIONS: usize = 50;

/// Everything the coordinator owns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Bumped at every start: agents and routers refuse an older one.
    pub epoch: u64,
    /// The last routing table version pushed.
    pub table_version: u64,
    /// For ids: deployments, promotions.
    pub next_id: u64,
    /// By name.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// By id.
    pub deployments: BTreeMap<String, Deployment>,
    /// Agents, by control address.
    pub workers: BTreeMap<String, WorkerRecord>,
    /// Routers, by control address.
    pub routers: BTreeMap<String, RouterRecord>,
}

/// An endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The `model` name clients send.
    pub name: String,
    /// Other names clients may send.
    pub aliases: Vec<String>,
    /// How many replicas.
    pub scaling: Scaling,
    /// How promotions move.
    pub settings: PromotionSettings,
    /// Where replicas may go.
    pub selector: Selector,
    /// The deployment that takes traffic.
    pub active: Option<String>,
    /// The deployment a promotion moves to.
    pub candidate: Option<String>,
    /// The promotion under way.
    pub promotion: Option<Promotion>,
    /// The last one that ended.
    pub last_promotion: Option<Promotion>,
    /// Promotions that ended before the last one, newest last, at most
    /// [`MAX_PROMOTIONS`].
    #[serde(default)]
    pub past_promotions: VecDeque<Promotion>,
    /// The history, newest last; shared with the published views (a view
    /// copies it only when the endpoint records an event).
    pub events: std::sync::Arc<VecDeque<EventRecord>>,
    /// The last event's number.
    pub event_seq: u64,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
}

/// One promotion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    /// Its id.
    pub id: String,
    /// The rollout's state.
    pub rollout: Rollout,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
    /// When it ended.
    pub finished_at_ms: Option<u64>,
    /// A force command ended it.
    pub forced: bool,
    /// It moves back to a deployment that ran before.
    pub rollback: bool,
    /// The candidate's share over time: where it began, then each change.
    #[serde(default)]
    pub splits: Vec<SplitPoint>,
}

/// The candidate's share of the traffic from a moment on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPoint {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Basis points, 0..=10000.
    pub candidate_weight: u32,
}

/// Adds `weight` at `now_ms` to `splits` if it differs from the last point,
/// after a first point of 0 at `started_at_ms`; beyond
/// [`MAX_SPLIT_POINTS`] the oldest after the first goes.
fn note_split(splits: &mut Vec<SplitPoint>, started_at_ms: u64, now_ms: u64, weight: u32) {
    if splits.is_empty() {
        splits.push(SplitPoint {
            at_ms: started_at_ms,
            candidate_weight: 0,
        });
    }
    if splits.last().map(|p| p.candidate_weight) == Some(weight) {
        return;
    }
    if splits.len() >= MAX_SPLIT_POINTS {
        splits.remove(1);
    }
    splits.push(SplitPoint {
        at_ms: now_ms,
        candidate_weight: weight,
    });
}

/// The most split points a promotion keeps: a promotion has at most 100
/// steps each way, so only one moved back and forth by hand for a long
/// time gets near it.
pub const MAX_SPLIT_POINTS: usize = 1_000;

impl Promotion {
    /// Notes the candidate's share at `now` if it changed (the first point,
    /// 0 at the start, is written the first time).
    pub fn record_split(&mut self, now_ms: u64) {
        let weight = self.rollout.candidate_weight();
        note_split(&mut self.splits, self.started_at_ms, now_ms, weight);
    }

    /// What history keeps of it ([`Rollout::archive`]).
    #[must_use]
    pub fn archived(mut self) -> Self {
        self.rollout.archive();
        self
    }
}

/// What a deployment is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeploymentState {
    /// Takes the endpoint's traffic.
    Active,
    /// A promotion moves to it.
    Candidate,
    /// Kept for a promotion back (`SCALE_TO_ZERO`, `KEEP`).
    Kept,
    /// Unusable (`DEACTIVATE`).
    Deactivated,
    /// A candidate that failed or was canceled.
    Retired,
}

/// An immutable template of an endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// Its id.
    pub id: String,
    /// Its endpoint.
    pub endpoint: String,
    /// The `Template`, protobuf-encoded in hex (its secrets included: the
    /// store file is private to the coordinator).
    pub template: String,
    /// What it is now.
    pub state: DeploymentState,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

impl Deployment {
    /// Its template.
    pub fn template(&self) -> v1::Template {
        crossfade_common::files::unhex(&self.template)
            .and_then(|bytes| v1::Template::decode(bytes.as_slice()).ok())
            .unwrap_or_default()
    }

    /// Stores `template`.
    pub fn encode(template: &v1::Template) -> String {
        crossfade_common::files::hex(&template.encode_to_vec())
    }

    /// Its wire form, secret values redacted.
    pub fn to_proto(&self) -> v1::Deployment {
        v1::Deployment {
            id: self.id.clone(),
            endpoint: self.endpoint.clone(),
            template: Some(redacted(self.template())),
            state: match self.state {
                DeploymentState::Active => v1::DeploymentState::Active,
                DeploymentState::Candidate => v1::DeploymentState::Candidate,
                DeploymentState::Kept => v1::DeploymentState::Kept,
                DeploymentState::Deactivated => v1::DeploymentState::Deactivated,
                DeploymentState::Retired => v1::DeploymentState::Retired,
            } as i32,
            created_at: Some(timestamp(self.created_at_ms)),
        }
    }
}

/// `template` with every secret value removed and marked redacted, and
/// the credentials in its `vllm_args` (`--api-key`) replaced.
pub fn redacted(mut template: v1::Template) -> v1::Template {
    template.vllm_args = crossfade_common::vllm_args::redact(&template.vllm_args);
    for var in &mut template.env {
        if var.secret && matches!(var.source, Some(v1::env_var::Source::Value(_))) {
            var.source = None;
            var.redacted = true;
        }
    }
    template
}

/// Where an endpoint's replicas may go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// Every one of these labels, with this value.
    pub labels: BTreeMap<String, String>,
    /// A GPU name containing this (case-insensitive), when set.
    pub gpu_name_contains: String,
    /// At least this much memory on each GPU.
    pub min_gpu_memory_bytes: u64,
    /// At least this many GPUs.
    pub min_gpu_count: u32,
}

impl Selector {
    /// From the wire.
    pub fn from_proto(selector: &v1::WorkerSelector) -> Self {
        Self {
            labels: selector
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            gpu_name_contains: selector.gpu_name_contains.clone(),
            min_gpu_memory_bytes: selector.min_gpu_memory_bytes,
            min_gpu_count: selector.min_gpu_count,
        }
    }

    /// With `update`'s changes: labels removed, then set; the rest where
    /// the update names it.
    pub fn updated(&self, update: &v1::WorkerSelectorUpdate) -> Self {
        let mut next = self.clone();
        for key in &update.remove_labels {
            next.labels.remove(key);
        }
        next.labels
            .extend(update.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(name) = &update.gpu_name_contains {
            next.gpu_name_contains.clone_from(name);
        }
        if let Some(bytes) = update.min_gpu_memory_bytes {
            next.min_gpu_memory_bytes = bytes;
        }
        if let Some(count) = update.min_gpu_count {
            next.min_gpu_count = count;
        }
        next
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::WorkerSelector {
        v1::WorkerSelector {
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            gpu_name_contains: self.gpu_name_contains.clone(),
            min_gpu_memory_bytes: self.min_gpu_memory_bytes,
            min_gpu_count: self.min_gpu_count,
        }
    }

    /// Whether a worker reporting `status` may host the endpoint.
    pub fn matches(&self, status: &v1::WorkerStatus) -> bool {
        let labels = self
            .labels
            .iter()
            .all(|(k, v)| status.labels.get(k) == Some(v));
        let needle = self.gpu_name_contains.to_lowercase();
        let fitting = status
            .gpus
            .iter()
            .filter(|g| needle.is_empty() || g.name.to_lowercase().contains(&needle))
            .filter(|g| g.memory_total_bytes >= self.min_gpu_memory_bytes)
            .count();
        let needs_gpu = !needle.is_empty() || self.min_gpu_memory_bytes > 0;
        labels
            && (!needs_gpu || fitting > 0)
            && u32::try_from(fitting).unwrap_or(u32::MAX) >= self.min_gpu_count
    }
}

/// An agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Its control address.
    pub address: String,
    /// Kept out of new assignments.
    pub cordoned: bool,
    /// Why.
    pub cordon_reason: String,
    /// Its gate, as it last reported it.
    #[serde(default)]
    pub gate_address: String,
    /// A `Stop` did not reach it (it was lost, or the endpoint was deleted):
    /// it gets one as soon as it answers, unless a rollout uses it again.
    #[serde(default)]
    pub stop_pending: bool,
}

/// A router.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterRecord {
    /// Its control address.
    pub address: String,
    /// The table version it last acknowledged.
    pub acknowledged_version: u64,
}

/// One entry of an endpoint's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Its number in the endpoint's history.
    pub sequence: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// A short kind (`promotion-started`, `step-done`, ...).
    pub kind: String,
    /// What happened.
    pub message: String,
    /// The promotion it belongs to.
    pub promotion_id: String,
}

impl Endpoint {
    /// A new endpoint.
    pub fn new(name: &str, now_ms: u64) -> Self {
        Self {
            name: name.into(),
            aliases: Vec::new(),
            scaling: Scaling::default(),
            settings: PromotionSettings::default(),
            selector: Selector::default(),
            active: None,
            candidate: None,
            promotion: None,
            last_promotion: None,
            past_promotions: VecDeque::new(),
            events: std::sync::Arc::default(),
            event_seq: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        }
    }

    /// Appends to the history, dropping the oldest past [`MAX_EVENTS`].
    pub fn record(&mut self, now_ms: u64, kind: &str, message: String, promotion_id: &str) {
        self.event_seq += 1;
        let events = std::sync::Arc::make_mut(&mut self.events);
        events.push_back(EventRecord {
            sequence: self.event_seq,
            at_ms: now_ms,
            kind: kind.into(),
            message,
            promotion_id: promotion_id.into(),
        });
        while events.len() > MAX_EVENTS {
            events.pop_front();
        }
        self.updated_at_ms = now_ms;
    }
}

impl State {
    /// A fresh id with `prefix`.
    pub fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }
}

/// A protobuf timestamp from milliseconds since the Unix epoch.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn status(labels: &[(&str, &str)], gpus: &[(&str, u64)]) -> v1::WorkerStatus {
        v1::WorkerStatus {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            gpus: gpus
                .iter()
                .map(|(name, memory)| v1::GpuDevice {
                    name: (*name).into(),
                    memory_total_bytes: *memory,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_selector_matches_labels_and_gpus() {
        let h100 = status(&[("zone", "a")], &[("NVIDIA H100 80GB HBM3", 80 << 30); 2]);
        let l4 = status(&[("zone", "a")], &[("NVIDIA L4", 24 << 30)]);
        assert!(Selector::default().matches(&h100));
        let selector = Selector {
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            gpu_name_contains: "h100".into(),
            min_gpu_memory_bytes: 40 << 30,
            min_gpu_count: 2,
        };
        assert!(selector.matches(&h100));
        assert!(!selector.matches(&l4));
        let elsewhere = Selector {
            labels: [("zone".to_owned(), "b".to_owned())].into(),
            ..Selector::default()
        };
        assert!(!elsewhere.matches(&h100));
        assert!(
            !Selector {
                min_gpu_count: 3,
                ..Selector::default()
            }
            .matches(&h100)
        );
    }

    #[test]
    fn a_selector_update_changes_only_what_it_names() {
        let before = Selector {
            labels: [("zone", "a"), ("tier", "gold")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            gpu_name_contains: "h100".into(),
            min_gpu_memory_bytes: 40 << 30,
            min_gpu_count: 2,
        };
        let after = before.updated(&v1::WorkerSelectorUpdate {
            labels: [("zone".to_owned(), "b".to_owned())].into(),
            remove_labels: vec!["tier".into(), "absent".into()],
            min_gpu_count: Some(0),
            ..Default::default()
        });
        assert_eq!(
            after,
            Selector {
                labels: [("zone".to_owned(), "b".to_owned())].into(),
                min_gpu_count: 0,
                ..before.clone()
            }
        );
        // An empty update changes nothing.
        assert_eq!(before.updated(&v1::WorkerSelectorUpdate::default()), before);
    }

    #[test]
    fn the_split_history_keeps_changes_from_the_start_within_its_bound() {
        let mut splits = Vec::new();
        note_split(&mut splits, 1_000, 1_000, 0);
        note_split(&mut splits, 1_000, 2_000, 5_000);
        note_split(&mut splits, 1_000, 3_000, 5_000);
        note_split(&mut splits, 1_000, 4_000, 10_000);
        let point = |at_ms, candidate_weight| SplitPoint {
            at_ms,
            candidate_weight,
        };
        assert_eq!(
            splits,
            [point(1_000, 0), point(2_000, 5_000), point(4_000, 10_000)]
        );
        // Moved back and forth past the bound: the start stays, the
        // oldest moves after it go, the latest is last.
        let mut splits = Vec::new();
        for i in 0..(MAX_SPLIT_POINTS as u64 + 10) {
            note_split(&mut splits, 7, 10 + i, 100 + u32::try_from(i % 2).unwrap());
        }
        assert_eq!(splits.len(), MAX_SPLIT_POINTS);
        assert_eq!(splits[0], point(7, 0));
        assert_eq!(splits[1].at_ms, 10 + 11);
        assert_eq!(
            splits.last().unwrap().at_ms,
            10 + MAX_SPLIT_POINTS as u64 + 9
        );
    }

    #[test]
    fn a_template_round_trips_and_its_secrets_never_leave() {
        let template = v1::Template {
            model: "org/m".into(),
            vllm_args: "--max-model-len 4096".into(),
            env: vec![
                v1::EnvVar {
                    name: "HF_TOKEN".into(),
                    source: Some(v1::env_var::Source::Value("hf_secret".into())),
                    secret: true,
                    redacted: false,
                },
                v1::EnvVar {
                    name: "LOG".into(),
                    source: Some(v1::env_var::Source::Value("debug".into())),
                    secret: false,
                    redacted: false,
                },
            ],
            ..Default::default()
        };
        let deployment = Deployment {
            id: "d-1".into(),
            endpoint: "chat".into(),
            template: Deployment::encode(&template),
            state: DeploymentState::Active,
            created_at_ms: 1_700_000_000_123,
        };
        assert_eq!(deployment.template(), template);
        let wire = deployment.to_proto();
        let text = format!("{wire:?}");
        assert!(!text.contains("hf_secret"), "{text}");
        let env = &wire.template.as_ref().unwrap().env;
        assert!(env[0].redacted && env[0].source.is_none());
        assert_eq!(
            env[1].source,
            Some(v1::env_var::Source::Value("debug".into()))
        );
        assert_eq!(wire.created_at.unwrap().nanos, 123_000_000);
    }

    #[test]
    fn the_history_is_bounded() {
        let mut endpoint = Endpoint::new("chat", 0);
        for i in 0..MAX_EVENTS + 10 {
            endpoint.record(u64::try_from(i).unwrap(), "tick", String::new(), "");
        }
        assert_eq!(endpoint.events.len(), MAX_EVENTS);
        assert_eq!(endpoint.events.front().unwrap().sequence, 11);
        assert_eq!(endpoint.event_seq, u64::try_from(MAX_EVENTS + 10).unwrap());
    }
}
