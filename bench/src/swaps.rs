//! Swapping the router's split as fast as a coordinator could: a new table
//! over RouterControl `ApplyTable`, `rate` times a second, alternating
//! 70/30 and 90/10 so that the shares still average 80/20 and a router
//! that ignored the swaps or mixed tables up would show it. The swapper is
//! a process of its own (`__swapper`); see [`main`] for where it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossfade_proto::v1;
use crossfade_proto::v1::router_control_client::RouterControlClient;
use serde::Serialize;

/// What the swapper did.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
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
        max_model_len: 0,
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
            created: 0,
            deployments: vec![
                deployment("v1", v1_weight, &workers[..2]),
                deployment("v2", 10_000 - v1_weight, &workers[2..]),
            ],
        }],
    }
}

/// `crossfade-bench __swapper CONTROL RATE FIRST_VERSION MILLIS W1 W2 W3 W4
/// [same]`: swaps for `MILLIS` milliseconds, then prints what it did as one
/// line of JSON. With `same`, every call sends the same table, version
/// `FIRST_VERSION` at 80/20: after the first, the router answers without
/// building or swapping anything, which measures what the calls cost apart
/// from the swaps.
///
/// The benchmark runs it on the system-under-test core at `SCHED_IDLE`
/// priority (`chrt --idle`): it then takes only time that core would
/// otherwise spend idle, and what the run measures is the router's own
/// handling of the tables. On the client's core it would preempt the load
/// generator instead, and the latency it measures (from the intended send
/// times) would rise by the swapper's own cost: a swapper sending to a
/// second router on the client's core, with nothing on the router under
/// test, raised the p99 as much as real swaps did.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let number = |i: usize| -> anyhow::Result<u64> {
        let arg = args.get(i).ok_or_else(|| {
            anyhow::anyhow!("usage: __swapper CONTROL RATE FIRST_VERSION MILLIS W1 W2 W3 W4 [same]")
        })?;
        Ok(arg.parse()?)
    };
    let control = u16::try_from(number(0)?)?;
    let rate = number(1)?.max(1);
    let first = number(2)?;
    let duration = Duration::from_millis(number(3)?);
    let mut workers = [0u16; 4];
    for (i, worker) in workers.iter_mut().enumerate() {
        *worker = u16::try_from(number(4 + i)?)?;
    }
    let changes = args.get(8).map(String::as_str) != Some("same");
    let stop = Arc::new(AtomicBool::new(false));
    let timer = Arc::clone(&stop);
    std::thread::spawn(move || {
        std::thread::sleep(duration);
        timer.store(true, Ordering::Relaxed);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let swaps = runtime.block_on(run(control, rate, first, changes, workers, stop));
    println!("{}", serde_json::to_string(&swaps)?);
    Ok(())
}

/// What a swapper does.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// The router's RouterControl port.
    pub control: u16,
    /// Calls a second.
    pub rate: u64,
    /// The first version sent, above every version the router has seen.
    pub first_version: u64,
    /// Whether each call changes the table (false: the same table each time).
    pub changes: bool,
    /// For how long.
    pub duration: Duration,
    /// The backend's four worker ports.
    pub workers: [u16; 4],
}

/// Runs [`main`] as a process: on `core`, at idle priority, for the plan's
/// duration. Wait for it with [`Swapper::finish`].
pub struct Swapper(std::process::Child);

impl Swapper {
    /// Starts it.
    pub fn start(exe: &std::path::Path, core: usize, plan: &Plan) -> anyhow::Result<Self> {
        let mut command = std::process::Command::new("taskset");
        command
            .args(["-c", &core.to_string(), "chrt", "--idle", "0"])
            .arg(exe)
            .arg("__swapper")
            .arg(plan.control.to_string())
            .arg(plan.rate.to_string())
            .arg(plan.first_version.to_string())
            .arg(plan.duration.as_millis().to_string())
            .args(plan.workers.map(|w| w.to_string()))
            .args((!plan.changes).then_some("same"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        Ok(Self(command.spawn()?))
    }

    /// Waits for it to end and reads what it did.
    pub fn finish(self) -> Swaps {
        match self.0.wait_with_output() {
            Ok(output) => serde_json::from_slice(&output.stdout).unwrap_or_else(|e| Swaps {
                failed: 1,
                first_error: Some(format!(
                    "the swapper ({}) printed no result: {e}",
                    output.status
                )),
                ..Swaps::default()
            }),
            Err(e) => Swaps {
                failed: 1,
                first_error: Some(format!("waiting for the swapper: {e}")),
                ..Swaps::default()
            },
        }
    }
}

async fn run(
    control: u16,
    rate: u64,
    first: u64,
    changes: bool,
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
            table: Some(if changes {
                table(first + n, workers)
            } else {
                table_with(first, 8000, workers)
            }),
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
    let last = if changes { first + n } else { first };
    let request = v1::ApplyTableRequest {
        coordinator_epoch: 1,
        table: Some(table_with(last, 8000, workers)),
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
