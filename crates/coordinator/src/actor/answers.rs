//! Answers of calls to agents and routers, and the other internal events,
//! taken in the order they came.

use super::*;

/// Consecutive answers of one endpoint's drains and stops, for its rollout.
type Run = Option<(String, Vec<Event>)>;

impl Actor {
    /// A batch of answers, in order. A run of drains and stops answered for
    /// one endpoint goes to its rollout as one event ([`Event::Many`]): the
    /// rollout advances once after them all, not once per worker (a step
    /// of 500 replicas answers 500 drains at once).
    pub(super) fn answers_arrived(
        &mut self,
        batch: Vec<Internal>,
        actions: &mut Vec<(String, Action)>,
    ) {
        let mut run: Run = None;
        for event in batch {
            let (endpoint, event) = match event {
                Internal::Drained { endpoint, worker } => (endpoint, Event::Drained { worker }),
                Internal::Stopped {
                    endpoint,
                    worker,
                    failed,
                } => {
                    self.stop_answered(&worker, failed.as_deref());
                    // A stray's stop: no rollout waits for it.
                    let Some(endpoint) = endpoint else {
                        continue;
                    };
                    (endpoint, Event::Stopped { worker })
                }
                other => {
                    self.feed_run(run.take(), actions);
                    self.internal(other, actions);
                    continue;
                }
            };
            match &mut run {
                Some((name, events)) if *name == endpoint => events.push(event),
                _ => {
                    let before = run.replace((endpoint, vec![event]));
                    self.feed_run(before, actions);
                }
            }
        }
        self.feed_run(run, actions);
    }

    fn feed_run(&mut self, run: Run, actions: &mut Vec<(String, Action)>) {
        if let Some((name, events)) = run {
            self.feed(&name, Event::Many(events), actions);
        }
    }

    /// A stop returned (`failed`: why it did not).
    fn stop_answered(&mut self, worker: &str, failed: Option<&str>) {
        if let Some(error) = failed {
            // Lost, or gone: stopped as soon as it answers again.
            tracing::warn!(
                worker,
                error,
                "stop failed; the worker gets one when it answers"
            );
        }
        self.stopping.remove(worker);
        if let Some(record) = self.state.workers.get_mut(worker) {
            record.stop_pending = failed.is_some();
        }
    }

    /// One answer (or internal event) on its own.
    fn internal(&mut self, event: Internal, actions: &mut Vec<(String, Action)>) {
        match event {
            // Answers for a rollout go one way, alone or in a batch.
            Internal::Drained { .. } | Internal::Stopped { .. } => {
                self.answers_arrived(vec![event], actions);
            }
            Internal::ApplyFailed {
                endpoint,
                worker,
                deployment,
                error,
            } => {
                let why = format!("{worker} could not start {deployment}: {error}");
                self.start_failed(&endpoint, worker, deployment, "apply-failed", why, actions);
            }
            Internal::Stats {
                endpoint,
                promotion_id,
                by_deployment,
                routers,
            } => {
                let Some(e) = self.state.endpoints.get(&endpoint) else {
                    return;
                };
                let Some(promotion) = e.promotion.as_ref().filter(|p| p.id == promotion_id) else {
                    return;
                };
                let r = &promotion.rollout;
                let gate = crate::health::Gate {
                    margin_percent: r.settings.health_gate_margin_percent,
                    min_requests: r.settings.health_gate_min_requests,
                };
                let verdict = crate::health::judge(gate, &r.to, &r.from, &by_deployment, routers);
                tracing::debug!(endpoint, ?verdict, ?by_deployment, "health gate");
                self.feed(&endpoint, Event::Health(verdict), actions);
            }
            Internal::Demand { endpoint } => {
                tracing::debug!(endpoint, "requests held at a router: scaling from zero");
                self.demanded(endpoint, None, actions);
            }
            Internal::RouterEpoch { address, epoch } => {
                self.learn_epoch(epoch, &format!("router {address}"), actions);
            }
            Internal::RouterTable { address, table } => self.adopt(&address, &table, actions),
            Internal::RouterBehind { address } => {
                tracing::info!(
                    router = address,
                    "a router serves an older table; pushing the current one"
                );
                self.push_table_to(&address, self.state.table_version);
            }
            Internal::RouterAck { address, version } => {
                let router = self.routers.entry(address.clone()).or_default();
                match version {
                    Some(version) => {
                        router.reachable = true;
                        router.last_seen = Some(SystemTime::now());
                        if router.refused.as_ref().is_some_and(|(v, _)| *v <= version) {
                            router.refused = None;
                        }
                        if let Some(record) = self.state.routers.get_mut(&address) {
                            record.acknowledged_version = record.acknowledged_version.max(version);
                        }
                    }
                    None => router.reachable = false,
                }
                self.settle_acks(actions);
            }
            Internal::RouterRefused {
                address,
                version,
                reason,
            } => {
                tracing::warn!(
                    router = address,
                    version,
                    reason,
                    "a router refused the table"
                );
                let router = self.routers.entry(address.clone()).or_default();
                router.reachable = true;
                router.last_seen = Some(SystemTime::now());
                router.refused = Some((version, reason.clone()));
                // Told once to every endpoint whose change waits on it.
                let waiting: BTreeSet<String> =
                    self.pending.iter().map(|(_, e, _)| e.clone()).collect();
                for name in waiting {
                    if let Some(e) = self.state.endpoints.get_mut(&name) {
                        e.record(
                            now_ms(),
                            "router-refused",
                            format!("router {address} refused table version {version}: {reason}; waiting until it accepts one"),
                            "",
                        );
                    }
                }
            }
        }
    }
}
