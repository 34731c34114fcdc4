//! News of a gate's state for its watchers (the agent's status reports):
//! the mode and the engine's port at once, the in-flight count at most once
//! per [`COUNT_NEWS_GAP`], at two atomic operations per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::GateState;

/// The shortest time between two counts a [`GateNews`] reports: a busy
/// gate changes its count with every request, and a watcher needs the
/// news, not each step (the agent's `WatchStatus` messages keep this gap).
pub const COUNT_NEWS_GAP: Duration = Duration::from_millis(50);

/// That the in-flight count changed, for watchers: a change costs two
/// atomic operations, and wakes watchers only when one waits.
#[derive(Debug, Default)]
pub(super) struct CountNews {
    /// Changes so far.
    changes: AtomicU64,
    /// A watcher waits (or did, and has not been woken).
    waiting: AtomicBool,
    notify: Notify,
}

impl CountNews {
    pub(super) fn changed(&self) {
        // SeqCst on both sides: either the watcher sees this change, or
        // this sees the watcher waiting.
        self.changes.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) && self.waiting.swap(false, Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }

    /// Waits until the count changed after `seen` changes; returns how many
    /// there have been.
    async fn after(&self, seen: u64) -> u64 {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            let now = self.changes.load(Ordering::SeqCst);
            if now != seen {
                return now;
            }
            notified.await;
        }
    }
}

/// A gate's changes for one watcher: the mode and the engine's port at
/// once, the in-flight count at most once per [`COUNT_NEWS_GAP`].
#[derive(Debug)]
pub struct GateNews {
    state: watch::Receiver<GateState>,
    counts: Arc<CountNews>,
    /// Count changes already reported.
    seen: u64,
    /// When a count change was last reported.
    last: Option<tokio::time::Instant>,
}

impl GateNews {
    /// Waits for the next change; an error when the gate is gone. The
    /// state itself is [`Gate::state`].
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        let (counts, seen, last) = (&self.counts, self.seen, self.last);
        let count = async move {
            if let Some(last) = last {
                tokio::time::sleep_until(last + COUNT_NEWS_GAP).await;
            }
            counts.after(seen).await
        };
        let counted = tokio::select! {
            changed = self.state.changed() => {
                changed?;
                None
            }
            now = count => Some(now),
        };
        self.state.mark_unchanged();
        if let Some(now) = counted {
            self.seen = now;
            self.last = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    /// A watcher of `state` and `counts` that has seen everything so far.
    pub(super) fn new(state: watch::Receiver<GateState>, counts: Arc<CountNews>) -> Self {
        GateNews {
            state,
            seen: counts.changes.load(Ordering::SeqCst),
            counts,
            last: None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use tokio::task::JoinSet;

    use super::*;
    use crate::gate::{Gate, InFlight};

    /// Whether `news` reports a change within `within` (of Tokio's clock).
    async fn reports(news: &mut GateNews, within: Duration) -> bool {
        tokio::time::timeout(within, news.changed()).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn count_news_comes_at_most_once_per_gap_and_the_mode_at_once() {
        let gate = Arc::new(Gate::new());
        gate.open(1);
        let mut news = gate.news();
        assert!(
            !reports(&mut news, Duration::from_secs(1)).await,
            "no change yet"
        );
        // A first change is news at once.
        let first = gate.admit().unwrap().0;
        assert!(reports(&mut news, Duration::from_millis(1)).await);
        assert_eq!(gate.state().in_flight, 1);
        // A hundred more within the gap are one piece of news, after it.
        let started = tokio::time::Instant::now();
        let more: Vec<InFlight> = (0..100).map(|_| gate.admit().unwrap().0).collect();
        assert!(reports(&mut news, Duration::from_secs(1)).await);
        assert!(started.elapsed() >= COUNT_NEWS_GAP - Duration::from_millis(1));
        assert_eq!(gate.state().in_flight, 101);
        assert!(
            !reports(&mut news, Duration::from_secs(1)).await,
            "nothing new"
        );
        // The requests end, long after the last news: news at once.
        drop(more);
        let ended = tokio::time::Instant::now();
        assert!(reports(&mut news, Duration::from_secs(1)).await);
        assert_eq!(ended.elapsed(), Duration::ZERO);
        assert_eq!(gate.state().in_flight, 1);
        // A change of mode is news at once, within the gap after the last.
        gate.start_drain();
        assert!(reports(&mut news, Duration::from_millis(1)).await);
        assert_eq!(ended.elapsed(), Duration::ZERO);
        // A drain waiting for zero wakes when the last request ends.
        let waiting = Arc::clone(&gate);
        let mut idle = JoinSet::new();
        idle.spawn(async move {
            waiting
                .wait_idle(tokio::time::Instant::now() + Duration::from_secs(60))
                .await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(idle.try_join_next().is_none(), "drained with one in flight");
        let at_last = tokio::time::Instant::now();
        drop(first);
        assert_eq!(idle.join_next().await.unwrap().unwrap(), 0);
        assert_eq!(at_last.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn count_news_reaches_every_watcher() {
        let gate = Arc::new(Gate::new());
        gate.open(1);
        let mut waiting = JoinSet::new();
        for _ in 0..3 {
            let mut news = gate.news();
            waiting.spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), news.changed()).await
            });
        }
        // Every watcher waits before the change.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let admitted = gate.admit().unwrap();
        let mut heard = 0;
        while let Some(watcher) = waiting.join_next().await {
            assert!(watcher.unwrap().is_ok(), "a watcher missed the news");
            heard += 1;
        }
        assert_eq!(heard, 3);
        drop(admitted);
    }
}
