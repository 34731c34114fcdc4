//! What the rest of the coordinator sees of the actor: the requests it
//! takes, the view it publishes, and the handle that holds both.

use super::*;

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
    /// A router holds requests for an endpoint with no replica: whether
    /// that starts one.
    ReportDemand(v1::ReportDemandRequest, Reply<bool>),
}

impl Request {
    /// Answers it with `error` instead of acting on it.
    pub fn refuse(self, error: CoordinatorError) {
        fn send<T>(reply: Reply<T>, error: CoordinatorError) {
            let _ = reply.send(Err(error));
        }
        match self {
            Self::CreateEndpoint(_, r)
            | Self::UpdateScaling(_, r)
            | Self::UpdatePromotionSettings(_, r)
            | Self::UpdateWorkerSelector(_, r)
            | Self::UpdateAliases(_, r)
            | Self::Control(_, _, r)
            | Self::AddWorker(_, r)
            | Self::RemoveWorker(_, r)
            | Self::Cordon(_, _, _, r)
            | Self::AddRouter(_, r)
            | Self::RemoveRouter(_, r) => send(r, error),
            Self::DeleteEndpoint(_, r) => send(r, error),
            Self::Promote(_, r) => send(r, error),
            Self::ReportDemand(_, r) => send(r, error),
        }
    }
}

/// What a worker looks like from here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Its last status, if it ever answered.
    pub status: Option<Arc<v1::WorkerStatus>>,
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
    /// The last table it refused, and why: it has not acknowledged that
    /// one, nor any after it, until it accepts one.
    pub refused: Option<(u64, String)>,
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
    /// A handle over a request queue and a view that something other than
    /// the actor serves (a standby's front, [`crate::ha`]).
    pub fn from_parts(requests: mpsc::Sender<Request>, view: watch::Receiver<Arc<View>>) -> Self {
        Self { requests, view }
    }

    /// Hands `request` to this coordinator's actor, or gives it back when
    /// the actor has stopped.
    pub async fn forward(&self, request: Request) -> Result<(), Request> {
        self.requests.send(request).await.map_err(|e| e.0)
    }

    /// Sends a request and waits for its answer.
    pub async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Status> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| CoordinatorError::ShuttingDown)?;
        Ok(answer.await.map_err(|_| CoordinatorError::ShuttingDown)??)
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
