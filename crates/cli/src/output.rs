//! What the CLI prints: tables and a live view for people, JSON (the
//! protos' snake_case names, enums by name) for scripts.

mod errors;
mod tables;
mod view;
mod watch;

pub use errors::{BadInput, RpcError, Unreachable, report_error};
pub use tables::{
    endpoints_table, history_table, print_selector, print_settings, routers_table, workers_table,
};
pub use view::endpoint_text;
pub use watch::{terminal_width, watch};

use std::io::IsTerminal as _;

use std::time::SystemTime;

use clap::ValueEnum;

use crossfade_proto::v1;

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
}
