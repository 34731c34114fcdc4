//! The Prometheus recorder every program installs once at start, and the
//! bucket sets its histograms share.
//!
//! Every histogram gets explicit buckets: without them the exporter renders
//! summaries, which cannot be aggregated across routers or agents.

use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Shutdown;

/// Buckets for request latencies and time to first token, in seconds: from
/// a cached reply (milliseconds) to a long generation (minutes).
pub const LATENCY_SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets for slow operations (drains, model loads, promotion steps), in
/// seconds: up to an hour.
pub const OPERATION_SECONDS_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

/// How often the recorder's upkeep runs (drains histogram buffers so memory
/// stays bounded between scrapes).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A recorder builder with explicit buckets for each named histogram.
pub fn builder(histograms: &[(&str, &[f64])]) -> Result<PrometheusBuilder, BuildError> {
    histograms
        .iter()
        .try_fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
            builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
        })
}

/// Installs the global recorder and keeps its upkeep running until shutdown.
/// Serve [`PrometheusHandle::render`] on the program's admin `/metrics`.
pub fn install(
    histograms: &[(&str, &[f64])],
    shutdown: &Shutdown,
) -> Result<PrometheusHandle, BuildError> {
    let handle = builder(histograms)?.install_recorder()?;
    let upkeep = handle.clone();
    let stop = shutdown.clone();
    shutdown.spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => upkeep.run_upkeep(),
                () = stop.triggered() => return,
            }
        }
    });
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_as_buckets_not_summaries() {
        let name = "crossfade_test_request_duration_seconds";
        let recorder = builder(&[(name, LATENCY_SECONDS_BUCKETS)])
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!(name, "endpoint" => "chat").record(0.2);
            metrics::histogram!("crossfade_test_unconfigured_seconds").record(0.2);
        });
        let text = handle.render();
        assert!(
            text.contains(&format!("{name}_bucket{{endpoint=\"chat\",le=\"0.25\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{name}_bucket{{endpoint=\"chat\",le=\"0.1\"}} 0")),
            "{text}"
        );
        // The contrast that makes the test meaningful: without buckets the
        // exporter falls back to a summary.
        assert!(
            text.contains("crossfade_test_unconfigured_seconds{quantile="),
            "{text}"
        );
    }

    #[test]
    fn empty_buckets_are_refused() {
        assert!(builder(&[("x", &[])]).is_err());
    }
}
