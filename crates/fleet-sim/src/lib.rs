//! A simulated fleet: thousands of agents in one process, each on its own
//! loopback address (127.0.0.0/8 has room), serving the real Agent gRPC API
//! and, on the same address, a gate that answers OpenAI requests while its
//! engine is ready. Engines load (for `load_time`), serve, drain (for
//! `drain_time`), stop, and crash on command (`POST /sim/crash` on a
//! worker's address, or every engine of `fail_model` once loaded).
//!
//! For the coordinator's scale tests and `crossfade-scale-bench`: what the
//! coordinator sees is what real agents send (statuses on every change and
//! every heartbeat, fencing by epoch), without a process per worker.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use crossfade_common::Shutdown;
use crossfade_proto::server::Fence;
use crossfade_proto::v1::{self, EngineState, agent_server::AgentServer};
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::{Request, Response, Status};
use tower_like::call;

/// How the simulated fleet behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How many workers.
    pub workers: usize,
    /// The first worker's address; each next one is the next IPv4 address.
    pub first: Ipv4Addr,
    /// The port every worker listens on (control and gate).
    pub port: u16,
    /// Time an engine takes from `Apply` to ready.
    pub load_time: Duration,
    /// Time a drain takes.
    pub drain_time: Duration,
    /// Engines of this model fail once loaded.
    pub fail_model: Option<String>,
}

/// A running simulated fleet; stops when dropped (or, waiting for every
/// task it started, with [`Fleet::stop`]).
pub struct Fleet {
    workers: Vec<Arc<Worker>>,
    /// Every task of the fleet: listeners, connections, status watches,
    /// engine loads.
    shutdown: Shutdown,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

impl Fleet {
    /// Stops every worker and waits up to `grace` for its tasks to end;
    /// false when some were still running.
    pub async fn stop(self, grace: Duration) -> bool {
        self.shutdown.trigger();
        self.shutdown.wait_for_tasks(grace).await
    }

    /// Each worker's address (control and gate), in order.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.workers.iter().map(|w| w.address).collect()
    }

    /// Makes worker `index`'s engine fail now.
    pub fn crash(&self, index: usize) {
        if let Some(worker) = self.workers.get(index) {
            worker.crash();
        }
    }

    /// How many engines are in each state.
    pub fn census(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut census = std::collections::BTreeMap::new();
        for worker in &self.workers {
            let state = worker.engine.lock().map(|e| e.state).unwrap_or_default();
            *census.entry(state.as_str_name()).or_default() += 1;
        }
        census
    }
}

/// The address of worker `index`.
pub fn address(first: Ipv4Addr, port: u16, index: usize) -> SocketAddr {
    let ip = u32::from(first).saturating_add(u32::try_from(index).unwrap_or(u32::MAX));
    SocketAddr::from((Ipv4Addr::from(ip), port))
}

/// Binds every worker's address and serves them all.
pub async fn start(settings: Settings) -> anyhow::Result<Fleet> {
    let settings = Arc::new(settings);
    let shutdown = Shutdown::new();
    let mut workers = Vec::with_capacity(settings.workers);
    for index in 0..settings.workers {
        let address = address(settings.first, settings.port, index);
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("binding worker {index} on {address}: {e}"))?;
        let (changed, _) = watch::channel(0);
        let worker = Arc::new(Worker {
            index,
            address,
            settings: Arc::clone(&settings),
            engine: Mutex::new(Engine {
                state: EngineState::Stopped,
                ..Engine::default()
            }),
            changed,
            fence: Fence::default(),
            shutdown: shutdown.clone(),
        });
        shutdown.spawn(accept(listener, Arc::clone(&worker)));
        workers.push(worker);
    }
    Ok(Fleet { workers, shutdown })
}

async fn accept(listener: TcpListener, worker: Arc<Worker>) {
    let shutdown = worker.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            () = shutdown.triggered() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let worker = Arc::clone(&worker);
        let stop = shutdown.clone();
        shutdown.spawn(async move {
            let service = service_fn(move |request| handle(Arc::clone(&worker), request));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                () = stop.triggered() => {}
                _ = connection => {}
            }
        });
    }
}

/// gRPC to the Agent service, anything else to the gate.
async fn handle(
    worker: Arc<Worker>,
    request: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Body>, Infallible> {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        let service = AgentServer::new(Agent(worker));
        return call(service, request.map(Body::new)).await;
    }
    Ok(gate(&worker, request).await)
}

/// Calling a tower service without the tower crate.
mod tower_like {
    use std::convert::Infallible;
    use std::future::poll_fn;

    use tonic::body::Body;
    use tonic::codegen::Service;

    pub async fn call<S>(
        mut service: S,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, Infallible>
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    {
        poll_fn(|cx| service.poll_ready(cx)).await?;
        service.call(request).await
    }
}

async fn gate(
    worker: &Worker,
    request: http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    let path = request.uri().path().to_owned();
    let (state, endpoint) = {
        let engine = worker.engine();
        (engine.state, engine.endpoint.clone())
    };
    if path == "/sim/crash" {
        worker.crash();
        return reply(http::StatusCode::OK, "text/plain", "crashed\n".into());
    }
    if state != EngineState::Ready {
        return reply(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            r#"{"error":{"message":"the engine is not ready","type":"unavailable"}}"#.into(),
        );
    }
    match path.as_str() {
        "/v1/models" => reply(
            http::StatusCode::OK,
            "application/json",
            serde_json::json!({"object": "list", "data": [
                {"id": endpoint, "object": "model", "owned_by": "fleet-sim", "max_model_len": 4096}
            ]})
            .to_string(),
        ),
        "/v1/chat/completions" | "/v1/completions" => {
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let stream = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
                .unwrap_or(false);
            let text = format!("[{endpoint} on {}]", worker.address);
            if stream {
                let chunk = serde_json::json!({"object": "chat.completion.chunk", "model": endpoint,
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]});
                reply(
                    http::StatusCode::OK,
                    "text/event-stream",
                    format!("data: {chunk}\n\ndata: [DONE]\n\n"),
                )
            } else {
                reply(
                    http::StatusCode::OK,
                    "application/json",
                    serde_json::json!({"object": "chat.completion", "model": endpoint,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
                    .to_string(),
                )
            }
        }
        _ => reply(
            http::StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".into(),
        ),
    }
}

fn reply(status: http::StatusCode, content_type: &str, body: String) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

#[derive(Debug, Clone, Default)]
struct Engine {
    state: EngineState,
    deployment: String,
    endpoint: String,
    model: String,
    since: Option<SystemTime>,
    /// Bumped at every change; a load that finishes after another change
    /// does nothing.
    generation: u64,
}

struct Worker {
    index: usize,
    address: SocketAddr,
    settings: Arc<Settings>,
    engine: Mutex<Engine>,
    /// The revision, bumped on every change, for status watchers.
    changed: watch::Sender<u64>,
    fence: Fence,
    /// The fleet's: its tasks are the fleet's to wait for.
    shutdown: Shutdown,
}

impl Worker {
    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the engine, then tells the watchers.
    fn change(&self, f: impl FnOnce(&mut Engine)) {
        {
            let mut engine = self.engine();
            f(&mut engine);
            engine.generation += 1;
            engine.since = Some(SystemTime::now());
        }
        self.changed.send_modify(|r| *r += 1);
    }

    fn crash(&self) {
        self.change(|e| {
            if e.state != EngineState::Stopped {
                e.state = EngineState::Failed;
            }
        });
    }

    fn status(&self) -> v1::WorkerStatus {
        let engine = self.engine().clone();
        v1::WorkerStatus {
            worker_id: format!("sim-{}", self.index),
            labels: [("fleet".to_owned(), "simulated".to_owned())].into(),
            gate_address: self.address.to_string(),
            agent_version: concat!("fleet-sim ", env!("CARGO_PKG_VERSION")).into(),
            engine: Some(v1::EngineStatus {
                state: engine.state as i32,
                deployment_id: engine.deployment,
                state_since: engine.since.map(prost_types::Timestamp::from),
                engine_port: u32::from(self.address.port()),
                max_model_len: 4096,
                failure_reason: if engine.state == EngineState::Failed {
                    "simulated crash".into()
                } else {
                    String::new()
                },
                ..Default::default()
            }),
            in_flight: Some(v1::InFlight::default()),
            gpus: vec![v1::GpuDevice {
                index: 0,
                name: "Simulated GPU".into(),
                memory_total_bytes: 80 << 30,
                ..Default::default()
            }],
            gpu_health: v1::GpuHealth::Healthy as i32,
            gpu_probe: "simulated".into(),
            observed_at: Some(SystemTime::now().into()),
            revision: *self.changed.borrow(),
            coordinator_epoch: self.fence.current(),
            ..Default::default()
        }
    }
}

/// The Agent gRPC API of one simulated worker.
struct Agent(Arc<Worker>);

type StatusStream = Pin<Box<dyn Stream<Item = Result<v1::WorkerStatus, Status>> + Send>>;

#[tonic::async_trait]
impl v1::agent_server::Agent for Agent {
    type WatchStatusStream = StatusStream;

    async fn get_status(
        &self,
        _: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::WorkerStatus>, Status> {
        Ok(Response::new(self.0.status()))
    }

    async fn watch_status(
        &self,
        request: Request<v1::WatchStatusRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        let heartbeat = request
            .into_inner()
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(2))
            .clamp(Duration::from_millis(100), Duration::from_secs(3600));
        let worker = Arc::clone(&self.0);
        let (tx, rx) = mpsc::channel(2);
        let shutdown = worker.shutdown.clone();
        shutdown.clone().spawn(async move {
            let mut changes = worker.changed.subscribe();
            loop {
                if tx.send(Ok(worker.status())).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = shutdown.triggered() => return,
                    () = tx.closed() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(heartbeat) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let request = request.into_inner();
        self.0
            .fence
            .check(request.coordinator_epoch, "simulated agent")?;
        let spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        let worker = &self.0;
        let already = {
            let engine = worker.engine();
            engine.deployment == spec.deployment_id
                && matches!(engine.state, EngineState::Starting | EngineState::Ready)
        };
        if !already {
            let model = spec
                .template
                .as_ref()
                .map(|t| t.model.clone())
                .unwrap_or_default();
            worker.change(|e| {
                e.state = EngineState::Starting;
                e.deployment.clone_from(&spec.deployment_id);
                e.endpoint.clone_from(&spec.endpoint);
                e.model = model;
            });
            let generation = worker.engine().generation;
            let loading = Arc::clone(worker);
            worker.shutdown.spawn(async move {
                let worker = loading;
                tokio::select! {
                    () = worker.shutdown.triggered() => return,
                    () = tokio::time::sleep(worker.settings.load_time) => {}
                }
                let fails = {
                    let engine = worker.engine();
                    if engine.generation != generation {
                        return;
                    }
                    worker.settings.fail_model.as_deref() == Some(engine.model.as_str())
                };
                worker.change(|e| {
                    e.state = if fails {
                        EngineState::Failed
                    } else {
                        EngineState::Ready
                    };
                });
            });
        }
        Ok(Response::new(v1::ApplyResponse {
            already_applied: already,
            status: Some(worker.status()),
        }))
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        self.0
            .fence
            .check(request.into_inner().coordinator_epoch, "simulated agent")?;
        self.0.change(|e| {
            if e.state == EngineState::Ready {
                e.state = EngineState::Draining;
            }
        });
        tokio::time::sleep(self.0.settings.drain_time).await;
        Ok(Response::new(v1::DrainResponse {
            drained: true,
            still_in_flight: 0,
            waited: self.0.settings.drain_time.try_into().ok(),
            status: Some(self.0.status()),
        }))
    }

    async fn undrain(
        &self,
        request: Request<v1::UndrainRequest>,
    ) -> Result<Response<v1::UndrainResponse>, Status> {
        self.0
            .fence
            .check(request.into_inner().coordinator_epoch, "simulated agent")?;
        self.0.change(|e| {
            if e.state == EngineState::Draining {
                e.state = EngineState::Ready;
            }
        });
        Ok(Response::new(v1::UndrainResponse {
            status: Some(self.0.status()),
        }))
    }

    async fn stop(
        &self,
        request: Request<v1::StopRequest>,
    ) -> Result<Response<v1::StopResponse>, Status> {
        self.0
            .fence
            .check(request.into_inner().coordinator_epoch, "simulated agent")?;
        self.0.change(|e| {
            e.state = EngineState::Stopped;
            e.deployment.clear();
            e.endpoint.clear();
            e.model.clear();
        });
        Ok(Response::new(v1::StopResponse {
            still_in_flight: 0,
            exit_code: Some(0),
            status: Some(self.0.status()),
        }))
    }
}
