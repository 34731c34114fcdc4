//! The endpoint as people read it: the live view of `status` and
//! `--watch`, wrapped to the terminal.

use std::time::SystemTime;

use crossfade_proto::v1;

use super::{bar, clean, status_name};

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

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
