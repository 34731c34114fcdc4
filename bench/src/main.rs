//! `cargo run --release -p crossfade-bench -- --quick|--full`
//!
//! Measures crossfade-router and its peers (nginx, HAProxy, sglang-router,
//! vllm-router) against a direct connection, on one backend, in one run,
//! and prints absolute figures and ratios; `--json FILE` writes them for
//! machines. See `bench/RESULTS.md` for what each figure means and the
//! latest full run.

mod backend;
mod gate;
mod load;
mod peers;
mod report;
mod swaps;
mod system;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use serde::Serialize;

use crate::load::{IdleRun, Run, SseRun};
use crate::peers::{Kind, Setup};
use crate::system::{CpuMeter, Guard};

/// Benchmarks crossfade-router against a direct connection and its peers.
#[derive(Parser, Debug)]
#[command(name = "crossfade-bench")]
struct Cli {
    /// A short run (about two minutes): the figures are noisier.
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// The full run that `bench/RESULTS.md` reports (about ten minutes).
    #[arg(long)]
    full: bool,
    /// Only these systems (comma-separated: direct, crossfade, gate,
    /// crossfade+gate, nginx, haproxy, sglang-router, vllm-router); the
    /// baseline always runs.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The fixed rate, requests a second (the profile's by default).
    #[arg(long)]
    rate: Option<u64>,
    /// Only these scenarios (comma-separated: requests, sse, swaps, idle).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Exit with status 1 if any system measured had an error (a failed
    /// request or stream, a process that died); timings are never judged.
    #[arg(long)]
    strict: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The virtual environment holding the Python routers.
    #[arg(long, env = "CROSSFADE_BENCH_VENV", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv"))]
    venv: PathBuf,
}

/// How much of each scenario a run does.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    name: &'static str,
    /// Requests at concurrency 1.
    sequential_requests: u64,
    /// The fixed rate, requests a second, and for how long.
    rate: u64,
    rate_seconds: u64,
    /// Closed-loop clients for the saturation run, and for how long.
    saturation_clients: usize,
    saturation_seconds: u64,
    /// SSE: concurrent streams, chunks each, microseconds between chunks.
    sse_streams: u64,
    sse_chunks: u64,
    sse_interval_us: u64,
    /// Idle streams held at once (lowered to what the fd limit allows).
    idle_streams: u64,
    /// Seconds of each swap run.
    swap_seconds: u64,
    /// Rounds the latency, CPU, SSE and swap runs are split into.
    rounds: u64,
    /// The scenarios run.
    scenarios: Vec<String>,
}

/// The scenarios, in the order they run.
const SCENARIOS: [&str; 4] = ["requests", "sse", "swaps", "idle"];

impl Profile {
    fn runs(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }
}

impl Profile {
    fn quick() -> Self {
        Self {
            name: "quick",
            sequential_requests: 2_000,
            rate: 2_000,
            rate_seconds: 3,
            saturation_clients: 32,
            saturation_seconds: 2,
            sse_streams: 16,
            sse_chunks: 100,
            sse_interval_us: 10_000,
            idle_streams: 1_000,
            swap_seconds: 3,
            rounds: 3,
            scenarios: Vec::new(),
        }
    }

    fn full() -> Self {
        Self {
            name: "full",
            sequential_requests: 20_000,
            rate: 5_000,
            rate_seconds: 10,
            saturation_clients: 64,
            saturation_seconds: 5,
            sse_streams: 64,
            sse_chunks: 500,
            sse_interval_us: 10_000,
            idle_streams: 10_000,
            swap_seconds: 10,
            rounds: 5,
            scenarios: Vec::new(),
        }
    }
}

/// One system's figures.
#[derive(Debug, Serialize)]
pub struct SystemResult {
    name: &'static str,
    version: String,
    notes: String,
    /// Why it was not measured.
    skipped: Option<String>,
    sequential: Option<Run>,
    fixed_rate: Option<Run>,
    saturation: Option<Run>,
    sse: Option<SseRun>,
    idle: Option<IdleRun>,
    /// crossfade only: the fixed rate again, with the split swapped.
    swaps: Vec<SwapRun>,
}

/// The median of `values` (0 when there are none).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

impl SystemResult {
    /// What went wrong in its runs, if anything did (skipped systems are
    /// not failures, unless they died during the run).
    fn failure(&self) -> Option<String> {
        if let Some(skipped) = self.skipped.as_ref().filter(|s| s.starts_with("it died")) {
            return Some(format!("{}: {skipped}", self.name));
        }
        let runs = [&self.sequential, &self.fixed_rate, &self.saturation];
        let mut errors: u64 = runs
            .iter()
            .filter_map(|r| r.as_ref())
            .map(|r| r.errors)
            .sum();
        errors += self
            .swaps
            .iter()
            .map(|s| s.run.errors + s.swaps.failed)
            .sum::<u64>();
        errors += self.sse.as_ref().map_or(0, |r| r.streams_failed);
        errors += self.idle.as_ref().map_or(0, |r| r.wanted - r.opened);
        (errors > 0).then(|| format!("{}: {errors} errors", self.name))
    }
}

/// A fixed-rate run while the split is swapped `per_second` times a second.
#[derive(Debug, Serialize)]
pub struct SwapRun {
    per_second: u64,
    /// False for the control run: calls that leave the table as it is.
    changes_table: bool,
    swaps: swaps::Swaps,
    run: Run,
    /// The p99 of each one-second slice, in µs.
    slice_p99s_us: Vec<f64>,
    /// Their median: a noisy second on a shared machine moves the pooled
    /// p99 of a ten-second run, not this.
    slice_p99_median_us: f64,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Results {
    command: String,
    machine: report::Machine,
    profile: Profile,
    systems: Vec<SystemResult>,
}

const CLIENT_CORE: usize = 0;
const SUT_CORE: usize = 1;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let rest = args.get(2..).unwrap_or_default();
    match args.get(1).map(String::as_str) {
        // The helper processes the benchmark starts, and what
        // bench/profile-router.sh runs.
        Some("__backend") => exit("backend", backend::main(rest)),
        Some("__swapper") => exit("swapper", swaps::main(rest)),
        Some("__gate") => exit("gate", gate::main(rest)),
        Some("__config") => exit("config", peers::print_config(rest)),
        Some("__router") => crossfade_router::cli::main_from(
            std::iter::once("crossfade-router".into()).chain(rest.iter().map(Into::into)),
        ),
        _ => exit("crossfade-bench", run(&Cli::parse())),
    }
}

/// The exit status of `result`, its error on stderr under `name`.
fn exit(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    anyhow::ensure!(
        cli.quick || cli.full,
        "say how long to run: --quick (about two minutes) or --full (about ten)"
    );
    let mut profile = if cli.full {
        Profile::full()
    } else {
        Profile::quick()
    };
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| {
            *k == Kind::Direct || cli.only.is_empty() || cli.only.iter().any(|o| o == k.name())
        })
        .collect();
    if let Some(rate) = cli.rate {
        anyhow::ensure!(
            (1..=1_000_000).contains(&rate),
            "--rate: must be within 1..=1000000, got {rate}"
        );
        profile.rate = rate;
    }
    for scenario in &cli.scenarios {
        anyhow::ensure!(
            SCENARIOS.contains(&scenario.as_str()),
            "--scenarios: unknown scenario `{scenario}`; known: {}",
            SCENARIOS.join(", ")
        );
    }
    profile.scenarios = if cli.scenarios.is_empty() {
        SCENARIOS.map(str::to_owned).to_vec()
    } else {
        cli.scenarios.clone()
    };
    for only in &cli.only {
        anyhow::ensure!(
            Kind::ALL.iter().any(|k| k.name() == only),
            "--only: unknown system `{only}`; known: {}",
            Kind::ALL.map(Kind::name).join(", ")
        );
    }

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    anyhow::ensure!(
        cores >= 2,
        "the benchmark pins the client to core {CLIENT_CORE} and the system under test to core {SUT_CORE}; this machine has {cores} core(s)"
    );
    // Each idle stream holds two descriptors in a proxy (client and
    // upstream side); leave room for everything else.
    let fd_limit = system::raise_fd_limit();
    let machine = report::Machine::read();
    profile.idle_streams = profile.idle_streams.min(fd_limit.saturating_sub(200) / 2);
    system::pin_self(CLIENT_CORE)?;

    let dir = std::env::temp_dir().join(format!("crossfade-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure(cli, &profile, &kinds, &dir, machine, fd_limit);
    let _ = std::fs::remove_dir_all(&dir);
    let results = result?;
    report::print(&results);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)? + "\n")?;
        eprintln!("wrote {}", path.display());
    }
    if cli.strict {
        let failed: Vec<String> = results
            .systems
            .iter()
            .filter_map(SystemResult::failure)
            .collect();
        anyhow::ensure!(failed.is_empty(), "--strict: {}", failed.join("; "));
    }
    Ok(())
}

fn measure(
    cli: &Cli,
    profile: &Profile,
    kinds: &[Kind],
    dir: &std::path::Path,
    machine: report::Machine,
    fd_limit: u64,
) -> anyhow::Result<Results> {
    let exe = std::env::current_exe()?;
    let ports = system::free_ports::<10>()?;
    let workers = [ports[0], ports[1], ports[2], ports[3]];
    let aliases = [ports[4], ports[5], ports[6], ports[7], ports[8], ports[9]];
    let mut backend = system::on_core(SUT_CORE, &exe.to_string_lossy());
    backend
        .arg("__backend")
        .arg("--chunk-interval-us")
        .arg(profile.sse_interval_us.to_string())
        .args(workers.map(|p| p.to_string()))
        .args(
            aliases
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{p}:{}", i % 2)),
        );
    let mut backend = Guard::spawn("backend", backend, &dir.join("backend.log"))?;
    for port in workers.into_iter().chain(aliases) {
        system::wait_for_port(port, Duration::from_secs(10))?;
    }
    let setup = Setup {
        workers,
        aliases,
        core: SUT_CORE,
        dir: dir.to_owned(),
        exe,
        venv: cli.venv.clone(),
        fd_limit,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let systems = runtime.block_on(measure_all(kinds, &setup, profile, &mut backend))?;
    Ok(Results {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine,
        profile: profile.clone(),
        systems,
    })
}

/// A system under measurement.
struct Live {
    running: peers::Running,
    result: SystemResult,
}

/// Starts every system, then runs each scenario over all of them. The
/// latency and CPU runs are split into rounds, and each round visits every
/// system in turn, so that the machine's drift (other tenants, frequency)
/// falls on all of them alike rather than on whichever ran last.
async fn measure_all(
    kinds: &[Kind],
    setup: &Setup,
    profile: &Profile,
    backend: &mut Guard,
) -> anyhow::Result<Vec<SystemResult>> {
    let mut skipped = Vec::new();
    let mut live = Vec::new();
    for &kind in kinds {
        let mut result = SystemResult {
            name: kind.name(),
            version: String::new(),
            notes: String::new(),
            skipped: None,
            sequential: None,
            fixed_rate: None,
            saturation: None,
            sse: None,
            idle: None,
            swaps: Vec::new(),
        };
        match peers::start(kind, setup).await {
            Ok(running) => {
                eprintln!("{}: ready ({})", kind.name(), running.version);
                result.version.clone_from(&running.version);
                result.notes.clone_from(&running.notes);
                live.push(Live { running, result });
            }
            Err(skip) => {
                eprintln!("{}: skipped: {skip}", kind.name());
                result.skipped = Some(skip);
                skipped.push(result);
            }
        }
    }
    let cpu = CpuMeter::new(SUT_CORE);
    let client = load::client();
    let rounds = profile.rounds;

    if profile.runs("requests") {
        eprintln!("== non-streamed requests, {rounds} rounds");
        let mut sequential: Vec<_> = live.iter().map(|_| load::Recorder::default()).collect();
        let mut rate: Vec<_> = live.iter().map(|_| load::Recorder::default()).collect();
        for l in &live {
            // Warm the connection pools on both sides.
            let _ = load::saturate(
                &client,
                &l.running.target,
                8,
                Duration::from_millis(300),
                &cpu,
            )
            .await;
        }
        let slice = Duration::from_secs_f64(profile.rate_seconds as f64 / rounds as f64);
        for _ in 0..rounds {
            for (i, l) in live.iter().enumerate() {
                let target = &l.running.target;
                let n = profile.sequential_requests / rounds;
                sequential[i].merge(load::sequential(&client, target, n, &cpu).await);
                rate[i].merge(load::open_loop(&client, target, profile.rate, slice, &cpu).await);
            }
        }
        for ((l, sequential), rate) in live.iter_mut().zip(sequential).zip(rate) {
            let (sequential, rate) = (sequential.finish(), rate.finish());
            eprintln!(
                "   {:<14} c1 p50 {:>7.1} µs | {} req/s p50 {:>7.1} µs p99 {:>8.1} µs, core {SUT_CORE} {:>6.1} µs/request, {} errors",
                l.result.name,
                sequential.latency.p50_us,
                profile.rate,
                rate.latency.p50_us,
                rate.latency.p99_us,
                rate.cpu_us_per_request,
                sequential.errors + rate.errors
            );
            l.result.sequential = Some(sequential);
            l.result.fixed_rate = Some(rate);
        }
        for l in &mut live {
            let run = load::saturate(
                &client,
                &l.running.target,
                profile.saturation_clients,
                Duration::from_secs(profile.saturation_seconds),
                &cpu,
            )
            .await;
            eprintln!(
                "   {:<14} saturation {:.0} req/s, {} errors",
                l.result.name,
                run.ok as f64 / run.seconds,
                run.errors
            );
            l.result.saturation = Some(run);
        }
    }

    if profile.runs("sse") {
        eprintln!("== SSE streams, {rounds} rounds");
        let interval = Duration::from_micros(profile.sse_interval_us);
        let mut sse: Vec<_> = live.iter().map(|_| load::SseRecorder::default()).collect();
        for _ in 0..rounds {
            for (i, l) in live.iter().enumerate() {
                let chunks = (profile.sse_chunks / rounds).max(1);
                let run = load::sse(
                    &client,
                    &l.running.target,
                    profile.sse_streams,
                    chunks,
                    interval,
                    &cpu,
                )
                .await;
                sse[i].merge(run);
            }
        }
        for (l, sse) in live.iter_mut().zip(sse) {
            let run = sse.finish();
            eprintln!(
                "   {:<14} {} chunks, p50 {:.1} µs, p99 {:.1} µs, {} merged, {} streams failed",
                l.result.name,
                run.chunks,
                run.chunk_latency.p50_us,
                run.chunk_latency.p99_us,
                run.merged,
                run.streams_failed
            );
            l.result.sse = Some(run);
        }
    }

    if profile.runs("swaps") {
        for l in live.iter_mut() {
            let Some(control) = l.running.control else {
                continue;
            };
            eprintln!(
                "== {} with its split swapped, {} rounds",
                l.result.name, profile.swap_seconds
            );
            // (calls a second, whether each changes the table): none; a
            // thousand calls that change nothing (the cost of the calls
            // alone); a thousand swaps; ten thousand.
            let per_second = [(0, true), (1_000, false), (1_000, true), (10_000, true)];
            let mut runs: Vec<_> = per_second
                .iter()
                .map(|_| load::Recorder::default())
                .collect();
            let mut swaps: Vec<swaps::Swaps> =
                per_second.iter().map(|_| swaps::Swaps::default()).collect();
            // One-second slices, the three rates in turn: the p99s compared
            // come from the same stretches of the machine's time.
            let slice = Duration::from_secs(1);
            let mut first_version = 1_000_000_000;
            let mut slice_p99s: Vec<Vec<f64>> = per_second.iter().map(|_| Vec::new()).collect();
            for _ in 0..profile.swap_seconds {
                for (i, &(rate, changes)) in per_second.iter().enumerate() {
                    let swapper = if rate > 0 {
                        let plan = swaps::Plan {
                            control,
                            rate,
                            first_version,
                            changes,
                            duration: slice,
                            workers: setup.workers,
                        };
                        let started = swaps::Swapper::start(&setup.exe, SUT_CORE, &plan);
                        Some(started.context("starting the swapper")?)
                    } else {
                        None
                    };
                    let run =
                        load::open_loop(&client, &l.running.target, profile.rate, slice, &cpu)
                            .await;
                    if let Some(swapper) = swapper {
                        let done = tokio::task::spawn_blocking(move || swapper.finish())
                            .await
                            .unwrap_or_default();
                        first_version = done.final_version.max(first_version) + 1;
                        swaps[i].merge(done);
                    }
                    slice_p99s[i].push(run.p99_us());
                    runs[i].merge(run);
                }
            }
            let runs = per_second.into_iter().zip(runs).zip(swaps).zip(slice_p99s);
            for ((((rate, changes_table), run), swaps), slice_p99s_us) in runs {
                let run = run.finish();
                let slice_p99_median_us = median(&slice_p99s_us);
                eprintln!(
                    "   {rate} {}/s (achieved {:.0}): p50 {:.1} µs, p99 {:.1} µs (median of slices {slice_p99_median_us:.1}), {} errors, shares {:?}",
                    if changes_table {
                        "swaps"
                    } else {
                        "no-op calls"
                    },
                    swaps.rate,
                    run.latency.p50_us,
                    run.latency.p99_us,
                    run.errors,
                    run.shares
                );
                l.result.swaps.push(SwapRun {
                    per_second: rate,
                    changes_table,
                    swaps,
                    run,
                    slice_p99s_us,
                    slice_p99_median_us,
                });
            }
        }
    }

    if profile.runs("idle") {
        drop(client);
        eprintln!("== idle streams, up to {} each", profile.idle_streams);
        for l in live.iter_mut() {
            if l.running.processes.is_empty() {
                continue;
            }
            let running = &l.running;
            let run = load::idle(&running.target, profile.idle_streams, || running.rss_kib()).await;
            eprintln!(
                "   {:<14} {} of {} open, {:.0} bytes each",
                l.result.name, run.opened, run.wanted, run.bytes_per_stream
            );
            l.result.idle = Some(run);
        }
    }

    backend.check_alive()?;
    let mut results = Vec::new();
    for mut l in live {
        for process in &mut l.running.processes {
            if let Err(e) = process.check_alive() {
                l.result.skipped = Some(format!("it died during the run: {e:#}"));
            }
        }
        results.push(l.result);
    }
    // In the order asked for, the skipped ones where they belong.
    results.extend(skipped);
    results.sort_by_key(|r| kinds.iter().position(|k| k.name() == r.name));
    Ok(results)
}
