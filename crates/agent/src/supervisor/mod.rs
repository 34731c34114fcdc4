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

mod actor;
pub mod command;
pub mod container;
pub mod probe;
pub mod runtime;
mod spec;
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

use self::actor::{Actor, scrape_engine};
pub use self::spec::plan;
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
    /// Its container's name (empty: none).
    pub container: String,
    /// Its loopback port (0: none).
    pub port: u16,
    /// The end of its log, when it failed.
    pub log_tail: Vec<String>,
    /// Adopted from an earlier agent rather than launched.
    pub adopted: bool,
    /// The context length its `/v1/models` reported when it became ready.
    pub max_model_len: Option<u64>,
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
            container: String::new(),
            port: 0,
            log_tail: Vec::new(),
            adopted: false,
            max_model_len: None,
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
            container_id: self.container.clone(),
            engine_port: u32::from(self.port),
            log_tail: self.log_tail.clone(),
            adopted: self.adopted,
            max_model_len: self.max_model_len.unwrap_or(0),
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
    Restart {
        reason: String,
        reply: oneshot::Sender<bool>,
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
            swap: None,
            events,
            generation: 0,
            undrained: watch::Sender::new(0),
            tasks: shutdown.clone(),
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

    /// Kills a starting or serving engine so that it restarts as after a
    /// crash (with back-off, counted towards `max_restarts`): an
    /// application XID left its GPU context unusable. `reason` goes into
    /// the status. Whether there was such an engine.
    pub async fn restart(&self, reason: String) -> Result<bool, SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Restart { reason, reply }).await?;
        answer.await.map_err(|_| SupervisorError::Gone)
    }

    async fn send(&self, command: Command) -> Result<(), SupervisorError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| SupervisorError::Gone)
    }
}
