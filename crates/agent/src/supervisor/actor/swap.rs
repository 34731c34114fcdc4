//! `Apply` of another deployment: the running one drains while the actor
//! goes on (statuses, crashes, other commands), then stops, and the next
//! one launches.

use super::*;

/// An `Apply` of another deployment, waiting for the running one to drain
/// (the actor goes on meanwhile: statuses, crashes, other commands).
pub(in crate::supervisor) struct Swap {
    pub(super) spec: v1::EngineSpec,
    pub(super) plan: LaunchPlan,
    pub(super) started: Instant,
    /// The drain's deadline: open streams are cut then.
    pub(super) deadline: Instant,
    /// When open streams were cut, for their final events to leave.
    pub(super) cut: Option<Instant>,
    pub(super) reply: oneshot::Sender<Result<Applied, SupervisorError>>,
}

impl Actor {
    /// Runs `spec`; the answer goes to `reply` once it is launched. Another
    /// deployment running is drained first, without holding up the actor:
    /// [`Self::advance_swap`] launches `spec` once it is drained.
    pub(super) async fn apply(
        &mut self,
        spec: v1::EngineSpec,
        drain_timeout: Duration,
        reply: oneshot::Sender<Result<Applied, SupervisorError>>,
    ) {
        let plan = match plan(&self.settings, &spec, self.log_path.clone()) {
            Ok(plan) => plan,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let state = self.view.borrow().state;
        let already = Ok(Applied {
            already_applied: true,
        });
        if let Some(swap) = &mut self.swap {
            if swap.spec.deployment_id == spec.deployment_id {
                let _ = reply.send(already);
                return;
            }
            // Another deployment instead: this Apply takes the swap's place.
            let superseded = std::mem::replace(&mut swap.reply, reply);
            let _ = superseded.send(Err(SupervisorError::Precondition(format!(
                "Apply of {} came before {} was launched",
                spec.deployment_id, swap.spec.deployment_id
            ))));
            swap.spec = spec;
            swap.plan = plan;
            // The running one again: it stays.
            if self
                .current
                .as_ref()
                .is_some_and(|c| c.spec.deployment_id == swap.spec.deployment_id)
                && let Some(swap) = self.swap.take()
            {
                let _ = swap.reply.send(self.undrain().map(|()| Applied {
                    already_applied: true,
                }));
            }
            return;
        }
        if let Some(current) = &self.current
            && current.spec.deployment_id == spec.deployment_id
            && matches!(
                state,
                EngineState::Starting | EngineState::Ready | EngineState::Draining
            )
        {
            if state == EngineState::Draining
                && let Err(e) = self.undrain()
            {
                let _ = reply.send(Err(e));
                return;
            }
            let _ = reply.send(already);
            return;
        }
        if self.current.is_some() {
            tracing::info!(
                from = %self.view.borrow().deployment_id,
                to = %spec.deployment_id,
                "swapping deployments: draining the running one"
            );
            if matches!(state, EngineState::Ready | EngineState::Draining) {
                self.gate.start_drain();
                self.set(|view| view.state = EngineState::Draining);
            } else {
                self.gate.close_for_start();
            }
            let now = Instant::now();
            self.swap = Some(Swap {
                spec,
                plan,
                started: now,
                deadline: now + drain_timeout,
                cut: None,
                reply,
            });
            self.advance_swap().await;
            return;
        }
        self.launch_new(spec, plan);
        let _ = reply.send(Ok(Applied {
            already_applied: false,
        }));
    }

    /// Goes on with a swap: once nothing is in flight (or the drain's
    /// deadline has cut open streams and their last events have left, or
    /// the engine has ended), stops the running engine and launches the
    /// next deployment.
    pub(super) async fn advance_swap(&mut self) {
        let Some(swap) = &mut self.swap else {
            return;
        };
        let now = Instant::now();
        let runs = self.current.as_ref().is_some_and(|c| c.engine.is_some());
        let left = self.gate.state().in_flight;
        if runs && left > 0 {
            match swap.cut {
                None if now >= swap.deadline => {
                    tracing::warn!(
                        still_in_flight = left,
                        "drain deadline passed; ending open streams"
                    );
                    self.gate.cut_streams();
                    swap.cut = Some(now);
                    return;
                }
                Some(at) if now >= at + CUT_FLUSH => {}
                _ => return,
            }
        }
        let Some(swap) = self.swap.take() else {
            return;
        };
        let result = if swap.cut.is_some() {
            "deadline"
        } else {
            "drained"
        };
        metrics::histogram!(m::DRAIN_SECONDS, "result" => result)
            .record(swap.started.elapsed().as_secs_f64());
        self.stop_engine().await;
        self.launch_new(swap.spec, swap.plan);
        let _ = swap.reply.send(Ok(Applied {
            already_applied: false,
        }));
    }

    /// Launches `spec`, a deployment new to this engine slot.
    pub(super) fn launch_new(&mut self, spec: v1::EngineSpec, plan: LaunchPlan) {
        tracing::info!(deployment = %spec.deployment_id, plan = ?plan, "launching the engine");
        self.current = Some(Current::new(&self.settings, spec, plan));
        self.set(|view| {
            *view = EngineView {
                restart_count: 0,
                ..EngineView::default()
            };
        });
        self.launch();
    }
}
