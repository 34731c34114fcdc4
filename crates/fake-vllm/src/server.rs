//! The HTTP server: accepting connections, serving them with hyper
//! (HTTP/1.1 and HTTP/2), and shutting down the way vLLM does.
//!
//! Every task the server starts (connections, HTTP/2 streams) lives in one
//! [`TaskTracker`], so shutdown can wait for them, and every one of them
//! stops when the abort token is cancelled.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::args::{ArgsError, Config};
use crate::control::Controls;
use crate::engine::{self, Engine};
use crate::faults::{Fault, FaultState};
use crate::metrics::Stats;
use crate::{api, openai};

/// Why the library could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ArgsError),
    #[error("listener I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How a server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Exit {
    /// Asked to shut down (gracefully or not).
    Shutdown,
    /// A `crash-after:N` fault fired: the binary exits with status 1.
    Crashed,
}

impl Exit {
    /// The process exit status vLLM would have.
    pub fn code(self) -> u8 {
        match self {
            Exit::Shutdown => 0,
            Exit::Crashed => 1,
        }
    }
}

/// How to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// vLLM with `--shutdown-timeout`: close the listener, answer new
    /// requests with 503, let in-flight ones finish for up to this long,
    /// then cut the rest.
    Graceful(Duration),
    /// vLLM without it: cut every in-flight request now.
    Abort,
}

/// One served model name with what every reply under it repeats.
#[derive(Debug)]
pub(crate) struct Served {
    pub(crate) name: String,
    /// The name as a JSON string, quotes included.
    pub(crate) name_json: String,
    /// `[MODEL as NAME]`, plain and JSON-escaped.
    pub(crate) tag: String,
    pub(crate) tag_escaped: String,
    /// `None` when the name is not a legal header value.
    pub(crate) name_header: Option<HeaderValue>,
}

/// State every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) served: Vec<Served>,
    pub(crate) model_header: Option<HeaderValue>,
    pub(crate) engine: Engine,
    pub(crate) faults: FaultState,
    pub(crate) models_body: Bytes,
    ids: AtomicU64,
    id_nonce: u64,
    /// Cancelled to stop accepting and drain; a child of `abort`.
    pub(crate) drain: CancellationToken,
    /// Cancelled to cut everything at once.
    pub(crate) abort: CancellationToken,
    grace: Mutex<Duration>,
    crashed: AtomicBool,
}

impl Shared {
    pub(crate) fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:016x}{n:016x}", self.id_nonce)
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        match how {
            Shutdown::Graceful(grace) => {
                if !self.drain.is_cancelled() {
                    *self
                        .grace
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = grace;
                    self.drain.cancel();
                }
            }
            Shutdown::Abort => self.abort.cancel(),
        }
    }

    /// The engine died (`crash-after:N`): everything stops now.
    pub(crate) fn crash(&self) {
        if !self.crashed.swap(true, Ordering::AcqRel) {
            error!(
                fault = %self.faults.get(),
                "EngineCore encountered a fatal error (fake-vllm fault); engine dead"
            );
        }
        self.abort.cancel();
    }

    pub(crate) fn stats(&self) -> Stats {
        self.engine.metrics.stats()
    }
}

/// `GET /v1/models`, in vLLM's field order.
fn models_body(config: &Config, created: u64) -> Bytes {
    #[derive(serde::Serialize)]
    struct Model<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'static str,
        root: &'a str,
        parent: Option<&'a str>,
        max_model_len: u64,
    }
    #[derive(serde::Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Model<'a>>,
    }
    let data = config
        .served_model_names
        .iter()
        .map(|name| Model {
            id: name,
            object: "model",
            created,
            owned_by: "vllm",
            root: &config.model,
            parent: None,
            max_model_len: config.max_model_len,
        })
        .collect();
    let list = List {
        object: "list",
        data,
    };
    Bytes::from(serde_json::to_vec(&list).expect("the model list always serializes"))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fake vLLM, configured and ready to serve on a listener.
#[derive(Debug)]
pub struct FakeVllm {
    shared: Arc<Shared>,
}

impl FakeVllm {
    pub fn new(config: Config) -> Result<Self, ServeError> {
        config.validate()?;
        let created = unix_now();
        let served = config
            .served_model_names
            .iter()
            .map(|name| {
                let tag = engine::tag(&config.model, name);
                Served {
                    name: name.clone(),
                    name_json: serde_json::to_string(name).expect("a string always serializes"),
                    tag_escaped: openai::json_escape(&tag),
                    tag,
                    name_header: HeaderValue::from_str(name).ok(),
                }
            })
            .collect();
        let models_body = models_body(&config, created);
        let abort = CancellationToken::new();
        let id_nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            .rotate_left(17);
        let shared = Shared {
            served,
            model_header: HeaderValue::from_str(&config.model).ok(),
            engine: Engine::new(config.max_num_seqs, config.token_period(), config.ttft),
            faults: FaultState::new(config.fault),
            models_body,
            ids: AtomicU64::new(0),
            id_nonce,
            drain: abort.child_token(),
            abort,
            grace: Mutex::new(Duration::ZERO),
            crashed: AtomicBool::new(false),
            config,
        };
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// A handle on this server's test controls, usable before and while it
    /// serves.
    pub fn controls(&self) -> Controls {
        Controls::new(self.shared.clone())
    }

    /// Serves until shut down through [`Controls::shutdown`] or killed by a
    /// crash fault, and returns once every connection is gone.
    pub async fn serve(self, listener: TcpListener) -> Result<Exit, ServeError> {
        let shared = self.shared;
        let addr = listener.local_addr()?;
        info!("Starting vLLM API server on http://{addr}");
        let tracker = TaskTracker::new();
        let builder = Arc::new(auto::Builder::new(TrackedExecutor {
            tracker: tracker.clone(),
            abort: shared.abort.clone(),
        }));
        info!("Application startup complete.");

        loop {
            tokio::select! {
                biased;
                () = shared.drain.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        debug!(%peer, "connection accepted");
                        tracker.spawn(connection(shared.clone(), builder.clone(), stream));
                    }
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        }
        // Closing the port first is what makes new clients fail fast.
        drop(listener);
        tracker.close();

        if !shared.abort.is_cancelled() {
            let grace = *shared
                .grace
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let s = shared.stats();
            info!(
                "Shutting down gracefully: port closed, waiting up to {} for {} running and {} waiting requests",
                humantime::format_duration(grace),
                s.running,
                s.waiting
            );
            tokio::select! {
                () = tracker.wait() => {}
                () = tokio::time::sleep(grace) => {
                    let s = shared.stats();
                    warn!(
                        "Shutdown timeout reached: aborting {} running and {} waiting requests",
                        s.running, s.waiting
                    );
                    shared.abort.cancel();
                }
                () = shared.abort.cancelled() => {}
            }
        }
        let crashed = shared.crashed.load(Ordering::Acquire);
        if shared.abort.is_cancelled() && !crashed {
            let s = shared.stats();
            info!(
                "Shutting down: aborting {} running and {} waiting requests",
                s.running, s.waiting
            );
        }
        tracker.wait().await;
        info!("Server stopped");
        Ok(if crashed {
            Exit::Crashed
        } else {
            Exit::Shutdown
        })
    }
}

/// Spawns HTTP/2 stream tasks into the server's tracker, cut on abort.
#[derive(Clone)]
struct TrackedExecutor {
    tracker: TaskTracker,
    abort: CancellationToken,
}

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let abort = self.abort.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = abort.cancelled() => {}
                () = fut => {}
            }
        });
    }
}

async fn connection(
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TrackedExecutor>>,
    stream: TcpStream,
) {
    // Tokens are small writes that must leave at once.
    let _ = stream.set_nodelay(true);
    let service = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(api::handle(shared, req).await) }
        })
    };
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service));
    tokio::select! {
        biased;
        () = shared.abort.cancelled() => return,
        done = conn.as_mut() => {
            if let Err(e) = done {
                debug!("connection ended with an error: {e}");
            }
            return;
        }
        () = shared.drain.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        biased;
        () = shared.abort.cancelled() => {}
        done = conn => {
            if let Err(e) = done {
                debug!("connection ended with an error while draining: {e}");
            }
        }
    }
}

/// A fake vLLM running on its own task, for in-process tests.
///
/// Dropping the handle aborts the server (without waiting for it).
#[derive(Debug)]
pub struct Handle {
    addr: SocketAddr,
    controls: Controls,
    task: Option<JoinHandle<Result<Exit, ServeError>>>,
}

impl Handle {
    /// Serves on an already-bound listener. Must be called within a Tokio
    /// runtime.
    pub fn spawn(config: Config, listener: TcpListener) -> Result<Self, ServeError> {
        let addr = listener.local_addr()?;
        let fake = FakeVllm::new(config)?;
        let controls = fake.controls();
        let task = tokio::spawn(fake.serve(listener));
        Ok(Self {
            addr,
            controls,
            task: Some(task),
        })
    }

    /// [`Handle::spawn`] for a `std` listener (made non-blocking here).
    pub fn spawn_std(config: Config, listener: std::net::TcpListener) -> Result<Self, ServeError> {
        listener.set_nonblocking(true)?;
        Self::spawn(config, TcpListener::from_std(listener)?)
    }

    /// Binds `config.host:config.port` (port 0 picks a free one) and serves.
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        let listener = TcpListener::bind((config.host.as_str(), config.port)).await?;
        Self::spawn(config, listener)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn controls(&self) -> &Controls {
        &self.controls
    }

    /// See [`Controls::hold`].
    pub fn hold(&self) {
        self.controls.hold();
    }

    /// See [`Controls::release`].
    pub fn release(&self) {
        self.controls.release();
    }

    /// See [`Controls::set_fault`].
    pub fn set_fault(&self, fault: Fault) {
        self.controls.set_fault(fault);
    }

    pub fn stats(&self) -> Stats {
        self.controls.stats()
    }

    /// Shuts down as vLLM with `--shutdown-timeout` does and waits.
    pub async fn shutdown_graceful(self, timeout: Duration) -> Result<Exit, ServeError> {
        self.controls.shutdown(Shutdown::Graceful(timeout));
        self.wait().await
    }

    /// Cuts every connection and waits for the server to stop.
    pub async fn abort(self) -> Result<Exit, ServeError> {
        self.controls.shutdown(Shutdown::Abort);
        self.wait().await
    }

    /// Waits for the server to stop (after a shutdown or a crash fault).
    pub async fn wait(mut self) -> Result<Exit, ServeError> {
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(Exit::Shutdown),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.controls.shutdown(Shutdown::Abort);
        }
    }
}
