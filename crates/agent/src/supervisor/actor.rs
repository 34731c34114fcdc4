//! The supervisor's actor: it owns the engine, takes the supervisor's
//! commands and the engine's events one at a time, and keeps the status
//! view and the state file in step with what the engine does.

use super::spec::{masked_tail, secret_values};
use super::*;

pub(super) use self::swap::Swap;

mod drain;
mod swap;

/// The deployment being run.
pub(super) struct Current {
    spec: v1::EngineSpec,
    plan: LaunchPlan,
    /// `None` while a restart waits for its back-off.
    engine: Option<Box<dyn Engine>>,
    generation: u64,
    ready_deadline: Instant,
    probe: Option<JoinHandle<()>>,
    consecutive_crashes: u32,
    ready_since: Option<Instant>,
    restart_at: Option<Instant>,
    launched_at: Instant,
    /// Why the agent killed the engine to restart it, until it exits.
    killed_for: Option<String>,
}

impl Current {
    /// A deployment about to be launched (or adopted) now.
    fn new(settings: &config::Engine, spec: v1::EngineSpec, plan: LaunchPlan) -> Self {
        let now = Instant::now();
        Self {
            ready_deadline: now + ready_timeout(settings, &spec),
            spec,
            plan,
            engine: None,
            generation: 0,
            probe: None,
            consecutive_crashes: 0,
            ready_since: None,
            restart_at: None,
            launched_at: now,
            killed_for: None,
        }
    }

    fn stop_probe(&mut self) {
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
    }
}

pub(super) enum Event {
    Phase {
        generation: u64,
        phase: StartingPhase,
        detail: String,
    },
    Ready {
        generation: u64,
        max_model_len: Option<u64>,
    },
}

pub(super) struct Actor {
    pub(super) settings: config::Engine,
    pub(super) runtime: Arc<dyn Runtime>,
    pub(super) gate: Arc<Gate>,
    pub(super) view: watch::Sender<EngineView>,
    pub(super) client: EngineClient,
    pub(super) state_file: StateFile,
    pub(super) log_path: PathBuf,
    pub(super) current: Option<Current>,
    /// An `Apply` waiting for the running deployment to drain.
    pub(super) swap: Option<Swap>,
    pub(super) events: mpsc::UnboundedSender<Event>,
    pub(super) generation: u64,
    /// Bumped by `Undrain`: a drain in progress returns at once.
    pub(super) undrained: watch::Sender<u64>,
    /// Tracks the tasks it starts (probes, drain waits), so that shutdown
    /// waits for them.
    pub(super) tasks: Shutdown,
}

impl Actor {
    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
        shutdown: Shutdown,
    ) {
        let mut tick = tokio::time::interval(EXIT_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.triggered() => break,
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => break,
                },
                Some(event) = events.recv() => self.event(event),
                _ = tick.tick() => self.tick().await,
            }
        }
        if let Some(current) = &mut self.current {
            current.stop_probe();
            if current.engine.is_some() {
                tracing::info!(
                    pid = self.view.borrow().pid,
                    "the engine keeps running; a restarted agent adopts it"
                );
            }
        }
        self.gate.close_for_start();
    }

    /// Changes the published view; keeps `state_since` and the state gauge
    /// right.
    fn set(&self, change: impl FnOnce(&mut EngineView)) {
        self.view.send_modify(|view| {
            let before = view.state;
            change(view);
            if view.state != before {
                view.state_since = SystemTime::now();
                metrics::gauge!(m::ENGINE_STATE, "state" => state_name(before)).set(0.0);
            }
            metrics::gauge!(m::ENGINE_STATE, "state" => state_name(view.state)).set(1.0);
        });
    }

    pub(super) fn adopt(&mut self) {
        let record = match self.state_file.load() {
            Ok(Some(record)) => record,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the state file");
                return;
            }
        };
        let deployment = record.spec.deployment_id.clone();
        let engine = (record.runtime == self.runtime.kind())
            .then(|| self.runtime.adopt(&record.identity))
            .flatten();
        let Some(engine) = engine else {
            tracing::info!(
                pid = record.identity.pid,
                deployment,
                "the engine of the state file is gone"
            );
            if let Err(e) = self.state_file.remove() {
                tracing::warn!(error = %e, "cannot remove the state file");
            }
            return;
        };
        let plan = match plan(&self.settings, &record.spec, self.log_path.clone()) {
            Ok(plan) if record.port == self.settings.port => plan,
            Ok(_) => {
                tracing::warn!(
                    recorded = record.port,
                    configured = self.settings.port,
                    "the engine of the state file listens on another port than engine.port; not adopting it"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the deployment of the state file is not valid now; not adopting it");
                return;
            }
        };
        tracing::info!(
            pid = record.identity.pid,
            deployment,
            port = record.port,
            "adopting the engine an earlier agent started"
        );
        self.generation += 1;
        let generation = self.generation;
        let now = Instant::now();
        let mut current = Current::new(&self.settings, record.spec, plan);
        current.engine = Some(engine);
        current.generation = generation;
        self.current = Some(current);
        self.set(|view| {
            *view = EngineView {
                state: EngineState::Starting,
                deployment_id: deployment,
                phase: StartingPhase::HealthCheck,
                starting_since: Some(now),
                pid: record.identity.pid,
                container: record.identity.container.clone(),
                port: record.port,
                adopted: true,
                ..EngineView::default()
            };
        });
        self.spawn_probe(StartingPhase::HealthCheck);
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Apply {
                spec,
                drain_timeout,
                reply,
            } => self.apply(*spec, drain_timeout, reply).await,
            Command::Drain { deadline, reply } => self.drain(deadline, reply),
            Command::Undrain { reply } => {
                let refused = self.swap.as_ref().map(|swap| {
                    SupervisorError::Precondition(format!(
                        "the engine drains to make way for {}; Apply the running deployment again to keep it",
                        swap.spec.deployment_id
                    ))
                });
                let _ = reply.send(refused.map_or_else(|| self.undrain(), Err));
            }
            Command::Stop { grace, reply } => {
                if let Some(swap) = self.swap.take() {
                    let _ = swap.reply.send(Err(SupervisorError::Precondition(format!(
                        "a Stop came before {} was launched",
                        swap.spec.deployment_id
                    ))));
                }
                let stopped = self.stop(grace).await;
                let _ = reply.send(stopped);
            }
            Command::Restart { reason, reply } => {
                let _ = reply.send(self.restart(reason));
            }
        }
    }

    /// Kills a starting or serving engine; [`Self::crashed`] restarts it.
    fn restart(&mut self, reason: String) -> bool {
        let state = self.view.borrow().state;
        let Some(current) = &mut self.current else {
            return false;
        };
        let Some(engine) = &current.engine else {
            return false;
        };
        if !matches!(state, EngineState::Starting | EngineState::Ready) {
            return false;
        }
        tracing::warn!(deployment = %current.spec.deployment_id, %reason, "restarting the engine");
        // Its requests cannot be served any more: others go elsewhere now.
        self.gate.close_for_start();
        engine.kill();
        current.killed_for = Some(reason);
        true
    }

    /// Launches (or relaunches) the current deployment.
    fn launch(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        let Some(current) = &mut self.current else {
            return;
        };
        current.stop_probe();
        current.restart_at = None;
        current.generation = generation;
        let deployment_id = current.spec.deployment_id.clone();
        if let Some(dir) = current.plan.log_path.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot create the state directory");
        }
        let engine = match self.runtime.launch(&current.plan) {
            Ok(engine) => engine,
            Err(e) => {
                // Not a crash: the executable is missing or the log cannot
                // be written. Restarting would not help.
                tracing::error!(error = %e, deployment = %deployment_id, "cannot launch the engine");
                self.current = None;
                let reason = e.to_string();
                self.set(|view| {
                    view.state = EngineState::Failed;
                    view.deployment_id = deployment_id;
                    view.failure_reason = reason.clone();
                    view.last_error = reason;
                    view.starting_since = None;
                    view.pid = 0;
                    view.container.clear();
                });
                return;
            }
        };
        let identity = engine.identity();
        let now = Instant::now();
        let ready_timeout = ready_timeout(&self.settings, &current.spec);
        current.engine = Some(engine);
        current.ready_deadline = now + ready_timeout;
        current.launched_at = now;
        current.ready_since = None;
        let record = Record {
            identity: identity.clone(),
            port: self.settings.port,
            runtime: self.runtime.kind().to_owned(),
            spec: current.spec.clone(),
            launched_at_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        if let Err(e) = self.state_file.save(&record) {
            tracing::warn!(error = %e, "cannot write the state file; a restarted agent will not adopt this engine");
        }
        self.gate.close_for_start();
        let port = self.settings.port;
        self.set(|view| {
            view.state = EngineState::Starting;
            view.deployment_id = deployment_id;
            view.phase = StartingPhase::Launching;
            view.phase_detail.clear();
            view.starting_since = Some(now);
            view.pid = identity.pid;
            view.container.clone_from(&identity.container);
            view.port = port;
            view.adopted = false;
            view.failure_reason.clear();
            view.log_tail.clear();
        });
        tracing::info!(
            pid = identity.pid,
            container = identity.container,
            port,
            "engine launched"
        );
        self.spawn_probe(StartingPhase::Launching);
    }

    fn spawn_probe(&mut self, from: StartingPhase) {
        let Some(current) = &mut self.current else {
            return;
        };
        let vllm_args = current
            .spec
            .template
            .as_ref()
            .map_or("", |t| t.vllm_args.as_str());
        let client = self.client.for_vllm_args(vllm_args);
        let events = self.events.clone();
        let generation = current.generation;
        let port = self.settings.port;
        let name = current.spec.endpoint.clone();
        let interval = self.settings.probe_interval;
        current.probe = Some(self.tasks.spawn(async move {
            let mut phase = from;
            let mut detail = String::new();
            let mut max_model_len = None;
            loop {
                let mut entered = |reached: StartingPhase| {
                    let _ = events.send(Event::Phase {
                        generation,
                        phase: reached,
                        detail: String::new(),
                    });
                };
                let checked = probe::check(
                    &client,
                    port,
                    &name,
                    phase,
                    &mut entered,
                    &mut max_model_len,
                )
                .await;
                match checked {
                    Check::Ready => {
                        let _ = events.send(Event::Ready {
                            generation,
                            max_model_len,
                        });
                        return;
                    }
                    Check::Phase(now, said) => {
                        if now != phase || said != detail {
                            phase = now;
                            detail.clone_from(&said);
                            let _ = events.send(Event::Phase {
                                generation,
                                phase,
                                detail: said,
                            });
                        }
                    }
                }
                tokio::time::sleep(interval).await;
            }
        }));
    }

    fn event(&mut self, event: Event) {
        let Some(current) = &mut self.current else {
            return;
        };
        match event {
            Event::Phase {
                generation,
                phase,
                detail,
            } if generation == current.generation => {
                // While the runtime prepares (pulls the image), that is
                // where the start is, whatever the port says.
                let (phase, detail) = match current.engine.as_ref().and_then(|e| e.preparing()) {
                    Some(preparing) => (StartingPhase::Launching, preparing),
                    None => (phase, detail),
                };
                self.set(|view| {
                    if view.state == EngineState::Starting {
                        view.phase = phase;
                        view.phase_detail = detail;
                    }
                });
            }
            Event::Ready {
                generation,
                max_model_len,
            } if generation == current.generation => {
                current.probe = None;
                current.ready_since = Some(Instant::now());
                let took = current.launched_at.elapsed();
                let adopted = self.view.borrow().adopted;
                if !adopted {
                    metrics::histogram!(m::ENGINE_START_SECONDS).record(took.as_secs_f64());
                }
                self.gate.open(self.settings.port);
                tracing::info!(
                    deployment = %current.spec.deployment_id,
                    took = ?took,
                    adopted,
                    "engine ready"
                );
                // A container's pid is known once it runs.
                let pid = current.engine.as_ref().map_or(0, |e| e.identity().pid);
                self.set(|view| {
                    view.state = EngineState::Ready;
                    view.pid = pid;
                    view.max_model_len = max_model_len;
                    view.phase = StartingPhase::Unspecified;
                    view.phase_detail.clear();
                    view.starting_since = None;
                });
            }
            // From an engine since replaced.
            Event::Phase { .. } | Event::Ready { .. } => {}
        }
    }

    async fn tick(&mut self) {
        self.advance_swap().await;
        let Some(current) = &mut self.current else {
            return;
        };
        let now = Instant::now();
        if let Some(engine) = &mut current.engine {
            if let Some(exit) = engine.try_exit() {
                self.crashed(exit);
                return;
            }
            if let Some(preparing) = engine.preparing() {
                self.view.send_if_modified(|view| {
                    let news = view.state == EngineState::Starting
                        && (view.phase != StartingPhase::Launching
                            || view.phase_detail != preparing);
                    if news {
                        view.phase = StartingPhase::Launching;
                        view.phase_detail = preparing;
                    }
                    news
                });
            }
        } else if current.restart_at.is_some_and(|at| at <= now) {
            self.launch();
            return;
        }
        let state = self.view.borrow().state;
        if state == EngineState::Starting
            && current.engine.is_some()
            && now >= current.ready_deadline
        {
            let view = self.view.borrow().clone();
            let waited = current.ready_deadline - current.launched_at;
            let reason = format!(
                "not ready within {} (phase {}{})",
                humantime::format_duration(waited),
                view.phase.as_str_name(),
                if view.phase_detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", view.phase_detail)
                }
            );
            tracing::error!(deployment = %view.deployment_id, %reason, "giving up on the engine");
            let secrets = secret_values(&current.spec);
            let exit = self.stop_engine().await;
            let tail = masked_tail(&self.log_path, self.settings.log_tail_lines, &secrets);
            self.set(|view| {
                view.state = EngineState::Failed;
                view.failure_reason = reason.clone();
                view.last_error = reason;
                view.exit_code = exit.and_then(|e| e.code);
                view.log_tail = tail;
            });
        }
    }

    /// The engine exited without being asked to.
    fn crashed(&mut self, exit: Exit) {
        let Some(current) = &mut self.current else {
            return;
        };
        current.engine = None;
        current.stop_probe();
        self.gate.close_for_start();
        if self.view.borrow().state == EngineState::Draining {
            // It was on its way out: a restart would put it back in
            // service behind the coordinator's back.
            let error = format!("the engine exited ({exit}) while draining; not restarting it");
            tracing::warn!(deployment = %current.spec.deployment_id, "{error}");
            self.current = None;
            if let Err(e) = self.state_file.remove() {
                tracing::warn!(error = %e, "cannot remove the state file");
            }
            self.set(|view| {
                view.state = EngineState::Stopped;
                view.exit_code = exit.code;
                view.last_error = error;
                view.pid = 0;
                view.container.clear();
            });
            return;
        }
        metrics::counter!(m::ENGINE_RESTARTS_TOTAL).increment(1);
        if current
            .ready_since
            .is_some_and(|since| since.elapsed() >= self.settings.stable_after)
        {
            current.consecutive_crashes = 0;
        }
        current.consecutive_crashes += 1;
        let crashes = current.consecutive_crashes;
        let secrets = secret_values(&current.spec);
        let tail = masked_tail(&self.log_path, self.settings.log_tail_lines, &secrets);
        let last_line = tail.last().cloned().unwrap_or_default();
        let deployment = current.spec.deployment_id.clone();
        let line = if last_line.is_empty() {
            String::new()
        } else {
            format!(": {last_line}")
        };
        // What ended it: the agent's kill, or the engine itself.
        let killed_for = current.killed_for.take();
        let cause = match &killed_for {
            Some(reason) => format!("the agent restarted the engine: {reason}"),
            None => format!("the engine exited ({exit}){line}"),
        };
        if crashes > self.settings.max_restarts {
            let times = format!(
                "the engine ended {crashes} time{} in a row",
                if crashes == 1 { "" } else { "s" }
            );
            let reason = match &killed_for {
                Some(why) => format!("{times}, last killed by the agent: {why}"),
                None => format!("{times}, last with {exit}{line}"),
            };
            tracing::error!(deployment, %reason, "the engine is failed; not restarting it");
            self.current = None;
            if let Err(e) = self.state_file.remove() {
                tracing::warn!(error = %e, "cannot remove the state file");
            }
            self.set(|view| {
                view.state = EngineState::Failed;
                view.failure_reason = reason.clone();
                view.last_error = reason;
                view.exit_code = exit.code;
                view.log_tail = tail;
                view.pid = 0;
                view.container.clear();
                view.starting_since = None;
            });
            return;
        }
        let exponent = (crashes - 1).min(20);
        let backoff = self
            .settings
            .restart_backoff
            .saturating_mul(1 << exponent)
            .min(self.settings.restart_backoff_max);
        current.restart_at = Some(Instant::now() + backoff);
        let error = format!(
            "{cause}; restart {crashes} of {} in {}",
            self.settings.max_restarts,
            humantime::format_duration(backoff)
        );
        tracing::warn!(deployment, "{error}");
        self.set(|view| {
            view.state = EngineState::Starting;
            view.phase = StartingPhase::Launching;
            view.phase_detail.clear();
            view.starting_since = Some(Instant::now());
            view.exit_code = exit.code;
            view.restart_count += 1;
            view.last_error = error;
            view.pid = 0;
            view.container.clear();
            view.adopted = false;
        });
    }
}

/// The deployment's ready timeout, or the configured one.
fn ready_timeout(settings: &config::Engine, spec: &v1::EngineSpec) -> Duration {
    spec.ready_timeout
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(settings.ready_timeout)
}

fn state_name(state: EngineState) -> &'static str {
    match state {
        EngineState::Unspecified => "unspecified",
        EngineState::Stopped => "stopped",
        EngineState::Starting => "starting",
        EngineState::Ready => "ready",
        EngineState::Draining => "draining",
        EngineState::Stopping => "stopping",
        EngineState::Failed => "failed",
    }
}

/// Reads the engine's `/metrics` every `interval` while it takes traffic.
pub(super) async fn scrape_engine(
    client: EngineClient,
    view: watch::Receiver<EngineView>,
    scrape: watch::Sender<Option<Scrape>>,
    interval: Duration,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.triggered() => return,
            _ = tick.tick() => {}
        }
        let (state, port) = {
            let view = view.borrow();
            (view.state, view.port)
        };
        let read = if matches!(state, EngineState::Ready | EngineState::Draining) {
            match client.call(port, http::Method::GET, "/metrics", None).await {
                Ok((status, page)) if status.is_success() => {
                    probe::parse_load(&String::from_utf8_lossy(&page))
                }
                Ok((status, _)) => {
                    tracing::debug!(%status, "the engine's /metrics answered an error");
                    None
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the engine's /metrics");
                    None
                }
            }
        } else {
            None
        };
        if let Some(load) = read {
            metrics::gauge!(m::ENGINE_REQUESTS_RUNNING).set(f64::from(load.running));
            metrics::gauge!(m::ENGINE_REQUESTS_WAITING).set(f64::from(load.waiting));
        }
        let next = read.map(|load| Scrape {
            load,
            at: SystemTime::now(),
        });
        // Only a change of the counts (or of having them) is news.
        scrape.send_if_modified(|old| {
            let changed = old.map(|s| s.load) != next.map(|s| s.load);
            *old = next;
            changed
        });
    }
}
