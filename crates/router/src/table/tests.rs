use std::sync::atomic::AtomicBool;

use super::*;

fn worker(address: &str) -> v1::WorkerRoute {
    v1::WorkerRoute {
        address: address.into(),
        worker_id: String::new(),
    }
}

fn deployment(id: &str, weight: u32, workers: &[&str]) -> v1::DeploymentRoute {
    v1::DeploymentRoute {
        max_model_len: 0,
        id: id.into(),
        weight,
        workers: workers.iter().map(|a| worker(a)).collect(),
    }
}

fn endpoint(
    name: &str,
    aliases: &[&str],
    deployments: Vec<v1::DeploymentRoute>,
) -> v1::EndpointRoute {
    v1::EndpointRoute {
        created: 0,
        name: name.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        deployments,
    }
}

fn spec(version: u64, endpoints: Vec<v1::EndpointRoute>) -> v1::RoutingTable {
    v1::RoutingTable { version, endpoints }
}

fn chat(version: u64, v2_weight: u32) -> v1::RoutingTable {
    spec(
        version,
        vec![endpoint(
            "chat",
            &["Qwen/Qwen3-8B"],
            vec![
                deployment("v2", v2_weight, &["127.0.0.1:8003"]),
                deployment(
                    "v1",
                    10_000 - v2_weight,
                    &["127.0.0.1:8001", "127.0.0.1:8002"],
                ),
            ],
        )],
    )
}

fn build_err(spec: &v1::RoutingTable) -> String {
    Table::build(spec, Source::Config, &Shared::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn endpoints_are_found_by_name_and_alias() {
    let t = Table::build(&chat(1, 2_000), Source::Config, &Shared::default()).unwrap();
    assert_eq!(t.endpoint("chat").unwrap().name(), "chat");
    assert_eq!(t.endpoint("Qwen/Qwen3-8B").unwrap().name(), "chat");
    assert!(t.endpoint("other").is_none());
    let d = &t.endpoint("chat").unwrap().deployments()[0];
    assert_eq!(d.header(), "v2");
    assert_eq!(d.workers()[0].authority().port_u16(), Some(8003));
}

#[test]
fn invalid_tables_are_refused_with_a_message_naming_the_place() {
    let cases = [
        (
            spec(1, vec![endpoint(" ", &[], vec![])]),
            "endpoint #1: `name` is empty",
        ),
        (
            spec(
                1,
                vec![
                    endpoint("chat", &[], vec![]),
                    endpoint("code", &["chat"], vec![]),
                ],
            ),
            "model name `chat` is used by two endpoints",
        ),
        (
            spec(
                1,
                vec![endpoint(
                    "chat",
                    &[],
                    vec![deployment("v1", 20_000, &["127.0.0.1:1"])],
                )],
            ),
            "endpoint `chat`: deployment `v1`: `weight` must be within 0..=10000, got 20000",
        ),
        (
            spec(
                1,
                vec![endpoint("chat", &[], vec![deployment("v1", 1, &[])])],
            ),
            "endpoint `chat`: deployment `v1`: `weight` is above 0 but `workers` is empty",
        ),
        (
            spec(
                1,
                vec![endpoint(
                    "chat",
                    &[],
                    vec![deployment("v1", 1, &["10.0.0.1"])],
                )],
            ),
            "worker address `10.0.0.1` has no port",
        ),
        (
            spec(
                1,
                vec![endpoint(
                    "chat",
                    &[],
                    vec![deployment("v1", 1, &["not an address"])],
                )],
            ),
            "worker address `not an address` is not host:port",
        ),
        (
            spec(
                1,
                vec![endpoint(
                    "chat",
                    &[],
                    vec![
                        deployment("v1", 1, &["127.0.0.1:1"]),
                        deployment("v1", 1, &["127.0.0.1:2"]),
                    ],
                )],
            ),
            "deployment `v1` is listed twice",
        ),
        (
            spec(
                1,
                vec![endpoint(
                    "chat",
                    &[],
                    vec![deployment("v1", 1, &["127.0.0.1:1", "127.0.0.1:1"])],
                )],
            ),
            "worker `127.0.0.1:1` is listed twice",
        ),
        (
            spec(
                1,
                vec![endpoint(
                    "chat",
                    &[],
                    vec![deployment("v1\n", 1, &["127.0.0.1:1"])],
                )],
            ),
            "`id` must be visible ASCII",
        ),
    ];
    for (spec, expected) in cases {
        let err = build_err(&spec);
        assert!(
            err.contains(expected),
            "{err:?} should contain {expected:?}"
        );
    }
}

#[test]
fn an_endpoint_without_capacity_is_valid() {
    // Scaled to zero: listed, every weight 0; requests get "no capacity".
    let t = spec(
        3,
        vec![endpoint("chat", &[], vec![deployment("v1", 0, &[])])],
    );
    assert!(Table::build(&t, Source::Coordinator, &Shared::default()).is_ok());
}

#[test]
fn the_wire_form_round_trips() {
    let original = chat(9, 2_500);
    let t = Table::build(&original, Source::Coordinator, &Shared::default()).unwrap();
    assert_eq!(t.to_proto(), original);
}

#[test]
fn coordinator_versions_only_grow() {
    let routes = Routes::new(&chat(0, 0)).unwrap();
    // The first coordinator table wins over the file's, whatever its number.
    assert_eq!(
        routes.apply_from_config(&chat(0, 0)).unwrap(),
        Applied::Swapped(1)
    );
    assert_eq!(
        routes.apply_from_coordinator(&chat(1, 1_000)).unwrap(),
        Applied::Swapped(1)
    );
    assert_eq!(routes.load().source(), Source::Coordinator);
    assert_eq!(
        routes.apply_from_coordinator(&chat(5, 5_000)).unwrap(),
        Applied::Swapped(5)
    );
    assert_eq!(
        routes.apply_from_coordinator(&chat(5, 5_000)).unwrap(),
        Applied::Unchanged(5)
    );
    assert_eq!(
        routes.apply_from_coordinator(&chat(4, 9_000)).unwrap_err(),
        ApplyError::Stale {
            current: 5,
            offered: 4
        }
    );
    // A refused table changes nothing.
    let table = routes.load();
    assert_eq!(
        table.endpoint("chat").unwrap().deployments()[0].weight(),
        5_000
    );
    // An invalid one neither.
    let mut bad = chat(6, 5_000);
    bad.endpoints[0].deployments[0].workers.clear();
    assert!(matches!(
        routes.apply_from_coordinator(&bad),
        Err(ApplyError::Invalid(_))
    ));
    assert_eq!(routes.load().version(), 5);
}

#[test]
fn a_config_reload_cannot_undo_a_coordinator() {
    let routes = Routes::new(&chat(0, 0)).unwrap();
    routes.apply_from_coordinator(&chat(7, 3_000)).unwrap();
    assert_eq!(
        routes.apply_from_config(&chat(0, 0)).unwrap_err(),
        ApplyError::ManagedByCoordinator { current: 7 }
    );
    assert_eq!(routes.load().version(), 7);
}

#[test]
fn worker_counts_survive_a_swap() {
    let routes = Routes::new(&chat(0, 2_000)).unwrap();
    let before = routes.load();
    let guard = before.endpoint("chat").unwrap().deployments()[1].workers()[0].start_request();
    routes.apply_from_coordinator(&chat(1, 8_000)).unwrap();
    let after = routes.load();
    let same = &after.endpoint("chat").unwrap().deployments()[1].workers()[0];
    assert_eq!(same.address(), "127.0.0.1:8001");
    assert_eq!(
        same.in_flight(),
        1,
        "the in-flight request is still counted"
    );
    drop(guard);
    assert_eq!(same.in_flight(), 0);
    drop(before);
}

#[test]
fn workers_no_table_lists_are_forgotten() {
    let shared = Shared::default();
    let t = Table::build(&chat(1, 0), Source::Config, &shared).unwrap();
    let kept = Arc::clone(&t.endpoint("chat").unwrap().deployments()[1].workers()[0]);
    drop(t);
    let t2 = Table::build(&chat(2, 0), Source::Config, &shared).unwrap();
    // `kept` outlived the table (a request in flight), so it is reused...
    assert!(Arc::ptr_eq(
        &kept,
        &t2.endpoint("chat").unwrap().deployments()[1].workers()[0]
    ));
    // ...while the others were built anew and the dead entries pruned.
    assert!(shared.workers.0.all_alive());
}

/// Readers load and route while a writer swaps 2,000 times: every snapshot a
/// reader sees is whole (its shares sum to the total) and versions never go
/// backwards for a reader.
#[test]
fn swaps_are_atomic_for_concurrent_readers() {
    let routes = Arc::new(Routes::new(&chat(0, 0)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let routes = Arc::clone(&routes);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut last = 0;
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let table = routes.load();
                    assert!(table.version() >= last, "version went back");
                    last = table.version();
                    let endpoint = table.endpoint("chat").unwrap();
                    let total: u32 = endpoint.deployments().iter().map(Deployment::weight).sum();
                    assert_eq!(total, 10_000);
                    assert!(endpoint.deployment_at(9_999).is_some());
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for version in 1..=2_000u64 {
        let weight = u32::try_from(version % 10_001).unwrap();
        routes
            .apply_from_coordinator(&chat(version, weight))
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert_eq!(routes.load().version(), 2_000);
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Valid tables: distinct names, weights in range, workers wherever
    /// there is weight.
    fn valid_table() -> impl Strategy<Value = v1::RoutingTable> {
        let deployment = (0u32..=10_000, 1usize..4);
        let endpoint = (prop::collection::vec(deployment, 0..4), 0usize..3);
        (any::<u64>(), prop::collection::vec(endpoint, 0..4)).prop_map(|(version, endpoints)| {
            let mut port = 1_000u16;
            let endpoints = endpoints
                .into_iter()
                .enumerate()
                .map(|(e, (deployments, aliases))| v1::EndpointRoute {
                    created: 0,
                    name: format!("endpoint-{e}"),
                    aliases: (0..aliases).map(|a| format!("alias-{e}-{a}")).collect(),
                    deployments: deployments
                        .into_iter()
                        .enumerate()
                        .map(|(d, (weight, workers))| v1::DeploymentRoute {
                            max_model_len: 0,
                            id: format!("d{d}"),
                            weight,
                            workers: (0..workers)
                                .map(|_| {
                                    port += 1;
                                    v1::WorkerRoute {
                                        address: format!("127.0.0.1:{port}"),
                                        worker_id: format!("w{port}"),
                                    }
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect();
            v1::RoutingTable { version, endpoints }
        })
    }

    proptest! {
        #[test]
        fn valid_tables_build_and_round_trip(spec in valid_table()) {
            let table = Table::build(&spec, Source::Coordinator, &Shared::default()).unwrap();
            prop_assert_eq!(table.to_proto(), spec.clone());
            for e in &spec.endpoints {
                for model in std::iter::once(&e.name).chain(&e.aliases) {
                    prop_assert_eq!(table.endpoint(model).unwrap().name(), e.name.as_str());
                }
                let endpoint = table.endpoint(&e.name).unwrap();
                let has_weight = e.deployments.iter().any(|d| d.weight > 0);
                for point in [0, 4_999, 9_999] {
                    let chosen = endpoint.deployment_at(point);
                    prop_assert_eq!(chosen.is_some(), has_weight);
                    if let Some(d) = chosen {
                        prop_assert!(d.weight() > 0 && !d.workers().is_empty());
                    }
                }
            }
        }

        /// Whatever order versions arrive in, a coordinator's table is in
        /// force exactly when it is not older than the one before, so the
        /// version in force is the highest seen.
        #[test]
        fn the_version_in_force_is_the_highest_seen(versions in prop::collection::vec(0u64..20, 1..30)) {
            let routes = Routes::new(&chat(0, 0)).unwrap();
            let mut highest = None;
            for version in versions {
                let result = routes.apply_from_coordinator(&chat(version, 5_000));
                match highest {
                    Some(h) if version < h => prop_assert!(result.is_err()),
                    _ => {
                        prop_assert!(result.is_ok());
                        highest = Some(version);
                    }
                }
                prop_assert_eq!(Some(routes.load().version()), highest);
            }
        }
    }
}

#[test]
fn a_retired_deployment_keeps_its_series_for_the_grace_period_only() {
    use crate::stats::Outcome;
    let grace = std::time::Duration::from_secs(60);
    let routes = Routes::with_retired_grace(&chat(0, 0), grace).unwrap();
    let series = |at: std::time::Instant| {
        let mut out = String::new();
        routes.stats().render(&mut out, at);
        out
    };
    let v1_success =
        r#"crossfade_router_requests_total{endpoint="chat",deployment="v1",outcome="success"} 1"#;
    routes.load().endpoint("chat").unwrap().deployments()[1]
        .stats()
        .start()
        .finish(Outcome::Success);
    let before = series(std::time::Instant::now());
    assert!(before.contains(v1_success), "{before}");

    // Twenty promotions, each to a new deployment.
    for version in 1..=20u64 {
        let id = format!("d{version}");
        let table = spec(
            version,
            vec![endpoint(
                "chat",
                &[],
                vec![deployment(&id, 10_000, &["127.0.0.1:8004"])],
            )],
        );
        routes.apply_from_coordinator(&table).unwrap();
    }
    // Within the grace period, the final counts can still be scraped ...
    let within = series(std::time::Instant::now());
    assert!(within.contains(v1_success), "{within}");
    assert!(within.contains(r#"deployment="d20""#));
    // ... and after it, only the deployment listed has series.
    let after = series(std::time::Instant::now() + grace + std::time::Duration::from_secs(1));
    for gone in ["v1", "v2", "d1", "d19"] {
        assert!(
            !after.contains(&format!("deployment=\"{gone}\"")),
            "{after}"
        );
    }
    assert!(after.contains(r#"deployment="d20""#));
    let count = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    assert!(
        count(&after) * 2 <= count(&before),
        "one deployment's series after, two before: {} and {}",
        count(&after),
        count(&before)
    );
}

#[test]
fn model_objects_take_their_creation_and_context_length_from_the_table() {
    let mut t = chat(1, 2_000);
    t.endpoints[0].deployments[0].max_model_len = 8_192; // v2, 20 %
    t.endpoints[0].deployments[1].max_model_len = 4_096; // v1, 80 %
    let routes = Routes::new(&t).unwrap();
    let table = routes.load();
    let endpoint = table.endpoint("chat").unwrap();
    assert_eq!(endpoint.max_model_len(), Some(4_096), "most traffic wins");
    assert_eq!(
        endpoint.created(),
        None,
        "a hand-written table does not say"
    );

    t.version = 2;
    t.endpoints[0].created = 1_750_000_000;
    t.endpoints[0].deployments[1].max_model_len = 0;
    routes.apply_from_coordinator(&t).unwrap();
    let table = routes.load();
    let endpoint = table.endpoint("chat").unwrap();
    assert_eq!(endpoint.created(), Some(1_750_000_000));
    assert_eq!(endpoint.max_model_len(), Some(8_192), "only v2 reports one");
    assert_eq!(table.to_proto().endpoints[0].created, 1_750_000_000);

    t.version = 3;
    t.endpoints[0].deployments[0].max_model_len = 0;
    routes.apply_from_coordinator(&t).unwrap();
    assert_eq!(
        routes.load().endpoint("chat").unwrap().max_model_len(),
        None
    );
}
