//! Test controls: how tests steer a fake by signal instead of by timing.
//!
//! In process they are methods on [`Controls`]; over HTTP they live under
//! `/_fake/`, which is fake-vllm's own and NOT part of vLLM's API:
//!
//! - `POST /_fake/hold`: generation pauses before every request's next token
//!   (requests stay running) until `POST /_fake/release`.
//! - `POST /_fake/fault`, body a fault (`error-500:3`, `none`, ...).
//! - `GET /_fake/stats`: `{"running":..,"waiting":..,"served":..,"held":..,"fault":".."}`.
//!
//! They keep answering while the server drains, so a test can release held
//! requests during a graceful shutdown.

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tracing::info;

use crate::api::{ResponseBody, error, json};
use crate::faults::Fault;
use crate::metrics::Stats;
use crate::server::{Shared, Shutdown};

/// A cloneable handle on one fake's controls.
#[derive(Debug, Clone)]
pub struct Controls {
    shared: Arc<Shared>,
}

impl Controls {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Pauses generation before every request's next token.
    pub fn hold(&self) {
        info!("fake control: hold (generation paused)");
        self.shared.engine.set_held(true);
    }

    /// Lets held generation continue.
    pub fn release(&self) {
        info!("fake control: release (generation resumed)");
        self.shared.engine.set_held(false);
    }

    pub fn is_held(&self) -> bool {
        self.shared.engine.is_held()
    }

    /// Replaces the fault in force; counted faults count from now.
    pub fn set_fault(&self, fault: Fault) {
        info!(%fault, "fake control: fault set");
        self.shared.faults.set(fault);
    }

    pub fn fault(&self) -> Fault {
        self.shared.faults.get()
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The Prometheus text `GET /metrics` serves.
    pub fn metrics(&self) -> String {
        self.shared
            .engine
            .metrics
            .render(&self.shared.config.served_model_names[0])
    }

    /// Starts shutting the server down; its `serve` returns once done.
    /// An abort after a graceful shutdown began cuts it short.
    pub fn shutdown(&self, how: Shutdown) {
        self.shared.shutdown(how);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.drain.is_cancelled()
    }
}

/// Serves `/_fake/...`.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> http::Response<ResponseBody> {
    let controls = Controls::new(shared);
    let method = req.method().clone();
    match (method, req.uri().path()) {
        (Method::POST, "/_fake/hold") => {
            controls.hold();
            state(&controls)
        }
        (Method::POST, "/_fake/release") => {
            controls.release();
            state(&controls)
        }
        (Method::POST, "/_fake/fault") => {
            let body = match req.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("could not read body: {e}"),
                    );
                }
            };
            let text = String::from_utf8_lossy(&body);
            // Accept a bare fault or a JSON string holding one.
            let text = text.trim().trim_matches('"');
            match text.parse::<Fault>() {
                Ok(Fault::ExitDuringLoad) => error(
                    StatusCode::BAD_REQUEST,
                    "exit-during-load only applies at startup (FAKE_VLLM_FAULT)",
                ),
                Ok(fault) => {
                    controls.set_fault(fault);
                    state(&controls)
                }
                Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
            }
        }
        (Method::GET, "/_fake/stats") => state(&controls),
        (_, "/_fake/hold" | "/_fake/release" | "/_fake/fault" | "/_fake/stats") => {
            crate::api::method_not_allowed()
        }
        _ => crate::api::not_found(),
    }
}

fn state(controls: &Controls) -> http::Response<ResponseBody> {
    let s = controls.stats();
    let body = serde_json::json!({
        "running": s.running,
        "waiting": s.waiting,
        "served": s.served,
        "held": controls.is_held(),
        "fault": controls.fault().to_string(),
    });
    json(
        StatusCode::OK,
        serde_json::to_vec(&body)
            .expect("a JSON value always serializes")
            .into(),
    )
}
