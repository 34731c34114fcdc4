//! `crossfade-agent` as a real process supervising `fake-vllm` engines:
//! standalone start and readiness, drains with a held stream, the drain
//! deadline, crash restarts and the crash loop, adoption after SIGKILL,
//! `Apply` swaps, bad `VLLM_ARGS`, and systemd's notifications.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crossfade_e2e::{binary, wait_for_port};
use crossfade_proto::v1::{self, EngineState};
use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use support::*;

const STANDALONE: &[(&str, &str)] = &[
    ("MODEL_NAME", "org/m"),
    ("VLLM_ARGS", "--max-model-len 4096"),
    ("FAKE_VLLM_LOAD_TIME", "1500ms"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_refuses_until_ready_then_serves() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    let agent = host.start(STANDALONE, "");
    wait_for_port(agent.gate, Duration::from_secs(10)).unwrap();

    // Loading: the gate refuses with the retryable not-ready.
    let starting = agent
        .wait_status("the engine loading", Duration::from_secs(10), |s| {
            engine(s).state() == EngineState::Starting
                && engine(s).phase() == v1::StartingPhase::Loading
        })
        .await;
    assert!(engine(&starting).starting_elapsed.is_some());
    let (status, headers, body) = chat(agent.gate, "org/m", false).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers["x-crossfade-retry"], "not-ready");
    assert!(body.contains("\"error\""), "{body}");

    let ready = agent
        .wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;
    assert_eq!(ready.worker_id, "worker-1");
    assert_eq!(ready.labels["zone"], "test");
    assert_eq!(ready.gpu_probe, "fake");
    assert_eq!(ready.gpus.len(), 2);
    assert_eq!(ready.gpu_health(), v1::GpuHealth::Healthy);
    assert!(engine(&ready).deployment_id.starts_with("standalone-"));
    assert!(engine(&ready).pid > 0);

    let (status, _, body) = chat(agent.gate, "org/m", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("[org/m as org/m]"), "{body}");
    let (status, _, body) = chat(agent.gate, "org/m", true).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");

    // The gate forwards the inference API only: not the engine's
    // `/metrics`, nothing under `/_`.
    for path in ["/metrics", "/_fake/fault", "/v1/../metrics"] {
        let refused = admin_get(agent.gate, path).await;
        assert!(
            refused.contains("not an inference path"),
            "{path}: {refused}"
        );
    }

    let metrics = admin_get(agent.admin, "/metrics").await;
    assert!(
        metrics.contains("crossfade_agent_engine_state{state=\"ready\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("crossfade_agent_gate_requests_total{outcome=\"refused_path\"} 3"));
    assert!(
        sample(
            &metrics,
            "crossfade_agent_gate_requests_total{outcome=\"refused_not_ready\"}"
        ) > 0.0,
        "{metrics}"
    );
    assert!(metrics.contains("crossfade_agent_gpu_health{gpu=\"1\"} 1"));
    assert_eq!(
        admin_get(agent.admin, "/readyz").await,
        "ok: the engine is ready\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_a_held_stream_and_refuses_new_requests() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    let agent = host.start(&[], "");
    let mut client = agent.client().await;
    let applied = client
        .apply(v1::ApplyRequest {
            coordinator_epoch: 1,
            spec: Some(spec("dep-a", "org/a", "--max-model-len 4096")),
            drain_timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!applied.already_applied);
    agent
        .wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;

    // A client that keeps its connection alive, idle when the drain starts.
    let mut keep_alive = tokio::net::TcpStream::connect(agent.gate).await.unwrap();
    keep_alive
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: gate\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = vec![0u8; 64 * 1024];
    let n = keep_alive.read(&mut buffer).await.unwrap();
    assert!(buffer[..n].starts_with(b"HTTP/1.1 200 OK"));
    let still_open =
        tokio::time::timeout(Duration::from_millis(300), keep_alive.read(&mut buffer)).await;
    assert!(
        still_open.is_err(),
        "the gate closed a kept-alive connection before any drain"
    );

    fake_control(agent.engine_port, "hold").await;
    let gate = agent.gate;
    let stream = tokio::spawn(async move { chat(gate, "chat", true).await });
    let held = agent
        .wait_status(
            "one request in flight at the gate and the engine",
            Duration::from_secs(10),
            |s| in_flight(s) == (1, 1),
        )
        .await;
    assert!(held.in_flight.unwrap().engine_scraped_at.is_some());

    let mut drain_client = agent.client().await;
    let drain = tokio::spawn(async move {
        drain_client
            .drain(v1::DrainRequest {
                coordinator_epoch: 1,
                deadline: seconds(30.0),
            })
            .await
            .unwrap()
            .into_inner()
    });
    agent
        .wait_state(EngineState::Draining, Duration::from_secs(5))
        .await;
    // The kept-alive HTTP/1.1 connection's next request is refused with
    // `Connection: close`, and the connection ends after it.
    keep_alive
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: gate\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), keep_alive.read_to_end(&mut answer))
        .await
        .expect("the kept-alive connection closes after its next response")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..closed]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("x-crossfade-retry: draining"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    let (status, headers, _) = chat(agent.gate, "chat", false).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-crossfade-retry"], "draining");
    assert_eq!(headers["connection"], "close");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !drain.is_finished(),
        "Drain returned while a stream was held"
    );

    fake_control(agent.engine_port, "release").await;
    let (status, _, body) = stream.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let drained = drain.await.unwrap();
    assert!(drained.drained);
    assert_eq!(drained.still_in_flight, 0);

    // Drained, it stays out of service until undrained. An operator's call
    // (epoch 0) is unfenced; an older coordinator's is refused.
    assert_eq!(engine(&agent.status().await).state(), EngineState::Draining);
    client
        .undrain(v1::UndrainRequest {
            coordinator_epoch: 0,
        })
        .await
        .unwrap();
    let drain_again = client
        .drain(v1::DrainRequest {
            coordinator_epoch: 2,
            deadline: seconds(1.0),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(drain_again.drained);
    let refused = client
        .undrain(v1::UndrainRequest {
            coordinator_epoch: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    client
        .undrain(v1::UndrainRequest {
            coordinator_epoch: 2,
        })
        .await
        .unwrap();
    agent
        .wait_state(EngineState::Ready, Duration::from_secs(5))
        .await;
    let (status, _, body) = chat(agent.gate, "alias", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Stop: drain, SIGTERM, the exit code.
    let stopped = client
        .stop(v1::StopRequest {
            coordinator_epoch: 2,
            grace: seconds(5.0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.still_in_flight, 0);
    assert_eq!(stopped.exit_code, Some(0));
    assert_eq!(
        engine(stopped.status.as_ref().unwrap()).state(),
        EngineState::Stopped
    );
    assert!(!host.state_dir().join("engine.json").exists());
    let (status, headers, _) = chat(agent.gate, "chat", false).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-crossfade-retry"], "not-ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_drain_deadline_a_stream_ends_with_an_error_event() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    let agent = host.start(STANDALONE, "");
    agent
        .wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;
    fake_control(agent.engine_port, "hold").await;
    let gate = agent.gate;
    let stream = tokio::spawn(async move { chat(gate, "org/m", true).await });
    agent
        .wait_status("the stream in flight", Duration::from_secs(10), |s| {
            in_flight(s).0 == 1
        })
        .await;
    let drained = agent
        .client()
        .await
        .drain(v1::DrainRequest {
            coordinator_epoch: 0,
            deadline: seconds(0.5),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!drained.drained);
    assert_eq!(drained.still_in_flight, 1);
    assert!(Duration::try_from(drained.waited.unwrap()).unwrap() >= Duration::from_millis(500));
    // The stream ends cleanly, with a final error event, not a reset.
    let (status, _, body) = stream.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let last = body.trim_end().lines().last().unwrap();
    assert!(last.starts_with("data: {\"error\""), "{body}");
    assert!(last.contains("\"code\":\"drain_deadline\""), "{body}");
    agent
        .wait_status("the cut stream counted out", Duration::from_secs(5), |s| {
            in_flight(s).0 == 0
        })
        .await;
    fake_control(agent.engine_port, "release").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_engine_is_restarted_and_a_missing_model_ends_failed() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    let agent = host.start(&[("FAKE_VLLM_FAULT", "crash-after:1")], "");
    let mut client = agent.client().await;
    client
        .apply(v1::ApplyRequest {
            coordinator_epoch: 0,
            spec: Some(spec("dep-crash", "org/m", "")),
            drain_timeout: None,
        })
        .await
        .unwrap();
    let first = agent
        .wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;
    // The warm-up request was the one allowed; the next crashes it.
    let _ = chat(agent.gate, "chat", false).await;
    let restarted = agent
        .wait_status("a restart", Duration::from_secs(30), |s| {
            engine(s).restart_count == 1 && engine(s).state() == EngineState::Starting
        })
        .await;
    assert!(
        restarted.last_error.contains("the engine exited"),
        "{restarted:#?}"
    );
    assert_ne!(engine(&restarted).pid, engine(&first).pid);

    // A model that does not exist: restarts, then FAILED with its error.
    client
        .apply(v1::ApplyRequest {
            coordinator_epoch: 0,
            spec: Some(spec("dep-missing", "does-not-exist/model", "")),
            drain_timeout: seconds(1.0),
        })
        .await
        .unwrap();
    let failed = agent
        .wait_state(EngineState::Failed, Duration::from_secs(30))
        .await;
    let failed_engine = engine(&failed);
    assert_eq!(failed_engine.deployment_id, "dep-missing");
    assert_eq!(failed_engine.restart_count, 2, "{failed:#?}");
    assert!(failed_engine.exit_code.is_some_and(|c| c != 0));
    assert!(
        failed_engine.failure_reason.contains("3 times in a row")
            && failed_engine
                .failure_reason
                .contains("does-not-exist/model is not a local folder"),
        "{failed:#?}"
    );
    assert!(!failed_engine.log_tail.is_empty());
    // It stays failed: no restart loop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = agent.status().await;
    assert_eq!(engine(&later).state(), EngineState::Failed);
    assert_eq!(engine(&later).restart_count, 2);
    // The secret never shows.
    let text = format!("{later:?}");
    assert!(!text.contains("hf_secret_value_1234"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_the_engine_after_sigkill() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    let first = host.start(STANDALONE, "");
    let ready = first
        .wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;
    let pid = engine(&ready).pid;
    let deployment = engine(&ready).deployment_id.clone();

    // SIGKILL: no chance to clean up.
    drop(first.process);
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(pid), "the engine died with the agent");
    let (status, _, body) = chat_engine(host.engine).await;
    assert_eq!(status, StatusCode::OK, "the orphaned engine serves: {body}");

    let second = host.start(STANDALONE, "");
    let adopted = second
        .wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;
    assert_eq!(engine(&adopted).pid, pid, "a second engine was started");
    assert!(engine(&adopted).adopted);
    assert_eq!(engine(&adopted).deployment_id, deployment);
    let (status, _, body) = chat(second.gate, "org/m", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // One load: the engine has served since before the agent died.
    let stats = admin_get(
        SocketAddr::from(([127, 0, 0, 1], host.engine)),
        "/_fake/stats",
    )
    .await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(stats["served"].as_u64().unwrap() >= 3, "{stats}");
}

async fn chat_engine(port: u16) -> (StatusCode, HeaderMap, String) {
    chat(SocketAddr::from(([127, 0, 0, 1], port)), "org/m", false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_waiting_for_its_drain_leaves_the_agent_answering() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    let agent = host.start(&[], "");
    let mut client = agent.client().await;
    let apply = |id: &'static str, model: &'static str| v1::ApplyRequest {
        coordinator_epoch: 5,
        spec: Some(spec(id, model, "")),
        drain_timeout: seconds(60.0),
    };
    client.apply(apply("dep-a", "org/a")).await.unwrap();
    let a = agent
        .wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;

    // A stream held on dep-a: the swap to dep-b waits for it.
    fake_control(agent.engine_port, "hold").await;
    let gate = agent.gate;
    let stream = tokio::spawn(async move { chat(gate, "chat", true).await });
    agent
        .wait_status("the stream in flight", Duration::from_secs(10), |s| {
            in_flight(s) == (1, 1)
        })
        .await;
    let mut swap_client = agent.client().await;
    let swap = tokio::spawn(async move { swap_client.apply(apply("dep-b", "org/b")).await });
    agent
        .wait_state(EngineState::Draining, Duration::from_secs(5))
        .await;

    // Meanwhile the agent takes commands: dep-a applied again keeps dep-a,
    // at once, and the swap's caller hears that it was superseded.
    let kept = tokio::time::timeout(
        Duration::from_secs(5),
        client.apply(apply("dep-a", "org/a")),
    )
    .await
    .expect("Apply waited for the drain of another Apply")
    .unwrap()
    .into_inner();
    assert!(kept.already_applied);
    let superseded = swap.await.unwrap().unwrap_err();
    assert_eq!(superseded.code(), tonic::Code::FailedPrecondition);
    assert!(
        superseded
            .message()
            .contains("Apply of dep-a came before dep-b"),
        "{}",
        superseded.message()
    );
    let serving = agent
        .wait_state(EngineState::Ready, Duration::from_secs(5))
        .await;
    assert_eq!(engine(&serving).pid, engine(&a).pid);
    assert_eq!(engine(&serving).deployment_id, "dep-a");

    fake_control(agent.engine_port, "release").await;
    let (status, _, body) = stream.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let (status, _, body) = chat(agent.gate, "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // With nothing in flight, the swap goes through.
    let swapped = client
        .apply(apply("dep-b", "org/b"))
        .await
        .unwrap()
        .into_inner();
    assert!(!swapped.already_applied);
    agent
        .wait_status("dep-b ready", Duration::from_secs(30), |s| {
            engine(s).deployment_id == "dep-b" && engine(s).state() == EngineState::Ready
        })
        .await;

    // A stream held past the swap's drain deadline ends with the final
    // error event, and the next deployment is launched.
    fake_control(agent.engine_port, "hold").await;
    let stream = tokio::spawn(async move { chat(gate, "chat", true).await });
    agent
        .wait_status("the stream in flight", Duration::from_secs(10), |s| {
            in_flight(s) == (1, 1)
        })
        .await;
    let swapped = client
        .apply(v1::ApplyRequest {
            coordinator_epoch: 5,
            spec: Some(spec("dep-c", "org/c", "")),
            drain_timeout: seconds(0.5),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!swapped.already_applied);
    let (status, _, body) = stream.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"code\":\"drain_deadline\""), "{body}");
    agent
        .wait_status("dep-c ready", Duration::from_secs(30), |s| {
            engine(s).deployment_id == "dep-c" && engine(s).state() == EngineState::Ready
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_idempotent_and_swaps_deployments() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    let agent = host.start(&[], "");
    let mut client = agent.client().await;
    let apply = |id: &'static str, model: &'static str, args: &'static str| v1::ApplyRequest {
        coordinator_epoch: 5,
        spec: Some(spec(id, model, args)),
        drain_timeout: seconds(5.0),
    };
    client.apply(apply("dep-a", "org/a", "")).await.unwrap();
    let a = agent
        .wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;
    let again = client
        .apply(apply("dep-a", "org/a", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_applied);
    assert_eq!(engine(again.status.as_ref().unwrap()).pid, engine(&a).pid);

    client
        .apply(apply("dep-b", "org/b", "--max-num-seqs 8"))
        .await
        .unwrap();
    let b = agent
        .wait_status("dep-b ready", Duration::from_secs(30), |s| {
            engine(s).deployment_id == "dep-b" && engine(s).state() == EngineState::Ready
        })
        .await;
    assert_ne!(engine(&b).pid, engine(&a).pid);
    let (status, _, body) = chat(agent.gate, "chat", false).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("[org/b as chat]"), "{body}");

    // Bad input names the field; nothing changes.
    let bad = client
        .apply(apply("dep-c", "org/c", "--max-model-len '4096"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(
        bad.message().contains("VLLM_ARGS does not split"),
        "{}",
        bad.message()
    );
    let owned = client
        .apply(apply("dep-c", "org/c", "--served-model-name other"))
        .await
        .unwrap_err();
    assert!(
        owned.message().contains("may not set --served-model-name"),
        "{}",
        owned.message()
    );
    // The attacks of a caller that reaches the agent directly: a flag the
    // agent owns in another spelling, a library preloaded into the engine,
    // another GPU. Refused by name; the engine that runs is untouched.
    for args in ["--served_model_name other", "--port=9000", "--serv other"] {
        let owned = client
            .apply(apply("dep-c", "org/c", args))
            .await
            .unwrap_err();
        assert_eq!(owned.code(), tonic::Code::InvalidArgument, "{args}");
        assert!(
            owned.message().contains("may not set --"),
            "{}",
            owned.message()
        );
    }
    for name in ["LD_PRELOAD", "CUDA_VISIBLE_DEVICES"] {
        let mut hijack = apply("dep-c", "org/c", "");
        if let Some(template) = hijack.spec.as_mut().and_then(|s| s.template.as_mut()) {
            template.env.push(v1::EnvVar {
                name: name.into(),
                source: Some(v1::env_var::Source::Value("/tmp/evil.so".into())),
                ..Default::default()
            });
        }
        let refused = client.apply(hijack).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{name}");
        assert!(
            refused
                .message()
                .contains(&format!("{name} may not be set")),
            "{}",
            refused.message()
        );
    }
    assert_eq!(engine(&agent.status().await).pid, engine(&b).pid);
    let stale = client
        .apply(v1::ApplyRequest {
            coordinator_epoch: 4,
            ..apply("dep-c", "org/c", "")
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    assert_eq!(engine(&agent.status().await).deployment_id, "dep-b");

    // WatchStatus: the current status at once, then on changes.
    let mut watch = client
        .watch_status(v1::WatchStatusRequest {
            heartbeat_interval: seconds(0.2),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(second.revision >= first.revision);
    assert_eq!(second.coordinator_epoch, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbalanced_quotes_in_vllm_args_stop_the_agent_with_a_clear_error() {
    let host = Host::new();
    let output = Command::new(binary("crossfade-agent").unwrap())
        .args([
            "--set",
            &format!("engine.state_dir={}", host.state_dir().display()),
            "--set",
            "control_tls.insecure=true",
            "--set",
            &format!("listen.control=127.0.0.1:{}", host.control),
        ])
        .env("MODEL_NAME", "org/m")
        .env("VLLM_ARGS", "--max-model-len 4096 --chat-template '{{ x }}")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("MODEL_NAME / VLLM_ARGS")
            && stderr.contains("VLLM_ARGS does not split into words as a shell would"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_and_watchdog_pings() {
    let host = Host::new();
    let socket_path = host.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let socket_env = socket_path.display().to_string();
    let _reaper = EngineReaper(host.state_dir());
    let _agent = host.start(
        &[("NOTIFY_SOCKET", &socket_env), ("WATCHDOG_USEC", "200000")],
        "",
    );
    let mut heard = Vec::new();
    let mut buffer = [0u8; 512];
    while !(heard.iter().any(|m: &String| m.contains("READY=1"))
        && heard.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let n = socket.recv(&mut buffer).unwrap();
        heard.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
        assert!(heard.len() < 100, "{heard:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_not_ready_in_time_is_stopped_and_failed() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    // The engine loads, then never answers the warm-up request.
    let agent = host.start(
        &[("FAKE_VLLM_FAULT", "hang"), ("FAKE_VLLM_LOAD_TIME", "0s")],
        "",
    );
    let mut hanging = spec("dep-hang", "org/m", "");
    hanging.ready_timeout = seconds(1.0);
    agent
        .client()
        .await
        .apply(v1::ApplyRequest {
            coordinator_epoch: 0,
            spec: Some(hanging),
            drain_timeout: None,
        })
        .await
        .unwrap();
    let warming = agent
        .wait_status("the warm-up phase", Duration::from_secs(10), |s| {
            engine(s).phase() == v1::StartingPhase::Warmup
        })
        .await;
    let pid = engine(&warming).pid;
    let failed = agent
        .wait_state(EngineState::Failed, Duration::from_secs(30))
        .await;
    assert!(
        engine(&failed)
            .failure_reason
            .starts_with("not ready within 1s (phase STARTING_PHASE_WARMUP"),
        "{failed:#?}"
    );
    assert_eq!(engine(&failed).restart_count, 0);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the engine that never became ready was stopped"
    );
    let (status, headers, _) = chat(agent.gate, "chat", false).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-crossfade-retry"], "not-ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_worker_behind_the_router_loses_no_request() {
    let env = [
        ("MODEL_NAME", "org/m"),
        ("SERVED_MODEL_NAME", "chat"),
        ("FAKE_VLLM_LOAD_TIME", "0s"),
        ("FAKE_VLLM_TOKENS_PER_SECOND", "100"),
        ("FAKE_VLLM_MAX_TOKENS", "10"),
    ];
    let (host_a, host_b) = (Host::new(), Host::new());
    let _reapers = (
        EngineReaper(host_a.state_dir()),
        EngineReaper(host_b.state_dir()),
    );
    let (a, b) = (host_a.start(&env, ""), host_b.start(&env, ""));
    a.wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;
    b.wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;
    let (_router, public) = start_router(&host_a.dir, &[a.gate, b.gate]);

    // Eight clients stream back to back while worker A drains.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && outcomes.len() < 500 {
                    let (status, _, body) = chat(public, "chat", true).await;
                    outcomes.push((status, body.trim_end().ends_with("data: [DONE]"), body));
                }
                outcomes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let drained = a
        .client()
        .await
        .drain(v1::DrainRequest {
            coordinator_epoch: 0,
            deadline: seconds(30.0),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.drained, "{drained:?}");
    // Drained means nothing is left: stopping the engine at once (SIGTERM
    // aborts whatever vLLM still runs) must break no stream.
    let stopped = a
        .client()
        .await
        .stop(v1::StopRequest {
            coordinator_epoch: 0,
            grace: seconds(0.0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.still_in_flight, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut total = 0;
    for client in clients {
        for (status, done, body) in client.await.unwrap() {
            total += 1;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(done, "a stream ended early: {body}");
        }
    }
    assert!(total >= 16, "only {total} requests were sent");
    // A's gate refused requests while draining; the router sent them to B.
    let metrics = admin_get(a.admin, "/metrics").await;
    assert!(
        sample(
            &metrics,
            "crossfade_agent_gate_requests_total{outcome=\"refused_draining\"}"
        ) > 0.0,
        "{metrics}"
    );
    assert_eq!(in_flight(&a.status().await).0, 0);
}

/// The value of `series` (name and labels, as exported) in a Prometheus
/// text page; 0 when it is absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap_or(0.0))
}
