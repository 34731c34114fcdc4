//! Who may host what: how one worker looks to one endpoint's rollout, from
//! what its agent reports and what the coordinator knows of it. Pure: the
//! shell and the fleet simulation ask the same function.

use crate::rollout::{Engine, Worker};

/// What is known of a worker, beside its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts<'a> {
    /// Not heard from within the heartbeat bound.
    pub lost: bool,
    /// Cordoned (by an operator, or for an unhealthy GPU).
    pub cordoned: bool,
    /// A GPU reports a condition that must not serve.
    pub gpu_unhealthy: bool,
    /// Whether it matches the endpoint's selector; `None` before its agent
    /// has reported (nothing to match).
    pub matches_selector: Option<bool>,
    /// It is the first agent to report its gate address (a router refuses
    /// a table that names one address twice).
    pub owns_gate: bool,
    /// The endpoint whose rollout uses it, if any: one worker, one claim.
    pub claimed_by: Option<&'a str>,
    /// Its engine is one kept warm (cleanup `KEEP`) that this endpoint does
    /// not want now: the worker is free to take, and an `Apply` replaces
    /// that engine (a GPU is not held forever by a deployment nobody
    /// serves).
    pub spare: bool,
}

/// How a worker running `engine` (of `deployment`) looks to `endpoint`.
pub fn view(
    endpoint: &str,
    deployment: Option<String>,
    engine: Engine,
    facts: &Facts<'_>,
) -> Worker {
    let mine = facts.claimed_by.is_none_or(|owner| owner == endpoint);
    let (deployment, engine) = match () {
        () if facts.lost => (deployment, Engine::Unknown),
        () if facts.spare => (None, Engine::Idle),
        () => (deployment, engine),
    };
    Worker {
        deployment,
        engine,
        eligible: !facts.lost
            && facts.owns_gate
            && !facts.cordoned
            && mine
            && !facts.gpu_unhealthy
            && facts.matches_selector == Some(true),
        // Its replica moves (add first, then drain) when the worker is
        // cordoned, its GPU is unhealthy, or it no longer matches the
        // endpoint's selector.
        evict: facts.cordoned || facts.gpu_unhealthy || facts.matches_selector == Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FREE: Facts<'static> = Facts {
        lost: false,
        cordoned: false,
        gpu_unhealthy: false,
        matches_selector: Some(true),
        owns_gate: true,
        claimed_by: None,
        spare: false,
    };

    #[test]
    fn a_worker_is_eligible_only_when_nothing_stands_against_it() {
        let idle = |facts: Facts<'_>| view("chat", None, Engine::Idle, &facts);
        assert!(idle(FREE).eligible);
        assert!(
            idle(Facts {
                claimed_by: Some("chat"),
                ..FREE
            })
            .eligible
        );
        // Claimed by another endpoint: not this one's, and not to evict.
        let taken = idle(Facts {
            claimed_by: Some("embed"),
            ..FREE
        });
        assert!(!taken.eligible && !taken.evict);
        for facts in [
            Facts {
                cordoned: true,
                ..FREE
            },
            Facts {
                gpu_unhealthy: true,
                ..FREE
            },
            Facts {
                matches_selector: Some(false),
                ..FREE
            },
        ] {
            let w = idle(facts);
            assert!(!w.eligible && w.evict, "{facts:?}");
        }
        let unseen = idle(Facts {
            matches_selector: None,
            ..FREE
        });
        assert!(!unseen.eligible && !unseen.evict);
        assert!(
            !idle(Facts {
                owns_gate: false,
                ..FREE
            })
            .eligible
        );
        let lost = view(
            "chat",
            Some("d1".into()),
            Engine::Ready,
            &Facts { lost: true, ..FREE },
        );
        assert_eq!(lost.engine, Engine::Unknown);
        assert!(!lost.eligible);
        assert_eq!(lost.deployment.as_deref(), Some("d1"));
        // A kept engine nobody wants now: the worker is free.
        let kept = view(
            "chat",
            Some("d0".into()),
            Engine::Draining,
            &Facts {
                spare: true,
                ..FREE
            },
        );
        assert_eq!((kept.deployment, kept.engine), (None, Engine::Idle));
        assert!(kept.eligible);
    }
}
