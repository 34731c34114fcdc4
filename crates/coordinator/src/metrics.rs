//! The coordinator's Prometheus metrics, `crossfade_coordinator_*`. Labels:
//! endpoint and deployment names (operator-chosen, few), statuses and
//! outcomes (fixed sets).

use crossfade_common::metrics::OPERATION_SECONDS_BUCKETS;

use crate::actor::{View, current_rollout};
use crate::rollout::Status;

/// 1 for the status of the endpoint's current (or last) promotion.
pub const PROMOTION_STATUS: &str = "crossfade_coordinator_promotion_status";
/// The candidate's share of traffic, in percent.
pub const CANDIDATE_TRAFFIC_PERCENT: &str = "crossfade_coordinator_candidate_traffic_percent";
/// Replicas per endpoint, deployment and state (`ready`, `starting`,
/// `draining`).
pub const REPLICAS: &str = "crossfade_coordinator_replicas";
/// Time one promotion step took, from its start to the end of its
/// stabilization.
pub const STEP_SECONDS: &str = "crossfade_coordinator_step_duration_seconds";
/// Promotions ended, by outcome (`succeeded`, `failed`, `canceled`).
pub const PROMOTIONS_TOTAL: &str = "crossfade_coordinator_promotions_total";
/// The routing table version last pushed.
pub const TABLE_VERSION: &str = "crossfade_coordinator_table_version";
/// Workers by state (`reachable`, `unreachable`, `cordoned`).
pub const WORKERS: &str = "crossfade_coordinator_workers";

/// Bytes of keys and values written to the store.
pub const STORE_BYTES: &str = "crossfade_coordinator_store_written_bytes_total";
/// Transactions written to the store.
pub const STORE_WRITES: &str = "crossfade_coordinator_store_writes_total";
/// Records put or deleted in the store.
pub const STORE_RECORDS: &str = "crossfade_coordinator_store_written_records_total";
/// Time one store transaction took.
pub const STORE_SECONDS: &str = "crossfade_coordinator_store_write_duration_seconds";
/// Time one pass of the coordinator's loop took: taking in what arrived,
/// deciding, writing the store and starting the actions.
pub const PASS_SECONDS: &str = "crossfade_coordinator_pass_duration_seconds";
/// Time from pushing a table to its acknowledgement by every router.
pub const TABLE_ACK_SECONDS: &str = "crossfade_coordinator_table_ack_duration_seconds";
/// 1 while this coordinator leads (or runs alone on the embedded store).
pub const LEADER: &str = "crossfade_coordinator_leader";

/// How long a gauge not set again stays in `/metrics`. Every gauge still
/// meant is set on each pass of the coordinator's loop (every 200 ms), so
/// the series of a deployment no promotion names any more, or of a deleted
/// endpoint, go after this long.
pub const IDLE_GAUGES: std::time::Duration = std::time::Duration::from_secs(60);

/// Histograms and their buckets.
pub const HISTOGRAMS: &[(&str, &[f64])] = &[
    (STEP_SECONDS, OPERATION_SECONDS_BUCKETS),
    (STORE_SECONDS, STORE_SECONDS_BUCKETS),
    (PASS_SECONDS, STORE_SECONDS_BUCKETS),
    (TABLE_ACK_SECONDS, OPERATION_SECONDS_BUCKETS),
];

/// From 100 µs (a small SQLite commit, a quiet pass) to 5 s (etcd's call
/// bound).
const STORE_SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Counts one transaction written to the store.
pub fn store_written(batch: &crate::store::Batch, took: std::time::Duration) {
    metrics::counter!(STORE_WRITES).increment(1);
    metrics::counter!(STORE_BYTES).increment(batch.bytes() as u64);
    metrics::counter!(STORE_RECORDS).increment(batch.operations() as u64);
    metrics::histogram!(STORE_SECONDS).record(took.as_secs_f64());
}

const STATUSES: [(Status, &str); 7] = [
    (Status::Releasing, "releasing"),
    (Status::RampingUp, "ramping_up"),
    (Status::Paused, "paused"),
    (Status::RampingDown, "ramping_down"),
    (Status::Succeeded, "succeeded"),
    (Status::Failed, "failed"),
    (Status::Canceled, "canceled"),
];

/// The name of a status, as labels carry it.
pub fn status_label(status: Status) -> &'static str {
    STATUSES
        .iter()
        .find(|(s, _)| *s == status)
        .map_or("unknown", |(_, name)| name)
}

/// Describes every metric once, at start.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        PROMOTION_STATUS,
        "1 for the status of the endpoint's current or last promotion."
    );
    describe_gauge!(
        CANDIDATE_TRAFFIC_PERCENT,
        "The candidate's share of traffic, in percent."
    );
    describe_gauge!(REPLICAS, "Replicas per endpoint, deployment and state.");
    describe_histogram!(STEP_SECONDS, Unit::Seconds, "Time one promotion step took.");
    describe_counter!(PROMOTIONS_TOTAL, "Promotions ended, by outcome.");
    describe_gauge!(TABLE_VERSION, "The routing table version last pushed.");
    describe_gauge!(WORKERS, "Workers by state.");
    describe_counter!(
        STORE_BYTES,
        Unit::Bytes,
        "Bytes of keys and values written to the store."
    );
    describe_counter!(STORE_WRITES, "Transactions written to the store.");
    describe_counter!(STORE_RECORDS, "Records put or deleted in the store.");
    describe_histogram!(
        STORE_SECONDS,
        Unit::Seconds,
        "Time one store transaction took."
    );
    describe_histogram!(
        PASS_SECONDS,
        Unit::Seconds,
        "Time one pass of the coordinator's loop took (decide, store, act)."
    );
    describe_histogram!(
        TABLE_ACK_SECONDS,
        Unit::Seconds,
        "Time from pushing a table to its acknowledgement by every router."
    );
    describe_gauge!(
        LEADER,
        "1 while this coordinator leads (or runs alone on the embedded store), 0 on standby."
    );
}

/// Sets the gauges from a view.
pub fn record(view: &View) {
    metrics::gauge!(TABLE_VERSION).set(view.state.table_version as f64);
    let reachable = view.workers.values().filter(|w| w.reachable).count();
    let cordoned = view.state.workers.values().filter(|w| w.cordoned).count();
    let known = view.state.workers.len();
    metrics::gauge!(WORKERS, "state" => "reachable").set(reachable as f64);
    metrics::gauge!(WORKERS, "state" => "unreachable").set(known.saturating_sub(reachable) as f64);
    metrics::gauge!(WORKERS, "state" => "cordoned").set(cordoned as f64);
    for endpoint in view.state.endpoints.values() {
        let Some(rollout) = current_rollout(endpoint) else {
            continue;
        };
        let name = endpoint.name.clone();
        for (status, label) in STATUSES {
            metrics::gauge!(PROMOTION_STATUS, "endpoint" => name.clone(), "status" => label)
                .set(if rollout.status == status { 1.0 } else { 0.0 });
        }
        metrics::gauge!(CANDIDATE_TRAFFIC_PERCENT, "endpoint" => name.clone())
            .set(f64::from(rollout.percent_to_candidate()));
        for deployment in [&rollout.from, &rollout.to] {
            if deployment.is_empty() {
                continue;
            }
            let (ready, starting, draining) = rollout.replicas(deployment);
            for (state, count) in [
                ("ready", ready),
                ("starting", starting),
                ("draining", draining),
            ] {
                metrics::gauge!(REPLICAS, "endpoint" => name.clone(), "deployment" => deployment.clone(), "state" => state)
                    .set(f64::from(count));
            }
        }
    }
}
