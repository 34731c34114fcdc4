//! The tables of `endpoint list`, `history`, `settings`, `selector`,
//! `routers` and `workers`, padded to their widest cell.

use std::time::SystemTime;

use crossfade_proto::v1;

use super::{clean, status_name};

/// `endpoint list`.
pub fn endpoints_table(endpoints: &[v1::Endpoint]) {
    let rows: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| {
            let active = e.active_deployment.as_ref().map_or("-", |d| d.id.as_str());
            let (status, percent) =
                e.in_progress_promotion
                    .as_ref()
                    .map_or(("-", "-".to_owned()), |p| {
                        (
                            status_name(p.status),
                            format!("{} %", p.percent_traffic_to_new_version),
                        )
                    });
            vec![
                e.name.clone(),
                active.to_owned(),
                status.to_owned(),
                percent,
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["NAME", "ACTIVE", "PROMOTION", "CANDIDATE"], &rows)
    );
}

/// Columns padded to their widest cell, two spaces apart (the last one
/// not padded), as `kubectl get` prints them.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    clean(&out)
}

/// `-` for an empty cell.
fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// A timestamp as UTC, to the second (`2026-12-01 12:30:05`).
fn utc(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .map_or("-".to_owned(), |t| {
            humantime::format_rfc3339_seconds(t)
                .to_string()
                .replacen('T', " ", 1)
                .trim_end_matches('Z')
                .to_owned()
        })
}

/// How long from `from` to `to` (or to now), to the second (`1m 05s`).
fn took(from: Option<&prost_types::Timestamp>, to: Option<&prost_types::Timestamp>) -> String {
    let time = |t: Option<&prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(*t).ok());
    let Some(from) = time(from) else {
        return "-".to_owned();
    };
    let to = time(to).unwrap_or_else(SystemTime::now);
    let secs = to.duration_since(from).unwrap_or_default().as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// A promotion's settings in one cell: how it moved.
fn settings_summary(settings: Option<&v1::PromotionSettings>) -> String {
    let Some(p) = settings else {
        return "-".to_owned();
    };
    if !p.rolling_deploy {
        return "all at once".to_owned();
    }
    let mode = if p.max_surge_percent > 0 {
        format!("surge {}%", p.max_surge_percent)
    } else {
        format!("unavailable {}%", p.max_unavailable_percent)
    };
    format!(
        "rolling, {mode}, stabilize {}s",
        p.stabilization_time_seconds
    )
}

/// `history`: each promotion with what it promoted, how (its settings),
/// when and for how long, how it ended and why; then the deployments.
pub fn history_table(history: &v1::HistoryResponse) {
    let rows: Vec<Vec<String>> = history
        .promotions
        .iter()
        .map(|p| {
            let mut status = status_name(p.status).to_owned();
            if p.forced {
                status.push_str(" (forced)");
            }
            let to = if p.rollback {
                format!("{} (rollback)", p.to_deployment_id)
            } else {
                p.to_deployment_id.clone()
            };
            vec![
                p.id.clone(),
                or_dash(&p.from_deployment_id),
                to,
                status,
                format!("{}/{}", p.current_step, p.total_steps),
                utc(p.started_at.as_ref()),
                took(p.started_at.as_ref(), p.finished_at.as_ref()),
                settings_summary(p.settings.as_ref()),
                or_dash(&p.reason),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "PROMOTION",
                "FROM",
                "TO",
                "STATUS",
                "STEPS",
                "STARTED (UTC)",
                "TOOK",
                "HOW",
                "REASON"
            ],
            &rows
        )
    );
    println!();
    let rows: Vec<Vec<String>> = history
        .deployments
        .iter()
        .map(|d| {
            let state = v1::DeploymentState::try_from(d.state).map_or("-", |s| {
                s.as_str_name().trim_start_matches("DEPLOYMENT_STATE_")
            });
            let (model, args) = d
                .template
                .as_ref()
                .map_or((String::new(), String::new()), |t| {
                    (t.model.clone(), t.vllm_args.clone())
                });
            vec![
                d.id.clone(),
                state.to_owned(),
                or_dash(&model),
                or_dash(&args),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["DEPLOYMENT", "STATE", "MODEL", "VLLM_ARGS"], &rows)
    );
}

/// `settings`: the promotion settings, by Baseten's names (and ours).
pub fn print_settings(p: &v1::PromotionSettings) {
    let cleanup = v1::CleanupStrategy::try_from(p.promotion_cleanup_strategy).map_or("-", |c| {
        c.as_str_name().trim_start_matches("CLEANUP_STRATEGY_")
    });
    let rows: Vec<Vec<String>> = [
        ("rolling_deploy", p.rolling_deploy.to_string()),
        ("max_surge_percent", p.max_surge_percent.to_string()),
        (
            "max_unavailable_percent",
            p.max_unavailable_percent.to_string(),
        ),
        (
            "stabilization_time_seconds",
            p.stabilization_time_seconds.to_string(),
        ),
        (
            "replica_overhead_percent",
            p.replica_overhead_percent.to_string(),
        ),
        ("promotion_cleanup_strategy", cleanup.to_owned()),
        ("drain_timeout_seconds", p.drain_timeout_seconds.to_string()),
        ("ready_timeout_seconds", p.ready_timeout_seconds.to_string()),
        (
            "health_gate_margin_percent",
            p.health_gate_margin_percent.to_string(),
        ),
        (
            "health_gate_min_requests",
            p.health_gate_min_requests.to_string(),
        ),
    ]
    .into_iter()
    .map(|(name, value)| vec![name.to_owned(), value])
    .collect();
    print!("{}", table(&["SETTING", "VALUE"], &rows));
}

/// `selector`: what a worker must have to hold one of the endpoint's
/// replicas.
pub fn print_selector(selector: &v1::WorkerSelector) {
    let mut rows: Vec<Vec<String>> = selector
        .labels
        .iter()
        .map(|(k, v)| vec![format!("label {k}"), v.clone()])
        .collect();
    rows.sort();
    if !selector.gpu_name_contains.is_empty() {
        rows.push(vec![
            "gpu_name_contains".to_owned(),
            selector.gpu_name_contains.clone(),
        ]);
    }
    if selector.min_gpu_memory_bytes > 0 {
        rows.push(vec![
            "min_gpu_memory".to_owned(),
            format!(
                "{} GiB",
                selector.min_gpu_memory_bytes as f64 / f64::from(1 << 30)
            ),
        ]);
    }
    if selector.min_gpu_count > 0 {
        rows.push(vec![
            "min_gpu_count".to_owned(),
            selector.min_gpu_count.to_string(),
        ]);
    }
    if rows.is_empty() {
        println!("any worker");
    } else {
        print!("{}", table(&["REQUIRES", "VALUE"], &rows));
    }
}

/// `routers list`.
pub fn routers_table(routers: &v1::ListRoutersResponse) {
    let rows: Vec<Vec<String>> = routers
        .routers
        .iter()
        .map(|r| {
            vec![
                r.control_address.clone(),
                if r.reachable { "yes" } else { "no" }.to_owned(),
                r.acknowledged_version.to_string(),
                utc(r.last_seen.as_ref()),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "ROUTER",
                "REACHABLE",
                "TABLE ACKNOWLEDGED",
                "LAST SEEN (UTC)"
            ],
            &rows
        )
    );
    if routers.table_version > 0 {
        println!("newest table pushed: {}", routers.table_version);
    }
}

/// A worker's GPUs in one cell: `2× NVIDIA H200 (141 GiB)`, or `-`.
fn gpus_summary(status: Option<&v1::WorkerStatus>) -> String {
    let gpus = status.map_or(&[][..], |s| s.gpus.as_slice());
    let Some(first) = gpus.first() else {
        return "-".to_owned();
    };
    let gib = first.memory_total_bytes as f64 / f64::from(1 << 30);
    if gpus.iter().all(|g| g.name == first.name) {
        format!("{}× {} ({gib:.0} GiB)", gpus.len(), first.name)
    } else {
        format!("{} GPUs, mixed", gpus.len())
    }
}

/// `workers`: id, control address, labels, GPUs and their health,
/// in-flight requests, engine state and deployment.
pub fn workers_table(workers: &[v1::Worker]) {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let status = w.status.as_ref();
            let engine = status
                .and_then(|s| s.engine.as_ref())
                .and_then(|e| v1::EngineState::try_from(e.state).ok())
                .map_or("-", |s| s.as_str_name().trim_start_matches("ENGINE_STATE_"));
            let health = status
                .and_then(|s| v1::GpuHealth::try_from(s.gpu_health).ok())
                .map_or("-", |h| h.as_str_name().trim_start_matches("GPU_HEALTH_"));
            let mut labels: Vec<String> = status
                .map(|s| s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            labels.sort();
            let in_flight = status.and_then(|s| s.in_flight).map_or(0, |f| f.gate);
            let mut state = if w.reachable { "ready" } else { "unreachable" }.to_owned();
            if w.cordoned {
                state = format!("cordoned ({})", or_dash(&w.cordon_reason));
            }
            let deployment = if w.assigned_deployment_id.is_empty() {
                "-".to_owned()
            } else {
                format!("{}/{}", w.assigned_endpoint, w.assigned_deployment_id)
            };
            vec![
                w.id.clone(),
                w.control_address.clone(),
                state,
                or_dash(&labels.join(",")),
                gpus_summary(status),
                health.to_owned(),
                in_flight.to_string(),
                engine.to_owned(),
                deployment,
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "WORKER",
                "ADDRESS",
                "STATE",
                "LABELS",
                "GPUS",
                "GPU HEALTH",
                "IN-FLIGHT",
                "ENGINE",
                "DEPLOYMENT"
            ],
            &rows
        )
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_to_the_widest_cell() {
        let text = table(
            &["A", "LONG HEADER", "C"],
            &[vec!["wide cell".into(), "x".into(), "last".into()]],
        );
        assert_eq!(
            text,
            "A          LONG HEADER  C\nwide cell  x            last\n"
        );
    }
}
