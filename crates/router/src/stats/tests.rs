use super::*;

#[test]
fn outcomes_land_in_the_window_and_aborts_count() {
    let stats = Stats::default();
    let d = stats.deployment("chat", "v1");
    let mut ok = d.start();
    ok.ttft = Some(Duration::from_millis(5));
    ok.finish(Outcome::Success);
    d.start().finish(Outcome::ServerError);
    let dropped = d.start();
    assert_eq!(d.in_flight(), 1);
    drop(dropped);
    assert_eq!(d.in_flight(), 0);
    d.retried(RetryReason::Draining);

    let sum = d.summary(0);
    assert_eq!(sum.counts.total, 3);
    assert_eq!(sum.counts.success, 1);
    assert_eq!(sum.counts.server_errors, 1);
    assert_eq!(sum.counts.aborted_streams, 1);
    assert_eq!(sum.retries.draining, 1);
    assert_eq!(sum.ttft.summary().count, 1);
    assert_eq!(sum.latency.summary().count, 3);
    // Nothing is counted in a window that starts after it happened.
    assert_eq!(d.summary(now_bucket() + 1).counts.total, 0);
    // The same deployment in the next table shares the window.
    assert!(Arc::ptr_eq(&d, &stats.deployment("chat", "v1")));
}

#[test]
fn series_render_in_the_text_format() {
    let stats = Stats::default();
    let d = stats.deployment("chat", "v\"1");
    let mut ok = d.start();
    ok.ttft = Some(Duration::from_millis(30));
    ok.finish(Outcome::Success);
    d.start().finish(Outcome::Shed);
    d.retried(RetryReason::Draining);
    d.ejected();
    let _in_flight = d.start();

    let mut out = String::new();
    stats.render(&mut out, Instant::now());
    let labels = r#"endpoint="chat",deployment="v\"1""#;
    for line in [
        format!("crossfade_router_requests_total{{{labels},outcome=\"success\"}} 1"),
        format!("crossfade_router_requests_total{{{labels},outcome=\"shed\"}} 1"),
        format!("crossfade_router_requests_total{{{labels},outcome=\"aborted\"}} 0"),
        format!("crossfade_router_retries_total{{{labels},reason=\"draining\"}} 1"),
        format!("crossfade_router_worker_ejections_total{{{labels}}} 1"),
        format!("crossfade_router_in_flight_requests{{{labels}}} 1"),
        format!("crossfade_router_time_to_first_token_seconds_bucket{{{labels},le=\"0.025\"}} 0"),
        format!("crossfade_router_time_to_first_token_seconds_bucket{{{labels},le=\"0.05\"}} 1"),
        format!("crossfade_router_time_to_first_token_seconds_bucket{{{labels},le=\"+Inf\"}} 1"),
        format!("crossfade_router_time_to_first_token_seconds_count{{{labels}}} 1"),
        format!("crossfade_router_request_duration_seconds_count{{{labels}}} 2"),
    ] {
        assert!(out.lines().any(|l| l == line), "{line} not in\n{out}");
    }
    let families: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    assert_eq!(families.len(), 6, "one TYPE line per family: {families:?}");
    assert!(
        out.lines().filter(|l| !l.starts_with('#')).all(|l| families
            .iter()
            .any(|f| l.starts_with(f.split(' ').nth(2).unwrap()))),
        "every series belongs to a family: {out}"
    );
}
