//! Random interleavings of agents', routers' and the operator's events
//! against a simulated fleet, checking the invariants after every action:
//!
//! - a table's weights sum to the total and name only ready workers of
//!   their deployment, never a worker reported lost;
//! - no worker is drained, stopped or given another deployment while a
//!   router may still route to it; a lost worker is never drained;
//! - the capacity floor: a step never takes the routed replicas below
//!   `N − k` (of those still serving, when fewer than N do: a crash or a
//!   hang is the world's doing);
//! - a paused promotion takes no step and moves no traffic to the
//!   candidate;
//! - every promotion ends, settled, with the traffic where its last command
//!   sent it, and no engine runs outside the table (but a kept one).
//!
//! The hostile world (`hostile`) also hangs hosts (reported lost, their
//! calls answered only by their deadline), brings them back (some
//! rebooted, empty), crash-loops engines, cordons workers, and restarts the
//! coordinator from its stored state at random points, losing the answers
//! it was waiting for, repeats agents' reports, leaves the health gate
//! undecided at some steps' ends (the promotion pauses), and lets another caller
//! start a foreign deployment on a worker that is idle or starting (a start
//! that will not come). Like the shell, it stops engines no rollout uses.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::super::*;
use super::support::{cases, settings_strategy, worker};
use crate::settings::{Cleanup, PromotionSettings};

/// The old deployment's id.
const OLD: &str = "old";

/// The endpoint's `max_replicas` for autoscaling.
const MAX_REPLICAS: u32 = 7;

/// A deployment no rollout here knows (another caller's).
const FOREIGN: &str = "foreign";

#[derive(Debug, Clone)]
enum Reply {
    Ready(String),
    Acked(u64),
    Drained(String),
    Stopped(String),
    /// The health gate's verdict.
    Judged,
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
    /// Hosts that hang: they answer nothing until they come back.
    hung: BTreeSet<String>,
    /// Hung hosts the rollout has been told are lost.
    reported_lost: BTreeSet<String>,
    /// The health gate sometimes cannot decide.
    undecided_gate: bool,
}

impl Fleet {
    /// `replicas` of the old deployment and `idle` idle workers; `first`:
    /// the endpoint has no deployment yet and wants `replicas` of the
    /// candidate, all workers idle.
    fn new(
        settings: PromotionSettings,
        replicas: usize,
        idle: usize,
        world: World,
    ) -> (Self, Vec<Action>) {
        let first = world.first;
        let mut workers = BTreeMap::new();
        let mut routed = BTreeMap::new();
        let serving = if first { 0 } else { replicas };
        let idle = idle + replicas - serving;
        for i in 0..serving {
            let id = format!("w{i}");
            workers.insert(id.clone(), worker(Some(OLD), Engine::Ready));
            routed.insert(id, OLD.to_owned());
        }
        for i in serving..serving + idle {
            // Warm: the candidate's engines kept from an earlier promotion
            // (drained and running), or back from a hang (ready).
            let w = if i < serving + world.warm {
                let engine = if i % 2 == 0 {
                    Engine::Draining
                } else {
                    Engine::Ready
                };
                worker(Some("new"), engine)
            } else {
                worker(None, Engine::Idle)
            };
            workers.insert(format!("w{i}"), w);
        }
        let target = u32::try_from(replicas).unwrap_or(u32::MAX);
        let from = if first { "" } else { OLD };
        let mut rollout = Rollout::new(from, "new", settings, target, workers.clone(), routed);
        let mut tables = BTreeMap::new();
        tables.insert(0, rollout.routes());
        let actions = rollout.start(0);
        let fleet = Self {
            rollout,
            workers,
            replies: Vec::new(),
            tables,
            acked: 0,
            now_ms: 0,
            candidate_fails: false,
            hung: BTreeSet::new(),
            reported_lost: BTreeSet::new(),
            undecided_gate: world.hostile,
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

    fn last_table(&self) -> Vec<Route> {
        self.tables
            .values()
            .next_back()
            .cloned()
            .unwrap_or_default()
    }

    /// Checks a table against the invariants. `floor_applies`: the table is
    /// the rollout's own step (not a command's, not the end's).
    fn check_table(&self, seq: u64, routes: &[Route], step: Step) {
        if !routes.is_empty() {
            assert_eq!(
                routes.iter().map(|r| r.weight).sum::<u32>(),
                TOTAL_WEIGHT,
                "{routes:?}"
            );
        }
        let mut seen = BTreeSet::new();
        for route in routes {
            assert!(!route.workers.is_empty(), "{routes:?}");
            for worker in &route.workers {
                assert!(seen.insert(worker.clone()), "{worker} twice: {routes:?}");
                assert!(
                    !self.reported_lost.contains(worker),
                    "table {seq} names {worker}, reported lost"
                );
                let state = &self.workers[worker];
                assert!(
                    state.engine == Engine::Ready
                        && state.deployment.as_deref() == Some(route.deployment.as_str()),
                    "table {seq} names {worker} ({state:?}) for {}",
                    route.deployment
                );
            }
        }
        if step.pinned {
            let on = |routes: &[Route]| {
                routes
                    .iter()
                    .filter(|r| r.deployment == self.rollout.to)
                    .map(|r| r.workers.len())
                    .sum::<usize>()
            };
            assert!(
                on(routes) <= on(&self.last_table()) + step.scaling,
                "table {seq} moves traffic to the candidate while paused: {:?} -> {routes:?}",
                self.last_table()
            );
        }
        if step.floor {
            // Measured from what the last table still has serving: what a
            // crash or a hang took is the world's doing.
            let before = self.last_table();
            let serving = before
                .iter()
                .flat_map(|r| r.workers.iter().map(move |w| (w, &r.deployment)))
                .filter(|(w, d)| {
                    let state = &self.workers[*w];
                    state.engine == Engine::Ready
                        && state.deployment.as_ref() == Some(*d)
                        && !self.reported_lost.contains(*w)
                })
                .count();
            let count = |routes: &[Route]| routes.iter().map(|r| r.workers.len()).sum::<usize>();
            let target = self.rollout.target;
            let k = self.rollout.settings.in_place_size(target);
            // N above what serves (autoscaling raised it past the workers
            // there are) cannot hold updates back forever: k at a time.
            let floor = (target as usize).min(serving).saturating_sub(k as usize);
            assert!(
                count(routes) >= floor,
                "table {seq} routes {} replicas, below the floor {floor} (N {target}, k {k}): {before:?} -> {routes:?}",
                count(routes)
            );
        }
    }

    /// Checks an action against the invariants, then plays the agents' and
    /// routers' part.
    fn perform(&mut self, action: Action, step: Step) -> Vec<Event> {
        let mut events = Vec::new();
        match action {
            Action::PushTable { seq, routes } => {
                self.check_table(seq, &routes, step);
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
                assert!(
                    !self.reported_lost.contains(&worker),
                    "{worker} drained through while lost"
                );
                if !self.hung.contains(&worker)
                    && let Some(w) = self.workers.get_mut(&worker)
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
                if !self.hung.contains(&worker) {
                    let w = self.workers.get_mut(&worker).expect("a known worker");
                    w.engine = Engine::Idle;
                    w.deployment = None;
                    events.push(self.report(&worker));
                }
                self.replies.push(Reply::Stopped(worker));
            }
            Action::Apply { worker, deployment } => {
                assert!(
                    !self.routable().contains(&worker),
                    "{worker} given {deployment} while routable"
                );
                // A start re-sent after a restart is the same start.
                let resent = self.workers[&worker].deployment.as_ref() == Some(&deployment)
                    && matches!(
                        self.workers[&worker].engine,
                        Engine::Starting | Engine::Ready
                    );
                assert!(
                    resent || !self.workers[&worker].evict,
                    "{worker} given {deployment} while cordoned"
                );
                // A hung host never hears it (the shell's call runs out).
                if !self.hung.contains(&worker) {
                    let w = self.workers.get_mut(&worker).expect("a known worker");
                    if w.deployment.as_ref() == Some(&deployment)
                        && matches!(
                            w.engine,
                            Engine::Starting | Engine::Ready | Engine::Draining
                        )
                    {
                        // The agent's answer to its own deployment: already
                        // applied (a drained engine takes requests again).
                        if w.engine == Engine::Draining {
                            w.engine = Engine::Ready;
                            events.push(self.report(&worker));
                        }
                    } else {
                        w.engine = Engine::Starting;
                        w.deployment = Some(deployment);
                        events.push(self.report(&worker));
                        self.replies.push(Reply::Ready(worker));
                    }
                }
            }
            Action::Undrain { worker } => {
                if !self.hung.contains(&worker)
                    && let Some(w) = self.workers.get_mut(&worker)
                    && w.engine == Engine::Draining
                {
                    w.engine = Engine::Ready;
                    events.push(self.report(&worker));
                }
            }
            Action::JudgeHealth => self.replies.push(Reply::Judged),
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

    /// Answers reply `index`; a hung host's engine makes no progress, but
    /// the calls made to it end at their deadline.
    fn answer(&mut self, index: usize) -> Option<Event> {
        if let Reply::Ready(worker) = &self.replies[index]
            && self.hung.contains(worker)
        {
            return None;
        }
        Some(match self.replies.remove(index) {
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
            // A hostile world's gate cannot always decide (too little
            // traffic, no router answered): the promotion pauses.
            Reply::Judged if self.undecided_gate && index % 2 == 1 => {
                Event::Health(Verdict::Undecided("too few requests".into()))
            }
            Reply::Judged => Event::Health(Verdict::Pass),
        })
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
            // Autoscaling's candidate replicas join even while paused.
            let scaling = self
                .rollout
                .scaling
                .values()
                .filter(|d| **d == self.rollout.to)
                .count();
            let before = self.rollout.status;
            let actions = self.rollout.handle(event.clone());
            if paused && self.rollout.status == Status::Paused {
                assert_eq!(
                    self.rollout.step, step,
                    "a paused promotion took a step on {event:?}"
                );
            }
            let step = Step {
                // Commands and the end move traffic at once, by design.
                floor: !matches!(event, Event::Command(_))
                    && !before.is_terminal()
                    && !self.rollout.status.is_terminal()
                    && self.rollout.status != Status::RampingDown,
                pinned: paused && self.rollout.status == Status::Paused,
                scaling,
            };
            for action in actions {
                queue.extend(self.perform(action, step));
            }
        }
    }

    fn perform_all(&mut self, actions: Vec<Action>) {
        let mut queue = Vec::new();
        for action in actions {
            queue.extend(self.perform(action, Step::default()));
        }
        for event in queue {
            self.feed(event);
        }
    }

    // === the hostile world ===

    /// Hangs `worker`'s host: the rollout hears it is lost.
    fn hang(&mut self, worker: &str) {
        if !self.hung.insert(worker.to_owned()) {
            return;
        }
        self.reported_lost.insert(worker.to_owned());
        let lost = Worker {
            engine: Engine::Unknown,
            eligible: false,
            ..self.workers[worker].clone()
        };
        self.feed(Event::Worker {
            id: worker.to_owned(),
            worker: lost,
        });
    }

    /// Brings a hung host back, rebooted (empty) or as it was.
    fn come_back(&mut self, worker: &str, rebooted: bool) {
        if !self.hung.remove(worker) {
            return;
        }
        self.reported_lost.remove(worker);
        if rebooted && let Some(w) = self.workers.get_mut(worker) {
            w.engine = Engine::Idle;
            w.deployment = None;
        }
        // A start it never heard of is over.
        self.replies
            .retain(|r| !matches!(r, Reply::Ready(w) if w == worker));
        if let Some(w) = self.workers.get_mut(worker)
            && w.engine == Engine::Starting
        {
            w.engine = Engine::Idle;
            w.deployment = None;
        }
        let event = self.report(worker);
        self.feed(event);
    }

    /// A serving engine crash-loops.
    fn crash(&mut self, worker: &str) {
        if self.hung.contains(worker) {
            return;
        }
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if w.engine != Engine::Ready {
            return;
        }
        w.engine = Engine::Failed;
        let event = self.report(worker);
        self.feed(event);
    }

    /// Another caller's `Apply` reaches a worker that is idle or starting
    /// (a second coordinator, an operator by hand): it runs a deployment
    /// foreign to this promotion.
    fn take_over(&mut self, worker: &str) {
        if self.hung.contains(worker) {
            return;
        }
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if !matches!(w.engine, Engine::Idle | Engine::Starting) {
            return;
        }
        w.engine = Engine::Ready;
        w.deployment = Some(FOREIGN.to_owned());
        let event = self.report(worker);
        self.feed(event);
    }

    /// An operator cordons a worker: its replica is to move.
    fn cordon(&mut self, worker: &str) {
        if self.hung.contains(worker) {
            return;
        }
        if let Some(w) = self.workers.get_mut(worker) {
            w.eligible = false;
            w.evict = true;
        }
        let event = self.report(worker);
        self.feed(event);
    }

    /// The operator uncordons a worker.
    fn uncordon(&mut self, worker: &str) {
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if !w.evict {
            return;
        }
        w.eligible = true;
        w.evict = false;
        let event = self.report(worker);
        self.feed(event);
    }

    /// The coordinator is killed and restarted on its stored state: the
    /// answers it waited for are lost (a new process makes new calls), and
    /// it resumes.
    fn restart(&mut self) {
        let stored = serde_json::to_string(&self.rollout).expect("the rollout serializes");
        self.rollout = serde_json::from_str(&stored).expect("the rollout deserializes");
        self.replies.retain(|r| matches!(r, Reply::Ready(_)));
        let actions = self.rollout.resume(self.now_ms);
        self.perform_all(actions);
    }

    /// What the shell does with engines no rollout uses: stops them once
    /// no router routes to them (a kept deployment's stay warm).
    fn stop_strays(&mut self) -> bool {
        let claimed = self.rollout.claimed();
        let routable = self.routable();
        let kept = (self.rollout.status == Status::Succeeded
            && self.rollout.settings.cleanup == Cleanup::Keep)
            .then(|| self.rollout.from.clone());
        // Warm engines of the deployment the steps start wait for them.
        let warm = |w: &Worker| {
            matches!(w.engine, Engine::Ready | Engine::Draining)
                && w.deployment
                    .as_deref()
                    .is_some_and(|d| self.rollout.wants_warm(d))
        };
        let strays: Vec<String> = self
            .workers
            .iter()
            .filter(|(id, w)| {
                matches!(
                    w.engine,
                    Engine::Starting | Engine::Ready | Engine::Draining
                ) && !claimed.contains(*id)
                    && !routable.contains(*id)
                    && !self.hung.contains(*id)
                    && w.deployment != kept
                    && !warm(w)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let stopped = !strays.is_empty();
        for id in strays {
            if let Some(w) = self.workers.get_mut(&id) {
                w.engine = Engine::Idle;
                w.deployment = None;
            }
            let event = self.report(&id);
            self.feed(event);
        }
        stopped
    }
}

/// What a table pushed in answer to one event must also respect.
#[derive(Debug, Clone, Copy, Default)]
struct Step {
    /// The capacity floor (a step's own table, not a command's).
    floor: bool,
    /// Paused before and after: the split is pinned.
    pinned: bool,
    /// Candidate replicas autoscaling started: they may join while paused.
    scaling: usize,
}

/// What a run may do besides answering and ticking.
#[derive(Debug, Clone, Copy, Default)]
struct World {
    /// The operator's decisive commands (cancel, force).
    commands: bool,
    /// Every candidate fails to start.
    candidate_fails: bool,
    /// The endpoint's first deployment.
    first: bool,
    /// Hung hosts, crashes, cordons and coordinator restarts.
    hostile: bool,
    /// Idle workers that run the candidate, ready (kept warm by an earlier
    /// promotion that moved away from it).
    warm: usize,
}

/// Plays `choices` against a fleet: answers in any order, ticks, the
/// operator's commands and (with `world.hostile`) faults; then lets
/// everything settle. Returns the fleet and the last decisive command
/// given while the promotion ran.
fn play(
    settings: PromotionSettings,
    replicas: usize,
    idle: usize,
    choices: &[u32],
    world: World,
) -> (Fleet, Option<Command>) {
    let (mut fleet, first) = Fleet::new(settings, replicas, idle, world);
    fleet.candidate_fails = world.candidate_fails;
    fleet.perform_all(first);
    let ids: Vec<String> = fleet.workers.keys().cloned().collect();
    let mut decisive: Option<Command> = None;
    for &choice in choices {
        let pick = choice % 100;
        let which = (choice / 100) as usize;
        let id = &ids[which % ids.len()];
        if pick < 4 && !fleet.rollout.status.is_terminal() {
            let command = match which % 5 {
                0 => Command::Pause,
                1 => Command::Resume,
                2 if world.commands => Command::Cancel,
                3 if world.commands => Command::ForceCancel,
                4 if world.commands => Command::ForceRollForward,
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
            // Autoscaling during the promotion: only up, at once, never
            // past the endpoint's maximum.
            let desired = fleet.rollout.target + 1 + (which % 3) as u32;
            let r = &fleet.rollout;
            let running = r.routed.len() + r.starting.len() + r.ready.len() + r.scaling.len();
            let scaling = r.scaling.len();
            let actions = fleet.rollout.autoscale(desired, MAX_REPLICAS);
            // What autoscaling adds (the steps' surge is theirs) keeps the
            // total within the maximum.
            let added = fleet.rollout.scaling.len().saturating_sub(scaling);
            assert!(
                added == 0 || running + added <= MAX_REPLICAS as usize,
                "autoscaling added {added} to {running} replicas, above the maximum {MAX_REPLICAS}"
            );
            fleet.perform_all(actions);
        } else if pick < 14 {
            fleet.now_ms += 700;
            let now_ms = fleet.now_ms;
            fleet.feed(Event::Tick { now_ms });
            fleet.stop_strays();
        } else if world.hostile && pick < 24 {
            match pick {
                14 | 15 => fleet.hang(id),
                16 | 17 => fleet.come_back(id, which.is_multiple_of(2)),
                18 => fleet.crash(id),
                19 => fleet.cordon(id),
                20 => fleet.take_over(id),
                21 if !fleet.hung.contains(id) => {
                    // A watch stream that reconnects sends the same
                    // snapshot again.
                    let event = fleet.report(id);
                    fleet.feed(event);
                }
                _ => fleet.restart(),
            }
        } else if !fleet.replies.is_empty() {
            let index = which % fleet.replies.len();
            if let Some(event) = fleet.answer(index) {
                fleet.feed(event);
            }
        }
    }
    // Then the world quiets: hosts come back, the operator resumes, every
    // call is answered, time passes.
    for id in &ids {
        fleet.come_back(id, false);
        fleet.uncordon(id);
    }
    fleet.feed(Event::Command(Command::Resume));
    for _ in 0..10_000 {
        if fleet.replies.is_empty() {
            let swept = fleet.stop_strays();
            if fleet.rollout.is_quiet() && !swept {
                break;
            }
            fleet.now_ms += 1000;
            let now_ms = fleet.now_ms;
            fleet.feed(Event::Tick { now_ms });
        } else if let Some(event) = fleet.answer(0) {
            fleet.feed(event);
        }
    }
    (fleet, decisive)
}

/// The weight on `deployment` in the last table pushed.
fn weight_on(fleet: &Fleet, deployment: &str) -> u32 {
    fleet
        .last_table()
        .iter()
        .filter(|r| r.deployment == deployment)
        .map(|r| r.weight)
        .sum()
}

/// Every engine still running is in the last table, or kept warm.
fn no_engine_outside_the_table(fleet: &Fleet) -> Result<(), TestCaseError> {
    let last = fleet.last_table();
    for (id, worker) in &fleet.workers {
        let running = matches!(
            worker.engine,
            Engine::Starting | Engine::Ready | Engine::Draining
        );
        if running && !last.iter().any(|r| r.workers.contains(id)) {
            prop_assert!(
                fleet.rollout.settings.cleanup == Cleanup::Keep,
                "{id} runs {worker:?} outside the table: {last:?}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(4096), ..ProptestConfig::default() })]

    #[test]
    fn every_interleaving_keeps_the_invariants_and_ends(
        settings in settings_strategy(),
        replicas in 1usize..=5,
        idle in 0usize..=3,
        choices in prop::collection::vec(any::<u32>(), 0..300),
        first in any::<bool>(),
    ) {
        let world = World { commands: true, first, ..World::default() };
        let (fleet, decisive) = play(settings, replicas, idle, &choices, world);
        let rollout = &fleet.rollout;
        prop_assert!(rollout.is_quiet(), "not settled: {rollout:#?}");
        let expected = match decisive {
            None | Some(Command::ForceRollForward) => Status::Succeeded,
            _ => Status::Canceled,
        };
        prop_assert_eq!(rollout.status, expected, "{:#?}", rollout);
        let last = fleet.last_table();
        if expected == Status::Succeeded {
            prop_assert_eq!(weight_on(&fleet, "new"), TOTAL_WEIGHT, "{:?}", last);
            prop_assert_eq!(rollout.percent_to_candidate(), 100);
        } else if first {
            // A first deployment canceled: nothing serves, nothing runs.
            prop_assert!(last.is_empty(), "{:?}", last);
        } else {
            prop_assert_eq!(weight_on(&fleet, OLD), TOTAL_WEIGHT, "{:?}", last);
        }
        no_engine_outside_the_table(&fleet)?;
    }

    #[test]
    fn a_candidate_that_never_starts_fails_with_traffic_on_the_old_deployment(
        settings in settings_strategy(),
        replicas in 1usize..=5,
        idle in 0usize..=3,
        choices in prop::collection::vec(any::<u32>(), 0..300),
        first in any::<bool>(),
    ) {
        let world = World { candidate_fails: true, first, ..World::default() };
        let (fleet, _) = play(settings, replicas, idle, &choices, world);
        let rollout = &fleet.rollout;
        prop_assert!(rollout.is_quiet(), "not settled: {rollout:#?}");
        prop_assert_eq!(rollout.status, Status::Failed, "{:#?}", rollout);
        if first {
            prop_assert!(fleet.last_table().is_empty(), "{:?}", fleet.last_table());
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

    /// Hung hosts, crash loops, cordons and coordinator restarts, on top of
    /// every command: the invariants hold after every action, and once the
    /// world quiets every promotion has ended with its traffic where its
    /// status says.
    #[test]
    fn a_hostile_world_keeps_the_invariants_and_every_promotion_ends(
        settings in settings_strategy(),
        replicas in 1usize..=5,
        idle in 0usize..=3,
        choices in prop::collection::vec(any::<u32>(), 0..300),
        first in any::<bool>(),
        commands in any::<bool>(),
        warm in 0usize..=2,
    ) {
        let world = World { commands, first, hostile: true, warm, ..World::default() };
        let (fleet, _) = play(settings, replicas, idle, &choices, world);
        let rollout = &fleet.rollout;
        prop_assert!(rollout.is_quiet(), "not settled: {rollout:#?}");
        prop_assert!(rollout.status.is_terminal(), "{:#?}", rollout);
        match rollout.status {
            Status::Succeeded => prop_assert_eq!(weight_on(&fleet, OLD), 0),
            _ => prop_assert_eq!(weight_on(&fleet, "new"), 0),
        }
        no_engine_outside_the_table(&fleet)?;
    }
}
