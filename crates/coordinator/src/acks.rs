//! When a pushed table counts as acknowledged (DESIGN §4): the no-drop rule
//! drains a worker only after every router has acknowledged a table
//! without it. A router that stays silent past a bound is gone (dead,
//! cut off) and no longer holds the promotion up; one that answers with a
//! refusal is still routing by an older table and holds it up until it
//! accepts one. Pure: the shell and the fleet simulation ask the same
//! function.

use std::time::Duration;

/// What one router has told the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Router {
    /// The highest table version it acknowledged.
    pub acknowledged: u64,
    /// Its last answer was a refusal (a table it could not apply, an
    /// epoch fence).
    pub refusing: bool,
}

/// How a pushed table stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Every router acknowledged it (or a later one).
    Acked,
    /// The bound passed with only silent routers missing (their indexes):
    /// go ahead without them.
    Late(Vec<usize>),
}

/// Whether table `version`, pushed `elapsed` ago, is settled among
/// `routers`; `None` while it must still be waited for.
pub fn settle(
    version: u64,
    elapsed: Duration,
    bound: Duration,
    routers: &[Router],
) -> Option<Settled> {
    let missing: Vec<usize> = routers
        .iter()
        .enumerate()
        .filter(|(_, r)| r.acknowledged < version)
        .map(|(i, _)| i)
        .collect();
    if missing.is_empty() {
        return Some(Settled::Acked);
    }
    let silent_only = missing.iter().all(|&i| !routers[i].refusing);
    (elapsed >= bound && silent_only).then_some(Settled::Late(missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(10);

    fn router(acknowledged: u64, refusing: bool) -> Router {
        Router {
            acknowledged,
            refusing,
        }
    }

    #[test]
    fn every_router_must_acknowledge_and_only_silence_falls_under_the_bound() {
        let both = [router(5, false), router(5, false)];
        assert_eq!(
            settle(5, Duration::ZERO, BOUND, &both),
            Some(Settled::Acked)
        );
        let one_silent = [router(5, false), router(4, false)];
        assert_eq!(settle(5, Duration::from_secs(9), BOUND, &one_silent), None);
        assert_eq!(
            settle(5, BOUND, BOUND, &one_silent),
            Some(Settled::Late(vec![1]))
        );
        // A refusal is an answer: never acknowledged by the bound.
        let one_refusing = [router(5, false), router(4, true)];
        assert_eq!(
            settle(5, Duration::from_secs(3600), BOUND, &one_refusing),
            None
        );
        // No router: nothing to wait for.
        assert_eq!(settle(5, Duration::ZERO, BOUND, &[]), Some(Settled::Acked));
    }
}
