//! A load of streamed chat completions through routers that records when
//! each request started and ended and how, for tests that must tell which
//! failures a fault explains and which it does not.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

/// Every request, its stream included, ends within this.
pub const REQUEST_BOUND: Duration = Duration::from_secs(30);

/// Requests per client at most: every loop has a bound.
const MAX_REQUESTS: usize = 5000;

/// One streamed chat completion as its client saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Index of the router it was sent to.
    pub router: usize,
    pub started: Instant,
    pub ended: Instant,
    /// `None` when no response came (the transport error is in `body`).
    pub status: Option<StatusCode>,
    /// `x-crossfade-deployment`: the deployment that answered.
    pub deployment: Option<String>,
    pub body: String,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200 and the whole stream, to `data: [DONE]`.
    Complete,
    /// 200, then the router ended the stream with an error event: its code.
    Broken(String),
    /// The router answered an error itself: its status and code.
    Answered(StatusCode, String),
    /// Anything else: a truncated stream, a transport error, an error body
    /// that is not OpenAI-style.
    Other,
}

impl Record {
    pub fn outcome(&self) -> Outcome {
        let code = |json: &str| {
            serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        };
        match self.status {
            Some(StatusCode::OK) => {
                let body = self.body.trim_end();
                if body.ends_with("data: [DONE]") {
                    return Outcome::Complete;
                }
                body.rsplit_once("data: ")
                    .and_then(|(_, last)| code(last))
                    .map_or(Outcome::Other, Outcome::Broken)
            }
            Some(status) => {
                code(&self.body).map_or(Outcome::Other, |c| Outcome::Answered(status, c))
            }
            None => Outcome::Other,
        }
    }
}

/// `records`, one a line, times from `zero`, for a failure message.
pub fn listing<'r>(records: impl IntoIterator<Item = &'r Record>, zero: Instant) -> String {
    let mut out = String::new();
    for r in records {
        // The end of the body: where a stream broke.
        let tail: String = {
            let chars: Vec<char> = r.body.chars().collect();
            chars[chars.len().saturating_sub(300)..].iter().collect()
        };
        writeln!(
            out,
            "  router {} from {:?} to {:?}: {:?} {:?} {:?}: {tail}",
            r.router,
            r.started - zero,
            r.ended - zero,
            r.status,
            r.deployment,
            r.outcome(),
        )
        .unwrap();
    }
    out
}

/// Clients that each stream one request after another through one of the
/// routers, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `clients` clients, spread over `publics` (the routers' public
    /// addresses), asking `model` for `max_tokens` tokens each time.
    pub fn start(publics: &[SocketAddr], clients: usize, model: &str, max_tokens: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let body = Bytes::from(
            serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": max_tokens,
                "stream": true,
            })
            .to_string(),
        );
        let clients = (0..clients)
            .map(|i| {
                let router = i % publics.len();
                let public = publics[router];
                let (stop, records, body) = (Arc::clone(&stop), Arc::clone(&records), body.clone());
                tokio::spawn(async move {
                    let client = super::http();
                    for _ in 0..MAX_REQUESTS {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let record = stream(&client, router, public, body.clone()).await;
                        records.lock().unwrap().push(record);
                    }
                })
            })
            .collect();
        Self {
            stop,
            records,
            clients,
        }
    }

    /// Requests that started at `since` or later and completed, answered
    /// by `deployment` when one is named.
    pub fn completed(&self, since: Instant, deployment: Option<&str>) -> usize {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.started >= since && r.outcome() == Outcome::Complete)
            .filter(|r| deployment.is_none_or(|d| r.deployment.as_deref() == Some(d)))
            .count()
    }

    /// Stops the clients once their requests under way end, and returns
    /// every record.
    pub async fn stop(self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            tokio::time::timeout(REQUEST_BOUND * 2, client)
                .await
                .expect("a client's request ends within REQUEST_BOUND")
                .unwrap();
        }
        std::mem::take(&mut *self.records.lock().unwrap())
    }
}

async fn stream(
    client: &Client<HttpConnector, Full<Bytes>>,
    router: usize,
    public: SocketAddr,
    body: Bytes,
) -> Record {
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{public}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + REQUEST_BOUND;
    let mut record = Record {
        router,
        started,
        ended: started,
        status: None,
        deployment: None,
        body: String::new(),
    };
    match tokio::time::timeout_at(deadline, client.request(request)).await {
        Err(_) => record.body = format!("no response within {REQUEST_BOUND:?}"),
        Ok(Err(e)) => record.body = format!("transport error: {e:?}"),
        Ok(Ok(response)) => {
            let (parts, mut body) = response.into_parts();
            record.status = Some(parts.status);
            record.deployment = parts
                .headers
                .get("x-crossfade-deployment")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // Frame by frame: what arrived before a break is kept.
            let mut bytes = Vec::new();
            let ending = loop {
                match tokio::time::timeout_at(deadline, body.frame()).await {
                    Err(_) => break format!("[no end within {REQUEST_BOUND:?}]"),
                    Ok(None) => break String::new(),
                    Ok(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            bytes.extend_from_slice(data);
                        }
                    }
                    Ok(Some(Err(e))) => break format!("[body error: {e:?}]"),
                }
            };
            record.body = format!("{}{ending}", String::from_utf8_lossy(&bytes));
        }
    }
    record.ended = Instant::now();
    record
}
