//! The Prometheus recorder every program installs once at start, and the
//! bucket sets its histograms share.
//!
//! Every histogram gets explicit buckets: without them the exporter renders
//! summaries, which cannot be aggregated across routers or agents.

use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

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
///
/// With `forget_idle_gauges`, a gauge not set for that long leaves the
/// exposition: for a program that sets every gauge it still means on each
/// pass of a loop, so that the series of what no longer exists (a
/// deployment long promoted away) go. Never for a gauge updated through a
/// handle kept between updates: the recorder forgets the series, and the
/// handle's later updates with it.
pub fn builder(
    histograms: &[(&str, &[f64])],
    forget_idle_gauges: Option<Duration>,
) -> Result<PrometheusBuilder, BuildError> {
    let builder = PrometheusBuilder::new().idle_timeout(MetricKindMask::GAUGE, forget_idle_gauges);
    histograms
        .iter()
        .try_fold(builder, |builder, (name, buckets)| {
            builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
        })
}

/// Installs the global recorder (see [`builder`]) and keeps its upkeep
/// running until shutdown. Serve [`PrometheusHandle::render`] on the
/// program's admin `/metrics`.
pub fn install(
    histograms: &[(&str, &[f64])],
    forget_idle_gauges: Option<Duration>,
    shutdown: &Shutdown,
) -> Result<PrometheusHandle, BuildError> {
    let handle = builder(histograms, forget_idle_gauges)?.install_recorder()?;
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
        let recorder = builder(&[(name, LATENCY_SECONDS_BUCKETS)], None)
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
        assert!(builder(&[("x", &[])], None).is_err());
    }

    #[test]
    fn gauges_not_set_again_leave_the_exposition() {
        let idle = Duration::from_millis(200);
        let recorder = builder(&[], Some(idle)).expect("valid").build_recorder();
        let handle = recorder.handle();
        let set = |deployments: &[&str]| {
            metrics::with_local_recorder(&recorder, || {
                for d in deployments {
                    let deployment = (*d).to_owned();
                    metrics::gauge!("crossfade_test_replicas", "deployment" => deployment).set(1.0);
                }
            });
        };
        set(&["v1", "v2"]);
        let first = handle.render();
        assert!(first.contains("deployment=\"v1\""), "{first}");
        // v2 goes on being set, v1 not: past the idle time, only v2 is left.
        let start = std::time::Instant::now();
        let mut text = first;
        while text.contains("deployment=\"v1\"") && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
            set(&["v2"]);
            text = handle.render();
        }
        assert!(!text.contains("deployment=\"v1\""), "{text}");
        assert!(text.contains("deployment=\"v2\""), "{text}");
        assert!(start.elapsed() >= idle, "forgotten before its idle time");
    }
}
