//! The router's request path against fake-vllm engines on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossfade_router::proxy::ProxySettings;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::*;

fn deployment_of(headers: &http::HeaderMap) -> String {
    headers["x-crossfade-deployment"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_80_20_split_holds_and_sessions_stick() {
    let v1 = engine("org/model-v1", f64::INFINITY).await;
    let v2 = engine("org/model-v2", f64::INFINITY).await;
    let router = TestRouter::start(
        table(
            0,
            vec![
                deployment("v1", 80, &[v1.addr()]),
                deployment("v2", 20, &[v2.addr()]),
            ],
        ),
        ProxySettings::default(),
    )
    .await;
    let client = client();

    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..2_000 {
        let (status, headers, body) = chat(&client, &router).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let id = deployment_of(&headers);
        // The engine's reply proves the header tells the truth.
        assert!(
            body.contains(&format!("[org/model-{id} as chat]")),
            "{id}: {body}"
        );
        *counts.entry(id).or_default() += 1;
    }
    let v1_share = f64::from(counts["v1"]) / 2_000.0;
    assert!((0.77..=0.83).contains(&v1_share), "{counts:?}");

    for session in ["alice", "bob", "carol", "dave"] {
        let mut seen = Vec::new();
        for _ in 0..20 {
            let (_, headers, _) = post(
                &client,
                &router.url("/v1/chat/completions"),
                chat_body("chat", false),
                &[("x-session-id", session)],
            )
            .await
            .unwrap();
            seen.push(deployment_of(&headers));
        }
        assert!(seen.iter().all(|d| *d == seen[0]), "{session}: {seen:?}");
    }
    // The OpenAI `user` field is a session key too.
    let body = serde_json::json!({"model": "chat", "messages": [], "user": "erin"}).to_string();
    let mut seen = Vec::new();
    for _ in 0..20 {
        let (_, headers, _) = post(
            &client,
            &router.url("/v1/chat/completions"),
            body.clone(),
            &[],
        )
        .await
        .unwrap();
        seen.push(deployment_of(&headers));
    }
    assert!(seen.iter().all(|d| *d == seen[0]), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_chunk_by_chunk() {
    let engine = engine("org/model", 20.0).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[engine.addr()])]),
        ProxySettings::default(),
    )
    .await;
    let request = stream_request(&router);
    let started = Instant::now();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            arrivals.push(started.elapsed());
            text.push_str(std::str::from_utf8(data).unwrap());
        }
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // Four tokens at 20 a second: the first arrives at least 100 ms before
    // the last, which a buffering proxy would deliver together.
    assert!(arrivals.len() >= 4, "{arrivals:?}");
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(spread >= Duration::from_millis(100), "{arrivals:?}");
    // Counted as a success once its last byte went through.
    let counts = counts(&router);
    assert_eq!((counts.total, counts.success), (1, 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_to_first_token_is_the_first_body_byte_not_the_headers() {
    // The engine sends the stream's headers at once, its first token after
    // a second, as vLLM does while it prefills.
    let mut config = fake_vllm::Config::new("org/model");
    config.served_model_names = vec!["chat".into()];
    config.port = 0;
    config.ttft = Duration::from_secs(1);
    config.default_max_tokens = 2;
    let engine = fake_vllm::Handle::bind(config).await.unwrap();
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[engine.addr()])]),
        ProxySettings::default(),
    )
    .await;
    let response = client().request(stream_request(&router)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert!(text.ends_with(b"data: [DONE]\n\n"));
    let ttft = report(&router)[0].deployments[0]
        .time_to_first_token
        .unwrap();
    assert_eq!(ttft.count, 1);
    assert!(ttft.max_seconds >= 1.0, "{ttft:?}");
    // The Prometheus histogram says the same: nothing at or below 1 s.
    let mut metrics = String::new();
    router
        .routes
        .stats()
        .render(&mut metrics, std::time::Instant::now());
    let series =
        r#"crossfade_router_time_to_first_token_seconds_bucket{endpoint="chat",deployment="v1","#;
    for (le, count) in [("1", 0), ("+Inf", 1)] {
        let line = format!("{series}le=\"{le}\"}} {count}");
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_replica_is_held_until_one_enters_the_table() {
    let engine = engine("org/model", f64::INFINITY).await;
    // The only replica is out of the table (reloading in place).
    let router = TestRouter::start(
        table(1, vec![deployment("v1", 0, &[engine.addr()])]),
        ProxySettings::default(),
    )
    .await;
    let held = {
        let url = router.url("/v1/chat/completions");
        tokio::spawn(async move { post(&client(), &url, chat_body("chat", false), &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "answered without a replica");
    router
        .routes
        .apply_from_coordinator(&table(2, vec![deployment("v2", 1, &[engine.addr()])]))
        .unwrap();
    let (status, headers, body) = held.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["x-crossfade-deployment"], "v2");
    let queued: u64 = headers["x-crossfade-queued-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(queued >= 300, "{queued}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_gets_503_when_no_replica_comes_in_time() {
    let engine = engine("org/model", f64::INFINITY).await;
    let router = TestRouter::start(
        table(1, vec![deployment("v1", 0, &[engine.addr()])]),
        ProxySettings {
            queue_timeout: Duration::from_millis(200),
            ..ProxySettings::default()
        },
    )
    .await;
    let (status, headers, body) = chat(&client(), &router).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["retry-after"], "1");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "queue_timeout");
}

/// The first deployment's request counts, from the start of time.
fn counts(router: &TestRouter) -> crossfade_proto::v1::RequestCounts {
    report(router)[0].deployments[0].requests.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gate_is_retried_elsewhere_and_a_dead_worker_avoided() {
    let engine = engine("org/model", f64::INFINITY).await;
    let draining = DrainingGate::start().await;
    let dead = dead_address().await;
    let router = TestRouter::start(
        table(
            0,
            vec![deployment("v1", 1, &[draining.addr, dead, engine.addr()])],
        ),
        ProxySettings::default(),
    )
    .await;
    let client = client();
    for i in 0..100 {
        let (status, _, body) = chat(&client, &router).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
    }
    // The draining gate was tried (and refused before any engine saw the
    // request), so the retries were real.
    assert!(draining.requests.load(Ordering::Relaxed) > 0);
    assert_eq!(engine.stats().served, 100);

    // Each worker's attempts, as GetStats reports them.
    let report = report(&router);
    let workers = &report[0].deployments[0].workers;
    let counts = |addr: std::net::SocketAddr| {
        workers
            .iter()
            .find(|w| w.address == addr.to_string())
            .unwrap()
            .requests
            .unwrap()
    };
    assert_eq!(
        counts(draining.addr).shed,
        draining.requests.load(Ordering::Relaxed)
    );
    assert!(counts(dead).upstream_unreachable >= 1);
    let served = counts(engine.addr());
    assert_eq!((served.total, served.success), (100, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_worker_stays_draining_the_client_gets_a_retryable_503() {
    let a = DrainingGate::start().await;
    let b = DrainingGate::start().await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[a.addr, b.addr])]),
        ProxySettings {
            queue_timeout: Duration::from_millis(400),
            ..ProxySettings::default()
        },
    )
    .await;
    let (status, headers, body) = chat(&client(), &router).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["retry-after"], "1");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "no_capacity");
    // Held and sent again within the queue's timeout, to both each time.
    let tries = a.requests.load(Ordering::Relaxed);
    assert!(tries >= 2, "{tries}");
    assert_eq!(b.requests.load(Ordering::Relaxed), tries);
    // One request, counted once: its last try.
    let report = report(&router);
    let deployment = &report[0].deployments[0];
    assert!(deployment.retries.unwrap().draining >= tries);
    let requests = deployment.requests.unwrap();
    assert_eq!((requests.total, requests.shed), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_every_worker_refused_is_held_until_one_takes_it() {
    // The only host's agent restarts: its gate refuses connections a while.
    let gate = dead_address().await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[gate])]),
        ProxySettings::default(),
    )
    .await;
    let back = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut config = fake_vllm::Config::new("org/model");
        config.served_model_names = vec!["chat".into()];
        config.port = gate.port();
        config.default_max_tokens = 4;
        config.tokens_per_second = f64::INFINITY;
        fake_vllm::Handle::bind(config).await.unwrap()
    };
    let client = client();
    let ((status, headers, body), engine) = tokio::join!(chat(&client, &router), back);
    assert_eq!(status, StatusCode::OK, "{body}");
    let held: u64 = headers["x-crossfade-queued-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(held >= 300, "{held}");
    assert_eq!(engine.stats().served, 1);
    let requests = counts(&router);
    assert_eq!((requests.total, requests.success), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_once_response_bytes_were_sent_and_a_broken_stream_ends_with_an_error_event() {
    let dying = engine("org/model-a", 50.0).await;
    let other = engine("org/model-b", f64::INFINITY).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[dying.addr()])]),
        ProxySettings::default(),
    )
    .await;
    dying.hold();
    let request = stream_request(&router);
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "headers arrived");
    // Now the only worker's table entry gains a healthy neighbour, and the
    // engine streaming this response dies.
    router
        .routes
        .apply_from_config(&table(
            0,
            vec![deployment("v1", 1, &[dying.addr(), other.addr()])],
        ))
        .unwrap();
    let mut body = response.into_body();
    let _ = dying.abort().await.unwrap();
    // The client gets a final error event and a clean end, not a broken
    // connection.
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    text.push_str(std::str::from_utf8(data).unwrap());
                }
            }
            Some(Err(e)) => panic!("the stream failed instead of ending: {e}"),
            None => break,
        }
    }
    assert!(
        text.ends_with(crossfade_router::proxy::UPSTREAM_FAILED_EVENT),
        "{text}"
    );
    assert_eq!(other.stats().served, 0, "the request was not sent again");
    drop(body);
    let counts = counts(&router);
    assert_eq!((counts.total, counts.aborted_streams), (1, 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_answers_bad_requests_itself() {
    let engine = engine("org/model", f64::INFINITY).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[engine.addr()])]),
        ProxySettings {
            max_body_bytes: 1_024,
            ..ProxySettings::default()
        },
    )
    .await;
    let client = client();
    let url = router.url("/v1/chat/completions");

    let (status, _, body) = post(&client, &url, chat_body("gpt-9", false), &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "model_not_found");
    assert_eq!(
        json["error"]["message"],
        "The model `gpt-9` does not exist."
    );

    let big = serde_json::json!({"model": "chat", "prompt": "x".repeat(2_000)}).to_string();
    let (status, _, _) = post(&client, &url, big, &[]).await.unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // A model name of a megabyte is not echoed back whole.
    let huge = serde_json::json!({"model": "m".repeat(1_000)}).to_string();
    let (status, _, body) = post(&client, &url, huge, &[]).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.len() < 400, "{body}");
    // A URL longer than any the inference API needs gets 414.
    let (status, _, body) = post(
        &client,
        &router.url(&format!("/v1/chat/completions?{}", "q".repeat(9_000))),
        chat_body("chat", false),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::URI_TOO_LONG, "{body}");
    assert!(body.contains("url_too_long"), "{body}");
    // Nor does a path with `..` reach a gate.
    let (status, _, _) = post(
        &client,
        &router.url("/v1/../metrics"),
        chat_body("chat", false),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _, body) = post(&client, &url, "{not json", &[]).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Without a `model`, a router with one endpoint sends it there.
    let (status, headers, body) = post(&client, &url, r#"{"messages": []}"#, &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(deployment_of(&headers), "v1");

    // The alias routes to the endpoint, and so does the path prefix.
    let (status, headers, _) = post(&client, &url, chat_body("Qwen/Qwen3-8B", false), &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deployment_of(&headers), "v1");
    let (status, _, body) = post(
        &client,
        &router.url("/endpoints/chat/v1/chat/completions"),
        chat_body("chat", false),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");

    let models = client
        .request(
            Request::get(router.url("/v1/models"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = models.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let ids: Vec<&str> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "Qwen/Qwen3-8B"]);

    // `models.retrieve`, the router's own health, and a GET the engine
    // answers.
    let get = |path: &str| {
        let request = Request::get(router.url(path))
            .body(Full::default())
            .unwrap();
        let client = client.clone();
        async move {
            let response = client.request(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let (status, body) = get("/v1/models/Qwen/Qwen3-8B").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let model: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (model["id"].as_str(), model["root"].as_str()),
        (Some("Qwen/Qwen3-8B"), Some("chat"))
    );
    assert_eq!(get("/v1/models/gpt-9").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get("/health").await.0, StatusCode::OK);
    let (status, body) = get("/version").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("version"), "{body}");
    assert_eq!(get("/metrics").await.0, StatusCode::NOT_FOUND);
}

/// Streams run while the table is swapped 200 times: not one fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_streaming_load_fail_nothing() {
    let a = engine("org/model-a", 400.0).await;
    let b = engine("org/model-b", 400.0).await;
    let router = Arc::new(
        TestRouter::start(
            table(
                0,
                vec![
                    deployment("a", 50, &[a.addr()]),
                    deployment("b", 50, &[b.addr()]),
                ],
            ),
            ProxySettings::default(),
        )
        .await,
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let router = Arc::clone(&router);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let client = client();
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match post(
                        &client,
                        &router.url("/v1/chat/completions"),
                        chat_body("chat", true),
                        &[],
                    )
                    .await
                    {
                        Ok((StatusCode::OK, _, body)) if body.ends_with("data: [DONE]\n\n") => {
                            ok += 1
                        }
                        other => failed.push(format!("{other:?}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    for i in 1..=200u32 {
        let weight = i % 101;
        router
            .routes
            .apply_from_config(&table(
                0,
                vec![
                    deployment("a", weight, &[a.addr()]),
                    deployment("b", 100 - weight, &[b.addr()]),
                ],
            ))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (ok, failed) = client.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        total += ok;
    }
    assert!(total > 20, "only {total} streams completed");
    assert_eq!(router.routes.load().version(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_concurrency_limit_requests_are_shed_until_a_stream_ends() {
    let engine = engine("org/model", 50.0).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[engine.addr()])]),
        ProxySettings {
            max_concurrent_requests: 1,
            ..ProxySettings::default()
        },
    )
    .await;
    let client = client();
    engine.hold();
    let request = stream_request(&router);
    let held = client.request(request).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);

    // The stream holds the only slot, headers sent or not: shed.
    let (status, headers, body) = chat(&client, &router).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers["retry-after"], "1");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "rate_limit_exceeded");

    // Its last byte frees the slot.
    engine.release();
    let text = held.into_body().collect().await.unwrap().to_bytes();
    assert!(text.ends_with(b"data: [DONE]\n\n"));
    let (status, _, _) = chat(&client, &router).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_gets_408_and_frees_its_slot() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let engine = engine("org/model", f64::INFINITY).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[engine.addr()])]),
        ProxySettings {
            max_concurrent_requests: 1,
            body_read_timeout: Duration::from_secs(1),
            ..ProxySettings::default()
        },
    )
    .await;
    // Headers, ten bytes of a hundred, then nothing.
    let mut slow = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\": ",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        loop {
            let n = slow.read(&mut buf).await.unwrap();
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a trickling body");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // The slot it held is free again.
    let (status, _, body) = chat(&client(), &router).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_streams_too() {
    let engine = engine("org/model", 200.0).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[engine.addr()])]),
        ProxySettings::default(),
    )
    .await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<bytes::Bytes>>();
    for _ in 0..3 {
        let request = stream_request(&router);
        let response = h2.request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-crossfade-deployment"], "v1");
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert!(text.ends_with(b"data: [DONE]\n\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_outs_bound_the_first_byte_and_idle_gaps_never_a_whole_stream() {
    let engine = engine("org/model", 20.0).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[engine.addr()])]),
        ProxySettings {
            response_header_timeout: Duration::from_millis(300),
            idle_chunk_timeout: Duration::from_millis(400),
            ..ProxySettings::default()
        },
    )
    .await;
    let client = client();

    // A stream that lasts longer than both bounds, tokens flowing: fine.
    let body = serde_json::json!({
        "model": "chat", "messages": [], "stream": true, "max_tokens": 20
    });
    let started = Instant::now();
    let (status, _, text) = post(
        &client,
        &router.url("/v1/chat/completions"),
        body.to_string(),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(
        started.elapsed() > Duration::from_millis(800),
        "the stream outlived both bounds"
    );

    // An engine that never answers: 504 at the first-byte bound.
    engine.set_fault(fake_vllm::Fault::Hang);
    let started = Instant::now();
    let (status, _, body) = chat(&client, &router).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    engine.set_fault(fake_vllm::Fault::None);

    // A stream that stalls after it began: cut at the idle bound, with a
    // final error event.
    let request = stream_request(&router);
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    engine.hold();
    let started = Instant::now();
    let outcome =
        tokio::time::timeout(Duration::from_secs(10), response.into_body().collect()).await;
    engine.release();
    let text = outcome.unwrap().unwrap().to_bytes();
    assert!(
        text.ends_with(crossfade_router::proxy::UPSTREAM_IDLE_EVENT.as_bytes()),
        "the stalled stream ends with an error event: {text:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_gates_are_reused_once_a_response_ends_and_never_mid_response() {
    let gate = CountingGate::start().await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[gate.addr])]),
        ProxySettings::default(),
    )
    .await;
    let client = client();
    for _ in 0..10 {
        let (status, _, text) = chat(&client, &router).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, r#"{"ok":true}"#));
    }
    assert_eq!(
        gate.connections(),
        1,
        "ten requests in a row share one connection"
    );

    // A response abandoned mid-body leaves its connection unusable: the
    // next request must not queue behind it.
    let request = Request::post(router.url("/v1/slow"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body("chat", false))))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let mut slow = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), slow.frame())
        .await
        .unwrap();
    assert!(first.is_some());
    drop(slow);
    for _ in 0..3 {
        let answered = tokio::time::timeout(Duration::from_secs(5), chat(&client, &router))
            .await
            .expect("not stuck behind the abandoned response");
        assert_eq!(answered.0, StatusCode::OK);
    }
    assert_eq!(gate.connections(), 2, "one new connection, reused after");
}
