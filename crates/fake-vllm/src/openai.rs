//! The OpenAI-compatible wire format as vLLM speaks it: request parsing,
//! JSON replies, SSE chunks and vLLM's error bodies.
//!
//! SSE chunks are assembled from a per-request prefix and a per-token
//! middle, so streaming a token costs one small buffer and no serde pass.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::engine::Fnv;
use crate::metrics::FinishReason;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

/// The fields of either request kind that the fake engine uses.
#[derive(Debug)]
pub(crate) struct InferenceRequest {
    pub(crate) model: Option<String>,
    /// FNV state over the prompt's parts (see [`crate::reply_text`]).
    pub(crate) prompt: Fnv,
    pub(crate) prompt_tokens: u64,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) seed: i64,
    pub(crate) stop: Vec<String>,
}

#[derive(Deserialize)]
struct CompletionBody {
    model: Option<String>,
    prompt: Prompt,
    max_tokens: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    seed: Option<i64>,
    stop: Option<Stop>,
}

#[derive(Deserialize)]
struct ChatBody {
    model: Option<String>,
    messages: Vec<Message>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    seed: Option<i64>,
    stop: Option<Stop>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    TokenIds(Vec<i64>),
    TokenIdBatches(Vec<Vec<i64>>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// Non-text parts (images, audio) are accepted and contribute nothing.
#[derive(Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn stop_list(stop: Option<Stop>) -> Vec<String> {
    match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    }
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Parses a request body; the error is the message for a 400.
pub(crate) fn parse(kind: Kind, body: &[u8]) -> Result<InferenceRequest, String> {
    let mut prompt = Fnv::new();
    let mut prompt_tokens = 0;
    match kind {
        Kind::Completion => {
            let b: CompletionBody =
                serde_json::from_slice(body).map_err(|e| format!("invalid request: {e}"))?;
            // vLLM accepts a batch of prompts; the fake answers the first.
            match &b.prompt {
                Prompt::Text(t) => {
                    prompt.part(t);
                    prompt_tokens = words(t);
                }
                Prompt::Texts(ts) => {
                    let first = ts.first().map(String::as_str).unwrap_or_default();
                    prompt.part(first);
                    prompt_tokens = words(first);
                }
                Prompt::TokenIds(ids) => hash_ids(&mut prompt, &mut prompt_tokens, ids),
                Prompt::TokenIdBatches(batches) => hash_ids(
                    &mut prompt,
                    &mut prompt_tokens,
                    batches.first().map(Vec::as_slice).unwrap_or_default(),
                ),
            }
            Ok(InferenceRequest {
                model: b.model,
                prompt,
                prompt_tokens,
                max_tokens: b.max_tokens,
                stream: b.stream.unwrap_or(false),
                include_usage: include_usage(&b.stream_options),
                seed: b.seed.unwrap_or(0),
                stop: stop_list(b.stop),
            })
        }
        Kind::Chat => {
            let b: ChatBody =
                serde_json::from_slice(body).map_err(|e| format!("invalid request: {e}"))?;
            for m in &b.messages {
                prompt.part(&m.role);
                match &m.content {
                    None => prompt.part(""),
                    Some(Content::Text(t)) => {
                        prompt.part(t);
                        prompt_tokens += words(t);
                    }
                    Some(Content::Parts(parts)) => {
                        // Hashed as if the text parts were one string, so a
                        // test can predict the reply with `reply_text`.
                        for t in parts.iter().filter_map(|p| p.text.as_deref()) {
                            prompt.write(t.as_bytes());
                            prompt_tokens += words(t);
                        }
                        prompt.write(&[0xff]);
                    }
                }
            }
            Ok(InferenceRequest {
                model: b.model,
                prompt,
                prompt_tokens,
                max_tokens: b.max_completion_tokens.or(b.max_tokens),
                stream: b.stream.unwrap_or(false),
                include_usage: include_usage(&b.stream_options),
                seed: b.seed.unwrap_or(0),
                stop: stop_list(b.stop),
            })
        }
    }
}

fn hash_ids(prompt: &mut Fnv, count: &mut u64, ids: &[i64]) {
    for id in ids {
        prompt.write(&id.to_le_bytes());
    }
    prompt.write(&[0xff]);
    *count = ids.len() as u64;
}

fn include_usage(options: &Option<StreamOptions>) -> bool {
    options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false)
}

// ---- errors ----------------------------------------------------------------

/// vLLM's error body. Clients read `message`; `type` and `code` mirror the
/// HTTP status as vLLM sets them.
#[derive(Serialize)]
struct ErrorBody<'a> {
    object: &'static str,
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: u16,
}

pub(crate) fn error_body(status: http::StatusCode, message: &str) -> Bytes {
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        500 => "InternalServerError",
        503 => "ServiceUnavailableError",
        _ => "Error",
    };
    let body = ErrorBody {
        object: "error",
        message,
        kind,
        param: None,
        code: status.as_u16(),
    };
    Bytes::from(serde_json::to_vec(&body).expect("an error body always serializes"))
}

// ---- whole replies -------------------------------------------------------

#[derive(Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) total_tokens: u64,
    pub(crate) completion_tokens: u64,
}

impl Usage {
    pub(crate) fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens,
        }
    }
}

#[derive(Serialize)]
struct Reply<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [C; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: ChatMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
    stop_reason: Option<()>,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: &'a str,
    tool_calls: [(); 0],
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: &'static str,
    stop_reason: Option<()>,
}

/// A non-streamed reply body.
pub(crate) struct ReplyParts<'a> {
    pub(crate) kind: Kind,
    pub(crate) id: &'a str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    pub(crate) text: &'a str,
    pub(crate) finish: FinishReason,
    pub(crate) usage: Usage,
}

pub(crate) fn reply_body(r: ReplyParts<'_>) -> Bytes {
    let finish_reason = r.finish.as_str();
    let json = match r.kind {
        Kind::Chat => serde_json::to_vec(&Reply {
            id: r.id,
            object: "chat.completion",
            created: r.created,
            model: r.model,
            choices: [ChatChoice {
                index: 0,
                message: ChatMessage {
                    role: "assistant",
                    content: r.text,
                    tool_calls: [],
                },
                logprobs: None,
                finish_reason,
                stop_reason: None,
            }],
            usage: r.usage,
        }),
        Kind::Completion => serde_json::to_vec(&Reply {
            id: r.id,
            object: "text_completion",
            created: r.created,
            model: r.model,
            choices: [CompletionChoice {
                index: 0,
                text: r.text,
                logprobs: None,
                finish_reason,
                stop_reason: None,
            }],
            usage: r.usage,
        }),
    };
    Bytes::from(json.expect("a reply always serializes"))
}

// ---- streaming -------------------------------------------------------------

pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

/// Builds one request's SSE chunks.
#[derive(Debug)]
pub(crate) struct ChunkWriter {
    kind: Kind,
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[`
    head: Box<str>,
}

impl ChunkWriter {
    /// `model_json` is the served name already JSON-encoded (quoted).
    pub(crate) fn new(kind: Kind, id: &str, created: u64, model_json: &str) -> Self {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        // `id` is generated by the server from hex digits: no escaping needed.
        let head = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{model_json},\"choices\":["
        );
        Self {
            kind,
            head: head.into_boxed_str(),
        }
    }

    fn chunk(&self, parts: &[&str]) -> Bytes {
        let len = self.head.len() + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(self.head.as_bytes());
        for p in parts {
            buf.extend_from_slice(p.as_bytes());
        }
        Bytes::from(buf)
    }

    /// Chat only: the first chunk, announcing the assistant role.
    pub(crate) fn role(&self) -> Bytes {
        self.chunk(&[
            r#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
            "\n\n",
        ])
    }

    /// One token whose text is `escaped_a` then `escaped_b`, both already
    /// JSON-escaped (two parts so a word's leading space costs no allocation).
    pub(crate) fn token(&self, escaped_a: &str, escaped_b: &str) -> Bytes {
        match self.kind {
            Kind::Chat => self.chunk(&[
                r#"{"index":0,"delta":{"content":""#,
                escaped_a,
                escaped_b,
                r#""},"logprobs":null,"finish_reason":null}]}"#,
                "\n\n",
            ]),
            Kind::Completion => self.chunk(&[
                r#"{"index":0,"text":""#,
                escaped_a,
                escaped_b,
                r#"","logprobs":null,"finish_reason":null,"stop_reason":null}]}"#,
                "\n\n",
            ]),
        }
    }

    /// The chunk carrying the finish reason.
    pub(crate) fn finish(&self, reason: FinishReason) -> Bytes {
        let reason = match reason {
            FinishReason::Stop => "\"stop\"",
            FinishReason::Length => "\"length\"",
        };
        match self.kind {
            Kind::Chat => self.chunk(&[
                r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"#,
                reason,
                r#","stop_reason":null}]}"#,
                "\n\n",
            ]),
            Kind::Completion => self.chunk(&[
                r#"{"index":0,"text":"","logprobs":null,"finish_reason":"#,
                reason,
                r#","stop_reason":null}]}"#,
                "\n\n",
            ]),
        }
    }

    /// `stream_options.include_usage`: empty choices plus usage.
    pub(crate) fn usage(&self, usage: &Usage) -> Bytes {
        let tail = format!(
            "],\"usage\":{{\"prompt_tokens\":{},\"total_tokens\":{},\"completion_tokens\":{}}}}}\n\n",
            usage.prompt_tokens, usage.total_tokens, usage.completion_tokens
        );
        self.chunk(&[&tail])
    }
}

/// `s` JSON-escaped, without the surrounding quotes.
pub(crate) fn json_escape(s: &str) -> String {
    let quoted = serde_json::to_string(s).expect("a string always serializes");
    quoted[1..quoted.len() - 1].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json(chunk: &Bytes) -> Value {
        let text = std::str::from_utf8(chunk).expect("utf-8");
        let body = text
            .strip_prefix("data: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .expect("SSE framing");
        serde_json::from_str(body).expect("valid JSON")
    }

    #[test]
    fn chat_chunks_have_openai_shape() {
        let w = ChunkWriter::new(Kind::Chat, "chatcmpl-1", 7, "\"ch\\\"at\"");
        let role = json(&w.role());
        assert_eq!(role["object"], "chat.completion.chunk");
        assert_eq!(role["id"], "chatcmpl-1");
        assert_eq!(role["created"], 7);
        assert_eq!(role["model"], "ch\"at");
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(role["choices"][0]["finish_reason"], Value::Null);

        let tok = json(&w.token(&json_escape("[a \"b\"]"), ""));
        assert_eq!(tok["choices"][0]["delta"]["content"], "[a \"b\"]");
        assert!(tok["choices"][0]["delta"].get("role").is_none());

        let fin = json(&w.finish(FinishReason::Length));
        assert_eq!(fin["choices"][0]["finish_reason"], "length");
        assert_eq!(fin["choices"][0]["delta"], serde_json::json!({}));

        let usage = json(&w.usage(&Usage::new(3, 4)));
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(
            usage["usage"],
            serde_json::json!({"prompt_tokens":3,"total_tokens":7,"completion_tokens":4})
        );
    }

    #[test]
    fn completion_chunks_carry_text() {
        let w = ChunkWriter::new(Kind::Completion, "cmpl-1", 7, "\"m\"");
        let tok = json(&w.token(" ", "alpha"));
        assert_eq!(tok["object"], "text_completion");
        assert_eq!(tok["choices"][0]["text"], " alpha");
        let fin = json(&w.finish(FinishReason::Stop));
        assert_eq!(fin["choices"][0]["finish_reason"], "stop");
        assert_eq!(fin["choices"][0]["text"], "");
    }

    #[test]
    fn parses_both_kinds_and_rejects_missing_fields() {
        let r = parse(
            Kind::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":"hi there"},{"role":"user","content":[{"type":"text","text":"a b c"},{"type":"image_url","image_url":{"url":"x"}}]}],"max_completion_tokens":3,"stream":true,"stream_options":{"include_usage":true},"seed":-4,"stop":"x"}"#,
        )
        .expect("valid");
        assert_eq!(
            (r.model.as_deref(), r.prompt_tokens, r.max_tokens),
            (Some("m"), 5, Some(3))
        );
        assert!(r.stream && r.include_usage);
        assert_eq!((r.seed, r.stop), (-4, vec!["x".to_owned()]));

        let r = parse(
            Kind::Completion,
            br#"{"prompt":["one two","three"],"stream":null}"#,
        )
        .expect("valid");
        assert_eq!((r.model, r.prompt_tokens, r.stream), (None, 2, false));
        let r = parse(Kind::Completion, br#"{"prompt":[1,2,3]}"#).expect("valid");
        assert_eq!(r.prompt_tokens, 3);

        for (kind, body) in [
            (Kind::Chat, &br#"{"model":"m"}"#[..]),
            (Kind::Chat, b"{not json"),
            (Kind::Completion, br#"{"model":"m"}"#),
            (Kind::Completion, br#"{"prompt":"x","max_tokens":"many"}"#),
        ] {
            assert!(parse(kind, body).is_err());
        }
    }

    #[test]
    fn error_body_is_vllms_shape() {
        let body = error_body(http::StatusCode::NOT_FOUND, "The model `x` does not exist.");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404})
        );
    }
}
