//! Helpers shared by the integration tests: a guard around the real binary,
//! and a minimal HTTP client that opens a fresh connection per request.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Runs `fut`, failing the test if it takes longer than `secs`.
pub async fn bounded<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .expect("test step timed out")
}

/// A port that was free a moment ago (the binary must bind it itself).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub fn is_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The `fake-vllm` binary, killed when dropped; stderr is collected.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Proc {
    /// Runs `fake-vllm ARGS --port P` with only the given knobs set.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fake-vllm"));
        cmd.args(args)
            .args(["--port", &port.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for var in [
            "LOAD_TIME",
            "TOKENS_PER_SECOND",
            "TTFT",
            "MAX_TOKENS",
            "FAULT",
        ] {
            cmd.env_remove(format!("FAKE_VLLM_{var}"));
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        // Drained continuously so the child can never block on a full pipe.
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stderr,
            reader: Some(reader),
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the port accepts connections.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !is_open(self.addr) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("fake-vllm exited early ({status}):\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "port never opened:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                // Let the reader see the last lines before anyone looks.
                if let Some(reader) = self.reader.take() {
                    reader.join().unwrap();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fake-vllm did not exit:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The task driving one client connection, stopped when dropped.
pub struct Conn(tokio::task::JoinHandle<()>);

impl Drop for Conn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn request(method: Method, addr: SocketAddr, path: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap()
}

/// Sends one request over a new HTTP/1.1 connection.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> Result<(Response<Incoming>, Conn), Box<dyn std::error::Error + Send + Sync>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = Conn(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let response = sender
        .send_request(request(method, addr, path, body))
        .await?;
    Ok((response, conn))
}

/// An HTTP/2 (prior knowledge) connection for several requests.
pub struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    _conn: Conn,
}

impl H2 {
    pub async fn connect(addr: SocketAddr) -> H2 {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let conn = Conn(tokio::spawn(async move {
            let _ = conn.await;
        }));
        H2 {
            sender,
            addr,
            _conn: conn,
        }
    }

    pub async fn post(&mut self, path: &str, body: &str) -> Response<Incoming> {
        self.sender
            .send_request(request(Method::POST, self.addr, path, body))
            .await
            .unwrap()
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
}

async fn whole(method: Method, addr: SocketAddr, path: &str, body: &str) -> Reply {
    let (response, _conn) = send(addr, method, path, body).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    whole(Method::GET, addr, path, "").await
}

pub async fn post(addr: SocketAddr, path: &str, body: &str) -> Reply {
    whole(Method::POST, addr, path, body).await
}

/// A body's frames with their arrival times, and how the body ended.
pub struct Frames {
    pub frames: Vec<(Instant, Bytes)>,
    pub error: Option<String>,
}

impl Frames {
    /// The `data:` payloads, in order.
    pub fn events(&self) -> Vec<String> {
        let all: Vec<u8> = self.frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
        String::from_utf8(all)
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
            .collect()
    }

    /// When each event finished arriving (a frame may end several events,
    /// and TCP may split one event over several frames).
    pub fn event_times(&self) -> Vec<Instant> {
        self.frames
            .iter()
            .flat_map(|(at, data)| {
                let ends = data.windows(2).filter(|w| w == b"\n\n").count();
                std::iter::repeat_n(*at, ends)
            })
            .collect()
    }

    pub fn ends_with_done(&self) -> bool {
        self.events().last().is_some_and(|e| e == "[DONE]")
    }

    /// The generated text: chat deltas or completion texts joined.
    pub fn text(&self) -> String {
        self.events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                let v: serde_json::Value = serde_json::from_str(e).unwrap();
                let choice = v["choices"].get(0)?.clone();
                choice["delta"]["content"]
                    .as_str()
                    .or(choice["text"].as_str())
                    .map(str::to_owned)
            })
            .collect()
    }
}

/// Reads a body to its end (or its failure), timing every frame.
pub async fn frames(mut body: Incoming) -> Frames {
    let mut frames = Vec::new();
    loop {
        match body.frame().await {
            None => {
                return Frames {
                    frames,
                    error: None,
                };
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    frames.push((Instant::now(), data));
                }
            }
            Some(Err(e)) => {
                return Frames {
                    frames,
                    error: Some(e.to_string()),
                };
            }
        }
    }
}

/// The value of the first sample of `series` whose labels contain `labels`.
pub fn metric(text: &str, series: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name_labels, value) = l.rsplit_once(' ')?;
            let name = name_labels.split('{').next()?;
            (name == series && name_labels.contains(labels)).then(|| value.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {series}{{{labels}}} in:\n{text}"))
}

/// Polls `check` until it holds (bounded), for state that settles
/// asynchronously (a guard dropped just after the last byte went out).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Scrapes `/metrics` and reads the running and waiting gauges.
pub async fn gauges(addr: SocketAddr) -> (f64, f64) {
    let text = get(addr, "/metrics").await.body;
    (
        metric(&text, "vllm:num_requests_running", ""),
        metric(&text, "vllm:num_requests_waiting", ""),
    )
}

pub fn chat_body(model: &str, content: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}
