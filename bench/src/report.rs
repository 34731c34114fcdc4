//! The tables and the goals, printed to stdout.

use serde::Serialize;

use crate::{Results, SystemResult};

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
}

impl Machine {
    /// Reads it from `/proc`.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            kernel,
        }
    }
}

fn find<'a>(results: &'a Results, name: &str) -> Option<&'a SystemResult> {
    results
        .systems
        .iter()
        .find(|s| s.name == name && s.skipped.is_none())
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// Prints every table and the goals.
pub fn print(results: &Results) {
    let direct = find(results, "direct");
    let nginx = find(results, "nginx");
    let m = &results.machine;
    println!(
        "crossfade-bench ({} profile) on {} ({} cores), Linux {}",
        results.profile.name, m.cpu, m.cores, m.kernel
    );
    println!(
        "client on core 0; system under test and backend on core 1; CPU is core 1's busy time from /proc/stat"
    );
    println!();

    let base_cpu = direct
        .and_then(|d| d.fixed_rate.as_ref())
        .map(|r| r.cpu_us_per_request);
    let nginx_net = nginx
        .and_then(|n| n.fixed_rate.as_ref())
        .zip(base_cpu)
        .map(|(r, b)| r.cpu_us_per_request - b);
    println!(
        "Non-streamed requests (latency in µs; \"+\" is added over direct; CPU in µs per request)"
    );
    println!(
        "{:<14} {:>8} {:>7} {:>8} {:>7} | {:>8} {:>8} | {:>7} {:>7} {:>6} | {:>8} {:>7} {:>6}",
        "system",
        "c1 p50",
        "+p50",
        "c1 p99",
        "+p99",
        "rate p50",
        "rate p99",
        "CPU",
        "net",
        "×nginx",
        "max rps",
        "CPU@max",
        "errors"
    );
    for s in &results.systems {
        if let Some(skip) = &s.skipped {
            println!("{:<14} skipped: {skip}", s.name);
            continue;
        }
        let seq = s.sequential.as_ref();
        let rate = s.fixed_rate.as_ref();
        let sat = s.saturation.as_ref();
        let d_seq = direct.and_then(|d| d.sequential.as_ref());
        let added = |f: fn(&crate::load::Latency) -> f64| {
            seq.zip(d_seq).map(|(a, b)| f(&a.latency) - f(&b.latency))
        };
        let cpu = rate.map(|r| r.cpu_us_per_request);
        let net = cpu.zip(base_cpu).map(|(c, b)| c - b);
        let ratio = net
            .zip(nginx_net)
            .filter(|_| s.name != "direct")
            .map(|(a, b)| a / b);
        let errors: u64 = [seq, rate, sat].iter().flatten().map(|r| r.errors).sum();
        println!(
            "{:<14} {:>8} {:>7} {:>8} {:>7} | {:>8} {:>8} | {:>7} {:>7} {:>6} | {:>8} {:>7} {:>6}",
            s.name,
            opt(seq.map(|r| r.latency.p50_us), 1),
            opt(added(|l| l.p50_us).filter(|_| s.name != "direct"), 1),
            opt(seq.map(|r| r.latency.p99_us), 1),
            opt(added(|l| l.p99_us).filter(|_| s.name != "direct"), 1),
            opt(rate.map(|r| r.latency.p50_us), 1),
            opt(rate.map(|r| r.latency.p99_us), 1),
            opt(cpu, 1),
            opt(net.filter(|_| s.name != "direct"), 1),
            opt(ratio, 2),
            opt(sat.map(|r| r.ok as f64 / r.seconds), 0),
            opt(sat.map(|r| r.cpu_us_per_request), 1),
            errors,
        );
    }
    println!(
        "(c1: concurrency 1, {} requests; rate: {} requests/s for {} s, latency from the intended send time; CPU: core 1 per request at that rate, net of direct's; max rps and CPU@max: {} closed-loop clients)",
        results.profile.sequential_requests,
        results.profile.rate,
        results.profile.rate_seconds,
        results.profile.saturation_clients
    );
    println!();

    let base_chunk_cpu = direct
        .and_then(|d| d.sse.as_ref())
        .map(|r| r.cpu_us_per_chunk);
    let d_sse = direct.and_then(|d| d.sse.as_ref());
    println!(
        "SSE: {} streams × {} chunks, one every {} µs (chunk latency: arrival minus the backend's stamp, µs)",
        results.profile.sse_streams, results.profile.sse_chunks, results.profile.sse_interval_us
    );
    println!(
        "{:<14} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7}",
        "system", "chunks", "p50", "p99", "+p99", "max", "merged", "failed", "CPU", "net"
    );
    for s in results.systems.iter().filter(|s| s.skipped.is_none()) {
        let Some(r) = &s.sse else { continue };
        println!(
            "{:<14} {:>8} {:>8.1} {:>8.1} {:>8} {:>8.1} {:>7} {:>7} {:>7.2} {:>7}",
            s.name,
            r.chunks,
            r.chunk_latency.p50_us,
            r.chunk_latency.p99_us,
            opt(
                d_sse
                    .filter(|_| s.name != "direct")
                    .map(|d| r.chunk_latency.p99_us - d.chunk_latency.p99_us),
                1
            ),
            r.chunk_latency.max_us,
            r.merged,
            r.streams_failed,
            r.cpu_us_per_chunk,
            opt(
                base_chunk_cpu
                    .filter(|_| s.name != "direct")
                    .map(|b| r.cpu_us_per_chunk - b),
                2
            ),
        );
    }
    println!();

    println!("Idle streams held open (memory: resident set of the system's processes)");
    println!(
        "{:<14} {:>8} {:>12} {:>12} {:>12}",
        "system", "open", "RSS before", "RSS open", "per stream"
    );
    for s in results.systems.iter().filter(|s| s.skipped.is_none()) {
        let Some(r) = &s.idle else { continue };
        println!(
            "{:<14} {:>8} {:>9} KiB {:>9} KiB {:>8.0} B",
            s.name, r.opened, r.rss_before_kib, r.rss_open_kib, r.bytes_per_stream
        );
    }
    println!();

    let crossfade = find(results, "crossfade");
    if let Some(c) = crossfade.filter(|c| !c.swaps.is_empty()) {
        println!(
            "crossfade-router with its split swapped ({} requests/s, {} one-second slices each; slice p99: the median of the slices' p99s)",
            results.profile.rate, results.profile.swap_seconds
        );
        println!(
            "{:<12} {:>9} {:>8} {:>8} {:>9} {:>9} {:>6} {:>7} {:>16}",
            "calls/s",
            "achieved",
            "p50",
            "p99",
            "p99 ×none",
            "slice p99",
            "×none",
            "errors",
            "shares v1/v2"
        );
        let none = c.swaps.iter().find(|s| s.per_second == 0);
        let label = |s: &crate::SwapRun| match (s.per_second, s.changes_table) {
            (0, _) => "none".to_owned(),
            (n, true) => format!("{n} swaps"),
            (n, false) => format!("{n} no-op"),
        };
        for s in &c.swaps {
            let total = (s.run.shares[0] + s.run.shares[1]).max(1) as f64;
            println!(
                "{:<12} {:>9.0} {:>8.1} {:>8.1} {:>9} {:>9.1} {:>6} {:>7} {:>7.1}%/{:>5.1}%",
                label(s),
                s.swaps.rate,
                s.run.latency.p50_us,
                s.run.latency.p99_us,
                opt(none.map(|n| s.run.latency.p99_us / n.run.latency.p99_us), 3),
                s.slice_p99_median_us,
                opt(
                    none.map(|n| s.slice_p99_median_us / n.slice_p99_median_us),
                    3
                ),
                s.run.errors + s.swaps.failed,
                100.0 * s.run.shares[0] as f64 / total,
                100.0 * s.run.shares[1] as f64 / total,
            );
        }
        println!();
    }

    println!("Goals");
    for goal in goals(results) {
        println!("  {} {}", if goal.met { "MET " } else { "MISS" }, goal.text);
    }
}

/// One of issue 17's goals (issue 7's, made stricter), judged on this run.
pub struct Goal {
    /// Whether the run meets it.
    pub met: bool,
    /// The goal and the figures.
    pub text: String,
}

/// The goals, judged where the run has the figures.
pub fn goals(results: &Results) -> Vec<Goal> {
    let mut goals = Vec::new();
    let (Some(direct), Some(crossfade)) = (find(results, "direct"), find(results, "crossfade"))
    else {
        return goals;
    };
    let nginx = find(results, "nginx");
    let net = |s: &SystemResult| {
        Some(
            s.fixed_rate.as_ref()?.cpu_us_per_request
                - direct.fixed_rate.as_ref()?.cpu_us_per_request,
        )
    };
    if let Some((c, n)) = net(crossfade).zip(nginx.and_then(net)) {
        goals.push(Goal {
            met: c <= n,
            text: format!(
                "router: CPU per request ≤ nginx's: {c:.1} µs vs {n:.1} µs ({:.2}×)",
                c / n
            ),
        });
    }
    let gate = find(results, "gate");
    if let Some((g, n)) = gate.and_then(net).zip(nginx.and_then(net)) {
        goals.push(Goal {
            met: g <= 0.6 * n,
            text: format!(
                "gate: CPU per request ≤ 0.6× nginx's: {g:.1} µs vs {n:.1} µs ({:.2}×)",
                g / n
            ),
        });
    }
    let added = |s: &SystemResult| {
        Some(s.sequential.as_ref()?.latency.p50_us - direct.sequential.as_ref()?.latency.p50_us)
    };
    if let Some((c, n)) = added(crossfade).zip(nginx.and_then(added)) {
        goals.push(Goal {
            met: c <= n,
            text: format!("router: added p50 at concurrency 1 ≤ nginx's: {c:.1} µs vs {n:.1} µs"),
        });
    }
    if let (Some(c), Some(n)) = (&crossfade.sse, nginx.and_then(|n| n.sse.as_ref())) {
        goals.push(Goal {
            met: c.chunk_latency.p99_us <= n.chunk_latency.p99_us && c.merged == 0,
            text: format!(
                "SSE chunk p99 ≤ nginx's, none merged: {:.1} µs vs {:.1} µs, {} merged",
                c.chunk_latency.p99_us, n.chunk_latency.p99_us, c.merged
            ),
        });
    }
    let none = crossfade.swaps.iter().find(|s| s.per_second == 0);
    let thousand = crossfade
        .swaps
        .iter()
        .find(|s| s.per_second == 1_000 && s.changes_table);
    let no_op = crossfade
        .swaps
        .iter()
        .find(|s| s.per_second == 1_000 && !s.changes_table);
    if let (Some(none), Some(k)) = (none, thousand) {
        // Judged on the median of the one-second slices' p99s; the pooled
        // p99 is printed beside it.
        let ratio = k.slice_p99_median_us / none.slice_p99_median_us;
        let pooled = k.run.latency.p99_us / none.run.latency.p99_us;
        let errors = k.run.errors + k.swaps.failed;
        let calls_alone = no_op.map_or_else(String::new, |o| {
            format!(
                "; against 1,000 calls/s that change nothing: {:.3}×",
                k.slice_p99_median_us / o.slice_p99_median_us
            )
        });
        goals.push(Goal {
            met: ratio <= 1.05 && errors == 0,
            text: format!(
                "p99 with 1,000 swaps/s within 5 % of none, no errors: {:.1} µs vs {:.1} µs ({ratio:.3}×; pooled {pooled:.3}×{calls_alone}), {errors} errors",
                k.slice_p99_median_us, none.slice_p99_median_us
            ),
        });
    }
    let haproxy = find(results, "haproxy").and_then(|h| h.idle.as_ref());
    if let Some((idle, h)) = crossfade.idle.as_ref().zip(haproxy) {
        goals.push(Goal {
            met: idle.bytes_per_stream <= h.bytes_per_stream && idle.opened == idle.wanted,
            text: format!(
                "router: memory per idle stream ≤ HAProxy's: {:.0} vs {:.0} bytes ({} of {} streams open)",
                idle.bytes_per_stream, h.bytes_per_stream, idle.opened, idle.wanted
            ),
        });
    }
    goals
}
