//! Errors the router answers itself, mapped once, here, to a status code and
//! an OpenAI-style body (`{"error": {"message", "type", "code"}}`), so
//! clients' error handling works unchanged.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Why the router answered instead of an engine. Each variant knows which
/// side failed: the client's request, the upstream, or the router's capacity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No route for this method and path.
    #[error("no route for {method} {path}")]
    UnknownRoute {
        /// The request's method.
        method: String,
        /// The request's path (only its known prefix is ever logged).
        path: String,
    },
    /// The body is not JSON, or has no usable `model`.
    #[error("{0}")]
    BadRequest(String),
    /// The URL exceeds [`MAX_URL_BYTES`].
    #[error("the URL is {0} bytes; at most {max}", max = MAX_URL_BYTES)]
    UrlTooLong(usize),
    /// The body exceeds the configured limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// No endpoint serves this model.
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// The endpoint has no deployment with weight, or every worker is
    /// draining or down; retrying later can work.
    #[error("no capacity for `{endpoint}` right now; retry later")]
    NoCapacity {
        /// The endpoint.
        endpoint: String,
    },
    /// The router is at its concurrency limit.
    #[error("too many requests in flight; retry later")]
    Overloaded,
    /// No worker could be reached.
    #[error("no worker of `{endpoint}` could be reached")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
    },
    /// The upstream failed after it may have seen the request.
    #[error("the upstream failed: {0}")]
    Upstream(String),
    /// No response headers within the time-to-first-token bound.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The request body did not arrive within its bound (a client that
    /// trickles it in holds no slot for longer).
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    /// The request body arrives slower than the minimum rate.
    #[error("the request body arrives slower than {rate} bytes a second")]
    BodyTooSlow {
        /// The minimum, in bytes a second.
        rate: u32,
    },
    /// Too many header fields, or too many bytes of them.
    #[error("request header fields too large: {0}")]
    HeadersTooLarge(String),
    /// Keys are required and the request shows none.
    #[error(
        "You didn't provide an API key. Send it as `Authorization: Bearer KEY` (or in an `api-key` header)."
    )]
    NoApiKey,
    /// No such key, or a wrong one.
    #[error("Incorrect API key provided.")]
    WrongApiKey,
    /// The key was revoked.
    #[error("This API key has been revoked.")]
    RevokedApiKey,
    /// The key may not call this endpoint.
    #[error("This API key may not call `{0}`.")]
    EndpointNotAllowed(String),
    /// The endpoint has no replica and its queue is full.
    #[error("no replica of `{endpoint}` is ready and its queue is full; retry later")]
    QueueFull {
        /// The endpoint.
        endpoint: String,
    },
    /// The endpoint had no replica for as long as a request may wait.
    #[error("no replica of `{endpoint}` became ready within {waited:?}; retry later")]
    QueueTimeout {
        /// The endpoint.
        endpoint: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// The client (its key, else its address) is at its concurrency limit.
    #[error("this client already has {limit} requests in flight, its limit; retry later")]
    ClientOverloaded {
        /// The limit.
        limit: u32,
    },
}

/// What a client sent, as an error may quote it: at most 64 characters,
/// control characters escaped, `...` when cut. An error never echoes a
/// caller's whole input back.
pub fn short(input: &str) -> String {
    let mut out: String = input
        .chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if input.chars().nth(64).is_some() {
        out.push_str("...");
    }
    out
}

/// The longest URL (path and query) the router accepts: the inference API
/// needs short ones.
pub const MAX_URL_BYTES: usize = 8 * 1024;

/// How long a client should wait before retrying a 429 or 503.
pub const RETRY_AFTER_SECONDS: u32 = 1;

impl RouteError {
    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownRoute { .. } | Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UrlTooLong(_) => StatusCode::URI_TOO_LONG,
            Self::BodyTimeout(_) | Self::BodyTooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::NoApiKey | Self::WrongApiKey | Self::RevokedApiKey => StatusCode::UNAUTHORIZED,
            Self::EndpointNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::Overloaded | Self::ClientOverloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NoCapacity { .. } | Self::QueueFull { .. } | Self::QueueTimeout { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Unreachable { .. } | Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// OpenAI's `type` for this error.
    fn kind(&self) -> &'static str {
        match self {
            Self::UnknownRoute { .. }
            | Self::BadRequest(_)
            | Self::TooLarge { .. }
            | Self::UrlTooLong(_)
            | Self::BodyTimeout(_)
            | Self::BodyTooSlow { .. }
            | Self::HeadersTooLarge(_)
            | Self::NoApiKey
            | Self::WrongApiKey
            | Self::RevokedApiKey
            | Self::ModelNotFound(_) => "invalid_request_error",
            Self::EndpointNotAllowed(_) => "permission_error",
            Self::Overloaded | Self::ClientOverloaded { .. } => "rate_limit_error",
            Self::NoCapacity { .. }
            | Self::QueueFull { .. }
            | Self::QueueTimeout { .. }
            | Self::Unreachable { .. }
            | Self::Upstream(_)
            | Self::Timeout(_) => "server_error",
        }
    }

    /// OpenAI's `code` for this error; also the `reason` label of the
    /// rejection metric (a fixed set, never user input).
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownRoute { .. } => "unknown_url",
            Self::BadRequest(_) => "invalid_request",
            Self::TooLarge { .. } => "request_too_large",
            Self::UrlTooLong(_) => "url_too_long",
            Self::BodyTimeout(_) | Self::BodyTooSlow { .. } => "request_timeout",
            Self::HeadersTooLarge(_) => "request_header_fields_too_large",
            Self::NoApiKey | Self::WrongApiKey | Self::RevokedApiKey => "invalid_api_key",
            Self::EndpointNotAllowed(_) => "endpoint_not_allowed",
            Self::ClientOverloaded { .. } => "client_rate_limit_exceeded",
            Self::ModelNotFound(_) => "model_not_found",
            Self::Overloaded => "rate_limit_exceeded",
            Self::NoCapacity { .. } => "no_capacity",
            Self::QueueFull { .. } => "queue_full",
            Self::QueueTimeout { .. } => "queue_timeout",
            Self::Unreachable { .. } => "upstream_unreachable",
            Self::Upstream(_) => "upstream_error",
            Self::Timeout(_) => "upstream_timeout",
        }
    }

    /// Whether the client may retry later (429 and 503 carry `Retry-After`).
    pub fn is_retryable_by_client(&self) -> bool {
        matches!(
            self.status(),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        )
    }

    /// The OpenAI-style JSON body.
    pub fn body(&self) -> Bytes {
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": null,
                "code": self.code(),
            }
        })
        .to_string()
        .into()
    }

    /// The whole response, with `Retry-After` where retrying can help.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = Response::new(B::from(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.is_retryable_by_client() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_error_quotes_a_short_escaped_prefix_of_the_input() {
        assert_eq!(short("gpt-4"), "gpt-4");
        let long = short(&"x".repeat(10_000));
        assert_eq!(long, format!("{}...", "x".repeat(64)));
        assert_eq!(short("a\x1b[2Jb"), "a\\u{1b}[2Jb");
    }

    #[test]
    fn errors_are_openai_shaped_with_the_right_status() {
        let cases = [
            (
                RouteError::ModelNotFound("gpt-9".into()),
                404,
                "model_not_found",
                false,
            ),
            (
                RouteError::TooLarge { limit: 10 },
                413,
                "request_too_large",
                false,
            ),
            (
                RouteError::BadRequest("`model` is required".into()),
                400,
                "invalid_request",
                false,
            ),
            (
                RouteError::NoCapacity {
                    endpoint: "chat".into(),
                },
                503,
                "no_capacity",
                true,
            ),
            (RouteError::Overloaded, 429, "rate_limit_exceeded", true),
            (
                RouteError::Unreachable {
                    endpoint: "chat".into(),
                },
                502,
                "upstream_unreachable",
                false,
            ),
            (
                RouteError::Timeout(Duration::from_secs(1)),
                504,
                "upstream_timeout",
                false,
            ),
        ];
        for (error, status, code, retry_after) in cases {
            let message = error.to_string();
            let response: Response<Bytes> = error.into_response();
            assert_eq!(response.status().as_u16(), status, "{message}");
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                retry_after
            );
            let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
            assert_eq!(body["error"]["code"], code);
            assert_eq!(body["error"]["message"], message);
            assert!(body["error"]["type"].is_string());
        }
    }
}
