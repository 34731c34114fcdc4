//! The rest of the API a router must carry, answered without an engine:
//! `/v1/embeddings`, `/v1/audio/transcriptions` (a multipart form),
//! `/tokenize` and `/detokenize`. Answers are deterministic functions of
//! the input, in vLLM's shapes, so a test can tell they came through whole.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::api::{ResponseBody, error, json};
use crate::server::Shared;

/// The largest body read (an audio file fits).
const MAX_BODY: usize = 32 << 20;

/// Which of these routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Embeddings,
    Transcriptions,
    Tokenize,
    Detokenize,
}

impl Route {
    pub(crate) fn of(path: &str) -> Option<Self> {
        match path {
            "/v1/embeddings" => Some(Self::Embeddings),
            "/v1/audio/transcriptions" => Some(Self::Transcriptions),
            "/tokenize" => Some(Self::Tokenize),
            "/detokenize" => Some(Self::Detokenize),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: Option<String>,
    input: Input,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    #[serde(default)]
    prompt: String,
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

/// A word's token id: stable, and a detokenizer can map it back only for
/// words it has seen, so detokenize answers `t{id}` per token.
fn token(word: &str) -> u32 {
    word.bytes().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    }) % 50_000
}

/// Serves one of these routes.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    route: Route,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("could not read the request body: {e}"),
            );
        }
    };
    // The served name asked for (the first when none), or vLLM's 404.
    let known = |model: Option<&str>| match model {
        Some(name) if !shared.served.iter().any(|s| s.name == name) => {
            Err(format!("The model `{name}` does not exist."))
        }
        Some(name) => Ok(name.to_owned()),
        None => Ok(shared.served[0].name.clone()),
    };
    let unknown = |message: String| error(StatusCode::NOT_FOUND, &message);
    let bad = |e: serde_json::Error| error(StatusCode::BAD_REQUEST, &e.to_string());
    let answer = match route {
        Route::Embeddings => {
            let request: EmbeddingsRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            let model = match known(request.model.as_deref()) {
                Ok(m) => m,
                Err(message) => return unknown(message),
            };
            let inputs = match request.input {
                Input::One(one) => vec![one],
                Input::Many(many) => many,
            };
            let tokens: usize = inputs.iter().map(|i| i.split_whitespace().count()).sum();
            let data: Vec<_> = inputs
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    let seed = token(text);
                    let embedding: Vec<f64> = (0..8)
                        .map(|i| f64::from((seed.wrapping_mul(i + 1)) % 1000) / 1000.0)
                        .collect();
                    serde_json::json!({"object": "embedding", "index": index, "embedding": embedding})
                })
                .collect();
            serde_json::json!({
                "object": "list", "model": model, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            })
        }
        Route::Transcriptions => {
            let (model, audio) = form(&content_type, &body);
            let model = match known(model) {
                Ok(m) => m,
                Err(message) => return unknown(message),
            };
            serde_json::json!({"text": format!("[{model} heard {audio} bytes]")})
        }
        Route::Tokenize => {
            let request: TokenizeRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            if let Err(message) = known(request.model.as_deref()) {
                return unknown(message);
            }
            let tokens: Vec<u32> = request.prompt.split_whitespace().map(token).collect();
            serde_json::json!({"count": tokens.len(), "max_model_len": shared.config.max_model_len, "tokens": tokens})
        }
        Route::Detokenize => {
            let request: DetokenizeRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            if let Err(message) = known(request.model.as_deref()) {
                return unknown(message);
            }
            let words: Vec<String> = request.tokens.iter().map(|t| format!("t{t}")).collect();
            serde_json::json!({"prompt": words.join(" ")})
        }
    };
    json(StatusCode::OK, Bytes::from(answer.to_string()))
}

/// The `model` field of a multipart form (what follows `name="model"` and
/// a blank line, to the line's end) and the size of its `file` part, read
/// loosely: this is a stand-in, not a parser.
fn form<'a>(content_type: &str, body: &'a [u8]) -> (Option<&'a str>, usize) {
    if !content_type.starts_with("multipart/form-data") {
        return (None, 0);
    }
    let find = |from: usize, needle: &[u8]| {
        body.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|at| from + at)
    };
    // The first byte of the part that `marker` names.
    let after = |marker: &[u8]| -> Option<usize> {
        let at = find(0, marker)?;
        Some(find(at, b"\r\n\r\n")? + 4)
    };
    let model = after(b"name=\"model\"").and_then(|start| {
        let end = find(start, b"\r\n")?;
        std::str::from_utf8(&body[start..end]).ok()
    });
    let audio = after(b"name=\"file\"").map_or(0, |start| {
        find(start, b"\r\n--").unwrap_or(body.len()) - start
    });
    (model, audio)
}
