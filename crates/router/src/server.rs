//! Serving HTTP: the router's listeners on the shared accept loop
//! ([`crossfade_common::http`]) with the router's limits, and the admin
//! endpoints.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_rustls::rustls::ServerConfig;

use bytes::Bytes;
use crossfade_common::Shutdown;
use crossfade_common::http::{ServeOptions, exposition, serve as serve_http, serve_clients, text};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::config::Limits;
use crate::proxy::{BoxError, Proxy, ProxyBody};

/// How the router's listeners serve: its limits, and TLS where given.
pub fn options(limits: &Limits, tls: Option<Arc<ArcSwap<ServerConfig>>>) -> ServeOptions {
    ServeOptions {
        header_read_timeout: limits.header_read_timeout,
        h2_max_concurrent_streams: limits.h2_max_concurrent_streams,
        shutdown_grace: limits.shutdown_grace,
        tls,
    }
}

/// Serves `handler` on `listener` with the router's limits until
/// `shutdown` triggers (see [`crossfade_common::http::serve`]).
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    limits: &Limits,
    shutdown: Shutdown,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    serve_http(listener, &options(limits, None), shutdown, handler).await;
}

/// Serves the public listener: each connection's requests go to `proxy`
/// with the client's address (for its concurrency limit).
pub async fn serve_public(
    listener: TcpListener,
    options: &ServeOptions,
    shutdown: Shutdown,
    proxy: Arc<Proxy>,
) {
    let (_never, close) = tokio::sync::watch::channel(0);
    serve_clients(listener, options, shutdown, close, move |peer: SocketAddr| {
        let proxy = Arc::clone(&proxy);
        move |req: Request<Incoming>| -> Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>> {
            let proxy = Arc::clone(&proxy);
            Box::pin(async move { proxy.handle(req, peer.ip()).await })
        }
    })
    .await;
}

/// The admin endpoints: `/metrics` (Prometheus), `/healthz` (the process
/// serves), `/readyz` (it has a table with at least one endpoint).
pub async fn admin(
    req: Request<Incoming>,
    proxy: Arc<Proxy>,
    metrics: Option<PrometheusHandle>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => match metrics {
            Some(handle) => {
                let mut body = handle.render();
                let stats = proxy.routes().stats();
                stats.render(&mut body, std::time::Instant::now());
                stats.render_queues(&mut body, &proxy.routes().load());
                exposition(body)
            }
            None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let table = proxy.routes().load();
            if table.endpoints().is_empty() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no endpoints in the routing table\n",
                )
            } else {
                text(
                    StatusCode::OK,
                    format!("ok: table version {}\n", table.version()),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
