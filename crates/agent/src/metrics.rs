//! The agent's Prometheus metrics, `crossfade_agent_*`, on the admin port.
//! Labels are bounded: engine states, outcomes, GPU indices.

use crossfade_common::metrics::OPERATION_SECONDS_BUCKETS;

/// Requests the gate answered, by `outcome` (`proxied`, `refused_draining`,
/// `refused_not_ready`, `engine_unreachable`, `engine_error`).
pub const GATE_REQUESTS_TOTAL: &str = "crossfade_agent_gate_requests_total";
/// Requests in flight through the gate.
pub const GATE_IN_FLIGHT: &str = "crossfade_agent_gate_in_flight_requests";
/// SSE streams ended with an error event at a drain's deadline.
pub const GATE_STREAMS_CUT_TOTAL: &str = "crossfade_agent_gate_streams_cut_total";
/// 1 for the engine's current `state`, 0 for the others.
pub const ENGINE_STATE: &str = "crossfade_agent_engine_state";
/// Engine restarts after crashes.
pub const ENGINE_RESTARTS_TOTAL: &str = "crossfade_agent_engine_restarts_total";
/// The engine's own `vllm:num_requests_running`.
pub const ENGINE_REQUESTS_RUNNING: &str = "crossfade_agent_engine_requests_running";
/// The engine's own `vllm:num_requests_waiting`.
pub const ENGINE_REQUESTS_WAITING: &str = "crossfade_agent_engine_requests_waiting";
/// Time from launch to ready.
pub const ENGINE_START_SECONDS: &str = "crossfade_agent_engine_start_duration_seconds";
/// Time a drain took, by `result` (`drained`, `deadline`, `undrained`).
pub const DRAIN_SECONDS: &str = "crossfade_agent_drain_duration_seconds";
/// GPU memory in use, by `gpu` index.
pub const GPU_MEMORY_USED_BYTES: &str = "crossfade_agent_gpu_memory_used_bytes";
/// GPU memory in all, by `gpu` index.
pub const GPU_MEMORY_TOTAL_BYTES: &str = "crossfade_agent_gpu_memory_total_bytes";
/// GPU utilisation, 0 to 1, by `gpu` index.
pub const GPU_UTILIZATION_RATIO: &str = "crossfade_agent_gpu_utilization_ratio";
/// GPU temperature, by `gpu` index.
pub const GPU_TEMPERATURE_CELSIUS: &str = "crossfade_agent_gpu_temperature_celsius";
/// GPU power draw, by `gpu` index.
pub const GPU_POWER_WATTS: &str = "crossfade_agent_gpu_power_watts";
/// GPU health class by `gpu` index: 0 unknown, 1 healthy, 2 warning,
/// 3 reset required, 4 unhealthy.
pub const GPU_HEALTH: &str = "crossfade_agent_gpu_health";

/// Histograms and their buckets.
pub const HISTOGRAMS: &[(&str, &[f64])] = &[
    (ENGINE_START_SECONDS, OPERATION_SECONDS_BUCKETS),
    (DRAIN_SECONDS, OPERATION_SECONDS_BUCKETS),
];

/// Describes every metric once, at start, and starts the counters without
/// labels at 0, so that they are exported (and `rate()` sees their first
/// increment) before anything happens.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    for counter in [ENGINE_RESTARTS_TOTAL, GATE_STREAMS_CUT_TOTAL] {
        metrics::counter!(counter).absolute(0);
    }
    describe_counter!(
        GATE_REQUESTS_TOTAL,
        "Requests the gate answered, by outcome."
    );
    describe_gauge!(GATE_IN_FLIGHT, "Requests in flight through the gate.");
    describe_counter!(
        GATE_STREAMS_CUT_TOTAL,
        "SSE streams ended with an error event at a drain's deadline."
    );
    describe_gauge!(
        ENGINE_STATE,
        "1 for the engine's current state, 0 for the others."
    );
    describe_counter!(ENGINE_RESTARTS_TOTAL, "Engine restarts after crashes.");
    describe_gauge!(
        ENGINE_REQUESTS_RUNNING,
        "The engine's vllm:num_requests_running."
    );
    describe_gauge!(
        ENGINE_REQUESTS_WAITING,
        "The engine's vllm:num_requests_waiting."
    );
    describe_histogram!(
        ENGINE_START_SECONDS,
        Unit::Seconds,
        "Time from launch to ready."
    );
    describe_histogram!(
        DRAIN_SECONDS,
        Unit::Seconds,
        "Time a drain took, by result."
    );
    describe_gauge!(GPU_MEMORY_USED_BYTES, Unit::Bytes, "GPU memory in use.");
    describe_gauge!(GPU_MEMORY_TOTAL_BYTES, Unit::Bytes, "GPU memory in all.");
    describe_gauge!(GPU_UTILIZATION_RATIO, "GPU utilisation, 0 to 1.");
    describe_gauge!(
        GPU_TEMPERATURE_CELSIUS,
        "GPU temperature in degrees Celsius."
    );
    describe_gauge!(GPU_POWER_WATTS, "GPU power draw in watts.");
    describe_gauge!(
        GPU_HEALTH,
        "GPU health class: 0 unknown, 1 healthy, 2 warning, 3 reset required, 4 unhealthy."
    );
}
