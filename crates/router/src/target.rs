//! Where a public request goes, from its method, path and body: the
//! router's own answers (`/health`, `GET /v1/models`, `GET
//! /v1/models/{id}`), or an endpoint and the path its engines get.
//!
//! An endpoint is named, first to last: by the path
//! (`/endpoints/{name}/...`), by the body's `model` (JSON, or the `model`
//! field of a multipart form), or, for a request without one (`GET
//! /version`, `/tokenize` with no `model`), by being the table's only
//! endpoint.

use std::borrow::Cow;

use http::{HeaderMap, Method, header};
use serde::Deserialize;

use crate::error::{RouteError, short};

/// What a request is.
#[derive(Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// `GET /health`: the router's own.
    Health,
    /// `GET /v1/models`.
    Models,
    /// `GET /v1/models/{id}`.
    Model(&'a str),
    /// For an engine: the endpoint the path names (if it does), and the path
    /// the engine gets.
    Forward {
        /// From `/endpoints/{name}/...`.
        endpoint: Option<&'a str>,
        /// The path after that prefix (or the whole path).
        upstream_path: &'a str,
    },
}

/// Classifies a request by its method and path.
pub fn classify<'a>(method: &Method, path: &'a str) -> Result<Target<'a>, RouteError> {
    let (endpoint, upstream_path) = match path.strip_prefix("/endpoints/") {
        Some(rest) => match rest.split_once('/') {
            Some((name, tail)) => (Some(name), &path[path.len() - tail.len() - 1..]),
            None => (Some(rest), "/"),
        },
        None => (None, path),
    };
    if endpoint.is_none() && method == Method::GET {
        match path {
            "/health" => return Ok(Target::Health),
            "/v1/models" => return Ok(Target::Models),
            _ => {
                if let Some(id) = path.strip_prefix("/v1/models/") {
                    return Ok(Target::Model(id));
                }
            }
        }
    }
    let forwardable = (method == Method::POST || method == Method::GET)
        && crossfade_common::http::is_inference_path(upstream_path);
    if !forwardable || endpoint.is_some_and(str::is_empty) {
        return Err(RouteError::UnknownRoute {
            method: method.to_string(),
            path: short(path),
        });
    }
    Ok(Target::Forward {
        endpoint,
        upstream_path,
    })
}

/// The fields of a JSON body the router reads: only these are parsed out;
/// everything else is skipped and forwarded as it came.
#[derive(Debug, Deserialize)]
pub struct Peek<'a> {
    /// The endpoint (or alias) asked for.
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    /// OpenAI's end-user id: a session key.
    #[serde(borrow, default)]
    pub user: Option<Cow<'a, str>>,
}

/// What the body says about routing: JSON's `model` and `user`, or a
/// multipart form's `model` field. An empty body says nothing; a JSON
/// body that does not parse is refused.
pub fn peek<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<Peek<'a>, RouteError> {
    let nothing = Peek {
        model: None,
        user: None,
    };
    if body.is_empty() {
        return Ok(nothing);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if let Some(boundary) = multipart_boundary(content_type) {
        return Ok(Peek {
            model: multipart_field(body, boundary, "model").map(Cow::Borrowed),
            user: None,
        });
    }
    serde_json::from_slice::<Peek<'_>>(body).map_err(|e| {
        RouteError::BadRequest(format!(
            "the request body is not valid JSON with a string `model`: {e}"
        ))
    })
}

fn multipart_boundary(content_type: &str) -> Option<&str> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"'))
            .filter(|b| !b.is_empty() && b.len() <= 70)
    })
}

/// The value of the form field `name` in a multipart body, when it is
/// text.
fn multipart_field<'a>(body: &'a [u8], boundary: &str, name: &str) -> Option<&'a str> {
    let delimiter = format!("--{boundary}");
    let wanted = format!("name=\"{name}\"");
    let mut rest = body;
    while let Some(start) = find(rest, delimiter.as_bytes()) {
        rest = &rest[start + delimiter.len()..];
        let headers_end = find(rest, b"\r\n\r\n")?;
        let headers = std::str::from_utf8(&rest[..headers_end]).ok()?;
        let content = &rest[headers_end + 4..];
        let end = find(content, format!("\r\n{delimiter}").as_bytes())?;
        let is_field = headers.lines().any(|line| {
            line.to_ascii_lowercase()
                .starts_with("content-disposition:")
                && line.split(';').any(|part| part.trim() == wanted)
        });
        if is_field {
            return std::str::from_utf8(&content[..end]).ok();
        }
        rest = &content[end..];
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_router_answers_some_paths_and_forwards_the_inference_api() {
        let get = |path| classify(&Method::GET, path);
        let post = |path| classify(&Method::POST, path);
        assert_eq!(get("/health").unwrap(), Target::Health);
        assert_eq!(get("/v1/models").unwrap(), Target::Models);
        assert_eq!(get("/v1/models/org/m").unwrap(), Target::Model("org/m"));
        for path in [
            "/v1/chat/completions",
            "/tokenize",
            "/v2/rerank",
            "/invocations",
        ] {
            assert_eq!(
                post(path).unwrap(),
                Target::Forward {
                    endpoint: None,
                    upstream_path: path
                }
            );
        }
        assert_eq!(
            get("/version").unwrap(),
            Target::Forward {
                endpoint: None,
                upstream_path: "/version"
            }
        );
        assert_eq!(
            get("/endpoints/chat/v1/models").unwrap(),
            Target::Forward {
                endpoint: Some("chat"),
                upstream_path: "/v1/models"
            }
        );
        for refused in [
            post("/metrics"),
            get("/_fake/fault"),
            post("/v1/../metrics"),
            classify(&Method::DELETE, "/v1/chat/completions"),
            post("/endpoints//v1/completions"),
            post("/endpoints/chat"),
        ] {
            assert!(
                matches!(refused, Err(RouteError::UnknownRoute { .. })),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn the_model_comes_from_json_or_a_multipart_form() {
        let mut headers = HeaderMap::new();
        let json = br#"{"model": "chat", "user": "u1", "messages": []}"#;
        let found = peek(&headers, json).unwrap();
        assert_eq!(
            (found.model.as_deref(), found.user.as_deref()),
            (Some("chat"), Some("u1"))
        );
        assert!(peek(&headers, b"").unwrap().model.is_none());
        assert!(matches!(
            peek(&headers, b"{nope"),
            Err(RouteError::BadRequest(_))
        ));

        headers.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=XyZ".parse().unwrap(),
        );
        let form = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01name=\"model\"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ--\r\n";
        assert_eq!(
            peek(&headers, form).unwrap().model.as_deref(),
            Some("whisper")
        );
        let without =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\ndata\r\n--XyZ--\r\n";
        assert!(peek(&headers, without).unwrap().model.is_none());
        assert!(peek(&headers, b"garbage").unwrap().model.is_none());
    }
}
