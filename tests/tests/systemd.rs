//! The `.deb` packages and their systemd units under a real systemd, PID 1
//! of a Debian container built here (no registry is reachable: debootstrap
//! from Debian's mirror, loaded with `docker import`, kept under a fixed
//! tag so that later runs skip it).
//!
//! It installs the four packages, and shows that the units are installed
//! and not enabled and verify, and that the sandbox rates as documented;
//! that the agent is active only once it listens (`Type=notify`), that the
//! watchdog leaves a healthy agent alone and restarts a hung one, and that
//! `systemctl restart crossfade-agent` under streaming load through a
//! router loses no request while the engine (fake-vllm, process mode) keeps
//! running and the new agent adopts it. Apart, that the router's and the
//! coordinator's container recipes (`deploy/container/`) build on the same
//! base and run.
//!
//! Where no Docker Engine answers, debootstrap cannot build the image, or
//! no package can be had, the test says so and passes, unless
//! `CROSSFADE_REQUIRE_SYSTEMD=1` (as `.ci/run` sets it where Docker
//! answers), which makes that a failure. The packages are
//! `$CROSSFADE_DEBS/*.deb` when set (`.ci/run` builds them from the
//! release binaries), else built here by `cargo deb --no-build` from the
//! binaries of the test's own profile.
#![allow(clippy::unwrap_used)]

mod debian;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crossfade_e2e::{TempDir, binary, wait_for, workspace_root};

use debian::{Container, IMAGE, Image, docker, docker_and_base_image, skip, tail, unique_name};

/// The packages, by the start of their file names.
const PACKAGES: [&str; 4] = [
    "crossfade-agent_",
    "crossfade-router_",
    "crossfade-coordinator_",
    "crossfade_",
];
const UNITS: [&str; 3] = [
    "crossfade-agent.service",
    "crossfade-router.service",
    "crossfade-coordinator.service",
];
/// Short enough for the test to see it fire, long enough for a loaded
/// machine to keep pinging (every 1.5 s).
const WATCHDOG_SECS: u64 = 3;
/// Streamed tokens a second: a reply of 20 tokens lasts 2.5 s, so that
/// streams are in flight through the gate whenever the agent restarts.
const TOKENS_PER_SECOND: u32 = 8;
const CLIENTS: usize = 6;

#[test]
fn the_packages_install_and_their_units_run_under_systemd() {
    let Some(debs) = prerequisites() else {
        return;
    };
    let started = Instant::now();
    let host = Container::boot();
    install(&host, &debs.dir);
    configure(&host);
    the_agent_is_active_once_it_listens(&host);
    start_the_others(&host);
    let engine = engine_pid(&host, "crossfade-agent");
    a_restart_under_load_loses_no_request(&host, engine);
    the_watchdog_restarts_a_hung_agent(&host, engine);
    eprintln!(
        "systemd test: {:.1} s once the image and the packages were ready",
        started.elapsed().as_secs_f64()
    );
}

/// The container recipes of the router and the coordinator
/// (`deploy/container/`) build from the binaries alone, and the images run
/// as a user that is not root and answer on their admin ports. The base is
/// [`IMAGE`]: Debian's own cannot be pulled here.
#[test]
fn the_router_and_coordinator_images_build_and_serve() {
    if let Err(why) = docker_and_base_image() {
        skip::<()>(&why);
        return;
    }
    for (program, config, admin) in [
        ("router", ROUTER_IMAGE_CONFIG, 9401),
        ("coordinator", COORDINATOR_IMAGE_CONFIG, 9403),
    ] {
        let context = TempDir::new().unwrap();
        let binary = binary(&format!("crossfade-{program}")).unwrap();
        std::fs::copy(&binary, context.path().join(binary.file_name().unwrap())).unwrap();
        let image = Image(format!(
            "{}:test",
            unique_name(&format!("crossfade-{program}"))
        ));
        let recipe = workspace_root().join(format!("deploy/container/{program}.Containerfile"));
        docker(&[
            "build",
            "--quiet",
            "--build-arg",
            &format!("BASE={IMAGE}"),
            "-f",
            &recipe.display().to_string(),
            "-t",
            &image.0,
            &context.path().display().to_string(),
        ])
        .unwrap();
        let config_path = context.path().join(format!("{program}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let host = Container::run(&[
            "--network",
            "none",
            "-v",
            &format!("{}:/etc/crossfade/{program}.toml:ro", config_path.display()),
            &image.0,
        ]);
        healthz(&host, &format!("the {program} image"), admin, 30).unwrap_or_else(|e| {
            let logs = Command::new("docker").args(["logs", &host.name]).output();
            panic!("{e:#}: {logs:?}")
        });
        let uid = host.sh("awk '/^Uid:/ { print $2 }' /proc/1/status");
        assert_eq!(uid, "10001", "the {program} runs as its own user");
    }
}

// === Prerequisites ===

/// The packages to install, once Docker answers and the image exists;
/// `None` (said plainly) when the test cannot run here.
fn prerequisites() -> Option<Debs> {
    if let Err(why) = docker_and_base_image() {
        return skip(&why);
    }
    match packages() {
        Ok(debs) => Some(debs),
        Err(why) => skip(&why),
    }
}

/// The `.deb` files, and the directory that owns them when built here.
struct Debs {
    dir: PathBuf,
    _built: Option<TempDir>,
}

fn packages() -> Result<Debs, String> {
    if let Some(dir) = std::env::var_os("CROSSFADE_DEBS") {
        let dir = PathBuf::from(dir);
        for package in PACKAGES {
            find_deb(&dir, package)
                .ok_or_else(|| format!("CROSSFADE_DEBS has no {package}*.deb"))?;
        }
        return Ok(Debs { dir, _built: None });
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let has_deb = Command::new(&cargo)
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_deb {
        return Err("no packages: cargo-deb is not installed and CROSSFADE_DEBS is not set".into());
    }
    // Built (and kept fresh) as every end-to-end test builds them.
    let agent = binary("crossfade-agent").map_err(|e| format!("{e:#}"))?;
    let profile_dir = agent
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .ok_or("the binaries are in no profile directory")?;
    // cargo-deb names the dev profile's directory `debug`; it warns that it
    // is meant for release builds, which is what `.ci/run` packages.
    let profile = if profile_dir == "debug" {
        "dev"
    } else {
        profile_dir
    };
    let out = TempDir::new().map_err(|e| e.to_string())?;
    for crate_name in [
        "crossfade-agent",
        "crossfade-router",
        "crossfade-coordinator",
        "crossfade-cli",
    ] {
        let built = Command::new(&cargo)
            .current_dir(workspace_root())
            .args(["deb", "--no-build", "--fast", "--strip", "--quiet"])
            .args(["-p", crate_name, "--profile", profile, "--output"])
            .arg(out.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        assert!(
            built.status.success(),
            "cargo deb -p {crate_name}: {}",
            tail(&built.stderr, 2000)
        );
    }
    Ok(Debs {
        dir: out.path().to_owned(),
        _built: Some(out),
    })
}

fn find_deb(dir: &Path, prefix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        (name.starts_with(prefix) && name.ends_with(".deb")).then(|| entry.path())
    })
}

// === The steps ===

fn install(host: &Container, debs: &Path) {
    host.sh("mkdir -p /tmp/debs");
    for package in PACKAGES {
        host.copy_in(&find_deb(debs, package).unwrap(), "/tmp/debs/");
    }
    host.sh("dpkg -i /tmp/debs/*.deb");

    // Installed, not enabled, not started.
    for unit in UNITS {
        let enabled = host.try_sh(&format!("systemctl is-enabled {unit}"));
        assert_eq!(
            String::from_utf8_lossy(&enabled.stdout).trim(),
            "disabled",
            "{unit}"
        );
        assert_eq!(host.show(unit, "ActiveState")["ActiveState"], "inactive");
        // Documentation= names the README the CLI's package installs.
        let docs = host.show(unit, "Documentation")["Documentation"].clone();
        let path = docs.strip_prefix("file://").unwrap();
        host.sh(&format!("test -s {path}"));
    }
    let verify = host.try_sh("systemd-analyze verify /usr/lib/systemd/system/crossfade-*.service");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    for unit in UNITS {
        // At most 3.0 ("OK") for all three, the agent included.
        let rated = host.sh(&format!(
            "systemd-analyze security --offline=true --threshold=30 \
               /usr/lib/systemd/system/{unit} > /tmp/rated; rc=$?; tail -n 1 /tmp/rated; exit $rc"
        ));
        eprintln!("{rated}");
    }

    // The agent's user, in the groups its engines need.
    let groups = host.sh("id -nG crossfade");
    for group in ["docker", "video", "render"] {
        assert!(groups.split(' ').any(|g| g == group), "{groups}");
    }
    // The example configurations are conffiles: an upgrade keeps edits.
    let conffiles = host.sh(
        "dpkg-query -W -f='${Conffiles}\\n' crossfade-agent crossfade-router crossfade-coordinator",
    );
    for config in ["agent", "router", "coordinator"] {
        assert!(
            conffiles.contains(&format!("/etc/crossfade/{config}.toml")),
            "{conffiles}"
        );
    }
}

/// The fleet's certificates (made by the installed CLI), configurations
/// for 127.0.0.1, fake-vllm as the engine, and the test's drop-ins.
fn configure(host: &Container) {
    host.copy_in(&binary("fake-vllm").unwrap(), "/usr/local/bin/fake-vllm");
    host.sh(
        "crossfade certs init --dir /etc/crossfade/certs >/dev/null && \
         for role in agent router coordinator; do \
           crossfade certs issue --dir /etc/crossfade/certs --role $role --name $role --san 127.0.0.1 >/dev/null; \
         done",
    );
    host.write("/etc/crossfade/agent.toml", &agent_config("a", 0));
    host.write("/etc/crossfade/agent-b.toml", &agent_config("b", 1));
    host.write("/etc/crossfade/router.toml", ROUTER_CONFIG);
    host.write("/etc/crossfade/coordinator.toml", COORDINATOR_CONFIG);
    // A second agent, the same unit under another name: the router's
    // other worker while the first restarts.
    host.sh(
        "sed -e 's#/etc/crossfade/agent.toml#/etc/crossfade/agent-b.toml#' \
             -e 's#^StateDirectory=crossfade-agent$#StateDirectory=crossfade-agent-b#' \
             /usr/lib/systemd/system/crossfade-agent.service \
             > /etc/systemd/system/crossfade-agent-b.service",
    );
    let agent_dropin = format!(
        "[Service]\n\
         Environment=MODEL_NAME=org/m SERVED_MODEL_NAME=chat FAKE_VLLM_MAX_TOKENS=20 \
         FAKE_VLLM_TOKENS_PER_SECOND={TOKENS_PER_SECOND}\n\
         WatchdogSec={WATCHDOG_SECS}\n\
         # A hung agent gets SIGABRT, then SIGKILL after this.\n\
         TimeoutAbortSec=5\n"
    );
    for unit in ["crossfade-agent", "crossfade-agent-b"] {
        host.write(
            &format!("/etc/systemd/system/{unit}.service.d/test.conf"),
            &agent_dropin,
        );
    }
    // DynamicUser= needs a mount namespace, which systemd cannot make in
    // a container without CAP_SYS_ADMIN: here the router and the
    // coordinator run as the agent's user instead.
    for unit in ["crossfade-router", "crossfade-coordinator"] {
        host.write(
            &format!("/etc/systemd/system/{unit}.service.d/test.conf"),
            "[Service]\nDynamicUser=no\nUser=crossfade\n",
        );
    }
    host.write("/usr/local/bin/load.sh", LOAD_SCRIPT);
    host.sh("systemctl daemon-reload");
}

/// `Type=notify`: `systemctl start` returns once the agent has sent
/// READY=1, which it sends only once its listeners are bound: at that
/// moment the unit is active/running and the admin port answers.
fn the_agent_is_active_once_it_listens(host: &Container) {
    assert_eq!(
        host.show("crossfade-agent", "Type")["Type"],
        "notify",
        "the installed unit"
    );
    let started = host.try_sh(
        "timeout 60 systemctl start crossfade-agent && \
         systemctl show -p ActiveState,SubState crossfade-agent && \
         curl -sS --max-time 2 -o /dev/null -w 'admin %{http_code}\\n' http://127.0.0.1:9402/healthz",
    );
    let said = String::from_utf8_lossy(&started.stdout);
    assert!(
        started.status.success(),
        "{said}\n{}",
        host.journal("crossfade-agent")
    );
    for expected in ["ActiveState=active", "SubState=running", "admin 200"] {
        assert!(said.lines().any(|l| l == expected), "{expected}: {said}");
    }
}

fn start_the_others(host: &Container) {
    for unit in [
        "crossfade-agent-b",
        "crossfade-router",
        "crossfade-coordinator",
    ] {
        let started = host.try_sh(&format!("timeout 60 systemctl start {unit}"));
        assert!(started.status.success(), "{unit}: {}", host.journal(unit));
    }
    // Each answers on its admin port from inside its sandbox, with its
    // certificates read as credentials.
    for (unit, admin) in [
        ("crossfade-router", 9401),
        ("crossfade-coordinator", 9403),
        ("crossfade-agent-b", 9404),
    ] {
        let state = host.show(unit, "ActiveState,SubState");
        assert_eq!(
            (state["ActiveState"].as_str(), state["SubState"].as_str()),
            ("active", "running"),
            "{unit}: {}",
            host.journal(unit)
        );
        healthz(host, unit, admin, 20).unwrap();
    }
    // Both engines serve through their gates.
    for gate in [8000, 8001] {
        wait_for(
            &format!("the engine behind the gate :{gate}"),
            Duration::from_secs(30),
            || Ok((chat(host, gate) == "200").then_some(())),
        )
        .unwrap();
    }
}

/// An agent upgrade is a restart. The old agent stops admitting, the
/// router sends new requests to the other worker, the streams in flight
/// through the old gate finish, and the new agent adopts the engine (the
/// same process: no reload) and serves again.
fn a_restart_under_load_loses_no_request(host: &Container, engine: u32) {
    let before = host.main_pid("crossfade-agent");
    host.sh("rm -f /tmp/load.*");
    for client in 0..CLIENTS {
        docker(&[
            "exec",
            "-d",
            &host.name,
            "sh",
            "/usr/local/bin/load.sh",
            &client.to_string(),
        ])
        .unwrap();
    }
    wait_for(
        "streams in flight through agent a's gate",
        Duration::from_secs(20),
        || Ok((in_flight(host, 9402) >= 1).then_some(())),
    )
    .unwrap();
    let restart =
        host.sh("set -e; date +%s.%N; timeout 60 systemctl restart crossfade-agent; date +%s.%N");
    let (began, ended) = restart.split_once('\n').unwrap();
    let (began, ended): (f64, f64) = (began.parse().unwrap(), ended.trim().parse().unwrap());
    // The restarted agent serves again, through the router too.
    wait_for(
        "requests sent after the restart to finish",
        Duration::from_secs(30),
        || {
            let done = load_results(host)
                .iter()
                .filter(|r| r.ok && r.start > ended)
                .count();
            Ok((done >= CLIENTS).then_some(()))
        },
    )
    .unwrap();
    host.sh("touch /tmp/load.stop");
    let results = wait_for("the clients to stop", Duration::from_secs(30), || {
        let ends = host.sh("cat /tmp/load.[0-9]* | grep -c '^end' || true");
        Ok((ends == CLIENTS.to_string()).then(|| load_results(host)))
    })
    .unwrap();

    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.line.as_str())
        .collect();
    assert!(failed.is_empty(), "requests lost: {failed:#?}");
    let across = results
        .iter()
        .filter(|r| r.start < began && r.end > began)
        .count();
    assert!(
        across >= 1,
        "no stream was in flight when the restart began: {results:#?}"
    );
    eprintln!(
        "restart under load: {} requests, {across} in flight at the restart, stopped and started in {:.2} s",
        results.len(),
        ended - began
    );

    assert_ne!(host.main_pid("crossfade-agent"), before, "a new agent");
    assert_eq!(
        engine_pid(host, "crossfade-agent"),
        engine,
        "the new agent adopted the same engine"
    );
    host.sh(&format!("grep -q fake-vllm /proc/{engine}/cmdline"));
    assert_eq!(chat(host, 8000), "200", "the new agent's gate serves");
}

/// systemd restarts an agent that stops pinging (SIGSTOP), and only then:
/// a healthy one, pinging at half the interval, runs on past several
/// intervals. The engine survives this restart too.
fn the_watchdog_restarts_a_hung_agent(host: &Container, engine: u32) {
    let agent = host.main_pid("crossfade-agent");
    // Seconds since the unit became active, by systemd's clock and the
    // container's.
    let uptime = || -> u64 {
        let [since, now] = [
            "systemctl show --timestamp=unix -p ActiveEnterTimestamp --value crossfade-agent",
            "date +%s",
        ]
        .map(|command| {
            let text = host.sh(command);
            text.trim_start_matches('@').parse::<u64>().unwrap()
        });
        now.saturating_sub(since)
    };
    let healthy_for = 2 * WATCHDOG_SECS + 1;
    wait_for(
        "the agent to have run two watchdog intervals",
        Duration::from_secs(healthy_for + 10),
        || Ok((uptime() >= healthy_for).then_some(())),
    )
    .unwrap();
    let props = host.show("crossfade-agent", "NRestarts,MainPID");
    assert_eq!(props["NRestarts"], "0", "a healthy agent was restarted");
    assert_eq!(props["MainPID"], agent.to_string());

    host.sh(&format!("kill -STOP {agent}"));
    let restarted = wait_for(
        "the watchdog to restart the hung agent",
        Duration::from_secs(4 * WATCHDOG_SECS + 10),
        || {
            let props = host.show("crossfade-agent", "NRestarts,MainPID,SubState");
            let pid: u32 = props["MainPID"].parse().unwrap_or(0);
            Ok((props["NRestarts"] == "1"
                && pid != 0
                && pid != agent
                && props["SubState"] == "running")
                .then_some(pid))
        },
    )
    .unwrap();
    let journal = host.journal("crossfade-agent");
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    assert_ne!(restarted, agent);
    assert_eq!(engine_pid(host, "crossfade-agent"), engine);
    wait_for(
        "the agent restarted by the watchdog to serve",
        Duration::from_secs(20),
        || Ok((chat(host, 8000) == "200").then_some(())),
    )
    .unwrap();
}

// === Helpers ===

/// The engine's pid, from the agent's state file.
fn engine_pid(host: &Container, state: &str) -> u32 {
    let text = host.sh(&format!("cat /var/lib/{state}/engine.json"));
    let record: serde_json::Value = serde_json::from_str(&text).unwrap();
    u32::try_from(record["pid"].as_u64().unwrap()).unwrap()
}

/// One chat completion through the gate on `port`: its status code.
fn chat(host: &Container, port: u16) -> String {
    let output = host.try_sh(&format!(
        "curl -s --max-time 10 -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/v1/chat/completions \
         -H 'content-type: application/json' \
         -d '{{\"model\":\"chat\",\"max_tokens\":1,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
    ));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The gate's in-flight gauge, from the agent's admin port.
fn in_flight(host: &Container, admin: u16) -> u64 {
    let metrics = host.try_sh(&format!(
        "curl -s --max-time 2 http://127.0.0.1:{admin}/metrics"
    ));
    String::from_utf8_lossy(&metrics.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("crossfade_agent_gate_in_flight_requests "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Debug)]
struct LoadResult {
    ok: bool,
    start: f64,
    end: f64,
    line: String,
}

fn load_results(host: &Container) -> Vec<LoadResult> {
    host.sh("cat /tmp/load.[0-9]* 2>/dev/null || true")
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("FAIL "))
        .map(|line| {
            let mut words = line.split(' ');
            let ok = words.next() == Some("ok");
            let mut time = || words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
            LoadResult {
                ok,
                start: time(),
                end: time(),
                line: line.to_owned(),
            }
        })
        .collect()
}

/// Agent `a` (gate :8000) or `b` (:8001): fake-vllm in process mode, a
/// fake GPU probe; `[control_tls]` is replaced by the unit's credentials.
fn agent_config(name: &str, offset: u16) -> String {
    let state = if offset == 0 {
        "crossfade-agent".to_owned()
    } else {
        format!("crossfade-agent-{name}")
    };
    format!(
        r#"worker_id = "agent-{name}"
[listen]
gate = "127.0.0.1:{gate}"
control = "127.0.0.1:{control}"
admin = "127.0.0.1:{admin}"
[control_tls]
ca = "/etc/crossfade/certs/ca.pem"
cert = "/etc/crossfade/certs/agent.pem"
key = "/etc/crossfade/certs/agent.key"
[engine]
command = "/usr/local/bin/fake-vllm"
port = {engine}
state_dir = "/var/lib/{state}"
[gpu]
probe = "fake"
fake_gpus = 1
"#,
        gate = 8000 + offset,
        control = 7002 + offset,
        admin = 9402 + 2 * offset,
        engine = 8100 + offset,
    )
}

const ROUTER_CONFIG: &str = r#"router_id = "router-a"
[listen]
public = "127.0.0.1:8080"
admin = "127.0.0.1:9401"
control = "127.0.0.1:7001"
[control_tls]
ca = "/etc/crossfade/certs/ca.pem"
cert = "/etc/crossfade/certs/router.pem"
key = "/etc/crossfade/certs/router.key"
[[endpoint]]
name = "chat"
[[endpoint.deployment]]
id = "v1"
weight = 1
workers = ["127.0.0.1:8000", "127.0.0.1:8001"]
"#;

const COORDINATOR_CONFIG: &str = r#"agents = []
routers = []
[listen]
api = "127.0.0.1:7000"
admin = "127.0.0.1:9403"
[store]
path = "/var/lib/crossfade-coordinator/state.db"
[control_tls]
ca = "/etc/crossfade/certs/ca.pem"
cert = "/etc/crossfade/certs/coordinator.pem"
key = "/etc/crossfade/certs/coordinator.key"
"#;

/// Listening beyond 127.0.0.1 (the image listens on 0.0.0.0) in plain
/// text takes both keys; a real deployment mounts certificates.
const ROUTER_IMAGE_CONFIG: &str = r#"[control_tls]
insecure = true
insecure_remote = true
[[endpoint]]
name = "chat"
[[endpoint.deployment]]
id = "v1"
weight = 1
workers = ["127.0.0.1:8000"]
"#;

const COORDINATOR_IMAGE_CONFIG: &str = r#"agents = []
routers = []
[control_tls]
insecure = true
insecure_remote = true
"#;

/// One client: streams chat completions through the router back to back
/// until /tmp/load.stop exists (at most 500), one line per request:
/// `ok START END`, or `FAIL START END` with what it got.
const LOAD_SCRIPT: &str = r#"#!/bin/sh
out=/tmp/load.$1
: > "$out"
n=0
while [ ! -e /tmp/load.stop ] && [ $n -lt 500 ]; do
  n=$((n + 1))
  start=$(date +%s.%N)
  body=$(curl -sS -N --max-time 30 -w '\n%{http_code}' http://127.0.0.1:8080/v1/chat/completions \
    -H 'content-type: application/json' \
    -d '{"model":"chat","stream":true,"messages":[{"role":"user","content":"hi"}]}' 2>&1)
  rc=$?
  end=$(date +%s.%N)
  code=$(printf '%s\n' "$body" | tail -n 1)
  if [ $rc = 0 ] && [ "$code" = 200 ] && printf '%s\n' "$body" | grep -q '^data: \[DONE\]'; then
    echo "ok $start $end" >> "$out"
  else
    echo "FAIL $start $end rc=$rc code=$code $(printf '%s' "$body" | tail -c 300 | tr '\n' ' ')" >> "$out"
  fi
done
echo end >> "$out"
"#;

/// Waits up to `seconds` for `/healthz` on the admin port `admin` of what
/// runs in `host` (`what`, for the error).
fn healthz(host: &Container, what: &str, admin: u16, seconds: u64) -> anyhow::Result<()> {
    wait_for(
        &format!("{what}'s /healthz"),
        Duration::from_secs(seconds),
        || {
            Ok(host
                .try_sh(&format!(
                    "curl -sf --max-time 2 http://127.0.0.1:{admin}/healthz"
                ))
                .status
                .success()
                .then_some(()))
        },
    )
}
