//! By hand: warm engines and KEEP, cordons and foreign deployments during
//! a promotion, autoscaling during a promotion, the health gate at each
//! step's end.

use std::collections::BTreeMap;

use super::super::*;
use super::support::*;
use crate::settings::{Cleanup, PromotionSettings};

#[test]
fn a_kept_deployment_promoted_back_reuses_its_warm_engines_without_a_reload() {
    // w2 and w3 still run "new", ready and out of the table (cleanup KEEP
    // of an earlier promotion away from it).
    let (mut workers, routed) = fleet(2, 2);
    for id in ["w2", "w3"] {
        workers.insert(id.into(), worker(Some("new"), Engine::Ready));
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
        workers.insert(id.into(), worker(Some("new"), Engine::Ready));
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

#[test]
fn a_failure_in_a_view_older_than_the_apply_is_not_the_new_starts() {
    // w2's last engine of the candidate crashed before this promotion.
    let (mut workers, routed) = fleet(2, 1);
    workers.insert("w2".into(), {
        let mut w = worker(Some("new"), Engine::Failed);
        w.eligible = true;
        w
    });
    let mut r = Rollout::new("old", "new", rolling_surge(), 2, workers, routed);
    let start = r.start(0);
    assert_eq!(applies(&start), [("w2".to_owned(), "new".to_owned())]);
    // Nothing new from its agent yet: the old failure is not this start's.
    handle(&mut r, Event::Tick { now_ms: 1_000 });
    assert_eq!(r.status, Status::Releasing);
    assert!(r.is_starting("w2"));
    // Its agent reports the start, then a failure: that one counts.
    handle(
        &mut r,
        Event::Worker {
            id: "w2".into(),
            worker: worker(Some("new"), Engine::Starting),
        },
    );
    handle(&mut r, failed("w2", "new"));
    assert_eq!(r.status, Status::Failed, "{}", r.reason);
}

/// Drives an in-place rolling promotion to its end; the answers of each
/// round's drains and stops are one [`Event::Many`] when `batched`. The
/// final rollout and every `Apply` asked.
fn in_place_to_the_end(batched: bool) -> (Rollout, Vec<(String, String)>) {
    let (workers, routed) = fleet(8, 0);
    let mut r = Rollout::new("old", "new", unavailable_half(), 8, workers, routed);
    let mut actions = r.start(0);
    let mut asked = Vec::new();
    let mut now_ms = 0;
    for _ in 0..100 {
        if r.status.is_terminal() {
            break;
        }
        asked.extend(applies(&actions));
        let mut answers = Vec::new();
        let mut next = Vec::new();
        for action in std::mem::take(&mut actions) {
            match action {
                Action::PushTable { seq, .. } => next.extend(r.handle(Event::TableAcked { seq })),
                Action::Apply { worker, deployment } => {
                    next.extend(r.handle(ready(&worker, &deployment)));
                }
                Action::JudgeHealth => next.extend(r.handle(Event::Health(Verdict::Pass))),
                Action::Drain { worker } => answers.push(Event::Drained { worker }),
                Action::Stop { worker } => answers.push(Event::Stopped { worker }),
                _ => {}
            }
        }
        if batched {
            next.extend(r.handle(Event::Many(answers)));
        } else {
            for answer in answers {
                next.extend(r.handle(answer));
            }
        }
        now_ms += 1_000;
        next.extend(r.handle(Event::Tick { now_ms }));
        actions = next;
    }
    (r, asked)
}

#[test]
fn answers_taken_at_once_end_where_answers_taken_one_by_one_do() {
    let (one_by_one, asked_one_by_one) = in_place_to_the_end(false);
    let (at_once, asked_at_once) = in_place_to_the_end(true);
    assert_eq!(one_by_one.status, Status::Succeeded);
    assert_eq!(at_once.status, Status::Succeeded);
    assert_eq!(at_once.routes(), one_by_one.routes());
    assert_eq!(at_once.routes()[0].workers.len(), 8);
    // The same replicas started, each once (in place: on the same workers).
    let sorted = |mut v: Vec<(String, String)>| {
        v.sort();
        v
    };
    assert_eq!(sorted(asked_at_once), sorted(asked_one_by_one));
}
