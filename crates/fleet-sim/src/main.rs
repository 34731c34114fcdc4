//! `crossfade-fleet-sim --workers 5000 --first 127.1.0.1 --port 7002`:
//! serves a simulated fleet until SIGTERM or SIGINT, printing `ready` once
//! every worker listens (see the library's documentation).

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// A simulated fleet of agents, for scale tests and benchmarks.
#[derive(Parser, Debug)]
#[command(name = "crossfade-fleet-sim", version)]
struct Cli {
    /// How many workers (each listens on its own address; mind the limit
    /// on open files: a worker holds its listener and the coordinator's
    /// connection).
    #[arg(long, default_value_t = 100)]
    workers: usize,
    /// The first worker's address; the others follow it.
    #[arg(long, default_value = "127.1.0.1")]
    first: Ipv4Addr,
    /// The port every worker listens on, for the Agent API and its gate.
    #[arg(long, default_value_t = 7002)]
    port: u16,
    /// Time an engine takes to load.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    load_time: Duration,
    /// Time a drain takes.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    drain_time: Duration,
    /// Engines of this model fail once loaded.
    #[arg(long)]
    fail_model: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("crossfade-fleet-sim: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let fleet = match crossfade_fleet_sim::start(crossfade_fleet_sim::Settings {
            workers: cli.workers,
            first: cli.first,
            port: cli.port,
            load_time: cli.load_time,
            drain_time: cli.drain_time,
            fail_model: cli.fail_model,
        })
        .await
        {
            Ok(fleet) => fleet,
            Err(e) => {
                eprintln!("crossfade-fleet-sim: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        println!("ready {} workers from {}", cli.workers, cli.first);
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(e) => {
                    eprintln!("crossfade-fleet-sim: {e}");
                    return ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        eprintln!(
            "crossfade-fleet-sim: stopping; engines: {:?}",
            fleet.census()
        );
        ExitCode::SUCCESS
    })
}
