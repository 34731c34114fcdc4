//! `crossfade-agent --config agent.toml`

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::config::RuntimeKind;
use crate::config::{Config, ProbeKind};
use crate::gate::{Gate, Mode};
use crate::gpu::fake::FakeGpuProbe;
use crate::gpu::nvml::NvmlProbe;
use crate::gpu::{self, GpuProbe, Unavailable, Visible};
use crate::service::{AgentService, Defaults, policy};
use crate::status::{Identity, Reporter, monitor_gpus};
use crate::supervisor::container::ContainerRuntime;
use crate::supervisor::runtime::{ProcessRuntime, Runtime};
use crate::supervisor::{self, Supervisor};
use crate::{metrics as m, standalone};
use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use crossfade_common::config::{self, CommonArgs};
use crossfade_common::http::{self as common_http, ServeOptions};
use crossfade_common::{Shutdown, telemetry};
use crossfade_proto::tls::Role;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

/// crossfade's per-GPU-host service: supervises the inference engine behind
/// a gate that counts and drains in-flight requests, and reports GPU health
/// and load to the coordinator.
///
/// Without a coordinator, it runs the deployment of `MODEL_NAME`,
/// `VLLM_ARGS` and `SERVED_MODEL_NAME`.
#[derive(Parser)]
#[command(name = "crossfade-agent", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

/// Exit status of a configuration error (EX_CONFIG is 78; crossfade uses
/// 64, EX_USAGE, for every bad input, as `load_or_exit` does).
const EXIT_BAD_INPUT: u8 = 64;

/// Runs the program with `args` (the program name first, as in
/// `std::env::args_os`).
pub fn main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    let config: Config = config::load_or_exit("crossfade-agent", &cli.common);
    // The standalone deployment is input too: refuse a bad one before any
    // port is bound, naming the variable.
    let standalone = standalone::from_env(|name| std::env::var(name).ok());
    if let Some(spec) = &standalone
        && let Err(e) = supervisor::plan(&config.engine, spec, "engine.log".into())
    {
        eprintln!(
            "crossfade-agent: the deployment of MODEL_NAME / VLLM_ARGS / SERVED_MODEL_NAME is invalid: {e}"
        );
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    // A host that must have a GPU and has none is refused before any port
    // is bound: restarting cannot fix it.
    let probe = match gpu_probe(&config) {
        Ok(probe) => probe,
        Err(e) => {
            eprintln!("crossfade-agent: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let log = config.log.clone();
    telemetry::run_program("crossfade-agent", &log, run(config, standalone, probe))
}

async fn run(
    config: Config,
    standalone: Option<crossfade_proto::v1::EngineSpec>,
    probe: Arc<dyn GpuProbe>,
) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown
        .trigger_on_signals()
        .context("installing the SIGTERM and SIGINT handlers")?;
    let metrics = crossfade_common::metrics::install(m::HISTOGRAMS, None, &shutdown)
        .context("installing the Prometheus recorder")?;
    m::describe();

    let tls = config
        .control_tls
        .load(Role::Agent)
        .context("control_tls")?;
    let gate_listener = TcpListener::bind(config.listen.gate)
        .await
        .with_context(|| format!("binding the gate on {}", config.listen.gate))?;
    let control = TcpListener::bind(config.listen.control)
        .await
        .with_context(|| format!("binding the control listener on {}", config.listen.control))?;
    let admin = TcpListener::bind(config.listen.admin)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.listen.admin))?;

    let runtime: Arc<dyn Runtime> = match config.engine.runtime {
        RuntimeKind::Process => Arc::new(ProcessRuntime),
        RuntimeKind::Container => Arc::new(
            ContainerRuntime::connect(&config.container, &config.worker_id(), &shutdown)
                .await
                .map_err(anyhow::Error::msg)?,
        ),
    };
    let gate = Arc::new(Gate::new());
    let supervisor =
        Supervisor::start(config.engine.clone(), runtime, Arc::clone(&gate), &shutdown);
    let gpus = monitor_gpus(probe, config.gpu.poll_interval, &shutdown);
    gpu::restart::restart_on_application_xids(gpus.clone(), supervisor.clone(), &shutdown);
    let identity = Identity {
        worker_id: config.worker_id(),
        labels: config.labels.clone(),
        gate_address: config.gate_address(),
    };
    tracing::info!(
        worker_id = identity.worker_id,
        gate = %config.listen.gate,
        control = %config.listen.control,
        admin = %config.listen.admin,
        engine = config.engine.command,
        engine_port = config.engine.port,
        "crossfade-agent serving"
    );
    let reporter = Reporter::start(
        identity,
        supervisor.clone(),
        gpus,
        Arc::default(),
        &shutdown,
    );

    if let Some(spec) = standalone {
        let supervisor = supervisor.clone();
        let drain_timeout = config.gate.drain_timeout;
        shutdown.spawn(async move {
            tracing::info!(
                deployment = spec.deployment_id,
                endpoint = spec.endpoint,
                "standalone: running the deployment of MODEL_NAME and VLLM_ARGS"
            );
            match supervisor.apply(spec, drain_timeout).await {
                Ok(applied) if applied.already_applied => {
                    tracing::info!("standalone: the adopted engine already runs it");
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "standalone: cannot run the deployment"),
            }
        });
    }

    systemd_ready(&shutdown);

    let service = AgentService::new(
        reporter,
        Defaults {
            drain_timeout: config.gate.drain_timeout,
            heartbeat: config.status.heartbeat,
        },
        shutdown.clone(),
    );
    let control_shutdown = shutdown.clone();
    let control_server =
        crossfade_proto::server::serve(control, service.into_server(), &tls, policy, async move {
            control_shutdown.triggered().await;
        });
    let admin_gate = Arc::clone(&gate);
    let admin_options = ServeOptions {
        shutdown_grace: Duration::from_secs(1),
        ..ServeOptions::default()
    };
    let admin_server = common_http::serve(admin, &admin_options, shutdown.clone(), move |req| {
        let gate = Arc::clone(&admin_gate);
        let metrics = metrics.clone();
        async move { admin_endpoint(&req, &gate, &metrics) }
    });
    let handler_gate = Arc::clone(&gate);
    let gate_options = config.gate.serve_options();
    let gate_server = common_http::serve_with_close(
        gate_listener,
        &gate_options,
        shutdown.clone(),
        gate.close_signal(),
        move |req: Request<Incoming>| Arc::clone(&handler_gate).handle(req),
    );
    let ((), (), control) = tokio::join!(admin_server, gate_server, control_server);
    if let Err(e) = control {
        tracing::error!("the control listener failed: {e}");
        shutdown.trigger();
    }
    shutdown.wait_for_tasks(Duration::from_secs(5)).await;
    tracing::info!("crossfade-agent stopped; the engine, if any, keeps running");
    Ok(())
}

/// The configured GPU probe, reading only `engine.cuda_visible_devices`.
/// No NVML is `unknown`, and an error only when `gpu.require` is set.
fn gpu_probe(config: &Config) -> anyhow::Result<Arc<dyn GpuProbe>> {
    let visible = Visible::parse(&config.engine.cuda_visible_devices);
    let probe: Arc<dyn GpuProbe> = match config.gpu.probe {
        ProbeKind::Nvml => match NvmlProbe::new(visible) {
            Ok(probe) => Arc::new(probe),
            Err(e) => Arc::new(Unavailable {
                kind: "nvml",
                reason: e.to_string(),
            }),
        },
        ProbeKind::Fake => {
            let fake = FakeGpuProbe::with_gpus(
                (0..config.gpu.fake_gpus).map(FakeGpuProbe::h100).collect(),
            )
            .visible(visible);
            Arc::new(match &config.gpu.fake_faults {
                Some(path) => fake.faults_from(path.clone()),
                None => fake,
            })
        }
        ProbeKind::None => Arc::new(Unavailable {
            kind: "none",
            reason: "gpu.probe is `none`".into(),
        }),
    };
    if config.gpu.require {
        let host = gpu::assess(probe.as_ref(), std::time::SystemTime::now());
        if host.gpus.is_empty() {
            anyhow::bail!(
                "gpu.require is set but the {} probe finds no GPU{}",
                host.probe,
                host.error.map(|e| format!(": {e}")).unwrap_or_default()
            );
        }
    }
    Ok(probe)
}

/// Tells systemd the agent is ready (`Type=notify`), and pings its watchdog
/// at half the interval when `WATCHDOG_USEC` is set. Outside systemd
/// (no `NOTIFY_SOCKET`) this does nothing.
fn systemd_ready(shutdown: &Shutdown) {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    if let Some(interval) = watchdog_interval(|name| std::env::var(name).ok()) {
        let every = interval / 2;
        tracing::info!(?every, "pinging the systemd watchdog");
        let stop = shutdown.clone();
        shutdown.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = stop.triggered() => return,
                    _ = tick.tick() => {
                        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]) {
                            tracing::warn!(error = %e, "cannot ping the systemd watchdog");
                        }
                    }
                }
            }
        });
    }
    let stop = shutdown.clone();
    shutdown.spawn(async move {
        stop.triggered().await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    });
}

/// The watchdog interval systemd asks for, as `sd_watchdog_enabled(3)`
/// reads it: `WATCHDOG_USEC`, unless `WATCHDOG_PID` names another process.
fn watchdog_interval(env: impl Fn(&str) -> Option<String>) -> Option<Duration> {
    let usec: u64 = env("WATCHDOG_USEC")?.parse().ok()?;
    if let Some(pid) = env("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// `/metrics`, `/healthz` (the agent serves), `/readyz` (the gate forwards
/// to a ready engine).
fn admin_endpoint(
    req: &Request<Incoming>,
    gate: &Gate,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return common_http::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => common_http::metrics(Some(metrics)),
        "/healthz" => common_http::text(StatusCode::OK, "ok\n"),
        "/readyz" => match gate.state().mode {
            Mode::Ready => common_http::text(StatusCode::OK, "ok: the engine is ready\n"),
            Mode::Draining => common_http::text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            Mode::NotReady => {
                common_http::text(StatusCode::SERVICE_UNAVAILABLE, "the engine is not ready\n")
            }
        },
        _ => common_http::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
