//! `--watch`: follows an endpoint across coordinator restarts until its
//! promotion ends, and exits with the outcome.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use crossfade_proto::v1;
use crossfade_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use super::{Output, clean, endpoint_text, json, report_error};

/// The exit status of `--watch` when it gives up on its own: its
/// `--timeout` passed, or an error that retrying cannot mend.
const WATCH_GAVE_UP: u8 = 3;

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
pub(super) struct TimedOut;

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
    // Whether the coordinator was lost (said once, until found again).
    let mut lost = false;
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
                if !lost {
                    eprintln!(
                        "crossfade: the coordinator is unreachable ({}); retrying",
                        clean(status.message())
                    );
                    lost = true;
                }
                bounded(deadline, tokio::time::sleep(backoff)).await?;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(status) => anyhow::bail!("{}", status.message()),
        };
        if std::mem::take(&mut lost) {
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
                    lost = true;
                    break;
                }
                Some(Err(status)) if retryable(&status) => {
                    eprintln!(
                        "crossfade: lost the coordinator ({}); reconnecting",
                        clean(status.message())
                    );
                    lost = true;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
