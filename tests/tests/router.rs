//! `crossfade-router` as a real process in front of two `fake-vllm`
//! processes: the official client streams through it, and 200 table swaps
//! by SIGHUP under concurrent streaming load fail no request.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use crossfade_e2e::{
    Process, TempDir, binary, free_port, openai_stream, python_for_test, start_fake_vllm, tokens,
    wait_for_port,
};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// What an agent would serve: the endpoint's name and its alias.
const SERVED: &[&str] = &["chat", "org/model-a"];

struct Router {
    _process: Process,
    pid: u32,
    public: SocketAddr,
    admin: SocketAddr,
    control: SocketAddr,
    config: PathBuf,
    _dir: TempDir,
}

fn config_text(
    public: SocketAddr,
    admin: SocketAddr,
    control: SocketAddr,
    a: (&str, u32, SocketAddr),
    b: (&str, u32, SocketAddr),
) -> String {
    format!(
        r#"
[control_tls]
insecure = true
[metrics]
retired_series_grace = "1s"
[listen]
public = "{public}"
admin = "{admin}"
control = "{control}"

[[endpoint]]
name = "chat"
aliases = ["org/model-a"]
[[endpoint.deployment]]
id = "{}"
weight = {}
workers = ["{}"]
[[endpoint.deployment]]
id = "{}"
weight = {}
workers = ["{}"]
"#,
        a.0, a.1, a.2, b.0, b.1, b.2
    )
}

fn start_router(a: SocketAddr, b: SocketAddr) -> Router {
    let dir = TempDir::new().unwrap();
    let [public, admin, control] =
        [0; 3].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())));
    let config = dir.0.join("router.toml");
    std::fs::write(
        &config,
        config_text(public, admin, control, ("a", 80, a), ("b", 20, b)),
    )
    .unwrap();
    let mut command = Command::new(binary("crossfade-router").unwrap());
    command.arg("--config").arg(&config).env("RUST_LOG", "warn");
    let process = Process::spawn("crossfade-router", command).unwrap();
    wait_for_port(public, Duration::from_secs(20)).unwrap();
    Router {
        pid: process.pid(),
        _process: process,
        public,
        admin,
        control,
        config,
        _dir: dir,
    }
}

fn hangup(pid: u32) {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn the_openai_client_streams_through_the_router() {
    let Some(python) = python_for_test() else {
        return;
    };
    let knobs = [("FAKE_VLLM_TOKENS_PER_SECOND", "20")];
    let (_a, a) = start_fake_vllm("org/model-a", SERVED, &knobs).unwrap();
    let (_b, b) = start_fake_vllm("org/model-b", SERVED, &knobs).unwrap();
    let router = start_router(a, b);

    // By the endpoint's name, and by the alias that keeps an old model name working.
    for model in ["chat", "org/model-a"] {
        let chunks =
            openai_stream(&python, &format!("http://{}/v1", router.public), model).unwrap();
        let tokens = tokens(&chunks);
        assert_eq!(tokens.len(), 8, "{chunks:#?}");
        // The engine answers under the name the client sent.
        let first = tokens[0].content.as_deref().unwrap();
        let served_by = ["org/model-a", "org/model-b"].map(|m| format!("[{m} as {model}]"));
        assert!(served_by.iter().any(|s| s == first), "{first}");
        let spread = tokens.last().unwrap().at - tokens[0].at;
        assert!(
            spread > 0.2,
            "chunks arrived together, within {spread:.3} s: {tokens:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sighup_swaps_under_streaming_load_fail_nothing() {
    let knobs = [
        ("FAKE_VLLM_TOKENS_PER_SECOND", "500"),
        ("FAKE_VLLM_MAX_TOKENS", "8"),
    ];
    let (_a, a) = start_fake_vllm("org/model-a", SERVED, &knobs).unwrap();
    let (_b, b) = start_fake_vllm("org/model-b", SERVED, &knobs).unwrap();
    let router = start_router(a, b);

    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://{}/v1/chat/completions", router.public);
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (stop, url) = (Arc::clone(&stop), url.clone());
            tokio::spawn(async move {
                let client = Client::builder(TokioExecutor::new()).build_http();
                let body = Bytes::from(
                    r#"{"model":"chat","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
                );
                let (mut ok, mut failures) = (0u32, Vec::new());
                // Bounded by count as well as by the stop flag.
                for _ in 0..10_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let request = http::Request::post(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let outcome = async {
                        let response = client.request(request).await?;
                        let status = response.status();
                        let text = response.into_body().collect().await?.to_bytes();
                        anyhow::Ok((status, text))
                    }
                    .await;
                    match outcome {
                        Ok((status, text))
                            if status == 200 && text.ends_with(b"data: [DONE]\n\n") =>
                        {
                            ok += 1
                        }
                        other => failures.push(format!("{other:?}")),
                    }
                }
                (ok, failures)
            })
        })
        .collect();

    for i in 0..200u32 {
        let weight = if i % 2 == 0 { 20 } else { 80 };
        let text = config_text(
            router.public,
            router.admin,
            router.control,
            ("a", weight, a),
            ("b", 100 - weight, b),
        );
        std::fs::write(&router.config, text).unwrap();
        hangup(router.pid);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    for client in clients {
        let (ok, failures) = client.await.unwrap();
        assert!(
            failures.is_empty(),
            "{} failed: {failures:?}",
            failures.len()
        );
        total += ok;
    }
    assert!(
        total >= 60,
        "only {total} streams completed during the swaps"
    );

    // The admin listener reports the same traffic, and the last reload.
    let metrics = http_get(router.admin, "/metrics").await;
    let successes: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("crossfade_router_requests_total{") && l.contains("outcome=\"success\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(successes, f64::from(total), "{metrics}");
    assert!(
        metrics.contains("crossfade_router_table_version 200"),
        "{metrics}"
    );
    assert!(
        metrics.contains("crossfade_router_time_to_first_token_seconds_bucket{"),
        "histograms render as buckets: {metrics}"
    );
    assert!(
        http_get(router.admin, "/readyz")
            .await
            .starts_with("ok: table version 200")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_series_stay_bounded_over_twenty_promotions() {
    let knobs = [("FAKE_VLLM_MAX_TOKENS", "2")];
    let (_a, a) = start_fake_vllm("org/model-a", SERVED, &knobs).unwrap();
    let (_b, b) = start_fake_vllm("org/model-b", SERVED, &knobs).unwrap();
    let router = start_router(a, b);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("http://{}/v1/chat/completions", router.public);
    let body = r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#;

    let mut after_two = None;
    for i in 1..=20u32 {
        // Promotion i: from deployment p(i-1) to p(i), each on a worker.
        let (from, to) = (format!("p{}", i - 1), format!("p{i}"));
        let text = config_text(
            router.public,
            router.admin,
            router.control,
            (&from, 50, a),
            (&to, 50, b),
        );
        std::fs::write(&router.config, text).unwrap();
        hangup(router.pid);
        let listed = format!("deployment=\"{to}\"");
        let mut tries = 0;
        while !http_get(router.admin, "/metrics").await.contains(&listed) {
            tries += 1;
            assert!(tries < 200, "the reload to {to} never took effect");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        for _ in 0..4 {
            let request = http::Request::post(&url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
        }
        if i == 2 || i == 20 {
            // Past the grace period (1 s), retired deployments are gone.
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            let metrics = http_get(router.admin, "/metrics").await;
            let series = metrics.lines().filter(|l| !l.starts_with('#')).count();
            let mut families: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("# TYPE "))
                .collect();
            let all = families.len();
            families.dedup();
            assert_eq!(all, families.len(), "a family named twice: {metrics}");
            assert!(!metrics.contains("deployment=\"p0\""), "{metrics}");
            match after_two {
                None => after_two = Some(series),
                Some(two) => assert!(
                    series <= two,
                    "{series} series after 20 promotions, {two} after 2:\n{metrics}"
                ),
            }
        }
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}
