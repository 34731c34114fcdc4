//! Talking to the engine on 127.0.0.1: the readiness sequence of DESIGN §6
//! (`/health` is 200, `/v1/models` lists the served name, one warm-up
//! request succeeds) and the scrape of its `/metrics`.

use std::time::Duration;

use bytes::Bytes;
use crossfade_proto::v1::StartingPhase;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Longest answer read from the engine (a `/metrics` page, a model list).
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// An HTTP client for the engine's loopback port.
#[derive(Debug, Clone)]
pub struct EngineClient {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    /// vLLM's `--api-key`, which it requires on `/v1/*`: sent as a bearer.
    api_key: Option<crossfade_common::Secret<String>>,
}

/// Why the engine did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing listens yet (vLLM keeps its port closed while it loads).
    #[error("the engine's port is closed")]
    Closed,
    /// It did not answer in time.
    #[error("the engine did not answer within {0:?}")]
    Timeout(Duration),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

impl EngineClient {
    /// A client whose every request gives up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(2)
                .build(connector),
            timeout,
            api_key: None,
        }
    }

    /// This client, sending the `--api-key` that `vllm_args` sets, if any
    /// (vLLM then refuses `/v1/*` without it).
    pub fn for_vllm_args(&self, vllm_args: &str) -> Self {
        use crossfade_common::vllm_args;
        let api_key = vllm_args::split(vllm_args)
            .ok()
            .and_then(|words| vllm_args::value_of(&words, "--api-key").map(str::to_owned))
            .map(crossfade_common::Secret::new);
        Self {
            api_key,
            ..self.clone()
        }
    }

    /// Sends a request to the engine on `port` and reads the whole answer.
    pub async fn call(
        &self,
        port: u16,
        method: Method,
        path: &str,
        json: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Bytes), ProbeError> {
        let body = json.map_or_else(Bytes::new, |v| Bytes::from(v.to_string()));
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{port}{path}"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = &self.api_key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", key.expose()));
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| ProbeError::Failed(e.to_string()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    ProbeError::Closed
                } else {
                    ProbeError::Failed(e.to_string())
                }
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| ProbeError::Failed(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ProbeError::Timeout(self.timeout))?
    }
}

/// Where the readiness sequence stands after one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Not there yet: the phase it is in, and what the engine said.
    Phase(StartingPhase, String),
    /// Every check passed.
    Ready,
}

/// Runs the readiness checks from `phase` on as far as they pass now;
/// `entered` hears of each phase reached on the way (a warm-up request may
/// take a while, and the status should say that is where it is);
/// `max_model_len` gets the context length `/v1/models` reports for the
/// served name, when it does.
pub async fn check(
    client: &EngineClient,
    port: u16,
    served_name: &str,
    mut phase: StartingPhase,
    entered: &mut (dyn FnMut(StartingPhase) + Send),
    max_model_len: &mut Option<u64>,
) -> Check {
    loop {
        match phase {
            StartingPhase::Unspecified | StartingPhase::Launching | StartingPhase::Loading => {
                match client.call(port, Method::GET, "/health", None).await {
                    Err(ProbeError::Closed) => {
                        return Check::Phase(StartingPhase::Loading, String::new());
                    }
                    Ok((StatusCode::OK, _)) => {
                        phase = StartingPhase::ModelsCheck;
                        entered(phase);
                    }
                    Ok((status, _)) => {
                        return Check::Phase(
                            StartingPhase::HealthCheck,
                            format!("/health: {status}"),
                        );
                    }
                    Err(e) => return Check::Phase(StartingPhase::HealthCheck, e.to_string()),
                }
            }
            StartingPhase::HealthCheck => {
                match client.call(port, Method::GET, "/health", None).await {
                    Ok((StatusCode::OK, _)) => {
                        phase = StartingPhase::ModelsCheck;
                        entered(phase);
                    }
                    Ok((status, _)) => {
                        return Check::Phase(phase, format!("/health: {status}"));
                    }
                    Err(e) => return Check::Phase(phase, e.to_string()),
                }
            }
            StartingPhase::ModelsCheck => {
                match client.call(port, Method::GET, "/v1/models", None).await {
                    Ok((StatusCode::OK, body)) if let Some(model) = listed(&body, served_name) => {
                        *max_model_len = model.max_model_len;
                        phase = StartingPhase::Warmup;
                        entered(phase);
                    }
                    Ok((StatusCode::OK, _)) => {
                        return Check::Phase(
                            phase,
                            format!("/v1/models does not list {served_name:?}"),
                        );
                    }
                    Ok((status, _)) => return Check::Phase(phase, format!("/v1/models: {status}")),
                    Err(e) => return Check::Phase(phase, e.to_string()),
                }
            }
            StartingPhase::Warmup => {
                let request = serde_json::json!({
                    "model": served_name,
                    "prompt": "Hello",
                    "max_tokens": 1,
                    "stream": false,
                });
                return match client
                    .call(port, Method::POST, "/v1/completions", Some(request))
                    .await
                {
                    Ok((status, _)) if status.is_success() => Check::Ready,
                    Ok((status, body)) => Check::Phase(
                        phase,
                        format!(
                            "warm-up request: {status}: {}",
                            String::from_utf8_lossy(&body[..body.len().min(200)])
                        ),
                    ),
                    Err(e) => Check::Phase(phase, format!("warm-up request: {e}")),
                };
            }
        }
    }
}

/// A model object of `/v1/models`, as far as the probe reads it.
#[derive(serde::Deserialize)]
struct Model {
    id: String,
    /// vLLM's context length; other servers may not say.
    max_model_len: Option<u64>,
}

/// The model object `/v1/models` lists for `name`, if it lists it.
fn listed(body: &[u8], name: &str) -> Option<Model> {
    #[derive(serde::Deserialize)]
    struct Models {
        data: Vec<Model>,
    }
    let models = serde_json::from_slice::<Models>(body).ok()?;
    models.data.into_iter().find(|m| m.id == name)
}

/// The engine's own load, from its Prometheus page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineLoad {
    /// `vllm:num_requests_running`, summed over its label sets.
    pub running: u32,
    /// `vllm:num_requests_waiting`, summed over its label sets.
    pub waiting: u32,
}

/// Reads the running and waiting counts from a Prometheus text page; `None`
/// when it has neither.
pub fn parse_load(text: &str) -> Option<EngineLoad> {
    let mut running = None;
    let mut waiting = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let slot = match &line[..name_end] {
            "vllm:num_requests_running" => &mut running,
            "vllm:num_requests_waiting" => &mut waiting,
            _ => continue,
        };
        // The value follows the labels (which may hold spaces in quotes).
        let after_labels = match line[name_end..].strip_prefix('{') {
            Some(rest) => rest.rfind('}').map_or("", |end| &rest[end + 1..]),
            None => &line[name_end..],
        };
        if let Some(value) = after_labels
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *slot = Some(slot.unwrap_or(0.0) + value);
        }
    }
    if running.is_none() && waiting.is_none() {
        return None;
    }
    // Gauges of requests: whole and non-negative; anything else is clamped.
    let count = |v: Option<f64>| v.unwrap_or(0.0).clamp(0.0, f64::from(u32::MAX)) as u32;
    Some(EngineLoad {
        running: count(running),
        waiting: count(waiting),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn running_and_waiting_are_summed_over_label_sets() {
        let page = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"org/m\"} 2.0
vllm:num_requests_running{engine=\"1\",model_name=\"a } b\"} 1.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"org/m\"} 3.0 1700000000000
vllm:num_requests_running_total 99
vllm:gpu_cache_usage_perc 0.5
";
        assert_eq!(
            parse_load(page),
            Some(EngineLoad {
                running: 3,
                waiting: 3
            })
        );
        assert_eq!(
            parse_load("vllm:num_requests_waiting 1\n"),
            Some(EngineLoad {
                running: 0,
                waiting: 1
            })
        );
        assert_eq!(parse_load("process_cpu_seconds_total 1\n"), None);
    }

    #[tokio::test]
    async fn readiness_sends_the_api_key_that_vllm_args_sets() {
        let mut config = fake_vllm::Config::new("org/m");
        config.served_model_names = vec!["chat".into()];
        config.port = 0;
        config.tokens_per_second = f64::INFINITY;
        config.api_key = Some(fake_vllm::ApiKey("sk-test".into()));
        let engine = fake_vllm::Handle::bind(config).await.unwrap();
        let port = engine.addr().port();
        let plain = EngineClient::new(Duration::from_secs(5));
        // vLLM with --api-key refuses /v1/* without it.
        assert_eq!(
            from_launch(&plain, port, "chat").await,
            Check::Phase(
                StartingPhase::ModelsCheck,
                "/v1/models: 401 Unauthorized".into()
            )
        );
        let keyed = plain.for_vllm_args("--max-model-len 4096 --api-key=sk-test");
        assert_eq!(from_launch(&keyed, port, "chat").await, Check::Ready);
        assert!(!format!("{keyed:?}").contains("sk-test"), "{keyed:?}");
        let _ = engine.abort().await;
    }

    #[tokio::test]
    async fn readiness_walks_the_phases_of_a_fake_vllm() {
        let mut config = fake_vllm::Config::new("org/m");
        config.served_model_names = vec!["chat".into(), "org/m".into()];
        config.port = 0;
        config.tokens_per_second = f64::INFINITY;
        let engine = fake_vllm::Handle::bind(config).await.unwrap();
        let port = engine.addr().port();
        let client = EngineClient::new(Duration::from_secs(5));
        let mut seen = Vec::new();
        let mut max_model_len = None;
        assert_eq!(
            check(
                &client,
                port,
                "chat",
                StartingPhase::Launching,
                &mut |p| seen.push(p),
                &mut max_model_len
            )
            .await,
            Check::Ready
        );
        assert_eq!(seen, [StartingPhase::ModelsCheck, StartingPhase::Warmup]);
        assert_eq!(
            max_model_len,
            Some(fake_vllm::DEFAULT_MAX_MODEL_LEN),
            "read from /v1/models"
        );
        assert_eq!(
            from_launch(&client, port, "other").await,
            Check::Phase(
                StartingPhase::ModelsCheck,
                "/v1/models does not list \"other\"".into()
            )
        );
        let (status, page) = client
            .call(port, Method::GET, "/metrics", None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            parse_load(std::str::from_utf8(&page).unwrap()),
            Some(EngineLoad::default())
        );
        let _ = engine.abort().await;
        let closed = check(
            &client,
            dead_port(),
            "chat",
            StartingPhase::Launching,
            &mut |_| {},
            &mut None,
        )
        .await;
        assert_eq!(closed, Check::Phase(StartingPhase::Loading, String::new()));
    }

    /// Every check from the launch on, for `name`.
    async fn from_launch(client: &EngineClient, port: u16, name: &str) -> Check {
        let mut max_model_len = None;
        check(
            client,
            port,
            name,
            StartingPhase::Launching,
            &mut |_| {},
            &mut max_model_len,
        )
        .await
    }

    fn dead_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }
}
