//! Graceful shutdown: one token that every task watches, one tracker that
//! holds every task so that shutdown can wait for them, and the signal
//! handling that triggers it (SIGTERM from systemd, SIGINT from a terminal).

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// Exit status after a second signal forces an immediate exit (128 + SIGINT,
/// as shells report it).
pub const EXIT_FORCED: i32 = 130;

/// A component's shutdown: trigger it once, every clone sees it.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A shutdown not yet triggered, with no tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a task that shutdown waits for. Tasks should watch
    /// [`Shutdown::triggered`] and finish their work promptly.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// A shutdown of part of this component: triggered with this one, or
    /// alone; its tasks are its own to wait for.
    pub fn child(&self) -> Self {
        Self {
            token: self.token.child_token(),
            tracker: TaskTracker::new(),
        }
    }

    /// Starts the shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether the shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the shutdown has started.
    pub fn triggered(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// The underlying token, for APIs that take one (hyper-util's graceful
    /// shutdown, tonic's `serve_with_shutdown`).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Waits up to `grace` for every spawned task to finish; no new task may
    /// be spawned after. Returns false when some were still running.
    pub async fn wait_for_tasks(&self, grace: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Triggers this shutdown on the first SIGTERM or SIGINT; a second one
    /// exits the process at once with [`EXIT_FORCED`] (the operator's "I mean
    /// it"). The handlers are registered before this returns, so a signal
    /// that arrives right after is not lost.
    pub fn trigger_on_signals(&self) -> std::io::Result<()> {
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let shutdown = self.clone();
        // Not on the tracker: it must outlive the drain to catch the second
        // signal, and it ends with the runtime.
        tokio::spawn(async move {
            let first = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            tracing::info!(
                signal = first,
                "shutting down gracefully; send it again to exit now"
            );
            shutdown.trigger();
            let second = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            tracing::warn!(signal = second, "second signal: exiting now");
            std::process::exit(EXIT_FORCED);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tasks_see_the_trigger_and_are_waited_for() {
        let shutdown = Shutdown::new();
        let watcher = shutdown.clone();
        let task = shutdown.spawn(async move {
            watcher.triggered().await;
            // Some clean-up that takes a while.
            tokio::time::sleep(Duration::from_secs(2)).await;
            "cleaned up"
        });
        assert!(!shutdown.is_triggered());
        shutdown.trigger();
        assert!(shutdown.wait_for_tasks(Duration::from_secs(5)).await);
        assert_eq!(task.await.expect("task ran"), "cleaned up");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_the_trigger_runs_out_the_grace() {
        let shutdown = Shutdown::new();
        let _stuck = shutdown.spawn(std::future::pending::<()>());
        shutdown.trigger();
        let started = tokio::time::Instant::now();
        assert!(!shutdown.wait_for_tasks(Duration::from_secs(3)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
