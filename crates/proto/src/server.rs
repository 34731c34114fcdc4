//! What every crossfade gRPC server shares: fencing of older coordinators,
//! and serving a service beside the standard health and reflection
//! services.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::tls::{AuthorizeLayer, Control, Policy};

/// The highest coordinator epoch a program obeys: a mutating call from an
/// older coordinator (one that lost its leadership) is refused.
#[derive(Debug, Default)]
pub struct Fence(AtomicU64);

impl Fence {
    /// Refuses `epoch` when it is older than one already obeyed (0 is
    /// unfenced: an operator's tool), and remembers a newer one. `who`
    /// names the program in the error.
    pub fn check(&self, epoch: u64, who: &str) -> Result<(), Status> {
        if epoch == 0 {
            return Ok(());
        }
        let seen = self.0.fetch_max(epoch, Ordering::AcqRel);
        if epoch < seen {
            return Err(Status::failed_precondition(format!(
                "coordinator_epoch {epoch} is older than {seen}, which this {who} already obeys"
            )));
        }
        Ok(())
    }

    /// The highest epoch obeyed (0: none yet).
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// Serves `service`, the gRPC health service (reporting it as serving) and
/// reflection on `listener` until `shutdown` resolves: with mutual TLS,
/// each call only from the roles `policy` allows (see [`crate::tls`]).
pub async fn serve<S>(
    listener: tokio::net::TcpListener,
    service: S,
    control: &Control,
    policy: Policy,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(S::NAME, tonic_health::ServingStatus::Serving)
        .await;
    let (reflection, reflection_v1alpha) = crate::reflection_services(S::NAME)?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = control.server() {
        server = server.tls_config(tls)?;
    }
    let authorize = (!control.is_insecure()).then_some(policy);
    server
        .layer(AuthorizeLayer(authorize))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_older_epoch_is_refused_and_zero_is_unfenced() {
        let fence = Fence::default();
        assert!(fence.check(3, "agent").is_ok());
        assert!(fence.check(0, "agent").is_ok());
        assert!(fence.check(3, "agent").is_ok());
        let refused = fence.check(2, "agent").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            refused.message(),
            "coordinator_epoch 2 is older than 3, which this agent already obeys"
        );
        assert_eq!(fence.current(), 3);
    }
}
