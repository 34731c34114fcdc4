//! Demand hints: when an endpoint with no replica gets a request (the first
//! one held, see [`crate::queue`]), the router tells the coordinators at
//! once (`Coordinator.ReportDemand`), so that a scale from zero starts now
//! rather than at the coordinator's next read of the router's stats. That
//! read (every 2 s) stays the fallback: a hint lost, refused or dropped
//! costs seconds, never the request.

use std::time::Duration;

use crossfade_common::Shutdown;
use crossfade_proto::tls::{self, Role};
use crossfade_proto::v1;
use crossfade_proto::v1::coordinator_client::CoordinatorClient;
use futures_util::future::join_all;
use tokio::sync::mpsc;

/// Hints waiting to be sent, at most; more are dropped.
const BACKLOG: usize = 64;
/// The longest one hint may take to be answered, by every coordinator.
const HINT_DEADLINE: Duration = Duration::from_secs(2);

/// Where the queue sends the names of endpoints that need a replica.
pub type Hints = mpsc::Sender<String>;

/// Starts sending hints to the coordinators at `api` (dialled as `control`
/// says, each expected to be a coordinator), as `router_id`; `None` when
/// there are none to tell.
pub fn start(
    api: &[String],
    control: &tls::Control,
    router_id: String,
    shutdown: &Shutdown,
) -> Option<Hints> {
    if api.is_empty() {
        return None;
    }
    let coordinators: Vec<(String, CoordinatorClient<_>)> = api
        .iter()
        .map(|address| {
            let channel = control.dial(address, Role::Coordinator);
            (address.clone(), CoordinatorClient::new(channel))
        })
        .collect();
    let (hints, mut endpoints) = mpsc::channel::<String>(BACKLOG);
    let stop = shutdown.clone();
    shutdown.spawn(async move {
        loop {
            let endpoint = tokio::select! {
                next = endpoints.recv() => match next {
                    Some(endpoint) => endpoint,
                    None => return,
                },
                () = stop.triggered() => return,
            };
            let calls = coordinators.iter().map(|(address, client)| {
                let mut client = client.clone();
                let request = v1::ReportDemandRequest {
                    endpoint: endpoint.clone(),
                    router_id: router_id.clone(),
                };
                async move {
                    match tokio::time::timeout(HINT_DEADLINE, client.report_demand(request)).await {
                        Ok(Ok(answer)) => tracing::debug!(
                            coordinator = address,
                            scaling = answer.into_inner().scaling,
                            "demand reported"
                        ),
                        Ok(Err(status)) => tracing::warn!(
                            coordinator = address,
                            code = ?status.code(),
                            error = status.message(),
                            "a coordinator refused a demand hint"
                        ),
                        Err(_) => tracing::warn!(
                            coordinator = address,
                            deadline = ?HINT_DEADLINE,
                            "a coordinator did not answer a demand hint in time"
                        ),
                    }
                }
            });
            join_all(calls).await;
        }
    });
    Some(hints)
}
