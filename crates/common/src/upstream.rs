//! Kept-alive HTTP/1.1 connections to one peer: the router's to each gate,
//! the gate's to its engine.
//!
//! Each peer's owner (a router's worker, which outlives table swaps; a
//! gate's engine) holds its idle connections, so finding one is a pop from a
//! short list under an uncontended lock, with no lookup by host. A
//! connection goes back to its list only when the response it carried has
//! been read to the end; one whose response was abandoned is dropped, and
//! with it the connection (which tells an engine that the client went
//! away). Idle connections older than the idle timeout are closed when the
//! list is next used.
//!
//! This replaced hyper-util's pooled client, which hashes the scheme and
//! authority on every checkout and return and wraps each request in several
//! layers of futures: the benchmark's profile (bench/RESULTS.md) put that
//! at a sixth of the router's instructions per request.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A connection's sending half, for request bodies of type `B`.
type Sender<B> = http1::SendRequest<B>;

/// How connections are made and kept.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Longest time to establish a connection.
    pub connect_timeout: Duration,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
}

/// One peer's idle connections, the most recently used last.
#[derive(Debug)]
pub struct Connections<B> {
    idle: Mutex<Vec<(Sender<B>, Instant)>>,
}

impl<B> Default for Connections<B> {
    fn default() -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
        }
    }
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: the peer cannot have seen the request.
    #[error("connecting to {address}: {reason}")]
    Connect {
        /// The peer.
        address: String,
        /// What failed.
        reason: String,
    },
    /// A kept-alive connection ended (closed or reset) before any byte of a
    /// response: the peer closed it as idle just as the request went out
    /// (Go's `errServerClosedIdle`; a reset when the request's bytes reach
    /// a socket already closed). The router sends it again on a new
    /// connection: a gate that crashed mid-request resets too, and its
    /// engine then aborts the request whose connection went away, as vLLM
    /// does, so a second attempt costs at most a repeated prefill.
    #[error("the peer closed a kept-alive connection before answering: {0}")]
    ClosedIdle(hyper::Error),
    /// The request was sent, or may have been, and failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl SendError {
    /// Whether the connection failed before anything was sent.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }

    /// Whether the peer cannot have read the request, on a kept-alive
    /// connection it closed (see [`SendError::ClosedIdle`]).
    pub fn is_closed_idle(&self) -> bool {
        matches!(self, SendError::ClosedIdle(_))
    }
}

/// A connection carrying a response. Give it back with
/// [`Checkout::release`] once the response has been read to the end;
/// dropped, it closes.
#[derive(Debug)]
pub struct Checkout<B> {
    sender: Sender<B>,
}

impl<B> Checkout<B> {
    /// The response was read to the end: the connection may carry another
    /// request to the peer it came from, whose connections are `to`.
    pub fn release(self, to: &Connections<B>, settings: &PoolSettings) {
        to.put(self.sender, settings);
    }
}

impl<B> Connections<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Sender<B>, Instant)>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn put(&self, sender: Sender<B>, settings: &PoolSettings) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        evict_expired(&mut idle, now, settings.idle_timeout);
        idle.push((sender, now));
    }

    /// The most recently used live connection, if any.
    fn take(&self, settings: &PoolSettings) -> Option<Sender<B>> {
        let mut idle = self.lock();
        evict_expired(&mut idle, Instant::now(), settings.idle_timeout);
        while let Some((sender, _)) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }
}

/// Drops the connections idle for longer than `timeout` (the oldest are
/// first).
fn evict_expired<B>(idle: &mut Vec<(Sender<B>, Instant)>, now: Instant, timeout: Duration) {
    let expired = idle
        .iter()
        .take_while(|(_, since)| now.duration_since(*since) > timeout)
        .count();
    if expired > 0 {
        idle.drain(..expired);
    }
}

/// Sends `request` to the peer at `address` on one of its idle
/// `connections`, or a new one.
///
/// A kept-alive connection can be closed by the peer just as a request is
/// given to it; when hyper hands the request back unsent, it goes on a new
/// connection (the peer cannot have seen it).
pub async fn send<B>(
    address: &str,
    connections: &Connections<B>,
    mut request: Request<B>,
    settings: &PoolSettings,
) -> Result<(Response<Incoming>, Checkout<B>), SendError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    while let Some(mut sender) = connections.take(settings) {
        // A connection whose last response just ended may still be
        // finishing it; it is ready within a turn of its task.
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok((response, Checkout { sender })),
            Err(mut e) => match e.take_message() {
                Some(unsent) => request = unsent,
                None if closed_before_answer(e.error()) => {
                    return Err(SendError::ClosedIdle(e.into_error()));
                }
                None => return Err(SendError::Http(e.into_error())),
            },
        }
    }
    let mut sender = connect(address, settings).await?;
    let response = sender.send_request(request).await?;
    Ok((response, Checkout { sender }))
}

/// The connection ended, or was reset, before any byte of a response.
fn closed_before_answer(error: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    error.is_incomplete_message()
        || std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::BrokenPipe
                        | ErrorKind::ConnectionAborted
                )
            })
}

async fn connect<B>(address: &str, settings: &PoolSettings) -> Result<Sender<B>, SendError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let failed = |reason: String| SendError::Connect {
        address: address.to_owned(),
        reason,
    };
    let stream = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(address))
        .await
        .map_err(|_| {
            failed(format!(
                "no connection within {:?}",
                settings.connect_timeout
            ))
        })?
        .map_err(|e| failed(e.to_string()))?;
    // Small writes (SSE chunks, request heads) go out at once.
    stream
        .set_nodelay(true)
        .map_err(|e| failed(e.to_string()))?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(e.to_string()))?;
    // The connection's driver ends with the connection: when its last
    // sender is dropped (an idle one evicted, a checkout abandoned) or the
    // peer closes it; nothing outlives it to be waited for at shutdown.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a kept-alive connection ended with an error");
        }
    });
    Ok(sender)
}
