//! What the CLI prints: tables and a live view for people, JSON (the
//! protos' snake_case names, enums by name) for scripts.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::ValueEnum;
use crossfade_proto::v1;
use crossfade_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// `text` as a terminal may show it: every control character that came
/// from a user or an engine (an escape sequence in a model name, a carriage
/// return in an event) is written as its Rust escape (`\u{1b}`), line
/// breaks excepted. JSON needs no such care: its encoder escapes them.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\n' || !c.is_control() {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

/// `println!` for text that holds what users and engines wrote.
macro_rules! say {
    () => { println!() };
    ($($arg:tt)*) => { println!("{}", $crate::output::clean(&format!($($arg)*))) };
}
pub(crate) use say;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables and live views.
    Text,
    /// JSON with the protos' field names.
    Json,
}

/// A message as JSON text (`name`: its full proto name), with the protos'
/// snake_case field names and enum values by their short names.
pub fn json<M: prost::Message>(name: &str, message: &M) -> anyhow::Result<String> {
    let value = crossfade_proto::json::to_json(name, message, crossfade_proto::json::Shape::Proto)?;
    Ok(serde_json::to_string_pretty(&value)?)
}

/// Prints a message as JSON.
pub fn print_message<M: prost::Message>(name: &str, message: &M) -> anyhow::Result<()> {
    println!("{}", json(name, message)?);
    Ok(())
}

fn status_name(status: i32) -> &'static str {
    match v1::PromotionStatus::try_from(status) {
        Ok(v1::PromotionStatus::Releasing) => "RELEASING",
        Ok(v1::PromotionStatus::RampingUp) => "RAMPING_UP",
        Ok(v1::PromotionStatus::Paused) => "PAUSED",
        Ok(v1::PromotionStatus::RampingDown) => "RAMPING_DOWN",
        Ok(v1::PromotionStatus::Succeeded) => "SUCCEEDED",
        Ok(v1::PromotionStatus::Failed) => "FAILED",
        Ok(v1::PromotionStatus::Canceled) => "CANCELED",
        _ => "-",
    }
}

/// A bar of the split: `#` the candidate's share, `.` the old one's.
pub fn bar(percent: u32, width: usize) -> String {
    let filled = (percent.min(100) as usize * width).div_ceil(100);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// The endpoint, as text (fits 80 columns) or JSON.
pub fn print_endpoint(out: Output, endpoint: &v1::Endpoint) -> anyhow::Result<()> {
    match out {
        Output::Json => print_message("crossfade.v1.Endpoint", endpoint),
        Output::Text => {
            let width = std::io::stdout().is_terminal().then(terminal_width);
            print!("{}", endpoint_text(endpoint, width, SystemTime::now()));
            Ok(())
        }
    }
}

/// `text` broken into lines of at most `width` characters (by
/// characters: a model name need not be ASCII), at spaces where it can,
/// each line after the first starting with `indent`. `None`: one line.
fn wrap(text: &str, width: Option<usize>, indent: &str) -> String {
    let Some(width) = width else {
        return text.to_owned();
    };
    let room = |first: bool| {
        if first {
            width
        } else {
            width.saturating_sub(indent.chars().count()).max(10)
        }
    };
    let mut lines: Vec<String> = vec![String::new()];
    for word in text.split(' ') {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let first = lines.len() == 1;
            let line = lines.last_mut().expect("never empty");
            let used = line.chars().count();
            let space = usize::from(used > 0);
            if used + space + word.len() <= room(first) {
                if space == 1 {
                    line.push(' ');
                }
                line.extend(word.iter());
                break;
            }
            if used == 0 {
                // Longer than a whole line: cut it.
                let rest = word.split_off(room(first));
                line.extend(word.iter());
                word = rest;
            }
            lines.push(String::new());
        }
    }
    lines.join(&format!("\n{indent}"))
}

/// A phase's name without its prefix (`STABILIZING`).
fn phase_name(phase: i32) -> &'static str {
    match v1::StepPhase::try_from(phase) {
        Ok(v1::StepPhase::Unspecified) | Err(_) => "",
        Ok(p) => p.as_str_name().trim_start_matches("STEP_PHASE_"),
    }
}

/// The live view's text: lines of at most `width` characters (events and
/// reasons wrapped; `None`: each whole on one line, as a file wants it);
/// time left counted from `now`.
pub fn endpoint_text(e: &v1::Endpoint, width: Option<usize>, now: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let deployment = |d: &Option<v1::Deployment>| {
        d.as_ref().map_or("-".to_owned(), |d| {
            let model = d.template.as_ref().map_or("", |t| t.model.as_str());
            format!("{} ({model})", d.id)
        })
    };
    const INDENT: &str = "           ";
    let _ = writeln!(
        s,
        "{}",
        wrap(&format!("endpoint   {}", e.name), width, INDENT)
    );
    let _ = writeln!(
        s,
        "{}",
        wrap(
            &format!("active     {}", deployment(&e.active_deployment)),
            width,
            INDENT
        )
    );
    if e.candidate_deployment.is_some() {
        let _ = writeln!(
            s,
            "{}",
            wrap(
                &format!("candidate  {}", deployment(&e.candidate_deployment)),
                width,
                INDENT
            )
        );
    }
    let in_progress = e.in_progress_promotion.as_ref();
    if let Some(p) = in_progress.or(e.last_promotion.as_ref()) {
        let mut line = format!(
            "promotion  {} {}  step {}/{}",
            p.id,
            status_name(p.status),
            p.current_step,
            p.total_steps,
        );
        let phase = phase_name(p.step_phase);
        if in_progress.is_some() && !phase.is_empty() {
            let _ = write!(line, "  {phase}");
            if let Some(left) = p
                .stabilization_ends_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .and_then(|end| end.duration_since(now).ok())
            {
                let _ = write!(line, ", {} s left", left.as_secs_f64().ceil());
            }
        }
        let _ = writeln!(s, "{}", wrap(&line, width, INDENT));
        if !p.reason.is_empty() {
            let label = if in_progress.is_some() && status_name(p.status) != "PAUSED" {
                "waiting"
            } else {
                "reason"
            };
            let _ = writeln!(
                s,
                "{}",
                wrap(&format!("{label:<10} {}", p.reason), width, INDENT)
            );
        }
        let bar_width = width.map_or(40, |w| w.saturating_sub(30).clamp(10, 40));
        let _ = writeln!(
            s,
            "{}",
            wrap(
                &format!(
                    "traffic    {} {:>3} % to {}",
                    bar(p.percent_traffic_to_new_version, bar_width),
                    p.percent_traffic_to_new_version,
                    p.to_deployment_id
                ),
                width,
                INDENT
            )
        );
    }
    let _ = writeln!(
        s,
        "replicas   {:<16} {:>5} {:>8} {:>8}",
        "DEPLOYMENT", "READY", "STARTING", "DRAINING"
    );
    for r in &e.replicas {
        let _ = writeln!(
            s,
            "           {:<16} {:>5} {:>8} {:>8}",
            r.deployment_id, r.ready, r.starting, r.draining
        );
    }
    if !e.events.is_empty() {
        let _ = writeln!(s, "events");
        for event in e.events.iter().rev().take(6).rev() {
            let line = format!("  {:<18} {}", event.kind, event.message);
            let _ = writeln!(s, "{}", wrap(&line, width, "                     "));
        }
    }
    clean(&s)
}

/// A promotion after a control command.
pub fn print_promotion(out: Output, p: &v1::Promotion) -> anyhow::Result<()> {
    match out {
        Output::Json => print_message("crossfade.v1.Promotion", p),
        Output::Text => {
            say!(
                "{} {}  {} {} % to {}",
                p.id,
                status_name(p.status),
                bar(p.percent_traffic_to_new_version, 20),
                p.percent_traffic_to_new_version,
                p.to_deployment_id
            );
            Ok(())
        }
    }
}

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
    let rows = vec![
        vec!["rolling_deploy".to_owned(), p.rolling_deploy.to_string()],
        vec![
            "max_surge_percent".to_owned(),
            p.max_surge_percent.to_string(),
        ],
        vec![
            "max_unavailable_percent".to_owned(),
            p.max_unavailable_percent.to_string(),
        ],
        vec![
            "stabilization_time_seconds".to_owned(),
            p.stabilization_time_seconds.to_string(),
        ],
        vec![
            "replica_overhead_percent".to_owned(),
            p.replica_overhead_percent.to_string(),
        ],
        vec!["promotion_cleanup_strategy".to_owned(), cleanup.to_owned()],
        vec![
            "drain_timeout_seconds".to_owned(),
            p.drain_timeout_seconds.to_string(),
        ],
        vec![
            "ready_timeout_seconds".to_owned(),
            p.ready_timeout_seconds.to_string(),
        ],
        vec![
            "health_gate_margin_percent".to_owned(),
            p.health_gate_margin_percent.to_string(),
        ],
        vec![
            "health_gate_min_requests".to_owned(),
            p.health_gate_min_requests.to_string(),
        ],
    ];
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

/// One worker, after `cordon` or `uncordon`.
pub fn print_worker(out: Output, worker: &v1::Worker) -> anyhow::Result<()> {
    match out {
        Output::Json => print_message("crossfade.v1.Worker", worker),
        Output::Text => {
            workers_table(std::slice::from_ref(worker));
            Ok(())
        }
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

/// The exit status of `--watch` when it gives up on its own: its
/// `--timeout` passed, or an error that retrying cannot mend.
pub const WATCH_GAVE_UP: u8 = 3;

/// The exit status for a promotion's final status: 0 SUCCEEDED, 1 FAILED,
/// 2 CANCELED.
fn outcome(status: i32) -> ExitCode {
    ExitCode::from(match v1::PromotionStatus::try_from(status) {
        Ok(v1::PromotionStatus::Succeeded) => 0,
        Ok(v1::PromotionStatus::Canceled) => 2,
        _ => 1,
    })
}

/// Whether a failed watch call is worth making again: the coordinator
/// restarting, a connection cut, a leader changing. What the coordinator
/// says of the request itself (no such endpoint, not allowed) is not.
fn retryable(status: &tonic::Status) -> bool {
    !matches!(
        status.code(),
        tonic::Code::NotFound
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::FailedPrecondition
            | tonic::Code::Unimplemented
    )
}

/// How a watched promotion stands in one view of its endpoint.
enum Seen {
    /// Still going (or, for `status --watch`, none started yet).
    Going,
    /// It ended with this status.
    Ended(i32),
    /// Neither in progress nor the last one: it ended while the watch was
    /// away and another began; the history says how.
    Elsewhere,
}

fn seen(endpoint: &v1::Endpoint, target: Option<&str>) -> Seen {
    let Some(target) = target else {
        return Seen::Going;
    };
    if endpoint
        .in_progress_promotion
        .as_ref()
        .is_some_and(|p| p.id == target)
    {
        return Seen::Going;
    }
    match endpoint.last_promotion.as_ref().filter(|p| p.id == target) {
        Some(last) if endpoint.in_progress_promotion.is_none() || last.finished_at.is_some() => {
            Seen::Ended(last.status)
        }
        _ => Seen::Elsewhere,
    }
}

/// Follows an endpoint until its promotion ends: `promotion_id`, or (for
/// `status --watch`) the one in progress, or the next one to start. It
/// redraws in place on a terminal (and every second, for the time left),
/// prints each change otherwise (one JSON object per line with `-o json`).
/// A coordinator that restarts or a connection that breaks is retried
/// (backing off up to 5 s) until `timeout`. The exit status is the
/// outcome: 0 succeeded, 1 failed, 2 canceled, [`WATCH_GAVE_UP`] for the
/// timeout or an error of its own.
pub async fn watch(
    client: &mut CoordinatorClient<Channel>,
    name: &str,
    out: Output,
    promotion_id: Option<&str>,
    timeout: Option<Duration>,
) -> ExitCode {
    let deadline = timeout.map(|t| Instant::now() + t);
    match follow(client, name, out, promotion_id, deadline).await {
        Ok(code) => code,
        Err(e) => {
            report_error(out, &e);
            ExitCode::from(WATCH_GAVE_UP)
        }
    }
}

/// A future bounded by the watch's deadline.
async fn bounded<F: Future>(deadline: Option<Instant>, future: F) -> anyhow::Result<F::Output> {
    match deadline {
        None => Ok(future.await),
        Some(deadline) => tokio::time::timeout_at(deadline.into(), future)
            .await
            .map_err(|_| TimedOut.into()),
    }
}

/// `--timeout` passed.
#[derive(Debug, thiserror::Error)]
#[error("--timeout passed before the promotion ended; it goes on without this watch")]
struct TimedOut;

async fn follow(
    client: &mut CoordinatorClient<Channel>,
    name: &str,
    out: Output,
    promotion_id: Option<&str>,
    deadline: Option<Instant>,
) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stdout().is_terminal() && out == Output::Text;
    let width = terminal.then(terminal_width);
    let mut target = promotion_id.map(str::to_owned);
    let mut backoff = Duration::from_millis(200);
    let mut lost: Option<String> = None;
    let mut last_view = String::new();
    loop {
        let opened = bounded(
            deadline,
            client.watch_endpoint(v1::WatchEndpointRequest {
                name: name.to_owned(),
                event_limit: 6,
            }),
        )
        .await?;
        let mut stream = match opened {
            Ok(stream) => stream.into_inner(),
            Err(status) if retryable(&status) => {
                if lost.is_none() {
                    eprintln!(
                        "crossfade: the coordinator is unreachable ({}); retrying",
                        clean(status.message())
                    );
                    lost = Some(status.message().to_owned());
                }
                bounded(deadline, tokio::time::sleep(backoff)).await?;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(status) => anyhow::bail!("{}", status.message()),
        };
        if lost.take().is_some() {
            eprintln!("crossfade: reconnected to the coordinator");
        }
        backoff = Duration::from_millis(200);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut latest: Option<v1::Endpoint> = None;
        loop {
            let next = bounded(deadline, async {
                tokio::select! {
                    next = stream.message() => Some(next),
                    _ = tick.tick(), if terminal => None,
                }
            })
            .await?;
            let endpoint = match next {
                // A tick: the same view, its time left counted again.
                None => match &latest {
                    Some(endpoint) => endpoint.clone(),
                    None => continue,
                },
                Some(Ok(Some(endpoint))) => endpoint,
                Some(Ok(None)) => {
                    eprintln!("crossfade: the coordinator ended the watch; reconnecting");
                    lost = Some(String::new());
                    break;
                }
                Some(Err(status)) if retryable(&status) => {
                    eprintln!(
                        "crossfade: lost the coordinator ({}); reconnecting",
                        clean(status.message())
                    );
                    lost = Some(status.message().to_owned());
                    break;
                }
                Some(Err(status)) => anyhow::bail!("{}", status.message()),
            };
            match out {
                Output::Json => {
                    if latest.as_ref() != Some(&endpoint) {
                        println!(
                            "{}",
                            json("crossfade.v1.Endpoint", &endpoint)?.replace('\n', "")
                        );
                    }
                }
                Output::Text => {
                    let mut view = endpoint_text(&endpoint, width, SystemTime::now());
                    if target.is_none() && endpoint.in_progress_promotion.is_none() {
                        view.push_str("waiting for a promotion to start\n");
                    }
                    if view != last_view {
                        if terminal {
                            print!("\x1b[H\x1b[2J{view}");
                            let _ = std::io::stdout().flush();
                        } else {
                            println!("{view}");
                        }
                        last_view = view;
                    }
                }
            }
            if target.is_none() {
                target = endpoint
                    .in_progress_promotion
                    .as_ref()
                    .map(|p| p.id.clone());
            }
            match seen(&endpoint, target.as_deref()) {
                Seen::Going => {}
                Seen::Ended(status) => return Ok(outcome(status)),
                Seen::Elsewhere => {
                    let id = target.as_deref().unwrap_or_default();
                    return Ok(outcome(ended_status(client, name, id, deadline).await?));
                }
            }
            latest = Some(endpoint);
        }
        bounded(deadline, tokio::time::sleep(backoff)).await?;
    }
}

/// The final status of promotion `id` of `name`, from its history.
async fn ended_status(
    client: &mut CoordinatorClient<Channel>,
    name: &str,
    id: &str,
    deadline: Option<Instant>,
) -> anyhow::Result<i32> {
    let history = bounded(
        deadline,
        client.history(v1::HistoryRequest {
            endpoint: name.to_owned(),
            limit: 0,
        }),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("{}", e.message()))?
    .into_inner();
    history
        .promotions
        .iter()
        .find(|p| p.id == id)
        .map(|p| p.status)
        .ok_or_else(|| anyhow::anyhow!("promotion {id} is not in the history of `{name}`"))
}

/// The terminal's width in columns (80 when it cannot be told).
pub fn terminal_width() -> usize {
    terminal_size::terminal_size().map_or(80, |(w, _)| usize::from(w.0).max(20))
}

/// The shape of an error in `-o json` mode, on stderr:
/// `{"error": {"code": "NOT_FOUND", "message": "..."}}`. `code` is the
/// gRPC status name the coordinator answered with, `UNAVAILABLE` when it
/// could not be reached, `INVALID_ARGUMENT` for what the command line
/// itself got wrong, `DEADLINE_EXCEEDED` for `--timeout`, else `UNKNOWN`.
pub fn error_json(e: &anyhow::Error) -> String {
    let code = if let Some(rpc) = e.downcast_ref::<RpcError>() {
        rpc.code
    } else if e.downcast_ref::<TimedOut>().is_some() {
        "DEADLINE_EXCEEDED"
    } else if e.downcast_ref::<Unreachable>().is_some() {
        "UNAVAILABLE"
    } else if e.downcast_ref::<BadInput>().is_some() {
        "INVALID_ARGUMENT"
    } else {
        "UNKNOWN"
    };
    crossfade_proto::json::error(code, &format!("{e:#}")).to_string()
}

/// Prints an error on stderr: `crossfade: ...` for people, one JSON
/// object with `-o json` ([`error_json`]).
pub fn report_error(out: Output, e: &anyhow::Error) {
    match out {
        Output::Json => eprintln!("{}", error_json(e)),
        // A server's message may quote what a user sent.
        Output::Text => eprintln!("crossfade: {}", clean(&format!("{e:#}"))),
    }
}

/// An error the coordinator answered with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    /// Its gRPC status, by name (`NOT_FOUND`).
    pub code: &'static str,
    /// The coordinator's message (it names the field and its range).
    pub message: String,
}

impl From<tonic::Status> for RpcError {
    fn from(status: tonic::Status) -> Self {
        Self {
            code: crossfade_proto::json::code_name(status.code()),
            message: status.message().to_owned(),
        }
    }
}

/// The coordinator could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// What the command line asked for cannot be done as asked (a missing
/// file, a malformed flag), before any call.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_candidate_share() {
        assert_eq!(bar(0, 10), "[..........]");
        assert_eq!(bar(50, 10), "[#####.....]");
        assert_eq!(bar(100, 10), "[##########]");
    }

    #[test]
    fn json_uses_the_protos_names_and_enum_names() {
        let promotion = v1::Promotion {
            id: "promo-2".into(),
            status: v1::PromotionStatus::RampingUp as i32,
            percent_traffic_to_new_version: 40,
            ..Default::default()
        };
        let text = json("crossfade.v1.Promotion", &promotion).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["status"], "RAMPING_UP");
        assert_eq!(value["percent_traffic_to_new_version"], 40);
    }

    #[test]
    fn the_view_fits_80_columns() {
        let endpoint = v1::Endpoint {
            name: "chat".into(),
            in_progress_promotion: Some(v1::Promotion {
                id: "promo-2".into(),
                to_deployment_id: "dep-3".into(),
                percent_traffic_to_new_version: 50,
                status: v1::PromotionStatus::RampingUp as i32,
                ..Default::default()
            }),
            events: vec![v1::Event {
                kind: "step-started".into(),
                message: "x".repeat(200),
                ..Default::default()
            }],
            ..Default::default()
        };
        let now = SystemTime::now();
        let text = endpoint_text(&endpoint, Some(80), now);
        assert!(text.contains("RAMPING_UP"));
        assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
        // Wrapped, not cut: every character of the event is there.
        assert_eq!(text.matches('x').count(), 200, "{text}");
        // In a file, each event whole on its line.
        let file = endpoint_text(&endpoint, None, now);
        assert!(
            file.lines().any(|l| l.ends_with(&"x".repeat(200))),
            "{file}"
        );
    }

    #[test]
    fn the_view_shows_the_phase_the_stabilization_left_and_what_the_step_waits_for() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let endpoint = v1::Endpoint {
            name: "chat".into(),
            in_progress_promotion: Some(v1::Promotion {
                id: "promo-2".into(),
                status: v1::PromotionStatus::RampingUp as i32,
                step_phase: v1::StepPhase::Stabilizing as i32,
                stabilization_ends_at: Some((now + Duration::from_millis(2_500)).into()),
                reason: "an idle worker for the next replica".into(),
                current_step: 1,
                total_steps: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = endpoint_text(&endpoint, Some(100), now);
        assert!(text.contains("step 1/2  STABILIZING, 3 s left"), "{text}");
        assert!(
            text.contains("waiting    an idle worker for the next replica"),
            "{text}"
        );
    }

    #[test]
    fn wrapping_breaks_at_spaces_and_cuts_only_longer_words() {
        assert_eq!(wrap("aaa bbb ccc", Some(7), "  "), "aaa bbb\n  ccc");
        assert_eq!(
            wrap("abcdefghijklmnopqrstuvwxyz", Some(12), "  "),
            "abcdefghijkl\n  mnopqrstuv\n  wxyz"
        );
        assert_eq!(wrap("aaa bbb ccc", None, "  "), "aaa bbb ccc");
    }

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

    #[test]
    fn json_errors_have_one_shape_with_the_code_of_their_cause() {
        let rpc: anyhow::Error =
            RpcError::from(tonic::Status::not_found("endpoint: no endpoint `x`")).into();
        let value: serde_json::Value = serde_json::from_str(&error_json(&rpc)).unwrap();
        assert_eq!(value["error"]["code"], "NOT_FOUND");
        assert_eq!(value["error"]["message"], "endpoint: no endpoint `x`");
        let wrapped =
            anyhow::Error::from(BadInput("reading the template t.toml".into())).context("promote");
        let value: serde_json::Value = serde_json::from_str(&error_json(&wrapped)).unwrap();
        assert_eq!(value["error"]["code"], "INVALID_ARGUMENT");
        assert_eq!(
            value["error"]["message"],
            "promote: reading the template t.toml"
        );
        let other: serde_json::Value =
            serde_json::from_str(&error_json(&anyhow::anyhow!("odd"))).unwrap();
        assert_eq!(other["error"]["code"], "UNKNOWN");
    }

    #[test]
    fn a_watch_ends_with_its_own_promotion_however_it_learns_of_the_end() {
        let promotion = |id: &str, status: v1::PromotionStatus, finished: bool| v1::Promotion {
            id: id.into(),
            status: status as i32,
            finished_at: finished.then(|| SystemTime::now().into()),
            ..Default::default()
        };
        let going = v1::Endpoint {
            in_progress_promotion: Some(promotion("p2", v1::PromotionStatus::RampingUp, false)),
            last_promotion: Some(promotion("p1", v1::PromotionStatus::Succeeded, true)),
            ..Default::default()
        };
        assert!(matches!(seen(&going, Some("p2")), Seen::Going));
        assert!(matches!(seen(&going, None), Seen::Going));
        // p1 ended before p2 began.
        assert!(
            matches!(seen(&going, Some("p1")), Seen::Ended(s) if s == v1::PromotionStatus::Succeeded as i32)
        );
        let ended = v1::Endpoint {
            last_promotion: Some(promotion("p2", v1::PromotionStatus::Canceled, true)),
            ..Default::default()
        };
        assert!(
            matches!(seen(&ended, Some("p2")), Seen::Ended(s) if s == v1::PromotionStatus::Canceled as i32)
        );
        // p2 ended while the watch was away and p3 ended after it.
        let later = v1::Endpoint {
            last_promotion: Some(promotion("p3", v1::PromotionStatus::Failed, true)),
            ..Default::default()
        };
        assert!(matches!(seen(&later, Some("p2")), Seen::Elsewhere));
        assert_eq!(
            outcome(v1::PromotionStatus::Succeeded as i32),
            ExitCode::from(0)
        );
        assert_eq!(
            outcome(v1::PromotionStatus::Failed as i32),
            ExitCode::from(1)
        );
        assert_eq!(
            outcome(v1::PromotionStatus::Canceled as i32),
            ExitCode::from(2)
        );
    }

    #[test]
    fn what_users_and_engines_wrote_reaches_the_terminal_escaped() {
        let endpoint = v1::Endpoint {
            name: "chat\x1b[2J".into(),
            events: vec![v1::Event {
                kind: "failed".into(),
                // Control characters, then a cut that falls inside a
                // character of a script that is not ASCII.
                message: format!("\r\x07x{}", "é".repeat(70)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = endpoint_text(&endpoint, Some(80), SystemTime::now());
        assert!(!text.contains('\x1b') && !text.contains('\r') && !text.contains('\x07'));
        assert!(text.contains("chat\\u{1b}[2J"), "{text}");
        assert!(text.contains("\\r\\u{7}xéé"), "{text}");
        assert_eq!(clean("a\tb\nc"), "a\\tb\nc");
    }
}
