//! The load generator: closed-loop (concurrency 1, saturation), open-loop
//! at a fixed rate (latency measured from the intended send time, so a
//! slow system cannot hide its queue by slowing the client down), SSE
//! streams parsed chunk by chunk, and idle streams held open.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::backend::{IDLE_STREAM_TOKENS, MODEL, now_ns};
use crate::system::CpuMeter;

/// The pooled HTTP/1.1 client every scenario uses.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with keep-alive and `TCP_NODELAY`, as a production client has.
pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// Where requests go: one URL (a proxy), or the workers themselves with the
/// deployments' weights (the direct baseline does the proxy's choice in the
/// client).
#[derive(Debug, Clone)]
pub struct Target {
    urls: Vec<(Uri, u32)>,
    total: u32,
}

impl Target {
    /// One URL.
    pub fn proxy(url: Uri) -> Self {
        Self {
            urls: vec![(url, 1)],
            total: 1,
        }
    }

    /// Several URLs by weight.
    pub fn weighted(urls: Vec<(Uri, u32)>) -> Self {
        let total = urls.iter().map(|(_, w)| w).sum();
        Self { urls, total }
    }

    fn pick(&self) -> &Uri {
        let mut point = fastrand::u32(0..self.total);
        for (url, weight) in &self.urls {
            if point < *weight {
                return url;
            }
            point -= weight;
        }
        &self.urls[0].0
    }
}

/// A non-streamed chat completion, as small as a real short prompt.
pub fn completion_body() -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Say hello."}}],"max_tokens":16}}"#
    ))
}

fn stream_body(tokens: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Count."}}],"max_tokens":{tokens},"stream":true}}"#
    ))
}

fn request(uri: &Uri, body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri.clone();
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    request
}

/// Sends one non-streamed request and reads the whole answer; the worker
/// that answered (its index) when it says.
pub async fn send(
    client: &HttpClient,
    target: &Target,
    body: Bytes,
) -> Result<Option<usize>, String> {
    let response = client
        .request(request(target.pick(), body))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let worker = response
        .headers()
        .get("x-bench-worker")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(worker)
}

// === results ===

/// A latency distribution, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds")
}

/// What both recorders keep: latencies in nanoseconds, the first error,
/// and the busy time of the system-under-test core.
struct Common {
    hist: Histogram<u64>,
    first_error: Option<String>,
    busy_us: f64,
}

impl Default for Common {
    fn default() -> Self {
        Self {
            hist: histogram(),
            first_error: None,
            busy_us: 0.0,
        }
    }
}

impl Common {
    fn merge(&mut self, other: Common) {
        // Both histograms have the same bounds; adding cannot fail.
        let _ = self.hist.add(&other.hist);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.busy_us += other.busy_us;
    }

    fn error(&mut self, error: String) {
        self.first_error.get_or_insert(error);
    }
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// What a run of non-streamed requests measured.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Requests answered 200 with a whole body.
    pub ok: u64,
    /// Requests that failed (status, connection, timeout).
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Latency of the successful requests.
    pub latency: Latency,
    /// Requests answered by each deployment (workers 0-1, then 2-3).
    pub shares: [u64; 2],
    /// Wall-clock seconds the run took.
    pub seconds: f64,
    /// Busy time of the system-under-test core per successful request, µs.
    pub cpu_us_per_request: f64,
}

/// Outcomes of non-streamed requests, added up over one or more runs.
#[derive(Default)]
pub struct Recorder {
    common: Common,
    ok: u64,
    errors: u64,
    shares: [u64; 2],
    seconds: f64,
}

impl Recorder {
    /// Adds `other`'s outcomes to these.
    pub fn merge(&mut self, other: Recorder) {
        self.common.merge(other.common);
        self.ok += other.ok;
        self.errors += other.errors;
        self.shares[0] += other.shares[0];
        self.shares[1] += other.shares[1];
        self.seconds += other.seconds;
    }

    fn timed(mut self, started: Instant, busy_us: f64) -> Self {
        self.seconds = started.elapsed().as_secs_f64();
        self.common.busy_us = busy_us;
        self
    }

    fn record(&mut self, result: Result<Option<usize>, String>, latency: Duration) {
        match result {
            Ok(worker) => {
                self.ok += 1;
                self.common
                    .hist
                    .saturating_record(latency.as_nanos() as u64);
                if let Some(w) = worker {
                    self.shares[usize::from(w >= 2)] += 1;
                }
            }
            Err(e) => {
                self.errors += 1;
                self.common.error(e);
            }
        }
    }

    /// The 99th percentile so far, in microseconds.
    pub fn p99_us(&self) -> f64 {
        self.common.hist.value_at_quantile(0.99) as f64 / 1000.0
    }

    /// The figures.
    pub fn finish(self) -> Run {
        Run {
            ok: self.ok,
            errors: self.errors,
            first_error: self.common.first_error,
            latency: Latency::of(&self.common.hist),
            shares: self.shares,
            seconds: self.seconds,
            cpu_us_per_request: self.common.busy_us / self.ok.max(1) as f64,
        }
    }
}

/// Waits until `at`: sleeping while it is far, yielding (so I/O still
/// runs) for the last stretch, since Tokio's timer has millisecond grain.
async fn pace_until(at: Instant) {
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        // Tokio's timer rounds up to the next millisecond and may fire a
        // tick late: sleep only to 2 ms before, then yield.
        if at - now > Duration::from_micros(2500) {
            tokio::time::sleep_until((at - Duration::from_millis(2)).into()).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// Closed loop, one request at a time: the latency a lone client sees.
pub async fn sequential(
    client: &HttpClient,
    target: &Target,
    requests: u64,
    cpu: &CpuMeter,
) -> Recorder {
    let body = completion_body();
    let mut recorder = Recorder::default();
    let started = Instant::now();
    let usage = cpu.start();
    for _ in 0..requests {
        let sent = Instant::now();
        let result = send(client, target, body.clone()).await;
        recorder.record(result, sent.elapsed());
    }
    recorder.timed(started, usage.busy_us())
}

/// Open loop at `rate` requests a second for `duration`: requests leave at
/// their intended times whatever the answers do, and latency counts from
/// the intended time. Requests still open 30 s after the last is sent count
/// as errors.
pub async fn open_loop(
    client: &HttpClient,
    target: &Target,
    rate: u64,
    duration: Duration,
    cpu: &CpuMeter,
) -> Recorder {
    let body = completion_body();
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let usage = cpu.start();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let intended = started + period.mul_f64(i as f64);
        pace_until(intended).await;
        let (client, target, body, recorder) = (
            client.clone(),
            target.clone(),
            body.clone(),
            Arc::clone(&recorder),
        );
        tasks.spawn(async move {
            let result = send(&client, &target, body).await;
            let latency = intended.elapsed();
            lock(&recorder).record(result, latency);
        });
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            () = &mut deadline => {
                let open = tasks.len() as u64;
                tasks.abort_all();
                let mut r = lock(&recorder);
                r.errors += open;
                r.common.error(format!("{open} requests unanswered after 30 s"));
                break;
            }
        }
    }
    let busy = usage.busy_us();
    let recorder = std::mem::take(&mut *lock(&recorder));
    recorder.timed(started, busy)
}

/// Closed loop with `concurrency` clients for `duration`: the most the
/// system serves.
pub async fn saturate(
    client: &HttpClient,
    target: &Target,
    concurrency: usize,
    duration: Duration,
    cpu: &CpuMeter,
) -> Run {
    let body = completion_body();
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let started = Instant::now();
    let usage = cpu.start();
    let end = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, target, body, recorder) = (
            client.clone(),
            target.clone(),
            body.clone(),
            Arc::clone(&recorder),
        );
        tasks.spawn(async move {
            while Instant::now() < end {
                let sent = Instant::now();
                let result = tokio::time::timeout(
                    Duration::from_secs(30),
                    send(&client, &target, body.clone()),
                )
                .await
                .unwrap_or_else(|_| Err("no answer in 30 s".into()));
                lock(&recorder).record(result, sent.elapsed());
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let busy = usage.busy_us();
    let recorder = std::mem::take(&mut *lock(&recorder));
    recorder.timed(started, busy).finish()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === SSE ===

/// What a run of SSE streams measured.
#[derive(Debug, Clone, Serialize)]
pub struct SseRun {
    /// Streams that delivered every chunk and `[DONE]`.
    pub streams_ok: u64,
    /// Streams that failed or lost chunks.
    pub streams_failed: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Chunks received.
    pub chunks: u64,
    /// Chunks that arrived in the same body frame as an earlier chunk: a
    /// proxy that buffers merges them.
    pub merged: u64,
    /// Per chunk: receive time minus the backend's stamp.
    pub chunk_latency: Latency,
    /// Busy time of the system-under-test core per chunk, µs.
    pub cpu_us_per_chunk: f64,
}

/// Splits complete SSE events out of `buffer`, returning the stamps of the
/// chunks among them (`t=<ns>`) and whether `[DONE]` came.
pub fn take_events(buffer: &mut BytesMut) -> (Vec<u64>, bool) {
    let mut stamps = Vec::new();
    let mut done = false;
    while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
        let event = buffer.split_to(end + 2);
        let text = String::from_utf8_lossy(&event);
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                done = true;
            } else if let Some(at) = data.find("t=") {
                let digits: String = data[at + 2..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(stamp) = digits.parse() {
                    stamps.push(stamp);
                }
            }
        }
    }
    (stamps, done)
}

/// Outcomes of SSE streams, added up over one or more runs.
#[derive(Default)]
pub struct SseRecorder {
    common: Common,
    ok: u64,
    failed: u64,
    chunks: u64,
    merged: u64,
}

impl SseRecorder {
    /// Adds `other`'s outcomes to these.
    pub fn merge(&mut self, other: SseRecorder) {
        self.common.merge(other.common);
        self.ok += other.ok;
        self.failed += other.failed;
        self.chunks += other.chunks;
        self.merged += other.merged;
    }

    /// The figures.
    pub fn finish(self) -> SseRun {
        SseRun {
            streams_ok: self.ok,
            streams_failed: self.failed,
            first_error: self.common.first_error,
            chunks: self.chunks,
            merged: self.merged,
            chunk_latency: Latency::of(&self.common.hist),
            cpu_us_per_chunk: self.common.busy_us / self.chunks.max(1) as f64,
        }
    }
}

/// `streams` concurrent SSE streams of `chunks` chunks each, their starts
/// spread over one chunk interval.
pub async fn sse(
    client: &HttpClient,
    target: &Target,
    streams: u64,
    chunks: u64,
    interval: Duration,
    cpu: &CpuMeter,
) -> SseRecorder {
    let recorder = Arc::new(Mutex::new(SseRecorder::default()));
    let usage = cpu.start();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..streams {
        let start = started + interval.mul_f64(i as f64 / streams as f64);
        let (client, target, recorder) = (client.clone(), target.clone(), Arc::clone(&recorder));
        tasks.spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let limit = interval * (chunks as u32 + 100) + Duration::from_secs(10);
            let result =
                tokio::time::timeout(limit, one_stream(&client, &target, chunks, &recorder))
                    .await
                    .unwrap_or_else(|_| Err(format!("stream not done after {limit:?}")));
            let mut r = lock(&recorder);
            match result {
                Ok(()) => r.ok += 1,
                Err(e) => {
                    r.failed += 1;
                    r.common.error(e);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let busy = usage.busy_us();
    let mut r = std::mem::take(&mut *lock(&recorder));
    r.common.busy_us = busy;
    r
}

async fn one_stream(
    client: &HttpClient,
    target: &Target,
    chunks: u64,
    recorder: &Mutex<SseRecorder>,
) -> Result<(), String> {
    let response = client
        .request(request(target.pick(), stream_body(chunks)))
        .await
        .map_err(|e| format!("request: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.into_body();
    let mut buffer = BytesMut::new();
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body after {received} chunks: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let arrived = now_ns();
        buffer.extend_from_slice(&data);
        let (stamps, done) = take_events(&mut buffer);
        received += stamps.len() as u64;
        let mut r = lock(recorder);
        r.chunks += stamps.len() as u64;
        r.merged += stamps.len().saturating_sub(1) as u64;
        for stamp in stamps {
            r.common
                .hist
                .saturating_record(arrived.saturating_sub(stamp).max(1));
        }
        drop(r);
        if done {
            break;
        }
    }
    if received == chunks {
        Ok(())
    } else {
        Err(format!("{received} of {chunks} chunks arrived"))
    }
}

// === idle streams ===

/// Idle streams held open at once.
#[derive(Debug, Clone, Serialize)]
pub struct IdleRun {
    /// Streams asked for.
    pub wanted: u64,
    /// Streams whose first chunk arrived.
    pub opened: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Resident memory of the system under test before, in KiB.
    pub rss_before_kib: u64,
    /// And with every stream open.
    pub rss_open_kib: u64,
    /// (open - before) / opened, in bytes.
    pub bytes_per_stream: f64,
}

/// Opens `wanted` streams that go idle after their first chunk, measures
/// the memory of the system under test (`rss`, in KiB) with all of them
/// open, then closes them.
pub async fn idle(target: &Target, wanted: u64, rss: impl Fn() -> u64) -> IdleRun {
    // A client of its own, whose connections all close with it.
    let client = client();
    let rss_before_kib = rss();
    let opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Connections are set up a few hundred at a time, as a listen backlog likes.
    let setup = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..wanted {
        let (client, target, opened, failed, first_error, setup) = (
            client.clone(),
            target.clone(),
            Arc::clone(&opened),
            Arc::clone(&failed),
            Arc::clone(&first_error),
            Arc::clone(&setup),
        );
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let Ok(permit) = setup.acquire_owned().await else {
                return;
            };
            let open = async {
                let response = client
                    .request(request(target.pick(), stream_body(IDLE_STREAM_TOKENS)))
                    .await
                    .map_err(|e| format!("request: {e}"))?;
                if response.status() != StatusCode::OK {
                    return Err(format!("status {}", response.status()));
                }
                let mut body = response.into_body();
                match body.frame().await {
                    Some(Ok(_)) => Ok(body),
                    Some(Err(e)) => Err(format!("first chunk: {e}")),
                    None => Err("ended before its first chunk".to_owned()),
                }
            };
            match tokio::time::timeout(Duration::from_secs(30), open).await {
                Ok(Ok(body)) => {
                    opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    drop(permit);
                    let _ = stop.wait_for(|stop| *stop).await;
                    drop(body);
                }
                Ok(Err(e)) => {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    lock(&first_error).get_or_insert(e);
                }
                Err(_) => {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    lock(&first_error).get_or_insert_with(|| "no first chunk in 30 s".into());
                }
            }
        });
    }
    // Wait (bounded) until every stream is open or has failed.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline
        && opened.load(std::sync::atomic::Ordering::Relaxed)
            + failed.load(std::sync::atomic::Ordering::Relaxed)
            < wanted
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the system under test settle (allocators return what bursts took).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_open_kib = rss();
    let opened = opened.load(std::sync::atomic::Ordering::Relaxed);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    drop(client);
    IdleRun {
        wanted,
        opened,
        first_error: lock(&first_error).take(),
        rss_before_kib,
        rss_open_kib,
        bytes_per_stream: (rss_open_kib.saturating_sub(rss_before_kib) * 1024) as f64
            / opened.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_frames_are_joined_and_counted_once() {
        let first = crate::backend::chunk(11, false);
        let last = crate::backend::chunk(22, true);
        let mut buffer = BytesMut::new();
        buffer.extend_from_slice(&first[..10]);
        assert_eq!(take_events(&mut buffer), (vec![], false));
        buffer.extend_from_slice(&first[10..]);
        buffer.extend_from_slice(&last);
        assert_eq!(take_events(&mut buffer), (vec![11, 22], true));
        assert!(buffer.is_empty());
    }
}
