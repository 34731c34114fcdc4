//! fake-vllm served in process through the library's `Handle`.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use fake_vllm::{Config, Exit, Fault, Handle, Stats, reply_text};
use http::Method;
use support::{H2, bounded, chat_body, eventually, frames, gauges, get, metric, post, send};

async fn start(config: Config) -> Handle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Handle::spawn(config, listener).unwrap()
}

fn fast(model: &str) -> Config {
    Config {
        tokens_per_second: 2000.0,
        ..Config::new(model)
    }
}

#[tokio::test]
async fn held_requests_count_as_running_and_queue_behind_max_num_seqs() {
    bounded(30, async {
        let handle = start(Config {
            max_num_seqs: 1,
            served_model_names: vec!["chat".into()],
            ..fast("org/model")
        })
        .await;
        let addr = handle.addr();
        let held = post(addr, "/_fake/hold", "").await;
        assert_eq!(held.json()["held"], true);

        let body = r#"{"model":"chat","prompt":"a b c","max_tokens":3}"#;
        let first = tokio::spawn(post(addr, "/v1/completions", body));
        eventually("first request running", || async {
            gauges(addr).await == (1.0, 0.0)
        })
        .await;
        let second = tokio::spawn(post(addr, "/v1/completions", body));
        eventually("second request waiting", || async {
            gauges(addr).await == (1.0, 1.0)
        })
        .await;
        let stats = get(addr, "/_fake/stats").await.json();
        assert_eq!(
            (&stats["running"], &stats["waiting"], &stats["served"]),
            (&1.into(), &1.into(), &0.into())
        );
        // Held means held: nothing finishes meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!first.is_finished() && !second.is_finished());

        assert_eq!(post(addr, "/_fake/release", "").await.json()["held"], false);
        for reply in [first.await.unwrap(), second.await.unwrap()] {
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(reply.json()["usage"]["completion_tokens"], 3);
        }
        eventually("gauges back to zero", || async {
            gauges(addr).await == (0.0, 0.0)
        })
        .await;
        let text = get(addr, "/metrics").await.body;
        let success = |reason: &str| {
            metric(
                &text,
                "vllm:request_success_total",
                &format!("finished_reason=\"{reason}\""),
            )
        };
        assert_eq!(
            (success("length"), success("stop"), success("abort")),
            (2.0, 0.0, 0.0)
        );
        assert_eq!(
            metric(&text, "vllm:generation_tokens_total", "model_name=\"chat\""),
            6.0
        );
        assert_eq!(metric(&text, "vllm:prompt_tokens_total", ""), 6.0);
        assert_eq!(
            handle.stats(),
            Stats {
                running: 0,
                waiting: 0,
                served: 2
            }
        );
        assert_eq!(handle.abort().await.unwrap(), Exit::Shutdown);
    })
    .await;
}

#[tokio::test]
async fn a_client_that_goes_away_stops_counting() {
    bounded(30, async {
        let handle = start(fast("org/model")).await;
        let addr = handle.addr();
        handle.hold();
        let (response, conn) = send(
            addr,
            Method::POST,
            "/v1/chat/completions",
            &chat_body("org/model", "hi", 5, true),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        eventually("stream running", || async { handle.stats().running == 1 }).await;
        drop(response);
        drop(conn);
        eventually("stream no longer running", || async {
            handle.stats().running == 0
        })
        .await;
        let text = handle.controls().metrics();
        assert_eq!(metric(&text, "vllm:request_success_total", "abort"), 1.0);
        assert_eq!(handle.stats().served, 0);
    })
    .await;
}

#[tokio::test]
async fn replies_are_deterministic_and_name_the_deployment() {
    bounded(30, async {
        let served = |model: &str| Config {
            served_model_names: vec!["chat".into(), "alias".into()],
            ..fast(model)
        };
        let a = start(served("org/a")).await;
        let b = start(served("org/b")).await;
        let body = chat_body("chat", "tell me a story", 6, false);
        let first = post(a.addr(), "/v1/chat/completions", &body).await;
        let again = post(a.addr(), "/v1/chat/completions", &body).await;
        let other = post(b.addr(), "/v1/chat/completions", &body).await;
        let content = |r: &support::Reply| {
            r.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };

        assert_eq!(content(&first), content(&again));
        assert_eq!(
            content(&first),
            reply_text("org/a", "chat", &["user", "tell me a story"], 0, 6)
        );
        assert!(content(&other).starts_with("[org/b as chat] "));
        assert_ne!(
            content(&first).split_once("] "),
            content(&other).split_once("] ")
        );
        assert_eq!(
            (
                first.header("x-fake-vllm-model"),
                first.header("x-fake-vllm-served-name")
            ),
            ("org/a", "chat")
        );

        let v = first.json();
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(
            (&v["object"], &v["model"]),
            (&"chat.completion".into(), &"chat".into())
        );
        assert_eq!(
            (
                &v["choices"][0]["message"]["role"],
                &v["choices"][0]["finish_reason"]
            ),
            (&"assistant".into(), &"length".into())
        );
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10})
        );

        // The second served name answers as itself; the seed changes the words.
        let completion = post(
            a.addr(),
            "/v1/completions",
            r#"{"model":"alias","prompt":["x y"],"max_tokens":4,"seed":7}"#,
        )
        .await;
        let v = completion.json();
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(v["object"], "text_completion");
        assert_eq!(
            v["choices"][0]["text"],
            reply_text("org/a", "alias", &["x y"], 7, 4)
        );
        assert_eq!(completion.header("x-fake-vllm-served-name"), "alias");

        // Without `model`, the first served name answers.
        let default = post(a.addr(), "/v1/completions", r#"{"prompt":"x"}"#)
            .await
            .json();
        assert_eq!(default["model"], "chat");
        assert_eq!(
            default["usage"]["completion_tokens"],
            fake_vllm::DEFAULT_MAX_TOKENS
        );
    })
    .await;
}

#[tokio::test]
async fn errors_use_vllms_shapes() {
    bounded(30, async {
        let handle = start(fast("org/model")).await;
        let addr = handle.addr();
        let missing = post(addr, "/v1/chat/completions", &chat_body("gpt-4", "hi", 2, false)).await;
        assert_eq!(missing.status, 404);
        assert_eq!(
            missing.json(),
            serde_json::json!({"object":"error","message":"The model `gpt-4` does not exist.","type":"NotFoundError","param":null,"code":404})
        );
        for body in ["{not json", r#"{"model":"org/model"}"#, r#"{"messages":[],"max_tokens":0}"#, r#"{"messages":[],"max_tokens":5000}"#] {
            let bad = post(addr, "/v1/chat/completions", body).await;
            assert_eq!(bad.status, 400, "{body}");
            let v = bad.json();
            assert_eq!((&v["object"], &v["type"], &v["code"]), (&"error".into(), &"BadRequestError".into(), &400.into()), "{body}");
            assert!(!v["message"].as_str().unwrap().is_empty());
        }
        assert_eq!(get(addr, "/v1/nothing").await.status, 404);
        assert_eq!(get(addr, "/v1/completions").await.status, 405);
        assert_eq!(post(addr, "/_fake/fault", "explode").await.status, 400);
        assert_eq!(handle.stats(), Stats::default());
    })
    .await;
}

#[tokio::test]
async fn scripted_faults_error_then_recover_and_hang() {
    bounded(30, async {
        let handle = start(fast("org/model")).await;
        let addr = handle.addr();
        let set = post(addr, "/_fake/fault", "error-500:2").await;
        assert_eq!(set.json()["fault"], "error-500:2");
        let body = r#"{"prompt":"hi","max_tokens":2}"#;
        for _ in 0..2 {
            let failed = post(addr, "/v1/completions", body).await;
            assert_eq!(failed.status, 500);
            assert_eq!(
                (&failed.json()["type"], &failed.json()["code"]),
                (&"InternalServerError".into(), &500.into())
            );
        }
        assert_eq!(post(addr, "/v1/completions", body).await.status, 200);
        assert_eq!(handle.controls().fault(), Fault::None);

        handle.set_fault(Fault::Hang);
        let hung = tokio::spawn(async move {
            let (response, _conn) = send(addr, Method::POST, "/v1/completions", body).await?;
            http_body_util::BodyExt::collect(response.into_body()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        });
        eventually("hung request running", || async {
            handle.stats().running == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!hung.is_finished(), "a hung engine answered");
        assert_eq!(get(addr, "/health").await.status, 200);
        let controls = handle.controls().clone();
        assert_eq!(handle.abort().await.unwrap(), Exit::Shutdown);
        assert!(
            hung.await.unwrap().is_err(),
            "the hung request was answered"
        );
        assert_eq!(controls.stats().running, 0);
    })
    .await;
}

#[tokio::test]
async fn crash_fault_stops_the_server_as_crashed() {
    bounded(30, async {
        let handle = start(Config {
            fault: Fault::CrashAfter(1),
            ..fast("org/model")
        })
        .await;
        let addr = handle.addr();
        assert_eq!(
            post(addr, "/v1/completions", r#"{"prompt":"a"}"#)
                .await
                .status,
            200
        );
        let crashed = send(addr, Method::POST, "/v1/completions", r#"{"prompt":"b"}"#).await;
        assert!(crashed.is_err(), "the crashing request got an answer");
        assert_eq!(handle.wait().await.unwrap(), Exit::Crashed);
        assert!(
            send(addr, Method::GET, "/health", "").await.is_err(),
            "port still open after the crash"
        );
    })
    .await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_released_work_and_cuts_the_rest() {
    bounded(30, async {
        // Released before the timeout: the stream completes.
        let handle = start(fast("org/model")).await;
        let (addr, controls) = (handle.addr(), handle.controls().clone());
        handle.hold();
        let (response, _conn) = send(
            addr,
            Method::POST,
            "/v1/completions",
            r#"{"prompt":"a","max_tokens":4,"stream":true}"#,
        )
        .await
        .unwrap();
        eventually("stream running", || async { handle.stats().running == 1 }).await;
        let shutdown = tokio::spawn(handle.shutdown_graceful(Duration::from_secs(10)));
        eventually("port closed", || async {
            send(addr, Method::GET, "/health", "").await.is_err()
        })
        .await;
        assert!(controls.is_shutting_down());
        controls.release();
        let got = frames(response.into_body()).await;
        assert!(got.ends_with_done(), "{:?}", got.events());
        assert_eq!(shutdown.await.unwrap().unwrap(), Exit::Shutdown);

        // Still held at the timeout: the stream is cut.
        let handle = start(fast("org/model")).await;
        handle.hold();
        let (response, _conn) = send(
            handle.addr(),
            Method::POST,
            "/v1/completions",
            r#"{"prompt":"a","stream":true}"#,
        )
        .await
        .unwrap();
        let controls = handle.controls().clone();
        eventually("stream running", || async { controls.stats().running == 1 }).await;
        let started = Instant::now();
        assert_eq!(
            handle
                .shutdown_graceful(Duration::from_millis(300))
                .await
                .unwrap(),
            Exit::Shutdown
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
        let got = frames(response.into_body()).await;
        assert!(!got.ends_with_done() && got.error.is_some());
        assert_eq!(controls.stats().running, 0);
    })
    .await;
}

#[tokio::test]
async fn http2_streams_with_usage_and_abort_cuts_held_streams() {
    bounded(30, async {
        let handle = start(Config {
            default_max_tokens: 3,
            ..fast("org/model")
        })
        .await;
        let mut h2 = H2::connect(handle.addr()).await;
        let response = h2
            .post(
                "/v1/completions",
                r#"{"prompt":"p","stream":true,"stream_options":{"include_usage":true}}"#,
            )
            .await;
        assert_eq!(response.version(), http::Version::HTTP_2);
        let got = frames(response.into_body()).await;
        let events = got.events();
        // 3 tokens, finish, usage, [DONE]
        assert_eq!(events.len(), 6, "{events:?}");
        let finish: serde_json::Value = serde_json::from_str(&events[3]).unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        let usage: serde_json::Value = serde_json::from_str(&events[4]).unwrap();
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        assert_eq!(
            got.text(),
            reply_text("org/model", "org/model", &["p"], 0, 3)
        );

        handle.hold();
        let held = h2
            .post("/v1/completions", r#"{"prompt":"p","stream":true}"#)
            .await;
        let controls = handle.controls().clone();
        eventually("h2 stream running", || async {
            controls.stats().running == 1
        })
        .await;
        assert_eq!(handle.abort().await.unwrap(), Exit::Shutdown);
        assert_eq!(controls.stats().running, 0);
        assert!(!frames(held.into_body()).await.ends_with_done());
    })
    .await;
}
