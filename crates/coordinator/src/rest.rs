//! The REST/JSON API beside gRPC, and the web dashboard, on `[listen] http`:
//! plain HTTP on a loopback address; beyond it, HTTPS that admits only a
//! client certificate from the fleet CA naming the `operator` role, as the
//! gRPC API does.
//!
//! The resources are the gRPC API's, in Baseten's names where Baseten has
//! them: an endpoint (Baseten's environment) carries `promotion_settings`
//! (with `rolling_deploy_config`), `in_progress_promotion` and its
//! `percent_traffic_to_new_version`; the controls are `POST
//! /v1/endpoints/{name}/pause_promotion` and its siblings. Every call goes
//! through the same service code as its gRPC twin, so the checks and the
//! errors are the same; an error is `{"error": {"code": "NOT_FOUND",
//! "message": "..."}}` with the HTTP status of its gRPC code. The OpenAPI
//! description is generated from the protos ([`openapi`]) and committed as
//! `docs/openapi.json`; the server also serves it at `/openapi.json`.

pub mod openapi;

use std::time::Duration;

use bytes::Bytes;
use crossfade_common::Shutdown;
use crossfade_common::http::{self as common_http, ServeOptions};
use crossfade_proto::json::{Shape, from_json, to_json};
use crossfade_proto::v1;
use crossfade_proto::v1::coordinator_server::Coordinator as _;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use serde_json::Value as Json;
use tonic::Status;

use crate::actor::Coordinator;
use crate::service::CoordinatorService;

/// The largest request body read (a template with its environment fits
/// many times over).
const MAX_BODY: usize = 1 << 20;
/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

const INDEX_HTML: &str = include_str!("rest/dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("rest/dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("rest/dashboard/dashboard.css");
/// The committed OpenAPI description (a test keeps it equal to
/// [`openapi::document`]).
pub const OPENAPI_JSON: &str = include_str!("../../../docs/openapi.json");

/// Serves the REST API and the dashboard on `listener` until `shutdown`:
/// in plain text, or with `tls` (mutual TLS that admits operators only,
/// [`crossfade_proto::tls::ControlTls::https_server`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::rustls::ServerConfig>,
    coordinator: Coordinator,
    shutdown: Shutdown,
) {
    let service = CoordinatorService::new(coordinator, shutdown.clone());
    let plain = tls.is_none();
    let options = ServeOptions {
        shutdown_grace: Duration::from_secs(1),
        tls: tls.map(|tls| std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(tls))),
        ..ServeOptions::default()
    };
    common_http::serve(listener, &options, shutdown, move |request| {
        let service = service.clone();
        async move { handle(&service, plain, request).await }
    })
    .await;
}

/// One request: the dashboard's files, the OpenAPI file, or an API call.
pub async fn handle(
    service: &CoordinatorService,
    plain: bool,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    if let Some(refused) = refused_origin(&parts, plain) {
        return refused;
    }
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let method = parts.method.clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/" | "/index.html") => return file(INDEX_HTML, "text/html; charset=utf-8"),
        (&Method::GET, "/dashboard.js") => {
            return file(DASHBOARD_JS, "text/javascript; charset=utf-8");
        }
        (&Method::GET, "/dashboard.css") => return file(DASHBOARD_CSS, "text/css; charset=utf-8"),
        (&Method::GET, "/openapi.json") => return file(OPENAPI_JSON, "application/json"),
        _ => {}
    }
    let Some(segments) = segments(&path) else {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "the path is not valid percent-encoded UTF-8",
        );
    };
    let body = if method == Method::GET || method == Method::DELETE {
        Json::Null
    } else {
        match read_json(&parts.headers, body).await {
            Ok(body) => body,
            Err(response) => return response,
        }
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match route(service, &method, &segments, &query, body).await {
        Ok(response) => response,
        Err(Failure::Status(status)) => from_status(&status),
        Err(Failure::Http(response)) => *response,
    }
}

/// Refuses what a browser sends on another site's behalf: a request whose
/// `Origin` is not this server (a page elsewhere posting to the API: the
/// browser always names the page's origin on such a request), and, on the
/// plain-text loopback listener, a `Host` that is not an address or
/// `localhost` (a page whose DNS name was rebound to 127.0.0.1). `curl`
/// and scripts send no `Origin` and pass. The refusal, if refused.
fn refused_origin(parts: &http::request::Parts, plain: bool) -> Option<Response<Full<Bytes>>> {
    let refuse = |message: &str| error(StatusCode::FORBIDDEN, "PERMISSION_DENIED", message);
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default();
    if plain {
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host.as_str(),
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if name.parse::<std::net::IpAddr>().is_err() && !name.eq_ignore_ascii_case("localhost") {
            return Some(refuse(
                "the Host header must name this machine by address or as localhost",
            ));
        }
    }
    if let Some(origin) = parts.headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let authority = origin.split_once("://").map_or("", |(_, rest)| rest);
        if !authority.eq_ignore_ascii_case(&host) {
            return Some(refuse(&format!(
                "a request from a page of another origin ({}) is refused",
                origin.chars().take(100).collect::<String>()
            )));
        }
    }
    None
}

/// Why a call did not succeed.
#[derive(Debug)]
enum Failure {
    /// The service said no.
    Status(Status),
    /// The request was wrong before any call (a bad body, a wrong method).
    Http(Box<Response<Full<Bytes>>>),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Self::Status(status)
    }
}

type Answer = Result<Response<Full<Bytes>>, Failure>;

async fn route(
    service: &CoordinatorService,
    method: &Method,
    segments: &[&str],
    query: &str,
    body: Json,
) -> Answer {
    let s = service;
    match segments {
        ["v1", "endpoints"] => match *method {
            Method::GET => {
                let list = s
                    .list_endpoints(tonic::Request::new(v1::ListEndpointsRequest {}))
                    .await?;
                ok("crossfade.v1.ListEndpointsResponse", &list.into_inner())
            }
            Method::POST => {
                let request: v1::CreateEndpointRequest =
                    parse("crossfade.v1.CreateEndpointRequest", body)?;
                let endpoint = s.create_endpoint(tonic::Request::new(request)).await?;
                let mut response = ok("crossfade.v1.Endpoint", &endpoint.into_inner())?;
                *response.status_mut() = StatusCode::CREATED;
                Ok(response)
            }
            _ => not_allowed("GET, POST"),
        },
        ["v1", "endpoints", name] => match *method {
            Method::GET => {
                let event_limit = number(query, "event_limit")?.unwrap_or(50);
                let endpoint = s
                    .get_endpoint(tonic::Request::new(v1::GetEndpointRequest {
                        name: (*name).to_owned(),
                        event_limit,
                    }))
                    .await?;
                ok("crossfade.v1.Endpoint", &endpoint.into_inner())
            }
            Method::PATCH => patch_endpoint(s, name, body).await,
            Method::DELETE => {
                let force = flag(query, "force")?;
                let deleted = s
                    .delete_endpoint(tonic::Request::new(v1::DeleteEndpointRequest {
                        name: (*name).to_owned(),
                        force,
                    }))
                    .await?;
                ok("crossfade.v1.DeleteEndpointResponse", &deleted.into_inner())
            }
            _ => not_allowed("GET, PATCH, DELETE"),
        },
        ["v1", "endpoints", name, "history"] => match *method {
            Method::GET => {
                let limit = number(query, "limit")?.unwrap_or(0);
                let history = s
                    .history(tonic::Request::new(v1::HistoryRequest {
                        endpoint: (*name).to_owned(),
                        limit,
                    }))
                    .await?;
                ok("crossfade.v1.HistoryResponse", &history.into_inner())
            }
            _ => not_allowed("GET"),
        },
        ["v1", "endpoints", name, "promote"] => match *method {
            Method::POST => {
                let body = with_key(body, "endpoint", name)?;
                let request: v1::PromoteRequest = parse("crossfade.v1.PromoteRequest", body)?;
                let promoted = s.promote(tonic::Request::new(request)).await?;
                ok("crossfade.v1.PromoteResponse", &promoted.into_inner())
            }
            _ => not_allowed("POST"),
        },
        [
            "v1",
            "endpoints",
            name,
            action @ ("pause_promotion"
            | "resume_promotion"
            | "cancel_promotion"
            | "force_cancel_promotion"
            | "force_roll_forward_promotion"),
        ] => {
            if *method != Method::POST {
                return not_allowed("POST");
            }
            let body = with_key(body, "endpoint", name)?;
            let request: v1::PromotionControlRequest =
                parse("crossfade.v1.PromotionControlRequest", body)?;
            let request = tonic::Request::new(request);
            let promotion = match *action {
                "pause_promotion" => s.pause_promotion(request).await?,
                "resume_promotion" => s.resume_promotion(request).await?,
                "cancel_promotion" => s.cancel_promotion(request).await?,
                "force_cancel_promotion" => s.force_cancel_promotion(request).await?,
                _ => s.force_roll_forward_promotion(request).await?,
            };
            ok("crossfade.v1.Promotion", &promotion.into_inner())
        }
        ["v1", "workers"] => match *method {
            Method::GET => {
                let workers = s
                    .list_workers(tonic::Request::new(v1::ListWorkersRequest {
                        endpoint: value(query, "endpoint")?.unwrap_or_default(),
                    }))
                    .await?;
                ok("crossfade.v1.ListWorkersResponse", &workers.into_inner())
            }
            Method::POST => {
                let request: v1::AddWorkerRequest = parse("crossfade.v1.AddWorkerRequest", body)?;
                let worker = s.add_worker(tonic::Request::new(request)).await?;
                ok("crossfade.v1.Worker", &worker.into_inner())
            }
            _ => not_allowed("GET, POST"),
        },
        ["v1", "workers", id] => match *method {
            Method::DELETE => {
                let removed = s
                    .remove_worker(tonic::Request::new(v1::RemoveWorkerRequest {
                        worker_id: (*id).to_owned(),
                    }))
                    .await?;
                ok("crossfade.v1.RemoveWorkerResponse", &removed.into_inner())
            }
            _ => not_allowed("DELETE"),
        },
        ["v1", "workers", id, "cordon"] => match *method {
            Method::POST => {
                let body = with_key(body, "worker_id", id)?;
                let request: v1::CordonWorkerRequest =
                    parse("crossfade.v1.CordonWorkerRequest", body)?;
                let worker = s.cordon_worker(tonic::Request::new(request)).await?;
                ok("crossfade.v1.Worker", &worker.into_inner())
            }
            _ => not_allowed("POST"),
        },
        ["v1", "workers", id, "uncordon"] => match *method {
            Method::POST => {
                let worker = s
                    .uncordon_worker(tonic::Request::new(v1::UncordonWorkerRequest {
                        worker_id: (*id).to_owned(),
                    }))
                    .await?;
                ok("crossfade.v1.Worker", &worker.into_inner())
            }
            _ => not_allowed("POST"),
        },
        ["v1", "routers"] => match *method {
            Method::GET => {
                let routers = s
                    .list_routers(tonic::Request::new(v1::ListRoutersRequest {}))
                    .await?;
                ok("crossfade.v1.ListRoutersResponse", &routers.into_inner())
            }
            Method::POST => {
                let request: v1::AddRouterRequest = parse("crossfade.v1.AddRouterRequest", body)?;
                let router = s.add_router(tonic::Request::new(request)).await?;
                ok("crossfade.v1.Router", &router.into_inner())
            }
            _ => not_allowed("GET, POST"),
        },
        ["v1", "routers", address] => match *method {
            Method::DELETE => {
                let removed = s
                    .remove_router(tonic::Request::new(v1::RemoveRouterRequest {
                        control_address: (*address).to_owned(),
                    }))
                    .await?;
                ok("crossfade.v1.RemoveRouterResponse", &removed.into_inner())
            }
            _ => not_allowed("DELETE"),
        },
        _ => Err(Failure::Http(Box::new(error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such resource; the API is described at /openapi.json",
        )))),
    }
}

/// `PATCH /v1/endpoints/{name}`: `promotion_settings` (Baseten's shape:
/// only the keys given change), `scaling` (likewise), `aliases` and
/// `selector` (each replaced whole), in that order; the endpoint as it
/// then is.
async fn patch_endpoint(s: &CoordinatorService, name: &str, body: Json) -> Answer {
    let Json::Object(mut fields) = body else {
        return Err(bad_body("the body must be a JSON object"));
    };
    let known = ["promotion_settings", "scaling", "aliases", "selector"];
    if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad_body(&format!(
            "unknown field `{unknown}`; expected one of {}",
            known.join(", ")
        )));
    }
    let mut endpoint = None;
    if let Some(settings) = fields.remove("promotion_settings") {
        let settings = parse("crossfade.v1.PromotionSettingsUpdate", settings)?;
        let answer = s
            .update_promotion_settings(tonic::Request::new(v1::UpdatePromotionSettingsRequest {
                name: name.to_owned(),
                settings: Some(settings),
            }))
            .await?;
        endpoint = Some(answer.into_inner());
    }
    if let Some(scaling) = fields.remove("scaling") {
        let scaling = parse("crossfade.v1.ScalingUpdate", scaling)?;
        let answer = s
            .update_scaling(tonic::Request::new(v1::UpdateScalingRequest {
                name: name.to_owned(),
                scaling: Some(scaling),
            }))
            .await?;
        endpoint = Some(answer.into_inner());
    }
    if let Some(aliases) = fields.remove("aliases") {
        let request: v1::UpdateAliasesRequest = parse(
            "crossfade.v1.UpdateAliasesRequest",
            serde_json::json!({ "name": name, "aliases": aliases }),
        )?;
        endpoint = Some(
            s.update_aliases(tonic::Request::new(request))
                .await?
                .into_inner(),
        );
    }
    if let Some(selector) = fields.remove("selector") {
        let selector = parse("crossfade.v1.WorkerSelector", selector)?;
        let answer = s
            .update_worker_selector(tonic::Request::new(v1::UpdateWorkerSelectorRequest {
                name: name.to_owned(),
                selector: Some(selector),
                update: None,
            }))
            .await?;
        endpoint = Some(answer.into_inner());
    }
    let endpoint = match endpoint {
        Some(endpoint) => endpoint,
        None => s
            .get_endpoint(tonic::Request::new(v1::GetEndpointRequest {
                name: name.to_owned(),
                event_limit: 50,
            }))
            .await?
            .into_inner(),
    };
    ok("crossfade.v1.Endpoint", &endpoint)
}

/// The path's segments, percent-decoded; `None` when one is not UTF-8 or
/// holds a broken escape.
fn segments(path: &str) -> Option<Vec<String>> {
    path.trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The query parameter `key`, percent-decoded (`+` is a space).
fn value(query: &str, key: &str) -> Result<Option<String>, Failure> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == key {
            return percent_decode(&v.replace('+', " "))
                .map(Some)
                .ok_or_else(|| bad_query(key, "is not valid percent-encoded UTF-8"));
        }
    }
    Ok(None)
}

fn number(query: &str, key: &str) -> Result<Option<u32>, Failure> {
    value(query, key)?
        .map(|v| {
            v.parse()
                .map_err(|_| bad_query(key, "must be a whole number within 0..=4294967295"))
        })
        .transpose()
}

fn flag(query: &str, key: &str) -> Result<bool, Failure> {
    match value(query, key)?.as_deref() {
        None | Some("false") => Ok(false),
        Some("true" | "") => Ok(true),
        Some(_) => Err(bad_query(key, "must be `true` or `false`")),
    }
}

fn bad_query(key: &str, what: &str) -> Failure {
    Failure::Http(Box::new(error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        &format!("query parameter `{key}` {what}"),
    )))
}

fn bad_body(message: &str) -> Failure {
    Failure::Http(Box::new(error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        &format!("the request body: {message}"),
    )))
}

/// `body` (an object, or nothing) with `key` set to the path's `value`.
fn with_key(body: Json, key: &str, value: &str) -> Result<Json, Failure> {
    let mut fields = match body {
        Json::Null => serde_json::Map::new(),
        Json::Object(fields) => fields,
        _ => return Err(bad_body("must be a JSON object")),
    };
    fields.insert(key.to_owned(), Json::String(value.to_owned()));
    Ok(Json::Object(fields))
}

fn parse<M: prost::Message + Default>(name: &str, body: Json) -> Result<M, Failure> {
    let body = if body.is_null() {
        Json::Object(serde_json::Map::new())
    } else {
        body
    };
    from_json(name, body, Shape::Rest).map_err(|e| bad_body(&e.0))
}

/// Reads a JSON body: at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`];
/// an empty body is `null`.
async fn read_json(
    headers: &http::HeaderMap,
    body: Incoming,
) -> Result<Json, Response<Full<Bytes>>> {
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await;
    let bytes = match collected {
        Err(_) => {
            return Err(error(
                StatusCode::REQUEST_TIMEOUT,
                "DEADLINE_EXCEEDED",
                "the request body did not arrive in time",
            ));
        }
        Ok(Err(_)) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RESOURCE_EXHAUSTED",
                &format!("the request body is over {MAX_BODY} bytes, or broke off"),
            ));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    if bytes.is_empty() {
        return Ok(Json::Null);
    }
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "INVALID_ARGUMENT",
            "the request body must be `application/json`",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            &format!("the request body is not JSON: {e}"),
        )
    })
}

fn ok<M: prost::Message>(name: &str, message: &M) -> Answer {
    let value = to_json(name, message, Shape::Rest).map_err(|e| Status::internal(e.0))?;
    Ok(json_response(StatusCode::OK, &value))
}

fn json_response(status: StatusCode, value: &Json) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn not_allowed(allow: &'static str) -> Answer {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "UNIMPLEMENTED",
        &format!("this resource takes {allow}"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    Err(Failure::Http(Box::new(response)))
}

/// An error in the one shape: `{"error": {"code": ..., "message": ...}}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &crossfade_proto::json::error(code, message))
}

/// The gRPC status of a call as HTTP: its code's usual HTTP status, and,
/// from a standby, the leader to ask instead.
fn from_status(status: &Status) -> Response<Full<Bytes>> {
    use tonic::Code;
    let http = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let code = crossfade_proto::json::code_name(status.code());
    let mut response = error(http, code, status.message());
    if let Some(leader) = status
        .metadata()
        .get(crate::error::LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        response
            .headers_mut()
            .insert(crate::error::LEADER_METADATA, leader);
    }
    response
}

fn file(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The page's script and styles come only from here; nothing inline.
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_split_and_decoded() {
        assert_eq!(
            segments("/v1/endpoints/Qwen%2FQwen3-8B/history").unwrap(),
            ["v1", "endpoints", "Qwen/Qwen3-8B", "history"]
        );
        assert_eq!(segments("/v1/endpoints/caf%C3%A9").unwrap()[2], "café");
        assert!(segments("/v1/endpoints/%ff").is_none());
        assert!(segments("/v1/endpoints/%4").is_none());
    }

    #[test]
    fn query_values_are_checked() {
        assert_eq!(
            number("event_limit=5&x=1", "event_limit").ok().flatten(),
            Some(5)
        );
        assert!(number("event_limit=-1", "event_limit").is_err());
        assert!(flag("force", "force").unwrap());
        assert!(!flag("", "force").unwrap());
        assert!(flag("force=maybe", "force").is_err());
        assert_eq!(
            value("endpoint=a+b%21", "endpoint")
                .ok()
                .flatten()
                .as_deref(),
            Some("a b!")
        );
    }

    #[tokio::test]
    async fn grpc_codes_become_http_statuses_and_one_error_shape() {
        let body = |response: Response<Full<Bytes>>| async {
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<Json>(&bytes).unwrap()
        };
        let response = from_status(&Status::failed_precondition("a promotion is under way"));
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(body(response).await["error"]["code"], "FAILED_PRECONDITION");
        let response = from_status(&Status::not_found("no endpoint `x`"));
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(body(response).await["error"]["code"], "NOT_FOUND");
    }
}
