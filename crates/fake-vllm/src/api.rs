//! vLLM's HTTP endpoints: routing, inference handlers and the response body.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::engine::{Job, Step, Token, Words};
use crate::faults::Action;
use crate::metrics::RequestGuard;
use crate::openai::{self, ChunkWriter, Kind, ReplyParts, Usage};
use crate::server::{Shared, unix_now};

/// Which model produced a reply; not a vLLM header.
pub const MODEL_HEADER: &str = "x-fake-vllm-model";
/// Which served name produced a reply; not a vLLM header.
pub const SERVED_NAME_HEADER: &str = "x-fake-vllm-served-name";

/// Request bodies beyond this are refused rather than buffered.
const MAX_REQUEST_BODY: usize = 32 << 20;

/// Every response's body: a whole buffer, or an SSE stream produced token
/// by token as hyper polls it (each chunk its own frame).
pub(crate) enum ResponseBody {
    Full {
        data: Option<Bytes>,
        /// Keeps a finished request counted as running until its reply is
        /// handed over.
        guard: Option<RequestGuard>,
    },
    Stream(Pin<Box<dyn Stream<Item = Bytes> + Send>>),
}

impl ResponseBody {
    fn full(data: Bytes) -> Self {
        ResponseBody::Full {
            data: (!data.is_empty()).then_some(data),
            guard: None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Full { data, guard } => match data.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => {
                    guard.take();
                    Poll::Ready(None)
                }
            },
            ResponseBody::Stream(stream) => stream
                .as_mut()
                .poll_next(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full { data: None, .. })
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseBody::Stream(_) => SizeHint::default(),
        }
    }
}

pub(crate) fn json(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// vLLM's error JSON with `status`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response<ResponseBody> {
    json(status, openai::error_body(status, message))
}

/// FastAPI's answer for a path it has no route for.
pub(crate) fn not_found() -> Response<ResponseBody> {
    json(
        StatusCode::NOT_FOUND,
        Bytes::from_static(br#"{"detail":"Not Found"}"#),
    )
}

pub(crate) fn method_not_allowed() -> Response<ResponseBody> {
    json(
        StatusCode::METHOD_NOT_ALLOWED,
        Bytes::from_static(br#"{"detail":"Method Not Allowed"}"#),
    )
}

fn empty(status: StatusCode) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// The request carries `Authorization: Bearer KEY`.
fn authorized(req: &Request<Incoming>, key: &str) -> bool {
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| given == key)
}

/// Serves one request.
pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ResponseBody> {
    let path = req.uri().path();
    if path.starts_with("/_fake/") {
        return crate::control::handle(shared, req).await;
    }
    if shared.drain.is_cancelled() {
        // The connection outlived the listener: refuse, as a draining vLLM does.
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is shutting down.",
        );
    }
    if let Some(key) = &shared.config.api_key
        && path.starts_with("/v1")
        && !authorized(&req, &key.0)
    {
        // vLLM's answer when `--api-key` is set and the bearer is wrong.
        return json(
            StatusCode::UNAUTHORIZED,
            Bytes::from_static(br#"{"error":"Unauthorized"}"#),
        );
    }
    let get = req.method() == Method::GET;
    let post = req.method() == Method::POST;
    if post && let Some(route) = crate::extra::Route::of(path) {
        return crate::extra::handle(shared, route, req).await;
    }
    match path {
        "/health" | "/ping" if get => empty(StatusCode::OK),
        "/v1/models" if get => json(StatusCode::OK, shared.models_body.clone()),
        "/version" if get => json(
            StatusCode::OK,
            Bytes::from_static(br#"{"version":"0.0.0-fake"}"#),
        ),
        "/metrics" if get => {
            let text = shared
                .engine
                .metrics
                .render(&shared.config.served_model_names[0]);
            let mut response = Response::new(ResponseBody::full(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/v1/chat/completions" if post => inference(shared, Kind::Chat, req).await,
        "/v1/completions" if post => inference(shared, Kind::Completion, req).await,
        "/health"
        | "/ping"
        | "/v1/models"
        | "/version"
        | "/metrics"
        | "/v1/chat/completions"
        | "/v1/completions" => method_not_allowed(),
        _ => not_found(),
    }
}

async fn inference(
    shared: Arc<Shared>,
    kind: Kind,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let action = shared.faults.on_request();
    match action {
        Action::Error500 => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal server error (fake-vllm fault error-500)",
            );
        }
        Action::Crash => {
            shared.crash();
            // The connection is cut under us; never answer.
            return std::future::pending().await;
        }
        Action::Serve | Action::Hang => {}
    }

    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("could not read the request body: {e}"),
            );
        }
    };
    let request = match openai::parse(kind, &body) {
        Ok(request) => request,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let served_index = match request.model.as_deref() {
        None => 0,
        Some(name) => match shared.served.iter().position(|s| s.name == name) {
            Some(i) => i,
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("The model `{name}` does not exist."),
                );
            }
        },
    };
    let max_tokens = match max_tokens(&shared, &request) {
        Ok(n) => n,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };

    let served = &shared.served[served_index];
    let job = Job {
        words: Words::new(
            request.prompt,
            &shared.config.model,
            &served.name,
            request.seed,
        ),
        max_tokens,
        prompt_tokens: request.prompt_tokens,
        stop: request.stop,
    };
    let mut generation = shared.engine.submit(job);
    if action == Action::Hang {
        generation.admit().await;
        // Hold the slot and the running count until the client or a
        // shutdown gives up on us.
        return std::future::pending().await;
    }

    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let id = shared.next_id(prefix);
    let created = unix_now();

    let mut response = if request.stream {
        let stream = SseStream {
            chunks: ChunkWriter::new(kind, &id, created, &served.name_json),
            generation,
            shared: shared.clone(),
            served: served_index,
            role_pending: kind == Kind::Chat,
            pending: None,
            include_usage: request.include_usage,
            phase: Phase::Tokens,
        };
        let stream = futures_util::stream::unfold(stream, |mut s| async move {
            let chunk = s.step().await?;
            Some((chunk, s))
        });
        let mut response = Response::new(ResponseBody::Stream(Box::pin(stream)));
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    } else {
        let mut text = String::with_capacity(served.tag.len() + max_tokens as usize * 8);
        let finish = loop {
            match generation.next().await {
                Step::Token(Token::Tag) => text.push_str(&served.tag),
                Step::Token(Token::Word(word)) => {
                    text.push(' ');
                    text.push_str(word);
                }
                Step::Finished(reason) => break reason,
            }
        };
        let body = openai::reply_body(ReplyParts {
            kind,
            id: &id,
            created,
            model: &served.name,
            text: &text,
            finish,
            usage: Usage::new(
                generation.prompt_tokens(),
                u64::from(generation.completion_tokens()),
            ),
        });
        let mut response = json(StatusCode::OK, body);
        if let ResponseBody::Full { guard, .. } = response.body_mut() {
            *guard = Some(generation.into_guard());
        }
        response
    };

    let headers = response.headers_mut();
    if let Some(model) = &shared.model_header {
        headers.insert(HeaderName::from_static(MODEL_HEADER), model.clone());
    }
    if let Some(name) = &served.name_header {
        headers.insert(HeaderName::from_static(SERVED_NAME_HEADER), name.clone());
    }
    response
}

/// The reply length, checked against the context length as vLLM does.
fn max_tokens(shared: &Shared, request: &openai::InferenceRequest) -> Result<u32, String> {
    let limit = shared.config.max_model_len;
    let prompt = request.prompt_tokens;
    let requested = match request.max_tokens {
        Some(0) => return Err("max_tokens must be at least 1, got 0.".to_owned()),
        Some(n) => n,
        // Like vLLM's "fill the context", but capped by the knob.
        None => {
            u64::from(shared.config.default_max_tokens).min(limit.saturating_sub(prompt).max(1))
        }
    };
    if prompt.saturating_add(requested) > limit {
        return Err(format!(
            "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({prompt} in the messages, {requested} in the completion). Please reduce the length of the messages or completion.",
            prompt.saturating_add(requested)
        ));
    }
    Ok(u32::try_from(requested).unwrap_or(u32::MAX))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Tokens,
    Usage,
    Done,
    End,
}

/// One streamed reply: role chunk (chat), a chunk per token, the finish
/// chunk, the usage chunk when asked for, then `[DONE]`.
struct SseStream {
    chunks: ChunkWriter,
    generation: crate::engine::Generation,
    shared: Arc<Shared>,
    served: usize,
    role_pending: bool,
    /// A token generated while the role chunk went out first.
    pending: Option<Token>,
    include_usage: bool,
    phase: Phase,
}

impl SseStream {
    async fn step(&mut self) -> Option<Bytes> {
        match self.phase {
            Phase::Tokens => {
                if let Some(token) = self.pending.take() {
                    return Some(self.token(token));
                }
                match self.generation.next().await {
                    Step::Token(token) if self.role_pending => {
                        // vLLM sends the role with the first output, not before.
                        self.role_pending = false;
                        self.pending = Some(token);
                        Some(self.chunks.role())
                    }
                    Step::Token(token) => Some(self.token(token)),
                    Step::Finished(reason) => {
                        self.phase = if self.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                        Some(self.chunks.finish(reason))
                    }
                }
            }
            Phase::Usage => {
                self.phase = Phase::Done;
                let usage = Usage::new(
                    self.generation.prompt_tokens(),
                    u64::from(self.generation.completion_tokens()),
                );
                Some(self.chunks.usage(&usage))
            }
            Phase::Done => {
                self.phase = Phase::End;
                Some(Bytes::from_static(openai::DONE))
            }
            Phase::End => None,
        }
    }

    fn token(&self, token: Token) -> Bytes {
        match token {
            Token::Tag => self
                .chunks
                .token(&self.shared.served[self.served].tag_escaped, ""),
            Token::Word(word) => self.chunks.token(" ", word),
        }
    }
}
