//! Promotions step by step, by hand.

use std::collections::BTreeMap;

use super::super::*;
use crate::settings::Cleanup;

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

/// Feeds `event`; the health gate passes each step's end at once (its own
/// behaviour is tested apart).
fn handle(r: &mut Rollout, event: Event) -> Vec<Action> {
    let mut out = r.handle(event);
    for _ in 0..100 {
        if !out.contains(&Action::JudgeHealth) {
            break;
        }
        out.retain(|a| *a != Action::JudgeHealth);
        out.extend(r.handle(Event::Health(Verdict::Pass)));
    }
    out
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
    let start = r.start(0);
    assert_eq!(applies(&start), [("w4".to_owned(), "new".to_owned())]);
    assert_eq!(r.status, Status::Releasing);
    assert_eq!(r.phase, Phase::WaitingReady);

    let shifted = handle(&mut r, ready("w4", "new"));
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

    let acked = handle(&mut r, Event::TableAcked { seq: *seq });
    assert_eq!(drains(&acked), ["w0"]);
    let stopped = handle(
        &mut r,
        Event::Drained {
            worker: "w0".into(),
        },
    );
    assert_eq!(
        stopped,
        [Action::Stop {
            worker: "w0".into()
        }]
    );
    let next = handle(
        &mut r,
        Event::Stopped {
            worker: "w0".into(),
        },
    );
    // No stabilization time: the next step starts on the freed worker.
    assert_eq!(r.step, 2);
    assert_eq!(applies(&next), [("w0".to_owned(), "new".to_owned())]);
}

#[test]
fn unavailable_mode_updates_in_place_behind_the_table() {
    let (workers, routed) = fleet(4, 0);
    let mut r = Rollout::new("old", "new", unavailable_half(), 4, workers, routed);
    let start = r.start(0);
    // Two old replicas out of the table first, one table each; nothing
    // drains yet.
    let pushed = tables(&start);
    assert_eq!(pushed.len(), 2);
    assert_eq!(pushed[1].1[0].workers, ["w2", "w3"]);
    assert!(drains(&start).is_empty() && applies(&start).is_empty());
    let acked = handle(&mut r, Event::TableAcked { seq: 2 });
    assert_eq!(drains(&acked), ["w0", "w1"]);
    let started = handle(
        &mut r,
        Event::Drained {
            worker: "w0".into(),
        },
    );
    assert_eq!(applies(&started), [("w0".to_owned(), "new".to_owned())]);
    handle(
        &mut r,
        Event::Drained {
            worker: "w1".into(),
        },
    );
    handle(&mut r, ready("w0", "new"));
    let shifted = handle(&mut r, ready("w1", "new"));
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
    let start = r.start(0);
    assert_eq!(applies(&start).len(), 2);
    assert!(tables(&handle(&mut r, ready("w2", "new"))).is_empty());
    let switched = handle(&mut r, ready("w3", "new"));
    let (seq, routes) = tables(&switched)[0].clone();
    assert_eq!(routes.len(), 1);
    assert_eq!(
        (routes[0].deployment.as_str(), routes[0].weight),
        ("new", TOTAL_WEIGHT)
    );
    let acked = handle(&mut r, Event::TableAcked { seq });
    assert_eq!(drains(&acked), ["w0", "w1"]);
    handle(
        &mut r,
        Event::Drained {
            worker: "w0".into(),
        },
    );
    handle(
        &mut r,
        Event::Drained {
            worker: "w1".into(),
        },
    );
    handle(
        &mut r,
        Event::Stopped {
            worker: "w0".into(),
        },
    );
    handle(
        &mut r,
        Event::Stopped {
            worker: "w1".into(),
        },
    );
    assert_eq!(r.status, Status::Succeeded);
    assert!(r.is_settled());
}

#[test]
fn pause_lets_starts_finish_but_pins_the_split_until_resume() {
    let (workers, routed) = fleet(4, 1);
    let mut r = Rollout::new("old", "new", rolling_surge(), 4, workers, routed);
    r.start(0);
    handle(&mut r, Event::Command(Command::Pause));
    assert_eq!(r.status, Status::Paused);
    // The start under way finishes, but no traffic moves (Baseten's pause).
    let held = handle(&mut r, ready("w4", "new"));
    assert!(tables(&held).is_empty(), "{held:?}");
    assert_eq!(r.percent_to_candidate(), 0);
    assert_eq!(r.step, 1);
    // Resume: the ready replica takes its share, one old one leaves.
    let resumed = handle(&mut r, Event::Command(Command::Resume));
    assert_eq!(r.status, Status::RampingUp);
    let (seq, _) = tables(&resumed)[0].clone();
    assert_eq!(r.percent_to_candidate(), 25);
    let acked = handle(&mut r, Event::TableAcked { seq });
    assert_eq!(drains(&acked), ["w0"]);
    handle(
        &mut r,
        Event::Drained {
            worker: "w0".into(),
        },
    );
    let next = handle(
        &mut r,
        Event::Stopped {
            worker: "w0".into(),
        },
    );
    assert_eq!(applies(&next), [("w0".to_owned(), "new".to_owned())]);
}

#[test]
fn a_failed_candidate_fails_the_promotion_with_traffic_on_the_old_deployment() {
    let (workers, routed) = fleet(2, 1);
    let mut r = Rollout::new("old", "new", rolling_surge(), 2, workers, routed);
    r.start(0);
    let failed = handle(&mut r, failed("w2", "new"));
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.percent_to_candidate(), 0);
    assert!(tables(&failed).is_empty(), "the table never changed");
    assert!(failed.contains(&Action::Stop {
        worker: "w2".into()
    }));
    assert!(r.reason.contains("w2"));

    // Once it has stopped, the worker where the candidate failed can host
    // the old deployment again: a failure is not held against it forever.
    handle(
        &mut r,
        Event::Stopped {
            worker: "w2".into(),
        },
    );
    handle(
        &mut r,
        Event::Worker {
            id: "w2".into(),
            worker: Worker {
                deployment: None,
                engine: Engine::Idle,
                eligible: true,
                evict: false,
            },
        },
    );
    assert_eq!(
        applies(&r.rescale(3)),
        [("w2".to_owned(), "old".to_owned())]
    );
}

#[test]
fn force_roll_forward_puts_all_traffic_on_a_ready_candidate_at_once() {
    let (workers, routed) = fleet(4, 1);
    let mut r = Rollout::new("old", "new", rolling_surge(), 4, workers, routed);
    r.start(0);
    let shifted = handle(&mut r, ready("w4", "new"));
    let (seq, _) = tables(&shifted)[0].clone();
    handle(&mut r, Event::TableAcked { seq });
    let forced = handle(&mut r, Event::Command(Command::ForceRollForward));
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
    r.start(0);
    handle(&mut r, ready("w2", "new"));
    let switched = handle(&mut r, ready("w3", "new"));
    let (seq, _) = tables(&switched)[0].clone();
    handle(&mut r, Event::TableAcked { seq });
    for w in ["w0", "w1"] {
        handle(&mut r, Event::Drained { worker: w.into() });
        handle(&mut r, Event::Stopped { worker: w.into() });
    }
    assert_eq!(r.status, Status::Succeeded);
    r
}

#[test]
fn after_a_promotion_scaling_starts_and_retires_replicas_behind_the_table() {
    let mut r = succeeded();
    let up = r.rescale(3);
    assert_eq!(applies(&up), [("w0".to_owned(), "new".to_owned())]);
    let joined = handle(&mut r, ready("w0", "new"));
    assert_eq!(tables(&joined)[0].1[0].workers.len(), 3);

    let down = r.rescale(1);
    let (seq, routes) = tables(&down).last().cloned().unwrap();
    assert_eq!(routes[0].workers.len(), 1);
    assert!(
        drains(&down).is_empty(),
        "drained before the acknowledgement"
    );
    let acked = handle(&mut r, Event::TableAcked { seq });
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
    let cordoned = handle(
        &mut r,
        Event::Worker {
            id: "w2".into(),
            worker: Worker {
                deployment: Some("new".into()),
                engine: Engine::Ready,
                eligible: false,
                evict: true,
            },
        },
    );
    // The replacement starts first; w2 stays in the table meanwhile.
    assert_eq!(applies(&cordoned), [("w0".to_owned(), "new".to_owned())]);
    assert!(tables(&cordoned).is_empty());
    let replaced = handle(&mut r, ready("w0", "new"));
    let (seq, routes) = tables(&replaced).last().cloned().unwrap();
    assert_eq!(routes[0].workers, ["w0", "w3"]);
    let acked = handle(&mut r, Event::TableAcked { seq });
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
    let start = r.start(0);
    assert_eq!(applies(&start), [("w3".to_owned(), "new".to_owned())]);

    // The host starting the candidate hangs: not a failed candidate; the
    // step starts on the other idle worker.
    let moved = handle(&mut r, lost("w3"));
    assert_eq!(applies(&moved), [("w4".to_owned(), "new".to_owned())]);
    assert!(!r.status.is_terminal(), "{:?}", r.status);

    // A routed old replica hangs: out of the table at once, never drained.
    let out = handle(&mut r, lost("w0"));
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
    let acked = handle(&mut r, Event::TableAcked { seq: pushed[0].0 });
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
    assert_eq!(applies(&r.start(0)).len(), 2);
    let canceled = handle(&mut r, Event::Command(Command::Cancel));
    assert_eq!(r.status, Status::Canceled);
    // Both loading replicas stop; nothing else is started.
    assert!(applies(&canceled).is_empty(), "{canceled:?}");

    let mut r = first(workers);
    r.start(0);
    let failed = handle(&mut r, failed("w0", "new"));
    assert_eq!(r.status, Status::Failed);
    assert!(applies(&failed).is_empty(), "{failed:?}");
    assert!(!r.reason.is_empty());
}

#[test]
fn cancel_returns_draining_old_replicas_to_service_without_a_reload() {
    let (workers, routed) = fleet(4, 0);
    let mut r = Rollout::new("old", "new", unavailable_half(), 4, workers, routed);
    let start = r.start(0);
    let (seq, _) = tables(&start).last().cloned().unwrap();
    assert_eq!(
        drains(&handle(&mut r, Event::TableAcked { seq })),
        ["w0", "w1"]
    );

    // Canceled while w0 and w1 drain: they are told to stop draining, and
    // nothing reloads the old deployment.
    let canceled = handle(&mut r, Event::Command(Command::Cancel));
    let undrained: Vec<&Action> = canceled
        .iter()
        .filter(|a| matches!(a, Action::Undrain { .. }))
        .collect();
    assert_eq!(undrained.len(), 2, "{canceled:?}");
    let mut actions = Vec::new();
    for worker in ["w0", "w1"] {
        actions.extend(handle(&mut r, ready(worker, "old")));
        // A drain that answers late changes nothing.
        actions.extend(handle(
            &mut r,
            Event::Drained {
                worker: worker.into(),
            },
        ));
    }
    let seq = r.seq;
    actions.extend(handle(&mut r, Event::TableAcked { seq }));
    let seq = r.seq;
    actions.extend(handle(&mut r, Event::TableAcked { seq }));
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
    assert_eq!(applies(&r.start(0)), [("w2".to_owned(), "new".to_owned())]);
    handle(&mut r, ready("w2", "new"));
    let seq = r.seq;
    handle(&mut r, Event::TableAcked { seq });
    handle(
        &mut r,
        Event::Drained {
            worker: "w0".into(),
        },
    );
    let next = handle(
        &mut r,
        Event::Stopped {
            worker: "w0".into(),
        },
    );
    let loading: Vec<String> = applies(&next).into_iter().map(|(w, _)| w).collect();
    assert_eq!(loading.len(), 1, "{next:?}");
    // Forced while the second candidate replica loads: it is not stopped.
    let forced = handle(&mut r, Event::Command(Command::ForceRollForward));
    assert_eq!(r.status, Status::Succeeded);
    assert!(
        !forced
            .iter()
            .any(|a| matches!(a, Action::Stop { worker } if *worker == loading[0])),
        "{forced:?}"
    );
    // Once ready it joins the table.
    handle(&mut r, ready(&loading[0], "new"));
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
    let mut actions = r.start(0);
    // Each step takes a warm engine at once: the table changes with no
    // `Apply` at all, through to the end.
    for _ in 0..20 {
        assert!(applies(&actions).is_empty(), "{actions:?}");
        let mut next = Vec::new();
        for action in &actions {
            next.extend(match action {
                Action::PushTable { seq, .. } => handle(&mut r, Event::TableAcked { seq: *seq }),
                Action::Drain { worker } => handle(
                    &mut r,
                    Event::Drained {
                        worker: worker.clone(),
                    },
                ),
                Action::Stop { worker } => handle(
                    &mut r,
                    Event::Stopped {
                        worker: worker.clone(),
                    },
                ),
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
    let start = r.start(0);
    // A new replica for the cordoned one starts on an idle worker; the
    // cordoned replica is still routed meanwhile (add first).
    let started = applies(&start);
    assert_eq!(started.len(), 1, "{start:?}");
    assert_ne!(started[0].0, "w1");
    assert!(r.routed.contains_key("w1"));
    let shifted = handle(&mut r, ready(&started[0].0, "new"));
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
    let start = r.start(0);
    assert_eq!(applies(&start), [("w2".to_owned(), "new".to_owned())]);
    // Another caller got there first.
    let lost = handle(&mut r, ready("w2", "someone-else"));
    assert!(!r.is_starting("w2"));
    assert_eq!(applies(&lost), [("w3".to_owned(), "new".to_owned())]);
    assert_eq!(r.status, Status::Releasing, "not a failed candidate");
}

#[test]
fn autoscaling_during_a_paused_promotion_adds_at_once_split_by_traffic_capped_by_max() {
    // 60/40: three old replicas, two candidate ones, ten idle workers.
    let (mut workers, mut routed) = fleet(5, 10);
    for id in ["w3", "w4"] {
        workers.insert(
            id.into(),
            Worker {
                deployment: Some("new".into()),
                engine: Engine::Ready,
                eligible: true,
                evict: false,
            },
        );
        routed.insert(id.into(), "new".into());
    }
    let mut r = Rollout::new("old", "new", rolling_surge(), 5, workers, routed);
    handle(&mut r, Event::Command(Command::Pause));
    assert_eq!(r.status, Status::Paused);
    // Ten more replicas of demand: six old, four candidate, now.
    let scaled = r.autoscale(15, 100);
    let started = applies(&scaled);
    let on = |d: &str| started.iter().filter(|(_, x)| x == d).count();
    assert_eq!((on("old"), on("new")), (6, 4), "{scaled:?}");
    assert_eq!(r.target, 15);
    // Each joins the table as soon as it is ready, paused or not.
    let (worker, deployment) = started[0].clone();
    let joined = handle(&mut r, ready(&worker, &deployment));
    assert!(r.routed.contains_key(&worker), "{joined:?}");
    assert_eq!(r.status, Status::Paused);
    // Falling demand removes nothing until the end; the maximum caps the
    // total (fifteen run or start now).
    assert!(r.autoscale(3, 100).is_empty());
    assert!(applies(&r.autoscale(40, 15)).is_empty());
    assert_eq!(r.routed.len() + r.scaling.len(), 15);
}

#[test]
fn the_health_gate_judges_each_step_end_and_pauses_when_it_cannot_decide() {
    let (workers, routed) = fleet(4, 1);
    let mut r = Rollout::new("old", "new", rolling_surge(), 4, workers, routed);
    r.start(0);
    // Step 1 through to its end, the gate's call unanswered.
    let mut pending = r.handle(ready("w4", "new"));
    let mut judged = false;
    for _ in 0..20 {
        let mut next = Vec::new();
        for action in std::mem::take(&mut pending) {
            next.extend(match action {
                Action::PushTable { seq, .. } => r.handle(Event::TableAcked { seq }),
                Action::Drain { worker } => r.handle(Event::Drained { worker }),
                Action::Stop { worker } => r.handle(Event::Stopped { worker }),
                Action::JudgeHealth => {
                    judged = true;
                    Vec::new()
                }
                _ => Vec::new(),
            });
        }
        pending = next;
    }
    assert!(judged, "the step's end asks for a verdict");
    assert_eq!(r.phase, Phase::Judging);
    assert_eq!(r.step, 1);
    // Nothing moves until the gate answers; too few requests to judge
    // pause with the reason.
    let paused = r.handle(Event::Health(Verdict::Undecided(
        "new failed 3 of 5 requests".into(),
    )));
    assert_eq!(r.status, Status::Paused);
    assert!(r.reason.contains("health gate undecided"), "{}", r.reason);
    assert!(applies(&paused).is_empty());
    // The operator's resume is the verdict: the next step starts.
    let resumed = r.handle(Event::Command(Command::Resume));
    assert_eq!(r.status, Status::RampingUp);
    assert_eq!(r.step, 2);
    assert_eq!(applies(&resumed).len(), 1, "{resumed:?}");
}

#[test]
fn a_health_gate_that_never_answers_pauses_the_promotion_after_its_bound() {
    let settings = PromotionSettings {
        max_surge_percent: 100,
        ..rolling_surge()
    };
    let (workers, routed) = fleet(1, 1);
    let mut r = Rollout::new("old", "new", settings, 1, workers, routed);
    r.start(0);
    r.handle(ready("w1", "new"));
    r.handle(Event::TableAcked { seq: r.seq });
    r.handle(Event::Drained {
        worker: "w0".into(),
    });
    let asked = r.handle(Event::Stopped {
        worker: "w0".into(),
    });
    assert!(asked.contains(&Action::JudgeHealth), "{asked:?}");
    r.handle(Event::Tick { now_ms: 29_000 });
    assert_eq!(r.status, Status::RampingUp);
    r.handle(Event::Tick { now_ms: 31_000 });
    assert_eq!(r.status, Status::Paused);
    assert!(r.reason.contains("no verdict within 30 s"), "{}", r.reason);
    // A failing verdict still fails it: no old replica is left, so traffic
    // ramps back down to a new one before it ends FAILED.
    r.handle(Event::Health(Verdict::Fail("new failed 50 of 100".into())));
    assert_eq!(r.status, Status::RampingDown);
    assert_eq!(
        r.direction,
        Direction::Backward {
            end: Status::Failed
        }
    );
}

#[test]
fn a_warm_rollback_with_keep_runs_on_the_wall_clock_without_a_pause() {
    // v3 serves on a and b; v1's engines are kept, drained, on c and d.
    let mut workers = BTreeMap::new();
    let mut routed = BTreeMap::new();
    for (id, deployment, engine) in [
        ("a", "v3", Engine::Ready),
        ("b", "v3", Engine::Ready),
        ("c", "v1", Engine::Draining),
        ("d", "v1", Engine::Draining),
    ] {
        workers.insert(
            id.to_owned(),
            Worker {
                deployment: Some(deployment.into()),
                engine,
                eligible: true,
                evict: false,
            },
        );
        if deployment == "v3" {
            routed.insert(id.to_owned(), "v3".to_owned());
        }
    }
    let settings = PromotionSettings {
        rolling_deploy: true,
        max_surge_percent: 50,
        cleanup: Cleanup::Keep,
        ..PromotionSettings::default()
    };
    let mut r = Rollout::new("v3", "v1", settings, 2, workers, routed);
    // The wall clock: the gate's deadline counts from it, not from zero
    // (a warm step reaches its gate before the first tick).
    let now = 1_800_000_000_000;
    let mut actions = r.start(now);
    let mut applied = Vec::new();
    for i in 1..=20 {
        let mut next = Vec::new();
        for action in &actions {
            next.extend(match action {
                Action::PushTable { seq, .. } => r.handle(Event::TableAcked { seq: *seq }),
                Action::Drain { worker } => {
                    let mut w = r.workers[worker].clone();
                    w.engine = Engine::Draining;
                    let mut out = r.handle(Event::Worker {
                        id: worker.clone(),
                        worker: w,
                    });
                    out.extend(r.handle(Event::Drained {
                        worker: worker.clone(),
                    }));
                    out
                }
                Action::Apply { worker, deployment } => {
                    applied.push(worker.clone());
                    // The agent undrains its own deployment's engine.
                    r.handle(ready(worker, deployment))
                }
                Action::JudgeHealth => r.handle(Event::Health(Verdict::Pass)),
                _ => Vec::new(),
            });
        }
        next.extend(r.handle(Event::Tick {
            now_ms: now + i * 1000,
        }));
        assert_ne!(r.status, Status::Paused, "{}", r.reason);
        actions = next;
    }
    assert_eq!(r.status, Status::Succeeded);
    assert_eq!(r.routes()[0].workers, ["c", "d"]);
    // v3's replicas left the table and were kept, drained, not stopped.
    assert!(r.is_settled());
    // Only the kept engines were asked for v1 (an undrain, no reload).
    applied.sort();
    assert_eq!(applied, ["c", "d"]);
}
