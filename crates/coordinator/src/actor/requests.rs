//! The operator's requests: validated, applied to the state, answered
//! once the change is stored.

use super::*;

impl Actor {
    /// A template to promote, checked against this coordinator's
    /// environment and the variables templates may read.
    fn template_target(&self, template: v1::Template) -> Result<Target, CoordinatorError> {
        crate::template::validate(
            &template,
            &self.options.template_env,
            crate::template::process_env,
        )?;
        Ok(Target::Template(template))
    }

    // === requests ===

    /// Handles a request; its answer is sent once the change is stored and
    /// published (`answers`), so a caller that reads right after sees it.
    pub(super) fn request(
        &mut self,
        request: Request,
        actions: &mut Vec<(String, Action)>,
        answers: &mut Vec<Answer>,
    ) {
        match request {
            Request::CreateEndpoint(r, reply) => {
                answer(answers, reply, self.create_endpoint(r, actions));
            }
            Request::DeleteEndpoint(r, reply) => {
                answer(answers, reply, self.delete_endpoint(&r, actions));
            }
            Request::UpdateScaling(r, reply) => {
                let result = self.with_endpoint(&r.name, |e, _| {
                    let scaling = r
                        .scaling
                        .as_ref()
                        .ok_or_else(|| CoordinatorError::invalid("scaling", "required"))?;
                    e.scaling = e.scaling.updated(scaling, "scaling")?;
                    Ok(())
                });
                answer(answers, reply, result);
            }
            Request::UpdatePromotionSettings(r, reply) => {
                let result = self.with_endpoint(&r.name, |e, _| {
                    let update = r.settings.unwrap_or_default();
                    e.settings = e.settings.updated(&update, "settings")?;
                    Ok(())
                });
                answer(answers, reply, result);
            }
            Request::UpdateWorkerSelector(r, reply) => {
                let result = self.with_endpoint(&r.name, |e, _| {
                    e.selector = match (&r.selector, &r.update) {
                        (Some(_), Some(_)) => {
                            return Err(CoordinatorError::invalid(
                                "update",
                                "give `selector` (the whole selector) or `update` (changes to it), not both",
                            ));
                        }
                        (_, Some(update)) => e.selector.updated(update),
                        (selector, None) => {
                            Selector::from_proto(&selector.clone().unwrap_or_default())
                        }
                    };
                    Ok(())
                });
                answer(answers, reply, result);
            }
            Request::UpdateAliases(r, reply) => {
                let result = self.new_aliases(&r).and_then(|aliases| {
                    validate_names("aliases", &aliases)?;
                    self.check_names_free(&r.name, &aliases)?;
                    self.with_endpoint(&r.name, |e, _| {
                        e.aliases = aliases;
                        Ok(())
                    })
                });
                if result.is_ok() {
                    self.push_tables(actions);
                }
                answer(answers, reply, result);
            }
            Request::Promote(r, reply) => {
                answer(answers, reply, self.promote(r, actions));
            }
            Request::Control(command, r, reply) => {
                answer(answers, reply, self.control(command, &r, actions));
            }
            Request::AddWorker(address, reply) => {
                let result =
                    check_address("control_address", &address, &self.options.control).map(|()| {
                        if !self.state.workers.contains_key(&address) {
                            self.state.workers.insert(
                                address.clone(),
                                WorkerRecord {
                                    address: address.clone(),
                                    ..WorkerRecord::default()
                                },
                            );
                            self.watch_agent(&address);
                        }
                    });
                answer(answers, reply, result);
            }
            Request::RemoveWorker(address, reply) => {
                let claimed = self.claims().contains_key(&address);
                let result = if claimed {
                    Err(CoordinatorError::FailedPrecondition(format!(
                        "worker {address} hosts a replica; cordon it and wait for its replica to move first"
                    )))
                } else if self.state.workers.remove(&address).is_some() {
                    self.observed.remove(&address);
                    self.agents.forget(&address);
                    Ok(())
                } else {
                    Err(CoordinatorError::not_found("worker_id", "worker", address))
                };
                answer(answers, reply, result);
            }
            Request::Cordon(address, cordon, reason, reply) => {
                let result = match self.state.workers.get_mut(&address) {
                    Some(worker) => {
                        worker.cordoned = cordon;
                        worker.cordon_reason = if cordon { reason } else { String::new() };
                        Ok(())
                    }
                    None => Err(CoordinatorError::not_found(
                        "worker_id",
                        "worker",
                        address.clone(),
                    )),
                };
                self.refresh_workers(Some(&BTreeSet::from([address])), actions);
                answer(answers, reply, result);
            }
            Request::AddRouter(address, reply) => {
                let result =
                    check_address("control_address", &address, &self.options.control).map(|()| {
                        self.state
                            .routers
                            .entry(address.clone())
                            .or_insert_with(|| RouterRecord {
                                address: address.clone(),
                                acknowledged_version: 0,
                            });
                    });
                if result.is_ok() {
                    self.push_tables(actions);
                }
                answer(answers, reply, result);
            }
            Request::ReportDemand(request, reply) => {
                let result = match self.state.endpoints.get(&request.endpoint) {
                    None => Err(CoordinatorError::not_found(
                        "endpoint",
                        "endpoint",
                        request.endpoint,
                    )),
                    Some(endpoint) if !super::io::scales_on_demand(endpoint) => Ok(false),
                    Some(_) => {
                        tracing::info!(
                            endpoint = ?request.endpoint,
                            router = ?request.router_id,
                            "a router holds requests for an endpoint at zero: scaling from zero"
                        );
                        self.demanded(request.endpoint, Some(&request.router_id), actions);
                        Ok(true)
                    }
                };
                answer(answers, reply, result);
            }
            Request::RemoveRouter(address, reply) => {
                let result = match self.state.routers.remove(&address) {
                    Some(_) => {
                        self.routers.remove(&address);
                        self.pushers.remove(&address);
                        Ok(())
                    }
                    None => Err(CoordinatorError::not_found(
                        "control_address",
                        "router",
                        address,
                    )),
                };
                answer(answers, reply, result);
            }
        }
    }

    pub(super) fn with_endpoint(
        &mut self,
        name: &str,
        change: impl FnOnce(&mut Endpoint, u64) -> Result<(), CoordinatorError>,
    ) -> Result<(), CoordinatorError> {
        let now = now_ms();
        let endpoint = self
            .state
            .endpoints
            .get_mut(name)
            .ok_or_else(|| CoordinatorError::not_found("name", "endpoint", name))?;
        change(endpoint, now)?;
        endpoint.updated_at_ms = now;
        Ok(())
    }

    pub(super) fn create_endpoint(
        &mut self,
        r: v1::CreateEndpointRequest,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<(), CoordinatorError> {
        validate_names("name", std::slice::from_ref(&r.name))?;
        validate_names("aliases", &r.aliases)?;
        if self.state.endpoints.contains_key(&r.name) {
            return Err(CoordinatorError::AlreadyExists(format!(
                "name: endpoint `{}` exists",
                r.name
            )));
        }
        if let Some(other) = self.owner_of(&r.name) {
            return Err(CoordinatorError::AlreadyExists(format!(
                "name: `{}` is an alias of endpoint `{other}`",
                r.name
            )));
        }
        self.check_names_free(&r.name, &r.aliases)?;
        let now = now_ms();
        let mut endpoint = Endpoint::new(&r.name, now);
        endpoint.aliases.clone_from(&r.aliases);
        if let Some(scaling) = &r.scaling {
            endpoint.scaling = Scaling::from_proto(scaling, "scaling")?;
        }
        if let Some(update) = &r.promotion_settings {
            endpoint.settings =
                PromotionSettings::default().updated(update, "promotion_settings")?;
        }
        if let Some(selector) = &r.selector {
            endpoint.selector = Selector::from_proto(selector);
        }
        endpoint.record(now, "created", format!("endpoint `{}` created", r.name), "");
        self.state.endpoints.insert(r.name.clone(), endpoint);
        if let Some(template) = r.template {
            self.start_promotion(&r.name, self.template_target(template)?, None, actions)?;
        }
        // Routers learn the endpoint now, replicas or not: a request to one
        // at zero replicas is held (and its demand starts one), not 404.
        self.announce_table();
        Ok(())
    }

    pub(super) fn delete_endpoint(
        &mut self,
        r: &v1::DeleteEndpointRequest,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<v1::DeleteEndpointResponse, CoordinatorError> {
        let endpoint = self
            .state
            .endpoints
            .get(&r.name)
            .ok_or_else(|| CoordinatorError::not_found("name", "endpoint", &r.name))?;
        if endpoint.promotion.is_some() && !r.force {
            return Err(CoordinatorError::FailedPrecondition(
                "a promotion is under way; cancel it first, or delete with force".into(),
            ));
        }
        let workers: Vec<String> = current_rollout(endpoint)
            .map(|r| r.claimed().into_iter().collect())
            .unwrap_or_default();
        self.state.endpoints.remove(&r.name);
        // Its deployments go with it, and their templates' secrets with
        // them (a stray engine of theirs is stopped as no deployment's).
        self.state.deployments.retain(|_, d| d.endpoint != r.name);
        // Out of every table first; the stops are stored, and sent once
        // every router has acknowledged a table without the endpoint (or
        // to a lost worker as soon as it answers).
        self.push_tables(actions);
        for worker in &workers {
            if let Some(record) = self.state.workers.get_mut(worker) {
                record.stop_pending = true;
            }
        }
        Ok(v1::DeleteEndpointResponse {
            replicas_stopped: u32::try_from(workers.len()).unwrap_or(u32::MAX),
        })
    }

    pub(super) fn promote(
        &mut self,
        r: v1::PromoteRequest,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<(String, String), CoordinatorError> {
        let endpoint = self
            .state
            .endpoints
            .get(&r.endpoint)
            .ok_or_else(|| CoordinatorError::not_found("endpoint", "endpoint", &r.endpoint))?;
        if endpoint.promotion.is_some() {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "endpoint `{}` has a promotion under way; pause, cancel or force it first",
                r.endpoint
            )));
        }
        if current_rollout(endpoint).is_some_and(|r| !r.is_quiet()) {
            // A promotion that began now would not know the workers still
            // draining or starting, and could update the last serving
            // replica in place.
            return Err(CoordinatorError::FailedPrecondition(format!(
                "endpoint `{}` is still retiring or starting replicas after its last promotion or scaling; try again in a few seconds",
                r.endpoint
            )));
        }
        let settings = match &r.settings {
            Some(update) => endpoint.settings.updated(update, "settings")?,
            None => endpoint.settings,
        };
        let target = match r.target {
            Some(v1::promote_request::Target::Template(template)) => {
                self.template_target(template)?
            }
            Some(v1::promote_request::Target::DeploymentId(id)) => {
                let deployment = self.state.deployments.get(&id).ok_or_else(|| {
                    CoordinatorError::not_found("deployment_id", "deployment", &id)
                })?;
                if deployment.endpoint != r.endpoint {
                    return Err(CoordinatorError::invalid(
                        "deployment_id",
                        format!("`{id}` belongs to endpoint `{}`", deployment.endpoint),
                    ));
                }
                if !matches!(deployment.state, DeploymentState::Kept) {
                    return Err(CoordinatorError::FailedPrecondition(format!(
                        "deployment_id: `{id}` is {:?}; only a kept deployment can be promoted again",
                        deployment.state
                    )));
                }
                Target::Existing(id)
            }
            None => {
                return Err(CoordinatorError::invalid(
                    "target",
                    "a template or a deployment_id is required",
                ));
            }
        };
        self.start_promotion(&r.endpoint, target, Some(settings), actions)
    }

    /// Starts a promotion of `endpoint` to `target`; returns its id and the
    /// candidate's id.
    pub(super) fn start_promotion(
        &mut self,
        name: &str,
        target: Target,
        settings: Option<PromotionSettings>,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<(String, String), CoordinatorError> {
        let now = now_ms();
        let (deployment_id, rollback) = match target {
            Target::Template(template) => {
                let id = self.state.new_id("dep");
                self.state.deployments.insert(
                    id.clone(),
                    Deployment {
                        id: id.clone(),
                        endpoint: name.into(),
                        template: Deployment::encode(&template),
                        state: DeploymentState::Candidate,
                        created_at_ms: now,
                    },
                );
                (id, false)
            }
            Target::Existing(id) => {
                if let Some(d) = self.state.deployments.get_mut(&id) {
                    d.state = DeploymentState::Candidate;
                }
                (id, true)
            }
        };
        let promotion_id = self.state.new_id("promo");
        let claims = self.claims();
        let workers = self.rollout_workers(name, &claims);
        let Some(endpoint) = self.state.endpoints.get_mut(name) else {
            return Err(CoordinatorError::not_found("endpoint", "endpoint", name));
        };
        let from = endpoint.active.clone().unwrap_or_default();
        let settings = if from.is_empty() {
            // The first deployment has no traffic to protect: all at once.
            PromotionSettings {
                rolling_deploy: false,
                stabilization_time_seconds: 0,
                ..endpoint.settings
            }
        } else {
            settings.unwrap_or(endpoint.settings)
        };
        let routed = current_rollout(endpoint)
            .map(|r| r.routed.clone())
            .unwrap_or_default();
        let ready_old = u32::try_from(routed.values().filter(|d| **d == from).count()).unwrap_or(0);
        // N: the replicas serving now, at least the minimum.
        let target = ready_old.max(endpoint.scaling.min_replicas);
        let mut rollout = Rollout::new(&from, &deployment_id, settings, target, workers, routed);
        let first = rollout.start(now_ms());
        endpoint.candidate = Some(deployment_id.clone());
        endpoint.promotion = Some(Promotion {
            id: promotion_id.clone(),
            rollout,
            started_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            forced: false,
            rollback,
            splits: Vec::new(),
        });
        let start = actions.len();
        actions.extend(first.into_iter().map(|a| (name.to_owned(), a)));
        self.settle(name, &actions[start..]);
        Ok((promotion_id, deployment_id))
    }

    pub(super) fn control(
        &mut self,
        command: Command,
        r: &v1::PromotionControlRequest,
        actions: &mut Vec<(String, Action)>,
    ) -> Result<(), CoordinatorError> {
        let endpoint = self
            .state
            .endpoints
            .get_mut(&r.endpoint)
            .ok_or_else(|| CoordinatorError::not_found("endpoint", "endpoint", &r.endpoint))?;
        let promotion = endpoint.promotion.as_mut().ok_or_else(|| {
            CoordinatorError::FailedPrecondition(format!(
                "endpoint `{}` has no promotion under way",
                r.endpoint
            ))
        })?;
        if !r.promotion_id.is_empty() && r.promotion_id != promotion.id {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "promotion_id: `{}` is not the promotion under way (`{}`)",
                r.promotion_id, promotion.id
            )));
        }
        if matches!(command, Command::ForceCancel | Command::ForceRollForward) {
            promotion.forced = true;
        }
        if !r.reason.is_empty() {
            let id = promotion.id.clone();
            endpoint.record(now_ms(), "operator", r.reason.clone(), &id);
        }
        self.feed(&r.endpoint.clone(), Event::Command(command), actions);
        Ok(())
    }

    /// The endpoint that `name` names (as its name or an alias), if any.
    pub(super) fn owner_of(&self, name: &str) -> Option<&str> {
        self.state
            .endpoints
            .values()
            .find(|e| e.name == name || e.aliases.iter().any(|a| a == name))
            .map(|e| e.name.as_str())
    }

    /// The aliases an UpdateAliases call asks for: `aliases` as given, or
    /// the endpoint's own changed by `remove` and then `add`.
    fn new_aliases(&self, r: &v1::UpdateAliasesRequest) -> Result<Vec<String>, CoordinatorError> {
        if r.add.is_empty() && r.remove.is_empty() {
            return Ok(r.aliases.clone());
        }
        if !r.aliases.is_empty() {
            return Err(CoordinatorError::invalid(
                "aliases",
                "give `aliases` (the whole list) or `add` and `remove` (changes to it), not both",
            ));
        }
        validate_names("add", &r.add)?;
        let endpoint = self
            .state
            .endpoints
            .get(&r.name)
            .ok_or_else(|| CoordinatorError::not_found("name", "endpoint", &r.name))?;
        let mut aliases = endpoint.aliases.clone();
        aliases.retain(|a| !r.remove.contains(a));
        for name in &r.add {
            if !aliases.contains(name) {
                aliases.push(name.clone());
            }
        }
        Ok(aliases)
    }

    /// Aliases must name one endpoint each: a router refuses a table where
    /// a name or an alias is used twice.
    pub(super) fn check_names_free(
        &self,
        endpoint: &str,
        aliases: &[String],
    ) -> Result<(), CoordinatorError> {
        let mut seen = BTreeSet::from([endpoint]);
        for alias in aliases {
            if !seen.insert(alias.as_str()) {
                return Err(CoordinatorError::invalid(
                    "aliases",
                    format!("`{alias}` is given twice, or is the endpoint's own name"),
                ));
            }
            if let Some(other) = self.owner_of(alias).filter(|other| *other != endpoint) {
                return Err(CoordinatorError::invalid(
                    "aliases",
                    format!(
                        "`{alias}` already names endpoint `{other}`; names and aliases are unique across endpoints"
                    ),
                ));
            }
        }
        Ok(())
    }
}

pub(super) enum Target {
    Template(v1::Template),
    Existing(String),
}

fn validate_names(field: &str, names: &[String]) -> Result<(), CoordinatorError> {
    for name in names {
        let ok = !name.is_empty()
            && name.len() <= 256
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c));
        if !ok {
            // A short prefix of what was sent, never all of it.
            let prefix: String = name.chars().take(64).collect();
            return Err(CoordinatorError::invalid(
                field,
                format!(
                    "`{}{}` must be 1 to 256 characters of letters, digits, `-`, `_`, `.`, `/`, `:`",
                    prefix.escape_debug(),
                    if prefix.len() < name.len() { "..." } else { "" }
                ),
            ));
        }
    }
    Ok(())
}

/// A peer's control address: `host:port`, and not beyond loopback in
/// plain text unless the configuration allows it.
fn check_address(
    field: &str,
    address: &str,
    control: &tls::Control,
) -> Result<(), CoordinatorError> {
    if !crossfade_common::net::is_host_port(address) {
        return Err(CoordinatorError::invalid(
            field,
            format!("`{address}` must be host:port"),
        ));
    }
    control
        .check_peer(address)
        .map_err(|refused| CoordinatorError::invalid(field, refused))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn names_and_addresses_are_checked_by_field() {
        assert!(validate_names("name", &["chat".into(), "Qwen/Qwen3-8B".into()]).is_ok());
        let bad = Status::from(validate_names("aliases", &["a b".into()]).unwrap_err());
        assert!(bad.message().starts_with("aliases: `a b` must be"));
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        let remote = tls::Control::Insecure { remote: true };
        assert!(check_address("control_address", "10.0.0.1:7002", &remote).is_ok());
        assert!(check_address("control_address", "host", &remote).is_err());
        assert!(check_address("control_address", "host:0", &remote).is_err());
        let local = tls::Control::Insecure { remote: false };
        assert!(check_address("control_address", "127.0.0.1:7002", &local).is_ok());
        let refused = check_address("control_address", "10.0.0.1:7002", &local).unwrap_err();
        assert!(refused.to_string().contains("insecure_remote"), "{refused}");
    }
}
