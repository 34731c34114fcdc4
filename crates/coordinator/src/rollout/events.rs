//! How the rollout takes each event: an agent's report, a drain or stop
//! that ended, the operator's commands, the health gate's verdict.

use super::*;

impl Rollout {
    // === events ===

    /// An agent's report only updates what is known of its worker: each
    /// pass of [`Rollout::observe`] then compares every worker the rollout
    /// uses with what its agent reports now (level-triggered: a lost, late
    /// or repeated report, or a restart, cannot leave a belief unchecked).
    pub(super) fn on_worker(&mut self, id: String, worker: Worker) {
        self.workers.insert(id, worker);
    }

    /// Compares every worker in the table, starting or ready with what its
    /// agent reports now, and corrects the plan where they differ.
    pub(super) fn observe(&mut self, out: &mut Vec<Action>) {
        let (starting, ready, scaling) = (&self.starting, &self.ready, &self.scaling);
        self.applied_over.retain(|id, _| {
            starting.contains(id) || ready.contains(id) || scaling.contains_key(id)
        });
        for id in self.claimed() {
            let Some(worker) = self.workers.get(&id).cloned() else {
                continue;
            };
            self.observe_one(&id, &worker, out);
        }
    }

    fn observe_one(&mut self, id: &str, worker: &Worker, out: &mut Vec<Action>) {
        if worker.engine == Engine::Unknown {
            let held = self.routed.contains_key(id)
                || self.starting.contains(id)
                || self.ready.contains(id)
                || self.scaling.contains_key(id)
                || self
                    .leaving
                    .get(id)
                    .is_some_and(|r| !matches!(r.stage, Leaving::Unrouted(_)));
            if held {
                self.on_lost(id, out);
            }
            return;
        }
        // A routed worker that stopped being ready leaves the table now.
        if let Some(deployment) = self.routed.get(id).cloned()
            && !self.is_ready_with(id, &deployment)
            && !self.leaving.contains_key(id)
        {
            self.routed.remove(id);
            self.removes.remove(id);
            out.push(record(
                "replica-lost",
                format!("{id} ({deployment}) is no longer ready; out of the table"),
            ));
            self.push_table(out);
            self.unroute(id);
        }
        // A start whose agent has reported nothing since the `Apply`: a
        // failure (or a foreign engine) in that view is an earlier engine's,
        // not this start's. A view already ready with the deployment is
        // read as it is (an `Apply` of what runs changes nothing to report).
        match self.applied_over.get(id) {
            Some(before)
                if before == worker
                    && (worker.engine == Engine::Failed || self.is_foreign(worker)) =>
            {
                return;
            }
            Some(before) if before != worker => {
                self.applied_over.remove(id);
            }
            _ => {}
        }
        if let Some(deployment) = self.scaling.get(id).cloned() {
            self.observe_scaling(id, worker, &deployment, out);
        }
        if !(self.starting.contains(id) || self.ready.contains(id)) {
            return;
        }
        // A replica started for this step, as its agent reports it now: a
        // ready one may crash again before the step routes it. Anything
        // else (a status sent before the agent took the `Apply`) changes
        // nothing yet.
        let expected = self.starting_deployment();
        let with_expected = worker.deployment.as_deref() == Some(expected.as_str());
        match worker.engine {
            Engine::Ready if with_expected => {
                self.starting.remove(id);
                self.ready.insert(id.to_owned());
            }
            Engine::Starting if with_expected => {
                self.ready.remove(id);
                self.starting.insert(id.to_owned());
            }
            // A deployment foreign to this promotion runs there (the agent
            // took another caller's `Apply`): a start that will not come,
            // retried elsewhere. The engine is not this step's to stop; the
            // shell stops engines no deployment owns. (The old deployment
            // there is a report from before the `Apply`: an in-place worker
            // still draining.)
            Engine::Starting | Engine::Ready if self.is_foreign(worker) => {
                self.start_lost(id, worker, &expected, out);
            }
            // A report older than the `Apply` may still show an earlier
            // engine's failure: only the expected deployment's counts.
            Engine::Failed if with_expected => {
                self.starting.remove(id);
                self.ready.remove(id);
                self.failed.insert(id.to_owned());
                // Free its GPUs.
                self.retire(id, false, out);
                let candidate = worker.deployment.as_deref() == Some(self.to.as_str());
                if candidate && !self.status.is_terminal() && !self.is_backward() {
                    self.fail(format!("candidate replica on {id} failed"), out);
                } else if !candidate {
                    out.push(record(
                        "replica-failed",
                        format!("{id} failed to start {expected}"),
                    ));
                }
            }
            _ => {}
        }
    }

    /// `id` runs `worker`'s foreign deployment instead of `expected`: its
    /// start will not come, and one starts elsewhere. The worker is not
    /// barred: once that engine is stopped, it is idle again.
    fn start_lost(&mut self, id: &str, worker: &Worker, expected: &str, out: &mut Vec<Action>) {
        self.starting.remove(id);
        self.ready.remove(id);
        self.scaling.remove(id);
        out.push(record(
            "start-lost",
            format!(
                "{id} runs {} instead of {expected}: that start will not come",
                worker.deployment.as_deref().unwrap_or_default()
            ),
        ));
    }

    /// `worker` runs a deployment that is neither side of this promotion.
    fn is_foreign(&self, worker: &Worker) -> bool {
        worker
            .deployment
            .as_deref()
            .is_some_and(|d| d != self.from && d != self.to)
    }

    /// A replica autoscaling added: in the table as soon as it is ready.
    fn observe_scaling(
        &mut self,
        id: &str,
        worker: &Worker,
        deployment: &str,
        out: &mut Vec<Action>,
    ) {
        let with_it = worker.deployment.as_deref() == Some(deployment);
        match worker.engine {
            Engine::Ready if with_it => {
                self.scaling.remove(id);
                self.routed.insert(id.to_owned(), deployment.to_owned());
                self.push_table(out);
            }
            Engine::Failed if with_it => {
                self.scaling.remove(id);
                self.failed.insert(id.to_owned());
                self.retire(id, false, out);
                out.push(record(
                    "replica-failed",
                    format!("{id} failed to start {deployment}"),
                ));
            }
            // As for a step's start: only a deployment foreign to this
            // promotion is a lost start (the old one there is a report from
            // before the `Apply`).
            Engine::Starting | Engine::Ready if self.is_foreign(worker) => {
                self.start_lost(id, worker, deployment, out);
            }
            _ => {}
        }
    }

    /// Stops the replicas autoscaling started for `deployment` that are
    /// not ready yet (a promotion that turns back or ends).
    pub(super) fn drop_scaling(&mut self, deployment: &str, out: &mut Vec<Action>) {
        let dropped: Vec<String> = self
            .scaling
            .iter()
            .filter(|(_, d)| *d == deployment)
            .map(|(w, _)| w.clone())
            .collect();
        for worker in dropped {
            self.scaling.remove(&worker);
            self.retire(&worker, false, out);
        }
    }

    /// A lost worker leaves the table at once and is never drained through
    /// (a call to it would only wait out its deadline); its replica is
    /// replaced by the step or by the steady state, and the shell stops its
    /// engine when it answers again. A start on it is not a failed
    /// candidate: the step starts one elsewhere.
    pub(super) fn on_lost(&mut self, id: &str, out: &mut Vec<Action>) {
        let was_routed = if let Some(deployment) = self.routed.remove(id) {
            out.push(record(
                "replica-lost",
                format!("{id} ({deployment}) is not answering; out of the table"),
            ));
            self.push_table(out);
            true
        } else {
            false
        };
        self.removes.remove(id);
        let started =
            self.starting.remove(id) | self.ready.remove(id) | self.scaling.remove(id).is_some();
        let retirement = self.leaving.remove(id);
        // Still held until the routers forget it, whatever its step was.
        let unacked = retirement.and_then(|r| match r.stage {
            Leaving::AwaitAck(seq) | Leaving::Unrouted(seq) if seq > self.acked => Some(seq),
            _ => None,
        });
        if was_routed {
            self.unroute(id);
        } else if let Some(seq) = unacked {
            self.leaving
                .insert(id.to_owned(), Retirement::unrouted(seq));
        }
        if started || retirement.is_some() {
            out.push(record(
                "worker-lost",
                format!("{id} is not answering; its part in this step moves elsewhere"),
            ));
        }
    }

    /// `id` just left the table on its own: held until the routers
    /// acknowledge that, then released as it is.
    fn unroute(&mut self, id: &str) {
        self.leaving
            .insert(id.to_owned(), Retirement::unrouted(self.seq));
    }

    pub(super) fn on_drained(&mut self, worker: &str, out: &mut Vec<Action>) {
        let Some(retirement) = self.leaving.get(worker).copied() else {
            return;
        };
        if retirement.stage != Leaving::Draining {
            return;
        }
        // A worker cordoned while it drained for an in-place update is
        // not given the candidate: it stops, and the step starts elsewhere.
        if retirement.then_start && !self.status.is_terminal() && !self.is_evicted(worker) {
            self.leaving.remove(worker);
            let deployment = self.new_deployment();
            self.start_on(worker.to_owned(), deployment, out);
        } else if retirement.keep_running {
            self.leaving.remove(worker);
        } else {
            self.leaving.insert(
                worker.to_owned(),
                Retirement {
                    stage: Leaving::Stopping,
                    ..retirement
                },
            );
            out.push(Action::Stop {
                worker: worker.to_owned(),
            });
        }
    }

    pub(super) fn on_command(&mut self, command: Command, out: &mut Vec<Action>) {
        if self.status.is_terminal() {
            return;
        }
        match command {
            Command::Pause => {
                if self.pause.is_none() {
                    self.pause("paused by the operator".into(), out);
                }
            }
            Command::Resume => {
                if let Some(pause) = self.pause.take() {
                    self.status = pause.resume_to;
                    self.reason = pause.reason_before;
                    out.push(record("resumed", "promotion resumed".into()));
                    if self.phase == Phase::Judging {
                        // The operator's resume is the verdict the gate
                        // could not give.
                        self.end_step(out);
                    }
                }
            }
            Command::Cancel if self.is_first() => {
                out.push(record(
                    "canceled",
                    "the endpoint's first deployment: nothing to ramp back to".into(),
                ));
                self.end_now(Status::Canceled, out);
            }
            Command::Cancel => {
                if !self.is_backward() {
                    out.push(record("canceled", "ramping traffic back down".into()));
                    self.turn_back(Status::Canceled, out);
                }
            }
            Command::ForceCancel => self.force_cancel(out),
            Command::ForceRollForward => {
                out.push(record(
                    "force-roll-forward",
                    "all traffic to the candidate as soon as a replica is ready".into(),
                ));
                if self.is_backward() {
                    // From RAMPING_DOWN: forward again.
                    self.abandon_step(out);
                }
                self.direction = Direction::ForceForward;
                self.pause = None;
                self.status = Status::RampingUp;
            }
        }
    }

    pub(super) fn pause(&mut self, reason: String, out: &mut Vec<Action>) {
        self.pause = Some(Pause {
            resume_to: self.status,
            reason_before: std::mem::replace(&mut self.reason, reason),
        });
        self.status = Status::Paused;
        out.push(record("paused", self.reason.clone()));
    }

    /// Moves back to `from`, step by step; `end` once there.
    pub(super) fn turn_back(&mut self, end: Status, out: &mut Vec<Action>) {
        // Old replicas on their way out of a table and not yet stopped
        // serve again: one draining is told to stop draining (no reload),
        // one whose drain has not begun is still ready. The steps route
        // them again as soon as they report ready. Chosen before the step
        // is abandoned: a worker whose start is abandoned was never routed,
        // and what its view says of the old deployment predates its
        // `Apply`.
        let back: Vec<(String, Leaving)> = self
            .leaving
            .iter()
            .filter(|(_, r)| {
                matches!(r.stage, Leaving::AwaitAck(seq) if seq > 0) || r.stage == Leaving::Draining
            })
            .filter(|(id, _)| {
                self.workers.get(*id).and_then(|w| w.deployment.as_deref())
                    == Some(self.from.as_str())
            })
            .map(|(id, r)| (id.clone(), r.stage))
            .collect();
        self.abandon_step(out);
        for (worker, stage) in back {
            // Held until the routers have acknowledged the table it left.
            self.leaving
                .insert(worker.clone(), Retirement::unrouted(self.seq));
            if stage == Leaving::Draining {
                out.push(Action::Undrain { worker });
            }
        }
        // Workers where the candidate failed can run the old deployment.
        self.failed.clear();
        self.drop_scaling(&self.to.clone(), out);
        self.direction = Direction::Backward { end };
        self.pause = None;
        self.status = Status::RampingDown;
    }

    /// Drops the current step's plan: replicas started for it and not yet
    /// in the table are stopped.
    pub(super) fn abandon_step(&mut self, out: &mut Vec<Action>) {
        let unrouted: Vec<String> = self.starting.iter().chain(&self.ready).cloned().collect();
        self.starting.clear();
        self.ready.clear();
        self.removes.clear();
        for worker in unrouted {
            self.retire(&worker, false, out);
        }
        // Workers taken out to be updated in place just stop: the next
        // steps start what they need on idle workers.
        for retirement in self.leaving.values_mut() {
            retirement.then_start = false;
        }
        self.phase = Phase::StartingReplicas;
    }

    pub(super) fn force_cancel(&mut self, out: &mut Vec<Action>) {
        let old_ready = self.routed.values().any(|d| *d == self.from);
        if !old_ready && !self.is_first() {
            // Nothing of the old deployment serves: it has to start first.
            out.push(record(
                "force-cancel",
                "no old replica is serving: ramping back down".into(),
            ));
            self.turn_back(Status::Canceled, out);
            return;
        }
        out.push(record(
            "force-cancel",
            "all traffic to the old deployment now".into(),
        ));
        self.end_now(Status::Canceled, out);
    }

    /// The endpoint's first promotion: there is no old deployment.
    pub(super) fn is_first(&self) -> bool {
        self.from.is_empty()
    }

    /// Ends now: the step's replicas and the candidate's stop, the traffic
    /// is the old deployment's (none, for a first deployment).
    pub(super) fn end_now(&mut self, status: Status, out: &mut Vec<Action>) {
        self.abandon_step(out);
        self.drop_scaling(&self.to.clone(), out);
        self.take_out_deployment(&self.to.clone(), false, out);
        self.finish(status, out);
    }

    pub(super) fn fail(&mut self, reason: String, out: &mut Vec<Action>) {
        out.push(record("failed", reason.clone()));
        self.reason = reason;
        if self.is_first() || self.routed.values().any(|d| *d == self.from) {
            self.end_now(Status::Failed, out);
        } else {
            // No old replica is left to take the traffic: bring them back.
            self.turn_back(Status::Failed, out);
        }
    }

    pub(super) fn finish(&mut self, status: Status, out: &mut Vec<Action>) {
        self.status = status;
        self.pause = None;
        self.removes.clear();
        // A worker where the candidate failed may host the deployment that
        // serves now (scaling), and the next promotion's candidate.
        self.failed.clear();
        // Replicas started for a step that will not come stop, but the
        // candidate's own once it has succeeded: those still loading finish
        // (a force roll forward) and join the table as they are ready.
        let keep = |w: &Worker| {
            status == Status::Succeeded && w.deployment.as_deref() == Some(self.to.as_str())
        };
        let unrouted: Vec<String> = self
            .starting
            .iter()
            .chain(&self.ready)
            .filter(|id| !self.workers.get(*id).is_some_and(keep))
            .cloned()
            .collect();
        for worker in unrouted {
            self.starting.remove(&worker);
            self.ready.remove(&worker);
            self.retire(&worker, false, out);
        }
        // Autoscaling's replicas of the deployment that serves now carry on
        // starting (the steady state counts them); the others stop.
        let serving = self.serving();
        for (worker, deployment) in std::mem::take(&mut self.scaling) {
            if deployment == serving {
                self.starting.insert(worker);
            } else {
                self.retire(&worker, false, out);
            }
        }
        out.push(record(
            match status {
                Status::Succeeded => "succeeded",
                Status::Failed => "ended-failed",
                _ => "ended-canceled",
            },
            format!(
                "{} % of traffic on {}",
                self.percent_to_candidate(),
                self.to
            ),
        ));
    }
}
