//! Calls to agents and routers, each with a deadline.
//!
//! - Agents: one ordered queue of calls per worker, served by one task, so
//!   an `Apply` sent after a `Drain` never overtakes it. Each call is
//!   retried on transport errors until its own deadline, and its outcome
//!   comes back to the actor as an [`Internal`] event, always: a hung
//!   agent costs a deadline, never a promotion.
//! - Routers: one pusher per router that always sends the latest table, so
//!   two tables never race each other to a router (an older one arriving
//!   second would be refused as stale). A refusal is told apart from
//!   silence: only silence may fall under the acknowledgement bound.
//!
//! Every task runs on the coordinator's [`Shutdown`] tracker.

use std::future::Future;
use std::time::Duration;

use crossfade_common::Shutdown;
use crossfade_proto::tls::{self, Role};
use crossfade_proto::v1;
use crossfade_proto::v1::agent_client::AgentClient;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::Channel;

use super::Internal;
use super::table_push::{EncodedTable, apply_table};

/// Calls queued for one worker beyond this are refused at once (and
/// reported as failed): a worker that far behind is not keeping up.
const QUEUE_BOUND: usize = 64;
/// What a call may take beyond the work it asks for (a drain's deadline, a
/// stop's grace): the agent's own bookkeeping and the network.
pub const CALL_MARGIN: Duration = Duration::from_secs(15);
/// The longest one attempt at a short call (a table, a stats read) may take.
pub const SHORT_CALL: Duration = Duration::from_secs(5);
/// One call to an agent, and the endpoint it is made for.
#[derive(Debug, Clone)]
pub enum AgentCall {
    /// `Agent.Apply`; answered with [`Internal::ApplyFailed`] when it fails.
    Apply {
        /// The endpoint.
        endpoint: String,
        /// The request.
        request: Box<v1::ApplyRequest>,
    },
    /// `Agent.Drain`; answered with [`Internal::Drained`].
    Drain {
        /// The endpoint.
        endpoint: String,
        /// The request.
        request: v1::DrainRequest,
    },
    /// `Agent.Undrain`; a failure is only logged: the worker then stays
    /// out of the table and is stopped as a stray.
    Undrain {
        /// The request.
        request: v1::UndrainRequest,
    },
    /// `Agent.Stop`; answered with [`Internal::Stopped`]. No endpoint: a
    /// stray engine's stop.
    Stop {
        /// The endpoint, if the stop is a rollout's.
        endpoint: Option<String>,
        /// The request.
        request: v1::StopRequest,
    },
}

impl AgentCall {
    /// What the call may take, in all, retries included.
    fn deadline(&self) -> Duration {
        let of = |d: Option<&prost_types::Duration>| {
            d.and_then(|d| Duration::try_from(*d).ok())
                .unwrap_or_default()
        };
        match self {
            // An Apply first drains another deployment; after that the
            // agent answers at once. Retried until the spec's ready timeout:
            // an agent away for a while is not a failed candidate.
            Self::Apply { request, .. } => {
                let ready = of(request.spec.as_ref().and_then(|s| s.ready_timeout.as_ref()));
                of(request.drain_timeout.as_ref()).max(ready) + CALL_MARGIN
            }
            Self::Drain { request, .. } => of(request.deadline.as_ref()) + CALL_MARGIN,
            Self::Undrain { .. } => CALL_MARGIN,
            // A stop drains (up to its grace), then waits for the engine.
            Self::Stop { request, .. } => of(request.grace.as_ref()) + CALL_MARGIN * 2,
        }
    }

    /// The event that reports its outcome; `error` when it failed.
    fn outcome(self, worker: String, error: Option<Status>) -> Option<Internal> {
        match self {
            Self::Apply { endpoint, request } => error.map(|e| Internal::ApplyFailed {
                endpoint,
                worker,
                deployment: request.spec.map(|s| s.deployment_id).unwrap_or_default(),
                error: e.message().to_owned(),
            }),
            Self::Drain { endpoint, .. } => {
                if let Some(e) = error {
                    tracing::warn!(worker, error = %e, "drain failed; going on as if drained");
                }
                Some(Internal::Drained { endpoint, worker })
            }
            Self::Undrain { .. } => {
                if let Some(e) = error {
                    tracing::warn!(worker, error = %e, "undrain failed");
                }
                None
            }
            Self::Stop { endpoint, .. } => Some(Internal::Stopped {
                endpoint,
                worker,
                failed: error.map(|e| e.message().to_owned()),
            }),
        }
    }
}

/// The agents' call queues.
#[derive(Debug)]
pub struct Agents {
    control: tls::Control,
    queues: std::collections::BTreeMap<String, mpsc::Sender<AgentCall>>,
    clients: std::collections::BTreeMap<String, AgentClient<Channel>>,
    internal: mpsc::UnboundedSender<Internal>,
    shutdown: Shutdown,
}

impl Agents {
    /// No queues yet; outcomes go to `internal`.
    pub fn new(
        control: tls::Control,
        internal: mpsc::UnboundedSender<Internal>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            control,
            queues: Default::default(),
            clients: Default::default(),
            internal,
            shutdown,
        }
    }

    /// The client of the agent at `address`.
    pub fn client(&mut self, address: &str) -> AgentClient<Channel> {
        self.clients
            .entry(address.to_owned())
            .or_insert_with(|| AgentClient::new(self.control.dial(address, Role::Agent)))
            .clone()
    }

    /// Forgets a removed worker: its queue ends after the calls in it.
    pub fn forget(&mut self, address: &str) {
        self.queues.remove(address);
        self.clients.remove(address);
    }

    /// Queues `call` to the agent at `worker`, after every call queued
    /// before it.
    pub fn call(&mut self, worker: &str, call: AgentCall) {
        let queue = match self.queues.get(worker) {
            Some(queue) if !queue.is_closed() => queue.clone(),
            _ => {
                let (queue, calls) = mpsc::channel(QUEUE_BOUND);
                let client = self.client(worker);
                self.shutdown.spawn(serve_queue(
                    worker.to_owned(),
                    client,
                    calls,
                    self.internal.clone(),
                    self.shutdown.clone(),
                ));
                self.queues.insert(worker.to_owned(), queue.clone());
                queue
            }
        };
        if let Err(e) = queue.try_send(call) {
            let call = match e {
                mpsc::error::TrySendError::Full(call) | mpsc::error::TrySendError::Closed(call) => {
                    call
                }
            };
            tracing::warn!(worker, "too many calls queued for this agent; refusing one");
            let refused = Status::resource_exhausted("too many calls queued for this agent");
            if let Some(event) = call.outcome(worker.to_owned(), Some(refused)) {
                let _ = self.internal.send(event);
            }
        }
    }
}

/// Serves one worker's calls in order until the queue or the coordinator
/// ends.
async fn serve_queue(
    worker: String,
    client: AgentClient<Channel>,
    mut calls: mpsc::Receiver<AgentCall>,
    internal: mpsc::UnboundedSender<Internal>,
    shutdown: Shutdown,
) {
    loop {
        let call = tokio::select! {
            () = shutdown.triggered() => return,
            call = calls.recv() => match call {
                Some(call) => call,
                None => return,
            },
        };
        let deadline = Instant::now() + call.deadline();
        let result = tokio::select! {
            () = shutdown.triggered() => return,
            result = perform(&client, &call, deadline) => result,
        };
        if let Some(event) = call.outcome(worker.clone(), result.err())
            && internal.send(event).is_err()
        {
            return;
        }
    }
}

/// Makes `call`, retrying transport errors, until `deadline`.
async fn perform(
    client: &AgentClient<Channel>,
    call: &AgentCall,
    deadline: Instant,
) -> Result<(), Status> {
    retry_until(deadline, |timeout| {
        let mut client = client.clone();
        let call = call.clone();
        async move {
            match call {
                AgentCall::Apply { request, .. } => client
                    .apply(with_timeout(*request, timeout))
                    .await
                    .map(drop),
                AgentCall::Drain { request, .. } => {
                    client.drain(with_timeout(request, timeout)).await.map(drop)
                }
                AgentCall::Undrain { request } => client
                    .undrain(with_timeout(request, timeout))
                    .await
                    .map(drop),
                AgentCall::Stop { request, .. } => {
                    client.stop(with_timeout(request, timeout)).await.map(drop)
                }
            }
        }
    })
    .await
}

/// `message` with a gRPC deadline, so the peer knows it too.
fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Whether a failed call may be tried again: the peer did not answer, or
/// could not (it is restarting). A refusal is final.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
    )
}

/// Calls `attempt` (given the time left) until it succeeds, fails for
/// good, or `deadline` passes.
async fn retry_until<F, Fut>(deadline: Instant, mut attempt: F) -> Result<(), Status>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<(), Status>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Status::deadline_exceeded(
                "no answer before the call's deadline",
            ));
        }
        let error = match tokio::time::timeout(left, attempt(left)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if !transient(&e) => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => Status::deadline_exceeded("no answer before the call's deadline"),
        };
        tracing::debug!(error = %error, "agent call failed; retrying");
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
}

// === routers ===

/// A table to push, encoded with the coordinator's epoch.
pub type Push = Option<EncodedTable>;

/// Starts the pusher of the router at `address`: it sends the latest table
/// given to the returned sender, until the sender is dropped.
pub fn router_pusher(
    control: &tls::Control,
    address: &str,
    internal: mpsc::UnboundedSender<Internal>,
    shutdown: &Shutdown,
) -> watch::Sender<Push> {
    let (tables, latest) = watch::channel(None);
    let channel = control.dial(address, Role::Router);
    shutdown.spawn(push_tables(
        address.to_owned(),
        channel,
        latest,
        internal,
        shutdown.clone(),
    ));
    tables
}

async fn push_tables(
    address: String,
    channel: Channel,
    mut latest: watch::Receiver<Push>,
    internal: mpsc::UnboundedSender<Internal>,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            () = shutdown.triggered() => return,
            changed = latest.changed() => if changed.is_err() { return },
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(table) = latest.borrow_and_update().clone() else {
                break;
            };
            let version = table.version;
            let answer = tokio::time::timeout(
                SHORT_CALL,
                apply_table(channel.clone(), with_timeout(table, SHORT_CALL)),
            )
            .await;
            let event = match answer {
                Ok(Ok(answer)) => Internal::RouterAck {
                    address: address.clone(),
                    version: Some(answer.into_inner().version_in_force),
                },
                Ok(Err(e)) if !transient(&e) => Internal::RouterRefused {
                    address: address.clone(),
                    version,
                    reason: e.message().to_owned(),
                },
                Ok(Err(_)) | Err(_) => Internal::RouterAck {
                    address: address.clone(),
                    version: None,
                },
            };
            let silent = matches!(event, Internal::RouterAck { version: None, .. });
            if internal.send(event).is_err() || !silent {
                break;
            }
            // Silent: the latest table again after a pause (a newer one
            // given meanwhile is the one sent).
            tokio::select! {
                () = shutdown.triggered() => return,
                () = tokio::time::sleep(backoff) => {}
                changed = latest.changed() => if changed.is_err() { return },
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_costs_the_deadline_and_no_more() {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(30);
        let result = retry_until(deadline, |_| std::future::pending::<Result<(), Status>>()).await;
        assert_eq!(result.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn transport_errors_are_retried_and_refusals_are_not() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempts = 0;
        let result = retry_until(deadline, |_| {
            attempts += 1;
            let answer = if attempts < 3 {
                Err(Status::unavailable("restarting"))
            } else {
                Ok(())
            };
            async move { answer }
        })
        .await;
        assert!(result.is_ok());
        assert_eq!(attempts, 3);

        let mut attempts = 0;
        let result = retry_until(deadline, |_| {
            attempts += 1;
            async { Err(Status::failed_precondition("older epoch")) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), tonic::Code::FailedPrecondition);
        assert_eq!(attempts, 1);
    }

    #[test]
    fn every_call_has_a_deadline_past_the_work_it_asks_for() {
        let secs = |s: u64| prost_types::Duration::try_from(Duration::from_secs(s)).ok();
        let drain = AgentCall::Drain {
            endpoint: "chat".into(),
            request: v1::DrainRequest {
                coordinator_epoch: 1,
                deadline: secs(600),
            },
        };
        assert_eq!(drain.deadline(), Duration::from_secs(600) + CALL_MARGIN);
        let apply = AgentCall::Apply {
            endpoint: "chat".into(),
            request: Box::new(v1::ApplyRequest {
                coordinator_epoch: 1,
                spec: Some(v1::EngineSpec {
                    ready_timeout: secs(1800),
                    ..Default::default()
                }),
                drain_timeout: secs(600),
            }),
        };
        assert_eq!(apply.deadline(), Duration::from_secs(1800) + CALL_MARGIN);
        let stop = AgentCall::Stop {
            endpoint: None,
            request: v1::StopRequest {
                coordinator_epoch: 1,
                grace: None,
            },
        };
        assert_eq!(stop.deadline(), CALL_MARGIN * 2);
    }
}
