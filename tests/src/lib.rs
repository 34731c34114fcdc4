//! The harness of crossfade's end-to-end tests: the workspace's programs run
//! as real processes on 127.0.0.1, started and stopped by the test.
//!
//! It holds no test itself (those are in `tests/`) and nothing a program
//! uses at run time. Every wait is bounded, every process is killed when
//! its guard drops, and only loopback addresses are used.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The workspace's root directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the workspace")
}

/// Path of a workspace binary, built (once per test process) with the same
/// profile and features as the tests, so that a test never runs a stale copy.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = target_dir()?.join(name);
    if !path.is_file() {
        bail!("{} was not built", path.display());
    }
    Ok(path)
}

/// `target/<profile>`: the test executable lives in its `deps/`.
fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_owned)
        .context("the test executable is not in target/<profile>/deps")
}

fn build_binaries() -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let profile = target_dir()?
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .context("target directory has no profile name")?;
    let mut command = Command::new(cargo);
    // `cargo build --bins`: `cargo test --no-run` builds a package's
    // binaries only when the package has integration tests of its own, and
    // would leave the others stale. Features resolve as a user's build does.
    command
        .current_dir(workspace_root())
        .args(["build", "--workspace", "--bins", "--quiet"]);
    if cfg!(feature = "etcd") {
        command.args(["--features", "crossfade-coordinator/etcd"]);
    }
    match profile.as_str() {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    let status = command.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the workspace binaries failed: {status}");
    }
    Ok(())
}

/// A fresh directory under the system's temporary directory, removed
/// with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path =
            std::env::temp_dir().join(format!("crossfade-e2e-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free port on 127.0.0.1 for a program that binds its own listener
/// (see [`crossfade_common::net::free_loopback_port`]).
pub fn free_port() -> anyhow::Result<u16> {
    crossfade_common::net::free_loopback_port().context("picking a port on 127.0.0.1")
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a
/// failing test leaves nothing running.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    /// Starts `command` with stdin closed and stdout and stderr inherited
    /// (the test harness captures them).
    pub fn spawn(name: impl Into<String>, mut command: Command) -> anyhow::Result<Self> {
        let name = name.into();
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("{} exited early: {status}", self.name),
            None => Ok(()),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `timeout`;
/// the error says what was awaited.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("waited {timeout:?} for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    wait_for(&format!("{addr} to accept connections"), timeout, || {
        Ok(
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(drop),
        )
    })
}

/// A Python interpreter that has the official `openai` package, if there is
/// one: `$E2E_PYTHON`, else the workspace's `.venv` (which `.ci/run`
/// creates), else `python3`.
pub fn python_with_openai() -> Option<PathBuf> {
    let candidates = std::env::var_os("E2E_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            workspace_root().join(".venv/bin/python"),
            PathBuf::from("python3"),
        ]);
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// [`python_with_openai`] for a test: under CI a missing `openai` package
/// fails the test; elsewhere the test says it is skipped and returns `None`.
pub fn python_for_test() -> Option<PathBuf> {
    let python = python_with_openai();
    if python.is_none() {
        assert!(
            !in_ci(),
            "CI must provide the openai package (.ci/run installs it)"
        );
        eprintln!("skipped: no Python with the `openai` package (run .ci/run, or set E2E_PYTHON)");
    }
    python
}

/// True under CI, where a missing tool is a failure rather than a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Streams one chat completion with the official `openai` Python client and
/// prints, per chunk, the seconds since the request was sent, the content
/// delta, the model and the usage, as JSON lines.
const OPENAI_CLIENT: &str = r#"
import json, sys, time
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=30)
start = time.monotonic()
stream = client.chat.completions.create(
    model=sys.argv[2],
    messages=[{"role": "user", "content": "Say something."}],
    max_tokens=8,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    delta = chunk.choices[0].delta.content if chunk.choices else None
    usage = chunk.usage.completion_tokens if chunk.usage else None
    print(json.dumps({"t": time.monotonic() - start, "content": delta,
                      "model": chunk.model, "usage": usage}), flush=True)
"#;

/// Runs `script` with `python` and `args`; its output lines, or an error
/// with its standard error when it fails.
pub fn run_python(
    python: &Path,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> anyhow::Result<Vec<String>> {
    let out = Command::new(python)
        .args(["-c", script])
        .args(args)
        .output()
        .context("running python")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the script failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout.lines().map(str::to_owned).collect())
}

/// One chunk as the official client saw it.
#[derive(Debug, Clone)]
pub struct ClientChunk {
    /// Seconds from sending the request to receiving this chunk.
    pub at: f64,
    /// The content delta, when the chunk has one.
    pub content: Option<String>,
    /// The `model` the chunk names.
    pub model: String,
    /// Completion tokens, in the final usage chunk.
    pub usage: Option<u64>,
}

/// Streams a chat completion for `model` from `base_url` (ending in `/v1`)
/// with the official `openai` Python client run by `python`.
pub fn openai_stream(
    python: &Path,
    base_url: &str,
    model: &str,
) -> anyhow::Result<Vec<ClientChunk>> {
    let out = Command::new(python)
        .args(["-c", OPENAI_CLIENT, base_url, model])
        .output()
        .context("running the openai client")?;
    if !out.status.success() {
        bail!(
            "the openai client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)?;
            Ok(ClientChunk {
                at: v["t"].as_f64().context("t")?,
                content: v["content"].as_str().map(str::to_owned),
                model: v["model"].as_str().unwrap_or_default().to_owned(),
                usage: v["usage"].as_u64(),
            })
        })
        .collect()
}

/// The chunks that carry a token (vLLM's first chunk carries the role with
/// empty content).
pub fn tokens(chunks: &[ClientChunk]) -> Vec<&ClientChunk> {
    chunks
        .iter()
        .filter(|c| c.content.as_deref().is_some_and(|s| !s.is_empty()))
        .collect()
}

/// Starts `fake-vllm serve MODEL --port P --served-model-name NAMES...`
/// with the given knobs, and waits until it accepts connections. An agent
/// serves the endpoint's name and every alias, and so should a test that
/// stands in for one.
pub fn start_fake_vllm(
    model: &str,
    served_names: &[&str],
    knobs: &[(&str, &str)],
) -> anyhow::Result<(Process, SocketAddr)> {
    let port = free_port()?;
    let mut command = Command::new(binary("fake-vllm")?);
    command
        .args(["serve", model, "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .arg("--served-model-name")
        .args(served_names)
        .envs(knobs.iter().copied());
    let mut process = Process::spawn(format!("fake-vllm {model}"), command)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_port(addr, Duration::from_secs(20))?;
    process.ensure_running()?;
    Ok((process, addr))
}

/// The longest any one `docker` command may take: a daemon that stops
/// answering fails the test instead of hanging it.
pub const DOCKER_BOUND: Duration = Duration::from_secs(120);

/// `docker ARGS`, bounded by [`DOCKER_BOUND`]: its standard output, or why
/// it failed (the end of its standard error).
pub fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("timeout")
        .args([
            "--kill-after=5",
            &DOCKER_BOUND.as_secs().to_string(),
            "docker",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running docker {args:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        let start = (stderr.len().saturating_sub(1000)..stderr.len())
            .find(|&i| stderr.is_char_boundary(i))
            .unwrap_or(stderr.len());
        Err(format!(
            "docker {args:?}: {}: {}",
            output.status,
            &stderr[start..]
        ))
    }
}

/// A name no other run shares: `PREFIX-PID-NANOS` (this process and the
/// time), so that what a killed run left can be told by its dead pid.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// An etcd server of a test's own: one member on 127.0.0.1, its data in a
/// temporary directory, allowing transactions as large as a coordinator of
/// a big fleet writes; killed when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    process: Option<Process>,
    dir: TempDir,
    client: u16,
    peer: u16,
}

impl EtcdServer {
    /// Starts one, or `None` when there is no `etcd` program here; under CI
    /// or with `CROSSFADE_REQUIRE_ETCD=1`, a missing `etcd` is an error
    /// (`.ci/run` installs Debian's etcd-server).
    pub fn start() -> anyhow::Result<Option<Self>> {
        let found = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            if in_ci() || std::env::var("CROSSFADE_REQUIRE_ETCD").is_ok_and(|v| v == "1") {
                bail!("etcd is required here (apt-get install etcd-server)");
            }
            eprintln!("SKIPPED: no etcd program (apt-get install etcd-server)");
            return Ok(None);
        }
        let mut server = Self {
            process: None,
            dir: TempDir::new()?,
            client: free_port()?,
            peer: free_port()?,
        };
        server.run()?;
        Ok(Some(server))
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let client = format!("http://127.0.0.1:{}", self.client);
        let mut command = Command::new("etcd");
        command
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--max-txn-ops=20000")
            .arg("--max-request-bytes=33554432")
            .arg("--logger=zap")
            .arg("--log-level=error")
            .stdout(Stdio::null());
        self.process = Some(Process::spawn("etcd", command)?);
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], self.client)),
            Duration::from_secs(20),
        )
    }

    /// Its client endpoint, `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Starts it again on the same data and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.run()
    }
}
