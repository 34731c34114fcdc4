//! Choosing where a request goes: a deployment by weight (sticky when the
//! request carries a session key), then a worker of that deployment by the
//! power of two choices on the router's own in-flight counts.

use std::sync::Arc;

use crate::table::{BASIS_POINTS, Deployment, Endpoint, Worker};

/// Where a session key falls in 0..[`BASIS_POINTS`].
///
/// Every router must map a key to the same point, across versions, so that
/// a conversation sees one version whichever router it reaches: the hash is
/// FNV-1a (64 bits) followed by the SplitMix64 finaliser (FNV's low bits
/// alone are not uniform enough for `mod 10000`), written out here rather
/// than taken from a library whose output could change.
pub fn session_point(key: &[u8]) -> u32 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = key.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    (hash % u64::from(BASIS_POINTS)) as u32
}

/// The deployment for a request: by its session key's point when it has
/// one, else by a random point; `None` when the endpoint has no capacity
/// (every weight 0).
pub fn choose_deployment<'a>(
    endpoint: &'a Endpoint,
    session_key: Option<&[u8]>,
    rng: &mut fastrand::Rng,
) -> Option<&'a Deployment> {
    let point = match session_key {
        Some(key) => session_point(key),
        None => rng.u32(0..BASIS_POINTS),
    };
    endpoint.deployment_at(point)
}

/// A worker by the power of two choices: two distinct random candidates,
/// the one with fewer requests in flight wins. Candidates are the workers
/// not `excluded` (already tried for this request) and not ejected; when
/// every such worker is ejected, the ejected ones are candidates again
/// (sending to a worker that may have recovered beats refusing outright).
/// `None` when every worker is excluded.
pub fn choose_worker<'a>(
    workers: &'a [Arc<Worker>],
    excluded: impl Fn(&Worker) -> bool,
    now_ms: u64,
    rng: &mut fastrand::Rng,
) -> Option<&'a Arc<Worker>> {
    let healthy = |w: &Worker| !excluded(w) && !w.is_ejected(now_ms);
    match two_choices(workers, healthy, rng) {
        Some(worker) => Some(worker),
        None => two_choices(workers, |w| !excluded(w), rng),
    }
}

fn two_choices<'a>(
    workers: &'a [Arc<Worker>],
    eligible: impl Fn(&Worker) -> bool,
    rng: &mut fastrand::Rng,
) -> Option<&'a Arc<Worker>> {
    // Counting and indexing the eligible workers twice costs less than
    // collecting them: deployments have a handful of workers, and this runs
    // on every request.
    let count = workers.iter().filter(|w| eligible(w)).count();
    let nth = |n: usize| workers.iter().filter(|w| eligible(w)).nth(n);
    match count {
        0 => None,
        1 => nth(0),
        _ => {
            let a = rng.usize(0..count);
            let mut b = rng.usize(0..count - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (nth(a)?, nth(b)?);
            Some(if b.in_flight() < a.in_flight() { b } else { a })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use crossfade_proto::v1;
    use proptest::prelude::*;

    use super::*;
    use crate::table::{EjectionPolicy, Shared, Source, Table};

    fn table(weights: &[u32], workers_each: usize) -> Table {
        let spec = v1::RoutingTable {
            version: 1,
            endpoints: vec![v1::EndpointRoute {
                created: 0,
                name: "chat".into(),
                aliases: vec![],
                deployments: weights
                    .iter()
                    .enumerate()
                    .map(|(i, &weight)| v1::DeploymentRoute {
                        max_model_len: 0,
                        id: format!("d{i}"),
                        weight,
                        workers: (0..workers_each)
                            .map(|j| v1::WorkerRoute {
                                address: format!("127.0.0.1:{}", 10_000 + i * 100 + j),
                                worker_id: String::new(),
                            })
                            .collect(),
                    })
                    .collect(),
            }],
        };
        Table::build(&spec, Source::Config, &Shared::default()).unwrap()
    }

    fn shares(endpoint: &Endpoint) -> HashMap<String, u32> {
        let mut counts = HashMap::new();
        for point in 0..BASIS_POINTS {
            if let Some(d) = endpoint.deployment_at(point) {
                *counts.entry(d.id().to_owned()).or_insert(0) += 1;
            }
        }
        counts
    }

    #[test]
    fn an_80_20_split_is_exact_over_the_points() {
        let t = table(&[80, 20], 1);
        let counts = shares(t.endpoint("chat").unwrap());
        assert_eq!(counts["d0"], 8_000);
        assert_eq!(counts["d1"], 2_000);
    }

    #[test]
    fn random_choice_follows_the_weights() {
        let t = table(&[80, 20], 1);
        let endpoint = t.endpoint("chat").unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let first = (0..10_000)
            .filter(|_| choose_deployment(endpoint, None, &mut rng).unwrap().id() == "d0")
            .count();
        assert!(
            (7_700..=8_300).contains(&first),
            "{first} of 10000 on the 80 % side"
        );
    }

    #[test]
    fn no_capacity_when_every_weight_is_zero() {
        let t = table(&[0, 0], 1);
        assert!(t.endpoint("chat").unwrap().deployment_at(0).is_none());
        assert!(
            choose_deployment(t.endpoint("chat").unwrap(), None, &mut fastrand::Rng::new())
                .is_none()
        );
    }

    #[test]
    fn session_points_are_stable_and_spread() {
        // Pinned: routers of every version must agree on where a key falls.
        assert_eq!(
            session_point(b"conversation-42"),
            session_point(b"conversation-42")
        );
        let pinned = [
            session_point(b""),
            session_point(b"a"),
            session_point(b"user-1"),
        ];
        assert_eq!(pinned, [PINNED_EMPTY, PINNED_A, PINNED_USER_1]);

        let mut buckets = [0u32; 10];
        for i in 0..10_000 {
            buckets[(session_point(format!("session-{i}").as_bytes()) / 1_000) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (850..=1_150).contains(&n)),
            "{buckets:?}"
        );
    }

    // Computed independently (a few lines of Python) from the definition above.
    const PINNED_EMPTY: u32 = 6_203;
    const PINNED_A: u32 = 3_736;
    const PINNED_USER_1: u32 = 7_624;

    #[test]
    fn two_choices_prefers_the_less_loaded_worker() {
        let t = table(&[1], 4);
        let workers = t.endpoint("chat").unwrap().deployments()[0].workers();
        // Workers 1..3 carry 10 requests each; worker 0 none.
        let _guards: Vec<_> = workers[1..]
            .iter()
            .flat_map(|w| (0..10).map(|_| w.start_request()))
            .collect();
        let mut rng = fastrand::Rng::with_seed(1);
        let idle = (0..1_000)
            .filter(|_| {
                let w = choose_worker(workers, |_| false, 0, &mut rng).unwrap();
                Arc::ptr_eq(w, &workers[0])
            })
            .count();
        // Worker 0 wins whenever it is one of the two picks: half the time
        // with four workers. Uniform random choice would give a quarter.
        assert!((430..=570).contains(&idle), "{idle} of 1000");
    }

    #[test]
    fn ejected_workers_are_skipped_until_every_one_is() {
        let t = table(&[1], 3);
        let workers = t.endpoint("chat").unwrap().deployments()[0].workers();
        let policy = EjectionPolicy::default();
        workers[0].record_connect_failure(0, &policy);
        workers[1].record_connect_failure(0, &policy);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..100 {
            let w = choose_worker(workers, |_| false, 10, &mut rng).unwrap();
            assert!(Arc::ptr_eq(w, &workers[2]));
        }
        // Excluding the healthy one leaves only ejected workers: still one.
        let w = choose_worker(
            workers,
            |w| w.address() == workers[2].address(),
            10,
            &mut rng,
        );
        assert!(w.is_some());
        // After the back-off they are candidates again.
        assert!(!workers[0].is_ejected(policy.base.as_millis() as u64));
    }

    #[test]
    fn ejection_backs_off_exponentially_up_to_the_limit() {
        let t = table(&[1], 1);
        let worker = &t.endpoint("chat").unwrap().deployments()[0].workers()[0];
        let policy = EjectionPolicy::default();
        let mut expected = policy.base.as_millis() as u64;
        for _ in 0..12 {
            worker.record_connect_failure(1_000, &policy);
            assert!(worker.is_ejected(1_000 + expected - 1));
            assert!(!worker.is_ejected(1_000 + expected));
            expected = (expected * 2).min(policy.max.as_millis() as u64);
        }
        worker.record_success();
        assert!(!worker.is_ejected(1_000));
    }

    proptest! {
        /// Each deployment owns its weight's share of the points, to within
        /// one point of rounding, and all points belong to someone.
        #[test]
        fn shares_match_the_weights(weights in prop::collection::vec(0u32..=10_000, 1..6)) {
            let t = table(&weights, 1);
            let counts = shares(t.endpoint("chat").unwrap());
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            for (i, &w) in weights.iter().enumerate() {
                let got = i64::from(counts.get(&format!("d{i}")).copied().unwrap_or(0));
                let want = (u64::from(w) * 10_000).checked_div(total).unwrap_or(0) as i64;
                prop_assert!((got - want).abs() <= 1, "d{i}: {got} points, want about {want}");
            }
            let owned: u32 = counts.values().sum();
            prop_assert_eq!(owned, if total == 0 { 0 } else { BASIS_POINTS });
        }

        /// As the candidate's share grows (it is listed first), a session
        /// that reached it stays on it: a session moves to the new version
        /// once and never back.
        #[test]
        fn a_session_never_moves_back(
            key in prop::collection::vec(any::<u8>(), 0..32),
            steps in prop::collection::vec(0u32..=10_000, 1..10),
        ) {
            let mut steps = steps;
            steps.sort_unstable();
            let mut on_candidate = false;
            for candidate in steps {
                let t = table(&[candidate, 10_000 - candidate], 1);
                let endpoint = t.endpoint("chat").unwrap();
                let now = choose_deployment(endpoint, Some(&key), &mut fastrand::Rng::new())
                    .unwrap()
                    .id() == "d0";
                prop_assert!(now || !on_candidate, "moved back at candidate weight {}", candidate);
                on_candidate = now;
            }
        }

        /// The chosen worker is never an excluded one, and exists whenever a
        /// worker is not excluded.
        #[test]
        fn never_an_excluded_worker(
            n in 1usize..8,
            excluded_mask in any::<u8>(),
            ejected_mask in any::<u8>(),
            seed in any::<u64>(),
        ) {
            let t = table(&[1], n);
            let workers = t.endpoint("chat").unwrap().deployments()[0].workers();
            let policy = EjectionPolicy::default();
            for (i, w) in workers.iter().enumerate() {
                if ejected_mask & (1 << i) != 0 {
                    w.record_connect_failure(0, &policy);
                }
            }
            let is_excluded = |w: &Worker| {
                workers.iter().position(|x| x.address() == w.address())
                    .is_some_and(|i| excluded_mask & (1 << i) != 0)
            };
            let mut rng = fastrand::Rng::with_seed(seed);
            let chosen = choose_worker(workers, is_excluded, 1, &mut rng);
            let any_left = workers.iter().any(|w| !is_excluded(w));
            prop_assert_eq!(chosen.is_some(), any_left);
            if let Some(w) = chosen {
                prop_assert!(!is_excluded(w));
                let healthy_left = workers.iter().any(|w| !is_excluded(w) && !w.is_ejected(1));
                prop_assert!(!healthy_left || !w.is_ejected(1));
            }
        }
    }
}
