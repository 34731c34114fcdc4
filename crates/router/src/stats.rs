//! What the router's traffic did, two ways: Prometheus metrics (scraped from
//! the admin listener) and a sliding window per deployment and worker that
//! `GetStats` reads for the coordinator's autoscaling and health gates.
//!
//! A deployment's [`DeploymentStats`] is made when a table first lists it
//! and sits in the table beside its workers, so the request path records
//! without a map lookup or a label allocation. Its Prometheus series are
//! rendered from it (not through the `metrics` recorder, which can forget a
//! series only by idleness, and would then lose the updates of a handle still
//! held), so they leave `/metrics` with it: a deployment that left every
//! table lingers for [`Stats::retire`]'s grace period, for a last scrape of
//! its final counts, and is then forgotten. The number of series stays
//! bounded over any number of promotions.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossfade_common::metrics::LATENCY_SECONDS_BUCKETS;
use crossfade_proto::v1;

use self::window::{Bucket, Window};
use crate::table::Registry;

mod window;

/// `crossfade_router_requests_total{endpoint, deployment, outcome}`.
pub const REQUESTS_TOTAL: &str = "crossfade_router_requests_total";
/// `crossfade_router_request_duration_seconds{endpoint, deployment}`.
pub const REQUEST_DURATION_SECONDS: &str = "crossfade_router_request_duration_seconds";
/// `crossfade_router_time_to_first_token_seconds{endpoint, deployment}`.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "crossfade_router_time_to_first_token_seconds";
/// `crossfade_router_in_flight_requests{endpoint, deployment}`.
pub const IN_FLIGHT_REQUESTS: &str = "crossfade_router_in_flight_requests";
/// `crossfade_router_retries_total{endpoint, deployment, reason}`.
pub const RETRIES_TOTAL: &str = "crossfade_router_retries_total";
/// `crossfade_router_worker_ejections_total{endpoint, deployment}`.
pub const EJECTIONS_TOTAL: &str = "crossfade_router_worker_ejections_total";
/// `crossfade_router_rejected_requests_total{reason}`: answered by the
/// router before a deployment was chosen.
pub const REJECTED_TOTAL: &str = "crossfade_router_rejected_requests_total";
/// `crossfade_router_queue_depth{endpoint}`: requests held for a replica
/// now, for every endpoint of the table (rendered by [`Stats::render_queues`]).
pub const QUEUE_DEPTH: &str = "crossfade_router_queue_depth";
/// `crossfade_router_queue_wait_seconds{endpoint}`: how long held requests
/// waited for a replica.
pub const QUEUE_WAIT_SECONDS: &str = "crossfade_router_queue_wait_seconds";
/// `crossfade_router_queue_timeouts_total{endpoint}`: held requests that no
/// replica came for.
pub const QUEUE_TIMEOUTS_TOTAL: &str = "crossfade_router_queue_timeouts_total";
/// `crossfade_router_table_version`.
pub const TABLE_VERSION: &str = "crossfade_router_table_version";

/// Histograms and their buckets, for the recorder.
pub const HISTOGRAMS: &[(&str, &[f64])] = &[(QUEUE_WAIT_SECONDS, LATENCY_SECONDS_BUCKETS)];

/// How long the series of a deployment that left every table stay in
/// `/metrics`, by default: several scrapes at any usual interval.
pub const RETIRED_SERIES_GRACE: Duration = Duration::from_secs(300);

/// Describes every metric the recorder holds once, at start (the
/// per-deployment ones are described where [`Stats::render`] writes them).
pub fn describe() {
    metrics::describe_histogram!(
        QUEUE_WAIT_SECONDS,
        metrics::Unit::Seconds,
        "How long held requests waited for a replica."
    );
    metrics::describe_counter!(
        QUEUE_TIMEOUTS_TOTAL,
        "Held requests that no replica came for in time (503)."
    );
    metrics::describe_counter!(
        REJECTED_TOTAL,
        "Requests the router answered itself, by reason."
    );
    metrics::describe_gauge!(TABLE_VERSION, "Version of the routing table in force.");
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx, and for a stream, its last byte delivered.
    Success,
    /// The engine answered 4xx.
    ClientError,
    /// The engine answered 5xx.
    ServerError,
    /// No worker could be reached.
    Unreachable,
    /// No response headers in time.
    Timeout,
    /// The response broke off after it began (or the client left).
    Aborted,
    /// Refused for lack of capacity (every worker draining or down).
    Shed,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Self::Success,
        Self::ClientError,
        Self::ServerError,
        Self::Unreachable,
        Self::Timeout,
        Self::Aborted,
        Self::Shed,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ClientError => "client_error",
            Self::ServerError => "server_error",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Aborted => "aborted",
            Self::Shed => "shed",
        }
    }
}

/// Why a request was retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// The connection to the gate failed.
    ConnectError,
    /// The gate answered 503 `x-crossfade-retry: draining`.
    Draining,
    /// The gate answered 503 `x-crossfade-retry: not-ready` (or another reason).
    NotReady,
}

impl RetryReason {
    const ALL: [RetryReason; 3] = [Self::ConnectError, Self::Draining, Self::NotReady];

    fn count_in(self, counts: &mut v1::RetryCounts) -> &mut u64 {
        match self {
            Self::ConnectError => &mut counts.connect_error,
            Self::Draining => &mut counts.draining,
            Self::NotReady => &mut counts.not_ready,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::ConnectError => "connect_error",
            Self::Draining => "draining",
            Self::NotReady => "not_ready",
        }
    }
}

/// Width of one window bucket.
const BUCKET_SECONDS: u64 = 10;
/// Buckets kept: one hour of history.
const BUCKETS_KEPT: usize = 360;

/// One deployment's statistics: totals since it was first listed (its
/// Prometheus series) and a sliding window (for `GetStats`).
#[derive(Debug)]
pub struct DeploymentStats {
    endpoint: String,
    deployment: String,
    in_flight: AtomicU32,
    ejections: AtomicU64,
    recorded: Mutex<Recorded>,
}

/// What one lock guards: every finished request updates both.
#[derive(Debug, Default)]
struct Recorded {
    totals: Bucket,
    window: Window<Bucket>,
}

impl DeploymentStats {
    fn new(endpoint: &str, deployment: &str) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            deployment: deployment.to_owned(),
            in_flight: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
            recorded: Mutex::new(Recorded::default()),
        }
    }

    /// A request to this deployment started; it counts until the returned
    /// guard records its outcome or drops (an abort).
    pub fn start(self: &Arc<Self>) -> RequestRecord {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestRecord {
            stats: Arc::clone(self),
            worker: None,
            started: std::time::Instant::now(),
            ttft: None,
            done: false,
        }
    }

    /// A retry on another worker.
    pub fn retried(&self, reason: RetryReason) {
        let mut recorded = self.lock();
        let Recorded { totals, window } = &mut *recorded;
        for retries in [
            &mut totals.retries,
            &mut window.current(now_bucket()).retries,
        ] {
            *reason.count_in(retries) += 1;
        }
    }

    /// A worker of this deployment was ejected.
    pub fn ejected(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn finish(&self, outcome: Outcome, latency: Duration, ttft: Option<Duration>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut recorded = self.lock();
        let Recorded { totals, window } = &mut *recorded;
        for bucket in [totals, window.current(now_bucket())] {
            count(&mut bucket.counts, outcome);
            bucket.latency.record(latency);
            if let Some(ttft) = ttft {
                bucket.ttft.record(ttft);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The window since `since_bucket`, summed.
    fn summary(&self, since_bucket: u64) -> Bucket {
        let recorded = self.lock();
        let mut sum = Bucket::default();
        for bucket in recorded.window.since(since_bucket) {
            sum.add(bucket);
        }
        sum
    }
}

/// One request's statistics in progress. Call [`RequestRecord::responded`]
/// when the response headers arrive, [`RequestRecord::body_byte`] as body
/// bytes do, and [`RequestRecord::finish`] at the end; dropped unfinished,
/// it counts as aborted.
#[derive(Debug)]
#[must_use = "a request is recorded when the record finishes or drops"]
pub struct RequestRecord {
    stats: Arc<DeploymentStats>,
    /// The worker whose response this is, once there is one.
    worker: Option<Arc<crate::table::Worker>>,
    started: std::time::Instant,
    ttft: Option<Duration>,
    done: bool,
}

impl RequestRecord {
    /// The response headers arrived now, from `worker`.
    pub fn responded(&mut self, worker: &Arc<crate::table::Worker>) {
        self.worker = Some(Arc::clone(worker));
    }

    /// Body bytes arrived now: the first ones are the time to first token
    /// (engines send a stream's headers before its first token).
    pub fn body_byte(&mut self) {
        if self.ttft.is_none() {
            self.ttft = Some(self.started.elapsed());
        }
    }

    /// The request is held to be sent again (no engine saw it): this try
    /// is not counted; the next one is.
    pub fn discard(mut self) {
        self.done = true;
    }

    /// The request ended with `outcome`.
    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        self.stats
            .finish(outcome, self.started.elapsed(), self.ttft);
        if let Some(worker) = &self.worker {
            worker.counts().record(outcome);
        }
    }

    /// The deployment's stats, for retries and ejections.
    pub fn stats(&self) -> &DeploymentStats {
        &self.stats
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.done {
            self.end(Outcome::Aborted);
        }
    }
}

/// One deployment's series, as [`Stats::render`] writes them.
struct Series {
    labels: String,
    totals: Bucket,
    in_flight: u32,
    ejections: u64,
}

/// A label value as the text format quotes it.
fn escape_label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    let mut escaped = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped.into()
}

fn outcome_count(counts: &v1::RequestCounts, outcome: Outcome) -> u64 {
    match outcome {
        Outcome::Success => counts.success,
        Outcome::ClientError => counts.client_errors,
        Outcome::ServerError => counts.server_errors,
        Outcome::Unreachable => counts.upstream_unreachable,
        Outcome::Timeout => counts.upstream_timeouts,
        Outcome::Aborted => counts.aborted_streams,
        Outcome::Shed => counts.shed,
    }
}

fn count(counts: &mut v1::RequestCounts, outcome: Outcome) {
    counts.total += 1;
    match outcome {
        Outcome::Success => counts.success += 1,
        Outcome::ClientError => counts.client_errors += 1,
        Outcome::ServerError => counts.server_errors += 1,
        Outcome::Unreachable => counts.upstream_unreachable += 1,
        Outcome::Timeout => counts.upstream_timeouts += 1,
        Outcome::Aborted => counts.aborted_streams += 1,
        Outcome::Shed => counts.shed += 1,
    }
}

fn add_counts(sum: &mut v1::RequestCounts, other: &v1::RequestCounts) {
    sum.total += other.total;
    sum.success += other.success;
    sum.client_errors += other.client_errors;
    sum.server_errors += other.server_errors;
    sum.upstream_unreachable += other.upstream_unreachable;
    sum.upstream_timeouts += other.upstream_timeouts;
    sum.aborted_streams += other.aborted_streams;
    sum.shed += other.shed;
}

/// One worker's attempts, by outcome, in a window of counts only.
#[derive(Debug, Default)]
pub struct WorkerCounts(Mutex<Window<v1::RequestCounts>>);

impl WorkerCounts {
    /// An attempt at the worker ended with `outcome`.
    pub fn record(&self, outcome: Outcome) {
        let mut window = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        count(window.current(now_bucket()), outcome);
    }

    fn since(&self, since_bucket: u64) -> v1::RequestCounts {
        let window = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut sum = v1::RequestCounts::default();
        for counts in window.since(since_bucket) {
            add_counts(&mut sum, counts);
        }
        sum
    }
}

fn bucket_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) / BUCKET_SECONDS
}

fn now_bucket() -> u64 {
    bucket_of(SystemTime::now())
}

// === Registry ===

/// Every deployment's statistics, shared by all tables like the workers:
/// a weight change must not reset a deployment's window.
#[derive(Debug)]
pub struct Stats {
    started: SystemTime,
    known: Registry<DeploymentStats>,
    /// Deployments that left every table, kept until the time beside them
    /// so that their last counts can still be scraped.
    retired: Mutex<Vec<(Instant, Arc<DeploymentStats>)>>,
    retired_grace: Duration,
    /// Requests held per endpoint now (see [`crate::queue`]).
    pub(crate) held: crate::tally::Tally<String>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new(RETIRED_SERIES_GRACE)
    }
}

impl Stats {
    /// Statistics whose retired deployments stay in `/metrics` for
    /// `retired_grace`.
    pub fn new(retired_grace: Duration) -> Self {
        Self {
            started: SystemTime::now(),
            known: Registry::default(),
            retired: Mutex::new(Vec::new()),
            retired_grace,
            held: crate::tally::Tally::default(),
        }
    }

    /// `old` was replaced by `new`: the deployments only `old` listed keep
    /// their series for the grace period, from `now`.
    pub(crate) fn retire(
        &self,
        old: &crate::table::Table,
        new: &crate::table::Table,
        now: Instant,
    ) {
        let listed = |table: &crate::table::Table| -> Vec<Arc<DeploymentStats>> {
            let endpoints = table.endpoints().iter();
            let deployments = endpoints.flat_map(|e| e.deployments().iter());
            deployments.map(|d| Arc::clone(d.stats())).collect()
        };
        let kept = listed(new);
        let mut retired = self.lock_retired();
        let until = now + self.retired_grace;
        retired.retain(|(end, _)| *end > now);
        for stats in listed(old) {
            if !kept.iter().any(|k| Arc::ptr_eq(k, &stats)) {
                retired.push((until, stats));
            }
        }
    }

    /// Appends the per-deployment series, in the Prometheus text format, to
    /// `out`: those of every deployment a table lists or a request still
    /// holds, and of those retired less than the grace period before `now`.
    pub fn render(&self, out: &mut String, now: Instant) {
        self.lock_retired().retain(|(end, _)| *end > now);
        let mut all = self.known.alive();
        all.sort_by(|a, b| (&a.endpoint, &a.deployment).cmp(&(&b.endpoint, &b.deployment)));
        let series: Vec<Series> = all
            .iter()
            .map(|d| Series {
                labels: format!(
                    "endpoint=\"{}\",deployment=\"{}\"",
                    escape_label(&d.endpoint),
                    escape_label(&d.deployment)
                ),
                totals: d.lock().totals.clone(),
                in_flight: d.in_flight(),
                ejections: d.ejections.load(Ordering::Relaxed),
            })
            .collect();
        let family = |out: &mut String, name, kind, help, each: &dyn Fn(&mut String, &Series)| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in &series {
                each(out, s);
            }
        };
        family(
            out,
            REQUESTS_TOTAL,
            "counter",
            "Requests finished, by outcome.",
            &|out, s| {
                for outcome in Outcome::ALL {
                    let n = outcome_count(&s.totals.counts, outcome);
                    let (labels, outcome) = (&s.labels, outcome.label());
                    let _ = writeln!(
                        out,
                        "{REQUESTS_TOTAL}{{{labels},outcome=\"{outcome}\"}} {n}"
                    );
                }
            },
        );
        family(
            out,
            RETRIES_TOTAL,
            "counter",
            "Retries on another worker, by reason.",
            &|out, s| {
                let mut retries = s.totals.retries;
                for reason in RetryReason::ALL {
                    let n = *reason.count_in(&mut retries);
                    let (labels, reason) = (&s.labels, reason.label());
                    let _ = writeln!(out, "{RETRIES_TOTAL}{{{labels},reason=\"{reason}\"}} {n}");
                }
            },
        );
        family(
            out,
            EJECTIONS_TOTAL,
            "counter",
            "Workers ejected after a failed connection.",
            &|out, s| {
                let _ = writeln!(out, "{EJECTIONS_TOTAL}{{{}}} {}", s.labels, s.ejections);
            },
        );
        family(
            out,
            IN_FLIGHT_REQUESTS,
            "gauge",
            "Requests in flight (until their last byte).",
            &|out, s| {
                let _ = writeln!(out, "{IN_FLIGHT_REQUESTS}{{{}}} {}", s.labels, s.in_flight);
            },
        );
        family(
            out,
            REQUEST_DURATION_SECONDS,
            "histogram",
            "Time from receiving a request to the end of its response.",
            &|out, s| {
                s.totals
                    .latency
                    .render(out, REQUEST_DURATION_SECONDS, &s.labels)
            },
        );
        family(
            out,
            TIME_TO_FIRST_TOKEN_SECONDS,
            "histogram",
            "Time from receiving a request to the first byte of its response's body.",
            &|out, s| {
                s.totals
                    .ttft
                    .render(out, TIME_TO_FIRST_TOKEN_SECONDS, &s.labels)
            },
        );
    }

    /// Appends `crossfade_router_queue_depth` for every endpoint of
    /// `table`: 0 for those that hold nothing, so the series is there
    /// before the first wait.
    pub fn render_queues(&self, out: &mut String, table: &crate::table::Table) {
        let _ = writeln!(
            out,
            "# HELP {QUEUE_DEPTH} Requests held until their endpoint has a replica.\n# TYPE {QUEUE_DEPTH} gauge"
        );
        let held = self.held.lock();
        for endpoint in table.endpoints() {
            let depth = held.get(endpoint.name()).copied().unwrap_or(0);
            let name = escape_label(endpoint.name());
            let _ = writeln!(out, "{QUEUE_DEPTH}{{endpoint=\"{name}\"}} {depth}");
        }
    }

    fn lock_retired(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, Arc<DeploymentStats>)>> {
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The statistics of `deployment` of `endpoint`, created on first use.
    pub fn deployment(&self, endpoint: &str, deployment: &str) -> Arc<DeploymentStats> {
        let made = self.known.get_or_try_insert((endpoint, deployment), || {
            Ok::<_, std::convert::Infallible>(DeploymentStats::new(endpoint, deployment))
        });
        made.unwrap_or_else(|never| match never {})
    }

    /// When the router started, in seconds since the Unix epoch.
    pub(crate) fn started_unix(&self) -> i64 {
        self.started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }

    /// The window that `since` asks for: never before the router started,
    /// aligned to the buckets.
    pub fn window_start(&self, since: Option<SystemTime>) -> SystemTime {
        let since = since.map_or(self.started, |s| s.max(self.started));
        UNIX_EPOCH + Duration::from_secs(bucket_of(since) * BUCKET_SECONDS)
    }

    /// `GetStats` for the deployments of `table`, since `window_start`.
    pub fn report(
        &self,
        table: &crate::table::Table,
        window_start: SystemTime,
        endpoint: Option<&str>,
    ) -> Vec<v1::EndpointStats> {
        let since_bucket = bucket_of(window_start);
        table
            .endpoints()
            .iter()
            .filter(|e| endpoint.is_none_or(|name| e.name() == name))
            .map(|e| v1::EndpointStats {
                endpoint: e.name().to_owned(),
                queued: self.held.lock().get(e.name()).copied().unwrap_or(0),
                deployments: e
                    .deployments()
                    .iter()
                    .map(|d| {
                        let stats = d.stats();
                        let sum = stats.summary(since_bucket);
                        v1::DeploymentStats {
                            deployment_id: d.id().to_owned(),
                            in_flight: stats.in_flight(),
                            requests: Some(sum.counts),
                            retries: Some(sum.retries),
                            latency: Some(sum.latency.summary()),
                            time_to_first_token: Some(sum.ttft.summary()),
                            workers: d
                                .workers()
                                .iter()
                                .map(|w| v1::WorkerStats {
                                    address: w.address().to_owned(),
                                    worker_id: w.worker_id().to_owned(),
                                    in_flight: w.in_flight(),
                                    requests: Some(w.counts().since(since_bucket)),
                                    ejected: w.is_ejected(crate::table::now_ms()),
                                })
                                .collect(),
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
