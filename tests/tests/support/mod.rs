//! Shared by the end-to-end tests that run agents: hosts with their ports
//! and state directories, agents as processes, a gRPC client, HTTP helpers.
#![allow(dead_code, clippy::unwrap_used)]

pub mod browser;
pub mod hosts;
pub mod load;
pub mod streams;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossfade_e2e::{Process, TempDir, binary, free_port, wait_for_port};
use crossfade_proto::v1::{self, EngineState, agent_client::AgentClient};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tonic::transport::Channel;

/// A running agent and what a test needs to reach it.
pub struct Agent {
    /// Killed with SIGKILL when dropped.
    pub process: Process,
    pub gate: SocketAddr,
    pub control: SocketAddr,
    pub admin: SocketAddr,
    pub engine_port: u16,
}

/// Ports and directory of one agent host; a second agent on the same host
/// (after the first is killed) reuses them.
pub struct Host {
    pub dir: TempDir,
    pub gate: u16,
    pub control: u16,
    pub admin: u16,
    pub engine: u16,
}

impl Host {
    pub fn new() -> Self {
        Self {
            dir: TempDir::new().unwrap(),
            gate: free_port().unwrap(),
            control: free_port().unwrap(),
            admin: free_port().unwrap(),
            engine: free_port().unwrap(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The fake GPU probe's fault file (see `crossfade_agent::gpu::fake`).
    pub fn gpu_faults(&self) -> PathBuf {
        self.dir.path().join("gpu-faults.json")
    }

    /// Makes the host's fake GPUs show `faults` from the probe's next read.
    pub fn inject_gpu_faults(&self, faults: &str) {
        let path = self.gpu_faults();
        let staged = path.with_extension("tmp");
        std::fs::write(&staged, faults).unwrap();
        // Whole or not at all: the agent may read at any moment.
        std::fs::rename(&staged, &path).unwrap();
    }

    /// Starts an agent with `env` (standalone variables, fake-vllm knobs)
    /// and extra `[engine]` keys.
    pub fn start(&self, env: &[(&str, &str)], engine_keys: &str) -> Agent {
        let config = self.dir.path().join("agent.toml");
        let text = format!(
            r#"
worker_id = "worker-1"
[labels]
zone = "test"

[control_tls]
insecure = true
[listen]
gate = "127.0.0.1:{gate}"
control = "127.0.0.1:{control}"
admin = "127.0.0.1:{admin}"

[engine]
command = "{command}"
port = {engine}
state_dir = "{state}"
probe_interval = "50ms"
metrics_interval = "100ms"
restart_backoff = "50ms"
restart_backoff_max = "200ms"
max_restarts = 2
stop_timeout = "10s"
{engine_keys}

[gpu]
probe = "fake"
fake_gpus = 2
poll_interval = "100ms"
fake_faults = "{faults}"

[status]
heartbeat = "200ms"
"#,
            gate = self.gate,
            control = self.control,
            admin = self.admin,
            command = binary("fake-vllm").unwrap().display(),
            engine = self.engine,
            state = self.state_dir().display(),
            faults = self.gpu_faults().display(),
        );
        std::fs::write(&config, text).unwrap();
        let mut command = Command::new(binary("crossfade-agent").unwrap());
        command
            .arg("--config")
            .arg(&config)
            .env_remove("MODEL_NAME")
            .env_remove("VLLM_ARGS")
            .env_remove("SERVED_MODEL_NAME")
            .env("FAKE_VLLM_TOKENS_PER_SECOND", "200")
            // Quiet unless asked: children's output is not captured.
            .env(
                "RUST_LOG",
                std::env::var("E2E_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied());
        let process = Process::spawn("crossfade-agent", command).unwrap();
        let localhost = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let agent = Agent {
            process,
            gate: localhost(self.gate),
            control: localhost(self.control),
            admin: localhost(self.admin),
            engine_port: self.engine,
        };
        wait_for_port(agent.control, Duration::from_secs(30)).unwrap();
        agent
    }
}

/// Kills the engine recorded in a state directory when dropped: the engine
/// outlives the agent by design, so a test must stop it itself. Declare it
/// before the agent, so that the agent dies first and cannot restart it.
pub struct EngineReaper(pub PathBuf);

impl Drop for EngineReaper {
    fn drop(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.0.join("engine.json")) else {
            return;
        };
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&text) else {
            return;
        };
        if let Some(container) = record["container"].as_str() {
            let _ = docker(&["rm", "-f", container]);
            return;
        }
        if let Some(pid) = record["pid"].as_u64() {
            // The engine leads its own process group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

impl Agent {
    pub async fn client(&self) -> AgentClient<Channel> {
        AgentClient::connect(format!("http://{}", self.control))
            .await
            .unwrap()
    }

    pub async fn status(&self) -> v1::WorkerStatus {
        self.client()
            .await
            .get_status(v1::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Polls the status until `check` holds, for at most `timeout`.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&v1::WorkerStatus) -> bool,
    ) -> v1::WorkerStatus {
        let deadline = Instant::now() + timeout;
        let mut client = self.client().await;
        loop {
            let status = client
                .get_status(v1::GetStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {what}; last status: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_state(&self, state: EngineState, timeout: Duration) -> v1::WorkerStatus {
        self.wait_status(&format!("{state:?}"), timeout, |s| {
            engine(s).state() == state
        })
        .await
    }
}

pub fn engine(status: &v1::WorkerStatus) -> &v1::EngineStatus {
    status.engine.as_ref().unwrap()
}

pub fn in_flight(status: &v1::WorkerStatus) -> (u32, u32) {
    let f = status.in_flight.unwrap();
    (f.gate, f.engine_running)
}

pub fn http() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a chat completion to `addr`; returns the status, headers and
/// whole body.
pub async fn chat(addr: SocketAddr, model: &str, stream: bool) -> (StatusCode, HeaderMap, String) {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "stream": stream,
    });
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), http().request(request))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(60), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

pub async fn fake_control(engine_port: u16, action: &str) {
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://127.0.0.1:{engine_port}/_fake/{action}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = http().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

pub fn spec(id: &str, model: &str, vllm_args: &str) -> v1::EngineSpec {
    v1::EngineSpec {
        deployment_id: id.into(),
        endpoint: "chat".into(),
        aliases: vec!["alias".into()],
        template: Some(v1::Template {
            runtime: v1::EngineRuntime::Process as i32,
            model: model.into(),
            vllm_args: vllm_args.into(),
            env: vec![v1::EnvVar {
                name: "HF_TOKEN".into(),
                source: Some(v1::env_var::Source::Value("hf_secret_value_1234".into())),
                secret: true,
                redacted: false,
            }],
            ..Default::default()
        }),
        ready_timeout: None,
    }
}

pub fn seconds(s: f64) -> Option<prost_types::Duration> {
    Duration::from_secs_f64(s).try_into().ok()
}

pub async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let request = Request::builder()
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = http().request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// A router with one endpoint, `chat`, whose one deployment has `workers`.
pub fn start_router(dir: &TempDir, workers: &[SocketAddr]) -> (Process, SocketAddr) {
    let public = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let [admin, control] = [0; 2].map(|_| free_port().unwrap());
    let workers: Vec<String> = workers.iter().map(|w| format!("\"{w}\"")).collect();
    let config = dir.path().join("router.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[control_tls]
insecure = true
[listen]
public = "{public}"
admin = "127.0.0.1:{admin}"
control = "127.0.0.1:{control}"

[[endpoint]]
name = "chat"
[[endpoint.deployment]]
id = "v1"
weight = 1
workers = [{}]
"#,
            workers.join(", ")
        ),
    )
    .unwrap();
    (spawn_router(&config, public), public)
}

/// Runs `crossfade-router --config CONFIG` and waits until `listening`
/// (one of its listeners) accepts connections.
pub fn spawn_router(config: &std::path::Path, listening: SocketAddr) -> Process {
    let mut command = Command::new(binary("crossfade-router").unwrap());
    command.arg("--config").arg(config).env("RUST_LOG", "warn");
    let process = Process::spawn("crossfade-router", command).unwrap();
    wait_for_port(listening, Duration::from_secs(20)).unwrap();
    process
}

// === Containers ===

/// `docker ARGS`: its standard output when it succeeds.
pub fn docker(args: &[&str]) -> Option<String> {
    crossfade_e2e::docker(args).ok()
}

/// Whether a container engine answers; says so when none does.
pub fn engine_answers() -> bool {
    if docker(&["version", "--format", "{{.Server.Version}}"]).is_some() {
        return true;
    }
    assert!(
        std::env::var("CROSSFADE_REQUIRE_CONTAINERS").as_deref() != Ok("1"),
        "CROSSFADE_REQUIRE_CONTAINERS=1 but no container engine answers (docker version)"
    );
    eprintln!(
        "SKIPPED: no container engine answers (docker version); the container tests did not run"
    );
    false
}

/// A local image of `fake-vllm` (its binary, the libraries `ldd` names
/// and the loader, loaded with `docker import`), tagged
/// `crossfade-fake-vllm:TAG`; removed when dropped.
pub fn fake_vllm_image(dir: &Path, tag: &str) -> hosts::Image {
    hosts::Image::build(
        dir,
        &format!("crossfade-fake-vllm:{tag}"),
        &[binary("fake-vllm").unwrap()],
        &[],
        &[r#"ENTRYPOINT ["/fake-vllm", "serve"]"#],
    )
}

/// Removes the engine container of `port` when dropped, whatever happened.
pub struct ContainerReaper(pub String);

impl Drop for ContainerReaper {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

/// Whether the end-to-end suites run their agents in container mode
/// (`CROSSFADE_E2E_RUNTIME=container`, as `.ci/run` runs the promotion
/// suite once).
pub fn container_mode() -> bool {
    std::env::var("CROSSFADE_E2E_RUNTIME").as_deref() == Ok("container")
}

/// The agent configuration's keys of container mode (after `[engine]`'s):
/// the fake-vllm image, built once per test program under a fixed tag (so
/// runs do not pile images up), never pulled, no GPUs.
pub fn container_keys() -> String {
    static IMAGE: OnceLock<(TempDir, hosts::Image)> = OnceLock::new();
    let (dir, image) = IMAGE.get_or_init(|| {
        assert!(engine_answers(), "container mode needs a container engine");
        let dir = TempDir::new().unwrap();
        let image = fake_vllm_image(dir.path(), "e2e");
        (dir, image)
    });
    format!(
        "runtime = \"container\"\n[container]\nimage = \"{}\"\npull = \"never\"\ngpus = false\ncache_dir = \"{}\"\n",
        image.0,
        dir.path().display()
    )
}

/// The status of an endpoint's last promotion, once none is in progress.
pub fn last_status(endpoint: &v1::Endpoint) -> Option<v1::PromotionStatus> {
    endpoint
        .last_promotion
        .as_ref()
        .filter(|_| endpoint.in_progress_promotion.is_none())
        .map(|p| p.status())
}
