//! `crossfade demo`: a coordinator (store in a temporary directory), a
//! router and four agents, each supervising a `fake-vllm`, all on
//! 127.0.0.1 and all run from this binary; a steady load of streaming chat
//! completions; a rolling promotion from `v1` to `v2` drawn live; and a
//! summary. Every process it started is stopped at the end, and on Ctrl-C.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use crossfade_proto::tls::{Control, Role};
use crossfade_proto::v1;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::output::{Output, endpoint_text, terminal_width};
use crate::{certs, connection};

/// `crossfade demo` flags.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Agents, each with its own fake-vllm engine.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Replicas of the endpoint (at most the workers).
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Clients streaming chat completions back to back.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds of load before the promotion.
    #[arg(long, default_value_t = 5)]
    before: u64,
    /// Seconds of load after the promotion.
    #[arg(long, default_value_t = 5)]
    after: u64,
    /// The engines' token rate.
    #[arg(long, default_value_t = 50.0)]
    tokens_per_second: f64,
    /// Tokens per reply.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// How long each engine takes to "load its model".
    #[arg(long, default_value = "1s")]
    load_time: String,
    /// Step by step (true) or all at once.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    rolling_deploy: bool,
    /// Surge mode, 0..=50 (exactly one of surge and unavailable is non-zero).
    #[arg(long, default_value_t = 50)]
    max_surge_percent: u32,
    /// Unavailable mode, 0..=50.
    #[arg(long, default_value_t = 0)]
    max_unavailable_percent: u32,
    /// Wait after each step, 0..=3600 s.
    #[arg(long, default_value_t = 3)]
    stabilization_time_seconds: u32,
    /// Extra old replicas before the first step, 0..=500 %.
    #[arg(long, default_value_t = 0)]
    replica_overhead_percent: u32,
}

/// Everything the demo started; stopped when dropped, its directory
/// removed unless `keep_logs`.
struct Fleet {
    dir: PathBuf,
    children: Vec<Child>,
    state_dirs: Vec<PathBuf>,
    /// The demo failed: its directory stays for the logs (the keys of its
    /// certificates go).
    keep_logs: bool,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Coordinator first (it would restart engines), then agents, then
        // the engines, which outlive agents by design.
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.state_dirs {
            let Ok(text) = std::fs::read_to_string(dir.join("engine.json")) else {
                continue;
            };
            let pid = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["pid"].as_i64())
                .and_then(|p| i32::try_from(p).ok());
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if self.keep_logs {
            let _ = std::fs::remove_dir_all(self.dir.join("certs"));
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The demo's fleet CA and its members' certificates, all for 127.0.0.1.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: PathBuf) -> anyhow::Result<Self> {
        certs::init(&dir)?;
        Ok(Self { dir })
    }

    /// Issues `name`'s certificate for `role`: its files.
    fn issue(&self, role: Role, name: &str) -> anyhow::Result<[PathBuf; 3]> {
        certs::issue(&self.dir, role, name, &["127.0.0.1".to_owned()])?;
        Ok([
            self.dir.join("ca.pem"),
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        ])
    }

    /// Issues `name`'s certificate: the `[control_tls]` section of its
    /// configuration.
    fn section(&self, role: Role, name: &str) -> anyhow::Result<String> {
        let [ca, cert, key] = self.issue(role, name)?;
        Ok(format!(
            "[control_tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            ca.display(),
            cert.display(),
            key.display()
        ))
    }

    /// Issues `name`'s certificate: the CLI's side of mutual TLS.
    fn control(&self, role: Role, name: &str) -> anyhow::Result<Control> {
        let [ca, cert, key] = self.issue(role, name)?;
        Ok(Control::mutual(role, &ca, &cert, &key)?)
    }
}

/// A free port on 127.0.0.1.
fn port() -> anyhow::Result<u16> {
    Ok(crossfade_common::net::free_loopback_port()?)
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn wait_port(addr: SocketAddr, what: &str, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited ({status}) before listening; its log: {}",
                log.display()
            );
        }
        if Instant::now() >= deadline {
            bail!("{what} did not listen on {addr} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Fleet {
    fn spawn(
        &mut self,
        what: &str,
        args: &[&str],
        config: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<usize> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let log = self.dir.join(format!("{what}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(exe)
            .args(args)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }
}

/// One request of the load.
struct Sample {
    started: Instant,
    ttft: Option<Duration>,
    ok: bool,
    deployment: String,
    /// How long the router held it for a replica.
    queued: Duration,
}

/// Runs the demo. When it fails, every process it started is stopped but
/// their logs are kept, and the error says where.
pub async fn run(args: DemoArgs, out: Output) -> anyhow::Result<ExitCode> {
    if args.workers == 0 || args.replicas == 0 || args.replicas as usize > args.workers {
        bail!("--replicas must be within 1..=--workers ({})", args.workers);
    }
    let dir = std::env::temp_dir().join(format!("crossfade-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut fleet = Fleet {
        dir: dir.clone(),
        children: Vec::new(),
        state_dirs: Vec::new(),
        keep_logs: false,
    };
    let result = demo(&mut fleet, args, out).await;
    let failed = match &result {
        Ok(code) => *code != ExitCode::SUCCESS,
        Err(e) => e.downcast_ref::<Interrupted>().is_none(),
    };
    fleet.keep_logs = failed;
    drop(fleet);
    match result {
        Err(e) if !failed => Err(e),
        Err(e) => Err(e.context(format!("the fleet's logs are kept in {}", dir.display()))),
        Ok(code) => {
            if failed {
                eprintln!(
                    "crossfade: the demo failed; the fleet's logs are kept in {}",
                    dir.display()
                );
            }
            Ok(code)
        }
    }
}

/// Ctrl-C: not a failure, nothing to keep.
#[derive(Debug, thiserror::Error)]
#[error("interrupted; stopping every process the demo started")]
struct Interrupted;

async fn demo(fleet: &mut Fleet, args: DemoArgs, out: Output) -> anyhow::Result<ExitCode> {
    let live = out == Output::Text;
    let say = |text: &str| {
        if live {
            eprintln!("{text}");
        }
    };
    let dir = fleet.dir.clone();
    let exe = std::env::current_exe()?;
    // Mutual TLS, as a fleet should run: one CA, a certificate per member.
    let pki = Pki::new(dir.join("certs"))?;

    // The fleet.
    say(&format!(
        "starting a coordinator, a router and {} agents on 127.0.0.1 ...",
        args.workers
    ));
    let knobs = [
        ("FAKE_VLLM_LOAD_TIME", args.load_time.clone()),
        (
            "FAKE_VLLM_TOKENS_PER_SECOND",
            args.tokens_per_second.to_string(),
        ),
        ("FAKE_VLLM_MAX_TOKENS", args.max_tokens.to_string()),
    ];
    let mut agents = Vec::new();
    for i in 0..args.workers {
        let (gate, control, admin, engine) = (port()?, port()?, port()?, port()?);
        let state = dir.join(format!("agent-{i}"));
        let config = dir.join(format!("agent-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "worker_id = \"worker-{i}\"\n[listen]\ngate = \"127.0.0.1:{gate}\"\ncontrol = \"127.0.0.1:{control}\"\nadmin = \"127.0.0.1:{admin}\"\n[engine]\ncommand = \"{}\"\nport = {engine}\nstate_dir = \"{}\"\nprobe_interval = \"100ms\"\nmetrics_interval = \"250ms\"\nstop_timeout = \"10s\"\n[gpu]\nprobe = \"fake\"\nfake_gpus = 1\n[status]\nheartbeat = \"1s\"\n{}",
                exe.display(),
                state.display(),
                pki.section(Role::Agent, &format!("agent-{i}"))?
            ),
        )?;
        let index = fleet.spawn(&format!("agent-{i}"), &["__agent"], &config, &knobs)?;
        fleet.state_dirs.push(state);
        agents.push((index, control));
    }
    let (public, router_control, router_admin) = (port()?, port()?, port()?);
    let (api, coordinator_admin, dashboard) = (port()?, port()?, port()?);
    let router_config = dir.join("router.toml");
    std::fs::write(
        &router_config,
        format!(
            "[listen]\npublic = \"127.0.0.1:{public}\"\nadmin = \"127.0.0.1:{router_admin}\"\ncontrol = \"127.0.0.1:{router_control}\"\n[coordinator]\napi = [\"127.0.0.1:{api}\"]\n{}",
            pki.section(Role::Router, "router")?
        ),
    )?;
    let router = fleet.spawn("router", &["__router"], &router_config, &[])?;
    for (index, control) in &agents {
        let log = dir.join(format!("agent-{index}.log"));
        wait_port(
            local(*control),
            "an agent",
            &mut fleet.children[*index],
            &log,
        )?;
    }
    wait_port(
        local(router_control),
        "the router",
        &mut fleet.children[router],
        &dir.join("router.log"),
    )?;
    let agent_list: Vec<String> = agents
        .iter()
        .map(|(_, c)| format!("\"127.0.0.1:{c}\""))
        .collect();
    let coordinator_config = dir.join("coordinator.toml");
    std::fs::write(
        &coordinator_config,
        format!(
            "agents = [{}]\nrouters = [\"127.0.0.1:{router_control}\"]\n[listen]\napi = \"127.0.0.1:{api}\"\nadmin = \"127.0.0.1:{coordinator_admin}\"\nhttp = \"127.0.0.1:{dashboard}\"\n[store]\npath = \"{}\"\n{}",
            agent_list.join(", "),
            dir.join("coordinator.json").display(),
            pki.section(Role::Coordinator, "coordinator")?
        ),
    )?;
    let coordinator = fleet.spawn("coordinator", &["__coordinator"], &coordinator_config, &[])?;
    // The coordinator goes first when the fleet stops.
    let child = fleet.children.remove(coordinator);
    fleet.children.insert(0, child);
    wait_port(
        local(api),
        "the coordinator",
        &mut fleet.children[0],
        &dir.join("coordinator.log"),
    )?;
    say(&format!(
        "the dashboard: http://127.0.0.1:{dashboard}/ (the REST API under /v1, described at /openapi.json)"
    ));
    let mut client = connection::dial(
        &format!("http://127.0.0.1:{api}"),
        &pki.control(Role::Operator, "operator")?,
    )
    .await?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = Arc::clone(&interrupted);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::SeqCst);
            }
        });
    }
    let check = |interrupted: &AtomicBool| -> anyhow::Result<()> {
        if interrupted.load(Ordering::SeqCst) {
            return Err(Interrupted.into());
        }
        Ok(())
    };

    // v1.
    let settings = v1::PromotionSettingsUpdate {
        rolling_deploy: Some(args.rolling_deploy),
        max_surge_percent: Some(args.max_surge_percent),
        max_unavailable_percent: Some(args.max_unavailable_percent),
        stabilization_time_seconds: Some(args.stabilization_time_seconds),
        replica_overhead_percent: Some(args.replica_overhead_percent),
        ..Default::default()
    };
    let template = |model: &str| v1::Template {
        runtime: v1::EngineRuntime::Process as i32,
        model: model.into(),
        vllm_args: "--max-model-len 4096".into(),
        ..Default::default()
    };
    client
        .create_endpoint(v1::CreateEndpointRequest {
            name: "chat".into(),
            aliases: vec![],
            template: Some(template("demo/v1")),
            scaling: Some(v1::ScalingSettings {
                min_replicas: args.replicas,
                max_replicas: args.replicas,
                target_in_flight_per_replica: 32,
                scale_down_delay_seconds: 300,
            }),
            promotion_settings: Some(settings),
            selector: None,
        })
        .await
        .map_err(crate::rpc)?;
    say(&format!(
        "endpoint `chat` created; starting {} replica(s) of demo/v1 ...",
        args.replicas
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        check(&interrupted)?;
        let e = get(&mut client).await?;
        if e.in_progress_promotion.is_none() && e.last_promotion.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("v1 did not become ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Load.
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://127.0.0.1:{public}/v1/chat/completions");
    let clients: Vec<_> = (0..args.clients)
        .map(|i| {
            let samples = Arc::clone(&samples);
            let stop = Arc::clone(&stop);
            let url = url.clone();
            tokio::spawn(async move {
                let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
                while !stop.load(Ordering::Relaxed) {
                    let sample = one_request(&http, &url, i).await;
                    samples
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(sample);
                }
            })
        })
        .collect();
    say(&format!(
        "{} clients streaming chat completions through the router for {} s ...",
        args.clients, args.before
    ));
    for _ in 0..args.before * 10 {
        check(&interrupted)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // v1 → v2, drawn live.
    let promotion_started = Instant::now();
    let promoted = client
        .promote(v1::PromoteRequest {
            endpoint: "chat".into(),
            target: Some(v1::promote_request::Target::Template(template("demo/v2"))),
            settings: None,
        })
        .await
        .map_err(crate::rpc)?
        .into_inner();
    let terminal = live && std::io::stdout().is_terminal();
    let mut last_view = String::new();
    let finished = loop {
        check(&interrupted)?;
        let e = get(&mut client).await?;
        let view = endpoint_text(&e, terminal.then(terminal_width), SystemTime::now());
        if live && view != last_view {
            let sent = samples.lock().map_or(0, |s| s.len());
            if terminal {
                println!("\x1b[H\x1b[2J{view}requests so far: {sent}");
                let _ = std::io::stdout().flush();
            } else {
                println!("{view}");
            }
            last_view = view;
        }
        if e.in_progress_promotion.is_none()
            && let Some(last) = e.last_promotion.filter(|p| p.id == promoted.promotion_id)
        {
            break last;
        }
        if promotion_started.elapsed() > Duration::from_secs(600) {
            bail!("the promotion did not end within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let promotion_seconds = promotion_started.elapsed().as_secs_f64();
    let promotion_ended = Instant::now();
    say(&format!(
        "promotion ended; {} s more of load ...",
        args.after
    ));
    for _ in 0..args.after * 10 {
        check(&interrupted)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }

    // The summary.
    let samples = samples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let sent = samples.len();
    let succeeded = samples.iter().filter(|s| s.ok).count();
    let failed = sent - succeeded;
    let mut by_deployment: BTreeMap<String, usize> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.ok) {
        *by_deployment.entry(s.deployment.clone()).or_default() += 1;
    }
    let ttft = |from: Option<Instant>, to: Option<Instant>| {
        let mut values: Vec<f64> = samples
            .iter()
            .filter(|s| from.is_none_or(|f| s.started >= f) && to.is_none_or(|t| s.started < t))
            .filter_map(|s| s.ttft)
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            values
                .get(((values.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        serde_json::json!({"p50_ms": (at(0.5) * 10.0).round() / 10.0, "p99_ms": (at(0.99) * 10.0).round() / 10.0, "requests": values.len()})
    };
    let held = samples.iter().filter(|s| !s.queued.is_zero()).count();
    let longest_hold = samples.iter().map(|s| s.queued).max().unwrap_or_default();
    let status = v1::PromotionStatus::try_from(finished.status).map_or("UNKNOWN", |s| {
        s.as_str_name().trim_start_matches("PROMOTION_STATUS_")
    });
    let summary = serde_json::json!({
        "requests_sent": sent,
        "succeeded": succeeded,
        "failed": failed,
        "by_deployment": by_deployment,
        "promotion_status": status,
        "promotion_seconds": (promotion_seconds * 10.0).round() / 10.0,
        "from_deployment": finished.from_deployment_id,
        "to_deployment": finished.to_deployment_id,
        "held_for_a_replica": held,
        "longest_hold_ms": u64::try_from(longest_hold.as_millis()).unwrap_or(u64::MAX),
        "time_to_first_token": {
            "before": ttft(None, Some(promotion_started)),
            "during": ttft(Some(promotion_started), Some(promotion_ended)),
            "after": ttft(Some(promotion_ended), None),
        },
    });
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
        Output::Text => {
            println!();
            println!(
                "promotion      {} → {}: {status} in {promotion_seconds:.1} s",
                finished.from_deployment_id, finished.to_deployment_id
            );
            println!("requests       {sent} sent, {succeeded} succeeded, {failed} failed");
            for (deployment, count) in &by_deployment {
                println!("  answered by  {deployment:<10} {count}");
            }
            if held > 0 {
                println!(
                    "held          {held} requests waited for a replica in the router's queue, the longest {:.1} s",
                    longest_hold.as_secs_f64()
                );
            }
            for phase in ["before", "during", "after"] {
                let t = &summary["time_to_first_token"][phase];
                println!(
                    "ttft {phase:<9} p50 {} ms, p99 {} ms ({} requests)",
                    t["p50_ms"], t["p99_ms"], t["requests"]
                );
            }
        }
    }
    let ok = failed == 0 && finished.status == v1::PromotionStatus::Succeeded as i32;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn get(
    client: &mut v1::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
) -> anyhow::Result<v1::Endpoint> {
    Ok(client
        .get_endpoint(v1::GetEndpointRequest {
            name: "chat".into(),
            event_limit: 6,
        })
        .await
        .map_err(crate::rpc)?
        .into_inner())
}

async fn one_request(
    http: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
    client: usize,
) -> Sample {
    let started = Instant::now();
    let body = serde_json::json!({
        "model": "chat",
        "messages": [{"role": "user", "content": format!("hello from client {client}")}],
        "stream": true,
    });
    let failed = |started| Sample {
        started,
        ttft: None,
        ok: false,
        deployment: String::new(),
        queued: Duration::ZERO,
    };
    let Ok(request) = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
    else {
        return failed(started);
    };
    let Ok(Ok(response)) =
        tokio::time::timeout(Duration::from_secs(30), http.request(request)).await
    else {
        return failed(started);
    };
    if !response.status().is_success() {
        return failed(started);
    }
    let deployment = response
        .headers()
        .get("x-crossfade-deployment")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let queued = response
        .headers()
        .get("x-crossfade-queued-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    let mut body = response.into_body();
    let mut ttft = None;
    let mut text = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    ttft.get_or_insert_with(|| started.elapsed());
                    text.extend_from_slice(&data);
                }
            }
            Ok(None) => break,
            Ok(Some(Err(_))) | Err(_) => return failed(started),
        }
    }
    // A stream is whole when it ends with [DONE].
    let ok = String::from_utf8_lossy(&text)
        .trim_end()
        .ends_with("data: [DONE]");
    Sample {
        started,
        ttft,
        ok,
        deployment,
        queued,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fleet_in(name: &str) -> Fleet {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        std::fs::write(dir.join("router.log"), "a line\n").unwrap();
        std::fs::write(dir.join("certs").join("router.key"), "secret").unwrap();
        Fleet {
            dir,
            children: Vec::new(),
            state_dirs: Vec::new(),
            keep_logs: false,
        }
    }

    #[test]
    fn a_failed_demo_keeps_its_logs_but_not_its_keys() {
        let mut fleet = fleet_in("crossfade-demo-test-kept");
        let dir = fleet.dir.clone();
        fleet.keep_logs = true;
        drop(fleet);
        assert_eq!(
            std::fs::read_to_string(dir.join("router.log")).unwrap(),
            "a line\n"
        );
        assert!(!dir.join("certs").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_demo_that_succeeded_leaves_nothing() {
        let fleet = fleet_in("crossfade-demo-test-gone");
        let dir = fleet.dir.clone();
        drop(fleet);
        assert!(!dir.exists());
    }
}
