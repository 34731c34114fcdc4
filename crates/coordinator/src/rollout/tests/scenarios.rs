//! Promotions step by step, by hand.

use std::collections::BTreeMap;

use super::super::*;
use super::support::*;
use crate::settings::PromotionSettings;

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
    let next = drained_and_stopped(&mut r, "w0");
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
    let next = drained_and_stopped(&mut r, "w0");
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
