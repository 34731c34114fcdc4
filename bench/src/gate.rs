//! `crossfade-bench __gate PORT ENGINE_PORT`: the agent's gate alone, open,
//! on 127.0.0.1:PORT in front of an engine (the bench's backend) on
//! 127.0.0.1:ENGINE_PORT. `bench/profile-router.sh` counts what it adds to
//! a request (with a watcher of its news, as the agent's status reports
//! have); it runs until it is killed.

use std::sync::Arc;

use anyhow::Context as _;
use crossfade_agent::gate::Gate;
use crossfade_common::Shutdown;
use tokio::net::TcpListener;

pub fn main(args: &[String]) -> anyhow::Result<()> {
    let [listen, engine] = args else {
        anyhow::bail!("usage: crossfade-bench __gate PORT ENGINE_PORT");
    };
    let listen: u16 = listen.parse().context("PORT")?;
    let engine: u16 = engine.parse().context("ENGINE_PORT")?;
    // Worker threads as the agent's own runtime has them
    // (TOKIO_WORKER_THREADS, else one per core).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = Shutdown::new();
        // The agent's Prometheus recorder, as the agent installs it: what
        // the gate records per request is part of what it costs.
        let _metrics = crossfade_common::metrics::install(
            crossfade_agent::metrics::HISTOGRAMS,
            None,
            &shutdown,
        )
        .context("installing the Prometheus recorder")?;
        crossfade_agent::metrics::describe();
        let listener = TcpListener::bind(("127.0.0.1", listen))
            .await
            .with_context(|| format!("binding 127.0.0.1:{listen}"))?;
        let gate = Arc::new(Gate::new());
        gate.open(engine);
        // The agent's status reports watch the gate beside it: what that
        // watch costs a request is part of what the gate costs.
        let mut news = gate.news();
        let watched = shutdown.clone();
        shutdown.spawn(async move {
            loop {
                tokio::select! {
                    () = watched.triggered() => return,
                    changed = news.changed() => if changed.is_err() { return },
                }
            }
        });
        let options = crossfade_agent::config::Gate::default().serve_options();
        let handler = Arc::clone(&gate);
        crossfade_common::http::serve_with_close(
            listener,
            &options,
            shutdown,
            gate.close_signal(),
            move |req| Arc::clone(&handler).handle(req),
        )
        .await;
        Ok(())
    })
}
