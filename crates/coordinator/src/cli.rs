//! `crossfade-coordinator --config coordinator.toml`

use std::process::ExitCode;
use std::time::Duration;

use crate::actor::{self, Options};
use crate::config::{BackendKind, Config};
use crate::service;
use crate::store::{Backends, Embedded, Store};
use anyhow::Context as _;
use clap::Parser;
use crossfade_common::config::{self, CommonArgs};
use crossfade_common::http::{self as common_http, ServeOptions};
use crossfade_common::{Shutdown, telemetry};
use crossfade_proto::tls::Role;
use http::{Method, StatusCode};
use tokio::net::TcpListener;

/// crossfade's coordinator: owns the desired state of every endpoint and
/// runs rolling promotions across agents and routers.
#[derive(Parser)]
#[command(name = "crossfade-coordinator", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

/// Runs the program with `args` (the program name first, as in
/// `std::env::args_os`).
pub fn main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    let config: Config = config::load_or_exit("crossfade-coordinator", &cli.common);
    let log = config.log.clone();
    telemetry::run_program("crossfade-coordinator", &log, run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown
        .trigger_on_signals()
        .context("installing the SIGTERM and SIGINT handlers")?;
    let metrics = crossfade_common::metrics::install(
        crate::metrics::HISTOGRAMS,
        Some(crate::metrics::IDLE_GAUGES),
        &shutdown,
    )
    .context("installing the Prometheus recorder")?;
    crate::metrics::describe();
    let tls = config
        .control_tls
        .load(Role::Coordinator)
        .context("control_tls")?;
    let api = TcpListener::bind(config.listen.api)
        .await
        .with_context(|| format!("binding the API listener on {}", config.listen.api))?;
    let admin = TcpListener::bind(config.listen.admin)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.listen.admin))?;
    let http = match config.listen.http {
        Some(address) => {
            // Beyond loopback: operators' certificates only (the config's
            // validation made sure mutual TLS is set).
            let tls = if address.ip().is_loopback() {
                None
            } else {
                config
                    .control_tls
                    .https_server(&[Role::Operator])
                    .context("control_tls, for listen.http")?
            };
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("binding the REST and dashboard listener on {address}"))?;
            Some((listener, tls))
        }
        None => None,
    };
    let options = Options {
        agents: config.agents.clone(),
        routers: config.routers.clone(),
        router_ack_bound: config.router_ack_timeout,
        template_env: config.template_env.iter().cloned().collect(),
        control: tls.clone(),
        publish_to: None,
    };
    let coordinator = match config.store.backend {
        BackendKind::Embedded => {
            let backend = Embedded::open(&config.store.path).context("opening the store")?;
            let (store, state) = Store::open(Backends::Embedded(backend))
                .await
                .context("reading the store")?;
            metrics::gauge!(crate::metrics::LEADER).set(1.0);
            actor::start(store, state, 0, options, &shutdown)
                .await
                .context("writing the store")?
        }
        #[cfg(not(feature = "etcd"))]
        BackendKind::Etcd => anyhow::bail!(
            "store.backend: `etcd` needs a crossfade-coordinator built with `--features etcd`"
        ),
        #[cfg(feature = "etcd")]
        BackendKind::Etcd => {
            let etcd = &config.store.etcd;
            let advertise = if etcd.advertise_api.is_empty() {
                format!("{}:{}", hostname(), config.listen.api.port())
            } else {
                etcd.advertise_api.clone()
            };
            tracing::info!(
                endpoints = ?etcd.endpoints,
                prefix = etcd.prefix,
                advertise,
                "on etcd: campaigning for leadership"
            );
            crate::ha::start(
                crate::ha::Settings {
                    endpoints: etcd.endpoints.clone(),
                    prefix: etcd.prefix.clone(),
                    lease_ttl: etcd.lease_ttl,
                    timeout: etcd.timeout,
                    advertise,
                },
                options,
                &shutdown,
            )
        }
    };
    tracing::info!(
        api = %config.listen.api,
        admin = %config.listen.admin,
        http = ?config.listen.http,
        agents = config.agents.len(),
        routers = config.routers.len(),
        "crossfade-coordinator serving"
    );
    let admin_options = ServeOptions {
        shutdown_grace: Duration::from_secs(1),
        ..ServeOptions::default()
    };
    let admin_server = common_http::serve(admin, &admin_options, shutdown.clone(), move |req| {
        let metrics = metrics.clone();
        async move {
            if req.method() != Method::GET {
                return common_http::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
            }
            match req.uri().path() {
                "/metrics" => common_http::metrics(Some(&metrics)),
                "/healthz" => common_http::text(StatusCode::OK, "ok\n"),
                _ => common_http::text(StatusCode::NOT_FOUND, "not found\n"),
            }
        }
    });
    let rest_server = {
        let (coordinator, shutdown) = (coordinator.clone(), shutdown.clone());
        async move {
            if let Some((listener, tls)) = http {
                crate::rest::serve(listener, tls, coordinator, shutdown).await;
            }
        }
    };
    let api_server = service::serve(api, coordinator, &tls, shutdown.clone());
    let ((), (), api) = tokio::join!(admin_server, rest_server, api_server);
    if let Err(e) = api {
        tracing::error!("the API listener failed: {e}");
        shutdown.trigger();
    }
    shutdown.wait_for_tasks(Duration::from_secs(5)).await;
    tracing::info!("crossfade-coordinator stopped");
    Ok(())
}

/// This host's name, for the address standbys name.
#[cfg(feature = "etcd")]
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
