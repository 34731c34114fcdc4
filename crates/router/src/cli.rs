//! `crossfade-router --config router.toml`

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use crossfade_common::http::tls_server_config;
use tokio_rustls::rustls::ServerConfig;

use crate::config::Config;
use crate::keys::{KeyFile, Keys};
use crate::proxy::Proxy;
use crate::table::Routes;
use crate::{server, stats};
use anyhow::Context as _;
use clap::Parser;
use crossfade_common::config::{self, CommonArgs, Sources};
use crossfade_common::{Shutdown, telemetry};
use crossfade_proto::tls::{self, Role};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// crossfade's public, OpenAI-compatible entrypoint: routes each request by
/// its `model` to a deployment by weight and a worker by load, and streams
/// the response back.
#[derive(Parser)]
#[command(name = "crossfade-router", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

/// Runs the program with `args` (the program name first, as in
/// `std::env::args_os`).
pub fn main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    let config: Config = config::load_or_exit("crossfade-router", &cli.common);
    let log = config.log.clone();
    telemetry::run_program("crossfade-router", &log, run(cli, config))
}

async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown
        .trigger_on_signals()
        .context("installing the SIGTERM and SIGINT handlers")?;
    let metrics = crossfade_common::metrics::install(stats::HISTOGRAMS, None, &shutdown)
        .context("installing the Prometheus recorder")?;
    stats::describe();
    let routes = Arc::new(
        Routes::with_retired_grace(&config.routing_table(), config.metrics.retired_series_grace)
            .context("building the configured routing table")?,
    );
    let proxy = Arc::new(Proxy::new(Arc::clone(&routes), config.proxy_settings()));
    let tls = config
        .control_tls
        .load(Role::Router)
        .context("control_tls")?;
    let public_tls = match (&config.public_tls.cert, &config.public_tls.key) {
        (Some(cert), Some(key)) => Some(Arc::new(ArcSwap::from_pointee(
            tls_server_config(cert, key)
                .map_err(anyhow::Error::msg)
                .context("public_tls")?,
        ))),
        _ => None,
    };
    match &config.auth.api_keys {
        Some(path) => {
            let keys = load_keys(path).context("auth.api_keys")?;
            tracing::info!(keys = keys.len(), path = %path.display(), "API keys required");
            proxy.admission().set_keys(Some(keys));
            watch_keys(path.clone(), Arc::clone(&proxy), &shutdown);
        }
        None => tracing::warn!(
            "auth.api_keys is not set: the public listener serves requests without an API key"
        ),
    }

    let public = TcpListener::bind(config.listen.public)
        .await
        .with_context(|| format!("binding the public listener on {}", config.listen.public))?;
    let admin = TcpListener::bind(config.listen.admin)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.listen.admin))?;
    let control = std::net::TcpListener::bind(config.listen.control)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .with_context(|| format!("binding the control listener on {}", config.listen.control))?;
    tracing::info!(
        public = %config.listen.public,
        admin = %config.listen.admin,
        control = %config.listen.control,
        endpoints = config.endpoint.len(),
        "crossfade-router serving"
    );

    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let reload_shutdown = shutdown.clone();
    let reload_routes = Arc::clone(&routes);
    let reload_tls = public_tls.clone();
    shutdown.spawn(async move {
        loop {
            tokio::select! {
                _ = hangup.recv() => reload(&cli.common, &reload_routes, reload_tls.as_deref()),
                () = reload_shutdown.triggered() => return,
            }
        }
    });

    let router_id = if config.router_id.is_empty() {
        config.listen.control.to_string()
    } else {
        config.router_id.clone()
    };
    if let Some(hints) =
        crate::demand::start(&config.coordinator.api, &tls, router_id.clone(), &shutdown)
    {
        proxy.queue().hint_demand_to(hints);
    }
    let control_server = control_plane(
        control,
        Arc::clone(&routes),
        router_id,
        tls,
        shutdown.clone(),
    );
    let admin_proxy = Arc::clone(&proxy);
    let admin_server = server::serve(admin, &config.limits, shutdown.clone(), move |req| {
        server::admin(req, Arc::clone(&admin_proxy), Some(metrics.clone()))
    });
    let public_options = server::options(&config.limits, public_tls);
    let public_server = server::serve_public(public, &public_options, shutdown.clone(), proxy);
    let ((), (), control) = tokio::join!(admin_server, public_server, control_server);
    if let Err(e) = control {
        // The proxy kept serving; the coordinator could not reach us.
        tracing::error!("the control listener failed: {e:#}");
        shutdown.trigger();
    }
    shutdown.wait_for_tasks(config.limits.shutdown_grace).await;
    tracing::info!("crossfade-router stopped");
    Ok(())
}

/// Serves RouterControl on a thread and runtime of its own, so that a
/// coordinator swapping tables (decoding HTTP/2, building the table) never
/// holds up the proxy's worker threads, whatever their number (as
/// linkerd2-proxy runs its admin server on a thread of its own). The table
/// itself is shared: a swap is one atomic store.
fn control_plane(
    listener: std::net::TcpListener,
    routes: Arc<Routes>,
    router_id: String,
    tls: tls::Control,
    shutdown: crossfade_common::Shutdown,
) -> impl std::future::Future<Output = anyhow::Result<()>> {
    let (done, finished) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let serve = || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the control plane's runtime")?;
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)
                        .context("registering the control listener")?;
                    crate::control::serve(listener, routes, router_id, tls, shutdown).await
                })
            };
            let _ = done.send(serve());
        });
    async move {
        thread.context("starting the control plane's thread")?;
        finished
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the control plane's thread panicked")))
    }
}

/// SIGHUP: re-read the configuration file, swap its table in and load the
/// public certificate again (open connections keep theirs). A bad file
/// changes nothing and says why.
fn reload(args: &CommonArgs, routes: &Routes, public_tls: Option<&ArcSwap<ServerConfig>>) {
    let config = match config::load::<Config>(&Sources::new(args, config::process_env())) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(error = %e, "configuration not reloaded");
            return;
        }
    };
    match routes.apply_from_config(&config.routing_table()) {
        Ok(applied) => tracing::info!(version = applied.version(), "routing table reloaded"),
        Err(e) => tracing::warn!(error = %e, "routing table not reloaded"),
    }
    if let (Some(current), Some(cert), Some(key)) =
        (public_tls, &config.public_tls.cert, &config.public_tls.key)
    {
        match tls_server_config(cert, key) {
            Ok(loaded) => {
                current.store(Arc::new(loaded));
                tracing::info!("public TLS certificate reloaded");
            }
            Err(e) => tracing::warn!(error = %e, "public TLS certificate not reloaded"),
        }
    }
}

fn load_keys(path: &Path) -> anyhow::Result<Keys> {
    KeyFile::load(path)
        .and_then(|file| Keys::new(&file))
        .map_err(anyhow::Error::msg)
}

/// How often the keys file is checked for changes.
const KEYS_POLL: Duration = Duration::from_secs(2);

/// Reads the keys file again whenever it changes (`crossfade keys` replaces
/// it), so a new or revoked key takes effect within seconds, without a
/// restart; an unreadable file leaves the keys in force.
fn watch_keys(path: PathBuf, proxy: Arc<Proxy>, shutdown: &Shutdown) {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen = modified(&path);
    let stop = shutdown.clone();
    shutdown.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(KEYS_POLL) => {}
                () = stop.triggered() => return,
            }
            let now = modified(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match load_keys(&path) {
                Ok(keys) => {
                    tracing::info!(keys = keys.len(), "API keys reloaded");
                    proxy.admission().set_keys(Some(keys));
                }
                Err(e) => tracing::warn!(error = %e, "API keys not reloaded"),
            }
        }
    });
}
