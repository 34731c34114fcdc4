//! Random interleavings of agents', routers' and the operator's events
//! against a simulated fleet, checking the invariants after every action:
//!
//! - a table's weights sum to the total and name only ready workers of
//!   their deployment;
//! - no worker is drained, stopped or given another deployment while a
//!   router may still route to it;
//! - a paused promotion takes no step;
//! - every promotion ends, settled, with the traffic where its last command
//!   sent it (force roll forward: 100 % on the candidate).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::super::*;
use crate::settings::PromotionSettings;

/// The old deployment's id.
const OLD: &str = "old";

#[derive(Debug, Clone)]
enum Reply {
    Ready(String),
    Acked(u64),
    Drained(String),
    Stopped(String),
}

struct Fleet {
    rollout: Rollout,
    workers: BTreeMap<String, Worker>,
    /// What agents and routers will answer, in any order.
    replies: Vec<Reply>,
    /// Every table pushed, by number.
    tables: BTreeMap<u64, Vec<Route>>,
    /// The highest table number acknowledged.
    acked: u64,
    now_ms: u64,
    /// Every candidate replica fails to start (a model that does not exist).
    candidate_fails: bool,
}

impl Fleet {
    /// `replicas` of the old deployment and `idle` idle workers; `first`:
    /// the endpoint has no deployment yet and wants `replicas` of the
    /// candidate, all workers idle.
    fn new(
        settings: PromotionSettings,
        replicas: usize,
        idle: usize,
        first: bool,
    ) -> (Self, Vec<Action>) {
        let mut workers = BTreeMap::new();
        let mut routed = BTreeMap::new();
        let serving = if first { 0 } else { replicas };
        let idle = idle + replicas - serving;
        for i in 0..serving {
            let id = format!("w{i}");
            workers.insert(
                id.clone(),
                Worker {
                    deployment: Some(OLD.into()),
                    engine: Engine::Ready,
                    eligible: true,
                    evict: false,
                },
            );
            routed.insert(id, OLD.to_owned());
        }
        for i in serving..serving + idle {
            workers.insert(
                format!("w{i}"),
                Worker {
                    deployment: None,
                    engine: Engine::Idle,
                    eligible: true,
                    evict: false,
                },
            );
        }
        let target = u32::try_from(replicas).unwrap_or(u32::MAX);
        let from = if first { "" } else { OLD };
        let mut rollout = Rollout::new(from, "new", settings, target, workers.clone(), routed);
        let mut tables = BTreeMap::new();
        tables.insert(0, rollout.routes());
        let actions = rollout.start();
        let fleet = Self {
            rollout,
            workers,
            replies: Vec::new(),
            tables,
            acked: 0,
            now_ms: 0,
            candidate_fails: false,
        };
        (fleet, actions)
    }

    /// Workers a router may still send to: those of every table from the
    /// last acknowledged one on.
    fn routable(&self) -> BTreeSet<String> {
        self.tables
            .range(self.acked..)
            .flat_map(|(_, routes)| routes.iter().flat_map(|r| r.workers.iter().cloned()))
            .collect()
    }

    /// Checks an action against the invariants, then plays the agents' and
    /// routers' part.
    fn perform(&mut self, action: Action) -> Vec<Event> {
        let mut events = Vec::new();
        match action {
            Action::PushTable { seq, routes } => {
                if !routes.is_empty() {
                    assert_eq!(
                        routes.iter().map(|r| r.weight).sum::<u32>(),
                        TOTAL_WEIGHT,
                        "{routes:?}"
                    );
                }
                let mut seen = BTreeSet::new();
                for route in &routes {
                    assert!(!route.workers.is_empty(), "{routes:?}");
                    for worker in &route.workers {
                        assert!(seen.insert(worker.clone()), "{worker} twice: {routes:?}");
                        let state = &self.workers[worker];
                        assert!(
                            state.engine == Engine::Ready
                                && state.deployment.as_deref() == Some(route.deployment.as_str()),
                            "table {seq} names {worker} ({state:?}) for {}",
                            route.deployment
                        );
                    }
                }
                self.tables.insert(seq, routes);
                self.replies.push(Reply::Acked(seq));
            }
            Action::Drain { worker } => {
                assert!(
                    !self.routable().contains(&worker),
                    "{worker} drained while a router may route to it (acked {}, tables {:?})",
                    self.acked,
                    self.tables.range(self.acked..).collect::<Vec<_>>()
                );
                if let Some(w) = self.workers.get_mut(&worker)
                    && w.engine == Engine::Ready
                {
                    w.engine = Engine::Draining;
                    events.push(self.report(&worker));
                }
                self.replies.push(Reply::Drained(worker));
            }
            Action::Stop { worker } => {
                assert!(
                    !self.routable().contains(&worker),
                    "{worker} stopped while routable"
                );
                let w = self.workers.get_mut(&worker).expect("a known worker");
                w.engine = Engine::Idle;
                w.deployment = None;
                events.push(self.report(&worker));
                self.replies.push(Reply::Stopped(worker));
            }
            Action::Apply { worker, deployment } => {
                assert!(
                    !self.routable().contains(&worker),
                    "{worker} given {deployment} while routable"
                );
                let w = self.workers.get_mut(&worker).expect("a known worker");
                w.engine = Engine::Starting;
                w.deployment = Some(deployment);
                events.push(self.report(&worker));
                self.replies.push(Reply::Ready(worker));
            }
            Action::Record { .. } => {}
        }
        events
    }

    fn report(&self, worker: &str) -> Event {
        Event::Worker {
            id: worker.to_owned(),
            worker: self.workers[worker].clone(),
        }
    }

    fn answer(&mut self, index: usize) -> Event {
        match self.replies.remove(index) {
            Reply::Ready(worker) => {
                let fails = self.candidate_fails;
                if let Some(w) = self.workers.get_mut(&worker)
                    && w.engine == Engine::Starting
                {
                    w.engine = if fails && w.deployment.as_deref() == Some("new") {
                        Engine::Failed
                    } else {
                        Engine::Ready
                    };
                }
                self.report(&worker)
            }
            Reply::Acked(seq) => {
                self.acked = self.acked.max(seq);
                Event::TableAcked { seq }
            }
            Reply::Drained(worker) => Event::Drained { worker },
            Reply::Stopped(worker) => Event::Stopped { worker },
        }
    }

    /// Feeds `event` and everything it causes through the machine.
    fn feed(&mut self, event: Event) {
        let mut queue = vec![event];
        let mut bound = 0;
        while let Some(event) = queue.pop() {
            bound += 1;
            assert!(bound < 10_000, "events never settle");
            let paused = self.rollout.status == Status::Paused;
            let step = self.rollout.step;
            let actions = self.rollout.handle(event.clone());
            if paused && self.rollout.status == Status::Paused {
                assert_eq!(
                    self.rollout.step, step,
                    "a paused promotion took a step on {event:?}"
                );
            }
            for action in actions {
                queue.extend(self.perform(action));
            }
        }
    }
}

fn settings_strategy() -> impl Strategy<Value = PromotionSettings> {
    (
        any::<bool>(),
        any::<bool>(),
        1u32..=50,
        0u32..=100,
        0u32..=2,
    )
        .prop_map(
            |(rolling, surge, percent, overhead, stabilization)| PromotionSettings {
                rolling_deploy: rolling,
                max_surge_percent: if surge { percent } else { 0 },
                max_unavailable_percent: if surge { 0 } else { percent },
                replica_overhead_percent: overhead,
                stabilization_time_seconds: stabilization,
                ..PromotionSettings::default()
            },
        )
}

/// Plays `choices` against a fleet: answers in any order, ticks, and (with
/// `commands`) the operator's commands; then lets everything settle.
/// Returns the fleet and the last decisive command given while the
/// promotion ran.
fn play(
    settings: PromotionSettings,
    replicas: usize,
    idle: usize,
    choices: &[u32],
    commands: bool,
    candidate_fails: bool,
    first_deployment: bool,
) -> (Fleet, Option<Command>) {
    let (mut fleet, first) = Fleet::new(settings, replicas, idle, first_deployment);
    fleet.candidate_fails = candidate_fails;
    let mut queue = Vec::new();
    for action in first {
        queue.extend(fleet.perform(action));
    }
    for event in queue {
        fleet.feed(event);
    }
    let mut decisive: Option<Command> = None;
    for &choice in choices {
        let pick = choice % 100;
        if pick < 4 && !fleet.rollout.status.is_terminal() {
            let command = match choice / 100 % 5 {
                0 => Command::Pause,
                1 => Command::Resume,
                2 if commands => Command::Cancel,
                3 if commands => Command::ForceCancel,
                4 if commands => Command::ForceRollForward,
                _ => Command::Resume,
            };
            if matches!(
                command,
                Command::Cancel | Command::ForceCancel | Command::ForceRollForward
            ) {
                decisive = Some(command);
            }
            fleet.feed(Event::Command(command));
        } else if pick < 6 && fleet.rollout.target < 6 {
            // Autoscaling during the promotion: only up.
            let target = fleet.rollout.target + 1;
            let actions = fleet.rollout.raise_target(target);
            let mut queue = Vec::new();
            for action in actions {
                queue.extend(fleet.perform(action));
            }
            for event in queue {
                fleet.feed(event);
            }
        } else if pick < 14 {
            fleet.now_ms += 700;
            let now_ms = fleet.now_ms;
            fleet.feed(Event::Tick { now_ms });
        } else if !fleet.replies.is_empty() {
            let index = (choice as usize / 100) % fleet.replies.len();
            let event = fleet.answer(index);
            fleet.feed(event);
        }
    }
    // Then the world answers everything, the operator resumes, time passes.
    fleet.feed(Event::Command(Command::Resume));
    for _ in 0..10_000 {
        if fleet.rollout.is_settled() && fleet.replies.is_empty() {
            break;
        }
        if fleet.replies.is_empty() {
            fleet.now_ms += 1000;
            let now_ms = fleet.now_ms;
            fleet.feed(Event::Tick { now_ms });
        } else {
            let event = fleet.answer(0);
            fleet.feed(event);
        }
    }
    (fleet, decisive)
}

/// The weight on `deployment` in the last table pushed.
fn weight_on(fleet: &Fleet, deployment: &str) -> u32 {
    fleet.tables.values().next_back().map_or(0, |routes| {
        routes
            .iter()
            .filter(|r| r.deployment == deployment)
            .map(|r| r.weight)
            .sum()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_interleaving_keeps_the_invariants_and_ends(
        settings in settings_strategy(),
        replicas in 1usize..=5,
        idle in 0usize..=3,
        choices in prop::collection::vec(any::<u32>(), 0..300),
        first in any::<bool>(),
    ) {
        let (fleet, decisive) = play(settings, replicas, idle, &choices, true, false, first);
        let rollout = &fleet.rollout;
        prop_assert!(rollout.is_settled(), "not settled: {rollout:#?}");
        let expected = match decisive {
            None | Some(Command::ForceRollForward) => Status::Succeeded,
            _ => Status::Canceled,
        };
        prop_assert_eq!(rollout.status, expected, "{:#?}", rollout);
        let last = fleet.tables.values().next_back().cloned().unwrap_or_default();
        if expected == Status::Succeeded {
            prop_assert_eq!(weight_on(&fleet, "new"), TOTAL_WEIGHT, "{:?}", last);
            prop_assert_eq!(rollout.percent_to_candidate(), 100);
        } else if first {
            // A first deployment canceled: nothing serves, nothing runs.
            prop_assert!(last.is_empty(), "{:?}", last);
        } else {
            prop_assert_eq!(weight_on(&fleet, OLD), TOTAL_WEIGHT, "{:?}", last);
        }
        // Every engine still running is in the table (or kept warm).
        for (id, worker) in &fleet.workers {
            if worker.engine != Engine::Idle && !last.iter().any(|r| r.workers.contains(id)) {
                prop_assert!(
                    rollout.settings.cleanup == crate::settings::Cleanup::Keep,
                    "{id} runs {worker:?} outside the table: {last:?}"
                );
            }
        }
    }

    #[test]
    fn a_candidate_that_never_starts_fails_with_traffic_on_the_old_deployment(
        settings in settings_strategy(),
        replicas in 1usize..=5,
        idle in 0usize..=3,
        choices in prop::collection::vec(any::<u32>(), 0..300),
        first in any::<bool>(),
    ) {
        let (fleet, _) = play(settings, replicas, idle, &choices, false, true, first);
        let rollout = &fleet.rollout;
        prop_assert!(rollout.is_settled(), "not settled: {rollout:#?}");
        prop_assert_eq!(rollout.status, Status::Failed, "{:#?}", rollout);
        if first {
            let last = fleet.tables.values().next_back().cloned().unwrap_or_default();
            prop_assert!(last.is_empty(), "{:?}", last);
        } else {
            prop_assert_eq!(weight_on(&fleet, OLD), TOTAL_WEIGHT, "{:?}", fleet.tables);
        }
        prop_assert!(!rollout.reason.is_empty());
        // No candidate engine is left running.
        for (id, worker) in &fleet.workers {
            prop_assert!(
                worker.deployment.as_deref() != Some("new") || worker.engine == Engine::Idle || worker.engine == Engine::Failed,
                "{id}: {worker:?}"
            );
        }
    }
}
