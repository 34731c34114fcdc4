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
//! Stabilizing       the stabilization time passes; then the next step
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
    /// Stop `worker`'s engine (`Agent.Stop`); answer with [`Event::Stopped`].
    Stop {
        /// The worker.
        worker: String,
    },
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
    /// The reason a resume brings back.
    reason_before_pause: String,
    /// Every worker the agents report.
    pub workers: BTreeMap<String, Worker>,
    /// The table the machine wants in force: worker → deployment.
    pub routed: BTreeMap<String, String>,
    /// The last table pushed.
    pub seq: u64,
    /// The last table every router acknowledged.
    pub acked: u64,
    /// Moving back to `from` (cancel, or a failure with no old replica left).
    backward: bool,
    /// The status once the move back ends.
    end_backward: Status,
    /// Paused (the current step finishes; no new one starts).
    paused: bool,
    /// The status to resume to.
    resume_to: Status,
    /// Force roll forward waits for a ready candidate.
    force_forward: bool,
    /// Overhead replicas were started (or none were needed).
    overhead_done: bool,
    /// Workers asked to start the new deployment (or the old one, for
    /// overhead): waiting until ready.
    starting: BTreeSet<String>,
    /// Ready new replicas not yet in the table.
    ready: BTreeSet<String>,
    /// Old replicas this step takes out once the new ones are in.
    removes: BTreeSet<String>,
    /// Workers on their way out.
    leaving: BTreeMap<String, Retirement>,
    /// Workers whose start failed during this promotion: not tried again.
    failed: BTreeSet<String>,
    /// The clock.
    now_ms: u64,
    /// The end of the stabilization wait.
    stabilize_until: u64,
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
            reason_before_pause: String::new(),
            workers,
            routed,
            seq: 0,
            acked: 0,
            backward: false,
            end_backward: Status::Canceled,
            paused: false,
            resume_to: Status::Releasing,
            force_forward: false,
            // The first deployment has no old replicas to add to.
            overhead_done: settings.replica_overhead_percent == 0 || from.is_empty(),
            starting: BTreeSet::new(),
            ready: BTreeSet::new(),
            removes: BTreeSet::new(),
            leaving: BTreeMap::new(),
            failed: BTreeSet::new(),
            now_ms: 0,
            stabilize_until: 0,
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

    /// During a promotion, autoscaling only adds: the replica target rises
    /// (never falls) and the remaining steps start the extra replicas, so
    /// the new capacity follows the traffic as it moves to the candidate.
    pub fn raise_target(&mut self, target: u32) -> Vec<Action> {
        let mut out = Vec::new();
        if self.status.is_terminal() || target <= self.target {
            return out;
        }
        out.push(record(
            "scaled",
            format!(
                "replica target {} → {target} during the promotion",
                self.target
            ),
        ));
        self.target = target;
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

    /// Starts the promotion: the first actions.
    pub fn start(&mut self) -> Vec<Action> {
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
        match event {
            Event::Worker { id, worker } => self.on_worker(id, worker, &mut out),
            Event::TableAcked { seq } => self.acked = self.acked.max(seq.min(self.seq)),
            Event::Drained { worker } => self.on_drained(&worker, &mut out),
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
            Event::Command(command) => self.on_command(command, &mut out),
            Event::Health(Verdict::Fail(reason)) => {
                if !self.status.is_terminal() && !self.backward {
                    self.fail(format!("health gate: {reason}"), &mut out);
                }
            }
            Event::Health(Verdict::Undecided(reason)) => {
                if !self.status.is_terminal() && !self.paused {
                    self.pause(format!("health gate undecided: {reason}"), &mut out);
                }
            }
        }
        self.advance(&mut out);
        out
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

    /// After a restart of the coordinator: the actions under way, sent
    /// again (each is idempotent at the agent), and the current table,
    /// which every router must acknowledge again.
    pub fn resume(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.push_table(&mut out);
        for worker in &self.starting {
            out.push(Action::Apply {
                worker: worker.clone(),
                deployment: self.starting_deployment(),
            });
        }
        for (worker, retirement) in &self.leaving {
            match retirement.stage {
                Leaving::AwaitAck(_) => {}
                Leaving::Draining => out.push(Action::Drain {
                    worker: worker.clone(),
                }),
                Leaving::Stopping => out.push(Action::Stop {
                    worker: worker.clone(),
                }),
            }
        }
        out
    }

    /// Ended, settled, and no replica starting: a new promotion may begin
    /// without a worker in transition that it would not know about.
    pub fn is_quiet(&self) -> bool {
        self.is_settled() && self.starting.is_empty() && self.ready.is_empty()
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

    // === events ===

    fn on_worker(&mut self, id: String, worker: Worker, out: &mut Vec<Action>) {
        if worker.engine == Engine::Unknown {
            self.on_lost(&id, out);
            self.workers.insert(id, worker);
            return;
        }
        let ready_with =
            |d: &str| worker.engine == Engine::Ready && worker.deployment.as_deref() == Some(d);
        // A routed worker that stopped being ready leaves the table now.
        if let Some(deployment) = self.routed.get(&id).cloned()
            && !ready_with(&deployment)
            && !self.leaving.contains_key(&id)
        {
            self.routed.remove(&id);
            self.removes.remove(&id);
            out.push(record(
                "replica-lost",
                format!("{id} ({deployment}) is no longer ready; out of the table"),
            ));
            self.push_table(out);
        }
        // A candidate replica of ours failed (not ready in time, crash loop).
        let failed_new = worker.engine == Engine::Failed
            && worker.deployment.as_deref() == Some(self.to.as_str())
            && (self.starting.contains(&id) || self.ready.contains(&id));
        let was_starting = self.starting.contains(&id);
        self.workers.insert(id.clone(), worker.clone());
        if was_starting {
            let expected = self.starting_deployment();
            if worker.engine == Engine::Ready
                && worker.deployment.as_deref() == Some(expected.as_str())
            {
                self.starting.remove(&id);
                self.ready.insert(id.clone());
            } else if worker.engine == Engine::Failed {
                self.starting.remove(&id);
                self.failed.insert(id.clone());
                // Free its GPUs.
                self.retire(&id, false, out);
                if !failed_new {
                    out.push(record(
                        "replica-failed",
                        format!("{id} failed to start {expected}"),
                    ));
                }
            }
        }
        if failed_new && !self.status.is_terminal() && !self.backward {
            self.fail(format!("candidate replica on {id} failed"), out);
        }
    }

    /// A lost worker leaves the table at once and is never drained through
    /// (a call to it would only wait out its deadline); its replica is
    /// replaced by the step or by the steady state, and the shell stops its
    /// engine when it answers again. A start on it is not a failed
    /// candidate: the step starts one elsewhere.
    fn on_lost(&mut self, id: &str, out: &mut Vec<Action>) {
        if let Some(deployment) = self.routed.remove(id) {
            out.push(record(
                "replica-lost",
                format!("{id} ({deployment}) is not answering; out of the table"),
            ));
            self.push_table(out);
        }
        self.removes.remove(id);
        let started = self.starting.remove(id) | self.ready.remove(id);
        let leaving = self.leaving.remove(id).is_some();
        if started || leaving {
            out.push(record(
                "worker-lost",
                format!("{id} is not answering; its part in this step moves elsewhere"),
            ));
        }
    }

    fn on_drained(&mut self, worker: &str, out: &mut Vec<Action>) {
        let Some(retirement) = self.leaving.get(worker).copied() else {
            return;
        };
        if retirement.stage != Leaving::Draining {
            return;
        }
        if retirement.then_start && !self.status.is_terminal() {
            self.leaving.remove(worker);
            let deployment = self.new_deployment();
            self.starting.insert(worker.to_owned());
            out.push(Action::Apply {
                worker: worker.to_owned(),
                deployment,
            });
        } else if retirement.keep_running {
            self.leaving.remove(worker);
        } else {
            self.leaving.insert(
                worker.to_owned(),
                Retirement {
                    stage: Leaving::Stopping,
                    ..retirement
                },
            );
            out.push(Action::Stop {
                worker: worker.to_owned(),
            });
        }
    }

    fn on_command(&mut self, command: Command, out: &mut Vec<Action>) {
        if self.status.is_terminal() {
            return;
        }
        match command {
            Command::Pause => {
                if !self.paused {
                    self.pause("paused by the operator".into(), out);
                }
            }
            Command::Resume => {
                if self.paused {
                    self.paused = false;
                    self.status = self.resume_to;
                    self.reason = std::mem::take(&mut self.reason_before_pause);
                    out.push(record("resumed", "promotion resumed".into()));
                }
            }
            Command::Cancel if self.is_first() => {
                out.push(record(
                    "canceled",
                    "the endpoint's first deployment: nothing to ramp back to".into(),
                ));
                self.end_now(Status::Canceled, out);
            }
            Command::Cancel => {
                if !self.backward {
                    out.push(record("canceled", "ramping traffic back down".into()));
                    self.turn_back(Status::Canceled, out);
                }
            }
            Command::ForceCancel => self.force_cancel(out),
            Command::ForceRollForward => {
                out.push(record(
                    "force-roll-forward",
                    "all traffic to the candidate as soon as a replica is ready".into(),
                ));
                self.force_forward = true;
                self.paused = false;
                if self.backward {
                    // From RAMPING_DOWN: forward again.
                    self.backward = false;
                    self.abandon_step(out);
                }
                self.status = Status::RampingUp;
            }
        }
    }

    fn pause(&mut self, reason: String, out: &mut Vec<Action>) {
        self.reason_before_pause = std::mem::replace(&mut self.reason, reason);
        self.paused = true;
        self.resume_to = self.status;
        self.status = Status::Paused;
        out.push(record("paused", self.reason.clone()));
    }

    /// Moves back to `from`, step by step; `end` once there.
    fn turn_back(&mut self, end: Status, out: &mut Vec<Action>) {
        self.abandon_step(out);
        // Workers where the candidate failed can run the old deployment.
        self.failed.clear();
        self.backward = true;
        self.end_backward = end;
        self.paused = false;
        self.force_forward = false;
        self.status = Status::RampingDown;
    }

    /// Drops the current step's plan: replicas started for it and not yet
    /// in the table are stopped.
    fn abandon_step(&mut self, out: &mut Vec<Action>) {
        let unrouted: Vec<String> = self.starting.iter().chain(&self.ready).cloned().collect();
        self.starting.clear();
        self.ready.clear();
        self.removes.clear();
        for worker in unrouted {
            self.retire(&worker, false, out);
        }
        // Workers taken out to be updated in place just stop: the next
        // steps start what they need on idle workers.
        for retirement in self.leaving.values_mut() {
            retirement.then_start = false;
        }
        self.phase = Phase::StartingReplicas;
    }

    fn force_cancel(&mut self, out: &mut Vec<Action>) {
        let old_ready = self.routed.values().any(|d| *d == self.from);
        if !old_ready && !self.is_first() {
            // Nothing of the old deployment serves: it has to start first.
            out.push(record(
                "force-cancel",
                "no old replica is serving: ramping back down".into(),
            ));
            self.turn_back(Status::Canceled, out);
            return;
        }
        out.push(record(
            "force-cancel",
            "all traffic to the old deployment now".into(),
        ));
        self.end_now(Status::Canceled, out);
    }

    /// The endpoint's first promotion: there is no old deployment.
    fn is_first(&self) -> bool {
        self.from.is_empty()
    }

    /// Ends now: the step's replicas and the candidate's stop, the traffic
    /// is the old deployment's (none, for a first deployment).
    fn end_now(&mut self, status: Status, out: &mut Vec<Action>) {
        self.abandon_step(out);
        self.take_out_deployment(&self.to.clone(), false, out);
        self.finish(status, out);
    }

    fn fail(&mut self, reason: String, out: &mut Vec<Action>) {
        out.push(record("failed", reason.clone()));
        self.reason = reason;
        if self.is_first() || self.routed.values().any(|d| *d == self.from) {
            self.end_now(Status::Failed, out);
        } else {
            // No old replica is left to take the traffic: bring them back.
            self.turn_back(Status::Failed, out);
        }
    }

    fn finish(&mut self, status: Status, out: &mut Vec<Action>) {
        self.status = status;
        self.paused = false;
        self.force_forward = false;
        self.removes.clear();
        // A worker where the candidate failed may host the deployment that
        // serves now (scaling), and the next promotion's candidate.
        self.failed.clear();
        // Replicas started for a step that will not come: stop them.
        let unrouted: Vec<String> = self.starting.iter().chain(&self.ready).cloned().collect();
        self.starting.clear();
        self.ready.clear();
        for worker in unrouted {
            self.retire(&worker, false, out);
        }
        out.push(record(
            match status {
                Status::Succeeded => "succeeded",
                Status::Failed => "ended-failed",
                _ => "ended-canceled",
            },
            format!(
                "{} % of traffic on {}",
                self.percent_to_candidate(),
                self.to
            ),
        ));
    }

    // === the steps ===

    /// The deployment replicas are moving to.
    fn new_deployment(&self) -> String {
        if self.backward {
            self.from.clone()
        } else {
            self.to.clone()
        }
    }

    /// The deployment replicas are moving from.
    fn old_deployment(&self) -> String {
        if self.backward {
            self.to.clone()
        } else {
            self.from.clone()
        }
    }

    /// What a starting worker was asked to run (overhead replicas run the
    /// old deployment).
    fn starting_deployment(&self) -> String {
        if self.status.is_terminal() {
            return self.serving();
        }
        if !self.overhead_done && !self.backward {
            return self.from.clone();
        }
        self.new_deployment()
    }

    fn count_routed(&self, deployment: &str) -> u32 {
        u32::try_from(self.routed.values().filter(|d| *d == deployment).count()).unwrap_or(u32::MAX)
    }

    fn is_idle(&self, id: &str) -> bool {
        self.workers.get(id).is_some_and(|w| {
            w.eligible && !w.evict && matches!(w.engine, Engine::Idle | Engine::Failed)
        }) && !self.routed.contains_key(id)
            && !self.starting.contains(id)
            && !self.ready.contains(id)
            && !self.leaving.contains_key(id)
            && !self.failed.contains(id)
    }

    fn idle_workers(&self) -> Vec<String> {
        self.workers
            .keys()
            .filter(|id| self.is_idle(id))
            .cloned()
            .collect()
    }

    fn push_table(&mut self, out: &mut Vec<Action>) {
        self.seq += 1;
        out.push(Action::PushTable {
            seq: self.seq,
            routes: self.routes(),
        });
    }

    /// Takes `worker` out of the table (if it is in) and retires it: after
    /// the acknowledgement it drains, then stops (or starts the new
    /// deployment, `then_start`).
    fn retire(&mut self, worker: &str, then_start: bool, out: &mut Vec<Action>) {
        let routed = self.routed.remove(worker).is_some();
        if routed {
            self.push_table(out);
        }
        let keep_running = false;
        self.leaving.insert(
            worker.to_owned(),
            Retirement {
                // A worker that was never in a table needs no acknowledgement.
                stage: Leaving::AwaitAck(if routed { self.seq } else { 0 }),
                then_start,
                keep_running,
            },
        );
    }

    /// Takes every worker of `deployment` out of the table in one table,
    /// and retires them; `keep_running` leaves their engines warm.
    fn take_out_deployment(&mut self, deployment: &str, keep_running: bool, out: &mut Vec<Action>) {
        let workers: Vec<String> = self
            .routed
            .iter()
            .filter(|(_, d)| *d == deployment)
            .map(|(w, _)| w.clone())
            .collect();
        if workers.is_empty() {
            return;
        }
        for worker in &workers {
            self.routed.remove(worker);
        }
        self.push_table(out);
        for worker in workers {
            self.leaving.insert(
                worker,
                Retirement {
                    stage: Leaving::AwaitAck(self.seq),
                    then_start: false,
                    keep_running,
                },
            );
        }
    }

    /// Moves things along as far as they go now.
    fn advance(&mut self, out: &mut Vec<Action>) {
        // A bound: each pass either acts or stops.
        for _ in 0..64 {
            let before = (self.fingerprint(), out.len());
            self.progress_retirements(out);
            if self.status.is_terminal() {
                self.progress_steady(out);
            } else {
                self.progress_step(out);
            }
            if (self.fingerprint(), out.len()) == before {
                return;
            }
        }
    }

    /// A cheap fingerprint of what `advance` may change.
    fn fingerprint(
        &self,
    ) -> (
        Status,
        Phase,
        u32,
        u64,
        usize,
        usize,
        usize,
        usize,
        bool,
        bool,
    ) {
        (
            self.status,
            self.phase,
            self.step,
            self.seq,
            self.routed.len(),
            self.starting.len(),
            self.ready.len(),
            self.leaving.len(),
            self.overhead_done,
            self.backward,
        )
    }

    fn progress_retirements(&mut self, out: &mut Vec<Action>) {
        let due: Vec<String> = self
            .leaving
            .iter()
            .filter(|(_, r)| matches!(r.stage, Leaving::AwaitAck(seq) if seq <= self.acked))
            .map(|(w, _)| w.clone())
            .collect();
        for worker in due {
            let never_routed = matches!(
                self.leaving.get(&worker),
                Some(Retirement {
                    stage: Leaving::AwaitAck(0),
                    ..
                })
            );
            let idle = self
                .workers
                .get(&worker)
                .is_some_and(|w| w.engine == Engine::Idle);
            if let Some(r) = self.leaving.get_mut(&worker) {
                if never_routed && !r.then_start {
                    // Nothing routes to it: stop it (a stop drains first).
                    r.stage = Leaving::Stopping;
                    if idle {
                        self.leaving.remove(&worker);
                    } else {
                        out.push(Action::Stop { worker });
                    }
                } else {
                    r.stage = Leaving::Draining;
                    out.push(Action::Drain { worker });
                }
            }
        }
    }

    /// After the end: keeps `target` healthy replicas of the serving
    /// deployment; a replica to evict is replaced before it drains.
    fn progress_steady(&mut self, out: &mut Vec<Action>) {
        let serving = self.serving();
        if serving.is_empty() {
            return;
        }
        if !self.ready.is_empty() {
            for worker in std::mem::take(&mut self.ready) {
                self.routed.insert(worker, serving.clone());
            }
            self.push_table(out);
        }
        // An engine of the serving deployment that no step started (its
        // agent restarted it after a crash) is counted, not orphaned.
        let strays: Vec<(String, Engine)> = self
            .workers
            .iter()
            .filter(|(id, w)| {
                w.deployment.as_deref() == Some(serving.as_str())
                    && matches!(w.engine, Engine::Starting | Engine::Ready)
                    && w.eligible
                    && !w.evict
                    && !self.routed.contains_key(*id)
                    && !self.starting.contains(*id)
                    && !self.leaving.contains_key(*id)
            })
            .map(|(id, w)| (id.clone(), w.engine))
            .collect();
        for (id, engine) in strays {
            if engine == Engine::Ready {
                self.routed.insert(id, serving.clone());
                self.push_table(out);
            } else {
                self.starting.insert(id);
            }
        }
        let evicted = |w: &String| self.workers.get(w).is_some_and(|v| v.evict);
        let routed: Vec<String> = self
            .routed
            .iter()
            .filter(|(_, d)| **d == serving)
            .map(|(w, _)| w.clone())
            .collect();
        let (leaving, staying): (Vec<String>, Vec<String>) =
            routed.into_iter().partition(|w| evicted(w));
        let target = self.target as usize;
        let serving_count = staying.len() + self.starting.len();
        if serving_count < target {
            let starts: Vec<String> = self
                .idle_workers()
                .into_iter()
                .take(target - serving_count)
                .collect();
            for worker in starts {
                self.starting.insert(worker.clone());
                out.push(Action::Apply {
                    worker,
                    deployment: serving.clone(),
                });
            }
        } else if self.starting.is_empty() && staying.len() > target {
            for worker in staying.iter().skip(target) {
                self.retire(worker, false, out);
            }
        }
        // Evicted replicas leave once their replacements serve (or when
        // no replacement can ever start, or none is wanted).
        let replaced = staying.len() >= target || self.idle_workers().is_empty();
        if replaced && self.starting.is_empty() {
            for worker in leaving {
                self.retire(&worker, false, out);
            }
        }
    }

    fn progress_step(&mut self, out: &mut Vec<Action>) {
        let new = self.new_deployment();
        let old = self.old_deployment();

        // Force roll forward: as soon as a candidate replica is ready.
        if self.force_forward {
            let ready: Vec<String> = self
                .ready
                .iter()
                .filter(|w| {
                    self.workers
                        .get(*w)
                        .is_some_and(|v| v.deployment.as_deref() == Some(self.to.as_str()))
                })
                .cloned()
                .collect();
            if self.count_routed(&self.to) > 0 || !ready.is_empty() {
                let added = !ready.is_empty();
                for worker in ready {
                    self.ready.remove(&worker);
                    self.routed.insert(worker, self.to.clone());
                }
                let seq = self.seq;
                let keep = self.settings.cleanup == Cleanup::Keep;
                let others: Vec<String> = self.starting.iter().cloned().collect();
                self.starting.clear();
                for worker in others {
                    // Still loading: needed no more.
                    self.retire(&worker, false, out);
                }
                self.take_out_deployment(&self.from.clone(), keep, out);
                if added && self.seq == seq {
                    // Nothing of the old deployment was left to take out.
                    self.push_table(out);
                }
                self.finish(Status::Succeeded, out);
                return;
            }
        }

        match self.phase {
            Phase::StartingReplicas => self.start_step(&new, &old, out),
            Phase::WaitingReady => {
                if self.starting.is_empty() && !self.leaving.values().any(|r| r.then_start) {
                    if self.ready.is_empty() {
                        // Every start failed or was lost: try again
                        // elsewhere, with no old replica out meanwhile (the
                        // overhead is best effort: go on without it).
                        self.overhead_done = true;
                        self.removes.clear();
                        self.phase = Phase::StartingReplicas;
                        return;
                    }
                    if !self.overhead_done {
                        // The extra old replicas join the table.
                        for worker in std::mem::take(&mut self.ready) {
                            self.routed.insert(worker, self.from.clone());
                        }
                        self.overhead_done = true;
                        self.push_table(out);
                        self.phase = Phase::ShiftingTraffic;
                        return;
                    }
                    for worker in std::mem::take(&mut self.ready) {
                        self.routed.insert(worker, new.clone());
                    }
                    let removes = std::mem::take(&mut self.removes);
                    for worker in &removes {
                        self.routed.remove(worker);
                    }
                    self.push_table(out);
                    for worker in removes {
                        self.leaving.insert(
                            worker,
                            Retirement {
                                stage: Leaving::AwaitAck(self.seq),
                                then_start: false,
                                keep_running: false,
                            },
                        );
                    }
                    self.phase = Phase::ShiftingTraffic;
                    if self.status == Status::Releasing {
                        self.status = Status::RampingUp;
                    }
                    if self.resume_to == Status::Releasing {
                        self.resume_to = Status::RampingUp;
                    }
                }
            }
            Phase::ShiftingTraffic => {
                if self.acked >= self.seq {
                    self.phase = Phase::Draining;
                }
            }
            Phase::Draining => {
                if !self
                    .leaving
                    .values()
                    .any(|r| matches!(r.stage, Leaving::AwaitAck(_) | Leaving::Draining))
                {
                    self.phase = Phase::Stopping;
                }
            }
            Phase::Stopping => {
                if self.leaving.is_empty() {
                    self.phase = Phase::Stabilizing;
                    self.stabilize_until = self
                        .now_ms
                        .saturating_add(u64::from(self.settings.stabilization_time_seconds) * 1000);
                }
            }
            Phase::Stabilizing => {
                if self.now_ms >= self.stabilize_until {
                    self.phase = Phase::StartingReplicas;
                    out.push(record(
                        "step-done",
                        format!(
                            "step {}: {} % of traffic on {}",
                            self.step,
                            self.percent_to_candidate(),
                            self.to
                        ),
                    ));
                }
            }
        }
    }

    /// Plans and starts the next step, or ends the promotion.
    fn start_step(&mut self, new: &str, old: &str, out: &mut Vec<Action>) {
        let new_routed = self.count_routed(new);
        let old_routed = self.count_routed(old);

        if !self.starting.is_empty() || !self.ready.is_empty() {
            // Replicas of a step under way: wait for them first.
            self.phase = Phase::WaitingReady;
            return;
        }
        if self.paused {
            return;
        }
        // Overhead: extra old replicas where idle workers exist.
        if !self.overhead_done && !self.backward {
            let wanted = self.settings.overhead(self.target) as usize;
            let idle = self.idle_workers();
            let chosen: Vec<String> = idle.into_iter().take(wanted).collect();
            if chosen.is_empty() {
                self.overhead_done = true;
            } else {
                out.push(record(
                    "overhead",
                    format!(
                        "starting {} extra replica(s) of {}",
                        chosen.len(),
                        self.from
                    ),
                ));
                for worker in chosen {
                    self.starting.insert(worker.clone());
                    out.push(Action::Apply {
                        worker,
                        deployment: self.from.clone(),
                    });
                }
                self.phase = Phase::WaitingReady;
                return;
            }
        }

        // Done: every old replica is gone and the target is met, or no
        // worker will ever free up to get closer to it.
        let stuck = self.idle_workers().is_empty() && self.leaving.is_empty();
        if old_routed == 0 && (new_routed >= self.target || (new_routed > 0 && stuck)) {
            if new_routed < self.target {
                out.push(record(
                    "short",
                    format!(
                        "{new_routed} of {} replicas: no more eligible workers",
                        self.target
                    ),
                ));
            }
            let end = if self.backward {
                self.end_backward
            } else {
                Status::Succeeded
            };
            self.finish(end, out);
            return;
        }

        let k = self.settings.step_size(self.target);
        let adds = k.min(self.target.saturating_sub(new_routed));
        let idle = self.idle_workers();
        let (fresh, in_place): (Vec<String>, Vec<String>) = if adds == 0 {
            (Vec::new(), Vec::new())
        } else {
            let old_workers: Vec<String> = self
                .routed
                .iter()
                .filter(|(_, d)| d.as_str() == old)
                .map(|(w, _)| w.clone())
                .collect();
            let adds = adds as usize;
            // One replica keeps serving while others update in place; the
            // last one goes only when nothing else can ever free up (no idle
            // worker, none on its way out): the design's "instead of waiting
            // forever", at the price of a gap the event history records.
            let keep = usize::from(new_routed == 0);
            let spare = if old_workers.len() > keep || !self.leaving.is_empty() {
                old_workers.len().saturating_sub(keep)
            } else {
                old_workers.len()
            };
            if self.settings.surge() || self.backward || self.force_forward {
                let fresh: Vec<String> = idle.iter().take(adds).cloned().collect();
                // In place only when no worker is about to free up.
                let short = if self.leaving.is_empty() {
                    adds - fresh.len()
                } else {
                    0
                };
                let in_place = old_workers.into_iter().take(short.min(spare)).collect();
                (fresh, in_place)
            } else {
                let in_place: Vec<String> = old_workers.into_iter().take(adds.min(spare)).collect();
                let short = adds - in_place.len();
                let fresh = idle.iter().take(short).cloned().collect();
                (fresh, in_place)
            }
        };
        if fresh.is_empty() && in_place.is_empty() && adds > 0 {
            let waiting = format!("waiting for an eligible idle worker to start {new}");
            if self.waiting != waiting {
                self.waiting = waiting.clone();
                out.push(record("waiting", waiting));
            }
            return;
        }
        self.waiting.clear();
        self.step += 1;
        // Old replicas that leave without replacement: as many as the fresh
        // ones (while that keeps the target), or every one left at the last
        // step.
        let last = new_routed + u32::try_from(fresh.len() + in_place.len()).unwrap_or(u32::MAX)
            >= self.target;
        let remaining_old: Vec<String> = self
            .routed
            .iter()
            .filter(|(w, d)| d.as_str() == old && !in_place.contains(w))
            .map(|(w, _)| w.clone())
            .collect();
        // Not at the last step, the replicas after the step stay at the
        // target: an endpoint left short (a force roll forward, a lost
        // worker) gets its capacity back before old replicas leave.
        let after = new_routed as usize + fresh.len() + old_routed as usize;
        let surplus = after.saturating_sub(self.target as usize);
        let removes: BTreeSet<String> = if last {
            remaining_old.into_iter().collect()
        } else {
            remaining_old
                .into_iter()
                .take(fresh.len().min(surplus))
                .collect()
        };
        out.push(record(
            "step-started",
            format!(
                "step {}: {} new replica(s) of {new} on idle workers, {} updated in place, {} old out",
                self.step,
                fresh.len(),
                in_place.len(),
                removes.len()
            ),
        ));
        for worker in fresh {
            self.starting.insert(worker.clone());
            out.push(Action::Apply {
                worker,
                deployment: new.to_owned(),
            });
        }
        if new_routed == 0 && !in_place.is_empty() && in_place.len() == old_routed as usize {
            out.push(record(
                "no-replica",
                format!("no idle worker: {old} is updated in place and the endpoint has no replica until {new} is ready"),
            ));
        }
        for worker in &in_place {
            self.retire(worker, true, out);
        }
        self.removes = removes;
        self.phase = Phase::WaitingReady;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
