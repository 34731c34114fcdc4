//! The Coordinator gRPC service: reads come from the actor's published view,
//! changes go to the actor.

use std::pin::Pin;
use std::sync::Arc;

use crossfade_common::Shutdown;
use crossfade_proto::tls::{self, Role};
use crossfade_proto::v1;
use crossfade_proto::v1::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::actor::{Coordinator, Request as Ask, View, current_rollout};
use crate::rollout::{self, Command, Phase, Rollout};
use crate::state::{Endpoint, Promotion, timestamp};

/// Events returned when a request does not say how many.
const DEFAULT_EVENTS: usize = 50;

/// The service.
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    coordinator: Coordinator,
    shutdown: Shutdown,
}

impl CoordinatorService {
    /// The service over the actor's handle.
    pub fn new(coordinator: Coordinator, shutdown: Shutdown) -> Self {
        Self {
            coordinator,
            shutdown,
        }
    }

    /// The tonic server for it.
    pub fn into_server(self) -> CoordinatorServer<Self> {
        CoordinatorServer::new(self)
    }

    fn endpoint(&self, name: &str, events: u32) -> Result<v1::Endpoint, Status> {
        let view = self.coordinator.view();
        let endpoint = view
            .state
            .endpoints
            .get(name)
            .ok_or_else(|| Status::not_found(format!("name: no endpoint `{name}`")))?;
        Ok(endpoint_proto(&view, endpoint, events_limit(events)))
    }
}

fn events_limit(requested: u32) -> usize {
    if requested == 0 {
        DEFAULT_EVENTS
    } else {
        usize::try_from(requested).unwrap_or(usize::MAX)
    }
}

/// An endpoint in its wire form, with its last `events` events.
pub fn endpoint_proto(view: &View, endpoint: &Endpoint, events: usize) -> v1::Endpoint {
    let deployment = |id: &Option<String>| {
        id.as_ref()
            .and_then(|id| view.state.deployments.get(id))
            .map(crate::state::Deployment::to_proto)
    };
    let rollout = current_rollout(endpoint);
    let mut replicas = Vec::new();
    if let Some(rollout) = rollout {
        for id in [&rollout.from, &rollout.to] {
            if !id.is_empty()
                && !replicas
                    .iter()
                    .any(|r: &v1::ReplicaCounts| &r.deployment_id == id)
            {
                replicas.push(replica_counts(rollout, id));
            }
        }
    }
    let skip = endpoint.events.len().saturating_sub(events);
    v1::Endpoint {
        name: endpoint.name.clone(),
        aliases: endpoint.aliases.clone(),
        scaling: Some(endpoint.scaling.to_proto()),
        promotion_settings: Some(endpoint.settings.to_proto()),
        selector: Some(endpoint.selector.to_proto()),
        active_deployment: deployment(&endpoint.active),
        candidate_deployment: deployment(&endpoint.candidate),
        in_progress_promotion: endpoint
            .promotion
            .as_ref()
            .map(|p| promotion_proto(&endpoint.name, p)),
        last_promotion: endpoint
            .last_promotion
            .as_ref()
            .map(|p| promotion_proto(&endpoint.name, p)),
        replicas,
        desired_replicas: rollout.map_or(endpoint.scaling.min_replicas, |r| r.target),
        events: endpoint
            .events
            .iter()
            .skip(skip)
            .map(|e| v1::Event {
                at: Some(timestamp(e.at_ms)),
                kind: e.kind.clone(),
                message: e.message.clone(),
                promotion_id: e.promotion_id.clone(),
                deployment_id: String::new(),
                worker_id: String::new(),
                sequence: e.sequence,
            })
            .collect(),
        created_at: Some(timestamp(endpoint.created_at_ms)),
        updated_at: Some(timestamp(endpoint.updated_at_ms)),
    }
}

fn replica_counts(rollout: &Rollout, deployment: &str) -> v1::ReplicaCounts {
    let (ready, starting, draining) = rollout.replicas(deployment);
    v1::ReplicaCounts {
        deployment_id: deployment.to_owned(),
        ready,
        starting,
        draining,
        failed: 0,
    }
}

/// A promotion in its wire form.
pub fn promotion_proto(endpoint: &str, promotion: &Promotion) -> v1::Promotion {
    let r = &promotion.rollout;
    let step = r.settings.step_size(r.target).max(1);
    v1::Promotion {
        id: promotion.id.clone(),
        endpoint: endpoint.to_owned(),
        from_deployment_id: r.from.clone(),
        to_deployment_id: r.to.clone(),
        status: match r.status {
            rollout::Status::Releasing => v1::PromotionStatus::Releasing,
            rollout::Status::RampingUp => v1::PromotionStatus::RampingUp,
            rollout::Status::Paused => v1::PromotionStatus::Paused,
            rollout::Status::RampingDown => v1::PromotionStatus::RampingDown,
            rollout::Status::Succeeded => v1::PromotionStatus::Succeeded,
            rollout::Status::Failed => v1::PromotionStatus::Failed,
            rollout::Status::Canceled => v1::PromotionStatus::Canceled,
        } as i32,
        percent_traffic_to_new_version: r.percent_to_candidate(),
        candidate_weight_basis_points: r.candidate_weight(),
        replica_target: r.target,
        replicas: [&r.from, &r.to]
            .into_iter()
            .filter(|d| !d.is_empty())
            .map(|d| replica_counts(r, d))
            .collect(),
        current_step: r.step,
        // In-place updates with no idle worker can take more steps than planned.
        total_steps: r.target.div_ceil(step).max(1).max(r.step),
        step_phase: match r.phase {
            Phase::StartingReplicas => v1::StepPhase::StartingReplicas,
            Phase::WaitingReady => v1::StepPhase::WaitingReady,
            Phase::ShiftingTraffic => v1::StepPhase::ShiftingTraffic,
            Phase::Draining => v1::StepPhase::Draining,
            Phase::Stopping => v1::StepPhase::Stopping,
            Phase::Stabilizing => v1::StepPhase::Stabilizing,
            Phase::Judging => v1::StepPhase::Judging,
        } as i32,
        reason: if r.reason.is_empty() {
            r.waiting.clone()
        } else {
            r.reason.clone()
        },
        settings: Some(r.settings.to_proto()),
        started_at: Some(timestamp(promotion.started_at_ms)),
        updated_at: Some(timestamp(promotion.updated_at_ms)),
        finished_at: promotion.finished_at_ms.map(timestamp),
        forced: promotion.forced,
        rollback: promotion.rollback,
        stabilization_ends_at: r.stabilizing_until().map(timestamp),
        split_history: promotion
            .splits
            .iter()
            .map(|p| v1::SplitPoint {
                at: Some(timestamp(p.at_ms)),
                percent_traffic_to_new_version: p.candidate_weight / 100,
                candidate_weight_basis_points: p.candidate_weight,
            })
            .collect(),
    }
}

fn worker_proto(view: &View, address: &str) -> v1::Worker {
    let record = view.state.workers.get(address).cloned().unwrap_or_default();
    let observed = view.workers.get(address).cloned().unwrap_or_default();
    let status = observed.status.clone();
    let assignment = view.state.endpoints.values().find_map(|e| {
        current_rollout(e)
            .filter(|r| r.claimed().contains(address))
            .map(|r| {
                (
                    e.name.clone(),
                    r.routed.get(address).cloned().unwrap_or_default(),
                )
            })
    });
    v1::Worker {
        id: status
            .as_ref()
            .map(|s| s.worker_id.clone())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| address.to_owned()),
        control_address: address.to_owned(),
        status: status.map(Arc::unwrap_or_clone),
        reachable: observed.reachable,
        last_seen: observed.last_seen.map(Into::into),
        cordoned: record.cordoned,
        cordon_reason: record.cordon_reason,
        assigned_endpoint: assignment.as_ref().map(|a| a.0.clone()).unwrap_or_default(),
        assigned_deployment_id: assignment.map(|a| a.1).unwrap_or_default(),
    }
}

/// A worker named by its id or its control address.
fn resolve_worker(view: &View, id: &str) -> Result<String, Status> {
    if view.state.workers.contains_key(id) {
        return Ok(id.to_owned());
    }
    view.workers
        .iter()
        .find(|(_, o)| o.status.as_ref().is_some_and(|s| s.worker_id == id))
        .map(|(address, _)| address.clone())
        .ok_or_else(|| Status::not_found(format!("worker_id: no worker `{id}`")))
}

type EndpointStream = Pin<Box<dyn Stream<Item = Result<v1::Endpoint, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn create_endpoint(
        &self,
        request: Request<v1::CreateEndpointRequest>,
    ) -> Result<Response<v1::Endpoint>, Status> {
        let request = request.into_inner();
        let name = request.name.clone();
        self.coordinator
            .ask(|reply| Ask::CreateEndpoint(request, reply))
            .await?;
        Ok(Response::new(self.endpoint(&name, 0)?))
    }

    async fn get_endpoint(
        &self,
        request: Request<v1::GetEndpointRequest>,
    ) -> Result<Response<v1::Endpoint>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.endpoint(&request.name, request.event_limit)?,
        ))
    }

    async fn list_endpoints(
        &self,
        _request: Request<v1::ListEndpointsRequest>,
    ) -> Result<Response<v1::ListEndpointsResponse>, Status> {
        let view = self.coordinator.view();
        Ok(Response::new(v1::ListEndpointsResponse {
            endpoints: view
                .state
                .endpoints
                .values()
                .map(|e| endpoint_proto(&view, e, 0))
                .collect(),
        }))
    }

    async fn delete_endpoint(
        &self,
        request: Request<v1::DeleteEndpointRequest>,
    ) -> Result<Response<v1::DeleteEndpointResponse>, Status> {
        let request = request.into_inner();
        let answer = self
            .coordinator
            .ask(|reply| Ask::DeleteEndpoint(request, reply))
            .await?;
        Ok(Response::new(answer))
    }

    async fn update_scaling(
        &self,
        request: Request<v1::UpdateScalingRequest>,
    ) -> Result<Response<v1::Endpoint>, Status> {
        let request = request.into_inner();
        let name = request.name.clone();
        self.coordinator
            .ask(|reply| Ask::UpdateScaling(request, reply))
            .await?;
        Ok(Response::new(self.endpoint(&name, 0)?))
    }

    async fn update_promotion_settings(
        &self,
        request: Request<v1::UpdatePromotionSettingsRequest>,
    ) -> Result<Response<v1::Endpoint>, Status> {
        let request = request.into_inner();
        let name = request.name.clone();
        self.coordinator
            .ask(|reply| Ask::UpdatePromotionSettings(request, reply))
            .await?;
        Ok(Response::new(self.endpoint(&name, 0)?))
    }

    async fn update_worker_selector(
        &self,
        request: Request<v1::UpdateWorkerSelectorRequest>,
    ) -> Result<Response<v1::Endpoint>, Status> {
        let request = request.into_inner();
        let name = request.name.clone();
        self.coordinator
            .ask(|reply| Ask::UpdateWorkerSelector(request, reply))
            .await?;
        Ok(Response::new(self.endpoint(&name, 0)?))
    }

    async fn update_aliases(
        &self,
        request: Request<v1::UpdateAliasesRequest>,
    ) -> Result<Response<v1::Endpoint>, Status> {
        let request = request.into_inner();
        let name = request.name.clone();
        self.coordinator
            .ask(|reply| Ask::UpdateAliases(request, reply))
            .await?;
        Ok(Response::new(self.endpoint(&name, 0)?))
    }

    type WatchEndpointStream = EndpointStream;

    async fn watch_endpoint(
        &self,
        request: Request<v1::WatchEndpointRequest>,
    ) -> Result<Response<Self::WatchEndpointStream>, Status> {
        let request = request.into_inner();
        let limit = events_limit(request.event_limit);
        // Fails now if the endpoint does not exist.
        self.endpoint(&request.name, request.event_limit)?;
        let mut views = self.coordinator.subscribe();
        let shutdown = self.shutdown.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut last: Option<v1::Endpoint> = None;
            loop {
                let view: Arc<View> = Arc::clone(&views.borrow_and_update());
                let Some(endpoint) = view.state.endpoints.get(&request.name) else {
                    let _ = sender
                        .send(Err(Status::not_found(format!(
                            "endpoint `{}` was deleted",
                            request.name
                        ))))
                        .await;
                    return;
                };
                let mut current = endpoint_proto(&view, endpoint, limit);
                // `updated_at` moves with every tick: compare without it.
                let mut comparable = current.clone();
                comparable.updated_at = None;
                if let Some(p) = comparable.in_progress_promotion.as_mut() {
                    p.updated_at = None;
                }
                if last.as_ref() != Some(&comparable) {
                    last = Some(comparable);
                    if sender.send(Ok(std::mem::take(&mut current))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = shutdown.triggered() => return,
                    () = sender.closed() => return,
                    changed = views.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn promote(
        &self,
        request: Request<v1::PromoteRequest>,
    ) -> Result<Response<v1::PromoteResponse>, Status> {
        let request = request.into_inner();
        let name = request.endpoint.clone();
        let (promotion_id, deployment_id) = self
            .coordinator
            .ask(|reply| Ask::Promote(request, reply))
            .await?;
        let endpoint = self.endpoint(&name, 0)?;
        let promotion = endpoint
            .in_progress_promotion
            .filter(|p| p.id == promotion_id)
            .or(endpoint.last_promotion.filter(|p| p.id == promotion_id));
        Ok(Response::new(v1::PromoteResponse {
            promotion_id,
            deployment_id,
            promotion,
        }))
    }

    async fn history(
        &self,
        request: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        let request = request.into_inner();
        let view = self.coordinator.view();
        let endpoint = view.state.endpoints.get(&request.endpoint).ok_or_else(|| {
            Status::not_found(format!("endpoint: no endpoint `{}`", request.endpoint))
        })?;
        let limit = events_limit(request.limit);
        let mut deployments: Vec<v1::Deployment> = view
            .state
            .deployments
            .values()
            .filter(|d| d.endpoint == request.endpoint)
            .map(crate::state::Deployment::to_proto)
            .collect();
        deployments.reverse();
        deployments.truncate(limit);
        // Newest first: the one under way, the last, then older ones.
        let promotions = endpoint
            .promotion
            .iter()
            .chain(endpoint.last_promotion.iter())
            .chain(endpoint.past_promotions.iter().rev())
            .take(limit)
            .map(|p| promotion_proto(&endpoint.name, p))
            .collect();
        Ok(Response::new(v1::HistoryResponse {
            deployments,
            promotions,
        }))
    }

    async fn pause_promotion(
        &self,
        request: Request<v1::PromotionControlRequest>,
    ) -> Result<Response<v1::Promotion>, Status> {
        self.control(Command::Pause, request.into_inner()).await
    }

    async fn resume_promotion(
        &self,
        request: Request<v1::PromotionControlRequest>,
    ) -> Result<Response<v1::Promotion>, Status> {
        self.control(Command::Resume, request.into_inner()).await
    }

    async fn cancel_promotion(
        &self,
        request: Request<v1::PromotionControlRequest>,
    ) -> Result<Response<v1::Promotion>, Status> {
        self.control(Command::Cancel, request.into_inner()).await
    }

    async fn force_cancel_promotion(
        &self,
        request: Request<v1::PromotionControlRequest>,
    ) -> Result<Response<v1::Promotion>, Status> {
        self.control(Command::ForceCancel, request.into_inner())
            .await
    }

    async fn force_roll_forward_promotion(
        &self,
        request: Request<v1::PromotionControlRequest>,
    ) -> Result<Response<v1::Promotion>, Status> {
        self.control(Command::ForceRollForward, request.into_inner())
            .await
    }

    async fn list_workers(
        &self,
        request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let request = request.into_inner();
        let view = self.coordinator.view();
        let workers = view
            .state
            .workers
            .keys()
            .map(|address| worker_proto(&view, address))
            .filter(|w| request.endpoint.is_empty() || w.assigned_endpoint == request.endpoint)
            .collect();
        Ok(Response::new(v1::ListWorkersResponse { workers }))
    }

    async fn add_worker(
        &self,
        request: Request<v1::AddWorkerRequest>,
    ) -> Result<Response<v1::Worker>, Status> {
        let address = request.into_inner().control_address;
        let asked = address.clone();
        self.coordinator
            .ask(|reply| Ask::AddWorker(asked, reply))
            .await?;
        Ok(Response::new(worker_proto(
            &self.coordinator.view(),
            &address,
        )))
    }

    async fn remove_worker(
        &self,
        request: Request<v1::RemoveWorkerRequest>,
    ) -> Result<Response<v1::RemoveWorkerResponse>, Status> {
        let address = resolve_worker(&self.coordinator.view(), &request.into_inner().worker_id)?;
        self.coordinator
            .ask(|reply| Ask::RemoveWorker(address, reply))
            .await?;
        Ok(Response::new(v1::RemoveWorkerResponse {
            replica_replaced: false,
        }))
    }

    async fn cordon_worker(
        &self,
        request: Request<v1::CordonWorkerRequest>,
    ) -> Result<Response<v1::Worker>, Status> {
        let request = request.into_inner();
        let address = resolve_worker(&self.coordinator.view(), &request.worker_id)?;
        let asked = address.clone();
        self.coordinator
            .ask(|reply| Ask::Cordon(asked, true, request.reason, reply))
            .await?;
        Ok(Response::new(worker_proto(
            &self.coordinator.view(),
            &address,
        )))
    }

    async fn uncordon_worker(
        &self,
        request: Request<v1::UncordonWorkerRequest>,
    ) -> Result<Response<v1::Worker>, Status> {
        let address = resolve_worker(&self.coordinator.view(), &request.into_inner().worker_id)?;
        let asked = address.clone();
        self.coordinator
            .ask(|reply| Ask::Cordon(asked, false, String::new(), reply))
            .await?;
        Ok(Response::new(worker_proto(
            &self.coordinator.view(),
            &address,
        )))
    }

    async fn list_routers(
        &self,
        _request: Request<v1::ListRoutersRequest>,
    ) -> Result<Response<v1::ListRoutersResponse>, Status> {
        let view = self.coordinator.view();
        let routers = view
            .state
            .routers
            .values()
            .map(|r| {
                let observed = view.routers.get(&r.address).cloned().unwrap_or_default();
                v1::Router {
                    control_address: r.address.clone(),
                    reachable: observed.reachable,
                    acknowledged_version: r.acknowledged_version,
                    last_seen: observed.last_seen.map(Into::into),
                }
            })
            .collect();
        Ok(Response::new(v1::ListRoutersResponse {
            routers,
            table_version: view.state.table_version,
        }))
    }

    async fn add_router(
        &self,
        request: Request<v1::AddRouterRequest>,
    ) -> Result<Response<v1::Router>, Status> {
        let address = request.into_inner().control_address;
        let asked = address.clone();
        self.coordinator
            .ask(|reply| Ask::AddRouter(asked, reply))
            .await?;
        Ok(Response::new(v1::Router {
            control_address: address,
            reachable: false,
            acknowledged_version: 0,
            last_seen: None,
        }))
    }

    async fn report_demand(
        &self,
        request: Request<v1::ReportDemandRequest>,
    ) -> Result<Response<v1::ReportDemandResponse>, Status> {
        let request = request.into_inner();
        let scaling = self
            .coordinator
            .ask(|reply| Ask::ReportDemand(request, reply))
            .await?;
        Ok(Response::new(v1::ReportDemandResponse { scaling }))
    }

    async fn remove_router(
        &self,
        request: Request<v1::RemoveRouterRequest>,
    ) -> Result<Response<v1::RemoveRouterResponse>, Status> {
        let address = request.into_inner().control_address;
        self.coordinator
            .ask(|reply| Ask::RemoveRouter(address, reply))
            .await?;
        Ok(Response::new(v1::RemoveRouterResponse {}))
    }
}

impl CoordinatorService {
    async fn control(
        &self,
        command: Command,
        request: v1::PromotionControlRequest,
    ) -> Result<Response<v1::Promotion>, Status> {
        let name = request.endpoint.clone();
        self.coordinator
            .ask(|reply| Ask::Control(command, request, reply))
            .await?;
        let endpoint = self.endpoint(&name, 0)?;
        endpoint
            .in_progress_promotion
            .or(endpoint.last_promotion)
            .map(Response::new)
            .ok_or_else(|| Status::internal("the promotion vanished"))
    }
}

/// Who may call the Coordinator API: operators; routers only to report
/// demand.
pub fn policy(path: &str) -> &'static [Role] {
    match path {
        "/crossfade.v1.Coordinator/ReportDemand" => &[Role::Router],
        _ => &[Role::Operator],
    }
}

/// Serves the Coordinator service, health and reflection on `listener`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    coordinator: Coordinator,
    tls: &tls::Control,
    shutdown: Shutdown,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let service = CoordinatorService::new(coordinator, shutdown.clone()).into_server();
    crossfade_proto::server::serve(listener, service, tls, policy, async move {
        shutdown.triggered().await;
    })
    .await
}
