//! The health gate's arithmetic (DESIGN §4): the candidate fails when its
//! failure rate (5xx answers and aborted streams, as every router counts
//! them) exceeds the old deployment's by more than a margin, once it has
//! served enough requests to be judged; before that, failures beyond the
//! margin leave it undecided (the rollout pauses at the step's end). Pure:
//! the shell reads the routers' stats and feeds the verdict to the rollout.

use std::collections::BTreeMap;

use crate::rollout::Verdict;

/// Requests and failures of one deployment, summed over the routers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests answered or ended.
    pub total: u64,
    /// Of those, 5xx answers and aborted streams.
    pub failed: u64,
}

impl Counts {
    fn rate(self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.failed as f64 / self.total as f64
        }
    }
}

/// The gate's settings (promotion settings, DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// Percentage points the candidate's failure rate may exceed the old
    /// deployment's by.
    pub margin_percent: u32,
    /// Requests the candidate must have served to be judged.
    pub min_requests: u32,
}

/// The verdict on `candidate` against `old` (empty for a first
/// deployment) from `counts` by deployment, summed over the routers that
/// answered (`routers`: how many answered of how many were asked). It passes while the candidate's failure rate stays within the
/// margin; beyond it, it fails once the candidate has served the minimum
/// number of requests, and cannot decide before (a few failures among too
/// few requests: the promotion pauses for a person to look). With no
/// router's stats at all it cannot decide either.
pub fn judge(
    gate: Gate,
    candidate: &str,
    old: &str,
    counts: &BTreeMap<String, Counts>,
    routers: (usize, usize),
) -> Verdict {
    let (answered, asked) = routers;
    if answered == 0 && asked > 0 {
        return Verdict::Undecided("no router answered with its request counts".into());
    }
    let new = counts.get(candidate).copied().unwrap_or_default();
    let before = counts.get(old).copied().unwrap_or_default();
    let margin = f64::from(gate.margin_percent) / 100.0;
    if new.rate() <= before.rate() + margin {
        return Verdict::Pass;
    }
    let what = format!(
        "{candidate} failed {} of {} requests ({:.0} %), {} {:.0} %",
        new.failed,
        new.total,
        new.rate() * 100.0,
        if old.is_empty() {
            "no old deployment"
        } else {
            old
        },
        before.rate() * 100.0
    );
    if new.total < u64::from(gate.min_requests) {
        return Verdict::Undecided(format!(
            "{what}: fewer than the {} requests needed to judge",
            gate.min_requests
        ));
    }
    Verdict::Fail(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(new: (u64, u64), old: (u64, u64)) -> BTreeMap<String, Counts> {
        BTreeMap::from([
            (
                "new".to_owned(),
                Counts {
                    total: new.0,
                    failed: new.1,
                },
            ),
            (
                "old".to_owned(),
                Counts {
                    total: old.0,
                    failed: old.1,
                },
            ),
        ])
    }

    const GATE: Gate = Gate {
        margin_percent: 5,
        min_requests: 20,
    };

    #[test]
    fn a_candidate_fails_only_beyond_the_margin_and_with_enough_requests() {
        // 10 % against 0 %: beyond the 5-point margin.
        assert!(matches!(
            judge(GATE, "new", "old", &counts((100, 10), (100, 0)), (2, 2)),
            Verdict::Fail(reason) if reason == "new failed 10 of 100 requests (10 %), old 0 %"
        ));
        // 10 % against 6 %: within it.
        assert_eq!(
            judge(GATE, "new", "old", &counts((100, 10), (100, 6)), (2, 2)),
            Verdict::Pass
        );
        // Every request failed, but too few to judge: undecided.
        assert!(matches!(
            judge(GATE, "new", "old", &counts((19, 19), (0, 0)), (1, 2)),
            Verdict::Undecided(reason) if reason.contains("fewer than the 20 requests")
        ));
        // No traffic, nothing failed: nothing against it.
        assert_eq!(
            judge(GATE, "new", "old", &counts((0, 0), (0, 0)), (1, 2)),
            Verdict::Pass
        );
        // A first deployment is judged against nothing.
        assert!(matches!(
            judge(GATE, "new", "", &counts((50, 50), (0, 0)), (1, 2)),
            Verdict::Fail(_)
        ));
        // No router answered: nothing to judge by.
        assert!(matches!(
            judge(GATE, "new", "old", &counts((100, 50), (0, 0)), (0, 2)),
            Verdict::Undecided(_)
        ));
        // No router to ask: no traffic to judge.
        assert_eq!(
            judge(GATE, "new", "old", &counts((0, 0), (0, 0)), (0, 0)),
            Verdict::Pass
        );
    }

    #[test]
    fn the_margin_and_the_minimum_are_the_promotions_own() {
        let strict = Gate {
            margin_percent: 0,
            min_requests: 5,
        };
        // 7 % against 6 %: within the default margin, beyond none at all.
        assert_eq!(
            judge(GATE, "new", "old", &counts((100, 7), (100, 6)), (1, 2)),
            Verdict::Pass
        );
        assert!(matches!(
            judge(strict, "new", "old", &counts((100, 7), (100, 6)), (1, 2)),
            Verdict::Fail(_)
        ));
        // Five requests are enough for a gate that asks for five.
        assert!(matches!(
            judge(strict, "new", "old", &counts((5, 5), (0, 0)), (1, 2)),
            Verdict::Fail(_)
        ));
    }
}
