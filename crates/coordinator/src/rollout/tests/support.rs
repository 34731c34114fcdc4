//! Helpers of the scenarios: a fleet, agents' reports, what the actions
//! say.

use std::collections::BTreeMap;

use super::super::*;
use proptest::prelude::*;

use crate::settings::{Cleanup, PromotionSettings};

pub(super) fn fleet(
    replicas: usize,
    idle: usize,
) -> (BTreeMap<String, Worker>, BTreeMap<String, String>) {
    let mut workers = BTreeMap::new();
    let mut routed = BTreeMap::new();
    for i in 0..replicas + idle {
        let id = format!("w{i}");
        let serving = i < replicas;
        workers.insert(
            id.clone(),
            Worker {
                deployment: serving.then(|| "old".to_owned()),
                engine: if serving { Engine::Ready } else { Engine::Idle },
                eligible: true,
                evict: false,
            },
        );
        if serving {
            routed.insert(id, "old".to_owned());
        }
    }
    (workers, routed)
}

pub(super) fn ready(worker: &str, deployment: &str) -> Event {
    Event::Worker {
        id: worker.into(),
        worker: Worker {
            deployment: Some(deployment.into()),
            engine: Engine::Ready,
            eligible: true,
            evict: false,
        },
    }
}

pub(super) fn failed(worker: &str, deployment: &str) -> Event {
    Event::Worker {
        id: worker.into(),
        worker: Worker {
            deployment: Some(deployment.into()),
            engine: Engine::Failed,
            eligible: true,
            evict: false,
        },
    }
}

/// Feeds `event`; the health gate passes each step's end at once (its own
/// behaviour is tested apart).
pub(super) fn handle(r: &mut Rollout, event: Event) -> Vec<Action> {
    let mut out = r.handle(event);
    for _ in 0..100 {
        if !out.contains(&Action::JudgeHealth) {
            break;
        }
        out.retain(|a| *a != Action::JudgeHealth);
        out.extend(r.handle(Event::Health(Verdict::Pass)));
    }
    out
}

/// `worker` drains, then stops; what the stop brings.
pub(super) fn drained_and_stopped(r: &mut Rollout, worker: &str) -> Vec<Action> {
    handle(
        r,
        Event::Drained {
            worker: worker.into(),
        },
    );
    handle(
        r,
        Event::Stopped {
            worker: worker.into(),
        },
    )
}

pub(super) fn applies(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Apply { worker, deployment } => Some((worker.clone(), deployment.clone())),
            _ => None,
        })
        .collect()
}

pub(super) fn tables(actions: &[Action]) -> Vec<(u64, Vec<Route>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::PushTable { seq, routes } => Some((*seq, routes.clone())),
            _ => None,
        })
        .collect()
}

pub(super) fn drains(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Drain { worker } => Some(worker.clone()),
            _ => None,
        })
        .collect()
}

pub(super) fn unavailable_half() -> PromotionSettings {
    PromotionSettings {
        rolling_deploy: true,
        max_surge_percent: 0,
        max_unavailable_percent: 50,
        ..PromotionSettings::default()
    }
}

pub(super) fn rolling_surge() -> PromotionSettings {
    PromotionSettings {
        rolling_deploy: true,
        max_surge_percent: 25,
        ..PromotionSettings::default()
    }
}

/// A worker that is eligible and not to evict.
pub(super) fn worker(deployment: Option<&str>, engine: Engine) -> Worker {
    Worker {
        deployment: deployment.map(str::to_owned),
        engine,
        eligible: true,
        evict: false,
    }
}

/// Promotion settings over every mode, percentage, overhead, stabilization
/// and cleanup.
pub(super) fn settings_strategy() -> impl Strategy<Value = PromotionSettings> {
    (
        any::<bool>(),
        any::<bool>(),
        1u32..=50,
        0u32..=100,
        0u32..=2,
        0u8..3,
    )
        .prop_map(
            |(rolling, surge, percent, overhead, stabilization, cleanup)| PromotionSettings {
                rolling_deploy: rolling,
                max_surge_percent: if surge { percent } else { 0 },
                max_unavailable_percent: if surge { 0 } else { percent },
                replica_overhead_percent: overhead,
                stabilization_time_seconds: stabilization,
                cleanup: match cleanup {
                    0 => Cleanup::ScaleToZero,
                    1 => Cleanup::Keep,
                    _ => Cleanup::Deactivate,
                },
                ..PromotionSettings::default()
            },
        )
}

/// Cases per property: `default`, or `PROPTEST_CASES` to hunt longer.
pub(super) fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
