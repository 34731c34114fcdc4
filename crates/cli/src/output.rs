//! What the CLI prints: tables and a live view for people, JSON (the
//! protos' snake_case names, enums by name) for scripts.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use clap::ValueEnum;
use crossfade_proto::v1;
use crossfade_proto::v1::coordinator_client::CoordinatorClient;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
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

fn pool() -> anyhow::Result<&'static DescriptorPool> {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    if let Some(pool) = POOL.get() {
        return Ok(pool);
    }
    let pool = DescriptorPool::decode(crossfade_proto::FILE_DESCRIPTOR_SET)?;
    Ok(POOL.get_or_init(|| pool))
}

/// The prefixes of crossfade's enum values, which JSON output leaves out:
/// DESIGN §10 writes `"status": "RAMPING_UP"`.
const ENUM_PREFIXES: &[&str] = &[
    "PROMOTION_STATUS_",
    "STEP_PHASE_",
    "DEPLOYMENT_STATE_",
    "ENGINE_STATE_",
    "STARTING_PHASE_",
    "ENGINE_RUNTIME_",
    "GPU_HEALTH_",
    "CLEANUP_STRATEGY_",
    "TABLE_SOURCE_",
];

/// A message as JSON text (`name`: its full proto name), with the protos'
/// snake_case field names and enum values by their short names.
pub fn json<M: prost::Message>(name: &str, message: &M) -> anyhow::Result<String> {
    let descriptor = pool()?
        .get_message_by_name(name)
        .ok_or_else(|| anyhow::anyhow!("no message {name} in the descriptor set"))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false);
    let mut value = dynamic.serialize_with_options(serde_json::value::Serializer, &options)?;
    shorten_enums(&mut value, &dynamic);
    Ok(serde_json::to_string_pretty(&value)?)
}

/// Replaces each enum field's full value name by its short one, walking the
/// message's descriptor so that only enum fields change.
fn shorten_enums(value: &mut serde_json::Value, message: &DynamicMessage) {
    use prost_reflect::{Kind, ReflectMessage as _, Value};
    let serde_json::Value::Object(object) = value else {
        return;
    };
    for field in message.descriptor().fields() {
        let Some(json) = object.get_mut(field.name()) else {
            continue;
        };
        let shorten = |v: &mut serde_json::Value| {
            if let serde_json::Value::String(text) = v
                && let Some(prefix) = ENUM_PREFIXES.iter().find(|p| text.starts_with(**p))
            {
                *text = text[prefix.len()..].to_owned();
            }
        };
        match (field.kind(), json) {
            (Kind::Enum(_), serde_json::Value::Array(items)) => items.iter_mut().for_each(shorten),
            (Kind::Enum(_), json) => shorten(json),
            (Kind::Message(_), json) => match message.get_field(&field).as_ref() {
                Value::Message(inner) => shorten_enums(json, inner),
                Value::List(items) => {
                    if let serde_json::Value::Array(values) = json {
                        for (item, value) in items.iter().zip(values) {
                            if let Value::Message(inner) = item {
                                shorten_enums(value, inner);
                            }
                        }
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
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
            print!("{}", endpoint_text(endpoint));
            Ok(())
        }
    }
}

/// The live view's text.
pub fn endpoint_text(e: &v1::Endpoint) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let deployment = |d: &Option<v1::Deployment>| {
        d.as_ref().map_or("-".to_owned(), |d| {
            let model = d.template.as_ref().map_or("", |t| t.model.as_str());
            format!("{} ({model})", d.id)
        })
    };
    let _ = writeln!(s, "endpoint   {}", e.name);
    let _ = writeln!(s, "active     {}", deployment(&e.active_deployment));
    if e.candidate_deployment.is_some() {
        let _ = writeln!(s, "candidate  {}", deployment(&e.candidate_deployment));
    }
    let promotion = e
        .in_progress_promotion
        .as_ref()
        .or(e.last_promotion.as_ref());
    if let Some(p) = promotion {
        let _ = writeln!(
            s,
            "promotion  {} {}  step {}/{}{}",
            p.id,
            status_name(p.status),
            p.current_step,
            p.total_steps,
            if p.reason.is_empty() {
                String::new()
            } else {
                format!("  ({})", p.reason)
            }
        );
        let _ = writeln!(
            s,
            "traffic    {} {:>3} % to {}",
            bar(p.percent_traffic_to_new_version, 40),
            p.percent_traffic_to_new_version,
            p.to_deployment_id
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
            // By characters: a model name need not be ASCII.
            let line: String = format!("  {:<18} {}", event.kind, event.message)
                .chars()
                .take(79)
                .collect();
            let _ = writeln!(s, "{line}");
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
    say!(
        "{:<20} {:<14} {:<14} {:>9}",
        "NAME",
        "ACTIVE",
        "PROMOTION",
        "CANDIDATE"
    );
    for e in endpoints {
        let active = e.active_deployment.as_ref().map_or("-", |d| d.id.as_str());
        let (status, percent) =
            e.in_progress_promotion
                .as_ref()
                .map_or(("-", String::new()), |p| {
                    (
                        status_name(p.status),
                        format!("{} %", p.percent_traffic_to_new_version),
                    )
                });
        say!(
            "{:<20} {:<14} {:<14} {:>9}",
            e.name,
            active,
            status,
            percent
        );
    }
}

/// `history`.
pub fn history_table(history: &v1::HistoryResponse) {
    say!(
        "{:<12} {:<12} {:<12} {:<14} {:>5}",
        "PROMOTION",
        "FROM",
        "TO",
        "STATUS",
        "STEPS"
    );
    for p in &history.promotions {
        say!(
            "{:<12} {:<12} {:<12} {:<14} {:>5}",
            p.id,
            if p.from_deployment_id.is_empty() {
                "-"
            } else {
                &p.from_deployment_id
            },
            p.to_deployment_id,
            status_name(p.status),
            p.current_step
        );
    }
    say!();
    say!("{:<12} {:<12} MODEL", "DEPLOYMENT", "STATE");
    for d in &history.deployments {
        let state = v1::DeploymentState::try_from(d.state).map_or("-", |s| {
            s.as_str_name().trim_start_matches("DEPLOYMENT_STATE_")
        });
        let model = d.template.as_ref().map_or("", |t| t.model.as_str());
        say!("{:<12} {:<12} {model}", d.id, state);
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

/// `workers`.
pub fn workers_table(workers: &[v1::Worker]) {
    say!(
        "{:<22} {:<9} {:<10} {:<10} {:>8}",
        "WORKER",
        "REACHABLE",
        "ENGINE",
        "DEPLOYMENT",
        "IN-FLIGHT"
    );
    for w in workers {
        let engine = w
            .status
            .as_ref()
            .and_then(|s| s.engine.as_ref())
            .and_then(|e| v1::EngineState::try_from(e.state).ok())
            .map_or("-", |s| s.as_str_name().trim_start_matches("ENGINE_STATE_"));
        let in_flight = w
            .status
            .as_ref()
            .and_then(|s| s.in_flight)
            .map_or(0, |f| f.gate);
        let mut name = w.control_address.clone();
        if w.cordoned {
            name.push_str(" (cordoned)");
        }
        say!(
            "{:<22} {:<9} {:<10} {:<10} {:>8}",
            name,
            if w.reachable { "yes" } else { "no" },
            engine,
            if w.assigned_deployment_id.is_empty() {
                "-"
            } else {
                &w.assigned_deployment_id
            },
            in_flight
        );
    }
}

/// Follows an endpoint until its promotion (`promotion_id`, or the one in
/// progress) ends: redraws in place on a terminal, prints each change
/// otherwise (one JSON object per line with `-o json`). The exit status is
/// the outcome: 0 succeeded, 1 failed, 2 canceled.
pub async fn watch(
    client: &mut CoordinatorClient<Channel>,
    name: &str,
    out: Output,
    promotion_id: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .watch_endpoint(v1::WatchEndpointRequest {
            name: name.to_owned(),
            event_limit: 6,
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    let terminal = std::io::stdout().is_terminal() && out == Output::Text;
    let mut target = promotion_id.map(str::to_owned);
    loop {
        let Some(endpoint) = stream
            .message()
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        else {
            anyhow::bail!("the coordinator ended the watch");
        };
        match out {
            Output::Json => println!(
                "{}",
                json("crossfade.v1.Endpoint", &endpoint)?.replace('\n', "")
            ),
            Output::Text if terminal => {
                print!("\x1b[H\x1b[2J{}", endpoint_text(&endpoint));
                let _ = std::io::stdout().flush();
            }
            Output::Text => println!("{}", endpoint_text(&endpoint)),
        }
        if target.is_none() {
            target = endpoint
                .in_progress_promotion
                .as_ref()
                .map(|p| p.id.clone());
            if target.is_none() {
                // Nothing under way: one view is all there is.
                return Ok(ExitCode::SUCCESS);
            }
        }
        if endpoint.in_progress_promotion.is_none()
            && let Some(last) = endpoint
                .last_promotion
                .as_ref()
                .filter(|p| Some(p.id.as_str()) == target.as_deref())
        {
            return Ok(ExitCode::from(
                match v1::PromotionStatus::try_from(last.status) {
                    Ok(v1::PromotionStatus::Succeeded) => 0,
                    Ok(v1::PromotionStatus::Canceled) => 2,
                    _ => 1,
                },
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_repeated_enums_are_shortened_and_strings_are_not() {
        let endpoint = v1::Endpoint {
            name: "PROMOTION_STATUS_looks_like_an_enum".into(),
            in_progress_promotion: Some(v1::Promotion {
                status: v1::PromotionStatus::Paused as i32,
                step_phase: v1::StepPhase::Draining as i32,
                ..Default::default()
            }),
            active_deployment: Some(v1::Deployment {
                state: v1::DeploymentState::Active as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value: serde_json::Value =
            serde_json::from_str(&json("crossfade.v1.Endpoint", &endpoint).unwrap()).unwrap();
        assert_eq!(value["name"], "PROMOTION_STATUS_looks_like_an_enum");
        assert_eq!(value["in_progress_promotion"]["status"], "PAUSED");
        assert_eq!(value["in_progress_promotion"]["step_phase"], "DRAINING");
        assert_eq!(value["active_deployment"]["state"], "ACTIVE");
    }

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
        let text = endpoint_text(&endpoint);
        assert!(text.contains("RAMPING_UP"));
        assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
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
        let text = endpoint_text(&endpoint);
        assert!(!text.contains('\x1b') && !text.contains('\r') && !text.contains('\x07'));
        assert!(text.contains("chat\\u{1b}[2J"), "{text}");
        assert!(text.contains("\\r\\u{7}xéé"), "{text}");
        assert_eq!(clean("a\tb\nc"), "a\\tb\nc");
    }
}
