//! The routing table: one immutable value behind one `ArcSwap`.
//!
//! A request loads the table once and routes with that snapshot to the end,
//! so a swap never blocks or fails a request in flight. Tables are built from
//! the wire type (`RoutingTable`), whether they come from the configuration
//! file or from a coordinator, so both go through the same validation.
//!
//! Workers are the one thing shared between tables: the router's in-flight
//! count and ejection state of a gate must survive a swap (a table that only
//! shifts weights must not forget that a worker has 30 streams open). They
//! live in a registry keyed by address and worker id, and a table holds
//! `Arc`s to them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use crossfade_proto::v1;
use http::HeaderValue;
use http::uri::Authority;

use crate::stats::{DeploymentStats, Stats, WorkerCounts};

/// Kept-alive connections to a gate; requests carry their body whole.
pub type GateConnections =
    crossfade_common::upstream::Connections<http_body_util::Full<bytes::Bytes>>;

/// Weights are normalised to this many points; a session key hashes into
/// the same range.
pub const BASIS_POINTS: u32 = 10_000;

/// The largest weight one deployment may have.
pub const MAX_WEIGHT: u32 = BASIS_POINTS;

/// Where the table in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The configuration file (at start or on SIGHUP).
    Config,
    /// A coordinator's `ApplyTable`.
    Coordinator,
}

/// An immutable routing table.
#[derive(Debug)]
pub struct Table {
    version: u64,
    source: Source,
    applied_at: SystemTime,
    endpoints: Vec<Arc<Endpoint>>,
    /// Endpoint names and aliases to indexes in `endpoints`.
    by_model: HashMap<String, usize>,
}

/// One endpoint: the deployments that take its traffic.
#[derive(Debug)]
pub struct Endpoint {
    name: String,
    aliases: Vec<String>,
    /// When it was created, in seconds since the Unix epoch; 0 unknown.
    created: i64,
    deployments: Vec<Deployment>,
    /// Cumulative upper bounds of each deployment's share, in basis points:
    /// deployment `i` takes the points `bounds[i-1]..bounds[i]`.
    bounds: Vec<u32>,
}

/// One deployment's share of an endpoint.
#[derive(Debug)]
pub struct Deployment {
    id: String,
    weight: u32,
    workers: Vec<Arc<Worker>>,
    /// Its engines' context length; 0 unknown.
    max_model_len: u64,
    /// `x-crossfade-deployment`, built once per table rather than per request.
    header: HeaderValue,
    /// Its statistics, shared with every table that lists it.
    stats: Arc<DeploymentStats>,
}

/// A gate the router sends requests to, with the router's own view of it.
#[derive(Debug)]
pub struct Worker {
    address: String,
    authority: Authority,
    /// `Host` for requests to it, built once.
    host: HeaderValue,
    worker_id: String,
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Milliseconds on [`now_ms`]'s clock until which the worker is ejected.
    ejected_until_ms: AtomicU64,
    /// Attempts at it, by outcome, for `GetStats`.
    counts: WorkerCounts,
    /// Kept-alive connections to it.
    connections: GateConnections,
}

/// Why a table was refused. The message names the endpoint, deployment or
/// worker concerned and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TableError(String);

/// Why a table was not put in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// It is not a valid table.
    #[error("invalid routing table: {0}")]
    Invalid(#[from] TableError),
    /// Its version is older than the one in force.
    #[error("routing table version {offered} is older than the version in force, {current}")]
    Stale {
        /// The version in force.
        current: u64,
        /// The version offered.
        offered: u64,
    },
    /// A configuration reload while a coordinator manages the table.
    #[error(
        "the routing table (version {current}) is managed by a coordinator; \
         the configuration file's table is not applied"
    )]
    ManagedByCoordinator {
        /// The version in force.
        current: u64,
    },
}

// === impl Table ===

impl Table {
    /// Validates `spec` and builds a table from it, taking workers and
    /// statistics from `shared` so that their counts carry over.
    pub fn build(
        spec: &v1::RoutingTable,
        source: Source,
        shared: &Shared,
    ) -> Result<Self, TableError> {
        let mut by_model = HashMap::new();
        let mut endpoints = Vec::with_capacity(spec.endpoints.len());
        for (i, e) in spec.endpoints.iter().enumerate() {
            let endpoint = Endpoint::build(e, i, shared)?;
            for model in std::iter::once(&endpoint.name).chain(&endpoint.aliases) {
                if by_model.insert(model.clone(), i).is_some() {
                    return Err(TableError(format!(
                        "model name `{model}` is used by two endpoints (or twice by one)"
                    )));
                }
            }
            endpoints.push(Arc::new(endpoint));
        }
        Ok(Self {
            version: spec.version,
            source,
            applied_at: SystemTime::now(),
            endpoints,
            by_model,
        })
    }

    /// The version; only grows.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Where it came from.
    pub fn source(&self) -> Source {
        self.source
    }

    /// When it was put in force.
    pub fn applied_at(&self) -> SystemTime {
        self.applied_at
    }

    /// Every endpoint, in table order.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The endpoint a request's `model` (a name or an alias) names.
    pub fn endpoint(&self, model: &str) -> Option<&Arc<Endpoint>> {
        self.by_model.get(model).map(|&i| &self.endpoints[i])
    }

    /// The table in its wire form (for `GetTable`).
    pub fn to_proto(&self) -> v1::RoutingTable {
        v1::RoutingTable {
            version: self.version,
            endpoints: self
                .endpoints
                .iter()
                .map(|e| v1::EndpointRoute {
                    name: e.name.clone(),
                    aliases: e.aliases.clone(),
                    created: e.created,
                    deployments: e
                        .deployments
                        .iter()
                        .map(|d| v1::DeploymentRoute {
                            id: d.id.clone(),
                            weight: d.weight,
                            max_model_len: d.max_model_len,
                            workers: d
                                .workers
                                .iter()
                                .map(|w| v1::WorkerRoute {
                                    address: w.address.clone(),
                                    worker_id: w.worker_id.clone(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

// === impl Endpoint ===

impl Endpoint {
    fn build(spec: &v1::EndpointRoute, index: usize, shared: &Shared) -> Result<Self, TableError> {
        let name = spec.name.trim();
        if name.is_empty() {
            return Err(TableError(format!(
                "endpoint #{}: `name` is empty",
                index + 1
            )));
        }
        let at = |what: String| TableError(format!("endpoint `{name}`: {what}"));
        if let Some(alias) = spec.aliases.iter().find(|a| a.trim().is_empty()) {
            return Err(at(format!("alias `{alias}` is empty")));
        }
        let mut ids = HashSet::new();
        let mut deployments = Vec::with_capacity(spec.deployments.len());
        for d in &spec.deployments {
            if d.id.is_empty() {
                return Err(at("a deployment has an empty `id`".into()));
            }
            if !ids.insert(d.id.as_str()) {
                return Err(at(format!("deployment `{}` is listed twice", d.id)));
            }
            deployments.push(Deployment::build(d, name, shared).map_err(|e| at(e.0))?);
        }
        let bounds = share_bounds(deployments.iter().map(|d| d.weight));
        Ok(Self {
            name: name.to_owned(),
            aliases: spec.aliases.clone(),
            created: spec.created,
            deployments,
            bounds,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Other model names that route to it.
    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }

    /// Its deployments, in table order.
    pub fn deployments(&self) -> &[Deployment] {
        &self.deployments
    }

    /// When it was created, in seconds since the Unix epoch, when the
    /// table says (a hand-written one does not).
    pub fn created(&self) -> Option<i64> {
        Some(self.created).filter(|&t| t > 0)
    }

    /// The context length its engines report: that of the deployment with
    /// the most traffic among those that report one.
    pub fn max_model_len(&self) -> Option<u64> {
        self.deployments
            .iter()
            .filter(|d| d.max_model_len > 0)
            .max_by_key(|d| d.weight)
            .map(|d| d.max_model_len)
    }

    /// Whether a request can be sent now: a deployment has weight (and so
    /// workers).
    pub fn has_capacity(&self) -> bool {
        self.deployments.iter().any(|d| d.weight > 0)
    }

    /// The deployment that owns `point` (0..[`BASIS_POINTS`]) of the
    /// endpoint's traffic; `None` when every weight is 0 (no capacity).
    ///
    /// Shares are laid out in table order from 0, so a session whose point
    /// falls in the first deployment's range stays there while that range
    /// only grows: the coordinator lists the candidate first.
    pub fn deployment_at(&self, point: u32) -> Option<&Deployment> {
        let i = self.bounds.partition_point(|&bound| bound <= point);
        self.deployments.get(i).filter(|d| d.weight > 0)
    }
}

/// Cumulative bounds of the shares, in basis points. The last bound is
/// exactly [`BASIS_POINTS`] unless every weight is 0.
fn share_bounds(weights: impl Iterator<Item = u32> + Clone) -> Vec<u32> {
    let total: u64 = weights.clone().map(u64::from).sum();
    let mut cumulative = 0u64;
    weights
        .map(|w| {
            cumulative += u64::from(w);
            // At most BASIS_POINTS, so it fits; all 0 when every weight is.
            (cumulative * u64::from(BASIS_POINTS))
                .checked_div(total)
                .unwrap_or(0) as u32
        })
        .collect()
}

// === impl Deployment ===

impl Deployment {
    fn build(
        spec: &v1::DeploymentRoute,
        endpoint: &str,
        shared: &Shared,
    ) -> Result<Self, TableError> {
        let id = &spec.id;
        let at = |what: String| TableError(format!("deployment `{id}`: {what}"));
        if spec.weight > MAX_WEIGHT {
            return Err(at(format!(
                "`weight` must be within 0..={MAX_WEIGHT}, got {}",
                spec.weight
            )));
        }
        if spec.weight > 0 && spec.workers.is_empty() {
            return Err(at("`weight` is above 0 but `workers` is empty".into()));
        }
        let header = HeaderValue::from_str(id)
            .map_err(|_| at("`id` must be visible ASCII (it is sent as a header)".into()))?;
        let mut seen = HashSet::new();
        let mut list = Vec::with_capacity(spec.workers.len());
        for w in &spec.workers {
            if !seen.insert(w.address.as_str()) {
                return Err(at(format!("worker `{}` is listed twice", w.address)));
            }
            list.push(shared.workers.get(&w.address, &w.worker_id).map_err(at)?);
        }
        Ok(Self {
            id: id.clone(),
            weight: spec.weight,
            workers: list,
            max_model_len: spec.max_model_len,
            header,
            stats: shared.stats.deployment(endpoint, id),
        })
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its relative weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Its workers.
    pub fn workers(&self) -> &[Arc<Worker>] {
        &self.workers
    }

    /// The value of `x-crossfade-deployment` for its responses.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// Its statistics.
    pub fn stats(&self) -> &Arc<DeploymentStats> {
        &self.stats
    }
}

// === impl Worker ===

/// How long a worker that refuses connections is left out: doubling from
/// `base` with each consecutive failure, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// After the first failure.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl Worker {
    fn new(address: &str, worker_id: &str) -> Result<Self, String> {
        let authority: Authority = address
            .parse()
            .map_err(|_| format!("worker address `{address}` is not host:port"))?;
        if authority.port_u16().is_none() {
            return Err(format!("worker address `{address}` has no port"));
        }
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| format!("worker address `{address}` is not a valid Host"))?;
        Ok(Self {
            address: address.to_owned(),
            authority,
            host,
            worker_id: worker_id.to_owned(),
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            counts: WorkerCounts::default(),
            connections: GateConnections::default(),
        })
    }

    /// Its idle connections.
    pub fn connections(&self) -> &GateConnections {
        &self.connections
    }

    /// Its gate address, `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The address as a URI authority.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The address as a `Host` header value.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// Its worker id (may be empty in a hand-written table).
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Attempts at it, by outcome.
    pub fn counts(&self) -> &WorkerCounts {
        &self.counts
    }

    /// Requests this router has in flight to it.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard drops; hold the guard
    /// until the response body's last byte.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Whether it is ejected at `now_ms` (see [`now_ms`]).
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// A connection to it failed: eject it for a back-off that doubles with
    /// each consecutive failure.
    pub fn record_connect_failure(&self, now_ms: u64, policy: &EjectionPolicy) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let factor = 1u32 << (failures - 1).min(16);
        let backoff = policy.base.saturating_mul(factor).min(policy.max);
        let until = now_ms.saturating_add(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until_ms.store(until, Ordering::Relaxed);
    }

    /// A connection to it worked: forget its failures.
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// A request in flight to a worker; decrements the count when dropped.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InFlight(Arc<Worker>);

impl InFlight {
    /// The worker.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Milliseconds since the router started, on a monotonic clock: the time
/// base of ejections.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What every table shares: the workers (their in-flight counts and
/// ejections) and each deployment's statistics.
#[derive(Debug, Default)]
pub struct Shared {
    /// Workers, by address and worker id.
    pub workers: Workers,
    /// Statistics, by endpoint and deployment.
    pub stats: Stats,
}

/// Values every table shares (workers, deployment statistics), by a
/// two-part key. Entries are weak: a value no table lists any more goes away
/// once the last request holding it ends, and its entry is pruned.
#[derive(Debug)]
pub(crate) struct Registry<V> {
    known: Mutex<HashMap<(String, String), Weak<V>>>,
}

impl<V> Default for Registry<V> {
    fn default() -> Self {
        Self {
            known: Mutex::new(HashMap::new()),
        }
    }
}

impl<V> Registry<V> {
    /// The value under `key`, made by `make` when there is none alive.
    pub(crate) fn get_or_try_insert<E>(
        &self,
        key: (&str, &str),
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E> {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (key.0.to_owned(), key.1.to_owned());
        if let Some(value) = known.get(&key).and_then(Weak::upgrade) {
            return Ok(value);
        }
        let value = Arc::new(make()?);
        known.retain(|_, v| v.strong_count() > 0);
        known.insert(key, Arc::downgrade(&value));
        Ok(value)
    }

    /// Every value alive now.
    pub(crate) fn alive(&self) -> Vec<Arc<V>> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        known.values().filter_map(Weak::upgrade).collect()
    }

    /// Whether every entry is still alive (dead ones were pruned).
    #[cfg(test)]
    pub(crate) fn all_alive(&self) -> bool {
        let known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        known.values().all(|v| v.strong_count() > 0)
    }
}

/// The workers every table shares, by address and worker id.
#[derive(Debug, Default)]
pub struct Workers(Registry<Worker>);

impl Workers {
    fn get(&self, address: &str, worker_id: &str) -> Result<Arc<Worker>, String> {
        self.0
            .get_or_try_insert((address, worker_id), || Worker::new(address, worker_id))
    }
}

// === Routes ===

/// The table in force, and the only way to change it.
#[derive(Debug)]
pub struct Routes {
    current: ArcSwap<Table>,
    /// The version of each table swapped in, for requests held until one
    /// gives their endpoint a replica.
    swapped: tokio::sync::watch::Sender<u64>,
    shared: Shared,
    /// Serialises updates, so that the version check and the swap are one
    /// step. Requests never take it.
    update: Mutex<()>,
}

/// What an accepted `apply` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The table was swapped in; its version.
    Swapped(u64),
    /// The same version was already in force; nothing changed.
    Unchanged(u64),
}

impl Applied {
    /// The version in force after the call.
    pub fn version(self) -> u64 {
        match self {
            Self::Swapped(v) | Self::Unchanged(v) => v,
        }
    }
}

impl Routes {
    /// Routes starting from the configuration file's table.
    pub fn new(spec: &v1::RoutingTable) -> Result<Self, TableError> {
        Self::with_retired_grace(spec, crate::stats::RETIRED_SERIES_GRACE)
    }

    /// Routes whose retired deployments keep their series for
    /// `retired_grace` (`[metrics] retired_series_grace`).
    pub fn with_retired_grace(
        spec: &v1::RoutingTable,
        retired_grace: std::time::Duration,
    ) -> Result<Self, TableError> {
        let shared = Shared {
            workers: Workers::default(),
            stats: Stats::new(retired_grace),
        };
        let table = Table::build(spec, Source::Config, &shared)?;
        metrics::gauge!(crate::stats::TABLE_VERSION).set(table.version as f64);
        Ok(Self {
            swapped: tokio::sync::watch::Sender::new(table.version),
            current: ArcSwap::from_pointee(table),
            shared,
            update: Mutex::new(()),
        })
    }

    /// The statistics of every deployment.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The table in force; a request loads it once.
    pub fn load(&self) -> Arc<Table> {
        self.current.load_full()
    }

    /// A coordinator's table. The first one always replaces the
    /// configuration file's (whose version counts reloads, not the
    /// coordinator's steps); after that, an older version is refused, the
    /// same version is acknowledged without change, a newer one swapped in.
    pub fn apply_from_coordinator(&self, spec: &v1::RoutingTable) -> Result<Applied, ApplyError> {
        let _update = self.lock_update();
        let current = self.current.load();
        let managed = current.source == Source::Coordinator;
        if managed && spec.version < current.version {
            return Err(ApplyError::Stale {
                current: current.version,
                offered: spec.version,
            });
        }
        if managed && spec.version == current.version {
            return Ok(Applied::Unchanged(current.version));
        }
        let table = Table::build(spec, Source::Coordinator, &self.shared)?;
        Ok(Applied::Swapped(self.swap(table)))
    }

    /// The configuration file's table, re-read (SIGHUP). Applied only while
    /// no coordinator manages the table, so that reloading the file cannot
    /// undo a promotion; it takes the next version.
    pub fn apply_from_config(&self, spec: &v1::RoutingTable) -> Result<Applied, ApplyError> {
        let _update = self.lock_update();
        let current = self.current.load();
        if current.source == Source::Coordinator {
            return Err(ApplyError::ManagedByCoordinator {
                current: current.version,
            });
        }
        let mut table = Table::build(spec, Source::Config, &self.shared)?;
        table.version = current.version.max(spec.version) + 1;
        Ok(Applied::Swapped(self.swap(table)))
    }

    /// Wakes on every table swapped in from now on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.swapped.subscribe()
    }

    fn swap(&self, table: Table) -> u64 {
        let version = table.version;
        let table = Arc::new(table);
        let old = self.current.swap(Arc::clone(&table));
        self.shared
            .stats
            .retire(&old, &table, std::time::Instant::now());
        self.swapped.send_replace(version);
        metrics::gauge!(crate::stats::TABLE_VERSION).set(version as f64);
        version
    }

    fn lock_update(&self) -> std::sync::MutexGuard<'_, ()> {
        self.update
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
