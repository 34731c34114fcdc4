//! The health gate's arithmetic (DESIGN §4): the candidate fails when its
//! failure rate (5xx answers and aborted streams, as every router counts
//! them) exceeds the old deployment's by more than a margin, once it has
//! served enough requests to be judged. Pure: the shell reads the routers'
//! stats and feeds the verdict to the rollout.

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
/// deployment) from `counts` by deployment; `None` while it passes or
/// cannot yet be judged.
pub fn judge(
    gate: Gate,
    candidate: &str,
    old: &str,
    counts: &BTreeMap<String, Counts>,
) -> Option<Verdict> {
    let new = counts.get(candidate).copied().unwrap_or_default();
    let before = counts.get(old).copied().unwrap_or_default();
    let margin = f64::from(gate.margin_percent) / 100.0;
    if new.total < u64::from(gate.min_requests) || new.rate() <= before.rate() + margin {
        return None;
    }
    Some(Verdict::Fail(format!(
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
    )))
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
            judge(GATE, "new", "old", &counts((100, 10), (100, 0))),
            Some(Verdict::Fail(reason)) if reason == "new failed 10 of 100 requests (10 %), old 0 %"
        ));
        // 10 % against 6 %: within it.
        assert_eq!(
            judge(GATE, "new", "old", &counts((100, 10), (100, 6))),
            None
        );
        // Every request failed, but too few to judge.
        assert_eq!(judge(GATE, "new", "old", &counts((19, 19), (0, 0))), None);
        // A first deployment is judged against nothing.
        assert!(judge(GATE, "new", "", &counts((50, 50), (0, 0))).is_some());
    }

    #[test]
    fn the_margin_and_the_minimum_are_the_promotions_own() {
        let strict = Gate {
            margin_percent: 0,
            min_requests: 5,
        };
        // 7 % against 6 %: within the default margin, beyond none at all.
        assert_eq!(judge(GATE, "new", "old", &counts((100, 7), (100, 6))), None);
        assert!(judge(strict, "new", "old", &counts((100, 7), (100, 6))).is_some());
        // Five requests are enough for a gate that asks for five.
        assert!(judge(strict, "new", "old", &counts((5, 5), (0, 0))).is_some());
    }
}
