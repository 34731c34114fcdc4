//! Clients streaming chat completions back to back through routers, and
//! the check that every one of them succeeded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::StatusCode;

use super::chat;

/// Each client's answers: status and body.
pub type Outcomes = Vec<tokio::task::JoinHandle<Vec<(StatusCode, String)>>>;

/// `clients` clients streaming back to back through the routers at
/// `publics` (in turn) until `stop`, at most 5,000 requests each.
pub fn streaming(publics: &[SocketAddr], clients: usize, stop: &Arc<AtomicBool>) -> Outcomes {
    (0..clients)
        .map(|i| {
            let public = publics[i % publics.len()];
            let stop = Arc::clone(stop);
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) && outcomes.len() < 5000 {
                    let (status, _, body) = chat(public, "chat", true).await;
                    outcomes.push((status, body));
                }
                outcomes
            })
        })
        .collect()
}

/// Every request succeeded and streamed to its end; returns how many there
/// were and how many `model` answered.
pub async fn no_failures(outcomes: Outcomes, model: &str) -> (usize, usize) {
    let mut total = 0;
    let mut by_model = 0;
    for client in outcomes {
        for (status, body) in client.await.unwrap() {
            total += 1;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(
                body.trim_end().ends_with("data: [DONE]"),
                "a stream broke: {body}"
            );
            if body.contains(&format!("[{model} as chat]")) {
                by_model += 1;
            }
        }
    }
    (total, by_model)
}
