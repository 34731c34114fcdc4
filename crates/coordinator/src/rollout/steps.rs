//! The steps of a promotion and the steady state after it: what to start,
//! shift, drain and stop next, given what is known now.

use super::*;

/// How long a step's end waits for the health gate's verdict (the routers'
/// counts) before it pauses, undecided.
const JUDGE_BOUND_MS: u64 = 30_000;

impl Rollout {
    // === the steps ===

    /// Moving back to the old deployment.
    pub(super) fn is_backward(&self) -> bool {
        matches!(self.direction, Direction::Backward { .. })
    }

    /// Force roll forward: waiting for one ready candidate replica.
    pub(super) fn is_forced(&self) -> bool {
        self.direction == Direction::ForceForward
    }

    /// The deployment replicas are moving to.
    pub(super) fn new_deployment(&self) -> String {
        if self.is_backward() {
            self.from.clone()
        } else {
            self.to.clone()
        }
    }

    /// The deployment replicas are moving from.
    pub(super) fn old_deployment(&self) -> String {
        if self.is_backward() {
            self.to.clone()
        } else {
            self.from.clone()
        }
    }

    /// What a starting worker was asked to run (overhead replicas run the
    /// old deployment).
    pub(super) fn starting_deployment(&self) -> String {
        if self.status.is_terminal() {
            return self.serving();
        }
        if !self.overhead_done && !self.is_backward() {
            return self.from.clone();
        }
        self.new_deployment()
    }

    pub(super) fn count_routed(&self, deployment: &str) -> u32 {
        u32::try_from(self.routed.values().filter(|d| *d == deployment).count()).unwrap_or(u32::MAX)
    }

    /// Cleanup `KEEP` on the way to the candidate: an old replica that
    /// leaves the table drains and keeps running, warm (but not on a
    /// cordoned or unhealthy worker, which is freed).
    pub(super) fn keeps_after_drain(&self, worker: &str) -> bool {
        self.settings.cleanup == Cleanup::Keep
            && !self.is_backward()
            && !self.is_evicted(worker)
            && self
                .workers
                .get(worker)
                .and_then(|w| w.deployment.as_deref())
                == Some(self.from.as_str())
    }

    /// An engine of the old deployment on a worker no step uses (drained
    /// and kept warm by cleanup `KEEP`, or back from a host that hung): on
    /// the way to the candidate, it may be replaced when no worker is idle
    /// (an `Apply` replaces the engine).
    fn is_spare(&self, id: &str) -> bool {
        !self.is_backward()
            && !self.is_first()
            && self.workers.get(id).is_some_and(|w| {
                w.eligible
                    && !w.evict
                    && matches!(w.engine, Engine::Ready | Engine::Draining)
                    && w.deployment.as_deref() == Some(self.from.as_str())
            })
    }

    pub(super) fn is_idle(&self, id: &str) -> bool {
        (self.workers.get(id).is_some_and(|w| {
            w.eligible && !w.evict && matches!(w.engine, Engine::Idle | Engine::Failed)
        }) || self.is_spare(id))
            && !self.routed.contains_key(id)
            && !self.starting.contains(id)
            && !self.ready.contains(id)
            && !self.scaling.contains_key(id)
            && !self.leaving.contains_key(id)
            && !self.failed.contains(id)
    }

    /// Asks `worker` to start `deployment`.
    pub(super) fn start_on(&mut self, worker: String, deployment: String, out: &mut Vec<Action>) {
        self.starting.insert(worker.clone());
        self.note_apply(&worker);
        out.push(Action::Apply { worker, deployment });
    }

    /// Remembers `worker`'s view as it was when it was asked to start.
    pub(super) fn note_apply(&mut self, worker: &str) {
        if let Some(view) = self.workers.get(worker) {
            self.applied_over.insert(worker.to_owned(), view.clone());
        }
    }

    /// Idle workers, the free ones first, then those holding a kept
    /// engine.
    pub(super) fn idle_workers(&self) -> Vec<String> {
        let mut idle: Vec<String> = self
            .workers
            .keys()
            .filter(|id| self.is_idle(id))
            .cloned()
            .collect();
        idle.sort_by_key(|id| self.is_spare(id));
        idle
    }

    pub(super) fn push_table(&mut self, out: &mut Vec<Action>) {
        self.seq += 1;
        out.push(Action::PushTable {
            seq: self.seq,
            routes: self.routes(),
        });
    }

    /// Takes `worker` out of the table (if it is in) and retires it: after
    /// the acknowledgement it drains, then stops (or starts the new
    /// deployment, `then_start`).
    pub(super) fn retire(&mut self, worker: &str, then_start: bool, out: &mut Vec<Action>) {
        let routed = self.routed.remove(worker).is_some();
        if routed {
            self.push_table(out);
        }
        let keep_running = false;
        self.leaving.insert(
            worker.to_owned(),
            Retirement {
                // A worker that was never in a table needs no acknowledgement.
                stage: Leaving::AwaitAck(if routed { self.seq } else { 0 }),
                then_start,
                keep_running,
            },
        );
    }

    /// Takes every worker of `deployment` out of the table in one table,
    /// and retires them; `keep_running` leaves their engines warm.
    pub(super) fn take_out_deployment(
        &mut self,
        deployment: &str,
        keep_running: bool,
        out: &mut Vec<Action>,
    ) {
        let workers: Vec<String> = self
            .routed
            .iter()
            .filter(|(_, d)| *d == deployment)
            .map(|(w, _)| w.clone())
            .collect();
        if workers.is_empty() {
            return;
        }
        for worker in &workers {
            self.routed.remove(worker);
        }
        self.push_table(out);
        for worker in workers {
            self.leaving.insert(
                worker,
                Retirement {
                    stage: Leaving::AwaitAck(self.seq),
                    then_start: false,
                    keep_running,
                },
            );
        }
    }

    /// Moves things along as far as they go now.
    pub(super) fn advance(&mut self, out: &mut Vec<Action>) {
        // A bound: each pass either acts or stops.
        for _ in 0..64 {
            let before = (self.fingerprint(), out.len());
            self.observe(out);
            self.progress_retirements(out);
            if self.status.is_terminal() {
                self.progress_steady(out);
            } else {
                self.progress_step(out);
            }
            if (self.fingerprint(), out.len()) == before {
                return;
            }
        }
    }

    /// A cheap fingerprint of what `advance` may change.
    pub(super) fn fingerprint(
        &self,
    ) -> (
        Status,
        Phase,
        u32,
        u64,
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
        Direction,
    ) {
        (
            self.status,
            self.phase,
            self.step,
            self.seq,
            self.routed.len(),
            self.starting.len(),
            self.ready.len(),
            self.scaling.len(),
            self.leaving.len(),
            self.overhead_done,
            self.direction,
        )
    }

    pub(super) fn progress_retirements(&mut self, out: &mut Vec<Action>) {
        let acked = self.acked;
        self.leaving
            .retain(|_, r| !matches!(r.stage, Leaving::Unrouted(seq) if seq <= acked));
        let due: Vec<String> = self
            .leaving
            .iter()
            .filter(|(_, r)| matches!(r.stage, Leaving::AwaitAck(seq) if seq <= self.acked))
            .map(|(w, _)| w.clone())
            .collect();
        for worker in due {
            let never_routed = matches!(
                self.leaving.get(&worker),
                Some(Retirement {
                    stage: Leaving::AwaitAck(0),
                    ..
                })
            );
            let idle = self
                .workers
                .get(&worker)
                .is_some_and(|w| w.engine == Engine::Idle);
            if let Some(r) = self.leaving.get_mut(&worker) {
                if never_routed && !r.then_start {
                    // Nothing routes to it: stop it (a stop drains first).
                    r.stage = Leaving::Stopping;
                    if idle {
                        self.leaving.remove(&worker);
                    } else {
                        out.push(Action::Stop { worker });
                    }
                } else {
                    r.stage = Leaving::Draining;
                    out.push(Action::Drain { worker });
                }
            }
        }
    }

    /// After the end: keeps `target` healthy replicas of the serving
    /// deployment; a replica to evict is replaced before it drains.
    pub(super) fn progress_steady(&mut self, out: &mut Vec<Action>) {
        let serving = self.serving();
        if serving.is_empty() {
            return;
        }
        if !self.ready.is_empty() {
            for worker in std::mem::take(&mut self.ready) {
                self.routed.insert(worker, serving.clone());
            }
            self.push_table(out);
        }
        // An engine of the serving deployment that no step started (its
        // agent restarted it after a crash) is counted, not orphaned.
        for (id, engine) in self.strays_of(&serving) {
            if engine == Engine::Ready {
                self.routed.insert(id, serving.clone());
                self.push_table(out);
            } else {
                self.starting.insert(id);
            }
        }
        let routed: Vec<String> = self
            .routed
            .iter()
            .filter(|(_, d)| **d == serving)
            .map(|(w, _)| w.clone())
            .collect();
        let (leaving, staying): (Vec<String>, Vec<String>) =
            routed.into_iter().partition(|w| self.is_evicted(w));
        let target = self.target as usize;
        let serving_count = staying.len() + self.starting.len();
        if serving_count < target {
            let starts: Vec<String> = self
                .idle_workers()
                .into_iter()
                .take(target - serving_count)
                .collect();
            for worker in starts {
                self.start_on(worker, serving.clone(), out);
            }
        } else if self.starting.is_empty() && staying.len() > target {
            for worker in staying.iter().skip(target) {
                self.retire(worker, false, out);
            }
        }
        // Evicted replicas leave once their replacements serve (or when
        // no replacement can ever start, or none is wanted).
        let replaced = staying.len() >= target || self.idle_workers().is_empty();
        if replaced && self.starting.is_empty() {
            for worker in leaving {
                self.retire(&worker, false, out);
            }
        }
    }

    /// Its agent reports `worker` ready with `deployment`.
    pub(super) fn is_ready_with(&self, worker: &str, deployment: &str) -> bool {
        self.workers.get(worker).is_some_and(|w| {
            w.engine == Engine::Ready && w.deployment.as_deref() == Some(deployment)
        })
    }

    /// `worker`'s replica must move (cordoned, GPU unhealthy, no longer
    /// matching the selector).
    pub(super) fn is_evicted(&self, worker: &str) -> bool {
        self.workers.get(worker).is_some_and(|w| w.evict)
    }

    /// Warm engines of `deployment` no part of the rollout uses, on
    /// eligible workers: ready (a host back from a hang), or drained and
    /// still running (kept by an earlier promotion's `KEEP`).
    fn warm_of(&self, deployment: &str) -> Vec<String> {
        self.unused_of(deployment, &[Engine::Ready, Engine::Draining])
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Engines of `deployment`, starting or ready, on eligible workers
    /// that no part of the rollout uses: an engine its agent restarted, a
    /// host that came back.
    fn strays_of(&self, deployment: &str) -> Vec<(String, Engine)> {
        self.unused_of(deployment, &[Engine::Starting, Engine::Ready])
    }

    /// Engines of `deployment` in one of `states`, on eligible workers no
    /// part of the rollout uses.
    fn unused_of(&self, deployment: &str, states: &[Engine]) -> Vec<(String, Engine)> {
        self.workers
            .iter()
            .filter(|(id, w)| {
                w.deployment.as_deref() == Some(deployment)
                    && states.contains(&w.engine)
                    && w.eligible
                    && !w.evict
                    && !self.routed.contains_key(*id)
                    && !self.starting.contains(*id)
                    && !self.ready.contains(*id)
                    && !self.scaling.contains_key(*id)
                    && !self.leaving.contains_key(*id)
            })
            .map(|(id, w)| (id.clone(), w.engine))
            .collect()
    }

    pub(super) fn progress_step(&mut self, out: &mut Vec<Action>) {
        let new = self.new_deployment();
        let old = self.old_deployment();

        // Short of the target, a ready engine of the deployment the
        // promotion leaves (a host back from a hang, an engine its agent
        // restarted) serves again rather than being stopped.
        if !self.is_forced() && !self.is_first() {
            let routed = self.routed.len();
            let short = (self.target as usize).saturating_sub(routed);
            let back: Vec<String> = self
                .strays_of(&self.from)
                .into_iter()
                .filter(|(_, engine)| *engine == Engine::Ready)
                .map(|(id, _)| id)
                .take(short)
                .collect();
            if !back.is_empty() {
                for id in back {
                    self.routed.insert(id, self.from.clone());
                }
                self.push_table(out);
            }
        }

        // Force roll forward: as soon as a candidate replica is ready.
        if self.is_forced() {
            let ready: Vec<String> = self
                .ready
                .iter()
                .filter(|w| {
                    self.workers
                        .get(*w)
                        .is_some_and(|v| v.deployment.as_deref() == Some(self.to.as_str()))
                })
                .cloned()
                .collect();
            if self.count_routed(&self.to) > 0 || !ready.is_empty() {
                let added = !ready.is_empty();
                for worker in ready {
                    self.ready.remove(&worker);
                    self.routed.insert(worker, self.to.clone());
                }
                let seq = self.seq;
                let keep = self.settings.cleanup == Cleanup::Keep;
                self.take_out_deployment(&self.from.clone(), keep, out);
                if added && self.seq == seq {
                    // Nothing of the old deployment was left to take out.
                    self.push_table(out);
                }
                self.finish(Status::Succeeded, out);
                return;
            }
        }

        match self.phase {
            Phase::StartingReplicas => self.start_step(&new, &old, out),
            Phase::WaitingReady => {
                if self.starting.is_empty() && !self.leaving.values().any(|r| r.then_start) {
                    if self.ready.is_empty() {
                        // Every start failed or was lost: try again
                        // elsewhere, with no old replica out meanwhile (the
                        // overhead is best effort: go on without it).
                        self.overhead_done = true;
                        self.removes.clear();
                        self.phase = Phase::StartingReplicas;
                        return;
                    }
                    if self.pause.is_some() && self.overhead_done {
                        // Paused: the starts under way finish, but the
                        // split stays pinned until resume.
                        return;
                    }
                    if !self.overhead_done {
                        // The extra old replicas join the table.
                        for worker in std::mem::take(&mut self.ready) {
                            self.routed.insert(worker, self.from.clone());
                        }
                        self.overhead_done = true;
                        self.push_table(out);
                        self.phase = Phase::ShiftingTraffic;
                        return;
                    }
                    self.shift(&new, out);
                }
            }
            Phase::ShiftingTraffic => {
                if self.acked >= self.seq {
                    self.phase = Phase::Draining;
                }
            }
            Phase::Draining => {
                if !self
                    .leaving
                    .values()
                    .any(|r| matches!(r.stage, Leaving::AwaitAck(_) | Leaving::Draining))
                {
                    self.phase = Phase::Stopping;
                }
            }
            Phase::Stopping => {
                if self.leaving.is_empty() {
                    self.phase = Phase::Stabilizing;
                    self.stabilize_until = self
                        .now_ms
                        .saturating_add(u64::from(self.settings.stabilization_time_seconds) * 1000);
                }
            }
            Phase::Stabilizing => {
                if self.now_ms >= self.stabilize_until {
                    // The gate judges a candidate that takes traffic, on
                    // the way to it (not back, not forced there).
                    if self.direction == Direction::Forward && self.candidate_weight() > 0 {
                        self.phase = Phase::Judging;
                        self.judge_until = self.now_ms.saturating_add(JUDGE_BOUND_MS);
                        out.push(Action::JudgeHealth);
                    } else {
                        self.end_step(out);
                    }
                }
            }
            Phase::Judging => {
                if self.direction != Direction::Forward {
                    // Forced or turned back meanwhile: no verdict needed.
                    self.end_step(out);
                } else if self.pause.is_none() && self.now_ms >= self.judge_until {
                    self.pause(
                        format!(
                            "health gate undecided: no verdict within {} s",
                            JUDGE_BOUND_MS / 1000
                        ),
                        out,
                    );
                }
            }
        }
    }

    /// The step is over: the next one may start.
    pub(super) fn end_step(&mut self, out: &mut Vec<Action>) {
        self.phase = Phase::StartingReplicas;
        out.push(record(
            "step-done",
            format!(
                "step {}: {} % of traffic on {}",
                self.step,
                self.percent_to_candidate(),
                self.to
            ),
        ));
    }

    /// Plans and starts the next step, or ends the promotion.
    pub(super) fn start_step(&mut self, new: &str, old: &str, out: &mut Vec<Action>) {
        // Replicas of `new` on cordoned or unhealthy workers do not count:
        // they are replaced (the new replica first), then leave.
        let evicted_new: Vec<String> = self
            .routed
            .iter()
            .filter(|(w, d)| d.as_str() == new && self.is_evicted(w))
            .map(|(w, _)| w.clone())
            .collect();
        let new_routed = self
            .count_routed(new)
            .saturating_sub(u32::try_from(evicted_new.len()).unwrap_or(u32::MAX));
        let old_routed = self.count_routed(old);

        if !self.starting.is_empty() || !self.ready.is_empty() {
            // Replicas of a step under way: wait for them first.
            self.phase = Phase::WaitingReady;
            return;
        }
        if self.pause.is_some() {
            return;
        }
        // Overhead: extra old replicas where idle workers exist.
        if !self.overhead_done && !self.is_backward() {
            let wanted = self.settings.overhead(self.target) as usize;
            let idle = self.idle_workers();
            let chosen: Vec<String> = idle.into_iter().take(wanted).collect();
            if chosen.is_empty() {
                self.overhead_done = true;
            } else {
                out.push(record(
                    "overhead",
                    format!(
                        "starting {} extra replica(s) of {}",
                        chosen.len(),
                        self.from
                    ),
                ));
                for worker in chosen {
                    self.start_on(worker, self.from.clone(), out);
                }
                self.phase = Phase::WaitingReady;
                return;
            }
        }

        // Done: every old replica is gone and the target is met, or no
        // worker will ever free up to get closer to it.
        let stuck = self.idle_workers().is_empty() && self.leaving.is_empty();
        let serving_new = new_routed as usize + evicted_new.len();
        if old_routed == 0 && (new_routed >= self.target || (serving_new > 0 && stuck)) {
            if new_routed < self.target {
                out.push(record(
                    "short",
                    format!(
                        "{new_routed} of {} replicas: no more eligible workers",
                        self.target
                    ),
                ));
            }
            let end = match self.direction {
                Direction::Backward { end } => end,
                Direction::Forward | Direction::ForceForward => Status::Succeeded,
            };
            self.finish(end, out);
            return;
        }

        let k = self.settings.step_size(self.target);
        let adds = k.min(self.target.saturating_sub(new_routed));
        let idle = self.idle_workers();
        let (fresh, in_place): (Vec<String>, Vec<String>) = if adds == 0 {
            (Vec::new(), Vec::new())
        } else {
            // A cordoned or unhealthy worker is never updated in place: its
            // replica is replaced on another worker (below, it leaves first).
            let old_workers: Vec<String> = self
                .routed
                .iter()
                .filter(|(w, d)| d.as_str() == old && !self.is_evicted(w))
                .map(|(w, _)| w.clone())
                .collect();
            let adds = adds as usize;
            // One replica keeps serving while others update in place; the
            // last one goes only when nothing else can ever free up (no idle
            // worker, none on its way out): the design's "instead of waiting
            // forever", at the price of a gap the event history records.
            let keep = usize::from(new_routed == 0);
            let spare = if old_workers.len() > keep || !self.leaving.is_empty() {
                old_workers.len().saturating_sub(keep)
            } else {
                old_workers.len()
            };
            // Warm engines of `new` first (kept by an earlier promotion's
            // `KEEP`, or back from a host that hung): no reload. Then idle
            // workers, in every mode (Vast.ai's idle workers update first);
            // then old replicas in place, at most k at once (the capacity
            // floor). Surge mode updates in place only when no worker is
            // about to free up.
            let mut fresh: Vec<String> = self.warm_of(new).into_iter().take(adds).collect();
            let more = adds - fresh.len();
            fresh.extend(idle.iter().take(more).cloned());
            let waits_for_free = (self.settings.surge() || self.direction != Direction::Forward)
                && !self.leaving.is_empty();
            let short = if waits_for_free {
                0
            } else {
                adds - fresh.len()
            };
            let at_once = self.settings.in_place_size(self.target) as usize;
            let in_place = old_workers
                .into_iter()
                .take(short.min(spare).min(at_once))
                .collect();
            (fresh, in_place)
        };
        if fresh.is_empty() && in_place.is_empty() && adds > 0 {
            if !self.failed.is_empty() {
                // No other worker is left: those where a start failed (a
                // crash the world caused) are tried again rather than
                // waited past forever.
                out.push(record(
                    "retrying",
                    format!(
                        "no other eligible idle worker: trying again where a start failed ({})",
                        self.failed.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
                self.failed.clear();
                return;
            }
            let waiting = format!("waiting for an eligible idle worker to start {new}");
            if self.waiting != waiting {
                self.waiting = waiting.clone();
                out.push(record("waiting", waiting));
            }
            return;
        }
        self.waiting.clear();
        self.step += 1;
        // Old replicas that leave without replacement: as many as the fresh
        // ones (while that keeps the target), or every one left at the last
        // step.
        let last = new_routed + u32::try_from(fresh.len() + in_place.len()).unwrap_or(u32::MAX)
            >= self.target;
        let mut remaining_old: Vec<String> = self
            .routed
            .iter()
            .filter(|(w, d)| d.as_str() == old && !in_place.contains(w))
            .map(|(w, _)| w.clone())
            .chain(evicted_new)
            .collect();
        // Replicas on cordoned or unhealthy workers leave first.
        remaining_old.sort_by_key(|w| !self.is_evicted(w));
        // Not at the last step, the replicas after the step stay at the
        // target: an endpoint left short (a force roll forward, a lost
        // worker) gets its capacity back before old replicas leave.
        let after = serving_new + fresh.len() + old_routed as usize;
        let surplus = after.saturating_sub(self.target as usize);
        let removes: BTreeSet<String> = if last {
            remaining_old.into_iter().collect()
        } else {
            remaining_old
                .into_iter()
                .take(fresh.len().min(surplus))
                .collect()
        };
        let warm = fresh
            .iter()
            .filter(|w| {
                self.workers.get(*w).is_some_and(|v| {
                    v.deployment.as_deref() == Some(new)
                        && matches!(v.engine, Engine::Ready | Engine::Draining)
                })
            })
            .count();
        out.push(record(
            "step-started",
            format!(
                "step {}: {} new replica(s) of {new} on other workers ({warm} warm, no reload), {} updated in place, {} out",
                self.step,
                fresh.len(),
                in_place.len(),
                removes.len()
            ),
        ));
        let fresh_count = fresh.len();
        for worker in fresh {
            if self.is_ready_with(&worker, new) {
                // Warm and ready: no `Apply`.
                self.ready.insert(worker);
            } else {
                // Idle, or warm and drained: the agent takes an `Apply` of
                // the deployment it runs as an undrain (no reload).
                self.start_on(worker, new.to_owned(), out);
            }
        }
        if new_routed == 0 && !in_place.is_empty() && in_place.len() == old_routed as usize {
            out.push(record(
                "no-replica",
                format!("no idle worker: {old} is updated in place and the endpoint has no replica until {new} is ready"),
            ));
        }
        for worker in &in_place {
            self.retire(worker, true, out);
        }
        self.removes = removes;
        if fresh_count + in_place.len() == 0 {
            // Nothing to start: only old replicas leave.
            self.shift(new, out);
        } else {
            self.phase = Phase::WaitingReady;
        }
    }

    /// One table: the step's ready replicas in, its old ones out; every
    /// router must acknowledge it before those drain.
    fn shift(&mut self, new: &str, out: &mut Vec<Action>) {
        // The capacity floor holds whatever became of the step's starts (a
        // lost or failed one): no more old replicas leave than keeps the
        // routed ones at min(N, routed) − k; the next step takes the rest.
        let k = self.settings.in_place_size(self.target) as usize;
        let floor = (self.target as usize)
            .min(self.routed.len())
            .saturating_sub(k);
        for worker in std::mem::take(&mut self.ready) {
            self.routed.insert(worker, new.to_owned());
        }
        let removable = self.routed.len().saturating_sub(floor);
        let mut removes: Vec<String> = std::mem::take(&mut self.removes).into_iter().collect();
        // Replicas on cordoned or unhealthy workers leave first.
        removes.sort_by_key(|w| !self.is_evicted(w));
        removes.truncate(removable);
        for worker in &removes {
            self.routed.remove(worker);
        }
        self.push_table(out);
        for worker in removes {
            let keep_running = self.keeps_after_drain(&worker);
            self.leaving.insert(
                worker,
                Retirement {
                    stage: Leaving::AwaitAck(self.seq),
                    then_start: false,
                    keep_running,
                },
            );
        }
        self.phase = Phase::ShiftingTraffic;
        if self.status == Status::Releasing {
            self.status = Status::RampingUp;
        }
        if let Some(pause) = self.pause.as_mut()
            && pause.resume_to == Status::Releasing
        {
            pause.resume_to = Status::RampingUp;
        }
    }
}
