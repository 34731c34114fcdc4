//! `cargo build --release --workspace && cargo run --release -p crossfade-bench --bin
//! crossfade-scale-bench -- --workers 10000 --endpoints 100 --replicas 100`
//!
//! The coordinator at fleet scale: simulated workers (`crossfade-fleet-sim`,
//! 5,000 per process), real routers, a real coordinator on its embedded
//! store. Every endpoint is created, then all are promoted at once, rolling
//! in place (no idle worker: `max_unavailable_percent`). Reported from the
//! coordinator's own metrics and `/proc`: its decision time per pass (p50,
//! p99), the time from a table push to the acknowledgement of every router,
//! bytes written to the store per promotion step, its CPU and memory, and
//! the promotion's time against the time its steps must take.

#[path = "system.rs"]
#[allow(dead_code)]
mod system;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use crossfade_proto::v1::{self, coordinator_client::CoordinatorClient};
use tonic::transport::Channel;

use crate::system::{Guard, free_port, wait_for_port};

/// Workers one simulator process serves (each holds a listener and the
/// coordinator's connection: two files of the 20,000 a process may open).
const PER_SIMULATOR: usize = 5_000;

/// The coordinator at fleet scale.
#[derive(Parser, Debug)]
#[command(name = "crossfade-scale-bench")]
struct Cli {
    /// Simulated workers.
    #[arg(long, default_value_t = 1_000)]
    workers: usize,
    /// Endpoints.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Replicas of each endpoint.
    #[arg(long, default_value_t = 100)]
    replicas: u32,
    /// Routers.
    #[arg(long, default_value_t = 10)]
    routers: usize,
    /// Time a simulated engine takes to load.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    load_time: Duration,
    /// Each step's stabilization time, whole seconds.
    #[arg(long, default_value_t = 2)]
    stabilization: u32,
    /// Replicas a step takes out and updates in place, in percent.
    #[arg(long, default_value_t = 10)]
    unavailable_percent: u32,
    /// Give up after this long.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Where the processes' logs go (a new temporary directory by default).
    #[arg(long)]
    logs: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("crossfade-scale-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crossfade-scale-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The release programs beside this one.
fn program(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the workspace first (cargo build --release --workspace)",
            path.display()
        );
    }
    Ok(path)
}

struct Fleet {
    coordinator: Guard,
    api: SocketAddr,
    admin: SocketAddr,
    _routers: Vec<Guard>,
    publics: Vec<SocketAddr>,
    _simulators: Vec<Guard>,
}

/// A free port none of `used` has (the system may offer one twice).
fn distinct_port(used: &mut std::collections::BTreeSet<u16>) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = free_port()?;
        if used.insert(port) {
            return Ok(port);
        }
    }
    bail!("no distinct free port in 100 tries")
}

async fn start(cli: &Cli, dir: &Path) -> anyhow::Result<Fleet> {
    let started = Instant::now();
    let mut used = std::collections::BTreeSet::new();
    let port = distinct_port(&mut used)?;
    let mut simulators = Vec::new();
    let mut agents = Vec::with_capacity(cli.workers);
    for (k, first) in (0..cli.workers).step_by(PER_SIMULATOR).enumerate() {
        let count = PER_SIMULATOR.min(cli.workers - first);
        let base = Ipv4Addr::new(127, 10 + u8::try_from(k)?, 0, 1);
        let log = dir.join(format!("fleet-sim-{k}.log"));
        let mut command = Command::new(program("crossfade-fleet-sim")?);
        command
            .args([
                "--workers",
                &count.to_string(),
                "--first",
                &base.to_string(),
            ])
            .args(["--port", &port.to_string()])
            .args([
                "--load-time",
                &humantime::format_duration(cli.load_time).to_string(),
            ]);
        simulators.push(Guard::spawn("crossfade-fleet-sim", command, &log)?);
        for i in 0..count {
            agents.push(address(base, port, i));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready")
        {
            simulators.last_mut().map(Guard::check_alive).transpose()?;
            if Instant::now() > deadline {
                bail!("the simulator did not get ready; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "{} simulated workers ready in {:?}",
        cli.workers,
        started.elapsed()
    );
    let mut routers = Vec::new();
    let mut publics = Vec::new();
    let mut controls = Vec::new();
    for i in 0..cli.routers {
        let [public, control, admin] = [
            distinct_port(&mut used)?,
            distinct_port(&mut used)?,
            distinct_port(&mut used)?,
        ];
        let config = dir.join(format!("router-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "router_id = \"router-{i}\"\n[control_tls]\ninsecure = true\n[listen]\npublic = \"127.0.0.1:{public}\"\nadmin = \"127.0.0.1:{admin}\"\ncontrol = \"127.0.0.1:{control}\"\n[log]\nfilter = \"warn\"\n"
            ),
        )?;
        let mut command = Command::new(program("crossfade-router")?);
        command.arg("--config").arg(&config);
        routers.push(Guard::spawn(
            "crossfade-router",
            command,
            &dir.join(format!("router-{i}.log")),
        )?);
        wait_for_port(control, Duration::from_secs(20))?;
        publics.push(SocketAddr::from(([127, 0, 0, 1], public)));
        controls.push(format!("\"127.0.0.1:{control}\""));
    }
    let [api, admin] = [distinct_port(&mut used)?, distinct_port(&mut used)?];
    let agents: Vec<String> = agents.iter().map(|a| format!("\"{a}\"")).collect();
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "agents = [{}]\nrouters = [{}]\nrouter_ack_timeout = \"60s\"\n[control_tls]\ninsecure = true\n[listen]\napi = \"127.0.0.1:{api}\"\nadmin = \"127.0.0.1:{admin}\"\n[store]\npath = \"{}\"\n[log]\nfilter = \"warn\"\n",
            agents.join(", "),
            controls.join(", "),
            dir.join("state.db").display()
        ),
    )?;
    let mut command = Command::new(program("crossfade-coordinator")?);
    command.arg("--config").arg(&config);
    let coordinator = Guard::spawn(
        "crossfade-coordinator",
        command,
        &dir.join("coordinator.log"),
    )?;
    wait_for_port(api, Duration::from_secs(60))?;
    Ok(Fleet {
        coordinator,
        api: SocketAddr::from(([127, 0, 0, 1], api)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        _routers: routers,
        publics,
        _simulators: simulators,
    })
}

fn address(first: Ipv4Addr, port: u16, index: usize) -> SocketAddr {
    let ip = u32::from(first).saturating_add(u32::try_from(index).unwrap_or(u32::MAX));
    SocketAddr::from((Ipv4Addr::from(ip), port))
}

fn template(model: &str) -> v1::Template {
    v1::Template {
        model: model.into(),
        vllm_args: "--max-model-len 4096".into(),
        ..Default::default()
    }
}

/// The coordinator's `/metrics`.
async fn metrics(admin: SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: coordinator\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

/// A metric's samples by their label text (`le="0.01"`), summed over
/// series.
fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    let mut found = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(name)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let labels = series
            .strip_prefix(name)
            .unwrap_or_default()
            .trim_matches(['{', '}'])
            .to_owned();
        if let Ok(value) = value.parse::<f64>() {
            *found.entry(labels).or_default() += value;
        }
    }
    found
}

/// A histogram's buckets between two scrapes: (upper bound, count).
fn buckets(before: &str, after: &str, name: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let (a, b) = (samples(before, &bucket), samples(after, &bucket));
    let mut out: Vec<(f64, f64)> = b
        .iter()
        .filter_map(|(labels, count)| {
            let le = labels.split("le=\"").nth(1)?.trim_end_matches('"');
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, count - a.get(labels).copied().unwrap_or(0.0)))
        })
        .collect();
    out.sort_by(|x, y| x.0.total_cmp(&y.0));
    out
}

/// The bucket bound at or under which `q` of the samples fall.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map_or(f64::NAN, |b| b.0)
}

fn counter(text: &str, name: &str) -> f64 {
    samples(text, name).values().sum()
}

/// User and system CPU seconds of `pid`, and its resident and peak memory.
fn usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command: state is field 0, utime 11, stime 12.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

/// Waits until every endpoint's last promotion ended; returns them.
async fn wait_all(
    client: &mut CoordinatorClient<Channel>,
    count: usize,
    what: &str,
    ids: &BTreeMap<String, String>,
    timeout: Duration,
) -> anyhow::Result<Vec<v1::Endpoint>> {
    let deadline = Instant::now() + timeout;
    let mut last_report = Instant::now();
    loop {
        let list = client
            .list_endpoints(v1::ListEndpointsRequest {})
            .await?
            .into_inner()
            .endpoints;
        let done = list
            .iter()
            .filter(|e| {
                e.in_progress_promotion.is_none()
                    && e.last_promotion.as_ref().is_some_and(|p| {
                        ids.get(&e.name).is_none_or(|id| *id == p.id) && p.finished_at.is_some()
                    })
            })
            .count();
        if done == count {
            return Ok(list);
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("{what}: {done} of {count} endpoints done");
            last_report = Instant::now();
        }
        if Instant::now() > deadline {
            bail!("{what}: only {done} of {count} endpoints done after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let needed = cli.endpoints * usize::try_from(cli.replicas)?;
    if needed > cli.workers {
        bail!(
            "--endpoints {} of --replicas {} need {needed} workers; --workers is {}",
            cli.endpoints,
            cli.replicas,
            cli.workers
        );
    }
    let dir = match &cli.logs {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("crossfade-scale-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    eprintln!("logs in {}", dir.display());
    let mut fleet = start(&cli, &dir).await?;
    let mut client = CoordinatorClient::connect(format!("http://{}", fleet.api))
        .await?
        .max_decoding_message_size(256 << 20);
    let names: Vec<String> = (0..cli.endpoints).map(|i| format!("e{i}")).collect();
    let created = Instant::now();
    for name in &names {
        client
            .create_endpoint(v1::CreateEndpointRequest {
                name: name.clone(),
                aliases: vec![],
                template: Some(template("m-v1")),
                scaling: Some(v1::ScalingSettings {
                    min_replicas: cli.replicas,
                    max_replicas: cli.replicas,
                    target_in_flight_per_replica: 8,
                    scale_down_delay_seconds: 3600,
                }),
                promotion_settings: Some(v1::PromotionSettingsUpdate {
                    rolling_deploy: Some(true),
                    max_surge_percent: Some(0),
                    max_unavailable_percent: Some(cli.unavailable_percent),
                    stabilization_time_seconds: Some(cli.stabilization),
                    ..Default::default()
                }),
                selector: None,
            })
            .await
            .with_context(|| format!("creating {name}"))?;
    }
    wait_all(
        &mut client,
        names.len(),
        "first deployments",
        &BTreeMap::new(),
        cli.timeout,
    )
    .await?;
    eprintln!(
        "{} endpoints serving in {:?}",
        names.len(),
        created.elapsed()
    );
    // Requests through a real router reach the simulated engines.
    fleet.coordinator.check_alive()?;
    let smoke = smoke(fleet.publics[0], &names[0]).await?;

    let before = metrics(fleet.admin).await?;
    let (cpu_before, _, _) = usage(fleet.coordinator.pid());
    let promoted = Instant::now();
    // Every endpoint at once: the calls go out together, not one after
    // the other's answer.
    let mut calls = tokio::task::JoinSet::new();
    for name in &names {
        let mut client = client.clone();
        let name = name.clone();
        calls.spawn(async move {
            let answer = client
                .promote(v1::PromoteRequest {
                    endpoint: name.clone(),
                    target: Some(v1::promote_request::Target::Template(template("m-v2"))),
                    settings: None,
                })
                .await
                .with_context(|| format!("promoting {name}"))?
                .into_inner();
            anyhow::Ok((name, answer.promotion_id))
        });
    }
    let mut ids = BTreeMap::new();
    while let Some(call) = calls.join_next().await {
        let (name, id) = call??;
        ids.insert(name, id);
    }
    let done = wait_all(&mut client, names.len(), "the promotion", &ids, cli.timeout).await?;
    let took = promoted.elapsed();
    let after = metrics(fleet.admin).await?;
    let (cpu_after, rss, peak) = usage(fleet.coordinator.pid());
    fleet.coordinator.check_alive()?;

    let failed: Vec<&str> = done
        .iter()
        .filter(|e| {
            e.last_promotion
                .as_ref()
                .is_none_or(|p| p.status() != v1::PromotionStatus::Succeeded)
        })
        .map(|e| e.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("promotions that did not succeed: {failed:?}");
    }
    let steps: u32 = done
        .iter()
        .filter_map(|e| e.last_promotion.as_ref().map(|p| p.current_step))
        .max()
        .unwrap_or(0);
    let total_steps: f64 = done
        .iter()
        .filter_map(|e| e.last_promotion.as_ref().map(|p| f64::from(p.current_step)))
        .sum();
    let passes = buckets(
        &before,
        &after,
        "crossfade_coordinator_pass_duration_seconds",
    );
    let acks = buckets(
        &before,
        &after,
        "crossfade_coordinator_table_ack_duration_seconds",
    );
    let bytes = counter(&after, "crossfade_coordinator_store_written_bytes_total")
        - counter(&before, "crossfade_coordinator_store_written_bytes_total");
    let writes = counter(&after, "crossfade_coordinator_store_writes_total")
        - counter(&before, "crossfade_coordinator_store_writes_total");
    // Each promotion's own time, from its start to its end as the
    // coordinator recorded them.
    let mut each: Vec<f64> = done
        .iter()
        .filter_map(|e| e.last_promotion.as_ref())
        .filter_map(|p| Some(seconds(p.finished_at.as_ref()?) - seconds(p.started_at.as_ref()?)))
        .collect();
    each.sort_by(f64::total_cmp);
    let must = f64::from(steps) * (cli.load_time.as_secs_f64() + f64::from(cli.stabilization));
    let cpu = cpu_after - cpu_before;
    println!(
        "## {} workers, {} endpoints of {} replicas, {} routers",
        cli.workers, cli.endpoints, cli.replicas, cli.routers
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| requests through router 0 before the promotion | {smoke} |");
    println!(
        "| passes during the promotion | {} |",
        passes.last().map_or(0.0, |b| b.1)
    );
    println!(
        "| decision time per pass, p50 | ≤ {} ms |",
        quantile(&passes, 0.5) * 1000.0
    );
    println!(
        "| decision time per pass, p99 | ≤ {} ms |",
        quantile(&passes, 0.99) * 1000.0
    );
    let total = passes.last().map_or(0.0, |b| b.1);
    let within = passes
        .iter()
        .find(|(bound, _)| (*bound - 0.01).abs() < 1e-9)
        .map_or(0.0, |b| b.1);
    println!(
        "| passes over 10 ms | {:.0} ({:.1} %) |",
        total - within,
        100.0 * (total - within) / total.max(1.0)
    );
    println!(
        "| tables acknowledged by all {} routers | {} |",
        cli.routers,
        acks.last().map_or(0.0, |b| b.1)
    );
    println!(
        "| table push to the last router's ack, p50 | ≤ {} s |",
        quantile(&acks, 0.5)
    );
    println!(
        "| table push to the last router's ack, p99 | ≤ {} s |",
        quantile(&acks, 0.99)
    );
    println!("| store: transactions, bytes | {writes}, {bytes} |");
    println!(
        "| store bytes per promotion step (all endpoints' steps: {total_steps}) | {:.0} |",
        bytes / total_steps.max(1.0)
    );
    println!(
        "| coordinator CPU during the promotion | {cpu:.1} s of {:.1} s ({:.0} % of one core) |",
        took.as_secs_f64(),
        100.0 * cpu / took.as_secs_f64()
    );
    println!(
        "| coordinator memory: resident now, peak | {} MiB, {} MiB |",
        rss / 1024,
        peak / 1024
    );
    println!(
        "| promotion: steps, time its steps must take (load + stabilization per step) | {steps}, {must:.1} s |"
    );
    println!(
        "| promotion: time it took, ratio | {:.1} s, {:.2}× |",
        took.as_secs_f64(),
        took.as_secs_f64() / must.max(0.001)
    );
    let median = each.get(each.len() / 2).copied().unwrap_or(0.0);
    let longest = each.last().copied().unwrap_or(0.0);
    println!(
        "| each endpoint's promotion, start to end: median, longest, ratio of the longest | {median:.1} s, {longest:.1} s, {:.2}× |",
        longest / must.max(0.001)
    );
    Ok(())
}

/// A timestamp in seconds.
fn seconds(at: &prost_types::Timestamp) -> f64 {
    at.seconds as f64 + f64::from(at.nanos) / 1e9
}

/// Sends a few requests to `endpoint` through a router; how many succeeded
/// of how many.
async fn smoke(public: SocketAddr, endpoint: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut ok = 0;
    let total = 5;
    for _ in 0..total {
        let body =
            format!(r#"{{"model":"{endpoint}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let mut stream = tokio::net::TcpStream::connect(public).await?;
        stream
            .write_all(
                format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        if text.starts_with("HTTP/1.1 200") {
            ok += 1;
        }
    }
    Ok(format!("{ok} of {total} succeeded"))
}
