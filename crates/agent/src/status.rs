//! `WorkerStatus`: what the agent reports, put together from the engine's
//! view, the gate's exact count, the engine's own counts and the GPUs; and
//! the revision that grows whenever any of them changes, which
//! `WatchStatus` follows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossfade_common::Shutdown;
use crossfade_proto::{Fence, v1};
use tokio::sync::watch;

use crate::gpu::{self, GpuProbe, HostGpus};
use crate::metrics as m;
use crate::supervisor::Supervisor;

/// Who this worker is.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// `worker_id`.
    pub worker_id: String,
    /// Labels for worker selectors.
    pub labels: BTreeMap<String, String>,
    /// The gate address routers dial.
    pub gate_address: String,
}

/// Puts statuses together; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reporter {
    identity: Arc<Identity>,
    supervisor: Supervisor,
    gpus: watch::Receiver<HostGpus>,
    fence: Arc<Fence>,
    revision: watch::Receiver<u64>,
}

impl Reporter {
    /// A reporter; starts the task that counts revisions.
    pub fn start(
        identity: Identity,
        supervisor: Supervisor,
        gpus: watch::Receiver<HostGpus>,
        fence: Arc<Fence>,
        shutdown: &Shutdown,
    ) -> Self {
        let (revision, revision_rx) = watch::channel(1);
        shutdown.spawn(count_revisions(
            supervisor.clone(),
            gpus.clone(),
            revision,
            shutdown.clone(),
        ));
        Self {
            identity: Arc::new(identity),
            supervisor,
            gpus,
            fence,
            revision: revision_rx,
        }
    }

    /// The supervisor it reports on.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Calls from older coordinators are refused.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Changes whenever the status does.
    pub fn revisions(&self) -> watch::Receiver<u64> {
        self.revision.clone()
    }

    /// The status now.
    pub fn status(&self) -> v1::WorkerStatus {
        let view = self.supervisor.view();
        let gate = self.supervisor.gate().state();
        let scrape = *self.supervisor.scrape().borrow();
        let gpus = self.gpus.borrow().clone();
        v1::WorkerStatus {
            worker_id: self.identity.worker_id.clone(),
            labels: self
                .identity
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            gate_address: self.identity.gate_address.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            engine: Some(view.to_proto()),
            in_flight: Some(v1::InFlight {
                gate: gate.in_flight,
                engine_running: scrape.map_or(0, |s| s.load.running),
                engine_waiting: scrape.map_or(0, |s| s.load.waiting),
                engine_scraped_at: scrape.map(|s| s.at.into()),
            }),
            gpus: gpus.to_proto(),
            gpu_health: v1::GpuHealth::from(gpus.health) as i32,
            gpu_probe: gpus.probe.into(),
            last_error: match (&view.last_error, &gpus.error) {
                (engine, _) if !engine.is_empty() => engine.clone(),
                (_, Some(gpu)) => gpu.clone(),
                _ => String::new(),
            },
            observed_at: Some(SystemTime::now().into()),
            revision: *self.revision.borrow(),
            coordinator_epoch: self.fence.current(),
        }
    }
}

/// Bumps the revision on every change of the engine, the gate's count, the
/// engine's counts or the GPUs.
async fn count_revisions(
    supervisor: Supervisor,
    mut gpus: watch::Receiver<HostGpus>,
    revision: watch::Sender<u64>,
    shutdown: Shutdown,
) {
    let mut view = supervisor.subscribe();
    // The gate's count at most once per COUNT_NEWS_GAP: a busy gate
    // changes it with every request.
    let mut gate = supervisor.gate().news();
    let mut scrape = supervisor.scrape();
    loop {
        let changed = tokio::select! {
            () = shutdown.triggered() => return,
            c = view.changed() => c,
            c = gate.changed() => c,
            c = scrape.changed() => c,
            c = gpus.changed() => c,
        };
        if changed.is_err() {
            return;
        }
        view.mark_unchanged();
        scrape.mark_unchanged();
        gpus.mark_unchanged();
        revision.send_modify(|r| *r += 1);
    }
}

/// Reads the GPUs every `interval` (NVML calls block: they run off the
/// async threads) and publishes them when they change.
pub fn monitor_gpus(
    probe: Arc<dyn GpuProbe>,
    interval: Duration,
    shutdown: &Shutdown,
) -> watch::Receiver<HostGpus> {
    let first = gpu::assess(probe.as_ref(), SystemTime::now());
    if let Some(error) = &first.error {
        tracing::warn!(probe = first.probe, %error, "GPU health is unknown");
    }
    record_gpu_metrics(&first);
    let (sender, receiver) = watch::channel(first);
    let stop = shutdown.clone();
    shutdown.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.triggered() => return,
                _ = tick.tick() => {}
            }
            let probe = Arc::clone(&probe);
            let read =
                tokio::task::spawn_blocking(move || gpu::assess(probe.as_ref(), SystemTime::now()))
                    .await;
            match read {
                Ok(host) => {
                    record_gpu_metrics(&host);
                    sender.send_if_modified(|old| {
                        let changed = *old != host;
                        *old = host;
                        changed
                    });
                }
                Err(e) => tracing::warn!(error = %e, "the GPU probe panicked"),
            }
        }
    });
    receiver
}

fn record_gpu_metrics(host: &HostGpus) {
    for (reading, health, _) in &host.gpus {
        let gpu = reading.index.to_string();
        metrics::gauge!(m::GPU_MEMORY_USED_BYTES, "gpu" => gpu.clone())
            .set(reading.memory_used_bytes as f64);
        metrics::gauge!(m::GPU_MEMORY_TOTAL_BYTES, "gpu" => gpu.clone())
            .set(reading.memory_total_bytes as f64);
        metrics::gauge!(m::GPU_UTILIZATION_RATIO, "gpu" => gpu.clone())
            .set(f64::from(reading.utilization_percent) / 100.0);
        metrics::gauge!(m::GPU_TEMPERATURE_CELSIUS, "gpu" => gpu.clone())
            .set(f64::from(reading.temperature_celsius));
        metrics::gauge!(m::GPU_POWER_WATTS, "gpu" => gpu.clone())
            .set(f64::from(reading.power_milliwatts) / 1000.0);
        metrics::gauge!(m::GPU_HEALTH, "gpu" => gpu)
            .set(f64::from(v1::GpuHealth::from(*health) as i32));
    }
}
