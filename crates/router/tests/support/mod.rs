//! Shared by the router's integration tests: fake-vllm engines in process,
//! a router on 127.0.0.1:0, and a small HTTP client.
#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use crossfade_common::Shutdown;
use crossfade_proto::v1;
use crossfade_router::config::Limits;
use crossfade_router::proxy::{Proxy, ProxySettings};
use crossfade_router::server;
use crossfade_router::table::Routes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A fake-vllm engine serving `chat` for `model`, at `tokens_per_second`
/// (`f64::INFINITY`: no pacing).
pub async fn engine(model: &str, tokens_per_second: f64) -> fake_vllm::Handle {
    let mut config = fake_vllm::Config::new(model);
    config.served_model_names = vec!["chat".into(), "Qwen/Qwen3-8B".into()];
    config.port = 0;
    config.tokens_per_second = tokens_per_second;
    config.default_max_tokens = 4;
    fake_vllm::Handle::bind(config).await.unwrap()
}

/// A routing-table deployment.
pub fn deployment(id: &str, weight: u32, workers: &[SocketAddr]) -> v1::DeploymentRoute {
    v1::DeploymentRoute {
        max_model_len: 0,
        id: id.into(),
        weight,
        workers: workers
            .iter()
            .map(|a| v1::WorkerRoute {
                address: a.to_string(),
                worker_id: String::new(),
            })
            .collect(),
    }
}

/// A table with one endpoint `chat` (alias `Qwen/Qwen3-8B`).
pub fn table(version: u64, deployments: Vec<v1::DeploymentRoute>) -> v1::RoutingTable {
    v1::RoutingTable {
        version,
        endpoints: vec![v1::EndpointRoute {
            created: 0,
            name: "chat".into(),
            aliases: vec!["Qwen/Qwen3-8B".into()],
            deployments,
        }],
    }
}

/// A router serving on 127.0.0.1; stops when dropped.
pub struct TestRouter {
    pub addr: SocketAddr,
    pub routes: Arc<Routes>,
    pub proxy: Arc<Proxy>,
    shutdown: Shutdown,
}

impl TestRouter {
    pub async fn start(table: v1::RoutingTable, settings: ProxySettings) -> Self {
        let routes = Arc::new(Routes::new(&table).unwrap());
        let proxy = Arc::new(Proxy::new(Arc::clone(&routes), settings));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let limits = Limits {
            shutdown_grace: Duration::from_secs(1),
            ..Limits::default()
        };
        let s = shutdown.clone();
        let serving = Arc::clone(&proxy);
        tokio::spawn(async move {
            server::serve_public(listener, &server::options(&limits, None), s, serving).await;
        });
        Self {
            addr,
            routes,
            proxy,
            shutdown,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A chat completion request body.
pub fn chat_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
    })
    .to_string()
}

/// A streaming chat completion request for `chat` through `router`.
pub fn stream_request(router: &TestRouter) -> Request<Full<Bytes>> {
    Request::post(router.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(chat_body("chat", true).into()))
        .unwrap()
}

/// A non-streaming chat completion for `chat` through `router`, read whole.
pub async fn chat(client: &HttpClient, router: &TestRouter) -> (StatusCode, HeaderMap, String) {
    post(
        client,
        &router.url("/v1/chat/completions"),
        chat_body("chat", false),
        &[],
    )
    .await
    .unwrap()
}

/// The router's statistics of every endpoint since the epoch, as GetStats reports them.
pub fn report(router: &TestRouter) -> Vec<v1::EndpointStats> {
    let table = router.routes.load();
    router
        .routes
        .stats()
        .report(&table, std::time::UNIX_EPOCH, None)
}

/// POSTs `body` to `url` and reads the whole response.
pub async fn post(
    client: &HttpClient,
    url: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, HeaderMap, String)> {
    let mut request = Request::post(url).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Full::new(body.into()))?)
        .await?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec())?,
    ))
}

/// A test double of an agent gate that is draining: it answers every
/// request with the retryable 503, and counts them.
pub struct DrainingGate {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
}

impl DrainingGate {
    pub async fn start() -> Self {
        let requests = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&requests);
        let addr = serve_gate(
            || {},
            move |_addr, _req| {
                counter.fetch_add(1, Ordering::Relaxed);
                async {
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .header("x-crossfade-retry", "draining")
                        .header("connection", "close")
                        .body(Full::new(Bytes::from_static(b"draining")))
                        .unwrap()
                }
            },
        )
        .await;
        Self { addr, requests }
    }
}

/// Serves `handler` (given the gate's own address and each request) over
/// HTTP/1.1 on a loopback port, calling `accepted` for every connection;
/// returns the address.
async fn serve_gate<H, Fut, B>(accepted: impl Fn() + Send + 'static, handler: H) -> SocketAddr
where
    H: Fn(SocketAddr, Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            accepted();
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = handler(addr, req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An address where nothing listens (bound, then released).
pub async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A test double of a gate that counts the connections it accepts. It
/// answers `POST /v1/slow` with one chunk and then nothing (until the client
/// goes away), anything else with a small JSON body; a request that is not
/// in origin form with a `Host` naming the gate, as HTTP/1.1 servers such as
/// vLLM's require, gets a 400.
pub struct CountingGate {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
}

impl CountingGate {
    pub async fn start() -> Self {
        let connections = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&connections);
        let accepted = move || {
            counter.fetch_add(1, Ordering::Relaxed);
        };
        let addr = serve_gate(
            accepted,
            |addr, req: Request<hyper::body::Incoming>| async move {
                let host = req.headers().get("host").and_then(|h| h.to_str().ok());
                if req.uri().authority().is_some() || host != Some(addr.to_string().as_str()) {
                    let text = format!("{:?} with Host {host:?}", req.uri());
                    let mut refused = Response::new(Full::new(Bytes::from(text)).boxed());
                    *refused.status_mut() = StatusCode::BAD_REQUEST;
                    return refused;
                }
                let slow = req.uri().path() == "/v1/slow";
                let _ = req.into_body().collect().await;
                let body: http_body_util::combinators::BoxBody<Bytes, Infallible> = if slow {
                    let first = futures_util::stream::once(async {
                        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(
                            b"data: {}\n\n",
                        )))
                    });
                    let never = futures_util::stream::pending();
                    http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, never))
                        .boxed()
                } else {
                    Full::new(Bytes::from_static(br#"{"ok":true}"#)).boxed()
                };
                Response::new(body)
            },
        )
        .await;
        Self { addr, connections }
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}
