//! The request path: find the endpoint (by `model`, or by the path prefix
//! `/endpoints/{name}/`), choose a deployment and a worker, forward the
//! request to that worker's gate, and stream the response back untouched.
//!
//! Retries happen only where the engine cannot have seen the request: the
//! connection to the gate failed, or the gate answered 503 with
//! `x-crossfade-retry` (draining or not ready). Never after the response
//! began: a response is returned as soon as its headers arrive, and from
//! then on its bytes only flow through. The request body is kept (bounded by
//! the body limit) so that it can be sent again.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::retry::budget::{Budget as _, TpsBudget};

use crossfade_common::http::strip_hop_by_hop;

use crate::admission::{self, Admission, ClientSlot};
use crate::balance::{choose_deployment, choose_worker};
use crate::error::RouteError;
use crate::queue::Queue;
use crate::stats::{Outcome, REJECTED_TOTAL, RequestRecord, RetryReason};
use crate::table::{Deployment, EjectionPolicy, Endpoint, InFlight, Routes, Worker, now_ms};
use crate::target::{self, Target};
use crossfade_common::upstream::{self, Checkout, PoolSettings};

/// A boxed error, as bodies and clients report them.
pub use crossfade_common::http::BoxError;

pub use self::body::{
    IdleTimeout, ProxyBody, UPSTREAM_FAILED_EVENT, UPSTREAM_IDLE_EVENT, UpstreamBody,
};

mod body;

/// The header a gate sets on a 503 that the engine never saw.
pub const RETRY_HEADER: HeaderName = HeaderName::from_static("x-crossfade-retry");

/// The header that tells a caller which deployment answered.
pub const DEPLOYMENT_HEADER: HeaderName = HeaderName::from_static("x-crossfade-deployment");

/// The header that says how long a request was held for a replica, in
/// milliseconds (only on requests that were).
pub const QUEUED_HEADER: HeaderName = HeaderName::from_static("x-crossfade-queued-ms");

/// The header that carries a session key.
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("x-session-id");

/// How the proxy behaves.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Largest request body accepted (and kept for retries), in bytes.
    pub max_body_bytes: usize,
    /// Longest time a request's body may take to arrive.
    pub body_read_timeout: Duration,
    /// Longest wait for an upstream's response headers (time to first token).
    pub response_header_timeout: Duration,
    /// Longest gap between two chunks of a response body.
    pub idle_chunk_timeout: Duration,
    /// Most attempts per request, the first included.
    pub max_attempts: u32,
    /// Most requests in flight through this router at once; past it,
    /// requests are shed with 429 and `Retry-After`.
    pub max_concurrent_requests: u32,
    /// Most requests in flight from one client (key, else address).
    pub max_concurrent_per_client: u32,
    /// Slowest body accepted, in bytes a second (0: no minimum).
    pub min_body_rate: u32,
    /// Most header fields in a request.
    pub max_header_count: usize,
    /// Most bytes of header fields in a request.
    pub max_header_bytes: usize,
    /// Most requests held per endpoint while it has no replica; more get
    /// 503.
    pub queue_max: usize,
    /// Longest a request is held waiting for a replica (and never longer
    /// than `response_header_timeout`); then 503.
    pub queue_timeout: Duration,
    /// Back-off for workers that refuse connections.
    pub ejection: EjectionPolicy,
    /// Longest time to establish a connection to a gate.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection to a gate is kept.
    pub pool_idle_timeout: Duration,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            max_body_bytes: crate::config::DEFAULT_MAX_BODY_BYTES,
            body_read_timeout: Duration::from_secs(30),
            response_header_timeout: Duration::from_secs(300),
            idle_chunk_timeout: Duration::from_secs(120),
            max_attempts: 4,
            max_concurrent_requests: 10_000,
            max_concurrent_per_client: 1_000,
            min_body_rate: 1024,
            max_header_count: 100,
            max_header_bytes: 32 << 10,
            queue_max: 1_000,
            queue_timeout: Duration::from_secs(60),
            ejection: EjectionPolicy::default(),
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

/// The proxy: routes, connections to the gates, and a retry budget.
#[derive(Debug)]
pub struct Proxy {
    routes: Arc<Routes>,
    pool: PoolSettings,
    settings: ProxySettings,
    /// Retries may add at most 20 % to the request rate (plus 10 a second),
    /// so that a fleet-wide failure is not multiplied by the routers.
    budget: TpsBudget,
    /// One semaphore for all connections: a permit per request, held until
    /// its response's last byte.
    capacity: Arc<Semaphore>,
    /// Keys, header limits and per-client limits.
    admission: Admission,
    /// Requests held while their endpoint has no replica.
    queue: Queue,
}

/// What a request holds until its response's last byte: its client's slot
/// and a router-wide one.
#[derive(Debug)]
pub struct Slots {
    _client: ClientSlot,
    _router: OwnedSemaphorePermit,
}

impl Proxy {
    /// A proxy over `routes`.
    pub fn new(routes: Arc<Routes>, settings: ProxySettings) -> Self {
        Self {
            routes,
            pool: PoolSettings {
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.pool_idle_timeout,
            },
            capacity: Arc::new(Semaphore::new(settings.max_concurrent_requests as usize)),
            admission: Admission::new(&settings),
            queue: Queue::new(
                settings.queue_max,
                settings.queue_timeout.min(settings.response_header_timeout),
            ),
            settings,
            budget: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
        }
    }

    /// The routes it serves.
    pub fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    /// Its queue of held requests (to hint demand to the coordinators).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Its admission checks (to set the keys).
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Serves one public request from `peer`.
    pub async fn handle<B>(&self, req: Request<B>, peer: IpAddr) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        match self.route(req, peer).await {
            Ok(response) => response,
            Err(error) => {
                // Only errors before a deployment was chosen arrive here; a
                // deployment's own failures are in its statistics.
                tracing::debug!(%error, "answered by the router");
                metrics::counter!(REJECTED_TOTAL, "reason" => error.code()).increment(1);
                error.into_response()
            }
        }
    }

    async fn route<B>(
        &self,
        req: Request<B>,
        peer: IpAddr,
    ) -> Result<Response<ProxyBody>, RouteError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let url_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if url_len > crate::error::MAX_URL_BYTES {
            return Err(RouteError::UrlTooLong(url_len));
        }
        // Headers, key and the client's own limit, before anything is read.
        let admitted = self.admission.admit(&parts.headers, peer)?;
        let path = parts.uri.path();
        let (path_endpoint, upstream_path) = match target::classify(&parts.method, path)? {
            Target::Health => return Ok(json_response(StatusCode::OK, Bytes::new())),
            Target::Models => return Ok(self.models()),
            Target::Model(id) => return self.model(id),
            Target::Forward {
                endpoint,
                upstream_path,
            } => (endpoint, upstream_path),
        };
        // Unchanged, the client's own path is forwarded (a cheap clone of
        // what hyper parsed); only `/endpoints/{name}/...` is rewritten.
        let upstream_path_and_query = match (path_endpoint, parts.uri.path_and_query()) {
            (None, Some(pq)) => pq.clone(),
            _ => {
                let rewritten = match parts.uri.query() {
                    Some(query) => format!("{upstream_path}?{query}"),
                    None => upstream_path.to_owned(),
                };
                PathAndQuery::try_from(rewritten)
                    .map_err(|e| RouteError::BadRequest(format!("cannot forward this path: {e}")))?
            }
        };

        let bytes = admission::read_body(&self.settings, &parts.headers, body).await?;
        let peek = match target::peek(&parts.headers, &bytes) {
            Ok(peek) => Some(peek),
            // Routed by path: the body is the engine's business.
            Err(_) if path_endpoint.is_some() => None,
            Err(e) => return Err(e),
        };
        let only;
        let model = match (
            path_endpoint,
            peek.as_ref().and_then(|p| p.model.as_deref()),
        ) {
            (Some(name), _) => name,
            (None, Some(model)) => model,
            // `GET /version`, `/tokenize` without a model: the only endpoint.
            (None, None) => {
                only = self.only_endpoint()?;
                only.as_str()
            }
        };

        // A key may call only its endpoints; checked before any wait.
        if let Some(key) = &admitted.key
            && let Some(endpoint) = self.routes.load().endpoint(model)
            && !key.allows(endpoint.name())
        {
            return Err(RouteError::EndpointNotAllowed(endpoint.name().to_owned()));
        }
        // Held while the endpoint has no replica (the usual path: no wait).
        let (mut table, mut queued) = self.queue.table_for(&self.routes, model).await?;
        // The router-wide slot, once the request is whole and can be sent.
        let mut slots = Slots {
            _client: admitted.slot,
            _router: Arc::clone(&self.capacity)
                .try_acquire_owned()
                .map_err(|_| RouteError::Overloaded)?,
        };
        let session_key = parts
            .headers
            .get(&SESSION_HEADER)
            .map(HeaderValue::as_bytes)
            .or_else(|| {
                peek.as_ref()
                    .and_then(|p| p.user.as_deref())
                    .map(str::as_bytes)
            });
        let mut rng = fastrand::Rng::new();
        // Refused by every worker before any engine saw it, the request is
        // held and sent again (see `Hold`).
        let mut hold = self.queue.hold();
        let mut response = loop {
            let endpoint = table
                .endpoint(model)
                .ok_or_else(|| RouteError::ModelNotFound(crate::error::short(model)))?;
            let deployment =
                choose_deployment(endpoint, session_key, &mut rng).ok_or_else(|| {
                    RouteError::NoCapacity {
                        endpoint: endpoint.name().to_owned(),
                    }
                })?;
            // `Bytes` clones share the buffer; `peek` still borrows this one.
            let request = Forward {
                parts: &parts,
                body: bytes.clone(),
                path_and_query: &upstream_path_and_query,
                endpoint,
            };
            match self
                .forward(request, deployment, slots, &mut rng, hold.may_hold())
                .await
            {
                Ok(response) => break response,
                Err(back) => {
                    slots = back;
                    queued += hold.wait().await;
                    table = self.routes.load();
                }
            }
        };
        if !queued.is_zero() {
            let millis = u64::try_from(queued.as_millis()).unwrap_or(u64::MAX);
            response
                .headers_mut()
                .insert(QUEUED_HEADER, HeaderValue::from(millis));
        }
        Ok(response)
    }

    /// Sends the request to a worker of `deployment`, retrying on another
    /// worker (then another deployment of the endpoint) only when the engine
    /// cannot have seen it. Its outcome is recorded in the first chosen
    /// deployment's statistics, also when a fallback served it.
    ///
    /// When every worker refused it before an engine saw it and `may_hold`,
    /// the slots come back (the try not counted) for the caller to hold the
    /// request and send it again.
    async fn forward(
        &self,
        request: Forward<'_>,
        deployment: &Deployment,
        slots: Slots,
        rng: &mut fastrand::Rng,
        may_hold: bool,
    ) -> Result<Response<ProxyBody>, Slots> {
        let mut record = deployment.stats().start();
        Ok(
            match self.attempts(&request, deployment, rng, &mut record).await {
                Ok(answer) => self.respond(answer, record, slots),
                Err(RouteError::NoCapacity { .. } | RouteError::Unreachable { .. }) if may_hold => {
                    record.discard();
                    return Err(slots);
                }
                Err(error) => {
                    record.finish(match error {
                        RouteError::Timeout(_) => Outcome::Timeout,
                        RouteError::NoCapacity { .. } => Outcome::Shed,
                        RouteError::Unreachable { .. } => Outcome::Unreachable,
                        _ => Outcome::ServerError,
                    });
                    error.into_response()
                }
            },
        )
    }

    async fn attempts<'t>(
        &self,
        request: &Forward<'t>,
        mut deployment: &'t Deployment,
        rng: &mut fastrand::Rng,
        record: &mut RequestRecord,
    ) -> Result<Answer<'t>, RouteError> {
        let endpoint = request.endpoint;
        self.budget.deposit();
        // Workers that failed this request, and deployments fallen back
        // from. Both stay empty (unallocated) on the usual path.
        let mut tried: Vec<Arc<Worker>> = Vec::new();
        let first_deployment = deployment.id();
        let mut tried_deployments: Vec<&str> = Vec::new();
        // Why the last attempt failed; built only when one does.
        let mut last_error = None;
        let no_capacity = || RouteError::NoCapacity {
            endpoint: endpoint.name().to_owned(),
        };
        // Why the previous attempt failed; counted once a retry really starts.
        let mut retry_reason = None;
        for attempt in 0..self.settings.max_attempts {
            if attempt > 0 && !self.budget.withdraw() {
                tracing::debug!("retry budget exhausted");
                break;
            }
            let worker = loop {
                let excluded = |w: &Worker| tried.iter().any(|t| std::ptr::eq(&**t, w));
                if let Some(worker) = choose_worker(deployment.workers(), excluded, now_ms(), rng) {
                    break Arc::clone(worker);
                }
                // Every worker of this deployment was tried: the others of
                // the endpoint can still serve the request.
                let next = endpoint
                    .deployments()
                    .iter()
                    .filter(|d| {
                        d.weight() > 0
                            && d.id() != first_deployment
                            && !tried_deployments.contains(&d.id())
                    })
                    .max_by_key(|d| d.weight());
                match next {
                    Some(next) => {
                        tried_deployments.push(next.id());
                        deployment = next;
                    }
                    None => return Err(last_error.unwrap_or_else(no_capacity)),
                }
            };
            if let Some(reason) = retry_reason.take() {
                record.stats().retried(reason);
            }

            let upstream = upstream_request(
                request.parts,
                request.body.clone(),
                &worker,
                request.path_and_query,
            );
            let in_flight = worker.start_request();
            let sent = tokio::time::timeout(
                self.settings.response_header_timeout,
                upstream::send(worker.address(), worker.connections(), upstream, &self.pool),
            )
            .await;
            let (response, connection) = match sent {
                Err(_) => {
                    worker.counts().record(Outcome::Timeout);
                    return Err(RouteError::Timeout(self.settings.response_header_timeout));
                }
                Ok(Err(e)) if e.is_connect() => {
                    tracing::debug!(worker = worker.address(), error = %e, "connect failed; retrying");
                    worker.record_connect_failure(now_ms(), &self.settings.ejection);
                    worker.counts().record(Outcome::Unreachable);
                    record.stats().ejected();
                    retry_reason = Some(RetryReason::ConnectError);
                    tried.push(worker);
                    last_error = Some(RouteError::Unreachable {
                        endpoint: endpoint.name().to_owned(),
                    });
                    continue;
                }
                Ok(Err(e)) if e.is_closed_idle() => {
                    // Sent again, on a new connection (the worker is not
                    // excluded: it did nothing wrong).
                    tracing::debug!(worker = worker.address(), error = %e, "kept-alive connection closed; sending again");
                    retry_reason = Some(RetryReason::ConnectError);
                    last_error = Some(RouteError::Upstream(e.to_string()));
                    continue;
                }
                Ok(Err(e)) => {
                    worker.counts().record(Outcome::ServerError);
                    return Err(RouteError::Upstream(e.to_string()));
                }
                Ok(Ok(answer)) => answer,
            };
            worker.record_success();
            if response.status() == StatusCode::SERVICE_UNAVAILABLE
                && response.headers().contains_key(&RETRY_HEADER)
            {
                worker.counts().record(Outcome::Shed);
                let reason = response.headers().get(&RETRY_HEADER);
                tracing::debug!(
                    worker = worker.address(),
                    ?reason,
                    "gate refused before the engine saw the request; retrying"
                );
                retry_reason = Some(if reason.is_some_and(|r| r == "draining") {
                    RetryReason::Draining
                } else {
                    RetryReason::NotReady
                });
                last_error = Some(no_capacity());
                tried.push(worker);
                continue;
            }
            return Ok(Answer {
                response,
                connection,
                in_flight,
                deployment,
            });
        }
        Err(last_error.unwrap_or_else(no_capacity))
    }

    fn respond(
        &self,
        answer: Answer<'_>,
        mut record: RequestRecord,
        slots: Slots,
    ) -> Response<ProxyBody> {
        let Answer {
            response,
            connection,
            in_flight,
            deployment,
        } = answer;
        record.responded(in_flight.worker());
        let (mut parts, body) = response.into_parts();
        let outcome = if parts.status.is_server_error() {
            Outcome::ServerError
        } else if parts.status.is_client_error() {
            Outcome::ClientError
        } else {
            Outcome::Success
        };
        strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(DEPLOYMENT_HEADER, deployment.header().clone());
        let sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = ProxyBody::Upstream(UpstreamBody::new(
            body,
            in_flight,
            (connection, self.pool),
            (record, outcome),
            slots,
            self.settings.idle_chunk_timeout,
            sse,
        ));
        Response::from_parts(parts, body)
    }

    /// `GET /v1/models`, answered from the table: every endpoint name and
    /// alias, so clients can list what they may send as `model`.
    fn models(&self) -> Response<ProxyBody> {
        let table = self.routes.load();
        let data: Vec<_> = table
            .endpoints()
            .iter()
            .flat_map(|e| {
                std::iter::once(e.name())
                    .chain(e.aliases().iter().map(String::as_str))
                    .map(|id| self.model_object(id, e))
            })
            .collect();
        let body = serde_json::json!({"object": "list", "data": data}).to_string();
        json_response(StatusCode::OK, Bytes::from(body))
    }

    /// `GET /v1/models/{id}` (the SDKs' `models.retrieve`), from the table.
    fn model(&self, id: &str) -> Result<Response<ProxyBody>, RouteError> {
        let table = self.routes.load();
        let endpoint = table
            .endpoint(id)
            .ok_or_else(|| RouteError::ModelNotFound(crate::error::short(id)))?;
        let body = self.model_object(id, endpoint).to_string();
        Ok(json_response(StatusCode::OK, Bytes::from(body)))
    }

    /// An OpenAI model object, as vLLM's: `id` as asked for, `root` the
    /// endpoint it names, `created` the endpoint's creation (the router's
    /// start for a hand-written table), `max_model_len` when its engines
    /// report one.
    fn model_object(&self, id: &str, endpoint: &crate::table::Endpoint) -> serde_json::Value {
        let created = endpoint
            .created()
            .unwrap_or_else(|| self.routes.stats().started_unix());
        let mut object = serde_json::json!({
            "id": id,
            "object": "model",
            "created": created,
            "owned_by": "crossfade",
            "root": endpoint.name(),
        });
        if let Some(len) = endpoint.max_model_len() {
            object["max_model_len"] = len.into();
        }
        object
    }

    /// The table's only endpoint, for a request that names none.
    fn only_endpoint(&self) -> Result<String, RouteError> {
        match self.routes.load().endpoints() {
            [only] => Ok(only.name().to_owned()),
            _ => Err(RouteError::BadRequest(
                "`model` is required: name the endpoint in the body's `model` or in the path, /endpoints/{name}/...".into(),
            )),
        }
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A worker's response, with what it holds until the body's end.
struct Answer<'t> {
    response: Response<Incoming>,
    /// The connection it came on, reused once the body has been read.
    connection: Checkout<Full<Bytes>>,
    in_flight: InFlight,
    /// The deployment that answered (a fallback's, when one served).
    deployment: &'t Deployment,
}

/// A request on its way to a deployment, everything but the choice of worker.
struct Forward<'a> {
    parts: &'a Parts,
    /// The whole body, kept so that a retry can send it again.
    body: Bytes,
    path_and_query: &'a PathAndQuery,
    endpoint: &'a Endpoint,
}

fn upstream_request(
    parts: &Parts,
    body: Bytes,
    worker: &Worker,
    path_and_query: &PathAndQuery,
) -> Request<Full<Bytes>> {
    // Origin form (`/v1/...`), as a client on a direct connection sends
    // it, from the path already parsed: nothing is parsed again per attempt.
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = Uri::from(path_and_query.clone());
    let headers = request.headers_mut();
    headers.clone_from(&parts.headers);
    strip_hop_by_hop(headers);
    // The client's Host named the router; HTTP/1.1 requires one naming the
    // gate (hyper's connection-level client does not add it).
    headers.insert(header::HOST, worker.host().clone());
    request
}
