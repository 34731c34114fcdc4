//! `fake-vllm serve MODEL ...`: launched exactly as `vllm serve` is.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use crate::{ArgsError, Config, Exit, FakeVllm, Shutdown, USAGE};
use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// Runs `fake-vllm` with `args` (the program name first, as in
/// `std::env::args`).
pub fn main_from(args: impl IntoIterator<Item = String>) -> ExitCode {
    let config = match Config::from_args(args.into_iter().skip(1), |var| std::env::var(var).ok()) {
        Ok(config) => config,
        Err(ArgsError::HelpRequested) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // argparse's format: usage, then the error, status 2.
            eprintln!(
                "{}\nfake-vllm: error: {e}",
                USAGE.lines().next().unwrap_or_default()
            );
            return ExitCode::from(e.exit_code());
        }
    };

    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<ExitCode> {
    // Registered before the load so that a SIGTERM during it is handled, not fatal.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut next_signal = async move || {
        tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        }
    };

    info!(
        "fake-vllm (vLLM stand-in, fake engine) model={} served_model_names={:?} max_num_seqs={} tokens_per_second={} fault={}",
        config.model,
        config.served_model_names,
        config.max_num_seqs,
        config.tokens_per_second,
        config.fault
    );
    if !config.extra_flags.is_empty() {
        info!(
            "ignoring vLLM flags (fake engine): {}",
            config.extra_flags.join(" ")
        );
    }

    tokio::select! {
        loaded = crate::load(&config) => {
            if let Err(e) = loaded {
                error!("{e}");
                return Ok(ExitCode::from(1));
            }
        }
        name = next_signal() => {
            info!("received {name} while loading the model; exiting");
            return Ok(ExitCode::SUCCESS);
        }
    }

    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let shutdown = match config.shutdown_timeout {
        Some(grace) => Shutdown::Graceful(grace),
        None => Shutdown::Abort,
    };
    let fake = FakeVllm::new(config)?;
    let controls = fake.controls();
    let mut serve = std::pin::pin!(fake.serve(listener));
    let mut signals = 0;
    let exit = loop {
        tokio::select! {
            exit = &mut serve => break exit?,
            name = next_signal() => {
                signals += 1;
                if signals > 1 {
                    warn!("received {name} again: aborting in-flight requests");
                    controls.shutdown(Shutdown::Abort);
                } else {
                    match shutdown {
                        Shutdown::Graceful(grace) => info!(
                            "received {name}: draining in-flight requests for up to {} (--shutdown-timeout)",
                            humantime::format_duration(grace)
                        ),
                        Shutdown::Abort => info!(
                            "received {name}: aborting in-flight requests (no --shutdown-timeout)"
                        ),
                    }
                    controls.shutdown(shutdown);
                }
            }
        }
    };
    match exit {
        Exit::Shutdown => Ok(ExitCode::SUCCESS),
        // A dead engine takes the process down at once, with no cleanup.
        Exit::Crashed => std::process::exit(i32::from(exit.code())),
    }
}
