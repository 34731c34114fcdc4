//! The systems measured, each configured for the same job: endpoint `chat`
//! with two deployments at 80/20, two workers each, least-outstanding
//! balancing among a deployment's workers, keep-alive pools to the
//! workers, no response buffering, one worker thread, on the SUT core.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::Uri;

use crate::load::{self, Target};
use crate::system::{Guard, free_port, on_core, wait_for_port};

/// The deployments' weights, in the order of the backend's workers (two
/// workers each).
pub const WEIGHTS: [u32; 2] = [80, 20];

/// What every system is started with.
pub struct Setup {
    /// The backend's worker ports: deployment v1 is the first two, v2 the
    /// last two.
    pub workers: [u16; 4],
    /// More ports of v1's two workers (three each), for the routers that
    /// cannot weigh: with them, v1 is 8 of 10 listed workers.
    pub aliases: [u16; 6],
    /// The core the system runs on.
    pub core: usize,
    /// A scratch directory for configuration files and logs.
    pub dir: PathBuf,
    /// This program (it carries the router: `__router`).
    pub exe: PathBuf,
    /// The virtual environment with the Python routers.
    pub venv: PathBuf,
    /// The file-descriptor limit the systems inherit.
    pub fd_limit: u64,
}

/// A system measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The client picks a worker itself: the baseline.
    Direct,
    /// crossfade-router.
    Crossfade,
    /// The agent's gate alone, one in front of each backend worker; the
    /// client picks a gate by the weights, as for the baseline.
    Gate,
    /// The whole path: crossfade-router in front of the gates in front of
    /// the backend.
    CrossfadeGate,
    /// nginx.
    Nginx,
    /// HAProxy.
    Haproxy,
    /// sglang-router (Python wheel, Rust inside).
    Sglang,
    /// vllm-router (Python wheel, Rust inside).
    Vllm,
}

impl Kind {
    /// Every system, the baseline first.
    pub const ALL: [Kind; 8] = [
        Kind::Direct,
        Kind::Crossfade,
        Kind::Gate,
        Kind::CrossfadeGate,
        Kind::Nginx,
        Kind::Haproxy,
        Kind::Sglang,
        Kind::Vllm,
    ];

    /// Its name in tables, JSON and `--only`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Crossfade => "crossfade",
            Kind::Gate => "gate",
            Kind::CrossfadeGate => "crossfade+gate",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Sglang => "sglang-router",
            Kind::Vllm => "vllm-router",
        }
    }
}

/// A system started and ready.
pub struct Running {
    /// Where requests go.
    pub target: Target,
    /// Its version, as it reports it.
    pub version: String,
    /// The processes (empty for the baseline).
    pub processes: Vec<Guard>,
    /// Its RouterControl address (crossfade only).
    pub control: Option<u16>,
    /// How it was configured, for the report.
    pub notes: String,
}

impl Running {
    /// Resident memory of its processes, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.processes
            .iter()
            .map(|p| crate::system::tree_rss_kib(p.pid()))
            .sum()
    }
}

/// Why a system was not measured.
pub type Skip = String;

fn url(port: u16) -> Uri {
    format!("http://127.0.0.1:{port}/v1/chat/completions")
        .parse()
        .expect("a valid URL")
}

fn version_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().map(|l| l.trim().to_owned())
}

/// Starts `kind`; `Err` says why it was skipped.
pub async fn start(kind: Kind, setup: &Setup) -> Result<Running, Skip> {
    let running = match kind {
        Kind::Direct => Ok(Running {
            target: by_weights(setup.workers),
            version: "-".into(),
            processes: Vec::new(),
            control: None,
            notes: "the client picks a worker by the weights itself".into(),
        }),
        Kind::Crossfade => crossfade(setup, setup.workers, Vec::new()),
        Kind::Gate => {
            let (gates, processes) = gates(setup)?;
            Ok(Running {
                target: by_weights(gates),
                version: format!("crossfade-agent gate {}", env!("CARGO_PKG_VERSION")),
                processes,
                control: None,
                notes: "one gate (crossfade-bench __gate) per worker, TOKIO_WORKER_THREADS=1; the client picks a gate by the weights".into(),
            })
        }
        Kind::CrossfadeGate => {
            let (gates, processes) = gates(setup)?;
            crossfade(setup, gates, processes).map(|mut running| {
                // The table swaps are measured on `crossfade` alone.
                running.control = None;
                running.notes =
                    format!("{ROUTER_NOTES}; a gate per worker, TOKIO_WORKER_THREADS=1");
                running
            })
        }
        Kind::Nginx => nginx(setup),
        Kind::Haproxy => haproxy(setup),
        Kind::Sglang | Kind::Vllm => python_router(setup, kind),
    }?;
    ready(kind, running).await
}

/// Waits (up to 60 s) until a chat completion comes back through it.
async fn ready(kind: Kind, mut running: Running) -> Result<Running, Skip> {
    let client = load::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        for process in &mut running.processes {
            process
                .check_alive()
                .map_err(|e| format!("{e:#} ({last})"))?;
        }
        match load::send(&client, &running.target, load::completion_body()).await {
            Ok(_) => return Ok(running),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{} did not serve within 60 s: {last}", kind.name()))
}

fn port() -> Result<u16, Skip> {
    free_port().map_err(|e| format!("no free port: {e}"))
}

fn write(path: &Path, text: &str) -> Result<(), Skip> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn spawn(name: &str, command: Command, setup: &Setup) -> Result<Guard, Skip> {
    Guard::spawn(name, command, &setup.dir.join(format!("{name}.log")))
        .map_err(|e| format!("{e:#}"))
}

/// How the router is run, for the report.
const ROUTER_NOTES: &str =
    "TOKIO_WORKER_THREADS=1; weights 80/20; power of two choices on in-flight counts";

/// The client picks among `ports` (v1's two, then v2's) by the weights.
fn by_weights(ports: [u16; 4]) -> Target {
    Target::weighted(
        ports
            .iter()
            .enumerate()
            .map(|(i, &port)| (url(port), WEIGHTS[i / 2] / 2))
            .collect(),
    )
}

/// One gate per backend worker (`__gate`, as the agent serves it): their
/// ports and processes.
fn gates(setup: &Setup) -> Result<([u16; 4], Vec<Guard>), Skip> {
    let mut ports = [0; 4];
    let mut processes = Vec::new();
    for (i, &worker) in setup.workers.iter().enumerate() {
        let gate = port()?;
        let mut command = on_core(setup.core, &setup.exe.to_string_lossy());
        command
            .arg("__gate")
            .arg(gate.to_string())
            .arg(worker.to_string())
            .env("TOKIO_WORKER_THREADS", "1");
        processes.push(spawn(&format!("gate-{i}"), command, setup)?);
        wait_for_port(gate, Duration::from_secs(10)).map_err(|e| format!("{e:#}"))?;
        ports[i] = gate;
    }
    Ok((ports, processes))
}

/// crossfade-router in front of `workers` (the backend's, or gates in
/// front of it, whose `processes` it then carries).
fn crossfade(setup: &Setup, workers: [u16; 4], gates: Vec<Guard>) -> Result<Running, Skip> {
    let (public, admin, control) = (port()?, port()?, port()?);
    let [w1, w2, w3, w4] = workers;
    let config = format!(
        r#"# crossfade-router, as the benchmark runs it.
[control_tls]
insecure = true
[listen]
public = "127.0.0.1:{public}"
admin = "127.0.0.1:{admin}"
control = "127.0.0.1:{control}"

[log]
filter = "warn"

[limits]
# The benchmark's clients are all one address; nginx and HAProxy are run
# with no limit per client either.
max_concurrent_requests = 100000
max_concurrent_per_client = 100000

[[endpoint]]
name = "chat"

[[endpoint.deployment]]
id = "v1"
weight = {v1}
workers = ["127.0.0.1:{w1}", "127.0.0.1:{w2}"]

[[endpoint.deployment]]
id = "v2"
weight = {v2}
workers = ["127.0.0.1:{w3}", "127.0.0.1:{w4}"]
"#,
        v1 = WEIGHTS[0],
        v2 = WEIGHTS[1],
    );
    let path = setup.dir.join("router.toml");
    write(&path, &config)?;
    let mut command = on_core(setup.core, &setup.exe.to_string_lossy());
    command
        .arg("__router")
        .arg("--config")
        .arg(&path)
        .env("TOKIO_WORKER_THREADS", "1");
    let mut processes = gates;
    processes.push(spawn("crossfade-router", command, setup)?);
    Ok(Running {
        target: Target::proxy(url(public)),
        version: format!("crossfade-router {}", env!("CARGO_PKG_VERSION")),
        processes,
        control: Some(control),
        notes: ROUTER_NOTES.into(),
    })
}

fn nginx(setup: &Setup) -> Result<Running, Skip> {
    let program = "nginx";
    let version =
        version_of(program, &["-v"]).ok_or("nginx is not installed (bench/install-peers.sh)")?;
    let port = port()?;
    let dir = setup.dir.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = nginx_config(&dir, port, setup.workers, setup.fd_limit, true);
    let path = dir.join("nginx.conf");
    write(&path, &config)?;
    let mut command = on_core(setup.core, program);
    command
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&path);
    let notes =
        "worker_processes 1; split_clients 80%/*; least_conn; keepalive 256; proxy_buffering off";
    listening("nginx", command, setup, port, version, notes)
}

/// Starts a proxy that listens on `port` and waits until it does.
fn listening(
    name: &str,
    command: Command,
    setup: &Setup,
    port: u16,
    version: String,
    notes: &str,
) -> Result<Running, Skip> {
    let process = spawn(name, command, setup)?;
    wait_for_port(port, Duration::from_secs(10)).map_err(|e| format!("{e:#}"))?;
    Ok(proxy_on(port, version, process, notes))
}

/// A proxy serving on `port` from `process`.
fn proxy_on(port: u16, version: String, process: Guard, notes: &str) -> Running {
    Running {
        target: Target::proxy(url(port)),
        version,
        processes: vec![process],
        control: None,
        notes: notes.into(),
    }
}

fn haproxy(setup: &Setup) -> Result<Running, Skip> {
    let program = "haproxy";
    let version =
        version_of(program, &["-v"]).ok_or("HAProxy is not installed (bench/install-peers.sh)")?;
    let port = port()?;
    let config = haproxy_config(port, setup.workers, setup.fd_limit.saturating_sub(100) / 2);
    let path = setup.dir.join("haproxy.cfg");
    write(&path, &config)?;
    let mut command = on_core(setup.core, program);
    command.arg("-db").arg("-f").arg(&path);
    let notes =
        "nbthread 1; rand(100) lt 80; balance leastconn; http-reuse always; option http-no-delay";
    listening("haproxy", command, setup, port, version, notes)
}

fn python_router(setup: &Setup, kind: Kind) -> Result<Running, Skip> {
    let name = kind.name();
    let version = Command::new(setup.venv.join("bin/pip"))
        .args(["show", name])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("Version: ").map(|v| format!("{name} {v}")))
        })
        .ok_or_else(|| {
            format!(
                "{name} is not installed in {} (bench/install-peers.sh)",
                setup.venv.display()
            )
        })?;
    let (port, metrics) = (port()?, port()?);
    let mut command = if kind == Kind::Sglang {
        let mut command = on_core(setup.core, &setup.venv.join("bin/python").to_string_lossy());
        command.args(["-m", "sglang_router.launch_router"]);
        command
    } else {
        on_core(
            setup.core,
            &setup.venv.join("bin/vllm-router").to_string_lossy(),
        )
    };
    command
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        // Neither can turn its Prometheus listener off; each gets its own.
        .args([
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            &metrics.to_string(),
        ])
        .args(["--disable-retries", "--disable-circuit-breaker"])
        .arg("--worker-urls");
    let [w1, w2, w3, w4] = setup.workers;
    // v1's workers four times each (their own port and three more), v2's
    // once: 80/20 when the load is even.
    let listed = [w1, w2].into_iter().chain(setup.aliases).chain([w3, w4]);
    let mut workers = String::new();
    for port in listed {
        command.arg(format!("http://127.0.0.1:{port}"));
        let _ = write!(workers, " {port}");
    }
    let notes = if kind == Kind::Sglang {
        // `power_of_two` reads loads from the workers' `/get_load`, every
        // 30 s; `cache_aware` with these thresholds sends each request to
        // the worker with the fewest in flight, by the router's own count.
        command.args([
            "--policy",
            "cache_aware",
            "--balance-abs-threshold",
            "0",
            "--balance-rel-threshold",
            "1.0",
            "--disable-health-check",
            "--log-level",
            "warn",
        ]);
        "cache_aware with balance thresholds 0/1.0 (fewest in flight); 10 worker URLs, v1's listed 4× (no weights)"
    } else {
        command.args([
            "--policy",
            "power_of_two",
            "--health-check-interval-secs",
            "86400",
            // It waits for every worker's /health before it listens,
            // checking this often (30 s by default).
            "--worker-startup-check-interval",
            "1",
            // It ignores `warning` and logs every request at `info`.
            "--log-level",
            "error",
        ]);
        "power_of_two on its own in-flight counts; 10 worker URLs, v1's listed 4× (no weights)"
    };
    command.env("TOKIO_WORKER_THREADS", "1");
    let process = spawn(name, command, setup)?;
    Ok(proxy_on(port, version, process, notes))
}

/// nginx's configuration as the benchmark runs it: files in `dir`,
/// listening on `port`, in front of `workers`; with its master process, or
/// (`master` false) in one process, as callgrind needs it.
pub fn nginx_config(
    dir: &Path,
    port: u16,
    workers: [u16; 4],
    fd_limit: u64,
    master: bool,
) -> String {
    let d = dir.display();
    let [w1, w2, w3, w4] = workers;
    let master = if master { "" } else { "master_process off;\n" };
    format!(
        r#"# nginx, as the benchmark runs it: one worker process.
daemon off;
{master}worker_processes 1;
worker_rlimit_nofile {fd_limit};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    split_clients "${{request_id}}" $deployment {{
        {v1}% v1;
        *   v2;
    }}
    upstream v1 {{ least_conn; server 127.0.0.1:{w1}; server 127.0.0.1:{w2}; keepalive 256; keepalive_requests 1000000; }}
    upstream v2 {{ least_conn; server 127.0.0.1:{w3}; server 127.0.0.1:{w4}; keepalive 256; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://$deployment;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"#,
        v1 = WEIGHTS[0],
        connections = fd_limit.saturating_sub(100),
    )
}

/// HAProxy's configuration as the benchmark runs it: listening on `port`,
/// in front of `workers`, at most `maxconn` connections.
pub fn haproxy_config(port: u16, workers: [u16; 4], maxconn: u64) -> String {
    let [w1, w2, w3, w4] = workers;
    format!(
        r#"# HAProxy, as the benchmark runs it: one thread.
global
    nbthread 1
    # Two descriptors a connection, within the inherited limit.
    maxconn {maxconn}

defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    option http-no-delay
    http-reuse always

frontend chat
    bind 127.0.0.1:{port}
    use_backend v1 if {{ rand(100) lt {v1} }}
    default_backend v2

backend v1
    balance leastconn
    server a 127.0.0.1:{w1}
    server b 127.0.0.1:{w2}

backend v2
    balance leastconn
    server a 127.0.0.1:{w3}
    server b 127.0.0.1:{w4}
"#,
        v1 = WEIGHTS[0],
    )
}

/// `crossfade-bench __config nginx|haproxy DIR PORT W1 W2 W3 W4`: prints
/// the peer's configuration as the benchmark runs it (nginx in one
/// process), for `bench/profile-router.sh`.
pub fn print_config(args: &[String]) -> anyhow::Result<()> {
    let [peer, dir, port, workers @ ..] = args else {
        anyhow::bail!("usage: __config nginx|haproxy DIR PORT W1 W2 W3 W4");
    };
    let port: u16 = port.parse().context("PORT")?;
    let workers: Vec<u16> = workers
        .iter()
        .map(|w| w.parse::<u16>())
        .collect::<Result<_, _>>()
        .context("W1..W4")?;
    let workers: [u16; 4] = workers
        .try_into()
        .map_err(|_| anyhow::anyhow!("four worker ports: W1 W2 W3 W4"))?;
    let config = match peer.as_str() {
        "nginx" => nginx_config(Path::new(dir), port, workers, 1124, false),
        "haproxy" => haproxy_config(port, workers, 1000),
        other => anyhow::bail!("unknown peer `{other}`: nginx or haproxy"),
    };
    print!("{config}");
    Ok(())
}
