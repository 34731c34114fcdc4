//! The agent in container mode against the host's real Docker Engine: the
//! engine is `fake-vllm` in an image built here from its binary and the
//! libraries it needs (no registry is reachable), and the agent drives its
//! whole life: start, ready, traffic through the gate, a crash and its
//! restart, `kill -9` of the agent and adoption without a restart of the
//! container, `Apply` of another deployment, and a stop that leaves nothing.
//!
//! Where no container engine answers, the test says so and passes, unless
//! `CROSSFADE_REQUIRE_CONTAINERS=1` (as `.ci/run` sets it on machines that
//! have one), which makes that a failure.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use crossfade_e2e::TempDir;
use crossfade_proto::v1::{self, EngineState};
use http::StatusCode;

use support::*;

/// When the container started, and whether it runs.
fn started_at(name: &str) -> Option<String> {
    docker(&["inspect", "--format", "{{.State.StartedAt}}", name])
}

fn container_spec(id: &str, image: &str, env: &[(&str, &str)]) -> v1::EngineSpec {
    let mut spec = spec(id, "org/m", "--max-num-seqs 8");
    let template = spec.template.as_mut().unwrap();
    template.runtime = v1::EngineRuntime::Container as i32;
    template.image = image.into();
    for (name, value) in env {
        template.env.push(v1::EnvVar {
            name: (*name).into(),
            source: Some(v1::env_var::Source::Value((*value).into())),
            ..Default::default()
        });
    }
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_its_engine_as_a_container_through_its_whole_life() {
    if !engine_answers() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let image = fake_vllm_image(dir.path(), &format!("e2e-{}", std::process::id()));
    let host = Host::new();
    let name = format!("crossfade-engine-{}", host.engine);
    let _reaper = ContainerReaper(name.clone());
    let cache = dir.path().join("hf-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let keys = format!(
        "runtime = \"container\"\n[container]\nimage = \"{}\"\npull = \"never\"\ngpus = false\ncache_dir = \"{}\"\n",
        image.0,
        cache.display()
    );
    let agent = host.start(&[], &keys);
    let mut client = agent.client().await;

    // Start (the template names no image: the agent's own) and the gate
    // serves.
    client
        .apply(v1::ApplyRequest {
            spec: Some(container_spec("dep-1", "", &[])),
            ..Default::default()
        })
        .await
        .unwrap();
    let ready = agent
        .wait_state(EngineState::Ready, Duration::from_secs(60))
        .await;
    assert_eq!(engine(&ready).container_id, name, "{ready:#?}");
    // The pid is the container's main process, as the host sees it.
    let pid = engine(&ready).pid;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("fake-vllm"));
    let (status, _, body) = chat(agent.gate, "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // What the container is: published on loopback only, labelled, the
    // secret in its environment and nowhere else.
    let inspect = docker(&["inspect", &name]).unwrap();
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let container = &inspect[0];
    let bindings = &container["HostConfig"]["PortBindings"][format!("{}/tcp", host.engine)];
    assert_eq!(bindings[0]["HostIp"], "127.0.0.1", "{bindings}");
    assert_eq!(
        container["Config"]["Labels"]["io.crossfade.deployment"],
        "dep-1"
    );
    assert_eq!(
        container["Config"]["Labels"]["io.crossfade.worker"],
        "worker-1"
    );
    assert_eq!(container["HostConfig"]["IpcMode"], "host");
    let cmd = container["Config"]["Cmd"].to_string();
    assert!(
        cmd.starts_with(r#"["--model","org/m","--host","0.0.0.0""#),
        "{cmd}"
    );
    let labels = container["Config"]["Labels"].to_string();
    let env = container["Config"]["Env"].to_string();
    assert!(!cmd.contains("hf_secret") && !labels.contains("hf_secret"));
    assert!(env.contains("HF_TOKEN=hf_secret_value_1234"), "{env}");
    assert!(env.contains("HF_HOME="), "{env}");

    // kill -9 of the agent: the container goes on, and a new agent adopts
    // it without restarting it.
    let before = started_at(&name).unwrap();
    drop(agent.process);
    let agent = host.start(&[], &keys);
    let adopted = agent
        .wait_state(EngineState::Ready, Duration::from_secs(60))
        .await;
    assert!(engine(&adopted).adopted, "{adopted:#?}");
    assert_eq!(
        started_at(&name).unwrap(),
        before,
        "the container was restarted"
    );
    let (status, _, body) = chat(agent.gate, "chat", false).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A crash: the container exits, the agent starts it again.
    let mut client = agent.client().await;
    client
        .apply(v1::ApplyRequest {
            spec: Some(container_spec(
                "dep-2",
                &image.0,
                &[("FAKE_VLLM_FAULT", "crash-after:1")],
            )),
            drain_timeout: seconds(1.0),
            ..Default::default()
        })
        .await
        .unwrap();
    agent
        .wait_status("dep-2 ready", Duration::from_secs(60), |s| {
            engine(s).deployment_id == "dep-2" && engine(s).state() == EngineState::Ready
        })
        .await;
    let _ = chat(agent.gate, "chat", false).await;
    let restarted = agent
        .wait_status("a restart", Duration::from_secs(60), |s| {
            engine(s).restart_count == 1 && engine(s).state() == EngineState::Ready
        })
        .await;
    assert_eq!(engine(&restarted).deployment_id, "dep-2");
    assert!(
        restarted.last_error.contains("the engine exited"),
        "{restarted:#?}"
    );

    // Stop with a grace period: nothing is left.
    client
        .stop(v1::StopRequest {
            grace: seconds(1.0),
            ..Default::default()
        })
        .await
        .unwrap();
    agent
        .wait_state(EngineState::Stopped, Duration::from_secs(60))
        .await;
    let mut left = docker(&["ps", "-a", "-q", "--filter", &format!("name=^{name}$")]);
    for _ in 0..100 {
        if left.as_deref() == Some("") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = docker(&["ps", "-a", "-q", "--filter", &format!("name=^{name}$")]);
    }
    assert_eq!(left.as_deref(), Some(""), "the container is left behind");
}
