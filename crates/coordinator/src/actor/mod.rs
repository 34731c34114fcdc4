//! The coordinator's shell: one actor owns the [`State`]; gRPC handlers
//! send it requests, agents' status streams and the answers of the calls it
//! makes come back as internal events. For every change it writes the state
//! to the store first, then performs the rollout's actions: `Apply`,
//! `Drain` and `Stop` on agents, routing tables to every router.
//!
//! Reads (GetEndpoint, ListWorkers, WatchEndpoint) come from a published
//! [`View`], so they never wait for the actor.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossfade_common::Shutdown;
use crossfade_proto::tls::{self, Role};
use crossfade_proto::v1;
use crossfade_proto::v1::router_control_client::RouterControlClient;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use self::calls::{AgentCall, SHORT_CALL};
use self::statuses::Statuses;

use crate::error::CoordinatorError;
use crate::rollout::{self, Action, Command, Engine, Event, Rollout};
use crate::settings::{PromotionSettings, Scaling};
use crate::state::{
    Deployment, DeploymentState, Endpoint, Promotion, RouterRecord, Selector, State, WorkerRecord,
};
use crate::store::Store;

mod adopt;
mod answers;
mod calls;
mod handle;
mod io;
mod requests;
mod statuses;
mod table_push;
mod workers;

pub use handle::{Coordinator, Observed, Request, RouterObserved, View};

/// How long a router may take to acknowledge a table before the drain goes
/// ahead anyway (the draining gate's retryable 503 is the safety net).
pub const ROUTER_ACK_BOUND: Duration = Duration::from_secs(10);
/// How often agents send their status when nothing changes.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A worker whose agent sends nothing, not even a heartbeat, for this long
/// is lost: it leaves every table and its replica is replaced.
pub const HEARTBEAT_BOUND: Duration = Duration::from_secs(8);
/// How often the actor's clock ticks.
const TICK: Duration = Duration::from_millis(200);
/// The longest a change waits to be readable when nobody waits for it.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// A pass this long is logged (at debug level) with what it did.
const SLOW_PASS: Duration = Duration::from_millis(50);
/// The most answers of calls taken in one pass.
const INTERNAL_BATCH: usize = 256;
/// The least time between two table pushes: the changes in between go in
/// one table.
const TABLE_EVERY: Duration = Duration::from_millis(100);

type Reply<T> = oneshot::Sender<Result<T, CoordinatorError>>;

/// An answer waiting for its change to be stored and published.
type Answer = Box<dyn FnOnce() + Send>;

fn answer<T: Send + 'static>(
    answers: &mut Vec<Answer>,
    reply: Reply<T>,
    result: Result<T, CoordinatorError>,
) {
    answers.push(Box::new(move || {
        let _ = reply.send(result);
    }));
}

/// What woke the actor.
enum Wake {
    Request(Box<Request>),
    Internal(Internal),
    Statuses,
    Tick,
}

enum Internal {
    Drained {
        endpoint: String,
        worker: String,
    },
    /// A `Stop` ended; `failed` says why it did not reach the agent.
    Stopped {
        endpoint: Option<String>,
        worker: String,
        failed: Option<String>,
    },
    ApplyFailed {
        endpoint: String,
        worker: String,
        deployment: String,
        error: String,
    },
    /// A router answered with the version in force, or (`None`) did not
    /// answer.
    RouterAck {
        address: String,
        version: Option<u64>,
    },
    /// A router answered, refusing the table: it has not acknowledged it.
    RouterRefused {
        address: String,
        version: u64,
        reason: String,
    },
    /// A router holds requests for an endpoint that has no replica.
    Demand {
        endpoint: String,
    },
    /// A router serves an older table than the last one pushed (it
    /// restarted): it gets the current one again.
    RouterBehind {
        address: String,
    },
    /// A router obeys `epoch`, higher than this coordinator's.
    RouterEpoch {
        address: String,
        epoch: u64,
    },
    /// A router's table, read by a coordinator that started on an empty
    /// store: what it routes is adopted.
    RouterTable {
        address: String,
        table: v1::RoutingTable,
    },
    /// Requests per deployment since a promotion started, summed over the
    /// routers that answered: (total, failed).
    Stats {
        endpoint: String,
        promotion_id: String,
        by_deployment: BTreeMap<String, crate::health::Counts>,
        /// Routers that answered, of those asked.
        routers: (usize, usize),
    },
}

/// How often the health gate reads the routers' stats.
const GATE_EVERY: Duration = Duration::from_secs(2);

/// The least time a demand from a router keeps one replica wanted.
const DEMAND_HOLDS: Duration = Duration::from_secs(5);

/// Settings of the actor.
#[derive(Debug, Clone)]
pub struct Options {
    /// Agents to watch from the start (control addresses).
    pub agents: Vec<String>,
    /// Routers to push tables to from the start (control addresses).
    pub routers: Vec<String>,
    /// How long a router may take to acknowledge a table.
    pub router_ack_bound: Duration,
    /// Variables of the coordinator's environment templates may read.
    pub template_env: BTreeSet<String>,
    /// How calls to agents and routers are secured.
    pub control: tls::Control,
    /// Publish the view into this channel rather than a new one.
    pub publish_to: Option<watch::Sender<Arc<View>>>,
}

/// Starts the actor over `state`, read from `store`; its epoch is above
/// the stored one and at least `epoch_floor` (the leadership's revision on
/// etcd). Fails when the store cannot be written.
pub async fn start(
    mut store: Store,
    mut state: State,
    epoch_floor: u64,
    options: Options,
    shutdown: &Shutdown,
) -> Result<Coordinator, crate::store::StoreError> {
    // A store never written (new, or lost): the fleet may obey a higher
    // epoch, which this coordinator learns from what agents and routers
    // report (`Actor::learn_epoch`).
    let fresh_store = state.epoch == 0;
    state.epoch = (state.epoch + 1).max(epoch_floor);
    for address in &options.agents {
        state
            .workers
            .entry(address.clone())
            .or_insert_with(|| WorkerRecord {
                address: address.clone(),
                ..WorkerRecord::default()
            });
    }
    for address in &options.routers {
        state
            .routers
            .entry(address.clone())
            .or_insert_with(|| RouterRecord {
                address: address.clone(),
                acknowledged_version: 0,
            });
    }
    store.save(&state).await?;
    tracing::info!(epoch = state.epoch, store = %store.describe(), "coordinator state loaded");
    let (requests, requests_rx) = mpsc::channel(64);
    let (internal, internal_rx) = mpsc::unbounded_channel();
    let first = Arc::new(View {
        state: state.clone(),
        ..View::default()
    });
    // Published where the handle's readers already look (a standby's
    // front), so a change is readable as soon as it is answered.
    let (view_tx, view) = match options.publish_to.clone() {
        Some(sender) => {
            sender.send_replace(first);
            let view = sender.subscribe();
            (sender, view)
        }
        None => watch::channel(first),
    };
    let control = options.control.clone();
    let mut actor = Actor {
        store,
        state,
        options,
        internal: internal.clone(),
        view: view_tx,
        observed: BTreeMap::new(),
        routers: BTreeMap::new(),
        agents: calls::Agents::new(control, internal.clone(), shutdown.clone()),
        pushers: BTreeMap::new(),
        pending: Vec::new(),
        pushed_at: BTreeMap::new(),
        shutdown: shutdown.clone(),
        step_started: BTreeMap::new(),
        last_gate: Instant::now(),
        low_since: BTreeMap::new(),
        demand: BTreeMap::new(),
        router_clients: BTreeMap::new(),
        starts: BTreeMap::new(),
        stopping: BTreeSet::new(),
        started: Instant::now(),
        unseen_checked: false,
        gpu_warned: BTreeSet::new(),
        fresh_store,
        statuses: Arc::default(),
        last_claims: BTreeMap::new(),
        published_at: Instant::now(),
        table_due: false,
        table_pushed_at: Instant::now()
            .checked_sub(TABLE_EVERY)
            .unwrap_or_else(Instant::now),
    };
    let addresses: Vec<String> = actor.state.workers.keys().cloned().collect();
    for address in addresses {
        actor.watch_agent(&address);
    }
    shutdown.spawn(actor.run(requests_rx, internal_rx));
    Ok(Coordinator::from_parts(requests, view))
}

struct Actor {
    store: Store,
    state: State,
    options: Options,
    internal: mpsc::UnboundedSender<Internal>,
    view: watch::Sender<Arc<View>>,
    observed: BTreeMap<String, Observed>,
    routers: BTreeMap<String, RouterObserved>,
    agents: calls::Agents,
    /// Each router's pusher: the latest table to send.
    pushers: BTreeMap<String, watch::Sender<calls::Push>>,
    /// Tables pushed and not yet acknowledged by every router: (version,
    /// endpoint, the endpoint's table number).
    pending: Vec<(u64, String, u64)>,
    /// When each version was pushed.
    pushed_at: BTreeMap<u64, Instant>,
    shutdown: Shutdown,
    /// When each endpoint's current step started, for its duration.
    step_started: BTreeMap<String, Instant>,
    /// When the health gate last read the routers' stats.
    last_gate: Instant,
    /// Since when each endpoint has wanted fewer replicas.
    low_since: BTreeMap<String, Instant>,
    /// When a router last held requests for each endpoint that had no
    /// replica: it scales from zero.
    demand: BTreeMap<String, Instant>,
    /// A client of each router, for reads (stats, tables, demand).
    router_clients: BTreeMap<String, RouterControlClient<tonic::transport::Channel>>,
    /// Starts sent, by worker: (endpoint, deployment, when the coordinator
    /// gives up on them).
    starts: BTreeMap<String, (String, String, Instant)>,
    /// Stray engines whose `Stop` is under way.
    stopping: BTreeSet<String>,
    /// When this actor started: a worker not heard from since is lost
    /// once [`HEARTBEAT_BOUND`] has passed.
    started: Instant,
    /// Workers never heard from since the start were declared lost.
    unseen_checked: bool,
    /// (promotion, worker) whose degraded GPU the history already notes.
    gpu_warned: BTreeSet<(String, String)>,
    /// It started on an empty store: it may learn a higher epoch.
    fresh_store: bool,
    /// Agents' statuses not yet taken in.
    statuses: Arc<Statuses>,
    /// Which endpoint used each worker at the last refresh of the
    /// rollouts' views: a worker whose claim moved is seen again.
    last_claims: BTreeMap<String, String>,
    /// When the view was last published.
    published_at: Instant,
    /// A table was announced and not pushed yet.
    table_due: bool,
    /// When the last table was pushed.
    table_pushed_at: Instant,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Actor {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        self.resume().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let statuses = Arc::clone(&self.statuses);
        loop {
            let mut actions = Vec::new();
            let mut answers = Vec::new();
            let wake = tokio::select! {
                () = self.shutdown.triggered() => return,
                request = requests.recv() => match request {
                    Some(request) => Wake::Request(Box::new(request)),
                    None => return,
                },
                Some(event) = internal.recv() => Wake::Internal(event),
                () = statuses.arrived.notified() => Wake::Statuses,
                _ = tick.tick() => Wake::Tick,
            };
            // A pass: decide, store, act.
            let started = Instant::now();
            let woke = match &wake {
                Wake::Request(_) => "request",
                Wake::Internal(_) => "answers",
                Wake::Statuses => "statuses",
                Wake::Tick => "tick",
            };
            match wake {
                Wake::Request(request) => self.request(*request, &mut actions, &mut answers),
                Wake::Internal(event) => {
                    // Every answer already here, in one pass: one store
                    // write and one table for all of them.
                    let mut batch = vec![event];
                    while batch.len() < INTERNAL_BATCH {
                        match internal.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(_) => break,
                        }
                    }
                    self.answers_arrived(batch, &mut actions);
                }
                Wake::Statuses => self.statuses_arrived(&mut actions),
                Wake::Tick => self.tick(&mut actions),
            }
            let decided = started.elapsed();
            let acts = actions.len();
            // A change someone waits for is readable as soon as it is
            // answered; otherwise the view is published at most every
            // PUBLISH_EVERY (it is a copy of the state). An unstored change
            // is not answered: the caller hears that the coordinator is
            // shutting down.
            let publish = !answers.is_empty() || self.published_at.elapsed() >= PUBLISH_EVERY;
            if self.commit(actions, publish).await {
                for answer in answers {
                    answer();
                }
            }
            let took = started.elapsed();
            metrics::histogram!(crate::metrics::PASS_SECONDS).record(took.as_secs_f64());
            if took >= SLOW_PASS {
                tracing::debug!(
                    woke,
                    ?decided,
                    ?took,
                    actions = acts,
                    publish,
                    "a slow pass"
                );
            }
        }
    }

    /// Writes the state, then acts, then publishes; false when the state
    /// could not be written. A store that cannot be reached (etcd down) is
    /// waited for: nothing is acted on meanwhile.
    async fn commit(&mut self, actions: Vec<(String, Action)>, publish: bool) -> bool {
        let mut pause = Duration::from_millis(100);
        let mut waiting_since = None;
        loop {
            match self.store.save(&self.state).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() => {
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    tracing::warn!(
                        error = %e,
                        waited = ?since.elapsed(),
                        "cannot write the store; waiting for it before acting"
                    );
                    tokio::select! {
                        () = self.shutdown.triggered() => return false,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    // Acting on a state that is not written would break the
                    // promise to carry on after a crash (or, deposed, would
                    // act beside the new leader): stop instead.
                    tracing::error!(error = %e, "cannot write the store; stopping");
                    self.shutdown.trigger();
                    return false;
                }
            }
        }
        if let Some(since) = waiting_since {
            tracing::info!(waited = ?since.elapsed(), "the store is written again");
        }
        for (endpoint, action) in actions {
            self.perform(&endpoint, action);
        }
        self.push_due_table();
        if publish {
            self.publish();
        }
        true
    }

    fn publish(&mut self) {
        self.published_at = Instant::now();
        let view = Arc::new(View {
            state: self.state.clone(),
            workers: self.observed.clone(),
            routers: self.routers.clone(),
        });
        crate::metrics::record(&view);
        self.view.send_replace(view);
    }

    // === events ===

    fn tick(&mut self, actions: &mut Vec<(String, Action)>) {
        // Wall-clock time: a stabilization wait started before a restart
        // ends when it would have.
        let now = now_ms();
        let names: Vec<String> = self
            .state
            .endpoints
            .iter()
            .filter(|(_, e)| e.promotion.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in &names {
            self.feed(name, Event::Tick { now_ms: now }, actions);
        }
        self.settle_acks(actions);
        // Claims that moved since the last statuses (a promotion started,
        // a worker let go): every other endpoint sees them now.
        self.refresh_workers(Some(&BTreeSet::new()), actions);
        self.autoscale(actions);
        if self.last_gate.elapsed() >= GATE_EVERY {
            self.last_gate = Instant::now();
            for name in names {
                self.read_stats(&name);
            }
            self.check_routers();
            self.read_demand();
            if !self.unseen_checked && self.started.elapsed() >= HEARTBEAT_BOUND {
                // Workers not heard from since the start are lost now.
                self.unseen_checked = true;
                self.refresh_workers(None, actions);
            }
            self.stop_strays();
            self.expire_starts(actions);
        }
    }

    /// Feeds an event to an endpoint's rollout and collects its actions.
    fn feed(&mut self, name: &str, event: Event, actions: &mut Vec<(String, Action)>) {
        let Some(endpoint) = self.state.endpoints.get_mut(name) else {
            return;
        };
        let rollout = match (&mut endpoint.promotion, &mut endpoint.last_promotion) {
            (Some(p), _) | (None, Some(p)) => &mut p.rollout,
            (None, None) => return,
        };
        let before = (rollout.step, rollout.phase);
        let produced = rollout.handle(event);
        if (rollout.step, rollout.phase) != before {
            tracing::trace!(
                endpoint = name,
                step = rollout.step,
                from = ?before.1,
                to = ?rollout.phase,
                "phase"
            );
        }
        let start = actions.len();
        actions.extend(produced.into_iter().map(|a| (name.to_owned(), a)));
        self.settle(name, &actions[start..]);
    }

    /// One worker, one claim: a worker `name` just asked to start an
    /// engine is no longer eligible to any other endpoint, at once (not at
    /// its agent's next status, which another endpoint's tick could beat).
    fn claim(&mut self, name: &str, actions: &[(String, Action)]) {
        let started: Vec<&str> = actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Apply { worker, .. } => Some(worker.as_str()),
                _ => None,
            })
            .collect();
        if started.is_empty() {
            return;
        }
        for (other, endpoint) in &mut self.state.endpoints {
            if other == name {
                continue;
            }
            let rollout = match (&mut endpoint.promotion, &mut endpoint.last_promotion) {
                (Some(p), _) | (None, Some(p)) => &mut p.rollout,
                (None, None) => continue,
            };
            for worker in &started {
                if let Some(view) = rollout.workers.get_mut(*worker) {
                    view.eligible = false;
                }
            }
        }
    }

    /// After a rollout moved (`actions` are the ones it just produced):
    /// records, ends promotions, moves deployments.
    fn settle(&mut self, name: &str, actions: &[(String, Action)]) {
        let now = now_ms();
        self.claim(name, actions);
        let Some(endpoint) = self.state.endpoints.get_mut(name) else {
            return;
        };
        let promotion_id = endpoint
            .promotion
            .as_ref()
            .map(|p| p.id.clone())
            .unwrap_or_default();
        for (owner, action) in actions.iter() {
            if owner == name
                && let Action::Record { kind, message } = action
            {
                endpoint.record(now, kind, message.clone(), &promotion_id);
                match kind.as_str() {
                    "step-started" => {
                        self.step_started.insert(name.to_owned(), Instant::now());
                    }
                    "step-done" => {
                        if let Some(started) = self.step_started.remove(name) {
                            metrics::histogram!(crate::metrics::STEP_SECONDS, "endpoint" => name.to_owned())
                                .record(started.elapsed().as_secs_f64());
                        }
                    }
                    _ => {}
                }
            }
        }
        let Some(promotion) = &mut endpoint.promotion else {
            return;
        };
        promotion.updated_at_ms = now;
        promotion.record_split(now);
        let status = promotion.rollout.status;
        if !status.is_terminal() {
            return;
        }
        promotion.finished_at_ms = Some(now);
        metrics::counter!(crate::metrics::PROMOTIONS_TOTAL, "outcome" => crate::metrics::status_label(status))
            .increment(1);
        let Some(promotion) = endpoint.promotion.take() else {
            return;
        };
        let from = promotion.rollout.from.clone();
        let to = promotion.rollout.to.clone();
        let cleanup = promotion.rollout.settings.cleanup;
        if let Some(previous) = endpoint.last_promotion.replace(promotion) {
            // History: its state, not its copies of the fleet.
            endpoint.past_promotions.push_back(previous.archived());
            while endpoint.past_promotions.len() > crate::state::MAX_PROMOTIONS {
                endpoint.past_promotions.pop_front();
            }
        }
        endpoint.candidate = None;
        match status {
            rollout::Status::Succeeded => {
                endpoint.active = Some(to.clone());
                if let Some(d) = self.state.deployments.get_mut(&to) {
                    d.state = DeploymentState::Active;
                }
                if let Some(d) = self.state.deployments.get_mut(&from) {
                    d.state = match cleanup {
                        crate::settings::Cleanup::Deactivate => DeploymentState::Deactivated,
                        _ => DeploymentState::Kept,
                    };
                }
            }
            _ => {
                if let Some(d) = self.state.deployments.get_mut(&to) {
                    d.state = DeploymentState::Retired;
                }
            }
        }
    }

    /// After a restart: re-send what was under way, and the table.
    async fn resume(&mut self) {
        let names: Vec<String> = self.state.endpoints.keys().cloned().collect();
        let mut actions = Vec::new();
        for name in names {
            let Some(endpoint) = self.state.endpoints.get_mut(&name) else {
                continue;
            };
            let rollout = match (&mut endpoint.promotion, &mut endpoint.last_promotion) {
                (Some(p), _) | (None, Some(p)) => &mut p.rollout,
                (None, None) => continue,
            };
            let resumed = rollout.resume(now_ms());
            actions.extend(resumed.into_iter().map(|a| (name.clone(), a)));
        }
        if !actions.is_empty() {
            tracing::info!(
                actions = actions.len(),
                "resuming the actions under way before the restart"
            );
        }
        self.commit(actions, true).await;
    }
}

/// The rollout that decides an endpoint's table: the promotion under way,
/// else the last one.
pub fn current_rollout(endpoint: &Endpoint) -> Option<&Rollout> {
    endpoint
        .promotion
        .as_ref()
        .or(endpoint.last_promotion.as_ref())
        .map(|p| &p.rollout)
}
