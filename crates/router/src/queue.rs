//! Requests held while their endpoint has no replica in the table (a
//! single host reloading in place, every worker draining, a scale from
//! zero), as Knative's activator and RunPod's queue hold them: a request
//! waits, bounded in number per endpoint and in time, and goes on the
//! moment a table with a replica is swapped in. A client that goes away
//! leaves at once (its request future is dropped, and its place with it).
//! A request that every worker refused is held too ([`Hold`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::RouteError;
use crate::stats::{QUEUE_TIMEOUTS_TOTAL, QUEUE_WAIT_SECONDS};
use crate::table::{Routes, Table};

/// The first pause of a request held after every worker refused it.
const HOLD_FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between its tries.
const HOLD_MAX_PAUSE: Duration = Duration::from_secs(1);

/// A request that every worker refused before an engine saw it (a single
/// host's agent restarting, every worker draining) is held and sent again,
/// with back-off, within the queue's timeout. No clock is read unless a
/// request is refused.
#[derive(Debug)]
pub struct Hold {
    timeout: Duration,
    /// Set at the first refusal.
    until: Option<Instant>,
    pause: Duration,
}

impl Hold {
    /// Whether a refusal of the next try may be held: the last try, whose
    /// pause would pass the timeout, answers whatever it meets.
    pub fn may_hold(&self) -> bool {
        self.until
            .is_none_or(|until| Instant::now() + self.pause < until)
    }

    /// Waits before the next try; how long it waited.
    pub async fn wait(&mut self) -> Duration {
        let since = Instant::now();
        let until = *self.until.get_or_insert(since + self.timeout);
        tokio::time::sleep(self.pause.min(until.saturating_duration_since(since))).await;
        self.pause = (self.pause * 2).min(HOLD_MAX_PAUSE);
        since.elapsed()
    }
}

/// The bounds of the queues; the counts are kept in the routes'
/// statistics, which `GetStats` reports.
#[derive(Debug)]
pub struct Queue {
    max: u32,
    timeout: Duration,
    /// Told of each endpoint whose queue gets its first request.
    hints: OnceLock<crate::demand::Hints>,
}

/// A request's place in its endpoint's queue; freed when dropped.
struct Place<'a> {
    routes: &'a Routes,
    endpoint: String,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.routes.stats().held.remove(&self.endpoint);
    }
}

impl Queue {
    /// At most `max` requests held per endpoint, each at most `timeout`.
    pub fn new(max: usize, timeout: Duration) -> Self {
        Self {
            max: u32::try_from(max).unwrap_or(u32::MAX),
            timeout,
            hints: OnceLock::new(),
        }
    }

    /// From now on, `hints` hears of each endpoint whose queue gets its
    /// first request (once; later calls change nothing).
    pub fn hint_demand_to(&self, hints: crate::demand::Hints) {
        let _ = self.hints.set(hints);
    }

    /// A hold for a request that every worker may refuse, within this
    /// queue's timeout.
    pub fn hold(&self) -> Hold {
        Hold {
            timeout: self.timeout,
            until: None,
            pause: HOLD_FIRST_PAUSE,
        }
    }

    fn enter<'a>(&self, routes: &'a Routes, endpoint: &str) -> Result<Place<'a>, RouteError> {
        let endpoint = endpoint.to_owned();
        let Some(count) = routes.stats().held.add(&endpoint, self.max) else {
            return Err(RouteError::QueueFull { endpoint });
        };
        if count == 1
            && let Some(hints) = self.hints.get()
        {
            // A full backlog drops the hint: the coordinator's read of the
            // stats finds the demand anyway.
            let _ = hints.try_send(endpoint.clone());
        }
        Ok(Place { routes, endpoint })
    }

    /// The table to route `model` with: the one in force when its endpoint
    /// has a replica (no wait, the usual path), else the first one swapped
    /// in that gives it one, within the bounds; and how long that took.
    pub async fn table_for(
        &self,
        routes: &Routes,
        model: &str,
    ) -> Result<(Arc<Table>, Duration), RouteError> {
        let table = routes.load();
        let endpoint = table
            .endpoint(model)
            .ok_or_else(|| RouteError::ModelNotFound(crate::error::short(model)))?;
        if endpoint.has_capacity() {
            return Ok((table, Duration::ZERO));
        }
        let name = endpoint.name().to_owned();
        let _place = self.enter(routes, &name)?;
        let started = Instant::now();
        let deadline = started + self.timeout;
        // Subscribed before the table is read again: a swap after the read
        // wakes this request.
        let mut swapped = routes.subscribe();
        loop {
            let table = routes.load();
            match table.endpoint(model) {
                None => return Err(RouteError::ModelNotFound(crate::error::short(model))),
                Some(endpoint) if endpoint.has_capacity() => {
                    let waited = started.elapsed();
                    metrics::histogram!(QUEUE_WAIT_SECONDS, "endpoint" => name)
                        .record(waited.as_secs_f64());
                    return Ok((table, waited));
                }
                Some(_) => {}
            }
            if tokio::time::timeout_at(deadline, swapped.changed())
                .await
                .is_err()
            {
                metrics::counter!(QUEUE_TIMEOUTS_TOTAL, "endpoint" => name.clone()).increment(1);
                return Err(RouteError::QueueTimeout {
                    endpoint: name,
                    waited: self.timeout,
                });
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crossfade_proto::v1;

    use super::*;

    /// `chat` on one worker, with traffic or (weight 0) without.
    fn table(version: u64, weight: u32) -> v1::RoutingTable {
        v1::RoutingTable {
            version,
            endpoints: vec![v1::EndpointRoute {
                created: 0,
                name: "chat".into(),
                aliases: vec!["org/model".into()],
                deployments: vec![v1::DeploymentRoute {
                    max_model_len: 0,
                    id: "v1".into(),
                    weight,
                    workers: vec![v1::WorkerRoute {
                        address: "10.0.0.1:8000".into(),
                        worker_id: String::new(),
                    }],
                }],
            }],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_request_goes_on_when_a_replica_enters_the_table() {
        let routes = Arc::new(Routes::new(&table(0, 0)).unwrap());
        let queue = Arc::new(Queue::new(8, Duration::from_secs(60)));
        let waiting = {
            let (routes, queue) = (Arc::clone(&routes), Arc::clone(&queue));
            tokio::spawn(async move { queue.table_for(&routes, "org/model").await })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished());
        assert_eq!(routes.stats().held.lock().get("chat"), Some(&1));
        // GetStats reports the demand that no deployment shows.
        let report = routes
            .stats()
            .report(&routes.load(), std::time::UNIX_EPOCH, None);
        assert_eq!(report[0].queued, 1);
        routes.apply_from_coordinator(&table(1, 1)).unwrap();
        let (table, waited) = waiting.await.unwrap().unwrap();
        assert_eq!(table.version(), 1);
        assert_eq!(waited, Duration::from_secs(5));
        assert!(routes.stats().held.lock().is_empty(), "its place was freed");
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_in_number_and_in_time() {
        let routes = Routes::new(&table(0, 0)).unwrap();
        let queue = Queue::new(1, Duration::from_secs(3));
        let first = queue.table_for(&routes, "chat");
        let second = queue.table_for(&routes, "chat");
        let (first, second) = tokio::join!(first, second);
        let mut errors = [first.unwrap_err(), second.unwrap_err()];
        errors.sort_by_key(|e| e.code());
        assert_eq!(
            errors,
            [
                RouteError::QueueFull {
                    endpoint: "chat".into()
                },
                RouteError::QueueTimeout {
                    endpoint: "chat".into(),
                    waited: Duration::from_secs(3)
                },
            ]
        );
        assert!(routes.stats().held.lock().is_empty());
        // An unknown model is not held.
        assert_eq!(
            queue.table_for(&routes, "other").await.unwrap_err(),
            RouteError::ModelNotFound("other".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_request_held_hints_demand_once() {
        let routes = Arc::new(Routes::new(&table(0, 0)).unwrap());
        let queue = Arc::new(Queue::new(8, Duration::from_secs(60)));
        let (hints, mut heard) = tokio::sync::mpsc::channel(4);
        queue.hint_demand_to(hints);
        let hold = || {
            let (routes, queue) = (Arc::clone(&routes), Arc::clone(&queue));
            tokio::spawn(async move { queue.table_for(&routes, "org/model").await })
        };
        let held = [hold(), hold()];
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(heard.try_recv().unwrap(), "chat", "by the endpoint's name");
        assert!(
            heard.try_recv().is_err(),
            "the second held request adds none"
        );
        for request in held {
            request.abort();
            let _ = request.await;
        }
        // The queue emptied: the next request held is news again.
        let again = hold();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(heard.try_recv().unwrap(), "chat");
        again.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_goes_away_leaves_its_place() {
        let routes = Routes::new(&table(0, 0)).unwrap();
        let queue = Queue::new(1, Duration::from_secs(60));
        let gone = tokio::time::timeout(Duration::from_secs(1), queue.table_for(&routes, "chat"));
        assert!(gone.await.is_err());
        assert!(routes.stats().held.lock().is_empty());
    }
}
