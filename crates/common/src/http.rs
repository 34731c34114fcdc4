//! Serving HTTP the same way in every program: one accept loop (HTTP/1.1
//! and HTTP/2 with prior knowledge, hyper's header read timeout armed with
//! a timer), graceful shutdown, a signal that closes every open connection
//! gracefully while the listener keeps accepting (the agent's gate uses it
//! when it drains), the hop-by-hop header rules a proxy follows, and the
//! small plain-text responses of admin endpoints.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::task::TaskTracker;

use crate::Shutdown;

/// Most header fields a request may carry: hyper's own limit (it answers
/// 431 beyond it), left at its default because any other value costs a
/// heap buffer and a loop over it on every request head it parses (about
/// 2,900 instructions a request, `bench/profile-router.sh`). Programs check
/// their own limits, up to this one, to answer in their own format.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of header fields a request may carry (HTTP/1.1: the read
/// buffer; HTTP/2: the decoded header list).
pub const MAX_HEADER_BYTES: usize = 128 << 10;

/// An error a body may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a listener serves its connections.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Longest time a client may take to send a request's headers. hyper
    /// leaves this off unless a timer is set; [`serve`] sets one.
    pub header_read_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// How long shutdown waits for open connections to finish the requests
    /// they carry.
    pub shutdown_grace: Duration,
    /// TLS (rustls) on this listener, swapped on reload; plain text when
    /// `None`.
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            h2_max_concurrent_streams: 256,
            shutdown_grace: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Serves `handler` on `listener` until `shutdown` triggers; then stops
/// accepting, lets open connections finish the requests they carry
/// (HTTP/1.1 closes after the response in progress, HTTP/2 sends GOAWAY)
/// for up to `options.shutdown_grace`, and returns.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    options: &ServeOptions,
    shutdown: Shutdown,
    handler: F,
) where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (_never, close) = watch::channel(0);
    serve_with_close(listener, options, shutdown, close, handler).await;
}

/// [`serve`], and every time `close` changes, each open HTTP/2 connection
/// is closed gracefully with GOAWAY while the listener keeps accepting.
/// HTTP/1.1 connections are left to the handler, which answers the next
/// request with `Connection: close` (closing an idle HTTP/1.1 connection
/// would race with a request already sent on it). Clients that keep
/// connections alive reconnect, and so find out where to go next.
pub async fn serve_with_close<F, Fut, B>(
    listener: TcpListener,
    options: &ServeOptions,
    shutdown: Shutdown,
    close: watch::Receiver<u64>,
    handler: F,
) where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    serve_clients(listener, options, shutdown, close, move |_| handler.clone()).await;
}

/// [`serve_with_close`] with a handler made for each connection from the
/// client's address (for limits per client).
pub async fn serve_clients<M, F, Fut, B>(
    listener: TcpListener,
    options: &ServeOptions,
    shutdown: Shutdown,
    close: watch::Receiver<u64>,
    make: M,
) where
    M: Fn(SocketAddr) -> F,
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Without a timer, hyper's header read timeout is silently off.
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.h2_max_concurrent_streams)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let connections = TaskTracker::new();

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
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
        let handler = make(peer);
        // Whether the connection speaks HTTP/2, learnt from its first request.
        let http2 = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = std::sync::Arc::clone(&http2);
        let service = service_fn(move |req: http::Request<Incoming>| {
            if req.version() == http::Version::HTTP_2 {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req).await) }
        });
        let builder = builder.clone();
        let first_byte_timeout = options.header_read_timeout;
        // The configuration now: a reload applies to the next connections.
        let tls = options.tls.as_ref().map(|tls| tls.load_full());
        let mut close = close.clone();
        close.mark_unchanged();
        let token = shutdown.token();
        connections.spawn(async move {
            // hyper learns the protocol from the first bytes, and its header
            // timeout starts only after that: a connection that sends
            // nothing is closed here, after the same bound (which a TLS
            // handshake shares).
            let deadline = tokio::time::Instant::now() + first_byte_timeout;
            let mut first = [0u8; 1];
            tokio::select! {
                peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => {
                    if !matches!(peeked, Ok(Ok(n)) if n > 0) {
                        return;
                    }
                }
                () = token.cancelled() => return,
            }
            let Some(tls) = tls else {
                return drive(&builder, stream, service, &token, &mut close, &http2).await;
            };
            let accepted = tokio::select! {
                accepted = tokio::time::timeout_at(deadline, TlsAcceptor::from(tls).accept(stream)) => accepted,
                () = token.cancelled() => return,
            };
            match accepted {
                Ok(Ok(stream)) => drive(&builder, stream, service, &token, &mut close, &http2).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(options.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?options.shutdown_grace, "connections still open after the shutdown grace");
    }
}

/// A TLS server configuration from a certificate chain and its key (PEM
/// files), offering HTTP/2 and HTTP/1.1 (ALPN); the error names the file.
pub fn tls_server_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: holds no certificate", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|_| format!("{}: cannot be read as a PEM private key", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, private)
    .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves one connection until it ends, closing it gracefully on shutdown
/// or (HTTP/2) when `close` changes.
async fn drive<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    token: &tokio_util::sync::CancellationToken,
    close: &mut watch::Receiver<u64>,
    http2: &std::sync::atomic::AtomicBool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = token.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            changed = close.changed(), if !closing => {
                if changed.is_err() {
                    // Nobody can ask for a close any more; stop watching.
                    std::future::pending::<()>().await;
                }
                // HTTP/2: GOAWAY tells the client which streams were
                // taken, so none is lost. HTTP/1.1 has no such
                // signal: closing an idle connection races with a
                // request already on its way. Its next response
                // carries `Connection: close` instead (the handler
                // sets it), and the connection ends after it.
                if http2.load(std::sync::atomic::Ordering::Relaxed) {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// vLLM's OpenAI-compatible API, the only paths an agent's gate forwards
/// and the router sends on: `/v1/...`, `/v2/...` (rerank) and the
/// top-level routes. Never `/metrics`, `/health` (each program answers its
/// own), nothing under `/_`, no `.` or `..` segment.
pub fn is_inference_path(path: &str) -> bool {
    const TOP: &[&str] = &[
        "/tokenize",
        "/detokenize",
        "/pooling",
        "/classify",
        "/score",
        "/rerank",
        "/invocations",
        "/version",
    ];
    // The segment scan runs only when a segment starts with a dot.
    if path.contains("/.")
        && path
            .split('/')
            .any(|segment| segment == ".." || segment == ".")
    {
        return false;
    }
    path.starts_with("/v1/") || path.starts_with("/v2/") || TOP.contains(&path)
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1):
/// a proxy never forwards them in either direction. Their text: a header
/// name is lower case, and comparing text is cheaper than building names.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is one of [`HOP_BY_HOP`].
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Removes the hop-by-hop headers, and those that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names they have costs
    // less than hashing the eight that they lack (this runs twice per
    // proxied request).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for name in &named {
        headers.remove(name);
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The Prometheus text exposition of `handle`, or 404 when metrics are off.
pub fn metrics(handle: Option<&PrometheusHandle>) -> Response<Full<Bytes>> {
    match handle {
        Some(handle) => exposition(handle.render()),
        None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
    }
}

/// A Prometheus text exposition as a response.
pub fn exposition(body: String) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::OK, body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_the_inference_api_passes_the_gate() {
        for path in [
            "/v1/chat/completions",
            "/v1/models",
            "/v2/rerank",
            "/tokenize",
            "/invocations",
            "/version",
        ] {
            assert!(is_inference_path(path), "{path}");
        }
        for path in [
            "/metrics",
            "/_fake/fault",
            "/health",
            "/",
            "/v1/../metrics",
            "/v1/./x",
            "/v1",
            "/tokenize/x",
        ] {
            assert!(!is_inference_path(path), "{path}");
        }
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_header_bound() {
        use tokio::io::AsyncReadExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = ServeOptions {
            header_read_timeout: Duration::from_millis(300),
            ..ServeOptions::default()
        };
        let shutdown = Shutdown::new();
        let server = serve(listener, &options, shutdown.clone(), |_req| async {
            text(StatusCode::OK, "ok\n")
        });
        let client = async {
            let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 16];
            // The server closes it: the read ends (0 bytes or a reset) well
            // before the test's own bound.
            let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
            shutdown.trigger();
        };
        // The server runs beside the client, not spawned: it ends with the
        // test.
        tokio::join!(server, client);
    }

    /// `MAX_HEADERS` is what hyper enforces: a request with that many
    /// header fields is served, one more gets hyper's 431.
    #[tokio::test]
    async fn the_header_count_limit_is_max_headers() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let options = ServeOptions::default();
        let server = serve(listener, &options, shutdown.clone(), |_req| async {
            text(StatusCode::OK, "ok\n")
        });
        let status_for = |fields: usize| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut head = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
            // host, connection and the rest: `fields` in all.
            for i in 2..fields {
                head.push_str(&format!("x-field-{i}: y\r\n"));
            }
            head.push_str("connection: close\r\n\r\n");
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&answer)
                .split(' ')
                .nth(1)
                .unwrap_or_default()
                .to_owned()
        };
        let client = async {
            assert_eq!(status_for(MAX_HEADERS).await, "200");
            assert_eq!(status_for(MAX_HEADERS + 1).await, "431");
            shutdown.trigger();
        };
        tokio::join!(server, client);
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::CONTENT_TYPE));
        // Each hop-by-hop header alone is found and removed.
        for name in HOP_BY_HOP.map(HeaderName::from_static) {
            assert!(is_hop_by_hop(&name), "{name}");
            let mut headers = HeaderMap::new();
            headers.insert(name.clone(), HeaderValue::from_static("x"));
            headers.insert(header::HOST, HeaderValue::from_static("h"));
            strip_hop_by_hop(&mut headers);
            assert_eq!(headers.len(), 1, "{name}: {headers:?}");
        }
        assert!(!is_hop_by_hop(&header::CONTENT_LENGTH));
    }
}
