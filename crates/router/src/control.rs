//! The RouterControl gRPC service: the coordinator swaps tables and reads
//! statistics here. Handlers validate and delegate; errors map to gRPC codes
//! in one place ([`status`]).

use std::sync::Arc;
use std::time::SystemTime;

use crossfade_proto::Fence;
use crossfade_proto::tls::{self, Role};
use crossfade_proto::v1::router_control_server::{RouterControl, RouterControlServer};
use crossfade_proto::v1::{self, TableSource};
use tonic::{Request, Response, Status};

use crate::table::{ApplyError, Routes, Source};

/// The service over a router's routes.
#[derive(Debug)]
pub struct Control {
    routes: Arc<Routes>,
    router_id: String,
    /// Calls from an older coordinator are refused.
    fence: Fence,
}

impl Control {
    /// The service; `router_id` names this router in its stats.
    pub fn new(routes: Arc<Routes>, router_id: String) -> Self {
        Self {
            routes,
            router_id,
            fence: Fence::default(),
        }
    }

    /// The tonic server for it.
    pub fn into_server(self) -> RouterControlServer<Self> {
        RouterControlServer::new(self)
    }
}

/// `ApplyError` as a gRPC status.
fn status(error: ApplyError) -> Status {
    match error {
        ApplyError::Invalid(e) => Status::invalid_argument(format!("table: {e}")),
        e @ (ApplyError::Stale { .. } | ApplyError::ManagedByCoordinator { .. }) => {
            Status::failed_precondition(e.to_string())
        }
    }
}

#[tonic::async_trait]
impl RouterControl for Control {
    async fn apply_table(
        &self,
        request: Request<v1::ApplyTableRequest>,
    ) -> Result<Response<v1::ApplyTableResponse>, Status> {
        let request = request.into_inner();
        let table = request
            .table
            .ok_or_else(|| Status::invalid_argument("table: required"))?;
        self.fence.check(request.coordinator_epoch, "router")?;
        let applied = self.routes.apply_from_coordinator(&table).map_err(status)?;
        tracing::info!(
            version = applied.version(),
            ?applied,
            "routing table from the coordinator"
        );
        Ok(Response::new(v1::ApplyTableResponse {
            version_in_force: applied.version(),
        }))
    }

    async fn get_table(
        &self,
        _request: Request<v1::GetTableRequest>,
    ) -> Result<Response<v1::GetTableResponse>, Status> {
        let table = self.routes.load();
        Ok(Response::new(v1::GetTableResponse {
            table: Some(table.to_proto()),
            source: match table.source() {
                Source::Config => TableSource::Config,
                Source::Coordinator => TableSource::Coordinator,
            } as i32,
            applied_at: Some(table.applied_at().into()),
            coordinator_epoch: self.fence.current(),
        }))
    }

    async fn get_stats(
        &self,
        request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        let request = request.into_inner();
        let now = SystemTime::now();
        let since = request
            .since
            .map(SystemTime::try_from)
            .transpose()
            .map_err(|e| Status::invalid_argument(format!("since: not a valid instant ({e})")))?;
        if since.is_some_and(|s| s > now) {
            return Err(Status::invalid_argument("since: must not be in the future"));
        }
        let table = self.routes.load();
        let endpoint = (!request.endpoint.is_empty()).then_some(request.endpoint.as_str());
        if let Some(name) = endpoint
            && table.endpoint(name).is_none()
        {
            return Err(Status::not_found(format!(
                "endpoint: `{name}` is not in the table"
            )));
        }
        let stats = self.routes.stats();
        let window_start = stats.window_start(since);
        Ok(Response::new(v1::GetStatsResponse {
            router_id: self.router_id.clone(),
            since: Some(window_start.into()),
            until: Some(now.into()),
            endpoints: stats.report(&table, window_start, endpoint),
            table_version: table.version(),
        }))
    }
}

/// Who may call RouterControl: the coordinator; an operator may also read.
pub fn policy(path: &str) -> &'static [Role] {
    match path.strip_prefix("/crossfade.v1.RouterControl/") {
        Some("GetTable" | "GetStats") => &[Role::Coordinator, Role::Operator],
        _ => &[Role::Coordinator],
    }
}

/// Serves RouterControl, gRPC health and reflection on `listener` until
/// `shutdown` triggers.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: Arc<Routes>,
    router_id: String,
    tls: tls::Control,
    shutdown: crossfade_common::Shutdown,
) -> anyhow::Result<()> {
    crossfade_proto::server::serve(
        listener,
        Control::new(routes, router_id).into_server(),
        &tls,
        policy,
        async move { shutdown.triggered().await },
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}
