//! The gate: the host's inference port, a hyper proxy to the engine on
//! 127.0.0.1 that counts in-flight requests exactly (from admission until
//! the last byte of the response, or the client going away) and drains them.
//!
//! - Not ready (no engine, or one still starting): every request gets 503
//!   with `x-crossfade-retry: not-ready`, which routers retry elsewhere.
//! - Draining: new requests get 503 with `x-crossfade-retry: draining`, and
//!   kept-alive connections close: HTTP/2 at once with GOAWAY, HTTP/1.1
//!   after its next response, which carries `Connection: close` (closing an
//!   idle HTTP/1.1 connection would race with a request already on its
//!   way). Clients reconnect elsewhere. Requests admitted before keep
//!   streaming.
//! - At a drain's deadline ([`Gate::cut_streams`]), open SSE streams end
//!   with a final `data:` error event, which OpenAI clients raise as an
//!   error, instead of a reset connection.
//!
//! Admission and the count share one lock with the mode, so a drain that
//! sees zero in flight can trust that no request is about to slip in.
//! A request's admission and end wake no one, unless the gate is closed and
//! the count reaches zero (a drain waits for that): watchers of the count
//! (the agent's status reports) hear of it through [`GateNews`], at most
//! once per [`COUNT_NEWS_GAP`], at two atomic operations a request.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use crossfade_common::http::{is_inference_path, strip_hop_by_hop};
use crossfade_common::upstream::{self, Checkout, Connections, PoolSettings};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::metrics as m;

mod news;

use news::CountNews;
pub use news::{COUNT_NEWS_GAP, GateNews};

/// The header that tells a router a refused request may go elsewhere.
pub const RETRY_HEADER: &str = "x-crossfade-retry";

/// How long a request that failed before any answer waits for the
/// supervisor to notice that its engine ended (it polls every 100 ms; a
/// container's end takes a Docker call more).
const ENGINE_END_WAIT: Duration = Duration::from_secs(2);

/// Connections to the engine: made within 2 s, kept 30 s when idle.
const POOL: PoolSettings = PoolSettings {
    connect_timeout: Duration::from_secs(2),
    idle_timeout: Duration::from_secs(30),
};

/// The engine requests go to, as they need it: worked out once per engine
/// (port), not per request.
#[derive(Debug)]
struct Engine {
    port: u16,
    /// `127.0.0.1:port`.
    address: String,
    /// The same, as the `Host` the requests carry.
    host: HeaderValue,
    /// Kept-alive connections to it; requests stream their body.
    connections: Connections<Incoming>,
}

impl Engine {
    fn on(port: u16) -> Self {
        let address = format!("127.0.0.1:{port}");
        Self {
            port,
            // An address and port are always a valid header value.
            host: HeaderValue::from_str(&address)
                .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1")),
            address,
            connections: Connections::default(),
        }
    }
}

/// Whether the gate lets requests through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No engine, or one that is not ready: refuse with `not-ready`.
    NotReady,
    /// Forward to the engine.
    Ready,
    /// Refuse new requests with `draining`; let admitted ones finish.
    Draining,
}

/// The gate's state: one lock for the mode, the count and the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateState {
    /// Whether requests go through.
    pub mode: Mode,
    /// Requests admitted and not yet finished.
    pub in_flight: u32,
    /// The engine's loopback port (0: none).
    pub port: u16,
}

/// The gate's metrics, resolved once: a name and labels looked up per
/// request cost a hash and a registry lock each time.
struct Recorded {
    proxied: metrics::Counter,
    refused_path: metrics::Counter,
    refused_draining: metrics::Counter,
    refused_not_ready: metrics::Counter,
    engine_unreachable: metrics::Counter,
    engine_error: metrics::Counter,
    in_flight: metrics::Gauge,
}

impl Recorded {
    /// Against the recorder installed now (the agent installs its own
    /// before it makes the gate).
    fn new() -> Self {
        let outcome = |o: &'static str| metrics::counter!(m::GATE_REQUESTS_TOTAL, "outcome" => o);
        Self {
            proxied: outcome("proxied"),
            refused_path: outcome("refused_path"),
            refused_draining: outcome("refused_draining"),
            refused_not_ready: outcome("refused_not_ready"),
            engine_unreachable: outcome("engine_unreachable"),
            engine_error: outcome("engine_error"),
            in_flight: metrics::gauge!(m::GATE_IN_FLIGHT),
        }
    }
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recorded")
    }
}

/// The gate. Cheap to share: handlers hold an `Arc`.
#[derive(Debug)]
pub struct Gate {
    /// Notifies on changes of the mode and the port, and on the count
    /// reaching zero while the gate is closed; holds the count always.
    state: watch::Sender<GateState>,
    counts: Arc<CountNews>,
    /// Bumped to close every open connection gracefully.
    close: watch::Sender<u64>,
    /// Cancelled at a drain's deadline to end open SSE streams; replaced
    /// by a fresh token for the streams that follow.
    cut: Mutex<CancellationToken>,
    /// The engine on the port last forwarded to (a new engine, on another
    /// port, starts with no connections).
    engine: Mutex<Arc<Engine>>,
    recorded: Recorded,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    /// A gate with no engine behind it.
    pub fn new() -> Self {
        Self {
            state: watch::Sender::new(GateState {
                mode: Mode::NotReady,
                in_flight: 0,
                port: 0,
            }),
            counts: Arc::default(),
            close: watch::Sender::new(0),
            cut: Mutex::new(CancellationToken::new()),
            engine: Mutex::new(Arc::new(Engine::on(0))),
            recorded: Recorded::new(),
        }
    }

    /// The state now.
    pub fn state(&self) -> GateState {
        *self.state.borrow()
    }

    /// Watches the mode and the port (a count change alone does not
    /// notify: see [`Gate::news`]).
    pub fn subscribe(&self) -> watch::Receiver<GateState> {
        self.state.subscribe()
    }

    /// Watches the mode, the port and the count (the count at most once
    /// per [`COUNT_NEWS_GAP`]).
    pub fn news(&self) -> GateNews {
        GateNews::new(self.state.subscribe(), Arc::clone(&self.counts))
    }

    /// What the accept loop watches to close connections.
    pub fn close_signal(&self) -> watch::Receiver<u64> {
        self.close.subscribe()
    }

    /// Forwards to the engine on `port`.
    pub fn open(&self, port: u16) {
        self.state.send_modify(|s| {
            s.mode = Mode::Ready;
            s.port = port;
        });
    }

    /// Refuses requests with `not-ready` (no engine, or a starting one).
    pub fn close_for_start(&self) {
        self.state.send_modify(|s| s.mode = Mode::NotReady);
    }

    /// Starts draining: new requests are refused with `draining`, and open
    /// connections close (see the module's notes).
    pub fn start_drain(&self) {
        let started = self.state.send_if_modified(|s| {
            let started = s.mode != Mode::Draining;
            s.mode = Mode::Draining;
            started
        });
        if started {
            self.close.send_modify(|n| *n += 1);
        }
    }

    /// Waits until nothing is in flight or `deadline` passes; returns the
    /// count left (0 when drained). For a closed gate (draining, or not
    /// ready): an open one is not woken when its count reaches zero.
    pub async fn wait_idle(&self, deadline: tokio::time::Instant) -> u32 {
        let mut state = self.state.subscribe();
        let idle = state.wait_for(|s| s.in_flight == 0);
        match tokio::time::timeout_at(deadline, idle).await {
            Ok(_) => 0,
            Err(_) => self.state().in_flight,
        }
    }

    /// Ends every open SSE stream with a final error event (a drain's
    /// deadline has passed).
    pub fn cut_streams(&self) {
        let mut cut = self
            .cut
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// Whether the engine on `port` has ended, waiting up to
    /// [`ENGINE_END_WAIT`] for the supervisor to see it: after a request
    /// failed before any answer, this tells an engine that died (the request
    /// may go elsewhere) from one that failed it (the error is the answer).
    async fn engine_ended(&self, port: u16) -> bool {
        let mut state = self.state.subscribe();
        let ended = state.wait_for(|s| s.mode == Mode::NotReady || s.port != port);
        matches!(
            tokio::time::timeout(ENGINE_END_WAIT, ended).await,
            Ok(Ok(_))
        )
    }

    /// Admits a request if the gate is open.
    fn admit(self: &Arc<Self>) -> Result<(InFlight, u16), Mode> {
        let mut refused = None;
        let mut port = 0;
        // A count that rose wakes no one (only a drain waits on the
        // count, for zero).
        self.state.send_if_modified(|s| {
            if s.mode == Mode::Ready {
                s.in_flight += 1;
                port = s.port;
            } else {
                refused = Some(s.mode);
            }
            false
        });
        match refused {
            Some(mode) => Err(mode),
            None => {
                self.counts.changed();
                self.recorded.in_flight.increment(1.0);
                Ok((InFlight(Arc::clone(self)), port))
            }
        }
    }

    /// The engine on `port`; the connections to an earlier engine (another
    /// port) are dropped.
    fn engine_on(&self, port: u16) -> Arc<Engine> {
        let mut engine = self
            .engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if engine.port != port {
            *engine = Arc::new(Engine::on(port));
        }
        Arc::clone(&engine)
    }

    /// Handles one request from the host's inference port.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<GateBody> {
        if !is_inference_path(req.uri().path()) {
            // The engine's own `/metrics`, `/_...` and the rest are not the
            // host's to serve.
            self.recorded.refused_path.increment(1);
            return error_response(
                StatusCode::NOT_FOUND,
                "not an inference path: the gate forwards /v1/... and vLLM's inference API only",
                "not_found",
            );
        }
        let http1 = req.version() <= Version::HTTP_11;
        let (in_flight, port) = match self.admit() {
            Ok(admitted) => admitted,
            Err(mode) => {
                let (retry, message) = match mode {
                    Mode::Draining => ("draining", "this worker is draining; retry on another"),
                    _ => (
                        "not-ready",
                        "this worker's engine is not ready; retry on another",
                    ),
                };
                match mode {
                    Mode::Draining => self.recorded.refused_draining.increment(1),
                    _ => self.recorded.refused_not_ready.increment(1),
                }
                let mut response = retry_elsewhere(message, retry);
                if mode == Mode::Draining && http1 {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                return response;
            }
        };

        // The drain deadline that ends this request's stream is the one in
        // force when it was admitted, however long its first byte takes.
        let cut = self
            .cut
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let (mut parts, body) = req.into_parts();
        // In origin form, with the engine as `Host` (an HTTP/1.1 server
        // such as vLLM's refuses a request without one).
        let engine = self.engine_on(port);
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            // An HTTP/2 request, or one in absolute form: its path alone.
            let path = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            parts.uri = match Uri::try_from(path) {
                Ok(uri) => uri,
                Err(e) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        &format!("cannot forward this path: {e}"),
                        "bad_request",
                    );
                }
            };
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(header::HOST, engine.host.clone());
        parts.version = Version::HTTP_11;
        let upstream = Request::from_parts(parts, body);

        match upstream::send(&engine.address, &engine.connections, upstream, &POOL).await {
            Ok((response, connection)) => {
                self.recorded.proxied.increment(1);
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let sse = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("text/event-stream"));
                let cut = sse.then(|| Box::pin(cut.cancelled_owned()));
                Response::from_parts(
                    parts,
                    GateBody::Upstream(Upstream {
                        inner: body,
                        in_flight: Some(in_flight),
                        connection: Some((connection, engine)),
                        cut,
                    }),
                )
            }
            Err(e) => {
                // The request never reached the engine (refused), or the
                // engine died before it answered (a container's port,
                // Docker's proxy, accepts connections for a dead engine until
                // it is torn down): the client saw nothing, so another worker
                // may take it.
                let refused = e.is_connect();
                if refused || self.engine_ended(port).await {
                    self.recorded.engine_unreachable.increment(1);
                    let (what, message) = if refused {
                        (
                            "the engine refused a connection",
                            "this worker's engine is not reachable; retry on another",
                        )
                    } else {
                        (
                            "the engine ended before it answered",
                            "this worker's engine ended before it answered; retry on another",
                        )
                    };
                    tracing::warn!(error = %e, port, "{what}");
                    return retry_elsewhere(message, "not-ready");
                }
                self.recorded.engine_error.increment(1);
                tracing::warn!(error = %e, port, "the engine failed a request");
                error_response(
                    StatusCode::BAD_GATEWAY,
                    "the engine failed before it answered",
                    "engine_error",
                )
            }
        }
    }
}

/// One admitted request; the count drops when it is dropped.
#[derive(Debug)]
struct InFlight(Arc<Gate>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // Wakes the state's watchers only for a drain that waits for zero.
        self.0.state.send_if_modified(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.in_flight == 0 && s.mode != Mode::Ready
        });
        self.0.counts.changed();
        self.0.recorded.in_flight.decrement(1.0);
    }
}

/// A 503 that a router may retry on another worker: `retry` says why
/// (`draining`, `not-ready`) in [`RETRY_HEADER`] and in the error's code.
fn retry_elsewhere(message: &str, retry: &'static str) -> Response<GateBody> {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, message, retry);
    response
        .headers_mut()
        .insert(RETRY_HEADER, HeaderValue::from_static(retry));
    response
}

/// An OpenAI-shaped JSON error.
fn error_response(status: StatusCode, message: &str, code: &str) -> Response<GateBody> {
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": if status.is_server_error() { "server_error" } else { "invalid_request_error" },
            "code": code,
        }
    });
    let mut response = Response::new(GateBody::Full(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The SSE event that ends a stream cut at a drain's deadline.
pub const CUT_EVENT: &str = "data: {\"error\":{\"message\":\"the worker serving this stream was stopped at its drain deadline\",\"type\":\"server_error\",\"code\":\"drain_deadline\"}}\n\n";

/// The SSE event that ends a stream whose engine died under it.
pub const ENGINE_FAILED_EVENT: &str = "data: {\"error\":{\"message\":\"the engine serving this stream stopped\",\"type\":\"server_error\",\"code\":\"engine_failed\"}}\n\n";

/// A response body: the gate's own, or the engine's streamed through.
#[derive(Debug)]
pub enum GateBody {
    /// The gate's own answer.
    Full(Full<Bytes>),
    /// The engine's, frame by frame.
    Upstream(Upstream),
}

/// The engine's response body, counted until its end.
pub struct Upstream {
    inner: Incoming,
    /// Released at the end of the stream (or when the client goes away and
    /// hyper drops the body).
    in_flight: Option<InFlight>,
    /// The connection it comes on: back to the engine's idle list at the
    /// end of the stream; closed (the engine then sees the client gone) if
    /// the body is dropped or broken before.
    connection: Option<(Checkout<Incoming>, Arc<Engine>)>,
    /// For SSE: resolves at a drain's deadline.
    cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("in_flight", &self.in_flight.is_some())
            .field("sse", &self.cut.is_some())
            .finish()
    }
}

impl Upstream {
    /// The response ended: the request is done, and its connection may
    /// carry another.
    fn finish(&mut self) {
        self.in_flight = None;
        if let Some((connection, engine)) = self.connection.take() {
            connection.release(&engine.connections, &POOL);
        }
    }

    /// The response broke off (or was cut): the request is done, and its
    /// connection closes.
    fn abandon(&mut self) {
        self.cut = None;
        self.in_flight = None;
        self.connection = None;
    }
}

impl Body for GateBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Self::Upstream(upstream) => {
                if upstream.in_flight.is_none() {
                    return Poll::Ready(None);
                }
                if let Some(cut) = &mut upstream.cut
                    && cut.as_mut().poll(cx).is_ready()
                {
                    upstream.abandon();
                    metrics::counter!(m::GATE_STREAMS_CUT_TOTAL).increment(1);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        CUT_EVENT.as_bytes(),
                    )))));
                }
                let polled = Pin::new(&mut upstream.inner).poll_frame(cx);
                if let Poll::Ready(Some(Err(e))) = &polled
                    && upstream.cut.is_some()
                {
                    // The engine died mid-stream: the client gets a final
                    // error event and a clean end, not a broken connection.
                    tracing::warn!(error = %e, "the engine broke off a stream");
                    upstream.abandon();
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        ENGINE_FAILED_EVENT.as_bytes(),
                    )))));
                }
                match &polled {
                    Poll::Ready(Some(Err(_))) => upstream.abandon(),
                    Poll::Ready(None) => upstream.finish(),
                    Poll::Ready(Some(Ok(_))) if upstream.inner.is_end_stream() => {
                        upstream.finish();
                    }
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(full) => full.is_end_stream(),
            Self::Upstream(upstream) => upstream.in_flight.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(full) => full.size_hint(),
            Self::Upstream(upstream) if upstream.cut.is_some() => SizeHint::default(),
            Self::Upstream(upstream) => upstream.inner.size_hint(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;

    use crossfade_common::shutdown::Shutdown;
    use http_body_util::BodyExt as _;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::net::TcpListener;

    use super::*;

    /// An engine's port as Docker's proxy keeps it for a dead container:
    /// it accepts each connection and closes it without an answer.
    async fn closing_port(shutdown: &Shutdown) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = shutdown.clone();
        shutdown.spawn(async move {
            loop {
                tokio::select! {
                    () = stop.triggered() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => drop(stream),
                        Err(_) => return,
                    },
                }
            }
        });
        port
    }

    /// An engine that answers every request `200 ok` on kept-alive
    /// connections; the port, how many connections it accepted, and the
    /// `Host` of each request.
    async fn counting_engine(
        shutdown: &Shutdown,
    ) -> (
        u16,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hosts = Arc::new(Mutex::new(Vec::new()));
        let (count, seen, stop) = (Arc::clone(&accepted), Arc::clone(&hosts), shutdown.clone());
        shutdown.spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = stop.triggered() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => return,
                    },
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = Arc::clone(&seen);
                let answer = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let host = req
                        .headers()
                        .get(header::HOST)
                        .map(|h| h.to_str().unwrap().to_owned());
                    seen.lock().unwrap().extend(host);
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let end = stop.clone();
                stop.spawn(async move {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), answer);
                    tokio::select! {
                        () = end.triggered() => {}
                        _ = connection => {}
                    }
                });
            }
        });
        (port, accepted, hosts)
    }

    #[tokio::test]
    async fn requests_reuse_the_connection_to_the_engine_and_name_it_as_host() {
        let shutdown = Shutdown::new();
        let (port, accepted, hosts) = counting_engine(&shutdown).await;
        let gate = Arc::new(Gate::new());
        gate.open(port);
        let addr = serve(&gate, &shutdown).await;
        for _ in 0..3 {
            let (status, _, body) = post(addr).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body, "ok");
        }
        // Each response read to its end gave its connection back.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(*hosts.lock().unwrap(), vec![format!("127.0.0.1:{port}"); 3]);
        assert_eq!(gate.state().in_flight, 0);
        shutdown.trigger();
        shutdown.wait_for_tasks(Duration::from_secs(5)).await;
    }

    async fn serve(gate: &Arc<Gate>, shutdown: &Shutdown) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::clone(gate);
        let stop = shutdown.clone();
        shutdown.spawn(async move {
            crossfade_common::http::serve(
                listener,
                &crossfade_common::http::ServeOptions::default(),
                stop,
                move |req: Request<Incoming>| Arc::clone(&gate).handle(req),
            )
            .await;
        });
        addr
    }

    async fn post(addr: SocketAddr) -> (StatusCode, Option<String>, String) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = Request::post(format!("http://{addr}/v1/completions"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status();
        let retry = response
            .headers()
            .get(RETRY_HEADER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, retry, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_request_whose_engine_died_before_answering_may_go_elsewhere() {
        let shutdown = Shutdown::new();
        let gate = Arc::new(Gate::new());
        gate.open(closing_port(&shutdown).await);
        let addr = serve(&gate, &shutdown).await;
        // The supervisor sees the engine's end a moment after the request
        // failed.
        let seen = Arc::clone(&gate);
        shutdown.spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            seen.close_for_start();
        });
        let (status, retry, body) = post(addr).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(retry.as_deref(), Some("not-ready"), "{body}");
        assert!(body.contains("ended before it answered"), "{body}");
        assert_eq!(gate.state().in_flight, 0);
        shutdown.trigger();
        shutdown.wait_for_tasks(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_request_that_a_live_engine_failed_is_not_retried() {
        let shutdown = Shutdown::new();
        let gate = Arc::new(Gate::new());
        gate.open(closing_port(&shutdown).await);
        let addr = serve(&gate, &shutdown).await;
        let (status, retry, body) = post(addr).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert_eq!(retry, None, "{body}");
        assert!(body.contains("engine_error"), "{body}");
        assert_eq!(gate.state().in_flight, 0);
        shutdown.trigger();
        shutdown.wait_for_tasks(Duration::from_secs(5)).await;
    }
}
