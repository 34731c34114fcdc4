//! Promotions step by step, by hand.

use std::collections::BTreeMap;

use super::super::*;

fn fleet(replicas: usize, idle: usize) -> (BTreeMap<String, Worker>, BTreeMap<String, String>) {
    let mut workers = BTreeMap::new();
    let mut routed = BTreeMap::new();
    for i in 0..replicas + idle {
        let id = format!("w{i}");
        let serving = i < replicas;
        workers.insert(
            id.clone(),
            Worker {
                deployment: serving.then(|| "old".to_owned()),
                engine: if serving { Engine::Ready } else { Engine::Idle },
                eligible: true,
                evict: false,
            },
        );
        if serving {
            routed.insert(id, "old".to_owned());
        }
    }
    (workers, routed)
}

fn ready(worker: &str, deployment: &str) -> Event {
    Event::Worker {
        id: worker.into(),
        worker: Worker {
            deployment: Some(deployment.into()),
            engine: Engine::Ready,
            eligible: true,
            evict: false,
        },
    }
}

fn failed(worker: &str, deployment: &str) -> Event {
    Event::Worker {
        id: worker.into(),
        worker: Worker {
            deployment: Some(deployment.into()),
            engine: Engine::Failed,
            eligible: true,
            evict: false,
        },
    }
}

fn applies(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Apply { worker, deployment } => Some((worker.clone(), deployment.clone())),
            _ => None,
        })
        .collect()
}

fn tables(actions: &[Action]) -> Vec<(u64, Vec<Route>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::PushTable { seq, routes } => Some((*seq, routes.clone())),
            _ => None,
        })
        .collect()
}

fn drains(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Drain { worker } => Some(worker.clone()),
            _ => None,
        })
        .collect()
}

fn unavailable_half() -> PromotionSettings {
    PromotionSettings {
        rolling_deploy: true,
        max_surge_percent: 0,
        max_unavailable_percent: 50,
        ..PromotionSettings::default()
    }
}

fn rolling_surge() -> PromotionSettings {
    PromotionSettings {
        rolling_deploy: true,
        max_surge_percent: 25,
        ..PromotionSettings::default()
    }
}

#[test]
fn a_surge_step_starts_on_an_idle_worker_shifts_then_drains_after_the_ack() {
    let (workers, routed) = fleet(4, 1);
    let mut r = Rollout::new("old", "new", rolling_surge(), 4, workers, routed);
    let start = r.start();
    assert_eq!(applies(&start), [("w4".to_owned(), "new".to_owned())]);
    assert_eq!(r.status, Status::Releasing);
    assert_eq!(r.phase, Phase::WaitingReady);

    let shifted = r.handle(ready("w4", "new"));
    let pushed = tables(&shifted);
    assert_eq!(pushed.len(), 1);
    let (seq, routes) = &pushed[0];
    // One of four replicas is new: 25 %, and one old one is out.
    assert_eq!(routes[0].deployment, "new");
    assert_eq!(routes[0].weight, 2500);
    assert_eq!(routes[1].workers.len(), 3);
    assert_eq!(r.status, Status::RampingUp);
    assert_eq!(r.percent_to_candidate(), 25);
    assert!(
        drains(&shifted).is_empty(),
        "drained before the routers acknowledged"
    );

    let acked = r.handle(Event::TableAcked { seq: *seq });
    assert_eq!(drains(&acked), ["w0"]);
    let stopped = r.handle(Event::Drained {
        worker: "w0".into(),
    });
    assert_eq!(
        stopped,
        [Action::Stop {
            worker: "w0".into()
        }]
    );
    let next = r.handle(Event::Stopped {
        worker: "w0".into(),
    });
    // No stabilization time: the next step starts on the freed worker.
    assert_eq!(r.step, 2);
    assert_eq!(applies(&next), [("w0".to_owned(), "new".to_owned())]);
}

#[test]
fn unavailable_mode_updates_in_place_behind_the_table() {
    let (workers, routed) = fleet(4, 0);
    let mut r = Rollout::new("old", "new", unavailable_half(), 4, workers, routed);
    let start = r.start();
    // Two old replicas out of the table first, one table each; nothing
    // drains yet.
    let pushed = tables(&start);
    assert_eq!(pushed.len(), 2);
    assert_eq!(pushed[1].1[0].workers, ["w2", "w3"]);
    assert!(drains(&start).is_empty() && applies(&start).is_empty());
    let acked = r.handle(Event::TableAcked { seq: 2 });
    assert_eq!(drains(&acked), ["w0", "w1"]);
    let started = r.handle(Event::Drained {
        worker: "w0".into(),
    });
    assert_eq!(applies(&started), [("w0".to_owned(), "new".to_owned())]);
    r.handle(Event::Drained {
        worker: "w1".into(),
    });
    r.handle(ready("w0", "new"));
    let shifted = r.handle(ready("w1", "new"));
    let (_, routes) = &tables(&shifted)[0];
    assert_eq!(r.percent_to_candidate(), 50);
    assert_eq!(routes.iter().map(|r| r.workers.len()).sum::<usize>(), 4);
}

#[test]
fn not_rolling_switches_all_traffic_at_once_when_every_candidate_is_ready() {
    let (workers, routed) = fleet(2, 2);
    let mut r = Rollout::new(
        "old",
        "new",
        PromotionSettings::default(),
        2,
        workers,
        routed,
    );
    let start = r.start();
    assert_eq!(applies(&start).len(), 2);
    assert!(tables(&r.handle(ready("w2", "new"))).is_empty());
    let switched = r.handle(ready("w3", "new"));
    let (seq, routes) = tables(&switched)[0].clone();
    assert_eq!(routes.len(), 1);
    assert_eq!(
        (routes[0].deployment.as_str(), routes[0].weight),
        ("new", TOTAL_WEIGHT)
    );
    let acked = r.handle(Event::TableAcked { seq });
    assert_eq!(drains(&acked), ["w0", "w1"]);
    r.handle(Event::Drained {
        worker: "w0".into(),
    });
    r.handle(Event::Drained {
        worker: "w1".into(),
    });
    r.handle(Event::Stopped {
        worker: "w0".into(),
    });
    r.handle(Event::Stopped {
        worker: "w1".into(),
    });
    assert_eq!(r.status, Status::Succeeded);
    assert!(r.is_settled());
}

#[test]
fn pause_lets_starts_finish_but_pins_the_split_until_resume() {
    let (workers, routed) = fleet(4, 1);
    let mut r = Rollout::new("old", "new", rolling_surge(), 4, workers, routed);
    r.start();
    r.handle(Event::Command(Command::Pause));
    assert_eq!(r.status, Status::Paused);
    // The start under way finishes, but no traffic moves (Baseten's pause).
    let held = r.handle(ready("w4", "new"));
    assert!(tables(&held).is_empty(), "{held:?}");
    assert_eq!(r.percent_to_candidate(), 0);
    assert_eq!(r.step, 1);
    // Resume: the ready replica takes its share, one old one leaves.
    let resumed = r.handle(Event::Command(Command::Resume));
    assert_eq!(r.status, Status::RampingUp);
    let (seq, _) = tables(&resumed)[0].clone();
    assert_eq!(r.percent_to_candidate(), 25);
    let acked = r.handle(Event::TableAcked { seq });
    assert_eq!(drains(&acked), ["w0"]);
    r.handle(Event::Drained {
        worker: "w0".into(),
    });
    let next = r.handle(Event::Stopped {
        worker: "w0".into(),
    });
    assert_eq!(applies(&next), [("w0".to_owned(), "new".to_owned())]);
}

#[test]
fn a_failed_candidate_fails_the_promotion_with_traffic_on_the_old_deployment() {
    let (workers, routed) = fleet(2, 1);
    let mut r = Rollout::new("old", "new", rolling_surge(), 2, workers, routed);
    r.start();
    let failed = r.handle(failed("w2", "new"));
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.percent_to_candidate(), 0);
    assert!(tables(&failed).is_empty(), "the table never changed");
    assert!(failed.contains(&Action::Stop {
        worker: "w2".into()
    }));
    assert!(r.reason.contains("w2"));

    // Once it has stopped, the worker where the candidate failed can host
    // the old deployment again: a failure is not held against it forever.
    r.handle(Event::Stopped {
        worker: "w2".into(),
    });
    r.handle(Event::Worker {
        id: "w2".into(),
        worker: Worker {
            deployment: None,
            engine: Engine::Idle,
            eligible: true,
            evict: false,
        },
    });
    assert_eq!(
        applies(&r.rescale(3)),
        [("w2".to_owned(), "old".to_owned())]
    );
}

#[test]
fn force_roll_forward_puts_all_traffic_on_a_ready_candidate_at_once() {
    let (workers, routed) = fleet(4, 1);
    let mut r = Rollout::new("old", "new", rolling_surge(), 4, workers, routed);
    r.start();
    let shifted = r.handle(ready("w4", "new"));
    let (seq, _) = tables(&shifted)[0].clone();
    r.handle(Event::TableAcked { seq });
    let forced = r.handle(Event::Command(Command::ForceRollForward));
    assert_eq!(r.status, Status::Succeeded);
    let (_, routes) = tables(&forced).last().cloned().unwrap();
    assert_eq!(
        routes,
        [Route {
            deployment: "new".into(),
            weight: TOTAL_WEIGHT,
            workers: vec!["w4".into()]
        }]
    );
}

/// A promotion of two replicas on four workers, run to its end.
fn succeeded() -> Rollout {
    let (workers, routed) = fleet(2, 2);
    let mut r = Rollout::new(
        "old",
        "new",
        PromotionSettings::default(),
        2,
        workers,
        routed,
    );
    r.start();
    r.handle(ready("w2", "new"));
    let switched = r.handle(ready("w3", "new"));
    let (seq, _) = tables(&switched)[0].clone();
    r.handle(Event::TableAcked { seq });
    for w in ["w0", "w1"] {
        r.handle(Event::Drained { worker: w.into() });
        r.handle(Event::Stopped { worker: w.into() });
    }
    assert_eq!(r.status, Status::Succeeded);
    r
}

#[test]
fn after_a_promotion_scaling_starts_and_retires_replicas_behind_the_table() {
    let mut r = succeeded();
    let up = r.rescale(3);
    assert_eq!(applies(&up), [("w0".to_owned(), "new".to_owned())]);
    let joined = r.handle(ready("w0", "new"));
    assert_eq!(tables(&joined)[0].1[0].workers.len(), 3);

    let down = r.rescale(1);
    let (seq, routes) = tables(&down).last().cloned().unwrap();
    assert_eq!(routes[0].workers.len(), 1);
    assert!(
        drains(&down).is_empty(),
        "drained before the acknowledgement"
    );
    let acked = r.handle(Event::TableAcked { seq });
    assert_eq!(drains(&acked).len(), 2);

    // min = max = 0: everything leaves the table, then drains.
    let zero = r.rescale(0);
    let (_, routes) = tables(&zero).last().cloned().unwrap();
    assert!(routes.is_empty());
    assert_eq!(r.percent_to_candidate(), 0);
}

#[test]
fn an_evicted_replica_is_replaced_before_it_drains() {
    let mut r = succeeded();
    let cordoned = r.handle(Event::Worker {
        id: "w2".into(),
        worker: Worker {
            deployment: Some("new".into()),
            engine: Engine::Ready,
            eligible: false,
            evict: true,
        },
    });
    // The replacement starts first; w2 stays in the table meanwhile.
    assert_eq!(applies(&cordoned), [("w0".to_owned(), "new".to_owned())]);
    assert!(tables(&cordoned).is_empty());
    let replaced = r.handle(ready("w0", "new"));
    let (seq, routes) = tables(&replaced).last().cloned().unwrap();
    assert_eq!(routes[0].workers, ["w0", "w3"]);
    let acked = r.handle(Event::TableAcked { seq });
    assert_eq!(drains(&acked), ["w2"]);
}

fn lost(worker: &str) -> Event {
    Event::Worker {
        id: worker.into(),
        worker: Worker {
            deployment: None,
            engine: Engine::Unknown,
            eligible: false,
            evict: false,
        },
    }
}

#[test]
fn a_lost_worker_leaves_the_table_undrained_and_its_start_moves_elsewhere() {
    let (workers, routed) = fleet(3, 2);
    let mut r = Rollout::new("old", "new", rolling_surge(), 3, workers, routed);
    let start = r.start();
    assert_eq!(applies(&start), [("w3".to_owned(), "new".to_owned())]);

    // The host starting the candidate hangs: not a failed candidate; the
    // step starts on the other idle worker.
    let moved = r.handle(lost("w3"));
    assert_eq!(applies(&moved), [("w4".to_owned(), "new".to_owned())]);
    assert!(!r.status.is_terminal(), "{:?}", r.status);

    // A routed old replica hangs: out of the table at once, never drained.
    let out = r.handle(lost("w0"));
    let pushed = tables(&out);
    assert_eq!(pushed.len(), 1);
    assert!(
        pushed[0]
            .1
            .iter()
            .all(|route| !route.workers.contains(&"w0".to_owned())),
        "{pushed:?}"
    );
    assert!(drains(&out).is_empty());
    let acked = r.handle(Event::TableAcked { seq: pushed[0].0 });
    assert!(!drains(&acked).contains(&"w0".to_owned()));
    assert!(!r.claimed().contains("w0"), "a lost worker stays claimed");
}

#[test]
fn a_first_deployment_canceled_or_failed_ends_at_once() {
    let (workers, _) = fleet(0, 2);
    let first = |workers| {
        Rollout::new(
            "",
            "new",
            PromotionSettings::default(),
            2,
            workers,
            BTreeMap::new(),
        )
    };

    let mut r = first(workers.clone());
    assert_eq!(applies(&r.start()).len(), 2);
    let canceled = r.handle(Event::Command(Command::Cancel));
    assert_eq!(r.status, Status::Canceled);
    // Both loading replicas stop; nothing else is started.
    assert!(applies(&canceled).is_empty(), "{canceled:?}");

    let mut r = first(workers);
    r.start();
    let failed = r.handle(failed("w0", "new"));
    assert_eq!(r.status, Status::Failed);
    assert!(applies(&failed).is_empty(), "{failed:?}");
    assert!(!r.reason.is_empty());
}

#[test]
fn cancel_returns_draining_old_replicas_to_service_without_a_reload() {
    let (workers, routed) = fleet(4, 0);
    let mut r = Rollout::new("old", "new", unavailable_half(), 4, workers, routed);
    let start = r.start();
    let (seq, _) = tables(&start).last().cloned().unwrap();
    assert_eq!(drains(&r.handle(Event::TableAcked { seq })), ["w0", "w1"]);

    // Canceled while w0 and w1 drain: they are told to stop draining, and
    // nothing reloads the old deployment.
    let canceled = r.handle(Event::Command(Command::Cancel));
    let undrained: Vec<&Action> = canceled
        .iter()
        .filter(|a| matches!(a, Action::Undrain { .. }))
        .collect();
    assert_eq!(undrained.len(), 2, "{canceled:?}");
    let mut actions = Vec::new();
    for worker in ["w0", "w1"] {
        actions.extend(r.handle(ready(worker, "old")));
        // A drain that answers late changes nothing.
        actions.extend(r.handle(Event::Drained {
            worker: worker.into(),
        }));
    }
    let seq = r.seq;
    actions.extend(r.handle(Event::TableAcked { seq }));
    let seq = r.seq;
    actions.extend(r.handle(Event::TableAcked { seq }));
    assert!(applies(&actions).is_empty(), "{actions:?}");
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Stop { .. })),
        "{actions:?}"
    );
    assert_eq!(r.status, Status::Canceled);
    assert_eq!(r.replicas("old").0, 4);
}

#[test]
fn force_roll_forward_lets_loading_candidates_finish() {
    let (workers, routed) = fleet(2, 1);
    let settings = PromotionSettings {
        max_surge_percent: 50,
        ..rolling_surge()
    };
    let mut r = Rollout::new("old", "new", settings, 2, workers, routed);
    assert_eq!(applies(&r.start()), [("w2".to_owned(), "new".to_owned())]);
    r.handle(ready("w2", "new"));
    let seq = r.seq;
    r.handle(Event::TableAcked { seq });
    r.handle(Event::Drained {
        worker: "w0".into(),
    });
    let next = r.handle(Event::Stopped {
        worker: "w0".into(),
    });
    let loading: Vec<String> = applies(&next).into_iter().map(|(w, _)| w).collect();
    assert_eq!(loading.len(), 1, "{next:?}");
    // Forced while the second candidate replica loads: it is not stopped.
    let forced = r.handle(Event::Command(Command::ForceRollForward));
    assert_eq!(r.status, Status::Succeeded);
    assert!(
        !forced
            .iter()
            .any(|a| matches!(a, Action::Stop { worker } if *worker == loading[0])),
        "{forced:?}"
    );
    // Once ready it joins the table.
    r.handle(ready(&loading[0], "new"));
    assert_eq!(r.replicas("new").0, 2);
}

#[test]
fn a_kept_deployment_promoted_back_reuses_its_warm_engines_without_a_reload() {
    // w2 and w3 still run "new", ready and out of the table (cleanup KEEP
    // of an earlier promotion away from it).
    let (mut workers, routed) = fleet(2, 2);
    for id in ["w2", "w3"] {
        workers.insert(
            id.into(),
            Worker {
                deployment: Some("new".into()),
                engine: Engine::Ready,
                eligible: true,
                evict: false,
            },
        );
    }
    let surge = PromotionSettings {
        rolling_deploy: true,
        max_surge_percent: 50,
        ..PromotionSettings::default()
    };
    let mut r = Rollout::new("old", "new", surge, 2, workers, routed);
    assert!(r.wants_warm("new") && !r.wants_warm("old"));
    let mut actions = r.start();
    // Each step takes a warm engine at once: the table changes with no
    // `Apply` at all, through to the end.
    for _ in 0..20 {
        assert!(applies(&actions).is_empty(), "{actions:?}");
        let mut next = Vec::new();
        for action in &actions {
            next.extend(match action {
                Action::PushTable { seq, .. } => r.handle(Event::TableAcked { seq: *seq }),
                Action::Drain { worker } => r.handle(Event::Drained {
                    worker: worker.clone(),
                }),
                Action::Stop { worker } => r.handle(Event::Stopped {
                    worker: worker.clone(),
                }),
                _ => Vec::new(),
            });
        }
        actions = next;
    }
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.routes().len(), 1);
    assert_eq!(r.routes()[0].deployment, "new");
    assert_eq!(r.routes()[0].workers, ["w2", "w3"]);
}

#[test]
fn a_candidate_replica_on_a_cordoned_worker_is_replaced_before_it_leaves() {
    // Mid-promotion: w1's candidate replica serves, its worker is cordoned.
    let mut r = Rollout::new(
        "old",
        "new",
        rolling_surge(),
        2,
        {
            let (mut w, _) = fleet(0, 4);
            w.insert(
                "w0".into(),
                Worker {
                    deployment: Some("old".into()),
                    engine: Engine::Ready,
                    eligible: true,
                    evict: false,
                },
            );
            w.insert(
                "w1".into(),
                Worker {
                    deployment: Some("new".into()),
                    engine: Engine::Ready,
                    eligible: false,
                    evict: true,
                },
            );
            w
        },
        [
            ("w0".to_owned(), "old".to_owned()),
            ("w1".to_owned(), "new".to_owned()),
        ]
        .into(),
    );
    let start = r.start();
    // A new replica for the cordoned one starts on an idle worker; the
    // cordoned replica is still routed meanwhile (add first).
    let started = applies(&start);
    assert_eq!(started.len(), 1, "{start:?}");
    assert_ne!(started[0].0, "w1");
    assert!(r.routed.contains_key("w1"));
    let shifted = r.handle(ready(&started[0].0, "new"));
    // Then it leaves the table before any old replica that is healthy.
    let (_, routes) = tables(&shifted).pop().unwrap();
    let named: Vec<&String> = routes.iter().flat_map(|r| &r.workers).collect();
    assert!(!named.contains(&&"w1".to_owned()), "{routes:?}");
    assert!(named.contains(&&"w0".to_owned()), "{routes:?}");
}

#[test]
fn a_worker_that_runs_a_foreign_deployment_is_a_lost_start_retried_elsewhere() {
    let (workers, routed) = fleet(2, 2);
    let mut r = Rollout::new("old", "new", rolling_surge(), 2, workers, routed);
    let start = r.start();
    assert_eq!(applies(&start), [("w2".to_owned(), "new".to_owned())]);
    // Another caller got there first.
    let lost = r.handle(ready("w2", "someone-else"));
    assert!(!r.is_starting("w2"));
    assert_eq!(applies(&lost), [("w3".to_owned(), "new".to_owned())]);
    assert_eq!(r.status, Status::Releasing, "not a failed candidate");
}
