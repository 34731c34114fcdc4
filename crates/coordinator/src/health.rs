//! The health gate's arithmetic (DESIGN §4): the candidate fails when its
//! failure rate (5xx answers and aborted streams, as every router counts
//! them) exceeds the old deployment's by more than a margin, once it has
//! served enough requests to be judged. Pure: the shell reads the routers'
//! stats and feeds the verdict to the rollout.

use std::collections::BTreeMap;

use crate::rollout::Verdict;

/// A candidate that has served at least this many requests may be judged.
pub const MIN_REQUESTS: u64 = 20;
/// The candidate fails when its failure rate exceeds the old deployment's
/// by more than this many percentage points.
pub const MARGIN_POINTS: u32 = 5;

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

/// The verdict on `candidate` against `old` (empty for a first
/// deployment) from `counts` by deployment; `None` while it passes or
/// cannot yet be judged.
pub fn judge(candidate: &str, old: &str, counts: &BTreeMap<String, Counts>) -> Option<Verdict> {
    let new = counts.get(candidate).copied().unwrap_or_default();
    let before = counts.get(old).copied().unwrap_or_default();
    let margin = f64::from(MARGIN_POINTS) / 100.0;
    if new.total < MIN_REQUESTS || new.rate() <= before.rate() + margin {
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

    #[test]
    fn a_candidate_fails_only_beyond_the_margin_and_with_enough_requests() {
        // 10 % against 0 %: beyond the 5-point margin.
        assert!(matches!(
            judge("new", "old", &counts((100, 10), (100, 0))),
            Some(Verdict::Fail(reason)) if reason == "new failed 10 of 100 requests (10 %), old 0 %"
        ));
        // 10 % against 6 %: within it.
        assert_eq!(judge("new", "old", &counts((100, 10), (100, 6))), None);
        // Every request failed, but too few to judge.
        assert_eq!(
            judge(
                "new",
                "old",
                &counts((MIN_REQUESTS - 1, MIN_REQUESTS - 1), (0, 0))
            ),
            None
        );
        // A first deployment is judged against nothing.
        assert!(judge("new", "", &counts((50, 50), (0, 0))).is_some());
    }
}
