//! Supervising the inference engine: one actor owns the engine and its
//! state; the gRPC service and standalone mode send it commands through a
//! [`Supervisor`] handle and read what it publishes.
//!
//! ```text
//!            Apply                      ready checks pass
//! STOPPED ──────────► STARTING ───────────────────────► READY ◄──┐
//!    ▲                 │  ▲  (crash: back-off, restart)  │       │ Undrain
//!    │ Stop            │  └──────────────────────────────┤       │
//!    │                 │ crashes > max_restarts,         │ Drain │
//!    │                 ▼ ready timeout, launch error     ▼       │
//!    └─ STOPPING ◄── FAILED                           DRAINING ──┘
//! ```
//!
//! `Apply` of another deployment drains the running one, stops it and
//! starts the new one; `Apply` of the running deployment changes nothing.
//! The engine outlives the agent: a restarted agent reads the state file,
//! checks the process is the one it started, and adopts it.

pub mod command;
pub mod probe;
pub mod runtime;
pub mod state_file;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossfade_common::Shutdown;
use crossfade_proto::v1::{self, EngineState, StartingPhase};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use self::command::{Launch, engine_args};
use self::probe::{Check, EngineClient, EngineLoad};
use self::runtime::{Engine, Exit, LaunchPlan, Runtime, log_tail};
use self::state_file::{Record, StateFile};
use crate::config;
use crate::gate::Gate;
use crate::metrics as m;

/// How long the engine may take to answer one readiness or metrics request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the actor looks for an exited engine.
const EXIT_POLL: Duration = Duration::from_millis(100);
/// After a drain's deadline cuts SSE streams, how long their final error
/// events get to leave before the engine is stopped.
const CUT_FLUSH: Duration = Duration::from_secs(2);

/// What the supervisor publishes about the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineView {
    /// Its state.
    pub state: EngineState,
    /// The deployment it runs (or last ran).
    pub deployment_id: String,
    /// While starting: how far it got.
    pub phase: StartingPhase,
    /// While starting: what the last check saw.
    pub phase_detail: String,
    /// When the state last changed.
    pub state_since: SystemTime,
    /// When the current start began (launch or restart).
    pub starting_since: Option<Instant>,
    /// Why it is `FAILED`.
    pub failure_reason: String,
    /// Its last exit code.
    pub exit_code: Option<i32>,
    /// Restarts after crashes, in all.
    pub restart_count: u32,
    /// Its process id (0: none).
    pub pid: u32,
    /// Its loopback port (0: none).
    pub port: u16,
    /// The end of its log, when it failed.
    pub log_tail: Vec<String>,
    /// Adopted from an earlier agent rather than launched.
    pub adopted: bool,
    /// The last error, whatever the state.
    pub last_error: String,
}

impl Default for EngineView {
    fn default() -> Self {
        Self {
            state: EngineState::Stopped,
            deployment_id: String::new(),
            phase: StartingPhase::Unspecified,
            phase_detail: String::new(),
            state_since: SystemTime::now(),
            starting_since: None,
            failure_reason: String::new(),
            exit_code: None,
            restart_count: 0,
            pid: 0,
            port: 0,
            log_tail: Vec::new(),
            adopted: false,
            last_error: String::new(),
        }
    }
}

impl EngineView {
    /// Its wire form.
    pub fn to_proto(&self) -> v1::EngineStatus {
        let starting = self.state == EngineState::Starting;
        v1::EngineStatus {
            state: self.state as i32,
            deployment_id: self.deployment_id.clone(),
            phase: if starting { self.phase as i32 } else { 0 },
            state_since: Some(self.state_since.into()),
            starting_elapsed: self
                .starting_since
                .filter(|_| starting)
                .and_then(|since| since.elapsed().try_into().ok()),
            failure_reason: self.failure_reason.clone(),
            exit_code: self.exit_code,
            restart_count: self.restart_count,
            pid: self.pid,
            container_id: String::new(),
            engine_port: u32::from(self.port),
            log_tail: self.log_tail.clone(),
            adopted: self.adopted,
        }
    }
}

/// The engine's load as last read from its `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scrape {
    /// Running and waiting requests.
    pub load: EngineLoad,
    /// When it was read.
    pub at: SystemTime,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// The request is wrong; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The engine is not in a state that allows it.
    #[error("{0}")]
    Precondition(String),
    /// The supervisor has stopped (the agent is shutting down).
    #[error("the agent is shutting down")]
    Gone,
}

/// What `Apply` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The deployment was already running (or starting): nothing changed.
    pub already_applied: bool,
}

/// What a drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Nothing was left in flight.
    pub drained: bool,
    /// Requests still in flight at the deadline.
    pub still_in_flight: u32,
    /// How long it waited.
    pub waited: Duration,
}

/// What `Stop` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Requests still in flight when the drain's grace ended.
    pub still_in_flight: u32,
    /// The engine's exit code, when the agent saw one.
    pub exit_code: Option<i32>,
}

enum Command {
    Apply {
        spec: Box<v1::EngineSpec>,
        drain_timeout: Duration,
        reply: oneshot::Sender<Result<Applied, SupervisorError>>,
    },
    Drain {
        deadline: Duration,
        reply: oneshot::Sender<Drained>,
    },
    Undrain {
        reply: oneshot::Sender<Result<(), SupervisorError>>,
    },
    Stop {
        grace: Duration,
        reply: oneshot::Sender<Stopped>,
    },
}

/// A handle on the supervisor: cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    commands: mpsc::Sender<Command>,
    view: watch::Receiver<EngineView>,
    scrape: watch::Receiver<Option<Scrape>>,
    gate: Arc<Gate>,
}

impl Supervisor {
    /// Starts the supervisor: adopts the engine of the state file if it
    /// still runs, then serves commands until `shutdown`. The engine is
    /// left running when the agent stops.
    pub fn start(
        settings: config::Engine,
        runtime: Arc<dyn Runtime>,
        gate: Arc<Gate>,
        shutdown: &Shutdown,
    ) -> Self {
        let (commands, receiver) = mpsc::channel(16);
        let (view, view_rx) = watch::channel(EngineView::default());
        let (scrape, scrape_rx) = watch::channel(None);
        let client = EngineClient::new(PROBE_TIMEOUT);
        shutdown.spawn(scrape_engine(
            client.clone(),
            view_rx.clone(),
            scrape,
            settings.metrics_interval,
            shutdown.clone(),
        ));
        let (events, events_rx) = mpsc::unbounded_channel();
        let mut actor = Actor {
            state_file: StateFile::new(&settings.state_dir),
            log_path: settings.state_dir.join("engine.log"),
            settings,
            runtime,
            gate: Arc::clone(&gate),
            view,
            client,
            current: None,
            events,
            generation: 0,
            undrained: watch::Sender::new(0),
        };
        actor.adopt();
        shutdown.spawn(actor.run(receiver, events_rx, shutdown.clone()));
        Self {
            commands,
            view: view_rx,
            scrape: scrape_rx,
            gate,
        }
    }

    /// The engine now.
    pub fn view(&self) -> EngineView {
        self.view.borrow().clone()
    }

    /// Watches the engine.
    pub fn subscribe(&self) -> watch::Receiver<EngineView> {
        self.view.clone()
    }

    /// The engine's load as last scraped.
    pub fn scrape(&self) -> watch::Receiver<Option<Scrape>> {
        self.scrape.clone()
    }

    /// The gate in front of the engine.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Runs `spec`: drains and stops another deployment first (waiting up to
    /// `drain_timeout` for its requests), then launches. Returns once the
    /// engine is launched; readiness follows in the status.
    pub async fn apply(
        &self,
        spec: v1::EngineSpec,
        drain_timeout: Duration,
    ) -> Result<Applied, SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Apply {
            spec: Box::new(spec),
            drain_timeout,
            reply,
        })
        .await?;
        answer.await.map_err(|_| SupervisorError::Gone)?
    }

    /// Refuses new requests and waits up to `deadline` for those in flight;
    /// at the deadline, open SSE streams end with an error event.
    pub async fn drain(&self, deadline: Duration) -> Result<Drained, SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Drain { deadline, reply }).await?;
        answer.await.map_err(|_| SupervisorError::Gone)
    }

    /// Returns a draining engine to service.
    pub async fn undrain(&self) -> Result<(), SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Undrain { reply }).await?;
        answer.await.map_err(|_| SupervisorError::Gone)?
    }

    /// Drains for up to `grace`, then stops the engine.
    pub async fn stop(&self, grace: Duration) -> Result<Stopped, SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Stop { grace, reply }).await?;
        answer.await.map_err(|_| SupervisorError::Gone)
    }

    async fn send(&self, command: Command) -> Result<(), SupervisorError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| SupervisorError::Gone)
    }
}

/// Builds the launch plan of `spec`, or says which field is wrong.
pub fn plan(
    settings: &config::Engine,
    spec: &v1::EngineSpec,
    log_path: PathBuf,
) -> Result<LaunchPlan, SupervisorError> {
    let invalid = |message: String| Err(SupervisorError::Invalid(message));
    if spec.deployment_id.trim().is_empty() {
        return invalid("spec.deployment_id: required".into());
    }
    if spec.endpoint.trim().is_empty() {
        return invalid("spec.endpoint: required (the name the engine serves)".into());
    }
    let Some(template) = &spec.template else {
        return invalid("spec.template: required".into());
    };
    match v1::EngineRuntime::try_from(template.runtime) {
        Ok(v1::EngineRuntime::Unspecified | v1::EngineRuntime::Process) => {}
        Ok(v1::EngineRuntime::Container) => {
            return Err(SupervisorError::Precondition(
                "spec.template.runtime: this agent runs engines as processes; the container runtime is not supported yet".into(),
            ));
        }
        Err(_) => {
            return invalid(format!(
                "spec.template.runtime: unknown value {}",
                template.runtime
            ));
        }
    }
    let args = engine_args(&Launch {
        model: &template.model,
        endpoint: &spec.endpoint,
        aliases: &spec.aliases,
        vllm_args: &template.vllm_args,
        port: settings.port,
        shutdown_timeout_seconds: template.shutdown_timeout_seconds,
    })
    .map_err(|e| SupervisorError::Invalid(format!("spec.template: {e}")))?;
    let mut env = Vec::with_capacity(template.env.len() + 3);
    // Secrets the engine also reads from its environment leave its command
    // line, which every user of the host can read (`ps`).
    let args = secrets_to_env(args, &mut env);
    if !settings.cuda_visible_devices.is_empty() {
        env.push((
            "CUDA_VISIBLE_DEVICES".to_owned(),
            settings.cuda_visible_devices.clone(),
        ));
    }
    for (i, var) in template.env.iter().enumerate() {
        if var.name.is_empty() || var.name.contains(['=', '\0']) {
            return invalid(format!(
                "spec.template.env[{i}].name: must be a non-empty name without `=` or NUL"
            ));
        }
        if let Some(why) = crossfade_common::engine_env::owned(&var.name) {
            return invalid(format!(
                "spec.template.env[{i}].name: {} may not be set: {why}",
                var.name
            ));
        }
        match &var.source {
            Some(v1::env_var::Source::Value(value)) if !value.contains('\0') => {
                env.push((var.name.clone(), value.clone()));
            }
            Some(v1::env_var::Source::Value(_)) => {
                return invalid(format!(
                    "spec.template.env[{i}] ({}): the value may not contain NUL",
                    var.name
                ));
            }
            Some(v1::env_var::Source::FromCoordinatorEnv(_)) | None => {
                return invalid(format!(
                    "spec.template.env[{i}] ({}): needs a value; the coordinator resolves `from_coordinator_env` before it sends a spec",
                    var.name
                ));
            }
        }
    }
    Ok(LaunchPlan {
        program: settings.command.clone(),
        args,
        env,
        log_path,
    })
}

/// Secret flags vLLM also reads from its environment, and those variables.
const SECRET_FLAG_ENV: &[(&str, &str)] =
    &[("--api-key", "VLLM_API_KEY"), ("--hf-token", "HF_TOKEN")];

/// Moves the values of [`SECRET_FLAG_ENV`] flags (one value each, in any
/// spelling) from `args` to `env`.
fn secrets_to_env(args: Vec<String>, env: &mut Vec<(String, String)>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut words = args.into_iter().peekable();
    while let Some(word) = words.next() {
        let Some((_, var)) = SECRET_FLAG_ENV
            .iter()
            .find(|(flag, _)| crossfade_common::vllm_args::names(&word, flag))
        else {
            out.push(word);
            continue;
        };
        let value = match word.split_once('=') {
            Some((_, value)) => Some(value.to_owned()),
            None => words.next_if(|next| !next.starts_with("--")),
        };
        match value {
            Some(value) => env.push(((*var).to_owned(), value)),
            // No value: vLLM reports it, as it would.
            None => out.push(word),
        }
    }
    out
}

/// The secret values of `spec`: its secret environment variables and the
/// values of secret flags in its `vllm_args` (`--api-key`, ...).
fn secret_values(spec: &v1::EngineSpec) -> Vec<String> {
    let Some(template) = &spec.template else {
        return Vec::new();
    };
    let mut secrets: Vec<String> = template
        .env
        .iter()
        .filter(|var| var.secret)
        .filter_map(|var| match &var.source {
            Some(v1::env_var::Source::Value(value)) => Some(value.clone()),
            _ => None,
        })
        .collect();
    if let Ok(words) = crossfade_common::vllm_args::split(&template.vllm_args) {
        for flag in crossfade_common::vllm_args::SECRET_FLAGS {
            if let Some(value) = crossfade_common::vllm_args::value_of(&words, flag) {
                secrets.push(value.to_owned());
            }
        }
    }
    secrets.retain(|s| !s.is_empty());
    // The longest first: a secret that contains another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

/// The engine log's last `lines`, each secret value masked: what an engine
/// prints (a failing one echoing its environment) leaves the agent only
/// masked, in the status, the failure reason and the agent's own log.
fn masked_tail(path: &std::path::Path, lines: usize, secrets: &[String]) -> Vec<String> {
    log_tail(path, lines)
        .into_iter()
        .map(|line| {
            secrets.iter().fold(line, |line, secret| {
                line.replace(secret.as_str(), crossfade_common::vllm_args::REDACTED)
            })
        })
        .collect()
}

/// The deployment being run.
struct Current {
    spec: v1::EngineSpec,
    plan: LaunchPlan,
    /// `None` while a restart waits for its back-off.
    engine: Option<Box<dyn Engine>>,
    generation: u64,
    ready_deadline: Instant,
    probe: Option<JoinHandle<()>>,
    consecutive_crashes: u32,
    ready_since: Option<Instant>,
    restart_at: Option<Instant>,
    launched_at: Instant,
}

impl Current {
    /// A deployment about to be launched (or adopted) now.
    fn new(settings: &config::Engine, spec: v1::EngineSpec, plan: LaunchPlan) -> Self {
        let now = Instant::now();
        Self {
            ready_deadline: now + ready_timeout(settings, &spec),
            spec,
            plan,
            engine: None,
            generation: 0,
            probe: None,
            consecutive_crashes: 0,
            ready_since: None,
            restart_at: None,
            launched_at: now,
        }
    }

    fn stop_probe(&mut self) {
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
    }
}

enum Event {
    Phase {
        generation: u64,
        phase: StartingPhase,
        detail: String,
    },
    Ready {
        generation: u64,
    },
}

struct Actor {
    settings: config::Engine,
    runtime: Arc<dyn Runtime>,
    gate: Arc<Gate>,
    view: watch::Sender<EngineView>,
    client: EngineClient,
    state_file: StateFile,
    log_path: PathBuf,
    current: Option<Current>,
    events: mpsc::UnboundedSender<Event>,
    generation: u64,
    /// Bumped by `Undrain`: a drain in progress returns at once.
    undrained: watch::Sender<u64>,
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
        shutdown: Shutdown,
    ) {
        let mut tick = tokio::time::interval(EXIT_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.triggered() => break,
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => break,
                },
                Some(event) = events.recv() => self.event(event),
                _ = tick.tick() => self.tick().await,
            }
        }
        if let Some(current) = &mut self.current {
            current.stop_probe();
            if current.engine.is_some() {
                tracing::info!(
                    pid = self.view.borrow().pid,
                    "the engine keeps running; a restarted agent adopts it"
                );
            }
        }
        self.gate.close_for_start();
    }

    /// Changes the published view; keeps `state_since` and the state gauge
    /// right.
    fn set(&self, change: impl FnOnce(&mut EngineView)) {
        self.view.send_modify(|view| {
            let before = view.state;
            change(view);
            if view.state != before {
                view.state_since = SystemTime::now();
                metrics::gauge!(m::ENGINE_STATE, "state" => state_name(before)).set(0.0);
            }
            metrics::gauge!(m::ENGINE_STATE, "state" => state_name(view.state)).set(1.0);
        });
    }

    fn adopt(&mut self) {
        let record = match self.state_file.load() {
            Ok(Some(record)) => record,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the state file");
                return;
            }
        };
        let deployment = record.spec.deployment_id.clone();
        let engine = (record.runtime == self.runtime.kind())
            .then(|| self.runtime.adopt(record.identity))
            .flatten();
        let Some(engine) = engine else {
            tracing::info!(
                pid = record.identity.pid,
                deployment,
                "the engine of the state file is gone"
            );
            if let Err(e) = self.state_file.remove() {
                tracing::warn!(error = %e, "cannot remove the state file");
            }
            return;
        };
        let plan = match plan(&self.settings, &record.spec, self.log_path.clone()) {
            Ok(plan) if record.port == self.settings.port => plan,
            Ok(_) => {
                tracing::warn!(
                    recorded = record.port,
                    configured = self.settings.port,
                    "the engine of the state file listens on another port than engine.port; not adopting it"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the deployment of the state file is not valid now; not adopting it");
                return;
            }
        };
        tracing::info!(
            pid = record.identity.pid,
            deployment,
            port = record.port,
            "adopting the engine an earlier agent started"
        );
        self.generation += 1;
        let generation = self.generation;
        let now = Instant::now();
        let mut current = Current::new(&self.settings, record.spec, plan);
        current.engine = Some(engine);
        current.generation = generation;
        self.current = Some(current);
        self.set(|view| {
            *view = EngineView {
                state: EngineState::Starting,
                deployment_id: deployment,
                phase: StartingPhase::HealthCheck,
                starting_since: Some(now),
                pid: record.identity.pid,
                port: record.port,
                adopted: true,
                ..EngineView::default()
            };
        });
        self.spawn_probe(StartingPhase::HealthCheck);
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Apply {
                spec,
                drain_timeout,
                reply,
            } => {
                let result = self.apply(*spec, drain_timeout).await;
                let _ = reply.send(result);
            }
            Command::Drain { deadline, reply } => self.drain(deadline, reply),
            Command::Undrain { reply } => {
                let _ = reply.send(self.undrain());
            }
            Command::Stop { grace, reply } => {
                let stopped = self.stop(grace).await;
                let _ = reply.send(stopped);
            }
        }
    }

    async fn apply(
        &mut self,
        spec: v1::EngineSpec,
        drain_timeout: Duration,
    ) -> Result<Applied, SupervisorError> {
        let plan = plan(&self.settings, &spec, self.log_path.clone())?;
        let state = self.view.borrow().state;
        if let Some(current) = &self.current
            && current.spec.deployment_id == spec.deployment_id
            && matches!(
                state,
                EngineState::Starting | EngineState::Ready | EngineState::Draining
            )
        {
            if state == EngineState::Draining {
                self.undrain()?;
            }
            return Ok(Applied {
                already_applied: true,
            });
        }
        if self.current.is_some() {
            tracing::info!(
                from = %self.view.borrow().deployment_id,
                to = %spec.deployment_id,
                "swapping deployments: draining the running one"
            );
            self.drain_now(drain_timeout).await;
            self.stop_engine().await;
        }
        tracing::info!(deployment = %spec.deployment_id, plan = ?plan, "launching the engine");
        self.current = Some(Current::new(&self.settings, spec, plan));
        self.set(|view| {
            *view = EngineView {
                restart_count: 0,
                ..EngineView::default()
            };
        });
        self.launch();
        Ok(Applied {
            already_applied: false,
        })
    }

    /// Launches (or relaunches) the current deployment.
    fn launch(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        let Some(current) = &mut self.current else {
            return;
        };
        current.stop_probe();
        current.restart_at = None;
        current.generation = generation;
        let deployment_id = current.spec.deployment_id.clone();
        if let Some(dir) = current.plan.log_path.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot create the state directory");
        }
        let engine = match self.runtime.launch(&current.plan) {
            Ok(engine) => engine,
            Err(e) => {
                // Not a crash: the executable is missing or the log cannot
                // be written. Restarting would not help.
                tracing::error!(error = %e, deployment = %deployment_id, "cannot launch the engine");
                self.current = None;
                let reason = e.to_string();
                self.set(|view| {
                    view.state = EngineState::Failed;
                    view.deployment_id = deployment_id;
                    view.failure_reason = reason.clone();
                    view.last_error = reason;
                    view.starting_since = None;
                    view.pid = 0;
                });
                return;
            }
        };
        let identity = engine.identity();
        let now = Instant::now();
        let ready_timeout = ready_timeout(&self.settings, &current.spec);
        current.engine = Some(engine);
        current.ready_deadline = now + ready_timeout;
        current.launched_at = now;
        current.ready_since = None;
        let record = Record {
            identity,
            port: self.settings.port,
            runtime: self.runtime.kind().to_owned(),
            spec: current.spec.clone(),
            launched_at_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        if let Err(e) = self.state_file.save(&record) {
            tracing::warn!(error = %e, "cannot write the state file; a restarted agent will not adopt this engine");
        }
        self.gate.close_for_start();
        let port = self.settings.port;
        self.set(|view| {
            view.state = EngineState::Starting;
            view.deployment_id = deployment_id;
            view.phase = StartingPhase::Launching;
            view.phase_detail.clear();
            view.starting_since = Some(now);
            view.pid = identity.pid;
            view.port = port;
            view.adopted = false;
            view.failure_reason.clear();
            view.log_tail.clear();
        });
        tracing::info!(pid = identity.pid, port, "engine launched");
        self.spawn_probe(StartingPhase::Launching);
    }

    fn spawn_probe(&mut self, from: StartingPhase) {
        let Some(current) = &mut self.current else {
            return;
        };
        let vllm_args = current
            .spec
            .template
            .as_ref()
            .map_or("", |t| t.vllm_args.as_str());
        let client = self.client.for_vllm_args(vllm_args);
        let events = self.events.clone();
        let generation = current.generation;
        let port = self.settings.port;
        let name = current.spec.endpoint.clone();
        let interval = self.settings.probe_interval;
        current.probe = Some(tokio::spawn(async move {
            let mut phase = from;
            let mut detail = String::new();
            loop {
                let mut entered = |reached: StartingPhase| {
                    let _ = events.send(Event::Phase {
                        generation,
                        phase: reached,
                        detail: String::new(),
                    });
                };
                let checked = probe::check(&client, port, &name, phase, &mut entered).await;
                match checked {
                    Check::Ready => {
                        let _ = events.send(Event::Ready { generation });
                        return;
                    }
                    Check::Phase(now, said) => {
                        if now != phase || said != detail {
                            phase = now;
                            detail.clone_from(&said);
                            let _ = events.send(Event::Phase {
                                generation,
                                phase,
                                detail: said,
                            });
                        }
                    }
                }
                tokio::time::sleep(interval).await;
            }
        }));
    }

    fn event(&mut self, event: Event) {
        let Some(current) = &mut self.current else {
            return;
        };
        match event {
            Event::Phase {
                generation,
                phase,
                detail,
            } if generation == current.generation => {
                self.set(|view| {
                    if view.state == EngineState::Starting {
                        view.phase = phase;
                        view.phase_detail = detail;
                    }
                });
            }
            Event::Ready { generation } if generation == current.generation => {
                current.probe = None;
                current.ready_since = Some(Instant::now());
                let took = current.launched_at.elapsed();
                let adopted = self.view.borrow().adopted;
                if !adopted {
                    metrics::histogram!(m::ENGINE_START_SECONDS).record(took.as_secs_f64());
                }
                self.gate.open(self.settings.port);
                tracing::info!(
                    deployment = %current.spec.deployment_id,
                    took = ?took,
                    adopted,
                    "engine ready"
                );
                self.set(|view| {
                    view.state = EngineState::Ready;
                    view.phase = StartingPhase::Unspecified;
                    view.phase_detail.clear();
                    view.starting_since = None;
                });
            }
            // From an engine since replaced.
            Event::Phase { .. } | Event::Ready { .. } => {}
        }
    }

    async fn tick(&mut self) {
        let Some(current) = &mut self.current else {
            return;
        };
        let now = Instant::now();
        if let Some(engine) = &mut current.engine {
            if let Some(exit) = engine.try_exit() {
                self.crashed(exit);
                return;
            }
        } else if current.restart_at.is_some_and(|at| at <= now) {
            self.launch();
            return;
        }
        let state = self.view.borrow().state;
        if state == EngineState::Starting
            && current.engine.is_some()
            && now >= current.ready_deadline
        {
            let view = self.view.borrow().clone();
            let waited = current.ready_deadline - current.launched_at;
            let reason = format!(
                "not ready within {} (phase {}{})",
                humantime::format_duration(waited),
                view.phase.as_str_name(),
                if view.phase_detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", view.phase_detail)
                }
            );
            tracing::error!(deployment = %view.deployment_id, %reason, "giving up on the engine");
            let secrets = secret_values(&current.spec);
            let exit = self.stop_engine().await;
            let tail = masked_tail(&self.log_path, self.settings.log_tail_lines, &secrets);
            self.set(|view| {
                view.state = EngineState::Failed;
                view.failure_reason = reason.clone();
                view.last_error = reason;
                view.exit_code = exit.and_then(|e| e.code);
                view.log_tail = tail;
            });
        }
    }

    /// The engine exited without being asked to.
    fn crashed(&mut self, exit: Exit) {
        let Some(current) = &mut self.current else {
            return;
        };
        current.engine = None;
        current.stop_probe();
        self.gate.close_for_start();
        if self.view.borrow().state == EngineState::Draining {
            // It was on its way out: a restart would put it back in
            // service behind the coordinator's back.
            let error = format!("the engine exited ({exit}) while draining; not restarting it");
            tracing::warn!(deployment = %current.spec.deployment_id, "{error}");
            self.current = None;
            if let Err(e) = self.state_file.remove() {
                tracing::warn!(error = %e, "cannot remove the state file");
            }
            self.set(|view| {
                view.state = EngineState::Stopped;
                view.exit_code = exit.code;
                view.last_error = error;
                view.pid = 0;
            });
            return;
        }
        metrics::counter!(m::ENGINE_RESTARTS_TOTAL).increment(1);
        if current
            .ready_since
            .is_some_and(|since| since.elapsed() >= self.settings.stable_after)
        {
            current.consecutive_crashes = 0;
        }
        current.consecutive_crashes += 1;
        let crashes = current.consecutive_crashes;
        let secrets = secret_values(&current.spec);
        let tail = masked_tail(&self.log_path, self.settings.log_tail_lines, &secrets);
        let last_line = tail.last().cloned().unwrap_or_default();
        let deployment = current.spec.deployment_id.clone();
        if crashes > self.settings.max_restarts {
            let reason = format!(
                "the engine exited {crashes} time{} in a row, last with {exit}{}",
                if crashes == 1 { "" } else { "s" },
                if last_line.is_empty() {
                    String::new()
                } else {
                    format!(": {last_line}")
                }
            );
            tracing::error!(deployment, %reason, "the engine is failed; not restarting it");
            self.current = None;
            if let Err(e) = self.state_file.remove() {
                tracing::warn!(error = %e, "cannot remove the state file");
            }
            self.set(|view| {
                view.state = EngineState::Failed;
                view.failure_reason = reason.clone();
                view.last_error = reason;
                view.exit_code = exit.code;
                view.log_tail = tail;
                view.pid = 0;
                view.starting_since = None;
            });
            return;
        }
        let exponent = (crashes - 1).min(20);
        let backoff = self
            .settings
            .restart_backoff
            .saturating_mul(1 << exponent)
            .min(self.settings.restart_backoff_max);
        current.restart_at = Some(Instant::now() + backoff);
        let error = format!(
            "the engine exited ({exit}){}; restart {crashes} of {} in {}",
            if last_line.is_empty() {
                String::new()
            } else {
                format!(": {last_line}")
            },
            self.settings.max_restarts,
            humantime::format_duration(backoff)
        );
        tracing::warn!(deployment, "{error}");
        self.set(|view| {
            view.state = EngineState::Starting;
            view.phase = StartingPhase::Launching;
            view.phase_detail.clear();
            view.starting_since = Some(Instant::now());
            view.exit_code = exit.code;
            view.restart_count += 1;
            view.last_error = error;
            view.pid = 0;
            view.adopted = false;
        });
    }

    fn drain(&mut self, deadline: Duration, reply: oneshot::Sender<Drained>) {
        let state = self.view.borrow().state;
        if !matches!(state, EngineState::Ready | EngineState::Draining) {
            // Nothing takes traffic; the gate already refuses it.
            let _ = reply.send(Drained {
                drained: true,
                still_in_flight: 0,
                waited: Duration::ZERO,
            });
            return;
        }
        self.gate.start_drain();
        self.set(|view| view.state = EngineState::Draining);
        let gate = Arc::clone(&self.gate);
        let mut undrained = self.undrained.subscribe();
        undrained.mark_unchanged();
        tokio::spawn(async move {
            let started = Instant::now();
            let until = tokio::time::Instant::now() + deadline;
            let (left, result) = tokio::select! {
                left = gate.wait_idle(until) => {
                    if left > 0 {
                        gate.cut_streams();
                    }
                    (left, if left == 0 { "drained" } else { "deadline" })
                }
                _ = undrained.changed() => (gate.state().in_flight, "undrained"),
            };
            let waited = started.elapsed();
            metrics::histogram!(m::DRAIN_SECONDS, "result" => result).record(waited.as_secs_f64());
            let _ = reply.send(Drained {
                drained: left == 0,
                still_in_flight: left,
                waited,
            });
        });
    }

    /// Drains before a stop or a swap, waiting here.
    async fn drain_now(&mut self, deadline: Duration) -> Drained {
        let started = Instant::now();
        let state = self.view.borrow().state;
        if !matches!(state, EngineState::Ready | EngineState::Draining) {
            self.gate.close_for_start();
            return Drained {
                drained: true,
                still_in_flight: 0,
                waited: Duration::ZERO,
            };
        }
        self.gate.start_drain();
        self.set(|view| view.state = EngineState::Draining);
        let left = self
            .gate
            .wait_idle(tokio::time::Instant::now() + deadline)
            .await;
        if left > 0 {
            tracing::warn!(
                still_in_flight = left,
                ?deadline,
                "drain deadline passed; ending open streams"
            );
            self.gate.cut_streams();
            self.gate
                .wait_idle(tokio::time::Instant::now() + CUT_FLUSH)
                .await;
        }
        let waited = started.elapsed();
        metrics::histogram!(m::DRAIN_SECONDS, "result" => if left == 0 { "drained" } else { "deadline" })
            .record(waited.as_secs_f64());
        Drained {
            drained: left == 0,
            still_in_flight: left,
            waited,
        }
    }

    fn undrain(&mut self) -> Result<(), SupervisorError> {
        let state = self.view.borrow().state;
        match state {
            EngineState::Ready => Ok(()),
            EngineState::Draining => {
                self.gate.open(self.settings.port);
                self.undrained.send_modify(|n| *n += 1);
                self.set(|view| view.state = EngineState::Ready);
                tracing::info!("undrained: taking requests again");
                Ok(())
            }
            other => Err(SupervisorError::Precondition(format!(
                "the engine is {}; only a draining engine can be undrained",
                other.as_str_name()
            ))),
        }
    }

    async fn stop(&mut self, grace: Duration) -> Stopped {
        if self.current.is_none() {
            // Already stopped, or failed: nothing runs.
            return Stopped {
                still_in_flight: 0,
                exit_code: self.view.borrow().exit_code,
            };
        }
        let drained = self.drain_now(grace).await;
        let exit = self.stop_engine().await;
        self.current = None;
        self.set(|view| {
            view.state = EngineState::Stopped;
            view.exit_code = exit.and_then(|e| e.code);
            view.pid = 0;
            view.starting_since = None;
        });
        Stopped {
            still_in_flight: drained.still_in_flight,
            exit_code: exit.and_then(|e| e.code),
        }
    }

    /// Stops the current engine: SIGTERM, then SIGKILL after
    /// `stop_timeout`. Forgets it in the state file.
    async fn stop_engine(&mut self) -> Option<Exit> {
        self.gate.close_for_start();
        let current = self.current.as_mut()?;
        current.stop_probe();
        current.restart_at = None;
        let mut engine = current.engine.take()?;
        self.set(|view| view.state = EngineState::Stopping);
        engine.terminate();
        let exit = wait_exit(engine.as_mut(), self.settings.stop_timeout).await;
        let exit = match exit {
            Some(exit) => Some(exit),
            None => {
                tracing::warn!(
                    timeout = ?self.settings.stop_timeout,
                    "the engine did not stop after SIGTERM; killing it"
                );
                engine.kill();
                wait_exit(engine.as_mut(), Duration::from_secs(10)).await
            }
        };
        if let Err(e) = self.state_file.remove() {
            tracing::warn!(error = %e, "cannot remove the state file");
        }
        tracing::info!(exit = ?exit, "engine stopped");
        exit
    }
}

/// The deployment's ready timeout, or the configured one.
fn ready_timeout(settings: &config::Engine, spec: &v1::EngineSpec) -> Duration {
    spec.ready_timeout
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(settings.ready_timeout)
}

async fn wait_exit(engine: &mut dyn Engine, timeout: Duration) -> Option<Exit> {
    let until = Instant::now() + timeout;
    loop {
        if let Some(exit) = engine.try_exit() {
            return Some(exit);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state_name(state: EngineState) -> &'static str {
    match state {
        EngineState::Unspecified => "unspecified",
        EngineState::Stopped => "stopped",
        EngineState::Starting => "starting",
        EngineState::Ready => "ready",
        EngineState::Draining => "draining",
        EngineState::Stopping => "stopping",
        EngineState::Failed => "failed",
    }
}

/// Reads the engine's `/metrics` every `interval` while it takes traffic.
async fn scrape_engine(
    client: EngineClient,
    view: watch::Receiver<EngineView>,
    scrape: watch::Sender<Option<Scrape>>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.triggered() => return,
            _ = tick.tick() => {}
        }
        let (state, port) = {
            let view = view.borrow();
            (view.state, view.port)
        };
        let read = if matches!(state, EngineState::Ready | EngineState::Draining) {
            match client.call(port, http::Method::GET, "/metrics", None).await {
                Ok((status, page)) if status.is_success() => {
                    probe::parse_load(&String::from_utf8_lossy(&page))
                }
                Ok((status, _)) => {
                    tracing::debug!(%status, "the engine's /metrics answered an error");
                    None
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the engine's /metrics");
                    None
                }
            }
        } else {
            None
        };
        if let Some(load) = read {
            metrics::gauge!(m::ENGINE_REQUESTS_RUNNING).set(f64::from(load.running));
            metrics::gauge!(m::ENGINE_REQUESTS_WAITING).set(f64::from(load.waiting));
        }
        let next = read.map(|load| Scrape {
            load,
            at: SystemTime::now(),
        });
        // Only a change of the counts (or of having them) is news.
        scrape.send_if_modified(|old| {
            let changed = old.map(|s| s.load) != next.map(|s| s.load);
            *old = next;
            changed
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(env: Vec<v1::EnvVar>) -> v1::EngineSpec {
        v1::EngineSpec {
            deployment_id: "dep-1".into(),
            endpoint: "chat".into(),
            aliases: vec!["qwen".into()],
            template: Some(v1::Template {
                runtime: v1::EngineRuntime::Process as i32,
                model: "Qwen/Qwen3-8B".into(),
                vllm_args: "--max-model-len 4096".into(),
                env,
                shutdown_timeout_seconds: Some(30),
                ..Default::default()
            }),
            ready_timeout: None,
        }
    }

    fn var(name: &str, source: v1::env_var::Source, secret: bool) -> v1::EnvVar {
        v1::EnvVar {
            name: name.into(),
            source: Some(source),
            secret,
            redacted: false,
        }
    }

    #[test]
    fn the_plan_carries_the_environment_and_the_gpus_and_prints_no_secret() {
        let settings = config::Engine {
            command: "fake-vllm".into(),
            cuda_visible_devices: "0,1".into(),
            ..config::Engine::default()
        };
        let spec = spec(vec![var(
            "HF_TOKEN",
            v1::env_var::Source::Value("hf_abcdef".into()),
            true,
        )]);
        let plan = plan(&settings, &spec, "engine.log".into()).unwrap();
        assert_eq!(plan.program, "fake-vllm");
        assert_eq!(
            plan.env,
            [
                ("CUDA_VISIBLE_DEVICES".to_owned(), "0,1".to_owned()),
                ("HF_TOKEN".to_owned(), "hf_abcdef".to_owned())
            ]
        );
        assert!(
            plan.args
                .windows(2)
                .any(|w| w == ["--shutdown-timeout", "30"])
        );
        assert!(!format!("{plan:?}").contains("hf_abcdef"));
    }

    #[test]
    fn secret_flags_leave_the_command_line_for_the_environment() {
        let settings = config::Engine::default();
        let mut keyed = spec(Vec::new());
        if let Some(t) = keyed.template.as_mut() {
            t.vllm_args = "--api-key sk-abc --max-model-len 4096 --hf_token=hf_x".into();
        }
        let plan = plan(&settings, &keyed, "l".into()).unwrap();
        assert!(
            !plan
                .args
                .iter()
                .any(|a| a.contains("sk-abc") || a.contains("hf_x")),
            "{:?}",
            plan.args
        );
        assert!(plan.args.iter().any(|a| a == "--max-model-len"));
        assert!(
            plan.env
                .contains(&("VLLM_API_KEY".to_owned(), "sk-abc".to_owned()))
        );
        assert!(
            plan.env
                .contains(&("HF_TOKEN".to_owned(), "hf_x".to_owned()))
        );
    }

    #[test]
    fn secrets_of_the_spec_are_masked_in_the_engine_log_tail() {
        let mut secret_spec = spec(vec![
            var(
                "HF_TOKEN",
                v1::env_var::Source::Value("hf_s3cr3t".into()),
                true,
            ),
            var(
                "LOG_LEVEL",
                v1::env_var::Source::Value("INFO".into()),
                false,
            ),
        ]);
        if let Some(t) = secret_spec.template.as_mut() {
            t.vllm_args = "--api_key sk-abc123 --max-model-len 4096".into();
        }
        let dir = std::env::temp_dir().join(format!("crossfade-mask-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("engine.log");
        std::fs::write(
            &log,
            "HF_TOKEN=hf_s3cr3t LOG_LEVEL=INFO\nOSError: bad key sk-abc123\n",
        )
        .unwrap();
        let tail = masked_tail(&log, 5, &secret_values(&secret_spec));
        assert_eq!(
            tail,
            [
                "HF_TOKEN=<redacted> LOG_LEVEL=INFO",
                "OSError: bad key <redacted>"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_spec_names_its_field() {
        let settings = config::Engine::default();
        let error =
            |spec: &v1::EngineSpec| plan(&settings, spec, "l".into()).unwrap_err().to_string();
        let mut no_id = spec(Vec::new());
        no_id.deployment_id.clear();
        assert_eq!(error(&no_id), "spec.deployment_id: required");
        let unresolved = spec(vec![var(
            "HF_TOKEN",
            v1::env_var::Source::FromCoordinatorEnv("HF_TOKEN".into()),
            true,
        )]);
        assert!(error(&unresolved).starts_with("spec.template.env[0] (HF_TOKEN): needs a value"));
        let unnamed = spec(vec![var(
            "A=B",
            v1::env_var::Source::Value("x".into()),
            false,
        )]);
        assert!(error(&unnamed).starts_with("spec.template.env[0].name: "));
        for owned in ["LD_PRELOAD", "CUDA_VISIBLE_DEVICES", "PYTHONPATH"] {
            let hijack = spec(vec![var(
                owned,
                v1::env_var::Source::Value("/tmp/evil.so".into()),
                false,
            )]);
            assert!(
                error(&hijack).starts_with(&format!(
                    "spec.template.env[0].name: {owned} may not be set: "
                )),
                "{}",
                error(&hijack)
            );
        }
        let mut quoted = spec(Vec::new());
        if let Some(t) = quoted.template.as_mut() {
            t.vllm_args = "--chat-template '{{ x }}".into();
        }
        assert!(error(&quoted).starts_with("spec.template: VLLM_ARGS does not split"));
        let mut container = spec(Vec::new());
        if let Some(t) = container.template.as_mut() {
            t.runtime = v1::EngineRuntime::Container as i32;
        }
        assert!(matches!(
            plan(&settings, &container, "l".into()),
            Err(SupervisorError::Precondition(_))
        ));
    }
}
