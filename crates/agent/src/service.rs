//! The Agent gRPC service: the coordinator reads status and runs, drains,
//! undrains and stops deployments here. Handlers validate and delegate to
//! the supervisor; errors map to gRPC codes in one place ([`status`]).

use std::pin::Pin;
use std::time::Duration;

use crossfade_common::Shutdown;
use crossfade_proto::tls::Role;
use crossfade_proto::v1;
use crossfade_proto::v1::agent_server::{Agent, AgentServer};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::status::Reporter;
use crate::supervisor::SupervisorError;

/// Longest drain deadline or stop grace a call may ask for.
const MAX_DRAIN: Duration = Duration::from_secs(24 * 3600);
/// Shortest gap between two `WatchStatus` messages: a busy gate changes its
/// count with every request, and a watcher needs the news, not each step
/// (the gate's own count news keeps the same gap).
const MIN_GAP: Duration = crate::gate::COUNT_NEWS_GAP;
/// Shortest and longest `WatchStatus` heartbeat.
const HEARTBEAT: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);

/// Defaults for what a call leaves out.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// Drain deadline of `Apply`, `Drain` and `Stop`.
    pub drain_timeout: Duration,
    /// `WatchStatus` heartbeat.
    pub heartbeat: Duration,
}

/// The service.
#[derive(Debug, Clone)]
pub struct AgentService {
    reporter: Reporter,
    defaults: Defaults,
    shutdown: Shutdown,
}

impl AgentService {
    /// The service over `reporter`'s supervisor.
    pub fn new(reporter: Reporter, defaults: Defaults, shutdown: Shutdown) -> Self {
        Self {
            reporter,
            defaults,
            shutdown,
        }
    }

    /// The tonic server for it.
    pub fn into_server(self) -> AgentServer<Self> {
        AgentServer::new(self)
    }

    fn fence(&self, epoch: u64) -> Result<(), Status> {
        self.reporter.fence().check(epoch, "agent")
    }
}

/// Who may call the Agent API: the coordinator; an operator may also read.
pub fn policy(path: &str) -> &'static [Role] {
    match path.strip_prefix("/crossfade.v1.Agent/") {
        Some("GetStatus" | "WatchStatus") => &[Role::Coordinator, Role::Operator],
        _ => &[Role::Coordinator],
    }
}

/// `SupervisorError` as a gRPC status.
fn status(error: SupervisorError) -> Status {
    match error {
        SupervisorError::Invalid(message) => Status::invalid_argument(message),
        SupervisorError::Precondition(message) => Status::failed_precondition(message),
        SupervisorError::Gone => Status::unavailable(error.to_string()),
    }
}

/// A duration field: its default when absent, else within `range`.
fn duration(
    field: &str,
    value: Option<prost_types::Duration>,
    default: Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> Result<Duration, Status> {
    let Some(value) = value else {
        return Ok(default);
    };
    let value = Duration::try_from(value)
        .map_err(|_| Status::invalid_argument(format!("{field}: must not be negative")))?;
    if !range.contains(&value) {
        return Err(Status::invalid_argument(format!(
            "{field}: must be within {}..={}, got {}",
            humantime::format_duration(*range.start()),
            humantime::format_duration(*range.end()),
            humantime::format_duration(value)
        )));
    }
    Ok(value)
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<v1::WorkerStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn get_status(
        &self,
        _request: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::WorkerStatus>, Status> {
        Ok(Response::new(self.reporter.status()))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        request: Request<v1::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let heartbeat = duration(
            "heartbeat_interval",
            request.into_inner().heartbeat_interval,
            self.defaults.heartbeat,
            HEARTBEAT,
        )?;
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let reporter = self.reporter.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut revisions = reporter.revisions();
            let mut tick = tokio::time::interval(heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                revisions.mark_unchanged();
                if sender.send(Ok(reporter.status())).await.is_err() {
                    return; // The caller went away.
                }
                tick.reset();
                tokio::time::sleep(MIN_GAP).await;
                tokio::select! {
                    () = shutdown.triggered() => {
                        let _ = sender.send(Err(Status::unavailable("the agent is shutting down"))).await;
                        return;
                    }
                    changed = revisions.changed() => if changed.is_err() { return },
                    _ = tick.tick() => {}
                    () = sender.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        let drain_timeout = duration(
            "drain_timeout",
            request.drain_timeout,
            self.defaults.drain_timeout,
            Duration::ZERO..=MAX_DRAIN,
        )?;
        self.fence(request.coordinator_epoch)?;
        let applied = self
            .reporter
            .supervisor()
            .apply(spec, drain_timeout)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::ApplyResponse {
            already_applied: applied.already_applied,
            status: Some(self.reporter.status()),
        }))
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        let request = request.into_inner();
        let deadline = duration(
            "deadline",
            request.deadline,
            self.defaults.drain_timeout,
            Duration::ZERO..=MAX_DRAIN,
        )?;
        self.fence(request.coordinator_epoch)?;
        let drained = self
            .reporter
            .supervisor()
            .drain(deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::DrainResponse {
            drained: drained.drained,
            still_in_flight: drained.still_in_flight,
            waited: drained.waited.try_into().ok(),
            status: Some(self.reporter.status()),
        }))
    }

    async fn undrain(
        &self,
        request: Request<v1::UndrainRequest>,
    ) -> Result<Response<v1::UndrainResponse>, Status> {
        self.fence(request.into_inner().coordinator_epoch)?;
        self.reporter.supervisor().undrain().await.map_err(status)?;
        Ok(Response::new(v1::UndrainResponse {
            status: Some(self.reporter.status()),
        }))
    }

    async fn stop(
        &self,
        request: Request<v1::StopRequest>,
    ) -> Result<Response<v1::StopResponse>, Status> {
        let request = request.into_inner();
        let grace = duration(
            "grace",
            request.grace,
            self.defaults.drain_timeout,
            Duration::ZERO..=MAX_DRAIN,
        )?;
        self.fence(request.coordinator_epoch)?;
        let stopped = self
            .reporter
            .supervisor()
            .stop(grace)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::StopResponse {
            still_in_flight: stopped.still_in_flight,
            exit_code: stopped.exit_code,
            status: Some(self.reporter.status()),
        }))
    }
}
