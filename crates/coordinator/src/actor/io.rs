//! The actions performed: calls to agents and routers, and the answers
//! that come back as internal events.

use super::*;
use table_push::EncodedTable;

impl Actor {
    // === actions ===

    pub(super) fn perform(&mut self, endpoint: &str, action: Action) {
        match action {
            Action::Record { .. } => {}
            Action::JudgeHealth => self.read_stats(endpoint),
            Action::PushTable { seq, .. } => {
                let version = self.announce_table();
                // Changes announced before a push share its version: one
                // wait per endpoint and version, for its highest table (a
                // step that takes 500 replicas out announces 500, and each
                // acknowledgement fed costs a look at the whole rollout).
                match self
                    .pending
                    .iter_mut()
                    .rev()
                    .find(|(v, e, _)| *v == version && e == endpoint)
                {
                    Some(waiting) => waiting.2 = waiting.2.max(seq),
                    None => self.pending.push((version, endpoint.to_owned(), seq)),
                }
                self.pushed_at.insert(version, Instant::now());
            }
            Action::Apply { worker, deployment } => self.apply(endpoint, worker, deployment),
            Action::Drain { worker } => {
                let request = v1::DrainRequest {
                    coordinator_epoch: self.state.epoch,
                    deadline: self.drain_timeout(endpoint).try_into().ok(),
                };
                let call = AgentCall::Drain {
                    endpoint: endpoint.to_owned(),
                    request,
                };
                self.agents.call(&worker, call);
            }
            Action::Undrain { worker } => {
                let request = v1::UndrainRequest {
                    coordinator_epoch: self.state.epoch,
                };
                self.agents.call(&worker, AgentCall::Undrain { request });
            }
            Action::Stop { worker } => {
                let request = v1::StopRequest {
                    coordinator_epoch: self.state.epoch,
                    grace: self.drain_timeout(endpoint).try_into().ok(),
                };
                let call = AgentCall::Stop {
                    endpoint: Some(endpoint.to_owned()),
                    request,
                };
                self.agents.call(&worker, call);
            }
        }
    }

    /// Pushes the table under a new version to every router; the version.
    /// Routes are read back from every rollout: one table for all. Versions
    /// carry the epoch in their high bits, so a table pushed after a restart
    /// is newer than any pushed before, even one the store did not record
    /// before the crash.
    /// A new table is wanted: the version it will have. Every change
    /// announced before it is pushed shares that version, and the push
    /// ([`Self::push_due_table`]) goes at most every [`TABLE_EVERY`]: with
    /// many endpoints moving at once, each router gets one table for all of
    /// them, not one per endpoint and pass.
    pub(super) fn announce_table(&mut self) -> u64 {
        if !self.table_due {
            self.state.table_version = (self.state.table_version + 1).max(self.state.epoch << 32);
            self.table_due = true;
        }
        self.state.table_version
    }

    /// Pushes the table announced, if one is due and the last push is
    /// [`TABLE_EVERY`] old.
    pub(super) fn push_due_table(&mut self) {
        if self.table_due && self.table_pushed_at.elapsed() >= TABLE_EVERY {
            self.table_due = false;
            self.table_pushed_at = Instant::now();
            self.push_table_now(self.state.table_version);
        }
    }

    pub(super) fn drain_timeout(&self, endpoint: &str) -> Duration {
        let seconds = self.state.endpoints.get(endpoint).map_or(
            PromotionSettings::default().drain_timeout_seconds,
            |e| {
                e.promotion
                    .as_ref()
                    .map_or(e.settings.drain_timeout_seconds, |p| {
                        p.rollout.settings.drain_timeout_seconds
                    })
            },
        );
        Duration::from_secs(u64::from(seconds))
    }

    pub(super) fn apply(&mut self, endpoint: &str, worker: String, deployment: String) {
        let Some(record) = self.state.deployments.get(&deployment) else {
            tracing::error!(deployment, "no such deployment to apply");
            return;
        };
        let Some(e) = self.state.endpoints.get(endpoint) else {
            return;
        };
        let ready_timeout = e
            .promotion
            .as_ref()
            .map_or(e.settings.ready_timeout_seconds, |p| {
                p.rollout.settings.ready_timeout_seconds
            });
        let spec = match crate::template::resolve(
            record.template(),
            &self.options.template_env,
            crate::template::process_env,
        ) {
            Ok(template) => v1::EngineSpec {
                deployment_id: deployment.clone(),
                endpoint: endpoint.to_owned(),
                aliases: e.aliases.clone(),
                template: Some(template),
                ready_timeout: Duration::from_secs(u64::from(ready_timeout))
                    .try_into()
                    .ok(),
            },
            Err(error) => {
                let _ = self.internal.send(Internal::ApplyFailed {
                    endpoint: endpoint.to_owned(),
                    worker,
                    deployment,
                    error,
                });
                return;
            }
        };
        let request = v1::ApplyRequest {
            coordinator_epoch: self.state.epoch,
            spec: Some(spec),
            drain_timeout: self.drain_timeout(endpoint).try_into().ok(),
        };
        let call = AgentCall::Apply {
            endpoint: endpoint.to_owned(),
            request: Box::new(request),
        };
        self.agents.call(&worker, call);
        // The coordinator holds the ready timeout itself too: an agent
        // that reports STARTING forever does not hold the step.
        let deadline =
            Instant::now() + Duration::from_secs(u64::from(ready_timeout)) + calls::CALL_MARGIN;
        self.starts
            .insert(worker, (endpoint.to_owned(), deployment, deadline));
    }

    /// Starts past their ready timeout (plus a margin) fail as the agent's
    /// own timeout would: the worker reports `FAILED` to its rollout.
    pub(super) fn expire_starts(&mut self, actions: &mut Vec<(String, Action)>) {
        let now = Instant::now();
        let mut expired = Vec::new();
        self.starts
            .retain(|worker, (endpoint, deployment, deadline)| {
                let starting = self
                    .state
                    .endpoints
                    .get(endpoint)
                    .and_then(current_rollout)
                    .is_some_and(|r| r.is_starting(worker));
                if starting && *deadline <= now {
                    expired.push((worker.clone(), endpoint.clone(), deployment.clone()));
                }
                starting && *deadline > now
            });
        for (worker, endpoint, deployment) in expired {
            let why =
                format!("{worker} did not report {deployment} ready within its ready timeout");
            self.start_failed(&endpoint, worker, deployment, "not-ready", why, actions);
        }
    }

    /// A start that will not come: recorded, and the worker reports
    /// `FAILED` to its rollout (as a crash loop or the agent's own ready
    /// timeout would).
    pub(super) fn start_failed(
        &mut self,
        endpoint: &str,
        worker: String,
        deployment: String,
        kind: &str,
        why: String,
        actions: &mut Vec<(String, Action)>,
    ) {
        if let Some(e) = self.state.endpoints.get_mut(endpoint) {
            e.record(now_ms(), kind, why, "");
        }
        let failed = rollout::Worker {
            deployment: Some(deployment),
            engine: Engine::Failed,
            eligible: false,
            evict: false,
        };
        self.feed(
            endpoint,
            Event::Worker {
                id: worker,
                worker: failed,
            },
            actions,
        );
    }

    /// Watches an agent's status for as long as it is known.
    pub(super) fn watch_agent(&mut self, address: &str) {
        let client = self.agents.client(address);
        let statuses = Arc::clone(&self.statuses);
        let address = address.to_owned();
        let shutdown = self.shutdown.clone();
        self.shutdown.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let mut client = client.clone();
                let stream = tokio::time::timeout(
                    HEARTBEAT_BOUND,
                    client.watch_status(v1::WatchStatusRequest {
                        heartbeat_interval: HEARTBEAT.try_into().ok(),
                    }),
                )
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer")));
                match stream {
                    Ok(stream) => {
                        backoff = Duration::from_millis(100);
                        let mut stream = stream.into_inner();
                        loop {
                            // A stream with no message, not even a
                            // heartbeat, within the bound: the agent is
                            // lost (a host that hangs keeps its TCP
                            // connection open).
                            let message = tokio::select! {
                                () = shutdown.triggered() => return,
                                m = tokio::time::timeout(HEARTBEAT_BOUND, stream.message()) => m,
                            };
                            let Ok(message) = message else {
                                tracing::warn!(
                                    address,
                                    "no status within {HEARTBEAT_BOUND:?}: the worker is lost"
                                );
                                break;
                            };
                            match message {
                                Ok(Some(status)) => {
                                    statuses.put(&address, Some(Box::new(status)));
                                }
                                Ok(None) | Err(_) => break,
                            }
                        }
                    }
                    Err(e) => tracing::debug!(address, error = %e, "agent unreachable"),
                }
                statuses.put(&address, None);
                tokio::select! {
                    () = shutdown.triggered() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Outside promotions: replicas = clamp(ceil(in-flight / target per
    /// replica), min, max), down only after the scale-down delay (at once
    /// when `max_replicas` is 0: that drains and stops everything).
    pub(super) fn autoscale(&mut self, actions: &mut Vec<(String, Action)>) {
        // Demands of deleted endpoints go with them.
        let endpoints = &self.state.endpoints;
        self.demand.retain(|name, _| endpoints.contains_key(name));
        let names: Vec<String> = self
            .state
            .endpoints
            .iter()
            .filter(|(_, e)| e.promotion.is_some() || e.last_promotion.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(endpoint) = self.state.endpoints.get(&name) else {
                continue;
            };
            let Some(rollout) = current_rollout(endpoint) else {
                continue;
            };
            let in_flight: u64 = rollout
                .routed
                .keys()
                .filter_map(|w| self.observed.get(w))
                .filter_map(|o| o.status.as_ref())
                .filter_map(|s| s.in_flight.as_ref())
                .map(|f| u64::from(f.gate))
                .sum();
            let mut desired = endpoint.scaling.desired(in_flight);
            // Requests held at a router for an endpoint with no replica
            // (a scale from zero) want one, for as long as the scale-down
            // delay: the new replica's own traffic takes over from there.
            let delay = Duration::from_secs(u64::from(endpoint.scaling.scale_down_delay_seconds));
            if self
                .demand
                .get(&name)
                .is_some_and(|at| at.elapsed() < delay.max(DEMAND_HOLDS))
            {
                desired = desired.max(1).min(endpoint.scaling.max_replicas);
            }
            let max_replicas = endpoint.scaling.max_replicas;
            let current = rollout.target;
            if endpoint.promotion.is_some() {
                // During a promotion: only up, at once, split by traffic.
                if desired > current
                    && let Some(promotion) = self
                        .state
                        .endpoints
                        .get_mut(&name)
                        .and_then(|e| e.promotion.as_mut())
                {
                    let produced = promotion.rollout.autoscale(desired, max_replicas);
                    let start = actions.len();
                    actions.extend(produced.into_iter().map(|a| (name.clone(), a)));
                    self.settle(&name, &actions[start..]);
                }
                continue;
            }
            let now = Instant::now();
            let go = if desired > current || endpoint.scaling.max_replicas == 0 && desired < current
            {
                true
            } else if desired < current {
                let since = *self.low_since.entry(name.clone()).or_insert(now);
                now.duration_since(since) >= delay
            } else {
                self.low_since.remove(&name);
                false
            };
            if !go || desired == current {
                continue;
            }
            self.low_since.remove(&name);
            let Some(endpoint) = self.state.endpoints.get_mut(&name) else {
                continue;
            };
            let Some(promotion) = endpoint.last_promotion.as_mut() else {
                continue;
            };
            let produced = promotion.rollout.rescale(desired);
            let start = actions.len();
            actions.extend(produced.into_iter().map(|a| (name.clone(), a)));
            self.settle(&name, &actions[start..]);
        }
    }

    /// A client of every router, in address order: one channel (and so one
    /// connection, one TLS handshake) per router, kept across calls.
    pub(super) fn router_clients(&mut self) -> Vec<RouterControlClient<tonic::transport::Channel>> {
        let control = &self.options.control;
        let clients = &mut self.router_clients;
        clients.retain(|address, _| self.state.routers.contains_key(address));
        self.state
            .routers
            .keys()
            .map(|address| {
                clients
                    .entry(address.clone())
                    .or_insert_with(|| {
                        RouterControlClient::new(control.dial(address, Role::Router))
                    })
                    .clone()
            })
            .collect()
    }

    /// Asks every router whether it holds requests for an endpoint that has
    /// no replica (and may have some); each that does is a demand.
    pub(super) fn read_demand(&mut self) {
        let idle: Vec<String> = self
            .state
            .endpoints
            .iter()
            .filter(|(_, e)| scales_on_demand(e))
            .map(|(name, _)| name.clone())
            .collect();
        if idle.is_empty() {
            return;
        }
        for mut client in self.router_clients() {
            let internal = self.internal.clone();
            let idle = idle.clone();
            self.shutdown.spawn(async move {
                let request = v1::GetStatsRequest {
                    since: None,
                    endpoint: String::new(),
                };
                let Ok(Ok(answer)) =
                    tokio::time::timeout(SHORT_CALL, client.get_stats(request)).await
                else {
                    return;
                };
                for stats in answer.into_inner().endpoints {
                    if stats.queued > 0 && idle.contains(&stats.endpoint) {
                        let _ = internal.send(Internal::Demand {
                            endpoint: stats.endpoint,
                        });
                    }
                }
            });
        }
    }

    /// Requests are held for `endpoint` (which [`scales_on_demand`]): one
    /// replica is wanted for a while. `told_by` names the router that said
    /// so itself (`ReportDemand`); the history records each such hint, and
    /// a demand seen in the routers' stats when it is new.
    pub(super) fn demanded(
        &mut self,
        endpoint: String,
        told_by: Option<&str>,
        actions: &mut Vec<(String, Action)>,
    ) {
        let fresh = self
            .demand
            .get(&endpoint)
            .is_none_or(|at| at.elapsed() >= DEMAND_HOLDS);
        let message = match told_by {
            Some(router) => Some(format!(
                "router `{}` holds requests and no replica serves them: scaling from zero",
                printable(router, 64)
            )),
            None if fresh => Some(
                "a router's stats show requests held and no replica serves them: scaling from zero"
                    .to_owned(),
            ),
            None => None,
        };
        if let (Some(message), Some(e)) = (message, self.state.endpoints.get_mut(&endpoint)) {
            e.record(now_ms(), "demand", message, "");
        }
        self.demand.insert(endpoint, Instant::now());
        self.autoscale(actions);
    }

    /// Reads every router's stats for a promotion's endpoint since it
    /// started, for the health gate.
    pub(super) fn read_stats(&mut self, name: &str) {
        let Some(promotion) = self
            .state
            .endpoints
            .get(name)
            .and_then(|e| e.promotion.as_ref())
            .filter(|p| !p.rollout.status.is_terminal() && p.rollout.candidate_weight() > 0)
        else {
            return;
        };
        let endpoint = name.to_owned();
        let promotion_id = promotion.id.clone();
        let since = crate::state::timestamp(promotion.started_at_ms);
        let internal = self.internal.clone();
        let clients = self.router_clients();
        self.shutdown.spawn(async move {
            let mut by_deployment: BTreeMap<String, crate::health::Counts> = BTreeMap::new();
            let mut answered = 0;
            let asked = clients.len();
            for mut client in clients {
                let request = v1::GetStatsRequest {
                    since: Some(since),
                    endpoint: endpoint.clone(),
                };
                let Ok(Ok(answer)) =
                    tokio::time::timeout(SHORT_CALL, client.get_stats(request)).await
                else {
                    continue;
                };
                answered += 1;
                for stats in answer.into_inner().endpoints {
                    for deployment in stats.deployments {
                        let counts = deployment.requests.unwrap_or_default();
                        let entry = by_deployment.entry(deployment.deployment_id).or_default();
                        entry.total += counts.total;
                        entry.failed += counts.server_errors + counts.aborted_streams;
                    }
                }
            }
            let _ = internal.send(Internal::Stats {
                endpoint,
                promotion_id,
                by_deployment,
                routers: (answered, asked),
            });
        });
    }

    /// What `worker`'s agent last said of its engine, when it runs
    /// `deployment`.
    fn engine_of(&self, worker: &str, deployment: &str) -> Option<&v1::EngineStatus> {
        let status = self.observed.get(worker)?.status.as_ref()?;
        status
            .engine
            .as_ref()
            .filter(|engine| engine.deployment_id == deployment)
    }

    /// The whole routing table now.
    pub(super) fn table(&self, version: u64) -> v1::RoutingTable {
        let gate = |worker: &str| {
            self.observed
                .get(worker)
                .and_then(|o| o.status.as_ref())
                .map(|s| s.gate_address.clone())
                .filter(|g| !g.is_empty())
                .or_else(|| {
                    self.state
                        .workers
                        .get(worker)
                        .map(|r| r.gate_address.clone())
                        .filter(|g| !g.is_empty())
                })
        };
        v1::RoutingTable {
            version,
            endpoints: self
                .state
                .endpoints
                .values()
                .map(|endpoint| v1::EndpointRoute {
                    name: endpoint.name.clone(),
                    aliases: endpoint.aliases.clone(),
                    created: i64::try_from(endpoint.created_at_ms / 1000).unwrap_or(0),
                    deployments: current_rollout(endpoint)
                        .map(Rollout::routes)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|route| v1::DeploymentRoute {
                            max_model_len: route
                                .workers
                                .iter()
                                .filter_map(|w| self.engine_of(w, &route.deployment))
                                .map(|engine| engine.max_model_len)
                                .max()
                                .unwrap_or(0),
                            id: route.deployment,
                            weight: route.weight,
                            workers: route
                                .workers
                                .iter()
                                .filter_map(|w| {
                                    gate(w).map(|address| v1::WorkerRoute {
                                        address,
                                        worker_id: w.clone(),
                                    })
                                })
                                .collect(),
                        })
                        .filter(|d| !d.workers.is_empty())
                        .collect(),
                })
                .collect(),
        }
    }

    /// Pushes the table as `version` to every router.
    pub(super) fn push_table_now(&mut self, version: u64) {
        // One table, built once, however many routers.
        let table = EncodedTable::new(self.state.epoch, self.table(version));
        let routers: Vec<String> = self.state.routers.keys().cloned().collect();
        for address in routers {
            self.push_built_table_to(&address, table.clone());
        }
    }

    /// Asks every router which table it serves; one behind the last pushed
    /// (restarted with its configuration's table) gets the current one.
    /// A router that obeys a higher epoch than this coordinator's is
    /// reported too (see [`Self::learn_epoch`]).
    pub(super) fn check_routers(&mut self) {
        let version = self.state.table_version;
        let epoch = self.state.epoch;
        if version == 0 && !self.fresh_store {
            return;
        }
        let addresses: Vec<String> = self.state.routers.keys().cloned().collect();
        for (address, mut client) in addresses.into_iter().zip(self.router_clients()) {
            let internal = self.internal.clone();
            self.shutdown.spawn(async move {
                let answer =
                    tokio::time::timeout(SHORT_CALL, client.get_table(v1::GetTableRequest {}))
                        .await;
                let Ok(Ok(answer)) = answer else {
                    return;
                };
                let answer = answer.into_inner();
                // An empty store: what the routers route is all that is
                // left of the endpoints.
                if version == 0
                    && answer.source() == v1::TableSource::Coordinator
                    && let Some(table) = answer.table.clone().filter(|t| !t.endpoints.is_empty())
                {
                    let _ = internal.send(Internal::RouterTable {
                        address: address.clone(),
                        table,
                    });
                }
                if answer.coordinator_epoch > epoch {
                    let _ = internal.send(Internal::RouterEpoch {
                        address: address.clone(),
                        epoch: answer.coordinator_epoch,
                    });
                }
                if version > 0 && answer.table.is_none_or(|t| t.version < version) {
                    let _ = internal.send(Internal::RouterBehind { address });
                }
            });
        }
    }

    /// `from` obeys `seen`, an epoch above this coordinator's: on a
    /// store that was empty at the start (new, or lost), the fleet was
    /// driven by an earlier coordinator, and would refuse this one until
    /// each agent and router restarts. This coordinator goes above it (the
    /// store keeps it) and pushes its table again under the new epoch. On a
    /// store with history the epoch is the store's, never a peer's: two
    /// coordinators would otherwise outbid each other.
    pub(super) fn learn_epoch(
        &mut self,
        seen: u64,
        from: &str,
        actions: &mut Vec<(String, Action)>,
    ) {
        // Its own epoch, or an older one: nothing to learn.
        if !self.fresh_store || seen <= self.state.epoch {
            return;
        }
        let before = self.state.epoch;
        self.state.epoch = seen + 1;
        tracing::warn!(
            from,
            obeys = seen,
            before,
            epoch = self.state.epoch,
            "a peer obeys an epoch this coordinator's empty store did not know (the store was lost or replaced): running as a higher epoch"
        );
        if self.state.table_version > 0 {
            self.push_tables(actions);
        }
    }

    /// A deployment id an agent runs: new ids go above it. A store that
    /// was lost, or restored from an older copy, would otherwise hand out
    /// an id the fleet already runs under another template, and an agent
    /// takes an `Apply` of an id it runs as already done.
    pub(super) fn learn_id(&mut self, id: &str, from: &str) {
        let Some(number) = id.rsplit_once('-').and_then(|(_, n)| n.parse::<u64>().ok()) else {
            return;
        };
        if number > self.state.next_id {
            tracing::warn!(
                agent = from,
                deployment = id,
                next_id = self.state.next_id,
                "an agent runs a deployment this store does not know of (the store was lost or restored): new ids go above it"
            );
            self.state.next_id = number;
        }
    }

    /// Gives the table as `version` to one router's pusher (started on
    /// first use), which sends it until the router answers.
    pub(super) fn push_table_to(&mut self, address: &str, version: u64) {
        let table = EncodedTable::new(self.state.epoch, self.table(version));
        self.push_built_table_to(address, table);
    }

    /// Gives `table` to one router's pusher (started on first use).
    fn push_built_table_to(&mut self, address: &str, table: EncodedTable) {
        let pusher = self.pushers.entry(address.to_owned()).or_insert_with(|| {
            calls::router_pusher(
                &self.options.control,
                address,
                self.internal.clone(),
                &self.shutdown,
            )
        });
        pusher.send_replace(Some(table));
    }

    /// A table change not tied to a rollout (aliases, a router added, an
    /// endpoint deleted): pushed after the change is stored, like the
    /// rollouts' own.
    pub(super) fn push_tables(&mut self, actions: &mut Vec<(String, Action)>) {
        actions.push((
            String::new(),
            Action::PushTable {
                seq: 0,
                routes: Vec::new(),
            },
        ));
    }

    /// Tells rollouts which of their tables every router has acknowledged
    /// (or the bound on an unreachable router passed).
    pub(super) fn settle_acks(&mut self, actions: &mut Vec<(String, Action)>) {
        let routers: Vec<(String, crate::acks::Router)> = self
            .state
            .routers
            .values()
            .map(|r| {
                (
                    r.address.clone(),
                    crate::acks::Router {
                        acknowledged: r.acknowledged_version,
                        // A refusal is an answer: the router still routes
                        // by an older table (or obeys a newer epoch).
                        refusing: self
                            .routers
                            .get(&r.address)
                            .is_some_and(|o| o.refused.is_some()),
                    },
                )
            })
            .collect();
        let views: Vec<crate::acks::Router> = routers.iter().map(|(_, r)| *r).collect();
        let acked = views
            .iter()
            .map(|r| r.acknowledged)
            .min()
            .unwrap_or(u64::MAX);
        let mut done = Vec::new();
        let mut late = Vec::new();
        let bound = self.options.router_ack_bound;
        let pushed_at = &self.pushed_at;
        self.pending.retain(|(version, endpoint, seq)| {
            let elapsed = pushed_at
                .get(version)
                .map_or(Duration::ZERO, Instant::elapsed);
            match crate::acks::settle(*version, elapsed, bound, &views) {
                Some(crate::acks::Settled::Acked) => {
                    metrics::histogram!(crate::metrics::TABLE_ACK_SECONDS)
                        .record(elapsed.as_secs_f64());
                    done.push((endpoint.clone(), *seq));
                    false
                }
                Some(crate::acks::Settled::Late(missing)) => {
                    let missing: Vec<String> =
                        missing.iter().map(|&i| routers[i].0.clone()).collect();
                    late.push((endpoint.clone(), *seq, *version, missing));
                    false
                }
                None => true,
            }
        });
        self.pushed_at.retain(|version, _| *version > acked);
        for (endpoint, seq, version, missing) in late {
            if let Some(e) = self.state.endpoints.get_mut(&endpoint) {
                e.record(
                    now_ms(),
                    "router-late",
                    format!(
                        "router(s) {} did not acknowledge table version {version} within {:?}; going ahead: their draining gates answer with a retryable 503",
                        missing.join(", "),
                        self.options.router_ack_bound
                    ),
                    "",
                );
            }
            done.push((endpoint, seq));
        }
        for (endpoint, seq) in done {
            self.feed(&endpoint, Event::TableAcked { seq }, actions);
        }
    }
}

/// Whether held requests for `endpoint` start a replica: it has none and
/// may have some, and no promotion runs.
pub(super) fn scales_on_demand(endpoint: &crate::state::Endpoint) -> bool {
    endpoint.promotion.is_none()
        && endpoint.scaling.max_replicas > 0
        && current_rollout(endpoint).is_none_or(|r| r.target == 0)
}

/// At most `max` characters of what a peer sent, without control
/// characters, for the history.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}
