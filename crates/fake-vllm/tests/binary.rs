//! The real `fake-vllm` binary, launched as a supervisor launches vLLM.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use http::Method;
use support::{Proc, bounded, chat_body, frames, get, is_open, post, send};

const BIN: &str = env!("CARGO_BIN_EXE_fake-vllm");

#[tokio::test]
async fn port_stays_closed_while_loading_then_serves_a_paced_stream() {
    bounded(30, async {
        let mut p = Proc::spawn(
            &[
                "serve",
                "org/model",
                "--served-model-name",
                "chat",
                "--enforce-eager",
                "--tensor-parallel-size=1",
                "--max-model-len",
                "4096",
            ],
            &[
                ("FAKE_VLLM_LOAD_TIME", "1s"),
                ("FAKE_VLLM_TOKENS_PER_SECOND", "20"),
            ],
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(600) {
            assert!(!is_open(p.addr), "port open during the model load");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p.wait_ready(Duration::from_secs(10));
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "loaded too fast"
        );

        let health = get(p.addr, "/health").await;
        assert_eq!((health.status.as_u16(), health.body.as_str()), (200, ""));

        let models = get(p.addr, "/v1/models").await.json();
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"].as_array().unwrap().len(), 1);
        assert_eq!(models["data"][0]["id"], "chat");
        assert_eq!(models["data"][0]["root"], "org/model");
        assert_eq!(models["data"][0]["owned_by"], "vllm");
        assert_eq!(models["data"][0]["max_model_len"], 4096);

        let (response, _conn) = send(
            p.addr,
            Method::POST,
            "/v1/chat/completions",
            &chat_body("chat", "hello there", 5, true),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        assert!(header("content-type").starts_with("text/event-stream"));
        assert_eq!(header("x-fake-vllm-model"), "org/model");
        assert_eq!(header("x-fake-vllm-served-name"), "chat");
        let got = frames(response.into_body()).await;
        assert_eq!(got.error, None);
        // role, 5 tokens, finish, [DONE]: each flushed as its own frame.
        assert_eq!(got.events().len(), 8, "{:?}", got.events());
        assert!(
            got.frames.len() >= 8,
            "chunks were batched: {:?}",
            got.events()
        );
        assert!(got.ends_with_done());
        let text = got.text();
        assert!(text.starts_with("[org/model as chat]"), "{text}");
        assert_eq!(
            text,
            fake_vllm::reply_text("org/model", "chat", &["user", "hello there"], 0, 5)
        );
        // 20 tokens/s: the 5 token events span about 4 × 50 ms.
        let times = got.event_times();
        let spread = times[5] - times[1];
        assert!(
            spread >= Duration::from_millis(150),
            "tokens not paced: {spread:?}"
        );

        let log = p.stderr();
        assert!(
            log.contains(
                "ignoring vLLM flags (fake engine): --enforce-eager --tensor-parallel-size 1\n"
            ),
            "{log}"
        );
        assert!(log.contains("Loading model weights..."), "{log}");
        assert!(
            log.contains(&format!("Starting vLLM API server on http://{}", p.addr)),
            "{log}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_missing_model_fails_to_load_without_opening_the_port() {
    bounded(30, async {
        let mut p = Proc::spawn(
            &["serve", "does-not-exist/model"],
            &[("FAKE_VLLM_LOAD_TIME", "300ms")],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.try_wait().is_none() {
            assert!(!is_open(p.addr), "the port opened for a missing model");
            assert!(Instant::now() < deadline, "did not exit");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let status = p.wait_exit(Duration::from_secs(1));
        assert_eq!(status.code(), Some(1));
        let log = p.stderr();
        assert!(log.contains("ERROR"), "{log}");
        assert!(
            log.contains("OSError: does-not-exist/model is not a local folder"),
            "{log}"
        );
        assert!(!log.contains("Starting vLLM API server"), "{log}");
    })
    .await;
}

#[tokio::test]
async fn exit_during_load_fault_exits_nonzero_before_binding() {
    bounded(30, async {
        let mut p = Proc::spawn(
            &["serve", "org/model"],
            &[
                ("FAKE_VLLM_LOAD_TIME", "400ms"),
                ("FAKE_VLLM_FAULT", "exit-during-load"),
            ],
        );
        let start = Instant::now();
        let status = p.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(1));
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "exited before halfway"
        );
        let log = p.stderr();
        assert!(
            log.contains("ERROR") && log.contains("exit-during-load"),
            "{log}"
        );
        assert!(!log.contains("Starting vLLM API server"), "{log}");
    })
    .await;
}

#[tokio::test]
async fn sigterm_with_shutdown_timeout_drains_the_stream_and_refuses_new_work() {
    bounded(30, async {
        let mut p = Proc::spawn(
            &["serve", "org/model", "--shutdown-timeout", "5"],
            &[("FAKE_VLLM_TOKENS_PER_SECOND", "20")],
        );
        p.wait_ready(Duration::from_secs(10));
        let (response, _conn) = send(
            p.addr,
            Method::POST,
            "/v1/chat/completions",
            &chat_body("org/model", "hi", 10, true),
        )
        .await
        .unwrap();
        let mut body = response.into_body();
        let first = http_body_util::BodyExt::frame(&mut body)
            .await
            .unwrap()
            .unwrap();
        assert!(first.is_data());
        p.sigterm();

        // Once the signal lands, a new connection is refused (or answered 503).
        let refused_at = Instant::now();
        loop {
            match send(p.addr, Method::GET, "/health", "").await {
                Err(_) => break,
                Ok((r, _)) if r.status() == 503 => break,
                Ok((r, _)) => assert_eq!(r.status(), 200),
            }
            assert!(
                refused_at.elapsed() < Duration::from_secs(3),
                "still accepting work"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let rest = frames(body).await;
        assert_eq!(rest.error, None);
        assert!(rest.ends_with_done(), "{:?}", rest.events());
        let status = p.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0));
        assert!(p.stderr().contains("draining"), "{}", p.stderr());
    })
    .await;
}

#[tokio::test]
async fn sigterm_without_shutdown_timeout_cuts_the_stream() {
    bounded(30, async {
        let mut p = Proc::spawn(
            &["serve", "org/model"],
            &[("FAKE_VLLM_TOKENS_PER_SECOND", "20")],
        );
        p.wait_ready(Duration::from_secs(10));
        let (response, _conn) = send(
            p.addr,
            Method::POST,
            "/v1/completions",
            r#"{"prompt":"hi","max_tokens":100,"stream":true}"#,
        )
        .await
        .unwrap();
        let mut body = response.into_body();
        assert!(
            http_body_util::BodyExt::frame(&mut body)
                .await
                .unwrap()
                .is_ok()
        );
        let signalled = Instant::now();
        p.sigterm();
        let rest = frames(body).await;
        assert!(
            !rest.ends_with_done(),
            "an aborted stream must not end cleanly"
        );
        assert!(rest.error.is_some(), "the stream should be cut, not ended");
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "not aborted promptly"
        );
        let status = p.wait_exit(Duration::from_secs(5));
        assert_eq!(status.code(), Some(0));
    })
    .await;
}

#[tokio::test]
async fn crash_after_fault_kills_the_process_on_the_next_request() {
    bounded(30, async {
        let mut p = Proc::spawn(
            &["serve", "org/model"],
            &[
                ("FAKE_VLLM_FAULT", "crash-after:1"),
                ("FAKE_VLLM_TOKENS_PER_SECOND", "inf"),
            ],
        );
        p.wait_ready(Duration::from_secs(10));
        // Probes do not count towards the fault.
        assert_eq!(get(p.addr, "/health").await.status, 200);
        let ok = post(p.addr, "/v1/completions", r#"{"prompt":"one"}"#).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        let second = async {
            let (response, _conn) = send(
                p.addr,
                Method::POST,
                "/v1/completions",
                r#"{"prompt":"two"}"#,
            )
            .await?;
            http_body_util::BodyExt::collect(response.into_body()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
        .await;
        assert!(second.is_err(), "the crashing request got an answer");
        let status = p.wait_exit(Duration::from_secs(5));
        assert_eq!(status.code(), Some(1));
        assert!(p.stderr().contains("EngineCore"), "{}", p.stderr());
    })
    .await;
}

#[test]
fn usage_errors_bad_knobs_and_help() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(BIN)
            .args(args)
            .env_remove("FAKE_VLLM_TOKENS_PER_SECOND")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let no_model = run(&["serve"], &[]);
    assert_eq!(no_model.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_model.stderr).contains("MODEL"));

    assert_eq!(run(&["bench", "m"], &[]).status.code(), Some(2));

    let bad_knob = run(&["serve", "m"], &[("FAKE_VLLM_TOKENS_PER_SECOND", "fast")]);
    assert_eq!(bad_knob.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad_knob.stderr);
    assert!(
        stderr.contains("FAKE_VLLM_TOKENS_PER_SECOND") && stderr.contains("`fast`"),
        "{stderr}"
    );

    let help = run(&["serve", "--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage: fake-vllm serve MODEL"));
}
