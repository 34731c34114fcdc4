//! Serving HTTP: the accept loop every listener of the router shares
//! (HTTP/1.1 and HTTP/2 with prior knowledge, hyper's header read timeout
//! armed with a timer), graceful shutdown, and the admin endpoints.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossfade_common::Shutdown;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::config::Limits;
use crate::proxy::{BoxError, Proxy};

/// Serves `handler` on `listener` until `shutdown` triggers; then stops
/// accepting, lets open connections finish their requests (HTTP/1.1 closes
/// after the response in progress, HTTP/2 sends GOAWAY) for up to
/// `limits.shutdown_grace`, and returns.
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Without a timer, hyper's header read timeout is silently off.
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams);
    let graceful = GracefulShutdown::new();

    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin, and keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.triggered() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        shutdown.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(grace = ?limits.shutdown_grace, "connections still open after the shutdown grace");
        }
    }
}

/// The public listener's handler.
pub fn public_handler(
    proxy: Arc<Proxy>,
) -> impl Fn(
    Request<Incoming>,
) -> std::pin::Pin<Box<dyn Future<Output = Response<crate::proxy::ProxyBody>> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    move |req| {
        let proxy = Arc::clone(&proxy);
        Box::pin(async move { proxy.handle(req).await })
    }
}

/// The admin endpoints: `/metrics` (Prometheus), `/healthz` (the process
/// serves), `/readyz` (it has a table with at least one endpoint).
pub async fn admin(
    req: Request<Incoming>,
    proxy: Arc<Proxy>,
    metrics: Option<PrometheusHandle>,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => match metrics {
            Some(handle) => {
                let mut response = text(StatusCode::OK, handle.render());
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n".into()),
        },
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let table = proxy.routes().load();
            if table.endpoints().is_empty() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no endpoints in the routing table\n".into(),
                )
            } else {
                text(
                    StatusCode::OK,
                    format!("ok: table version {}\n", table.version()),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}
