//! A coordinator that started on an empty store (a new one, or the old one
//! lost) adopts what the routers route: each endpoint of the first
//! router's table, with the deployment that carries most of its traffic as
//! the active one on the workers the table names. The endpoint keeps
//! serving; its template is unknown until a promotion gives it one.

use super::*;

impl Actor {
    pub(super) fn adopt(
        &mut self,
        router: &str,
        table: &v1::RoutingTable,
        actions: &mut Vec<(String, Action)>,
    ) {
        // Once, from the first router that answers, before anything else.
        if !self.fresh_store || !self.state.endpoints.is_empty() || self.state.table_version > 0 {
            return;
        }
        let now = now_ms();
        for route in &table.endpoints {
            let Some(serving) = route
                .deployments
                .iter()
                .filter(|d| !d.workers.is_empty())
                .max_by_key(|d| (d.weight, d.workers.len()))
            else {
                continue;
            };
            for deployment in &route.deployments {
                self.learn_id(&deployment.id, router);
                self.state.deployments.insert(
                    deployment.id.clone(),
                    Deployment {
                        id: deployment.id.clone(),
                        endpoint: route.name.clone(),
                        template: Deployment::encode(&v1::Template::default()),
                        // The others (a promotion under way when the store
                        // was lost) are let go: their engines stop once no
                        // router routes to them.
                        state: if deployment.id == serving.id {
                            DeploymentState::Active
                        } else {
                            DeploymentState::Retired
                        },
                        created_at_ms: now,
                    },
                );
            }
            let mut routed = BTreeMap::new();
            for worker in &serving.workers {
                if !self.state.workers.contains_key(&worker.worker_id) {
                    self.state.workers.insert(
                        worker.worker_id.clone(),
                        WorkerRecord {
                            address: worker.worker_id.clone(),
                            gate_address: worker.address.clone(),
                            ..WorkerRecord::default()
                        },
                    );
                    self.watch_agent(&worker.worker_id);
                }
                routed.insert(worker.worker_id.clone(), serving.id.clone());
            }
            let created = u64::try_from(route.created).unwrap_or(0) * 1000;
            let mut endpoint = Endpoint::new(&route.name, if created > 0 { created } else { now });
            endpoint.aliases.clone_from(&route.aliases);
            let replicas = u32::try_from(routed.len()).unwrap_or(u32::MAX);
            endpoint.scaling = Scaling {
                min_replicas: replicas,
                max_replicas: replicas,
                ..Scaling::default()
            };
            endpoint.active = Some(serving.id.clone());
            let id = self.state.new_id("promo");
            let mut rollout = Rollout::adopted(&serving.id, endpoint.settings, routed);
            actions.extend(
                rollout
                    .resume(now)
                    .into_iter()
                    .map(|a| (route.name.clone(), a)),
            );
            endpoint.last_promotion = Some(Promotion {
                id: id.clone(),
                rollout,
                started_at_ms: now,
                updated_at_ms: now,
                finished_at_ms: Some(now),
                forced: false,
                rollback: false,
                splits: Vec::new(),
            });
            let message = format!(
                "adopted from router {router}'s table after this coordinator started on an empty store: {replicas} replica(s) of {} serve on; its template is unknown until a promotion gives one",
                serving.id
            );
            tracing::warn!(endpoint = route.name, "{message}");
            endpoint.record(now, "adopted", message, &id);
            self.state.endpoints.insert(route.name.clone(), endpoint);
        }
    }
}
