//! `agent.toml`: listeners, the engine (runtime, command, port, state
//! directory, readiness and restart behaviour), the GPU probe, and how
//! status is reported.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crossfade_common::FieldError;
use crossfade_common::config::Validate;
use crossfade_common::http::ServeOptions;
use crossfade_common::telemetry::LogConfig;
use crossfade_proto::tls::ControlTls;
use serde::{Deserialize, Serialize};

/// Default gate listener: the host's inference port.
pub const DEFAULT_GATE: &str = "0.0.0.0:8000";
/// Default control listener (Agent gRPC).
pub const DEFAULT_CONTROL: &str = "0.0.0.0:7002";
/// Default admin listener (`/metrics`, `/healthz`, `/readyz`): loopback only.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9402";
/// Default loopback port of the engine.
pub const DEFAULT_ENGINE_PORT: u16 = 8100;

/// The agent's whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This worker's identity; the host name when empty.
    pub worker_id: String,
    /// Labels the coordinator's worker selectors match.
    pub labels: BTreeMap<String, String>,
    /// The gate's address as routers should dial it; `listen.gate` with the
    /// host name when empty and the gate listens on every interface.
    pub advertise_gate: String,
    /// Listening addresses.
    pub listen: Listen,
    /// Logging.
    pub log: LogConfig,
    /// Mutual TLS on the control plane (or, explicitly, plain text).
    pub control_tls: ControlTls,
    /// The inference engine.
    pub engine: Engine,
    /// The container runtime (`engine.runtime = "container"`).
    pub container: Container,
    /// The gate in front of it.
    pub gate: Gate,
    /// GPU health.
    pub gpu: Gpu,
    /// Status reporting.
    pub status: StatusConfig,
}

/// `[listen]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// The gate: the host's inference port, in front of the engine.
    pub gate: SocketAddr,
    /// Agent gRPC, for the coordinator.
    pub control: SocketAddr,
    /// Admin HTTP: Prometheus `/metrics`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
}

/// How the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// A child process of the agent (in its own process group, so that it
    /// outlives the agent).
    Process,
    /// A container through the Docker Engine API (see `[container]`).
    Container,
}

/// When the container runtime pulls an engine's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Before every start.
    Always,
    /// When the host does not have it.
    IfNotPresent,
    /// Never: the image must be on the host.
    Never,
}

/// `[container]`: the engine as a container, through the Docker Engine API
/// (Docker, or Podman's Docker-compatible socket).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Container {
    /// The engine's API socket: `unix:///var/run/docker.sock`, or Podman's
    /// `unix:///run/podman/podman.sock`.
    pub socket: String,
    /// The image of a deployment whose template names none.
    pub image: String,
    /// `always`, `if-not-present` or `never`.
    pub pull: PullPolicy,
    /// `--ipc=host`, as vLLM's tensor parallel workers need; else a
    /// private `/dev/shm` of `shm_size` bytes.
    pub ipc_host: bool,
    /// `/dev/shm` in bytes when `ipc_host` is false (1 MiB ..= 1 TiB).
    pub shm_size: u64,
    /// The host's model cache, mounted as the container's `HF_HOME` for
    /// every deployment, so that a rollback does not download again; none
    /// when unset.
    pub cache_dir: Option<PathBuf>,
    /// Pass the GPUs of `engine.cuda_visible_devices` (all when empty) as
    /// NVIDIA device requests; false on a host without GPUs.
    pub gpus: bool,
}

impl Default for Container {
    fn default() -> Self {
        Self {
            socket: "unix:///var/run/docker.sock".into(),
            image: "vllm/vllm-openai:latest".into(),
            pull: PullPolicy::IfNotPresent,
            ipc_host: true,
            shm_size: 16 << 30,
            cache_dir: Some(PathBuf::from("/var/cache/crossfade/huggingface")),
            gpus: true,
        }
    }
}

/// `[engine]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Engine {
    /// `process` or `container`.
    pub runtime: RuntimeKind,
    /// The vLLM executable (`vllm`), or `fake-vllm`, which takes the same
    /// arguments.
    pub command: String,
    /// The loopback port the engine listens on (1024 ..= 65535).
    pub port: u16,
    /// Where the engine's state file and log live; must survive an agent
    /// restart.
    pub state_dir: PathBuf,
    /// `CUDA_VISIBLE_DEVICES` for the engine; unset when empty.
    pub cuda_visible_devices: String,
    /// How long an engine may take to become ready when the deployment does
    /// not say (1s ..= 6h): loading a large model takes minutes.
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// How often readiness and exit are checked while starting (10ms ..= 10s).
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How long a stopped engine has to exit after SIGTERM before SIGKILL
    /// (1s ..= 1h); vLLM's `--shutdown-timeout` plus a margin.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// Restarts after consecutive crashes before the engine is `FAILED`
    /// (0 ..= 100).
    pub max_restarts: u32,
    /// The first restart's delay, doubled after each crash (10ms ..= 1h).
    #[serde(with = "humantime_serde")]
    pub restart_backoff: Duration,
    /// The longest restart delay (10ms ..= 1h).
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// An engine ready this long has stopped crash-looping: its crash
    /// count starts again (1s ..= 1d).
    #[serde(with = "humantime_serde")]
    pub stable_after: Duration,
    /// Lines of the engine's log kept in a `FAILED` status (1 ..= 1000).
    pub log_tail_lines: usize,
    /// How often the engine's `/metrics` is read (100ms ..= 1m).
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
}

/// `[gate]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gate {
    /// Longest time a client may take to send its request headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Concurrent streams per HTTP/2 connection (1 ..= 10000).
    pub h2_max_concurrent_streams: u32,
    /// How long the agent's own shutdown waits for open requests. The
    /// engine keeps running when the agent stops, so this only bounds how
    /// long responses in flight through the gate may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Drain deadline for `Apply` when the request does not give one
    /// (0s ..= 1d).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// Which GPU probe reads the GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// NVML, through nvml-wrapper. No driver or no GPU reads as `unknown`.
    Nvml,
    /// The scriptable test double, reporting `fake_gpus` healthy H100s:
    /// for tests and `crossfade demo` on machines without a GPU.
    Fake,
    /// No probe: GPU health is `unknown`.
    None,
}

/// `[gpu]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gpu {
    /// `nvml`, `fake` or `none`.
    pub probe: ProbeKind,
    /// Refuse to start when the probe cannot read any GPU.
    pub require: bool,
    /// How often the GPUs are read (100ms ..= 10m).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// GPUs the fake probe reports (0 ..= 16).
    pub fake_gpus: u32,
    /// A JSON file the fake probe reads its faults from at every poll
    /// (XIDs, ECC errors, remaps, throttling, a lost GPU): how tests
    /// script a running agent's GPUs. See `gpu::fake`.
    pub fake_faults: Option<PathBuf>,
}

/// `[status]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// `WatchStatus` heartbeat when the caller does not ask for one
    /// (100ms ..= 10m).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

fn parse(s: &str) -> SocketAddr {
    s.parse().expect("the default addresses are valid")
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            gate: parse(DEFAULT_GATE),
            control: parse(DEFAULT_CONTROL),
            admin: parse(DEFAULT_ADMIN),
        }
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self {
            runtime: RuntimeKind::Process,
            command: "vllm".into(),
            port: DEFAULT_ENGINE_PORT,
            state_dir: "/var/lib/crossfade-agent".into(),
            cuda_visible_devices: String::new(),
            ready_timeout: Duration::from_secs(30 * 60),
            probe_interval: Duration::from_millis(500),
            stop_timeout: Duration::from_secs(60),
            max_restarts: 3,
            restart_backoff: Duration::from_secs(2),
            restart_backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(120),
            log_tail_lines: 40,
            metrics_interval: Duration::from_secs(1),
        }
    }
}

impl Default for Gate {
    fn default() -> Self {
        let serve = ServeOptions::default();
        Self {
            header_read_timeout: serve.header_read_timeout,
            h2_max_concurrent_streams: serve.h2_max_concurrent_streams,
            shutdown_grace: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10 * 60),
        }
    }
}

impl Default for Gpu {
    fn default() -> Self {
        Self {
            probe: ProbeKind::Nvml,
            require: false,
            poll_interval: Duration::from_secs(5),
            fake_gpus: 1,
            fake_faults: None,
        }
    }
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
        }
    }
}

impl Gate {
    /// The accept loop's options.
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            header_read_timeout: self.header_read_timeout,
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
            shutdown_grace: self.shutdown_grace,
            tls: None,
        }
    }
}

impl Config {
    /// `worker_id`, or the host name when it is empty.
    pub fn worker_id(&self) -> String {
        if !self.worker_id.is_empty() {
            return self.worker_id.clone();
        }
        host_name()
    }

    /// The gate address routers dial.
    pub fn gate_address(&self) -> String {
        if !self.advertise_gate.is_empty() {
            return self.advertise_gate.clone();
        }
        let gate = self.listen.gate;
        if gate.ip().is_unspecified() {
            format!("{}:{}", host_name(), gate.port())
        } else {
            gate.to_string()
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Validate for Config {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.log.validate("log");
        errors.extend(
            self.control_tls
                .validate("control_tls", &[("listen.control", self.listen.control)]),
        );
        let listen = [
            ("listen.gate", self.listen.gate),
            ("listen.control", self.listen.control),
            ("listen.admin", self.listen.admin),
        ];
        errors.extend(FieldError::distinct_listeners(&listen));
        let engine = &self.engine;
        errors.extend(FieldError::check_range(
            "engine.port",
            engine.port,
            1024..=65535,
        ));
        if listen.iter().any(|(_, a)| {
            a.port() == engine.port && (a.ip().is_loopback() || a.ip().is_unspecified())
        }) {
            errors.push(FieldError::new(
                "engine.port",
                format!("{} is also a listener of the agent", engine.port),
            ));
        }
        if engine.command.trim().is_empty() {
            errors.push(FieldError::new(
                "engine.command",
                "must name the engine's executable (`vllm`, `fake-vllm`)",
            ));
        }
        if engine.state_dir.as_os_str().is_empty() {
            errors.push(FieldError::new(
                "engine.state_dir",
                "must name a directory that survives an agent restart",
            ));
        }
        if engine.runtime == RuntimeKind::Container {
            if self.container.socket.trim().is_empty() {
                errors.push(FieldError::new(
                    "container.socket",
                    "must name the container engine's socket (unix:///var/run/docker.sock)",
                ));
            }
            errors.extend(FieldError::check_range(
                "container.shm_size",
                self.container.shm_size,
                1 << 20..=1 << 40,
            ));
        }
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        for (key, value, range) in [
            (
                "engine.ready_timeout",
                engine.ready_timeout,
                s(1)..=s(6 * 3600),
            ),
            (
                "engine.probe_interval",
                engine.probe_interval,
                ms(10)..=s(10),
            ),
            ("engine.stop_timeout", engine.stop_timeout, s(1)..=s(3600)),
            (
                "engine.restart_backoff",
                engine.restart_backoff,
                ms(10)..=s(3600),
            ),
            (
                "engine.restart_backoff_max",
                engine.restart_backoff_max,
                ms(10)..=s(3600),
            ),
            ("engine.stable_after", engine.stable_after, s(1)..=s(86_400)),
            (
                "engine.metrics_interval",
                engine.metrics_interval,
                ms(100)..=s(60),
            ),
            (
                "gate.header_read_timeout",
                self.gate.header_read_timeout,
                ms(100)..=s(600),
            ),
            (
                "gate.shutdown_grace",
                self.gate.shutdown_grace,
                s(0)..=s(86_400),
            ),
            (
                "gate.drain_timeout",
                self.gate.drain_timeout,
                s(0)..=s(86_400),
            ),
            (
                "gpu.poll_interval",
                self.gpu.poll_interval,
                ms(100)..=s(600),
            ),
            ("status.heartbeat", self.status.heartbeat, ms(100)..=s(600)),
        ] {
            errors.extend(FieldError::check_duration(key, value, range));
        }
        if engine.restart_backoff_max < engine.restart_backoff {
            errors.push(FieldError::new(
                "engine.restart_backoff_max",
                "must be at least engine.restart_backoff",
            ));
        }
        errors.extend(FieldError::check_range(
            "engine.max_restarts",
            engine.max_restarts,
            0..=100,
        ));
        errors.extend(FieldError::check_range(
            "engine.log_tail_lines",
            engine.log_tail_lines,
            1..=1000,
        ));
        errors.extend(FieldError::check_range(
            "gate.h2_max_concurrent_streams",
            self.gate.h2_max_concurrent_streams,
            1..=10_000,
        ));
        errors.extend(FieldError::check_range(
            "gpu.fake_gpus",
            self.gpu.fake_gpus,
            0..=16,
        ));
        errors
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The defaults, with the certificates they lack.
    fn with_certificates() -> Config {
        Config {
            control_tls: ControlTls {
                ca: Some("/etc/crossfade/certs/ca.pem".into()),
                cert: Some("/etc/crossfade/certs/gpu-host-1.pem".into()),
                key: Some("/etc/crossfade/certs/gpu-host-1.key".into()),
                ..ControlTls::default()
            },
            ..Config::default()
        }
    }

    #[test]
    fn the_defaults_are_valid_once_given_certificates() {
        assert_eq!(with_certificates().validate(), Vec::new());
        let keys: Vec<String> = Config::default()
            .validate()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(
            keys,
            ["control_tls.ca", "control_tls.cert", "control_tls.key"]
        );
    }

    #[test]
    fn every_bad_key_is_named_with_its_range() {
        let mut config = with_certificates();
        config.engine.port = 80;
        config.engine.max_restarts = 1000;
        config.engine.probe_interval = Duration::ZERO;
        config.engine.restart_backoff_max = Duration::from_millis(20);
        config.listen.control = config.listen.gate;
        let errors: Vec<String> = config.validate().iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "`listen.control`: 0.0.0.0:8000 is also listen.gate",
                "`engine.port`: must be within 1024..=65535, got 80",
                "`engine.probe_interval`: must be within 10ms..=10s, got 0s",
                "`engine.restart_backoff_max`: must be at least engine.restart_backoff",
                "`engine.max_restarts`: must be within 0..=100, got 1000",
            ]
        );
    }

    #[test]
    fn the_shipped_example_loads_and_the_environment_overrides_it() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/agent.toml");
        let config: Config = crossfade_common::config::load(&crossfade_common::config::Sources {
            file: Some(path),
            env: vec![("CROSSFADE_ENGINE__PORT".into(), "8200".into())],
            flags: Vec::new(),
        })
        .unwrap();
        assert_eq!(config.worker_id(), "gpu-host-1");
        assert_eq!(config.gate_address(), "10.0.0.11:8000");
        assert_eq!(config.labels["pool"], "h100");
        assert_eq!(config.engine.port, 8200);
        assert_eq!(config.engine.ready_timeout, Duration::from_secs(1800));
        assert!(config.gpu.require);
        assert!(!config.control_tls.insecure);
    }

    #[test]
    fn the_engine_may_not_take_an_agent_port() {
        let mut config = with_certificates();
        config.engine.port = config.listen.gate.port();
        let errors: Vec<String> = config.validate().iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            ["`engine.port`: 8000 is also a listener of the agent"]
        );
    }
}
