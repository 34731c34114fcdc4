//! The response body the router hands to hyper: its own answers, or an
//! upstream's streamed frame by frame, holding the request's slots and
//! in-flight count until the last byte, bounded by the idle timeout, and
//! ending a broken SSE stream with an error event.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{BoxError, Slots};
use crate::stats::{Outcome, RequestRecord};
use crate::table::InFlight;
use crossfade_common::upstream::{Checkout, PoolSettings};

/// A response body: the router's own (a buffer) or an upstream's, streamed.
// Unboxed: every proxied response is the large variant, and boxing it
// would cost an allocation per request to save bytes on error answers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ProxyBody {
    /// A body the router produced.
    Full(Full<Bytes>),
    /// An upstream's body, passed through frame by frame.
    Upstream(UpstreamBody),
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        Self::Full(Full::new(bytes))
    }
}

/// An upstream response body in flight. It holds the worker's in-flight
/// guard, so the request counts until the last byte (or until the client
/// goes away and hyper drops the body), and it fails the stream when the
/// upstream is silent longer than the idle bound.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    in_flight: InFlight,
    /// The connection it comes on: back to the worker's idle list at the
    /// end, closed if the body is dropped before.
    connection: Option<(Checkout<Full<Bytes>>, PoolSettings)>,
    /// Finished with its outcome at the last byte; dropped before that, it
    /// counts the request as aborted.
    record: Option<(RequestRecord, Outcome)>,
    /// The client's and the router-wide concurrency slots, freed with the
    /// body.
    _slots: Slots,
    idle_timeout: Duration,
    /// Fires at the idle bound counted from some earlier chunk; when it
    /// does, it is moved to the bound counted from `last_data`, so a chunk
    /// costs a clock read rather than a timer update.
    idle: Pin<Box<tokio::time::Sleep>>,
    last_data: tokio::time::Instant,
    /// An SSE stream: if the upstream breaks off, the client gets a final
    /// error event and a clean end, as the gate gives when its engine dies.
    sse: bool,
    /// Ended by the router after such an event.
    ended: bool,
}

/// The SSE event that ends a stream whose upstream broke off (a gate whose
/// agent was killed, a lost host).
pub const UPSTREAM_FAILED_EVENT: &str = "data: {\"error\":{\"message\":\"the worker serving this stream broke off\",\"type\":\"server_error\",\"code\":\"upstream_failed\"}}\n\n";

/// The SSE event that ends a stream whose upstream fell silent for longer
/// than the idle bound.
pub const UPSTREAM_IDLE_EVENT: &str = "data: {\"error\":{\"message\":\"the worker serving this stream fell silent\",\"type\":\"server_error\",\"code\":\"upstream_idle_timeout\"}}\n\n";

/// The upstream sent nothing for longer than the idle bound.
#[derive(Debug, thiserror::Error)]
#[error("no data from {worker} for {timeout:?}")]
pub struct IdleTimeout {
    worker: String,
    timeout: Duration,
}

impl UpstreamBody {
    /// `inner`, in flight on `connection`, to be recorded as `record`'s
    /// outcome at its end; it holds the request's `slots` until then.
    pub(super) fn new(
        inner: Incoming,
        in_flight: InFlight,
        connection: (Checkout<Full<Bytes>>, PoolSettings),
        record: (RequestRecord, Outcome),
        slots: Slots,
        idle_timeout: Duration,
        sse: bool,
    ) -> Self {
        Self {
            inner,
            in_flight,
            connection: Some(connection),
            record: Some(record),
            _slots: slots,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            last_data: tokio::time::Instant::now(),
            sse,
            ended: false,
        }
    }

    /// The upstream broke off (`error`): counted as an aborted stream, its
    /// connection closed; an SSE stream ends with `event`, another body
    /// fails.
    fn broken(
        &mut self,
        error: BoxError,
        event: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.connection = None;
        if let Some((record, _)) = self.record.take() {
            record.finish(Outcome::Aborted);
        }
        if !self.sse {
            return Poll::Ready(Some(Err(error)));
        }
        tracing::debug!(%error, "an upstream broke off a stream; ending it with an error event");
        self.ended = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(event.as_bytes())))))
    }

    fn finish(&mut self) {
        if let Some((connection, settings)) = self.connection.take() {
            // The in-flight guard names the worker the response came from.
            connection.release(self.in_flight.worker().connections(), &settings);
        }
        if let Some((record, outcome)) = self.record.take() {
            record.finish(outcome);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            ProxyBody::Upstream(up) if up.ended => Poll::Ready(None),
            ProxyBody::Upstream(up) => match Pin::new(&mut up.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some((record, _)) = &mut up.record
                        && frame.data_ref().is_some_and(|data| !data.is_empty())
                    {
                        record.body_byte();
                    }
                    if up.inner.is_end_stream() {
                        // hyper stops polling once the body says it ended, so
                        // the frame that ends it is the request's end; no
                        // `Ready(None)` may follow.
                        up.finish();
                    } else {
                        up.last_data = tokio::time::Instant::now();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => up.broken(e.into(), UPSTREAM_FAILED_EVENT),
                Poll::Ready(None) => {
                    up.finish();
                    Poll::Ready(None)
                }
                Poll::Pending => loop {
                    if up.idle.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let deadline = up.last_data + up.idle_timeout;
                    if deadline <= tokio::time::Instant::now() {
                        let silent = Box::new(IdleTimeout {
                            worker: up.in_flight.worker().address().to_owned(),
                            timeout: up.idle_timeout,
                        });
                        return up.broken(silent, UPSTREAM_IDLE_EVENT);
                    }
                    // Chunks came since it was set: the silence is shorter.
                    up.idle.as_mut().reset(deadline);
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(full) => full.is_end_stream(),
            ProxyBody::Upstream(up) => up.ended || up.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(full) => full.size_hint(),
            ProxyBody::Upstream(up) => up.inner.size_hint(),
        }
    }
}
