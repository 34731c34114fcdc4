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
use crossfade_proto::v1;
use crossfade_proto::v1::agent_client::AgentClient;
use crossfade_proto::v1::router_control_client::RouterControlClient;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;
use tonic::transport::{Channel, Endpoint as Dial};

use crate::rollout::{self, Action, Command, Engine, Event, Rollout};
use crate::settings::{PromotionSettings, Scaling};
use crate::state::{
    Deployment, DeploymentState, Endpoint, Promotion, RouterRecord, Selector, State, WorkerRecord,
};
use crate::store::Store;

/// How long a router may take to acknowledge a table before the drain goes
/// ahead anyway (the draining gate's retryable 503 is the safety net).
pub const ROUTER_ACK_BOUND: Duration = Duration::from_secs(10);
/// How often the actor's clock ticks.
const TICK: Duration = Duration::from_millis(200);

type Reply<T> = oneshot::Sender<Result<T, Status>>;

/// An answer waiting for its change to be stored and published.
type Answer = Box<dyn FnOnce() + Send>;

fn answer<T: Send + 'static>(
    answers: &mut Vec<Answer>,
    reply: Reply<T>,
    result: Result<T, Status>,
) {
    answers.push(Box::new(move || {
        let _ = reply.send(result);
    }));
}

/// What gRPC handlers ask of the actor.
#[derive(Debug)]
pub enum Request {
    /// Create an endpoint (with a first deployment when a template is given).
    CreateEndpoint(v1::CreateEndpointRequest, Reply<()>),
    /// Delete an endpoint (stopping its replicas).
    DeleteEndpoint(v1::DeleteEndpointRequest, Reply<v1::DeleteEndpointResponse>),
    /// Change scaling.
    UpdateScaling(v1::UpdateScalingRequest, Reply<()>),
    /// Change promotion settings.
    UpdatePromotionSettings(v1::UpdatePromotionSettingsRequest, Reply<()>),
    /// Change the worker selector.
    UpdateWorkerSelector(v1::UpdateWorkerSelectorRequest, Reply<()>),
    /// Change the aliases.
    UpdateAliases(v1::UpdateAliasesRequest, Reply<()>),
    /// Promote a template or a kept deployment.
    Promote(v1::PromoteRequest, Reply<(String, String)>),
    /// Pause, resume, cancel, force.
    Control(Command, v1::PromotionControlRequest, Reply<()>),
    /// Add an agent by control address.
    AddWorker(String, Reply<()>),
    /// Remove an agent.
    RemoveWorker(String, Reply<()>),
    /// Cordon (true) or uncordon an agent.
    Cordon(String, bool, String, Reply<()>),
    /// Add a router by control address.
    AddRouter(String, Reply<()>),
    /// Remove a router.
    RemoveRouter(String, Reply<()>),
}

/// What a worker looks like from here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Its last status, if it ever answered.
    pub status: Option<v1::WorkerStatus>,
    /// Its status stream is up.
    pub reachable: bool,
    /// When it last answered.
    pub last_seen: Option<SystemTime>,
}

/// A router as seen from here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterObserved {
    /// The last call succeeded.
    pub reachable: bool,
    /// When it last answered.
    pub last_seen: Option<SystemTime>,
}

/// What reads see: the state and what agents and routers report.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The desired state.
    pub state: State,
    /// By control address.
    pub workers: BTreeMap<String, Observed>,
    /// By control address.
    pub routers: BTreeMap<String, RouterObserved>,
}

/// The handle gRPC handlers hold.
#[derive(Debug, Clone)]
pub struct Coordinator {
    requests: mpsc::Sender<Request>,
    view: watch::Receiver<Arc<View>>,
}

impl Coordinator {
    /// Sends a request and waits for its answer.
    pub async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Status> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?
    }

    /// The view now.
    pub fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.borrow())
    }

    /// Watches the view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }
}

enum Internal {
    Status {
        address: String,
        status: Option<Box<v1::WorkerStatus>>,
    },
    Drained {
        endpoint: String,
        worker: String,
    },
    Stopped {
        endpoint: String,
        worker: String,
    },
    ApplyFailed {
        endpoint: String,
        worker: String,
        deployment: String,
        error: String,
    },
    RouterAck {
        address: String,
        version: Option<u64>,
    },
    /// A router serves an older table than the last one pushed (it
    /// restarted): it gets the current one again.
    RouterBehind {
        address: String,
    },
    /// Requests per deployment since a promotion started, summed over the
    /// routers that answered: (total, failed).
    Stats {
        endpoint: String,
        promotion_id: String,
        by_deployment: BTreeMap<String, (u64, u64)>,
    },
}

/// The health gate: a candidate that has served at least this many requests
/// may be judged.
pub const GATE_MIN_REQUESTS: u64 = 20;
/// The health gate: the candidate fails when its failure rate exceeds the
/// old deployment's by more than this.
pub const GATE_MARGIN: f64 = 0.05;
/// How often the health gate reads the routers' stats.
const GATE_EVERY: Duration = Duration::from_secs(2);

/// Settings of the actor.
#[derive(Debug, Clone)]
pub struct Options {
    /// Agents to watch from the start (control addresses).
    pub agents: Vec<String>,
    /// Routers to push tables to from the start (control addresses).
    pub routers: Vec<String>,
    /// How long a router may take to acknowledge a table.
    pub router_ack_bound: Duration,
}

/// Starts the actor over the state in `store`; fails when the store cannot
/// be read or written.
pub fn start(
    store: Store,
    options: Options,
    shutdown: &Shutdown,
) -> Result<Coordinator, crate::store::StoreError> {
    let mut state = store.load()?;
    state.epoch += 1;
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
    store.save(&state)?;
    tracing::info!(epoch = state.epoch, path = %store.path().display(), "coordinator state loaded");
    let (requests, requests_rx) = mpsc::channel(64);
    let (internal, internal_rx) = mpsc::unbounded_channel();
    let (view_tx, view) = watch::channel(Arc::new(View {
        state: state.clone(),
        ..View::default()
    }));
    let mut actor = Actor {
        store,
        state,
        options,
        internal,
        view: view_tx,
        observed: BTreeMap::new(),
        routers: BTreeMap::new(),
        agents: BTreeMap::new(),
        pending: Vec::new(),
        pushed_at: BTreeMap::new(),
        shutdown: shutdown.clone(),
        step_started: BTreeMap::new(),
        last_gate: Instant::now(),
        low_since: BTreeMap::new(),
    };
    let addresses: Vec<String> = actor.state.workers.keys().cloned().collect();
    for address in addresses {
        actor.watch_agent(&address);
    }
    actor.resume();
    shutdown.spawn(actor.run(requests_rx, internal_rx));
    Ok(Coordinator { requests, view })
}

struct Actor {
    store: Store,
    state: State,
    options: Options,
    internal: mpsc::UnboundedSender<Internal>,
    view: watch::Sender<Arc<View>>,
    observed: BTreeMap<String, Observed>,
    routers: BTreeMap<String, RouterObserved>,
    agents: BTreeMap<String, AgentClient<Channel>>,
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
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut actions = Vec::new();
            let mut answers = Vec::new();
            tokio::select! {
                () = self.shutdown.triggered() => return,
                request = requests.recv() => match request {
                    Some(request) => self.request(request, &mut actions, &mut answers),
                    None => return,
                },
                Some(event) = internal.recv() => self.internal(event, &mut actions),
                _ = tick.tick() => self.tick(&mut actions),
            }
            // An unstored change is not answered: the caller hears that the
            // coordinator is shutting down.
            if self.commit(actions) {
                for answer in answers {
                    answer();
                }
            }
        }
    }

    /// Writes the state, then acts, then publishes; false when the state
    /// could not be written.
    fn commit(&mut self, actions: Vec<(String, Action)>) -> bool {
        if let Err(e) = self.store.save(&self.state) {
            // Acting on a state that is not written would break the
            // promise to carry on after a crash: stop instead.
            tracing::error!(error = %e, "cannot write the store; shutting down");
            self.shutdown.trigger();
            return false;
        }
        for (endpoint, action) in actions {
            self.perform(&endpoint, action);
        }
        self.publish();
        true
    }

    fn publish(&self) {
        let view = Arc::new(View {
            state: self.state.clone(),
            workers: self.observed.clone(),
            routers: self.routers.clone(),
        });
        crate::metrics::record(&view);
        self.view.send_replace(view);
    }

    // === requests ===

    /// Handles a request; its answer is sent once the change is stored and
    /// published (`answers`), so a caller that reads right after sees it.
    fn request(
        &mut self,
        request: Request,
        actions: &mut Vec<(String, Action)>,
        answers: &mut Vec<Answer>,
    ) {
        match request {
            Request::CreateEndpoint(r, reply) => {
                answer(answers, reply, self.create_endpoint(r, actions));
            }
            Request::DeleteEndpoint(r, reply) => {
                answer(answers, reply, self.delete_endpoint(&r, actions));
            }
            Request::UpdateScaling(r, reply) => {
                let result = self.with_endpoint(&r.name, |e, _| {
                    let scaling = r
                        .scaling
                        .as_ref()
                        .ok_or_else(|| Status::invalid_argument("scaling: required"))?;
                    e.scaling = Scaling::from_proto(scaling, "scaling").map_err(invalid)?;
                    Ok(())
                });
                answer(answers, reply, result);
            }
            Request::UpdatePromotionSettings(r, reply) => {
                let result = self.with_endpoint(&r.name, |e, _| {
                    let update = r.settings.unwrap_or_default();
                    e.settings = e.settings.updated(&update, "settings").map_err(invalid)?;
                    Ok(())
                });
                answer(answers, reply, result);
            }
            Request::UpdateWorkerSelector(r, reply) => {
                let result = self.with_endpoint(&r.name, |e, _| {
                    e.selector = Selector::from_proto(&r.selector.clone().unwrap_or_default());
                    Ok(())
                });
                answer(answers, reply, result);
            }
            Request::UpdateAliases(r, reply) => {
                let result = validate_names("aliases", &r.aliases).and_then(|()| {
                    self.with_endpoint(&r.name, |e, _| {
                        e.aliases.clone_from(&r.aliases);
                        Ok(())
                    })
                });
                if result.is_ok() {
                    self.push_tables(actions);
                }
                answer(answers, reply, result);
            }
            Request::Promote(r, reply) => {
                answer(answers, reply, self.promote(r, actions));
            }
            Request::Control(command, r, reply) => {
                answer(answers, reply, self.control(command, &r, actions));
            }
            Request::AddWorker(address, reply) => {
                let result = check_address("control_address", &address).map(|()| {
                    if !self.state.workers.contains_key(&address) {
                        self.state.workers.insert(
                            address.clone(),
                            WorkerRecord {
                                address: address.clone(),
                                ..WorkerRecord::default()
                            },
                        );
                        self.watch_agent(&address);
                    }
                });
                answer(answers, reply, result);
            }
            Request::RemoveWorker(address, reply) => {
                let claimed = self.claims().contains_key(&address);
                let result = if claimed {
                    Err(Status::failed_precondition(format!(
                        "worker {address} hosts a replica; cordon it and wait for its replica to move first"
                    )))
                } else if self.state.workers.remove(&address).is_some() {
                    self.observed.remove(&address);
                    self.agents.remove(&address);
                    Ok(())
                } else {
                    Err(Status::not_found(format!("worker_id: no worker {address}")))
                };
                answer(answers, reply, result);
            }
            Request::Cordon(address, cordon, reason, reply) => {
                let result = match self.state.workers.get_mut(&address) {
                    Some(worker) => {
                        worker.cordoned = cordon;
                        worker.cordon_reason = if cordon { reason } else { String::new() };
                        Ok(())
                    }
                    None => Err(Status::not_found(format!("worker_id: no worker {address}"))),
                };
                self.refresh_workers(actions);
                answer(answers, reply, result);
            }
            Request::AddRouter(address, reply) => {
                let result = check_address("control_address", &address).map(|()| {
                    self.state
                        .routers
                        .entry(address.clone())
                        .or_insert_with(|| RouterRecord {
                            address: address.clone(),
                            acknowledged_version: 0,
                        });
                });
                if result.is_ok() {
                    self.push_tables(actions);
                }
                answer(answers, reply, result);
            }
            Request::RemoveRouter(address, reply) => {
                let result = match self.state.routers.remove(&address) {
                    Some(_) => {
                        self.routers.remove(&address);
                        Ok(())
                    }
                    None => Err(Status::not_found(format!(
                        "control_address: no router {address}"
                    ))),
                };
                answer(answers, reply, result);
            }
        }
    }

    fn with_endpoint(
        &mut self,
        name: &str,
        change: impl FnOnce(&mut Endpoint, u64) -> Result<(), Status>,
    ) -> Result<(), Status> {
        let now = now_ms();
        let endpoint = self
            .state
            .endpoints
            .get_mut(name)
            .ok_or_else(|| Status::not_found(format!("name: no endpoint `{name}`")))?;
        change(endpoint, now)?;
        endpoint.updated_at_ms = now;
        Ok(())
    }

    fn create_endpoint(
        &mut self,
        r: v1::CreateEndpointRequest,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<(), Status> {
        validate_names("name", std::slice::from_ref(&r.name))?;
        validate_names("aliases", &r.aliases)?;
        if self.state.endpoints.contains_key(&r.name) {
            return Err(Status::already_exists(format!(
                "name: endpoint `{}` exists",
                r.name
            )));
        }
        let taken: BTreeSet<&str> = self
            .state
            .endpoints
            .values()
            .flat_map(|e| {
                std::iter::once(e.name.as_str()).chain(e.aliases.iter().map(String::as_str))
            })
            .collect();
        if let Some(name) = std::iter::once(&r.name)
            .chain(&r.aliases)
            .find(|n| taken.contains(n.as_str()))
        {
            return Err(Status::already_exists(format!(
                "`{name}` already names another endpoint"
            )));
        }
        let now = now_ms();
        let mut endpoint = Endpoint::new(&r.name, now);
        endpoint.aliases.clone_from(&r.aliases);
        if let Some(scaling) = &r.scaling {
            endpoint.scaling = Scaling::from_proto(scaling, "scaling").map_err(invalid)?;
        }
        if let Some(update) = &r.promotion_settings {
            endpoint.settings = PromotionSettings::default()
                .updated(update, "promotion_settings")
                .map_err(invalid)?;
        }
        if let Some(selector) = &r.selector {
            endpoint.selector = Selector::from_proto(selector);
        }
        endpoint.record(now, "created", format!("endpoint `{}` created", r.name), "");
        self.state.endpoints.insert(r.name.clone(), endpoint);
        if let Some(template) = r.template {
            self.start_promotion(&r.name, template_target(template)?, None, actions)?;
        }
        Ok(())
    }

    fn delete_endpoint(
        &mut self,
        r: &v1::DeleteEndpointRequest,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<v1::DeleteEndpointResponse, Status> {
        let endpoint = self
            .state
            .endpoints
            .get(&r.name)
            .ok_or_else(|| Status::not_found(format!("name: no endpoint `{}`", r.name)))?;
        if endpoint.promotion.is_some() && !r.force {
            return Err(Status::failed_precondition(
                "a promotion is under way; cancel it first, or delete with force",
            ));
        }
        let workers: Vec<String> = current_rollout(endpoint)
            .map(|r| r.claimed().into_iter().collect())
            .unwrap_or_default();
        self.state.endpoints.remove(&r.name);
        // Out of every table first, then stopped (a stop drains).
        self.push_tables(actions);
        for worker in &workers {
            actions.push((
                r.name.clone(),
                Action::Stop {
                    worker: worker.clone(),
                },
            ));
        }
        Ok(v1::DeleteEndpointResponse {
            replicas_stopped: u32::try_from(workers.len()).unwrap_or(u32::MAX),
        })
    }

    fn promote(
        &mut self,
        r: v1::PromoteRequest,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<(String, String), Status> {
        let endpoint =
            self.state.endpoints.get(&r.endpoint).ok_or_else(|| {
                Status::not_found(format!("endpoint: no endpoint `{}`", r.endpoint))
            })?;
        if endpoint.promotion.is_some() {
            return Err(Status::failed_precondition(format!(
                "endpoint `{}` has a promotion under way; pause, cancel or force it first",
                r.endpoint
            )));
        }
        if current_rollout(endpoint).is_some_and(|r| !r.is_quiet()) {
            // A promotion that began now would not know the workers still
            // draining or starting, and could update the last serving
            // replica in place.
            return Err(Status::failed_precondition(format!(
                "endpoint `{}` is still retiring or starting replicas after its last promotion or scaling; try again in a few seconds",
                r.endpoint
            )));
        }
        let settings = match &r.settings {
            Some(update) => endpoint
                .settings
                .updated(update, "settings")
                .map_err(invalid)?,
            None => endpoint.settings,
        };
        let target = match r.target {
            Some(v1::promote_request::Target::Template(template)) => template_target(template)?,
            Some(v1::promote_request::Target::DeploymentId(id)) => {
                let deployment = self.state.deployments.get(&id).ok_or_else(|| {
                    Status::not_found(format!("deployment_id: no deployment `{id}`"))
                })?;
                if deployment.endpoint != r.endpoint {
                    return Err(Status::invalid_argument(format!(
                        "deployment_id: `{id}` belongs to endpoint `{}`",
                        deployment.endpoint
                    )));
                }
                if !matches!(deployment.state, DeploymentState::Kept) {
                    return Err(Status::failed_precondition(format!(
                        "deployment_id: `{id}` is {:?}; only a kept deployment can be promoted again",
                        deployment.state
                    )));
                }
                Target::Existing(id)
            }
            None => {
                return Err(Status::invalid_argument(
                    "target: a template or a deployment_id is required",
                ));
            }
        };
        self.start_promotion(&r.endpoint, target, Some(settings), actions)
    }

    /// Starts a promotion of `endpoint` to `target`; returns its id and the
    /// candidate's id.
    fn start_promotion(
        &mut self,
        name: &str,
        target: Target,
        settings: Option<PromotionSettings>,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<(String, String), Status> {
        let now = now_ms();
        let (deployment_id, rollback) = match target {
            Target::Template(template) => {
                let id = self.state.new_id("dep");
                self.state.deployments.insert(
                    id.clone(),
                    Deployment {
                        id: id.clone(),
                        endpoint: name.into(),
                        template: Deployment::encode(&template),
                        state: DeploymentState::Candidate,
                        created_at_ms: now,
                    },
                );
                (id, false)
            }
            Target::Existing(id) => {
                if let Some(d) = self.state.deployments.get_mut(&id) {
                    d.state = DeploymentState::Candidate;
                }
                (id, true)
            }
        };
        let promotion_id = self.state.new_id("promo");
        let claims = self.claims();
        let workers = self.rollout_workers(name, &claims);
        let Some(endpoint) = self.state.endpoints.get_mut(name) else {
            return Err(Status::not_found(format!("endpoint: no endpoint `{name}`")));
        };
        let from = endpoint.active.clone().unwrap_or_default();
        let settings = if from.is_empty() {
            // The first deployment has no traffic to protect: all at once.
            PromotionSettings {
                rolling_deploy: false,
                stabilization_time_seconds: 0,
                ..endpoint.settings
            }
        } else {
            settings.unwrap_or(endpoint.settings)
        };
        let routed = current_rollout(endpoint)
            .map(|r| r.routed.clone())
            .unwrap_or_default();
        let ready_old = u32::try_from(routed.values().filter(|d| **d == from).count()).unwrap_or(0);
        // N: the replicas serving now, at least the minimum.
        let target = ready_old.max(endpoint.scaling.min_replicas);
        let mut rollout = Rollout::new(&from, &deployment_id, settings, target, workers, routed);
        let first = rollout.start();
        endpoint.candidate = Some(deployment_id.clone());
        endpoint.promotion = Some(Promotion {
            id: promotion_id.clone(),
            rollout,
            started_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            forced: false,
            rollback,
        });
        let start = actions.len();
        actions.extend(first.into_iter().map(|a| (name.to_owned(), a)));
        self.settle(name, &actions[start..]);
        Ok((promotion_id, deployment_id))
    }

    fn control(
        &mut self,
        command: Command,
        r: &v1::PromotionControlRequest,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<(), Status> {
        let endpoint =
            self.state.endpoints.get_mut(&r.endpoint).ok_or_else(|| {
                Status::not_found(format!("endpoint: no endpoint `{}`", r.endpoint))
            })?;
        let promotion = endpoint.promotion.as_mut().ok_or_else(|| {
            Status::failed_precondition(format!(
                "endpoint `{}` has no promotion under way",
                r.endpoint
            ))
        })?;
        if !r.promotion_id.is_empty() && r.promotion_id != promotion.id {
            return Err(Status::failed_precondition(format!(
                "promotion_id: `{}` is not the promotion under way (`{}`)",
                r.promotion_id, promotion.id
            )));
        }
        if matches!(command, Command::ForceCancel | Command::ForceRollForward) {
            promotion.forced = true;
        }
        if !r.reason.is_empty() {
            let id = promotion.id.clone();
            endpoint.record(now_ms(), "operator", r.reason.clone(), &id);
        }
        self.feed(&r.endpoint.clone(), Event::Command(command), actions);
        Ok(())
    }

    // === events ===

    fn internal(&mut self, event: Internal, actions: &mut Vec<(String, Action)>) {
        match event {
            Internal::Status { address, status } => {
                let observed = self.observed.entry(address.clone()).or_default();
                match status {
                    Some(status) => {
                        // Kept in the store: a restarted coordinator builds
                        // the same table before the agent reports again.
                        if let Some(record) = self.state.workers.get_mut(&address)
                            && record.gate_address != status.gate_address
                        {
                            record.gate_address.clone_from(&status.gate_address);
                        }
                        observed.status = Some(*status);
                        observed.reachable = true;
                        observed.last_seen = Some(SystemTime::now());
                    }
                    None => observed.reachable = false,
                }
                self.refresh_workers(actions);
            }
            Internal::Drained { endpoint, worker } => {
                self.feed(&endpoint, Event::Drained { worker }, actions);
            }
            Internal::Stopped { endpoint, worker } => {
                self.feed(&endpoint, Event::Stopped { worker }, actions);
            }
            Internal::ApplyFailed {
                endpoint,
                worker,
                deployment,
                error,
            } => {
                if let Some(e) = self.state.endpoints.get_mut(&endpoint) {
                    e.record(
                        now_ms(),
                        "apply-failed",
                        format!("{worker} could not start {deployment}: {error}"),
                        "",
                    );
                }
                let failed = rollout::Worker {
                    deployment: Some(deployment),
                    engine: Engine::Failed,
                    eligible: false,
                    evict: false,
                };
                self.feed(
                    &endpoint,
                    Event::Worker {
                        id: worker,
                        worker: failed,
                    },
                    actions,
                );
            }
            Internal::Stats {
                endpoint,
                promotion_id,
                by_deployment,
            } => {
                let Some(e) = self.state.endpoints.get(&endpoint) else {
                    return;
                };
                let Some(promotion) = e.promotion.as_ref().filter(|p| p.id == promotion_id) else {
                    return;
                };
                let r = &promotion.rollout;
                let rate = |(total, failed): (u64, u64)| {
                    if total == 0 {
                        0.0
                    } else {
                        failed as f64 / total as f64
                    }
                };
                let new = by_deployment.get(&r.to).copied().unwrap_or_default();
                let old = by_deployment.get(&r.from).copied().unwrap_or_default();
                if new.0 >= GATE_MIN_REQUESTS && rate(new) > rate(old) + GATE_MARGIN {
                    let reason = format!(
                        "{} failed {} of {} requests ({:.0} %), {} {:.0} %",
                        r.to,
                        new.1,
                        new.0,
                        rate(new) * 100.0,
                        if r.from.is_empty() {
                            "no old deployment"
                        } else {
                            r.from.as_str()
                        },
                        rate(old) * 100.0
                    );
                    self.feed(
                        &endpoint,
                        Event::Health(rollout::Verdict::Fail(reason)),
                        actions,
                    );
                }
            }
            Internal::RouterBehind { address } => {
                tracing::info!(
                    router = address,
                    "a router serves an older table; pushing the current one"
                );
                self.push_table_to(&address, self.state.table_version);
            }
            Internal::RouterAck { address, version } => {
                let router = self.routers.entry(address.clone()).or_default();
                match version {
                    Some(version) => {
                        router.reachable = true;
                        router.last_seen = Some(SystemTime::now());
                        if let Some(record) = self.state.routers.get_mut(&address) {
                            record.acknowledged_version = record.acknowledged_version.max(version);
                        }
                    }
                    None => router.reachable = false,
                }
                self.settle_acks(actions);
            }
        }
    }

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
        self.autoscale(actions);
        if self.last_gate.elapsed() >= GATE_EVERY {
            self.last_gate = Instant::now();
            for name in names {
                self.read_stats(&name);
            }
            self.check_routers();
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
        let produced = rollout.handle(event);
        let start = actions.len();
        actions.extend(produced.into_iter().map(|a| (name.to_owned(), a)));
        self.settle(name, &actions[start..]);
    }

    /// After a rollout moved (`actions` are the ones it just produced):
    /// records, ends promotions, moves deployments.
    fn settle(&mut self, name: &str, actions: &[(String, Action)]) {
        let now = now_ms();
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
            endpoint.past_promotions.push_back(previous);
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

    /// Workers changed (a status, a cordon): every rollout hears how each
    /// worker looks to its endpoint.
    fn refresh_workers(&mut self, actions: &mut Vec<(String, Action)>) {
        // A worker whose GPU is unhealthy is cordoned (its replica then
        // moves: add first, then drain); an operator uncordons it.
        for (address, record) in &mut self.state.workers {
            let sick = self
                .observed
                .get(address)
                .and_then(|o| o.status.as_ref())
                .filter(|s| s.gpu_health() == v1::GpuHealth::Unhealthy);
            if let Some(status) = sick
                && !record.cordoned
            {
                let reasons: Vec<String> = status
                    .gpus
                    .iter()
                    .flat_map(|g| g.health_reasons.iter().cloned())
                    .collect();
                record.cordoned = true;
                record.cordon_reason = format!("GPU unhealthy: {}", reasons.join("; "));
                tracing::warn!(worker = address, reason = record.cordon_reason, "cordoned");
            }
        }
        let claims = self.claims();
        let names: Vec<String> = self.state.endpoints.keys().cloned().collect();
        for name in names {
            let workers = self.rollout_workers(&name, &claims);
            let Some(endpoint) = self.state.endpoints.get(&name) else {
                continue;
            };
            let Some(rollout) = current_rollout(endpoint) else {
                continue;
            };
            // A worker that has not reported since this coordinator started
            // is unknown, not idle: the rollout keeps what it knew.
            let changed: Vec<(String, rollout::Worker)> = workers
                .into_iter()
                .filter(|(id, _)| self.observed.get(id).is_some_and(|o| o.status.is_some()))
                .filter(|(id, w)| rollout.workers.get(id) != Some(w))
                .collect();
            for (id, worker) in changed {
                self.feed(&name, Event::Worker { id, worker }, actions);
            }
            // A fatal GPU condition on a candidate replica fails the gate.
            let candidate = self
                .state
                .endpoints
                .get(&name)
                .and_then(|e| e.promotion.as_ref())
                .filter(|p| !p.rollout.status.is_terminal())
                .map(|p| (p.rollout.to.clone(), p.rollout.claimed()));
            if let Some((to, claimed)) = candidate {
                let sick = claimed.into_iter().find(|address| {
                    self.observed
                        .get(address)
                        .and_then(|o| o.status.as_ref())
                        .is_some_and(|s| {
                            s.gpu_health() == v1::GpuHealth::Unhealthy
                                && s.engine.as_ref().is_some_and(|e| e.deployment_id == to)
                        })
                });
                if let Some(address) = sick {
                    let reason = format!("a GPU of {address}, which runs {to}, is unhealthy");
                    self.feed(
                        &name,
                        Event::Health(rollout::Verdict::Fail(reason)),
                        actions,
                    );
                }
            }
        }
    }

    /// Which endpoint uses each worker.
    fn claims(&self) -> BTreeMap<String, String> {
        let mut claims = BTreeMap::new();
        for (name, endpoint) in &self.state.endpoints {
            if let Some(rollout) = current_rollout(endpoint) {
                for worker in rollout.claimed() {
                    claims.insert(worker, name.clone());
                }
            }
        }
        claims
    }

    /// Every known worker as endpoint `name` sees it.
    fn rollout_workers(
        &self,
        name: &str,
        claims: &BTreeMap<String, String>,
    ) -> BTreeMap<String, rollout::Worker> {
        let selector = self
            .state
            .endpoints
            .get(name)
            .map(|e| e.selector.clone())
            .unwrap_or_default();
        self.state
            .workers
            .iter()
            .map(|(address, record)| {
                let observed = self.observed.get(address);
                let status = observed.and_then(|o| o.status.as_ref());
                let engine = status.and_then(|s| s.engine.as_ref());
                let state = engine.map_or(v1::EngineState::Unspecified, |e| e.state());
                let deployment = engine
                    .filter(|_| {
                        !matches!(
                            state,
                            v1::EngineState::Stopped | v1::EngineState::Unspecified
                        )
                    })
                    .map(|e| e.deployment_id.clone())
                    .filter(|d| !d.is_empty());
                let engine = match state {
                    v1::EngineState::Starting => Engine::Starting,
                    v1::EngineState::Ready => Engine::Ready,
                    v1::EngineState::Draining | v1::EngineState::Stopping => Engine::Draining,
                    v1::EngineState::Failed => Engine::Failed,
                    v1::EngineState::Stopped | v1::EngineState::Unspecified => Engine::Idle,
                };
                let mine = claims.get(address).is_none_or(|owner| owner == name);
                let healthy = status.is_none_or(|s| s.gpu_health() != v1::GpuHealth::Unhealthy);
                let eligible = observed.is_some_and(|o| o.reachable)
                    && !record.cordoned
                    && mine
                    && healthy
                    && status.is_some_and(|s| selector.matches(s));
                (
                    address.clone(),
                    rollout::Worker {
                        deployment,
                        engine,
                        eligible,
                        // Its replica moves (add first, then drain) when the
                        // worker is cordoned, its GPU is unhealthy, or it no
                        // longer matches the endpoint's selector.
                        evict: record.cordoned
                            || !healthy
                            || status.is_some_and(|s| !selector.matches(s)),
                    },
                )
            })
            .collect()
    }

    // === actions ===

    fn perform(&mut self, endpoint: &str, action: Action) {
        match action {
            Action::Record { .. } => {}
            Action::PushTable { seq, .. } => {
                // Routes are read back from every rollout: one table for all.
                // Versions carry the epoch in their high bits, so a table
                // pushed after a restart is newer than any pushed before,
                // even one the store did not record before the crash.
                self.state.table_version =
                    (self.state.table_version + 1).max(self.state.epoch << 32);
                let version = self.state.table_version;
                self.pending.push((version, endpoint.to_owned(), seq));
                self.pushed_at.insert(version, Instant::now());
                self.push_table_now(version);
            }
            Action::Apply { worker, deployment } => self.apply(endpoint, worker, deployment),
            Action::Drain { worker } => {
                let deadline = self.drain_timeout(endpoint);
                let client = self.agent(&worker);
                let internal = self.internal.clone();
                let endpoint = endpoint.to_owned();
                let epoch = self.state.epoch;
                tokio::spawn(async move {
                    let request = v1::DrainRequest {
                        coordinator_epoch: epoch,
                        deadline: deadline.try_into().ok(),
                    };
                    if let Err(e) = retry(|| {
                        let mut client = client.clone();
                        async move { client.drain(request).await.map(drop) }
                    })
                    .await
                    {
                        tracing::warn!(worker, error = %e, "drain failed; treating the worker as drained");
                    }
                    let _ = internal.send(Internal::Drained { endpoint, worker });
                });
            }
            Action::Stop { worker } => {
                let grace = self.drain_timeout(endpoint);
                let client = self.agent(&worker);
                let internal = self.internal.clone();
                let endpoint = endpoint.to_owned();
                let epoch = self.state.epoch;
                tokio::spawn(async move {
                    let request = v1::StopRequest {
                        coordinator_epoch: epoch,
                        grace: grace.try_into().ok(),
                    };
                    if let Err(e) = retry(|| {
                        let mut client = client.clone();
                        async move { client.stop(request).await.map(drop) }
                    })
                    .await
                    {
                        tracing::warn!(worker, error = %e, "stop failed");
                    }
                    let _ = internal.send(Internal::Stopped { endpoint, worker });
                });
            }
        }
    }

    fn drain_timeout(&self, endpoint: &str) -> Duration {
        let seconds = self.state.endpoints.get(endpoint).map_or(
            PromotionSettings::default().drain_timeout_seconds,
            |e| {
                e.promotion
                    .as_ref()
                    .map_or(e.settings.drain_timeout_seconds, |p| {
                        p.rollout.settings.drain_timeout_seconds
                    })
            },
        );
        Duration::from_secs(u64::from(seconds))
    }

    fn apply(&mut self, endpoint: &str, worker: String, deployment: String) {
        let Some(record) = self.state.deployments.get(&deployment) else {
            tracing::error!(deployment, "no such deployment to apply");
            return;
        };
        let Some(e) = self.state.endpoints.get(endpoint) else {
            return;
        };
        let ready_timeout = e
            .promotion
            .as_ref()
            .map_or(e.settings.ready_timeout_seconds, |p| {
                p.rollout.settings.ready_timeout_seconds
            });
        let spec = match resolve_template(record.template()) {
            Ok(template) => v1::EngineSpec {
                deployment_id: deployment.clone(),
                endpoint: endpoint.to_owned(),
                aliases: e.aliases.clone(),
                template: Some(template),
                ready_timeout: Duration::from_secs(u64::from(ready_timeout))
                    .try_into()
                    .ok(),
            },
            Err(error) => {
                let _ = self.internal.send(Internal::ApplyFailed {
                    endpoint: endpoint.to_owned(),
                    worker,
                    deployment,
                    error,
                });
                return;
            }
        };
        let client = self.agent(&worker);
        let internal = self.internal.clone();
        let endpoint = endpoint.to_owned();
        let epoch = self.state.epoch;
        let drain = self.drain_timeout(&endpoint);
        tokio::spawn(async move {
            let request = v1::ApplyRequest {
                coordinator_epoch: epoch,
                spec: Some(spec),
                drain_timeout: drain.try_into().ok(),
            };
            let result = retry(|| {
                let mut client = client.clone();
                let request = request.clone();
                async move { client.apply(request).await.map(drop) }
            })
            .await;
            if let Err(e) = result {
                let _ = internal.send(Internal::ApplyFailed {
                    endpoint,
                    worker,
                    deployment,
                    error: e.message().to_owned(),
                });
            }
        });
    }

    fn agent(&mut self, address: &str) -> AgentClient<Channel> {
        self.agents
            .entry(address.to_owned())
            .or_insert_with(|| AgentClient::new(lazy_channel(address)))
            .clone()
    }

    /// Watches an agent's status for as long as it is known.
    fn watch_agent(&mut self, address: &str) {
        let client = self.agent(address);
        let internal = self.internal.clone();
        let address = address.to_owned();
        let shutdown = self.shutdown.clone();
        self.shutdown.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let mut client = client.clone();
                let stream = client
                    .watch_status(v1::WatchStatusRequest {
                        heartbeat_interval: Duration::from_secs(2).try_into().ok(),
                    })
                    .await;
                match stream {
                    Ok(stream) => {
                        backoff = Duration::from_millis(100);
                        let mut stream = stream.into_inner();
                        loop {
                            let message = tokio::select! {
                                () = shutdown.triggered() => return,
                                m = stream.message() => m,
                            };
                            match message {
                                Ok(Some(status)) => {
                                    if internal
                                        .send(Internal::Status {
                                            address: address.clone(),
                                            status: Some(Box::new(status)),
                                        })
                                        .is_err()
                                    {
                                        return;
                                    }
                                }
                                Ok(None) | Err(_) => break,
                            }
                        }
                    }
                    Err(e) => tracing::debug!(address, error = %e, "agent unreachable"),
                }
                if internal
                    .send(Internal::Status {
                        address: address.clone(),
                        status: None,
                    })
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    () = shutdown.triggered() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Outside promotions: replicas = clamp(ceil(in-flight / target per
    /// replica), min, max), down only after the scale-down delay (at once
    /// when `max_replicas` is 0: that drains and stops everything).
    fn autoscale(&mut self, actions: &mut Vec<(String, Action)>) {
        let names: Vec<String> = self
            .state
            .endpoints
            .iter()
            .filter(|(_, e)| e.promotion.is_some() || e.last_promotion.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(endpoint) = self.state.endpoints.get(&name) else {
                continue;
            };
            let Some(rollout) = current_rollout(endpoint) else {
                continue;
            };
            let in_flight: u64 = rollout
                .routed
                .keys()
                .filter_map(|w| self.observed.get(w))
                .filter_map(|o| o.status.as_ref())
                .filter_map(|s| s.in_flight.as_ref())
                .map(|f| u64::from(f.gate))
                .sum();
            let desired = endpoint.scaling.desired(in_flight);
            let current = rollout.target;
            if endpoint.promotion.is_some() {
                // During a promotion: only up.
                if desired > current
                    && let Some(promotion) = self
                        .state
                        .endpoints
                        .get_mut(&name)
                        .and_then(|e| e.promotion.as_mut())
                {
                    let produced = promotion.rollout.raise_target(desired);
                    let start = actions.len();
                    actions.extend(produced.into_iter().map(|a| (name.clone(), a)));
                    self.settle(&name, &actions[start..]);
                }
                continue;
            }
            let delay = Duration::from_secs(u64::from(endpoint.scaling.scale_down_delay_seconds));
            let now = Instant::now();
            let go = if desired > current || endpoint.scaling.max_replicas == 0 && desired < current
            {
                true
            } else if desired < current {
                let since = *self.low_since.entry(name.clone()).or_insert(now);
                now.duration_since(since) >= delay
            } else {
                self.low_since.remove(&name);
                false
            };
            if !go || desired == current {
                continue;
            }
            self.low_since.remove(&name);
            let Some(endpoint) = self.state.endpoints.get_mut(&name) else {
                continue;
            };
            let Some(promotion) = endpoint.last_promotion.as_mut() else {
                continue;
            };
            let produced = promotion.rollout.rescale(desired);
            let start = actions.len();
            actions.extend(produced.into_iter().map(|a| (name.clone(), a)));
            self.settle(&name, &actions[start..]);
        }
    }

    /// Reads every router's stats for a promotion's endpoint since it
    /// started, for the health gate.
    fn read_stats(&self, name: &str) {
        let Some(promotion) = self
            .state
            .endpoints
            .get(name)
            .and_then(|e| e.promotion.as_ref())
            .filter(|p| !p.rollout.status.is_terminal() && p.rollout.candidate_weight() > 0)
        else {
            return;
        };
        let routers: Vec<String> = self.state.routers.keys().cloned().collect();
        let internal = self.internal.clone();
        let endpoint = name.to_owned();
        let promotion_id = promotion.id.clone();
        let since = crate::state::timestamp(promotion.started_at_ms);
        tokio::spawn(async move {
            let mut by_deployment: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for address in routers {
                let mut client = RouterControlClient::new(lazy_channel(&address));
                let request = v1::GetStatsRequest {
                    since: Some(since),
                    endpoint: endpoint.clone(),
                };
                let Ok(Ok(answer)) =
                    tokio::time::timeout(Duration::from_secs(2), client.get_stats(request)).await
                else {
                    continue;
                };
                for stats in answer.into_inner().endpoints {
                    for deployment in stats.deployments {
                        let counts = deployment.requests.unwrap_or_default();
                        let entry = by_deployment.entry(deployment.deployment_id).or_default();
                        entry.0 += counts.total;
                        entry.1 += counts.server_errors + counts.aborted_streams;
                    }
                }
            }
            let _ = internal.send(Internal::Stats {
                endpoint,
                promotion_id,
                by_deployment,
            });
        });
    }

    /// The whole routing table now.
    fn table(&self, version: u64) -> v1::RoutingTable {
        let gate = |worker: &str| {
            self.observed
                .get(worker)
                .and_then(|o| o.status.as_ref())
                .map(|s| s.gate_address.clone())
                .filter(|g| !g.is_empty())
                .or_else(|| {
                    self.state
                        .workers
                        .get(worker)
                        .map(|r| r.gate_address.clone())
                        .filter(|g| !g.is_empty())
                })
        };
        v1::RoutingTable {
            version,
            endpoints: self
                .state
                .endpoints
                .values()
                .map(|endpoint| v1::EndpointRoute {
                    name: endpoint.name.clone(),
                    aliases: endpoint.aliases.clone(),
                    deployments: current_rollout(endpoint)
                        .map(Rollout::routes)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|route| v1::DeploymentRoute {
                            id: route.deployment,
                            weight: route.weight,
                            workers: route
                                .workers
                                .iter()
                                .filter_map(|w| {
                                    gate(w).map(|address| v1::WorkerRoute {
                                        address,
                                        worker_id: w.clone(),
                                    })
                                })
                                .collect(),
                        })
                        .filter(|d| !d.workers.is_empty())
                        .collect(),
                })
                .collect(),
        }
    }

    /// Pushes the table as `version` to every router.
    fn push_table_now(&mut self, version: u64) {
        let routers: Vec<String> = self.state.routers.keys().cloned().collect();
        for address in routers {
            self.push_table_to(&address, version);
        }
    }

    /// Asks every router which table it serves; one behind the last pushed
    /// (restarted with its configuration's table) gets the current one.
    fn check_routers(&self) {
        let version = self.state.table_version;
        if version == 0 {
            return;
        }
        for address in self.state.routers.keys() {
            let internal = self.internal.clone();
            let address = address.clone();
            let mut client = RouterControlClient::new(lazy_channel(&address));
            tokio::spawn(async move {
                let answer = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.get_table(v1::GetTableRequest {}),
                )
                .await;
                if let Ok(Ok(answer)) = answer
                    && answer
                        .into_inner()
                        .table
                        .is_none_or(|t| t.version < version)
                {
                    let _ = internal.send(Internal::RouterBehind { address });
                }
            });
        }
    }

    /// Pushes the table as `version` to one router, retrying while it is
    /// unreachable, for a bounded time.
    fn push_table_to(&self, address: &str, version: u64) {
        let table = self.table(version);
        let epoch = self.state.epoch;
        let internal = self.internal.clone();
        let address = address.to_owned();
        let mut client = RouterControlClient::new(lazy_channel(&address));
        let bound = self.options.router_ack_bound;
        tokio::spawn(async move {
            let deadline = Instant::now() + bound * 6;
            let mut backoff = Duration::from_millis(50);
            loop {
                let request = v1::ApplyTableRequest {
                    coordinator_epoch: epoch,
                    table: Some(table.clone()),
                };
                match client.apply_table(request).await {
                    Ok(answer) => {
                        let _ = internal.send(Internal::RouterAck {
                            address,
                            version: Some(answer.into_inner().version_in_force),
                        });
                        return;
                    }
                    Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                        // A newer table is in force there already.
                        let _ = internal.send(Internal::RouterAck {
                            address,
                            version: Some(version),
                        });
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(address, error = %e, "router unreachable");
                        let _ = internal.send(Internal::RouterAck {
                            address: address.clone(),
                            version: None,
                        });
                        if Instant::now() >= deadline {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    /// A table change not tied to a rollout (aliases, a router added, an
    /// endpoint deleted): pushed after the change is stored, like the
    /// rollouts' own.
    fn push_tables(&mut self, actions: &mut Vec<(String, Action)>) {
        actions.push((
            String::new(),
            Action::PushTable {
                seq: 0,
                routes: Vec::new(),
            },
        ));
    }

    /// Tells rollouts which of their tables every router has acknowledged
    /// (or the bound on an unreachable router passed).
    fn settle_acks(&mut self, actions: &mut Vec<(String, Action)>) {
        let acked = self
            .state
            .routers
            .values()
            .map(|r| r.acknowledged_version)
            .min()
            .unwrap_or(u64::MAX);
        let mut done = Vec::new();
        let mut late = Vec::new();
        self.pending.retain(|(version, endpoint, seq)| {
            if *version <= acked {
                done.push((endpoint.clone(), *seq));
                false
            } else if self
                .pushed_at
                .get(version)
                .is_some_and(|at| at.elapsed() >= self.options.router_ack_bound)
            {
                late.push((endpoint.clone(), *seq, *version));
                false
            } else {
                true
            }
        });
        self.pushed_at.retain(|version, _| *version > acked);
        for (endpoint, seq, version) in late {
            let missing: Vec<String> = self
                .state
                .routers
                .values()
                .filter(|r| r.acknowledged_version < version)
                .map(|r| r.address.clone())
                .collect();
            if let Some(e) = self.state.endpoints.get_mut(&endpoint) {
                e.record(
                    now_ms(),
                    "router-late",
                    format!(
                        "router(s) {} did not acknowledge table version {version} within {:?}; going ahead: their draining gates answer with a retryable 503",
                        missing.join(", "),
                        self.options.router_ack_bound
                    ),
                    "",
                );
            }
            done.push((endpoint, seq));
        }
        for (endpoint, seq) in done {
            self.feed(&endpoint, Event::TableAcked { seq }, actions);
        }
    }

    /// After a restart: re-send what was under way, and the table.
    fn resume(&mut self) {
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
            let resumed = rollout.resume();
            actions.extend(resumed.into_iter().map(|a| (name.clone(), a)));
        }
        if !actions.is_empty() {
            tracing::info!(
                actions = actions.len(),
                "resuming the actions under way before the restart"
            );
        }
        self.commit(actions);
    }
}

/// Retries a call to an agent a few times on transport errors.
async fn retry<F, Fut>(mut call: F) -> Result<(), Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut last = None;
    for _ in 0..8 {
        match call().await {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => {
                last = Some(e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(3));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Status::unavailable("unreachable")))
}

fn lazy_channel(address: &str) -> Channel {
    match Dial::from_shared(format!("http://{address}")) {
        Ok(dial) => dial
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy(),
        // Addresses are checked when added; this is a bug guard.
        Err(_) => Dial::from_static("http://127.0.0.1:1").connect_lazy(),
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

enum Target {
    Template(v1::Template),
    Existing(String),
}

fn template_target(template: v1::Template) -> Result<Target, Status> {
    if template.model.trim().is_empty() {
        return Err(Status::invalid_argument(
            "template.model: required (MODEL_NAME)",
        ));
    }
    if let Err(e) = shell_split(&template.vllm_args) {
        return Err(Status::invalid_argument(format!(
            "template.vllm_args: does not split into words as a shell would ({e})"
        )));
    }
    for (i, var) in template.env.iter().enumerate() {
        if var.name.is_empty() || var.name.contains('=') {
            return Err(Status::invalid_argument(format!(
                "template.env[{i}].name: must be a non-empty name without `=`"
            )));
        }
        if var.source.is_none() {
            return Err(Status::invalid_argument(format!(
                "template.env[{i}] ({}): needs a value or from_coordinator_env",
                var.name
            )));
        }
    }
    Ok(Target::Template(template))
}

/// Splits `VLLM_ARGS` as the agent does (a POSIX shell's words).
fn shell_split(text: &str) -> Result<(), String> {
    shell_words::split(text)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Resolves `from_coordinator_env` variables from this process's
/// environment; the values never appear in an error.
fn resolve_template(mut template: v1::Template) -> Result<v1::Template, String> {
    for var in &mut template.env {
        if let Some(v1::env_var::Source::FromCoordinatorEnv(name)) = &var.source {
            let value = std::env::var(name).map_err(|_| {
                format!(
                    "environment variable {name} (for {}) is not set on the coordinator",
                    var.name
                )
            })?;
            var.source = Some(v1::env_var::Source::Value(value));
        }
    }
    Ok(template)
}

fn validate_names(field: &str, names: &[String]) -> Result<(), Status> {
    for name in names {
        let ok = !name.is_empty()
            && name.len() <= 256
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c));
        if !ok {
            return Err(Status::invalid_argument(format!(
                "{field}: `{name}` must be 1 to 256 characters of letters, digits, `-`, `_`, `.`, `/`, `:`"
            )));
        }
    }
    Ok(())
}

fn check_address(field: &str, address: &str) -> Result<(), Status> {
    let ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{field}: `{address}` must be host:port"
        )))
    }
}

fn invalid(errors: Vec<crossfade_common::FieldError>) -> Status {
    Status::invalid_argument(
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn vllm_args_are_checked_as_the_agent_splits_them() {
        assert!(shell_split("--max-model-len 4096 --chat-template '{{ x }}'").is_ok());
        assert!(shell_split(r#"--x "a \" b""#).is_ok());
        assert!(shell_split("--x 'a").is_err());
    }

    #[test]
    fn names_and_addresses_are_checked_by_field() {
        assert!(validate_names("name", &["chat".into(), "Qwen/Qwen3-8B".into()]).is_ok());
        let bad = validate_names("aliases", &["a b".into()]).unwrap_err();
        assert!(bad.message().starts_with("aliases: `a b` must be"));
        assert!(check_address("control_address", "10.0.0.1:7002").is_ok());
        assert!(check_address("control_address", "host").is_err());
        assert!(check_address("control_address", "host:0").is_err());
    }

    #[test]
    fn a_missing_coordinator_variable_is_named_without_a_value() {
        let template = v1::Template {
            env: vec![v1::EnvVar {
                name: "HF_TOKEN".into(),
                source: Some(v1::env_var::Source::FromCoordinatorEnv(
                    "CROSSFADE_TEST_UNSET_VARIABLE_42".into(),
                )),
                secret: true,
                redacted: false,
            }],
            ..Default::default()
        };
        assert_eq!(
            resolve_template(template).unwrap_err(),
            "environment variable CROSSFADE_TEST_UNSET_VARIABLE_42 (for HF_TOKEN) is not set on the coordinator"
        );
    }
}
