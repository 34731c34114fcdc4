//! Several endpoints on one fleet of workers, behind several routers, with
//! the shell's own rules: who may host what ([`crate::eligibility`]) and
//! when a table counts as acknowledged ([`crate::acks`]). Random
//! interleavings check after every action:
//!
//! - no worker is claimed by two endpoints' rollouts;
//! - a table names only workers ready with that deployment, never a host
//!   that went silent;
//! - no drain, stop or apply reaches a worker that any router may still
//!   route to: by the table it serves, or by one on its way to it.
//!
//! The routers: one answers at once, one is slow (but within the
//! acknowledgement bound), one refuses tables for a while (it keeps
//! routing by its old table: nothing it routes to may drain), and one dies
//! for a while (restarted empty, it is sent the latest table). Agents hang
//! and come back, engines crash, workers are cordoned or their GPUs turn
//! unhealthy (their replicas move, the new one first), the operator
//! pauses, cancels and forces, demand rises (autoscaling adds), and the
//! coordinator restarts from its stored state. Once the world quiets, every promotion has ended, every
//! router serves the latest table, and no engine runs that no deployment
//! owns.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

use super::super::*;
use super::support::{cases, settings_strategy};
use crate::acks::{self, Settled};
use crate::eligibility::{self, Facts};
use crate::settings::{Cleanup, PromotionSettings};

/// The acknowledgement bound, in milliseconds of the simulated clock.
const BOUND_MS: u64 = 10_000;
/// A tick of the simulated clock.
const TICK_MS: u64 = 700;
const ENDPOINTS: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone, Default)]
struct Agent {
    engine: Option<(String, Engine)>,
    hung: bool,
    cordoned: bool,
    /// A GPU reports a condition that must not serve.
    gpu_unhealthy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Up,
    /// Answers every table with a refusal, and keeps its own.
    Refusing,
    /// Dead: serves nothing, answers nothing.
    Down,
}

#[derive(Debug, Clone)]
struct Router {
    health: Health,
    /// What it routes by: endpoint → routes.
    table: BTreeMap<String, Vec<Route>>,
    /// The version of that table.
    serving: u64,
    /// The highest version the coordinator heard it acknowledge.
    acknowledged: u64,
    /// It answers late (but within the bound).
    slow: bool,
    /// The coordinator heard it refuse a table, and no acknowledgement
    /// since.
    refused: bool,
}

#[derive(Debug, Clone)]
enum Reply {
    Ready(String),
    Drained(String, String),
    Stopped(String, String),
    Judged(String),
}

struct World {
    agents: BTreeMap<String, Agent>,
    rollouts: BTreeMap<String, Rollout>,
    routers: Vec<Router>,
    /// The whole table by version, as pushed.
    tables: BTreeMap<u64, BTreeMap<String, Vec<Route>>>,
    version: u64,
    /// Pushed tables not yet settled: version, endpoint, the rollout's seq,
    /// when.
    pending: Vec<(u64, String, u64, u64)>,
    /// Tables on their way to routers: router, version, sent at.
    deliveries: Vec<(usize, u64, u64)>,
    replies: Vec<Reply>,
    now_ms: u64,
    /// Each endpoint's `max_replicas`: its replicas and its share of the
    /// idle workers (no endpoint can starve another for good).
    max_replicas: BTreeMap<&'static str, u32>,
}

impl World {
    fn new(
        settings: [PromotionSettings; 2],
        replicas: [usize; 2],
        idle: usize,
        first: [bool; 2],
    ) -> Self {
        let mut agents = BTreeMap::new();
        let mut rollouts = BTreeMap::new();
        let mut tables = BTreeMap::new();
        let mut n = 0;
        for (i, endpoint) in ENDPOINTS.iter().enumerate() {
            let old = format!("{endpoint}-old");
            let mut routed = BTreeMap::new();
            let serving = if first[i] { 0 } else { replicas[i] };
            for _ in 0..serving {
                let id = format!("w{n}");
                n += 1;
                agents.insert(
                    id.clone(),
                    Agent {
                        engine: Some((old.clone(), Engine::Ready)),
                        ..Agent::default()
                    },
                );
                routed.insert(id, old.clone());
            }
            let from = if first[i] { String::new() } else { old };
            let target = u32::try_from(replicas[i]).unwrap_or(u32::MAX);
            let rollout = Rollout::new(
                &from,
                &format!("{endpoint}-new"),
                settings[i],
                target,
                BTreeMap::new(),
                routed,
            );
            tables.insert(endpoint.to_string(), rollout.routes());
            rollouts.insert(endpoint.to_string(), rollout);
        }
        for _ in 0..idle
            + first
                .iter()
                .zip(replicas)
                .filter(|(f, _)| **f)
                .map(|(_, r)| r)
                .sum::<usize>()
        {
            agents.insert(format!("w{n}"), Agent::default());
            n += 1;
        }
        let router = |slow| Router {
            health: Health::Up,
            table: tables.clone(),
            serving: 0,
            acknowledged: 0,
            slow,
            refused: false,
        };
        let routers = vec![router(false), router(true), router(false), router(false)];
        let mut world = Self {
            agents,
            rollouts,
            routers,
            tables: [(0, tables)].into(),
            version: 0,
            pending: Vec::new(),
            deliveries: Vec::new(),
            replies: Vec::new(),
            now_ms: 0,
            max_replicas: ENDPOINTS
                .iter()
                .zip(replicas)
                .map(|(e, r)| (*e, u32::try_from(r + idle / 2).unwrap_or(u32::MAX)))
                .collect(),
        };
        // Every rollout sees the fleet, then starts.
        world.refresh();
        for endpoint in ENDPOINTS {
            let actions = world
                .rollouts
                .get_mut(endpoint)
                .expect("an endpoint")
                .start(0);
            world.claim(endpoint, &actions);
            world.perform_all(endpoint, actions);
        }
        world
    }

    /// Endpoint → the workers its rollout claims; no worker twice.
    fn claims(&self) -> BTreeMap<String, String> {
        let mut claims = BTreeMap::new();
        for (endpoint, rollout) in &self.rollouts {
            for worker in rollout.claimed() {
                if let Some(other) = claims.insert(worker.clone(), endpoint.clone()) {
                    panic!("{worker} claimed by {other} and {endpoint}");
                }
            }
        }
        claims
    }

    /// Every rollout hears how each worker looks to its endpoint now, as
    /// the shell's refresh does.
    fn refresh(&mut self) {
        for _ in 0..100 {
            let mut quiet = true;
            for endpoint in ENDPOINTS {
                // The claims as they are now: the endpoint fed before may
                // just have started an engine.
                let claims = self.claims();
                let kept = self.kept();
                let rollout = &self.rollouts[endpoint];
                let mut changed = Vec::new();
                for (id, agent) in &self.agents {
                    let facts = Facts {
                        lost: agent.hung,
                        cordoned: agent.cordoned,
                        gpu_unhealthy: agent.gpu_unhealthy,
                        matches_selector: Some(true),
                        owns_gate: true,
                        claimed_by: claims.get(id).map(String::as_str),
                        spare: agent
                            .engine
                            .as_ref()
                            .is_some_and(|(d, _)| kept.contains(d) && !rollout.wants_warm(d)),
                    };
                    let (deployment, engine) = agent
                        .engine
                        .clone()
                        .map_or((None, Engine::Idle), |(d, e)| (Some(d), e));
                    let view = eligibility::view(endpoint, deployment, engine, &facts);
                    if rollout.workers.get(id) != Some(&view) {
                        changed.push((id.clone(), view));
                    }
                }
                quiet &= changed.is_empty();
                for (id, worker) in changed {
                    self.feed(endpoint, Event::Worker { id, worker });
                }
            }
            if quiet {
                return;
            }
        }
        panic!("the views never settle");
    }

    /// Deployments kept warm by a promotion that moved away from them.
    fn kept(&self) -> BTreeSet<String> {
        self.rollouts
            .values()
            .filter(|r| r.status == Status::Succeeded && r.settings.cleanup == Cleanup::Keep)
            .map(|r| r.from.clone())
            .collect()
    }

    /// Workers some router may route to: by the table it serves, or by one
    /// on its way to it. A dead router routes nothing.
    fn routable(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (i, router) in self.routers.iter().enumerate() {
            if router.health == Health::Down {
                continue;
            }
            let coming = self
                .deliveries
                .iter()
                .filter(|(r, v, _)| *r == i && *v > router.serving)
                .map(|(_, v, _)| &self.tables[v]);
            for table in std::iter::once(&router.table).chain(coming) {
                for routes in table.values() {
                    out.extend(routes.iter().flat_map(|r| r.workers.iter().cloned()));
                }
            }
        }
        out
    }

    fn feed(&mut self, endpoint: &str, event: Event) {
        let actions = self
            .rollouts
            .get_mut(endpoint)
            .expect("an endpoint")
            .handle(event);
        self.claim(endpoint, &actions);
        self.perform_all(endpoint, actions);
    }

    /// As the shell does: a worker asked to start an engine is no longer
    /// eligible to any other endpoint, at once.
    fn claim(&mut self, endpoint: &str, actions: &[Action]) {
        for action in actions {
            if let Action::Apply { worker, .. } = action {
                for (other, rollout) in &mut self.rollouts {
                    if other != endpoint
                        && let Some(view) = rollout.workers.get_mut(worker)
                    {
                        view.eligible = false;
                    }
                }
            }
        }
    }

    fn perform_all(&mut self, endpoint: &str, actions: Vec<Action>) {
        for action in actions {
            self.perform(endpoint, action);
        }
        self.claims();
    }

    fn perform(&mut self, endpoint: &str, action: Action) {
        let reachable = |world: &Self, worker: &str| !world.agents[worker].hung;
        match action {
            Action::PushTable { seq, routes } => {
                for route in &routes {
                    for worker in &route.workers {
                        let agent = &self.agents[worker];
                        assert!(!agent.hung, "table of {endpoint} names {worker}, silent");
                        assert_eq!(
                            agent.engine,
                            Some((route.deployment.clone(), Engine::Ready)),
                            "table of {endpoint} names {worker} for {}",
                            route.deployment
                        );
                    }
                }
                self.version += 1;
                let mut table = self.tables[&(self.version - 1)].clone();
                table.insert(endpoint.to_owned(), routes);
                self.tables.insert(self.version, table);
                self.pending
                    .push((self.version, endpoint.to_owned(), seq, self.now_ms));
                for (i, router) in self.routers.iter().enumerate() {
                    if router.health != Health::Down {
                        self.deliveries.push((i, self.version, self.now_ms));
                    }
                }
            }
            Action::Apply { worker, deployment } => {
                assert!(
                    !self.routable().contains(&worker),
                    "{worker} given {deployment} while routable"
                );
                if reachable(self, &worker) {
                    let agent = self.agents.get_mut(&worker).expect("a worker");
                    match agent.engine.as_mut() {
                        // Its own deployment: already applied (a drained
                        // engine takes requests again).
                        Some((d, engine)) if *d == deployment && *engine != Engine::Failed => {
                            if *engine == Engine::Draining {
                                *engine = Engine::Ready;
                            }
                        }
                        _ => {
                            agent.engine = Some((deployment, Engine::Starting));
                            self.replies.push(Reply::Ready(worker));
                        }
                    }
                }
            }
            Action::Drain { worker } => {
                assert!(
                    !self.routable().contains(&worker),
                    "{worker} drained while routable"
                );
                if reachable(self, &worker) {
                    let agent = self.agents.get_mut(&worker).expect("a worker");
                    if let Some((_, engine @ Engine::Ready)) = agent.engine.as_mut() {
                        *engine = Engine::Draining;
                    }
                }
                self.replies
                    .push(Reply::Drained(endpoint.to_owned(), worker));
            }
            Action::Stop { worker } => {
                assert!(
                    !self.routable().contains(&worker),
                    "{worker} stopped while routable"
                );
                if reachable(self, &worker) {
                    self.agents.get_mut(&worker).expect("a worker").engine = None;
                }
                self.replies
                    .push(Reply::Stopped(endpoint.to_owned(), worker));
            }
            Action::Undrain { worker } => {
                if reachable(self, &worker) {
                    let agent = self.agents.get_mut(&worker).expect("a worker");
                    if let Some((_, engine @ Engine::Draining)) = agent.engine.as_mut() {
                        *engine = Engine::Ready;
                    }
                }
            }
            Action::JudgeHealth => self.replies.push(Reply::Judged(endpoint.to_owned())),
            Action::Record { .. } => {}
        }
    }

    /// Settles the tables every router has acknowledged, or that only
    /// silent routers miss past the bound.
    fn settle(&mut self) {
        let views: Vec<acks::Router> = self
            .routers
            .iter()
            .map(|r| acks::Router {
                acknowledged: r.acknowledged,
                refusing: r.refused,
            })
            .collect();
        let now = self.now_ms;
        let mut done = Vec::new();
        self.pending.retain(|(version, endpoint, seq, at)| {
            let elapsed = Duration::from_millis(now - at);
            match acks::settle(*version, elapsed, Duration::from_millis(BOUND_MS), &views) {
                Some(Settled::Acked | Settled::Late(_)) => {
                    done.push((endpoint.clone(), *seq));
                    false
                }
                None => true,
            }
        });
        for (endpoint, seq) in done {
            self.feed(&endpoint, Event::TableAcked { seq });
            self.refresh();
        }
    }

    /// A table reaches a router.
    fn deliver(&mut self, index: usize) {
        let (router, version, _) = self.deliveries.remove(index);
        let table = self.tables[&version].clone();
        let r = &mut self.routers[router];
        match r.health {
            Health::Down => {}
            Health::Refusing => r.refused = true,
            Health::Up => {
                if version > r.serving {
                    r.table = table;
                    r.serving = version;
                }
                r.acknowledged = r.acknowledged.max(version);
                r.refused = false;
            }
        }
        self.settle();
    }

    fn answer(&mut self, index: usize) {
        if let Reply::Ready(worker) = &self.replies[index]
            && self.agents[worker].hung
        {
            return;
        }
        match self.replies.remove(index) {
            Reply::Ready(worker) => {
                let agent = self.agents.get_mut(&worker).expect("a worker");
                if let Some((_, engine @ Engine::Starting)) = agent.engine.as_mut() {
                    *engine = Engine::Ready;
                }
                self.refresh();
            }
            Reply::Drained(endpoint, worker) => {
                self.feed(&endpoint, Event::Drained { worker });
                self.refresh();
            }
            Reply::Stopped(endpoint, worker) => {
                self.feed(&endpoint, Event::Stopped { worker });
                self.refresh();
            }
            Reply::Judged(endpoint) => self.feed(&endpoint, Event::Health(Verdict::Pass)),
        }
    }

    fn tick(&mut self) {
        self.now_ms += TICK_MS;
        // Agents report what changed since (an undrain has no answer of
        // its own).
        self.refresh();
        // A slow router is slow within the bound; the others answer by then
        // too unless they refuse or are dead.
        while let Some(index) = self
            .deliveries
            .iter()
            .position(|(_, _, at)| self.now_ms - at >= BOUND_MS / 2)
        {
            self.deliver(index);
        }
        for endpoint in ENDPOINTS {
            self.feed(
                endpoint,
                Event::Tick {
                    now_ms: self.now_ms,
                },
            );
        }
        self.settle();
        self.stop_strays();
    }

    /// The shell's sweep: engines no rollout claims, no router routes to,
    /// and nobody keeps warm are stopped.
    fn stop_strays(&mut self) -> bool {
        let claims = self.claims();
        let routable = self.routable();
        let kept = self.kept();
        let wanted = |deployment: &str| {
            kept.contains(deployment) || self.rollouts.values().any(|r| r.wants_warm(deployment))
        };
        let strays: Vec<String> = self
            .agents
            .iter()
            .filter(|(id, a)| {
                !a.hung
                    && !claims.contains_key(*id)
                    && !routable.contains(*id)
                    && a.engine.as_ref().is_some_and(|(d, e)| {
                        *e != Engine::Failed
                            && !(matches!(e, Engine::Ready | Engine::Draining) && wanted(d))
                    })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &strays {
            self.agents.get_mut(id).expect("a worker").engine = None;
        }
        if !strays.is_empty() {
            self.refresh();
        }
        !strays.is_empty()
    }

    /// The coordinator restarts on its stored state: the answers it waited
    /// for are lost, it pushes every table again.
    fn restart(&mut self) {
        self.pending.clear();
        // What it heard from routers was in memory: a refusing router
        // refuses again the tables pushed now.
        for router in &mut self.routers {
            router.refused = false;
        }
        self.replies.retain(|r| matches!(r, Reply::Ready(_)));
        for endpoint in ENDPOINTS {
            let stored = serde_json::to_string(&self.rollouts[endpoint]).expect("serializes");
            let mut rollout: Rollout = serde_json::from_str(&stored).expect("deserializes");
            let actions = rollout.resume(self.now_ms);
            self.rollouts.insert(endpoint.to_owned(), rollout);
            self.claim(endpoint, &actions);
            self.perform_all(endpoint, actions);
        }
        self.refresh();
    }

    /// A router comes back to health, or is restarted empty, and is sent
    /// the latest table.
    fn router_up(&mut self, i: usize) {
        let router = &mut self.routers[i];
        match router.health {
            Health::Up => return,
            Health::Down => {
                router.table = BTreeMap::new();
                router.serving = 0;
            }
            Health::Refusing => {}
        }
        router.health = Health::Up;
        self.deliveries.push((i, self.version, self.now_ms));
    }

    fn router_trouble(&mut self, i: usize) {
        if self.routers[i].health != Health::Up {
            return;
        }
        if i == 2 {
            self.routers[i].health = Health::Refusing;
        } else if i == 3 {
            self.routers[i].health = Health::Down;
            self.routers[i].table = BTreeMap::new();
            self.deliveries.retain(|(r, _, _)| *r != i);
        }
    }
}

fn play(world: &mut World, choices: &[u32], commands: bool) {
    for &choice in choices {
        play_one(world, choice, commands);
    }
    quiet(world);
}

/// One step of the world: an answer, a tick, a fault or a command.
fn play_one(world: &mut World, choice: u32, commands: bool) {
    let ids: Vec<String> = world.agents.keys().cloned().collect();
    let pick = choice % 100;
    let which = (choice / 100) as usize;
    let id = &ids[which % ids.len()];
    let endpoint = ENDPOINTS[which % ENDPOINTS.len()];
    match pick {
        0..=3 if !world.rollouts[endpoint].status.is_terminal() => {
            let command = match (which / 2) % 5 {
                0 => Command::Pause,
                2 if commands => Command::Cancel,
                3 if commands => Command::ForceCancel,
                4 if commands => Command::ForceRollForward,
                _ => Command::Resume,
            };
            world.feed(endpoint, Event::Command(command));
            world.refresh();
        }
        4..=11 => world.tick(),
        12 | 13 => {
            let agent = world.agents.get_mut(id).expect("a worker");
            agent.hung = !agent.hung;
            if !agent.hung && which.is_multiple_of(2) {
                // Rebooted: empty; a start it never heard of is over.
                agent.engine = None;
            }
            if !agent.hung
                && let Some((_, Engine::Starting)) = agent.engine
            {
                agent.engine = None;
            }
            world.refresh();
        }
        14 => {
            let agent = world.agents.get_mut(id).expect("a worker");
            if !agent.hung
                && let Some((_, engine @ Engine::Ready)) = agent.engine.as_mut()
            {
                *engine = Engine::Failed;
            }
            world.refresh();
        }
        15 => {
            let agent = world.agents.get_mut(id).expect("a worker");
            if which.is_multiple_of(2) {
                agent.cordoned = !agent.cordoned;
            } else {
                agent.gpu_unhealthy = !agent.gpu_unhealthy;
            }
            world.refresh();
        }
        16 => world.router_trouble(2 + which % 2),
        17 => world.router_up(2 + which % 2),
        18 => world.restart(),
        19 => {
            // Demand rises during the promotion: autoscaling adds, never
            // past the maximum.
            let max = world.max_replicas[endpoint];
            let rollout = world.rollouts.get_mut(endpoint).expect("an endpoint");
            let desired = rollout.target + 1;
            let actions = rollout.autoscale(desired, max);
            world.claim(endpoint, &actions);
            world.perform_all(endpoint, actions);
            world.refresh();
        }
        _ => {
            let slow = which.is_multiple_of(4);
            let choices: Vec<usize> = (0..world.deliveries.len())
                .filter(|&i| slow || !world.routers[world.deliveries[i].0].slow)
                .collect();
            if which.is_multiple_of(2) && !choices.is_empty() {
                let index = choices[which % choices.len()];
                world.deliver(index);
            } else if !world.replies.is_empty() {
                let index = which % world.replies.len();
                world.answer(index);
            }
        }
    }
}

/// The world quiets and everything settles.
fn quiet(world: &mut World) {
    // The world quiets: hosts answer, cordons lift, routers recover, the
    // operator resumes, every call is answered, time passes.
    for agent in world.agents.values_mut() {
        if agent.hung {
            agent.hung = false;
            if let Some((_, Engine::Starting)) = agent.engine {
                agent.engine = None;
            }
        }
        agent.cordoned = false;
        agent.gpu_unhealthy = false;
    }
    for i in 0..world.routers.len() {
        world.router_up(i);
    }
    world.refresh();
    for endpoint in ENDPOINTS {
        world.feed(endpoint, Event::Command(Command::Resume));
    }
    for _ in 0..10_000 {
        if !world.deliveries.is_empty() {
            world.deliver(0);
        } else if !world.replies.is_empty() {
            world.answer(0);
        } else {
            let swept = world.stop_strays();
            if world.rollouts.values().all(Rollout::is_quiet) && world.pending.is_empty() && !swept
            {
                break;
            }
            world.tick();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1024), ..ProptestConfig::default() })]

    #[test]
    fn several_endpoints_and_routers_keep_the_invariants_and_every_promotion_ends(
        a in settings_strategy(),
        b in settings_strategy(),
        replicas in (1usize..=3, 1usize..=3),
        idle in 0usize..=3,
        first in (any::<bool>(), any::<bool>()),
        commands in any::<bool>(),
        choices in prop::collection::vec(any::<u32>(), 0..300),
    ) {
        let mut world = World::new([a, b], [replicas.0, replicas.1], idle, [first.0, first.1]);
        play(&mut world, &choices, commands);
        for (endpoint, rollout) in &world.rollouts {
            prop_assert!(rollout.is_quiet(), "{endpoint} not settled: {rollout:#?}");
            prop_assert!(rollout.status.is_terminal(), "{endpoint}: {rollout:#?}");
        }
        let latest = &world.tables[&world.version];
        for (i, router) in world.routers.iter().enumerate() {
            prop_assert_eq!(&router.table, latest, "router {} is behind", i);
        }
        let routed: BTreeSet<&String> = latest
            .values()
            .flat_map(|routes| routes.iter().flat_map(|r| &r.workers))
            .collect();
        for (id, agent) in &world.agents {
            let Some((deployment, engine)) = &agent.engine else { continue };
            if *engine == Engine::Failed || routed.contains(id) {
                continue;
            }
            let kept = world.rollouts.values().any(|r| {
                r.settings.cleanup == Cleanup::Keep && r.status == Status::Succeeded && &r.from == deployment
            });
            prop_assert!(kept, "{id} runs {deployment} ({engine:?}) outside every table");
        }
    }
}
