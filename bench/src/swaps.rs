//! Swapping the router's split as fast as a coordinator could: a new table
//! over RouterControl `ApplyTable`, `rate` times a second, alternating
//! 70/30 and 90/10 so that the shares still average 80/20 and a router
//! that ignored the swaps or mixed tables up would show it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossfade_proto::v1;
use crossfade_proto::v1::router_control_client::RouterControlClient;
use serde::Serialize;

/// What the swapper did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Swaps {
    /// Tables the router took.
    pub applied: u64,
    /// Tables it refused, or calls that failed.
    pub failed: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Tables per second achieved.
    pub rate: f64,
    /// Seconds spent swapping.
    pub seconds: f64,
    /// The version in force at the end.
    pub final_version: u64,
}

impl Swaps {
    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: Swaps) {
        self.seconds += other.seconds;
        self.applied += other.applied;
        self.rate = self.applied as f64 / self.seconds.max(1e-9);
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.final_version = self.final_version.max(other.final_version);
    }
}

/// The table of a swap: 70/30 for even versions, 90/10 for odd ones.
pub fn table(version: u64, workers: [u16; 4]) -> v1::RoutingTable {
    let v1_weight = if version.is_multiple_of(2) {
        7000
    } else {
        9000
    };
    table_with(version, v1_weight, workers)
}

/// A table giving v1 `v1_weight` basis points.
fn table_with(version: u64, v1_weight: u32, workers: [u16; 4]) -> v1::RoutingTable {
    let deployment = |id: &str, weight: u32, ports: &[u16]| v1::DeploymentRoute {
        id: id.into(),
        weight,
        workers: ports
            .iter()
            .map(|p| v1::WorkerRoute {
                address: format!("127.0.0.1:{p}"),
                worker_id: String::new(),
            })
            .collect(),
    };
    v1::RoutingTable {
        version,
        endpoints: vec![v1::EndpointRoute {
            name: "chat".into(),
            aliases: vec![],
            deployments: vec![
                deployment("v1", v1_weight, &workers[..2]),
                deployment("v2", 10_000 - v1_weight, &workers[2..]),
            ],
        }],
    }
}

/// Swaps on a thread of its own (on the client's core) until `stop`.
///
/// Versions start at `first_version`, which must be above every version the
/// router has seen. Between calls the thread sleeps (nanosleep is precise to
/// tens of microseconds) rather than spinning, so that it takes from the
/// load generator on the same core only what its calls cost.
pub fn spawn(
    control: u16,
    rate: u64,
    first_version: u64,
    workers: [u16; 4],
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Swaps> {
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                return Swaps {
                    first_error: Some(e.to_string()),
                    ..Swaps::default()
                };
            }
        };
        runtime.block_on(run(control, rate, first_version, workers, stop))
    })
}

async fn run(
    control: u16,
    rate: u64,
    first: u64,
    workers: [u16; 4],
    stop: Arc<AtomicBool>,
) -> Swaps {
    let mut swaps = Swaps::default();
    let mut client = match RouterControlClient::connect(format!("http://127.0.0.1:{control}")).await
    {
        Ok(client) => client,
        Err(e) => {
            swaps.first_error = Some(format!("connecting to RouterControl: {e}"));
            return swaps;
        }
    };
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let at = started + period.mul_f64(n as f64);
        let now = Instant::now();
        if at > now {
            // Blocking is right here: this runtime runs nothing else.
            std::thread::sleep(at - now);
            continue;
        }
        let request = v1::ApplyTableRequest {
            coordinator_epoch: 1,
            table: Some(table(first + n, workers)),
        };
        match client.apply_table(request).await {
            Ok(response) => {
                swaps.applied += 1;
                swaps.final_version = response.into_inner().version_in_force;
            }
            Err(status) => {
                swaps.failed += 1;
                swaps
                    .first_error
                    .get_or_insert_with(|| status.message().to_owned());
            }
        }
        n += 1;
    }
    swaps.seconds = started.elapsed().as_secs_f64();
    swaps.rate = swaps.applied as f64 / swaps.seconds;
    // Leave 80/20 in force, as the configuration has it, for the next run.
    let request = v1::ApplyTableRequest {
        coordinator_epoch: 1,
        table: Some(table_with(first + n, 8000, workers)),
    };
    match client.apply_table(request).await {
        Ok(response) => swaps.final_version = response.into_inner().version_in_force,
        Err(status) => {
            swaps.failed += 1;
            swaps
                .first_error
                .get_or_insert_with(|| status.message().to_owned());
        }
    }
    swaps
}
