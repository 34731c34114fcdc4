//! The benchmark's backend: a lean mock of vLLM's OpenAI API, serving
//! several ports (the workers of two deployments) from one thread.
//!
//! `fake-vllm` simulates an engine (a token clock, a KV cache, faults) and
//! costs far more per request than a proxy does; here the backend must cost
//! as little as possible and the same for every system measured, so that
//! the differences on the shared core are the proxies'. It answers:
//!
//! - `POST /v1/chat/completions` and `/v1/completions`: a fixed
//!   `chat.completion` body, or with `"stream": true` an SSE stream of
//!   `max_tokens` chunks, one every `--chunk-interval-us`. Each chunk's
//!   content is `t=<ns>`, the wall-clock time it was written, so the client
//!   measures what every hop added to each chunk. A stream asking for
//!   [`IDLE_STREAM_TOKENS`] or more is an idle stream: its first chunk comes
//!   at once, the next ones a minute apart.
//! - `GET /health`, `/v1/models` and the SGLang worker queries the Python
//!   routers make before they accept a worker.
//!
//! Every response names the worker in `x-bench-worker` (its index), which
//! is how the client counts the shares of the two deployments.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Streams asking for this many tokens or more are idle streams.
pub const IDLE_STREAM_TOKENS: u64 = 1_000_000;

/// The gap between an idle stream's chunks.
const IDLE_INTERVAL: Duration = Duration::from_secs(60);

/// The served model name every worker reports.
pub const MODEL: &str = "chat";

/// `crossfade-bench __backend [--chunk-interval-us N] PORT[:INDEX]...`:
/// serves until killed.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let mut interval = Duration::from_millis(10);
    let mut ports = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--chunk-interval-us" {
            let value = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--chunk-interval-us needs a value"))?;
            interval = Duration::from_micros(value.parse()?);
        } else if let Some((port, index)) = arg.split_once(':') {
            ports.push((port.parse::<u16>()?, index.parse::<usize>()?));
        } else {
            ports.push((arg.parse::<u16>()?, ports.len()));
        }
    }
    anyhow::ensure!(
        !ports.is_empty(),
        "usage: __backend [--chunk-interval-us N] PORT[:INDEX]..."
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for (port, index) in ports {
            let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
            tasks.push(tokio::spawn(serve(listener, index, interval)));
        }
        for task in tasks {
            task.await?;
        }
        anyhow::Ok(())
    })
}

async fn serve(listener: TcpListener, index: usize, interval: Duration) {
    let worker = HeaderValue::from(index);
    let completion = Bytes::from(format!(
        r#"{{"id":"cmpl-bench-{index}","object":"chat.completion","created":0,"model":"{MODEL}","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hello from worker {index}."}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":8,"completion_tokens":6,"total_tokens":14}}}}"#
    ));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let worker = worker.clone();
        let completion = completion.clone();
        tokio::spawn(async move {
            let service =
                service_fn(move |req| respond(req, worker.clone(), completion.clone(), interval));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    worker: HeaderValue,
    completion: Bytes,
    interval: Duration,
) -> Result<Response<Reply>, Infallible> {
    let (parts, body) = req.into_parts();
    let json = |body: &'static str| Reply::Once(Some(Bytes::from_static(body.as_bytes())));
    let mut response = match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/chat/completions" | "/v1/completions") => {
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            if find(&body, b"\"stream\":true").is_some()
                || find(&body, b"\"stream\": true").is_some()
            {
                let tokens = max_tokens(&body).unwrap_or(16).max(1);
                let mut response = Response::new(Reply::Stream(SseStream::new(tokens, interval)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                response
            } else {
                Response::new(Reply::Once(Some(completion)))
            }
        }
        (&Method::GET, "/health" | "/health_generate") => Response::new(json("")),
        (&Method::GET, "/v1/models") => Response::new(json(
            r#"{"object":"list","data":[{"id":"chat","object":"model","created":0,"owned_by":"bench","root":"chat","max_model_len":4096}]}"#,
        )),
        _ => {
            let mut response = Response::new(json(r#"{"error":"not found"}"#));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    };
    let headers = response.headers_mut();
    headers
        .entry(header::CONTENT_TYPE)
        .or_insert(HeaderValue::from_static("application/json"));
    headers.insert("x-bench-worker", worker);
    Ok(response)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `max_tokens` (or `max_completion_tokens`) from a JSON body, without
/// parsing the rest of it.
fn max_tokens(body: &[u8]) -> Option<u64> {
    let at = find(body, b"\"max_tokens\":")
        .map(|i| i + 13)
        .or_else(|| find(body, b"\"max_completion_tokens\":").map(|i| i + 24))?;
    let digits: Vec<u8> = body[at..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Nanoseconds since the Unix epoch: the clock both the backend and the
/// client read (they run on one machine).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A response body.
pub enum Reply {
    /// One buffer.
    Once(Option<Bytes>),
    /// An SSE stream.
    Stream(SseStream),
}

/// An SSE stream of stamped chunks.
pub struct SseStream {
    remaining: u64,
    interval: Duration,
    /// `None` until the first chunk is out (it goes at once).
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    done: bool,
}

impl SseStream {
    fn new(tokens: u64, interval: Duration) -> Self {
        let interval = if tokens >= IDLE_STREAM_TOKENS {
            IDLE_INTERVAL
        } else {
            interval
        };
        Self {
            remaining: tokens,
            interval,
            sleep: None,
            done: false,
        }
    }
}

/// One stamped chunk, as vLLM writes a `chat.completion.chunk`.
pub fn chunk(stamp_ns: u64, last: bool) -> Bytes {
    let finish = if last { r#""stop""# } else { "null" };
    let mut text = format!(
        r#"data: {{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":"{MODEL}","choices":[{{"index":0,"delta":{{"content":"t={stamp_ns} "}},"finish_reason":{finish}}}]}}"#
    );
    text.push_str("\n\n");
    if last {
        text.push_str("data: [DONE]\n\n");
    }
    Bytes::from(text)
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Reply::Once(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Reply::Stream(stream) => {
                if stream.done {
                    return Poll::Ready(None);
                }
                if let Some(sleep) = stream.sleep.as_mut() {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let next = tokio::time::Instant::now() + stream.interval;
                    sleep.as_mut().reset(next);
                } else {
                    stream.sleep = Some(Box::pin(tokio::time::sleep(stream.interval)));
                }
                stream.remaining -= 1;
                let last = stream.remaining == 0;
                stream.done = last;
                Poll::Ready(Some(Ok(Frame::data(chunk(now_ns(), last)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Once(bytes) => bytes.is_none(),
            Reply::Stream(stream) => stream.done,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Reply::Once(Some(bytes)) => http_body::SizeHint::with_exact(bytes.len() as u64),
            Reply::Once(None) => http_body::SizeHint::with_exact(0),
            Reply::Stream(_) => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_max_tokens_and_ignores_the_rest() {
        assert_eq!(
            max_tokens(br#"{"model":"chat","max_tokens": 42,"x":1}"#),
            Some(42)
        );
        assert_eq!(max_tokens(br#"{"max_completion_tokens":7}"#), Some(7));
        assert_eq!(max_tokens(br#"{"model":"chat"}"#), None);
    }

    #[test]
    fn the_last_chunk_ends_the_stream() {
        let last = chunk(5, true);
        let text = std::str::from_utf8(&last).unwrap_or_default();
        assert!(text.contains("t=5 "), "{text}");
        assert!(text.contains(r#""finish_reason":"stop""#), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
}
