//! The rollout logic of one promotion, as a pure state machine: the shell
//! feeds it [`Event`]s (agents' statuses, routers' acknowledgements, the
//! answers to drains and stops, the clock, the operator's commands) and
//! performs the [`Action`]s it returns. No I/O, no clock of its own: every
//! interleaving can be tested, and a restarted coordinator that reloads the
//! state carries on from the same step.
//!
//! One step (DESIGN §4), with k = max(1, ceil(N × percent / 100)):
//!
//! ```text
//! StartingReplicas  start k new replicas on idle workers (surge), or take
//!                   old ones out of the table to update them in place
//!                   (unavailable mode, or surge with no idle worker)
//! WaitingReady      in-place workers: table acknowledged, drained, then
//!                   started with the new deployment; all k ready
//! ShiftingTraffic   one table: the new replicas in, as many old ones out
//!                   (all of them at the last step); every router acknowledges
//! Draining          the old replicas out of the table drain
//! Stopping          and stop
//! Stabilizing       the stabilization time passes
//! Judging           the health gate judges the candidate on the routers'
//!                   counts: it passes (the next step), fails (FAILED), or
//!                   cannot decide (PAUSED, with the reason)
//! ```
//!
//! The no-drop rule holds throughout: a worker is drained only after a
//! table without it has been acknowledged by every router.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::settings::{Cleanup, PromotionSettings};

/// Total weight of a table: basis points.
pub const TOTAL_WEIGHT: u32 = 10_000;

/// An agent's engine, as the rollout needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Engine {
    /// No engine, or a stopped one: the worker is free.
    Idle,
    /// Launching or loading.
    Starting,
    /// Ready to serve.
    Ready,
    /// Draining.
    Draining,
    /// Failed (crash loop, not ready in time).
    Failed,
    /// Lost: its agent has not been heard from within the heartbeat bound.
    /// Nothing is believed about its engine until it answers again.
    Unknown,
}

/// A worker as the agents report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    /// The deployment its engine runs or starts.
    pub deployment: Option<String>,
    /// Its engine.
    pub engine: Engine,
    /// It may host this endpoint: matches the selector, not cordoned,
    /// reachable, GPUs not unhealthy.
    pub eligible: bool,
    /// Its replica must move elsewhere: cordoned, or a GPU is unhealthy.
    /// A replacement starts first; then it drains.
    #[serde(default)]
    pub evict: bool,
}

/// A promotion's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// The candidate's first replicas are starting.
    Releasing,
    /// Traffic moves step by step to the candidate.
    RampingUp,
    /// No new step starts.
    Paused,
    /// Canceled: traffic moves step by step back to the old deployment.
    RampingDown,
    /// All traffic on the candidate.
    Succeeded,
    /// The candidate failed; traffic back on the old deployment.
    Failed,
    /// Canceled; all traffic on the old deployment.
    Canceled,
}

impl Status {
    /// The promotion has ended (work to retire replicas may remain).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
}

/// Where the current step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Choosing and starting replicas.
    StartingReplicas,
    /// Waiting for the new replicas to be ready.
    WaitingReady,
    /// Waiting for every router to acknowledge the new table.
    ShiftingTraffic,
    /// Old replicas out of the table are draining.
    Draining,
    /// Old replicas are stopping.
    Stopping,
    /// Waiting the stabilization time.
    Stabilizing,
    /// Waiting for the health gate's verdict before the next step.
    Judging,
}

/// What the operator asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Take no new step.
    Pause,
    /// Take steps again.
    Resume,
    /// Move traffic back step by step, then `CANCELED`.
    Cancel,
    /// All traffic to the old deployment at once.
    ForceCancel,
    /// All traffic to the candidate at once.
    ForceRollForward,
}

/// The health gate's verdict on the candidate (from the routers' stats and
/// the agents' GPU health).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Nothing against the candidate.
    Pass,
    /// The candidate does worse than the old deployment: fail.
    Fail(String),
    /// Not enough to decide: pause.
    Undecided(String),
}

/// What the shell tells the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// An agent's status.
    Worker {
        /// The worker.
        id: String,
        /// What it reports.
        worker: Worker,
    },
    /// Agents' statuses of several workers, taken at once.
    Workers {
        /// Each worker's view.
        seen: Vec<(String, Worker)>,
        /// Workers this endpoint need not see any more (neither eligible
        /// for it nor running its deployments): forgotten unless the
        /// rollout uses them.
        forget: Vec<String>,
    },
    /// Every router acknowledged the table pushed as `seq` (or the bound
    /// on an unreachable router passed).
    TableAcked {
        /// The table.
        seq: u64,
    },
    /// A `Drain` returned.
    Drained {
        /// The worker.
        worker: String,
    },
    /// A `Stop` returned.
    Stopped {
        /// The worker.
        worker: String,
    },
    /// The clock, in milliseconds.
    Tick {
        /// Now.
        now_ms: u64,
    },
    /// The operator.
    Command(Command),
    /// The health gate.
    Health(Verdict),
    /// Several events taken in order, and the rollout advanced once after
    /// them all (each advance looks at every replica: 500 drains answered
    /// at once are one look, not 500).
    Many(Vec<Event>),
}

/// One deployment in a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The deployment.
    pub deployment: String,
    /// Its weight in basis points.
    pub weight: u32,
    /// Its workers.
    pub workers: Vec<String>,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Run `deployment` on `worker` (`Agent.Apply`).
    Apply {
        /// The worker.
        worker: String,
        /// The deployment.
        deployment: String,
    },
    /// Push this endpoint's routes to every router; answer with
    /// [`Event::TableAcked`].
    PushTable {
        /// The table's number, for the acknowledgement.
        seq: u64,
        /// The deployments that take traffic.
        routes: Vec<Route>,
    },
    /// Drain `worker` (`Agent.Drain`); answer with [`Event::Drained`].
    Drain {
        /// The worker.
        worker: String,
    },
    /// Return a draining `worker` to service (`Agent.Undrain`); its agent
    /// then reports it ready again.
    Undrain {
        /// The worker.
        worker: String,
    },
    /// Stop `worker`'s engine (`Agent.Stop`); answer with [`Event::Stopped`].
    Stop {
        /// The worker.
        worker: String,
    },
    /// Judge the candidate on the routers' counts now; answer with
    /// [`Event::Health`].
    JudgeHealth,
    /// Record an event in the endpoint's history.
    Record {
        /// A short kind, e.g. `step-started`.
        kind: String,
        /// What happened.
        message: String,
    },
}

/// Where a worker on its way out of the table stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Leaving {
    /// Waiting for every router to acknowledge the table `seq` without it.
    AwaitAck(u64),
    /// `Drain` sent.
    Draining,
    /// `Stop` sent.
    Stopping,
    /// It left the table on its own (its engine stopped being ready, its
    /// host went silent): released, not drained, once every router has
    /// acknowledged the table `seq` without it. Until then nothing else
    /// may be started on it.
    Unrouted(u64),
}

/// A worker on its way out, and what happens to it after its drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Retirement {
    stage: Leaving,
    /// After the drain: start the new deployment on it (in place).
    then_start: bool,
    /// Drain it but leave its engine running (cleanup `KEEP`).
    keep_running: bool,
}

impl Retirement {
    /// Out of the table since `seq`, released once it is acknowledged.
    fn unrouted(seq: u64) -> Self {
        Self {
            stage: Leaving::Unrouted(seq),
            then_start: false,
            keep_running: false,
        }
    }
}

/// Which way a promotion moves replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Direction {
    /// To the candidate, step by step.
    Forward,
    /// To the candidate at once, as soon as one of its replicas is ready
    /// (force roll forward); candidate replicas still loading finish.
    ForceForward,
    /// Back to the old deployment, step by step (cancel, or a failure with
    /// no old replica left); `end` once there.
    Backward {
        /// `CANCELED` or `FAILED`.
        end: Status,
    },
}

/// A pause, and what a resume brings back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pause {
    /// The status before the pause.
    resume_to: Status,
    /// The reason before the pause.
    reason_before: String,
}

/// One promotion's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The deployment traffic leaves.
    pub from: String,
    /// The candidate.
    pub to: String,
    /// How it moves.
    pub settings: PromotionSettings,
    /// N: the replicas it aims for.
    pub target: u32,
    /// Its status.
    pub status: Status,
    /// Steps started.
    pub step: u32,
    /// The current step's phase.
    pub phase: Phase,
    /// Why it failed or paused.
    pub reason: String,
    /// What the current step waits for (an idle worker), if anything.
    pub waiting: String,
    /// Every worker the agents report.
    pub workers: BTreeMap<String, Worker>,
    /// The table the machine wants in force: worker → deployment.
    pub routed: BTreeMap<String, String>,
    /// The last table pushed.
    pub seq: u64,
    /// The last table every router acknowledged.
    pub acked: u64,
    /// Which way replicas move.
    direction: Direction,
    /// Set while paused: the current step's starts finish, the split stays
    /// pinned, no new step starts.
    pause: Option<Pause>,
    /// Overhead replicas were started (or none were needed).
    overhead_done: bool,
    /// Workers asked to start the new deployment (or the old one, for
    /// overhead): waiting until ready.
    starting: BTreeSet<String>,
    /// Ready new replicas not yet in the table.
    ready: BTreeSet<String>,
    /// Replicas autoscaling added during the promotion, worker → deployment,
    /// until ready: each joins the table as soon as it is, whatever the
    /// step and the pause.
    #[serde(default)]
    scaling: BTreeMap<String, String>,
    /// What each worker's view was when it was asked to start (`Apply`):
    /// until its agent reports anything else, that view predates the start
    /// and says nothing of it (a failure there is an earlier engine's).
    #[serde(default)]
    applied_over: BTreeMap<String, Worker>,
    /// Old replicas this step takes out once the new ones are in.
    removes: BTreeSet<String>,
    /// Workers on their way out.
    leaving: BTreeMap<String, Retirement>,
    /// Workers whose start failed during this promotion: not tried again.
    failed: BTreeSet<String>,
    /// The clock. Not stored (it moves on every tick, and would rewrite
    /// the rollout's record each time): a resumed rollout hears the clock
    /// before anything else ([`Rollout::resume`]).
    #[serde(skip)]
    now_ms: u64,
    /// The end of the stabilization wait.
    stabilize_until: u64,
    /// The bound on the wait for the health gate's verdict.
    #[serde(default)]
    judge_until: u64,
}

impl Rollout {
    /// A promotion from `from` to `to` over `workers`, with `routed` the
    /// table in force (the old deployment's replicas) and `target` N.
    pub fn new(
        from: &str,
        to: &str,
        settings: PromotionSettings,
        target: u32,
        workers: BTreeMap<String, Worker>,
        routed: BTreeMap<String, String>,
    ) -> Self {
        Self {
            from: from.into(),
            to: to.into(),
            settings,
            target,
            status: Status::Releasing,
            step: 0,
            phase: Phase::StartingReplicas,
            reason: String::new(),
            waiting: String::new(),
            workers,
            routed,
            seq: 0,
            acked: 0,
            direction: Direction::Forward,
            pause: None,
            // The first deployment has no old replicas to add to.
            overhead_done: settings.replica_overhead_percent == 0 || from.is_empty(),
            starting: BTreeSet::new(),
            ready: BTreeSet::new(),
            scaling: BTreeMap::new(),
            applied_over: BTreeMap::new(),
            removes: BTreeSet::new(),
            leaving: BTreeMap::new(),
            failed: BTreeSet::new(),
            now_ms: 0,
            stabilize_until: 0,
            judge_until: 0,
        }
    }

    /// Outside a promotion (this one has ended): runs `target` replicas of
    /// the deployment that serves, starting or retiring the difference, the
    /// same way the steps do (a replica leaves the table, the routers
    /// acknowledge, then it drains and stops). Target 0 stops them all.
    pub fn rescale(&mut self, target: u32) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.status.is_terminal() || target == self.target {
            return out;
        }
        out.push(record(
            "scaled",
            format!(
                "{} → {target} replica(s) of {}",
                self.target,
                self.serving()
            ),
        ));
        self.target = target;
        self.advance(&mut out);
        out
    }

    /// During a promotion, autoscaling only adds (Baseten's rule): demand
    /// for `desired` replicas above the target starts the difference at
    /// once, also while paused, split between the old deployment and the
    /// candidate in proportion to the traffic split (60/40 and 10 more:
    /// 6 old, 4 candidate); each joins the table as soon as it is ready.
    /// Every replica the promotion runs, surge and overhead included,
    /// counts against `max_replicas`. The target rises with it, so the
    /// remaining steps keep that capacity; it never falls until the end.
    pub fn autoscale(&mut self, desired: u32, max_replicas: u32) -> Vec<Action> {
        let mut out = Vec::new();
        let desired = desired.min(max_replicas);
        if self.status.is_terminal() || desired <= self.target {
            return out;
        }
        let running =
            self.routed.len() + self.starting.len() + self.ready.len() + self.scaling.len();
        let room = (max_replicas as usize).saturating_sub(running);
        let wanted = ((desired - self.target) as usize).min(room);
        let idle = self.idle_workers();
        let adds = wanted.min(idle.len());
        // The candidate's share, rounded to the nearest replica.
        let share = |n: usize| {
            (n * self.candidate_weight() as usize + TOTAL_WEIGHT as usize / 2)
                / TOTAL_WEIGHT as usize
        };
        let to_candidate = if self.is_first() {
            adds
        } else if self.is_backward() {
            // Traffic is on its way back: the candidate gets none.
            0
        } else {
            share(adds)
        };
        out.push(record(
            "scaled",
            format!(
                "replica target {} → {desired} during the promotion: {} more of {}, {} more of {}{}",
                self.target,
                adds - to_candidate,
                self.from,
                to_candidate,
                self.to,
                if adds < wanted {
                    format!(" ({} short: no idle worker)", wanted - adds)
                } else {
                    String::new()
                }
            ),
        ));
        self.target = desired;
        for (i, worker) in idle.into_iter().take(adds).enumerate() {
            let deployment = if i < to_candidate {
                self.to.clone()
            } else {
                self.from.clone()
            };
            self.scaling.insert(worker.clone(), deployment.clone());
            self.note_apply(&worker);
            out.push(Action::Apply { worker, deployment });
        }
        self.advance(&mut out);
        out
    }

    /// The deployment that serves once the promotion has ended.
    pub fn serving(&self) -> String {
        if self.status == Status::Succeeded {
            self.to.clone()
        } else {
            self.from.clone()
        }
    }

    /// Starts the promotion at `now_ms` (the clock its deadlines count
    /// from): the first actions.
    pub fn start(&mut self, now_ms: u64) -> Vec<Action> {
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = vec![record(
            "promotion-started",
            format!(
                "{} → {}: {} replica{}, {}",
                self.from,
                self.to,
                self.target,
                if self.target == 1 { "" } else { "s" },
                describe(&self.settings)
            ),
        )];
        self.advance(&mut out);
        out
    }

    /// Handles one event; returns what to do.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        self.take(event, &mut out);
        self.advance(&mut out);
        out
    }

    /// What `event` changes, before the rollout advances.
    fn take(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::Many(events) => {
                for event in events {
                    self.take(event, out);
                }
            }
            Event::Worker { id, worker } => self.on_worker(id, worker),
            Event::Workers { seen, forget } => {
                for (id, worker) in seen {
                    self.on_worker(id, worker);
                }
                if !forget.is_empty() {
                    let claimed = self.claimed();
                    for id in forget {
                        if !claimed.contains(&id) {
                            self.workers.remove(&id);
                        }
                    }
                }
            }
            Event::TableAcked { seq } => self.acked = self.acked.max(seq.min(self.seq)),
            Event::Drained { worker } => self.on_drained(&worker, out),
            Event::Stopped { worker } => {
                if let Some(r) = self.leaving.get(&worker)
                    && r.stage == Leaving::Stopping
                {
                    self.leaving.remove(&worker);
                    // Its engine is gone; the agent's next status says so too.
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.engine = Engine::Idle;
                        w.deployment = None;
                    }
                }
            }
            Event::Tick { now_ms } => self.now_ms = self.now_ms.max(now_ms),
            Event::Command(command) => self.on_command(command, out),
            Event::Health(Verdict::Fail(reason)) => {
                if !self.status.is_terminal() && !self.is_backward() {
                    self.fail(format!("health gate: {reason}"), out);
                }
            }
            // Only a step's end waits for these.
            Event::Health(Verdict::Undecided(reason)) => {
                if self.phase == Phase::Judging
                    && !self.status.is_terminal()
                    && self.pause.is_none()
                {
                    self.pause(format!("health gate undecided: {reason}"), out);
                }
            }
            Event::Health(Verdict::Pass) => {
                if self.phase == Phase::Judging && !self.status.is_terminal() {
                    self.end_step(out);
                }
            }
        }
    }

    /// When the current step's stabilization wait ends (ms since the
    /// epoch), while it waits.
    pub fn stabilizing_until(&self) -> Option<u64> {
        (self.phase == Phase::Stabilizing && !self.status.is_terminal())
            .then_some(self.stabilize_until)
    }

    /// The candidate's share of traffic in the table wanted now, in percent.
    pub fn percent_to_candidate(&self) -> u32 {
        self.routes()
            .iter()
            .find(|r| r.deployment == self.to)
            .map_or(0, |r| r.weight / 100)
    }

    /// The candidate's weight in basis points.
    pub fn candidate_weight(&self) -> u32 {
        self.routes()
            .iter()
            .find(|r| r.deployment == self.to)
            .map_or(0, |r| r.weight)
    }

    /// Nothing is left to do: ended, and every worker out of the table has
    /// drained and stopped.
    pub fn is_settled(&self) -> bool {
        self.status.is_terminal() && self.leaving.is_empty() && self.acked == self.seq
    }

    /// Every worker this promotion uses: in the table, starting, ready,
    /// or on its way out. No other endpoint may take them.
    pub fn claimed(&self) -> BTreeSet<String> {
        self.routed
            .keys()
            .chain(&self.starting)
            .chain(&self.ready)
            .chain(self.scaling.keys())
            .chain(self.leaving.keys())
            .cloned()
            .collect()
    }

    /// Replicas per deployment: (ready in the table, starting, draining).
    pub fn replicas(&self, deployment: &str) -> (u32, u32, u32) {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let ready = count(self.routed.values().filter(|d| *d == deployment).count());
        let starting = count(
            self.starting
                .iter()
                .chain(&self.ready)
                .chain(self.scaling.keys())
                .filter(|w| {
                    self.workers.get(*w).and_then(|v| v.deployment.as_deref()) == Some(deployment)
                })
                .count(),
        );
        let draining = count(
            self.leaving
                .keys()
                .filter(|w| {
                    self.workers.get(*w).and_then(|v| v.deployment.as_deref()) == Some(deployment)
                })
                .count(),
        );
        (ready, starting, draining)
    }

    /// After a restart of the coordinator, at `now_ms` (the clock is not
    /// stored): the actions under way, sent again (each is idempotent at the
    /// agent), and the current table, which every router must acknowledge
    /// again.
    pub fn resume(&mut self, now_ms: u64) -> Vec<Action> {
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = Vec::new();
        self.push_table(&mut out);
        for worker in &self.starting {
            out.push(Action::Apply {
                worker: worker.clone(),
                deployment: self.starting_deployment(),
            });
        }
        for (worker, deployment) in &self.scaling {
            out.push(Action::Apply {
                worker: worker.clone(),
                deployment: deployment.clone(),
            });
        }
        for (worker, retirement) in &self.leaving {
            match retirement.stage {
                Leaving::AwaitAck(_) | Leaving::Unrouted(_) => {}
                Leaving::Draining => out.push(Action::Drain {
                    worker: worker.clone(),
                }),
                Leaving::Stopping => out.push(Action::Stop {
                    worker: worker.clone(),
                }),
            }
        }
        if self.phase == Phase::Judging && self.pause.is_none() {
            out.push(Action::JudgeHealth);
        }
        out
    }

    /// A warm engine of `deployment` that no step uses yet is worth
    /// keeping: the steps under way start that deployment and take warm
    /// engines first (no reload).
    pub fn wants_warm(&self, deployment: &str) -> bool {
        !self.status.is_terminal()
            && (deployment == self.new_deployment()
                // Its old replicas drained and kept (cleanup `KEEP`): the
                // warm start of a cancel, kept after the end.
                || (deployment == self.from && self.settings.cleanup == Cleanup::Keep))
    }

    /// `worker` was asked to start an engine for this rollout and has not
    /// reported it ready yet.
    pub fn is_starting(&self, worker: &str) -> bool {
        self.starting.contains(worker)
    }

    /// Ended, settled, and no replica starting: a new promotion may begin
    /// without a worker in transition that it would not know about.
    pub fn is_quiet(&self) -> bool {
        self.is_settled()
            && self.starting.is_empty()
            && self.ready.is_empty()
            && self.scaling.is_empty()
    }

    /// The table wanted now, weights proportional to replicas.
    pub fn routes(&self) -> Vec<Route> {
        let mut by_deployment: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (worker, deployment) in &self.routed {
            by_deployment
                .entry(deployment.as_str())
                .or_default()
                .push(worker.clone());
        }
        let total: usize = by_deployment.values().map(Vec::len).sum();
        if total == 0 {
            return Vec::new();
        }
        let mut routes: Vec<Route> = by_deployment
            .into_iter()
            .map(|(deployment, workers)| Route {
                deployment: deployment.to_owned(),
                weight: u32::try_from(workers.len() * TOTAL_WEIGHT as usize / total)
                    .unwrap_or(TOTAL_WEIGHT),
                workers,
            })
            .collect();
        // Rounding leftovers go to the first route: the sum is exact.
        let sum: u32 = routes.iter().map(|r| r.weight).sum();
        if let Some(first) = routes.first_mut() {
            first.weight += TOTAL_WEIGHT - sum;
        }
        routes
    }
}

fn record(kind: &str, message: String) -> Action {
    Action::Record {
        kind: kind.into(),
        message,
    }
}

fn describe(settings: &PromotionSettings) -> String {
    if !settings.rolling_deploy {
        return "all at once".into();
    }
    if settings.surge() {
        format!("rolling, surge {} %", settings.max_surge_percent)
    } else {
        format!(
            "rolling, unavailable {} %",
            settings.max_unavailable_percent
        )
    }
}

mod events;
pub mod records;
mod steps;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
