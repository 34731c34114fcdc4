//! How each worker looks to each endpoint, from what its agent reports.

use super::*;

impl Actor {
    /// Workers changed: `changed` (a batch of statuses), or every one
    /// (`None`: a cordon, the end of the start's grace). Every rollout
    /// hears, in one event, how each of those looks to its endpoint now,
    /// and so does it of every worker whose claim moved since the last
    /// refresh; it keeps only the workers that matter to it (eligible, its
    /// own, or running its deployments). The work is in proportion to the
    /// workers that changed times the endpoints, not to the fleet times the
    /// endpoints.
    pub(super) fn refresh_workers(
        &mut self,
        changed: Option<&BTreeSet<String>>,
        actions: &mut Vec<(String, Action)>,
    ) {
        // A worker whose GPU is unhealthy, or asks for a reset, is cordoned
        // (its replica then moves: add first, then drain); once it is idle
        // a person resets the GPU and uncordons it.
        let candidates: Vec<String> = match changed {
            Some(changed) => changed.iter().cloned().collect(),
            None => self.state.workers.keys().cloned().collect(),
        };
        for address in &candidates {
            let Some(record) = self.state.workers.get_mut(address) else {
                continue;
            };
            let Some(status) = self.observed.get(address).and_then(|o| o.status.as_ref()) else {
                continue;
            };
            let why = match status.gpu_health() {
                v1::GpuHealth::Unhealthy => "GPU unhealthy",
                v1::GpuHealth::ResetRequired => {
                    "GPU asks for a reset (reset it once the worker is idle, then uncordon)"
                }
                _ => continue,
            };
            if record.cordoned {
                continue;
            }
            record.cordoned = true;
            record.cordon_reason = format!("{why}: {}", gpu_reasons(status));
            tracing::warn!(worker = address, reason = record.cordon_reason, "cordoned");
        }
        let mut claims = self.claims();
        let mut dirty: BTreeSet<String> = candidates.into_iter().collect();
        for (worker, owner) in &claims {
            if self.last_claims.get(worker) != Some(owner) {
                dirty.insert(worker.clone());
            }
        }
        for worker in self.last_claims.keys() {
            if !claims.contains_key(worker) {
                dirty.insert(worker.clone());
            }
        }
        // A candidate's GPU turns sick or degraded only by news from its
        // agent, and a sick one joins a candidate only by a claim that
        // moved: without either (or a full refresh) no candidate's GPUs
        // need looking at.
        let gpu_news = changed.is_none()
            || dirty.iter().any(|address| {
                self.observed
                    .get(address)
                    .and_then(|o| o.status.as_ref())
                    .is_some_and(|s| {
                        matches!(
                            s.gpu_health(),
                            v1::GpuHealth::Unhealthy | v1::GpuHealth::Warning
                        )
                    })
            });
        let gates = if dirty.is_empty() {
            BTreeMap::new()
        } else {
            self.gate_owners()
        };
        let names: Vec<String> = if dirty.is_empty() {
            Vec::new()
        } else {
            self.state.endpoints.keys().cloned().collect()
        };
        for name in names {
            let Some(rollout) = self.state.endpoints.get(&name).and_then(current_rollout) else {
                continue;
            };
            let mut seen = Vec::new();
            let mut forget = Vec::new();
            for address in &dirty {
                // Another endpoint's worker, unknown here and not running
                // this endpoint's deployment, matters not: skipped without
                // working out its view (most of a big fleet, at each step).
                if claims.get(address).is_some_and(|owner| *owner != name)
                    && !rollout.workers.contains_key(address)
                    && !self.runs_deployment_of(address, &name)
                {
                    continue;
                }
                // A worker that has not reported since this coordinator
                // started is unknown, not idle: the rollout keeps what it
                // knew, until the heartbeat bound says it is lost.
                let Some((worker, relevant)) = self.worker_view(&name, address, &claims, &gates)
                else {
                    continue;
                };
                let known = rollout.workers.get(address);
                let heard = worker.engine == Engine::Unknown
                    || self
                        .observed
                        .get(address)
                        .is_some_and(|o| o.status.is_some());
                if heard && known.is_some_and(|k| *k != worker) || relevant && known.is_none() {
                    seen.push((address.clone(), worker));
                }
                if !relevant && known.is_some() {
                    forget.push(address.clone());
                }
            }
            if seen.is_empty() && forget.is_empty() {
                continue;
            }
            let before = rollout.claimed();
            self.feed(&name, Event::Workers { seen, forget }, actions);
            // What this endpoint claimed or let go: the next endpoints see
            // it now, the ones before at the next refresh.
            if let Some(rollout) = self.state.endpoints.get(&name).and_then(current_rollout) {
                let after = rollout.claimed();
                for worker in after.difference(&before) {
                    claims.insert(worker.clone(), name.clone());
                }
                for worker in before.difference(&after) {
                    if claims.get(worker) == Some(&name) {
                        claims.remove(worker);
                    }
                }
            }
        }
        self.last_claims = claims;
        let names: Vec<String> = if gpu_news {
            self.state.endpoints.keys().cloned().collect()
        } else {
            Vec::new()
        };
        for name in names {
            // A fatal GPU condition on a candidate replica fails the gate.
            let candidate = self
                .state
                .endpoints
                .get(&name)
                .and_then(|e| e.promotion.as_ref())
                .filter(|p| !p.rollout.status.is_terminal())
                .map(|p| (p.rollout.to.clone(), p.rollout.claimed()));
            if let Some((to, claimed)) = candidate {
                let sick = claimed.into_iter().find(|address| {
                    self.observed
                        .get(address)
                        .and_then(|o| o.status.as_ref())
                        .is_some_and(|s| {
                            s.gpu_health() == v1::GpuHealth::Unhealthy
                                && s.engine.as_ref().is_some_and(|e| e.deployment_id == to)
                        })
                });
                if let Some(address) = sick {
                    let reason = format!("a GPU of {address}, which runs {to}, is unhealthy");
                    self.feed(
                        &name,
                        Event::Health(rollout::Verdict::Fail(reason)),
                        actions,
                    );
                }
                self.note_gpu_warnings(&name, &to);
            }
        }
        let live: BTreeSet<&str> = self
            .state
            .endpoints
            .values()
            .filter_map(|e| e.promotion.as_ref())
            .filter(|p| !p.rollout.status.is_terminal())
            .map(|p| p.id.as_str())
            .collect();
        self.gpu_warned
            .retain(|(promotion, _)| live.contains(promotion.as_str()));
    }

    /// A candidate's GPU that is degraded (thermal or power slowdown, an
    /// application XID) does not fail the health gate, but the promotion's
    /// history says so, once per worker and promotion, for the person who
    /// judges it.
    fn note_gpu_warnings(&mut self, name: &str, to: &str) {
        let Some(promotion) = self
            .state
            .endpoints
            .get(name)
            .and_then(|e| e.promotion.as_ref())
        else {
            return;
        };
        let id = promotion.id.clone();
        let mut notes = Vec::new();
        for address in promotion.rollout.claimed() {
            let Some(status) = self.observed.get(&address).and_then(|o| o.status.as_ref()) else {
                continue;
            };
            let runs_candidate = status
                .engine
                .as_ref()
                .is_some_and(|e| e.deployment_id == to);
            if status.gpu_health() == v1::GpuHealth::Warning
                && runs_candidate
                && self.gpu_warned.insert((id.clone(), address.clone()))
            {
                notes.push(format!(
                    "a GPU of {address}, which runs {to}, is degraded: {} (a warning; the health gate goes on)",
                    gpu_reasons(status)
                ));
            }
        }
        if let Some(endpoint) = self.state.endpoints.get_mut(name) {
            for note in notes {
                endpoint.record(now_ms(), "gpu", note, &id);
            }
        }
    }

    /// Which endpoint uses each worker.
    pub(super) fn claims(&self) -> BTreeMap<String, String> {
        let mut claims = BTreeMap::new();
        for (name, endpoint) in &self.state.endpoints {
            if let Some(rollout) = current_rollout(endpoint) {
                for worker in rollout.claimed() {
                    claims.insert(worker, name.clone());
                }
            }
        }
        claims
    }

    /// Each agent's gate address and the first agent that reports it (two
    /// agents that report one gate address cannot both be routed to: a
    /// router refuses such a table).
    fn gate_owners(&self) -> BTreeMap<String, String> {
        let mut gates = BTreeMap::new();
        for (address, observed) in &self.observed {
            if let Some(gate) = observed.status.as_ref().map(|s| s.gate_address.clone()) {
                gates.entry(gate).or_insert_with(|| address.clone());
            }
        }
        gates
    }

    /// The workers that matter to endpoint `name`, as it sees them: the
    /// ones eligible for it, its own, and those running its deployments.
    pub(super) fn rollout_workers(
        &self,
        name: &str,
        claims: &BTreeMap<String, String>,
    ) -> BTreeMap<String, rollout::Worker> {
        let gates = self.gate_owners();
        self.state
            .workers
            .keys()
            .filter_map(|address| {
                let (worker, relevant) = self.worker_view(name, address, claims, &gates)?;
                relevant.then(|| (address.clone(), worker))
            })
            .collect()
    }

    /// Whether worker `address` runs (or starts) a deployment of endpoint
    /// `name`, as its agent last said.
    fn runs_deployment_of(&self, address: &str, name: &str) -> bool {
        self.observed
            .get(address)
            .and_then(|o| o.status.as_ref())
            .and_then(|s| s.engine.as_ref())
            .and_then(|e| self.state.deployments.get(&e.deployment_id))
            .is_some_and(|d| d.endpoint == name)
    }

    /// How worker `address` looks to endpoint `name`, and whether it
    /// matters to it; `None` for a worker the coordinator does not know.
    fn worker_view(
        &self,
        name: &str,
        address: &str,
        claims: &BTreeMap<String, String>,
        gates: &BTreeMap<String, String>,
    ) -> Option<(rollout::Worker, bool)> {
        let record = self.state.workers.get(address)?;
        let endpoint = self.state.endpoints.get(name)?;
        let wanting = endpoint.promotion.as_ref().map(|p| &p.rollout);
        let observed = self.observed.get(address);
        let lost = match observed {
            Some(o) => !o.reachable,
            None => self.started.elapsed() >= HEARTBEAT_BOUND,
        };
        let status = observed.and_then(|o| o.status.as_ref());
        let engine = status.and_then(|s| s.engine.as_ref());
        let state = engine.map_or(v1::EngineState::Unspecified, |e| e.state());
        let deployment = engine
            .filter(|_| {
                !matches!(
                    state,
                    v1::EngineState::Stopped | v1::EngineState::Unspecified
                )
            })
            .map(|e| e.deployment_id.clone())
            .filter(|d| !d.is_empty());
        let engine = match state {
            v1::EngineState::Starting => Engine::Starting,
            v1::EngineState::Ready => Engine::Ready,
            v1::EngineState::Draining | v1::EngineState::Stopping => Engine::Draining,
            v1::EngineState::Failed => Engine::Failed,
            v1::EngineState::Stopped | v1::EngineState::Unspecified => Engine::Idle,
        };
        let healthy = status.is_none_or(|s| s.gpu_health() != v1::GpuHealth::Unhealthy);
        let gate_owner = status.and_then(|s| gates.get(&s.gate_address));
        let deployment_record = deployment
            .as_ref()
            .and_then(|d| self.state.deployments.get(d));
        // A kept engine is the endpoint's warm start when it is promoted
        // back; to anyone else the worker is free.
        let spare = deployment_record.is_some_and(|r| {
            r.state == DeploymentState::Kept
                && !wanting.is_some_and(|rollout| rollout.wants_warm(&r.id))
        });
        let runs_ours = deployment_record.is_some_and(|r| r.endpoint == name);
        let claimed_by = claims.get(address).map(String::as_str);
        let facts = crate::eligibility::Facts {
            lost,
            cordoned: record.cordoned,
            gpu_unhealthy: !healthy,
            matches_selector: status.map(|s| endpoint.selector.matches(s)),
            owns_gate: gate_owner.is_some_and(|owner| owner == address),
            claimed_by,
            spare,
        };
        let worker = crate::eligibility::view(name, deployment, engine, &facts);
        // Never heard from, it may be anyone's: kept until it reports.
        let relevant = worker.eligible || claimed_by == Some(name) || runs_ours || status.is_none();
        Some((worker, relevant))
    }

    /// Stops every engine that no rollout uses and nobody wants warm: a
    /// lost worker's engine when it answers again, a failed candidate's, a
    /// deleted endpoint's. Only once every router has acknowledged the
    /// latest table (or its bound passed), so none routes to it.
    pub(super) fn stop_strays(&mut self) {
        if !self.pending.is_empty() {
            return;
        }
        // On an empty store, the routers' tables are read first: what they
        // route is adopted ([`Self::adopt`]), not stopped.
        if self.fresh_store && self.started.elapsed() < HEARTBEAT_BOUND {
            return;
        }
        let claims = self.claims();
        let mut strays = Vec::new();
        for (address, record) in &self.state.workers {
            let Some(observed) = self.observed.get(address).filter(|o| o.reachable) else {
                continue;
            };
            let Some(engine) = observed.status.as_ref().and_then(|s| s.engine.as_ref()) else {
                continue;
            };
            let running = matches!(
                engine.state(),
                v1::EngineState::Starting | v1::EngineState::Ready | v1::EngineState::Draining
            );
            if !running || claims.contains_key(address) || self.stopping.contains(address) {
                continue;
            }
            let deployment = self.state.deployments.get(&engine.deployment_id);
            let owner_gone =
                deployment.is_none_or(|d| !self.state.endpoints.contains_key(&d.endpoint));
            // A kept deployment's engines stay warm (cleanup `KEEP`) unless
            // a stop was owed, and so do ready engines of the deployment a
            // promotion's steps start (a kept one promoted back: no
            // reload); an engine of the active one not in use is one its
            // rollout chose not to adopt.
            let wanted_warm = matches!(
                engine.state(),
                v1::EngineState::Ready | v1::EngineState::Draining
            ) && deployment.is_some_and(|d| {
                self.state
                    .endpoints
                    .get(&d.endpoint)
                    .and_then(|e| e.promotion.as_ref())
                    .is_some_and(|p| p.rollout.wants_warm(&d.id))
            });
            // `min = max = 0` stops every engine of the endpoint, kept
            // ones included.
            let scaled_to_zero = deployment.is_some_and(|d| {
                self.state
                    .endpoints
                    .get(&d.endpoint)
                    .is_some_and(|e| e.scaling.max_replicas == 0)
            });
            let unwanted = owner_gone
                || scaled_to_zero
                || deployment.is_some_and(|d| d.state != DeploymentState::Kept) && !wanted_warm;
            if record.stop_pending || unwanted {
                // Its endpoint's drain timeout, or the default when it is gone.
                let endpoint = deployment.map(|d| d.endpoint.clone()).unwrap_or_default();
                strays.push((address.clone(), engine.deployment_id.clone(), endpoint));
            }
        }
        for (address, deployment, endpoint) in strays {
            tracing::info!(
                worker = address,
                deployment,
                "stopping an engine no deployment owns"
            );
            self.stopping.insert(address.clone());
            let request = v1::StopRequest {
                coordinator_epoch: self.state.epoch,
                grace: self.drain_timeout(&endpoint).try_into().ok(),
            };
            self.agents.call(
                &address,
                AgentCall::Stop {
                    endpoint: None,
                    request,
                },
            );
        }
    }
}

/// Every GPU's health reasons in one line.
fn gpu_reasons(status: &v1::WorkerStatus) -> String {
    let reasons: Vec<&str> = status
        .gpus
        .iter()
        .flat_map(|g| g.health_reasons.iter().map(String::as_str))
        .collect();
    reasons.join("; ")
}
