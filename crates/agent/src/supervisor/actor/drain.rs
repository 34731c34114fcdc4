//! Drains, undrains and stops: the gate refuses new requests, those in
//! flight finish (or are cut at the deadline), then the engine stops.

use super::*;

impl Actor {
    /// Refuses new requests; `reply` hears once nothing is in flight, at
    /// `deadline` (open SSE streams then end with an error event), or at an
    /// `Undrain`.
    pub(super) fn drain(&mut self, deadline: Duration, reply: oneshot::Sender<Drained>) {
        let state = self.view.borrow().state;
        if !matches!(state, EngineState::Ready | EngineState::Draining) {
            // Nothing takes traffic; the gate already refuses it.
            let _ = reply.send(Drained {
                drained: true,
                still_in_flight: 0,
                waited: Duration::ZERO,
            });
            return;
        }
        self.gate.start_drain();
        self.set(|view| view.state = EngineState::Draining);
        let gate = Arc::clone(&self.gate);
        let mut undrained = self.undrained.subscribe();
        undrained.mark_unchanged();
        self.tasks.spawn(async move {
            let started = Instant::now();
            let until = tokio::time::Instant::now() + deadline;
            let (left, result) = tokio::select! {
                left = gate.wait_idle(until) => {
                    if left > 0 {
                        gate.cut_streams();
                    }
                    (left, if left == 0 { "drained" } else { "deadline" })
                }
                _ = undrained.changed() => (gate.state().in_flight, "undrained"),
            };
            let waited = started.elapsed();
            metrics::histogram!(m::DRAIN_SECONDS, "result" => result).record(waited.as_secs_f64());
            let _ = reply.send(Drained {
                drained: left == 0,
                still_in_flight: left,
                waited,
            });
        });
    }

    /// Drains before a stop, waiting here.
    pub(super) async fn drain_now(&mut self, deadline: Duration) -> Drained {
        let started = Instant::now();
        let state = self.view.borrow().state;
        if !matches!(state, EngineState::Ready | EngineState::Draining) {
            self.gate.close_for_start();
            return Drained {
                drained: true,
                still_in_flight: 0,
                waited: Duration::ZERO,
            };
        }
        self.gate.start_drain();
        self.set(|view| view.state = EngineState::Draining);
        let left = self
            .gate
            .wait_idle(tokio::time::Instant::now() + deadline)
            .await;
        if left > 0 {
            tracing::warn!(
                still_in_flight = left,
                ?deadline,
                "drain deadline passed; ending open streams"
            );
            self.gate.cut_streams();
            self.gate
                .wait_idle(tokio::time::Instant::now() + CUT_FLUSH)
                .await;
        }
        let waited = started.elapsed();
        metrics::histogram!(m::DRAIN_SECONDS, "result" => if left == 0 { "drained" } else { "deadline" })
            .record(waited.as_secs_f64());
        Drained {
            drained: left == 0,
            still_in_flight: left,
            waited,
        }
    }

    pub(super) fn undrain(&mut self) -> Result<(), SupervisorError> {
        let state = self.view.borrow().state;
        match state {
            EngineState::Ready => Ok(()),
            EngineState::Draining => {
                self.gate.open(self.settings.port);
                self.undrained.send_modify(|n| *n += 1);
                self.set(|view| view.state = EngineState::Ready);
                tracing::info!("undrained: taking requests again");
                Ok(())
            }
            other => Err(SupervisorError::Precondition(format!(
                "the engine is {}; only a draining engine can be undrained",
                other.as_str_name()
            ))),
        }
    }

    pub(super) async fn stop(&mut self, grace: Duration) -> Stopped {
        if self.current.is_none() {
            // Already stopped, or failed: nothing runs.
            return Stopped {
                still_in_flight: 0,
                exit_code: self.view.borrow().exit_code,
            };
        }
        let drained = self.drain_now(grace).await;
        let exit = self.stop_engine().await;
        self.current = None;
        self.set(|view| {
            view.state = EngineState::Stopped;
            view.exit_code = exit.and_then(|e| e.code);
            view.pid = 0;
            view.container.clear();
            view.starting_since = None;
        });
        Stopped {
            still_in_flight: drained.still_in_flight,
            exit_code: exit.and_then(|e| e.code),
        }
    }

    /// Stops the current engine: SIGTERM, then SIGKILL after
    /// `stop_timeout`. Forgets it in the state file.
    pub(super) async fn stop_engine(&mut self) -> Option<Exit> {
        self.gate.close_for_start();
        let current = self.current.as_mut()?;
        current.stop_probe();
        current.restart_at = None;
        let mut engine = current.engine.take()?;
        self.set(|view| view.state = EngineState::Stopping);
        engine.terminate();
        let exit = wait_exit(engine.as_mut(), self.settings.stop_timeout).await;
        let exit = match exit {
            Some(exit) => Some(exit),
            None => {
                tracing::warn!(
                    timeout = ?self.settings.stop_timeout,
                    "the engine did not stop after SIGTERM; killing it"
                );
                engine.kill();
                wait_exit(engine.as_mut(), Duration::from_secs(10)).await
            }
        };
        if let Err(e) = self.state_file.remove() {
            tracing::warn!(error = %e, "cannot remove the state file");
        }
        tracing::info!(exit = ?exit, "engine stopped");
        exit
    }
}

pub(super) async fn wait_exit(engine: &mut dyn Engine, timeout: Duration) -> Option<Exit> {
    let until = Instant::now() + timeout;
    loop {
        if let Some(exit) = engine.try_exit() {
            return Some(exit);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
