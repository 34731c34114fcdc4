//! GPU health on a real agent (DESIGN §6), through the fake probe's fault
//! file: an application XID restarts the engine and repeats escalate to a
//! reset; the probe reads only the GPUs the agent was given; a host that
//! must have a GPU and has none is refused. The coordinator's side (a
//! fatal XID cordons, a candidate's fatal GPU fails its promotion) is in
//! `coordinator.rs`.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use crossfade_e2e::binary;
use crossfade_proto::v1::{self, EngineState};

use support::*;

const STANDALONE: &[(&str, &str)] = &[("MODEL_NAME", "org/m"), ("FAKE_VLLM_LOAD_TIME", "200ms")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_xid_restarts_the_engine_and_repeats_ask_for_a_reset() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    let agent = host.start(STANDALONE, "");
    let ready = agent
        .wait_state(EngineState::Ready, Duration::from_secs(30))
        .await;
    let first = engine(&ready).pid;

    // XID 13 (graphics engine exception): the engine's context is gone.
    host.inject_gpu_faults(r#"{"0": {"xids": [13]}}"#);
    let restarted = agent
        .wait_status("the engine restarted", Duration::from_secs(30), |s| {
            let e = engine(s);
            e.state() == EngineState::Ready && e.pid != first && e.restart_count == 1
        })
        .await;
    assert_eq!(restarted.gpu_health(), v1::GpuHealth::Warning);
    assert!(
        restarted
            .last_error
            .contains("the agent restarted the engine: application XID 13 on GPU 0"),
        "{}",
        restarted.last_error
    );
    let second = engine(&restarted).pid;

    // Two more within the window: restarts did not help, the GPU wants a
    // reset, and the agent leaves the engine to the coordinator.
    host.inject_gpu_faults(r#"{"0": {"xids": [13, 31, 43]}}"#);
    let escalated = agent
        .wait_status("a reset asked for", Duration::from_secs(10), |s| {
            s.gpu_health() == v1::GpuHealth::ResetRequired
        })
        .await;
    assert!(
        escalated.gpus[0]
            .health_reasons
            .iter()
            .any(|r| r.contains("3 application XIDs")),
        "{:?}",
        escalated.gpus[0].health_reasons
    );
    // Several probe reads later, the same engine still serves.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = agent.status().await;
    assert_eq!(engine(&after).pid, second);
    assert_eq!(engine(&after).restart_count, 1);
    assert_eq!(engine(&after).state(), EngineState::Ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_gpus_the_agent_was_given_are_read() {
    let host = Host::new();
    let _reaper = EngineReaper(host.state_dir());
    let agent = host.start(&[], "cuda_visible_devices = \"1\"");
    let status = agent
        .wait_status("a status", Duration::from_secs(10), |_| true)
        .await;
    let indices: Vec<u32> = status.gpus.iter().map(|g| g.index).collect();
    assert_eq!(indices, [1]);
    // A fault on a GPU that is not the agent's does not touch it.
    host.inject_gpu_faults(
        r#"{"0": {"lost": true}, "1": {"throttle_reasons": ["hw_thermal_slowdown"]}}"#,
    );
    let warned = agent
        .wait_status("the throttled GPU", Duration::from_secs(10), |s| {
            s.gpu_health() != v1::GpuHealth::Healthy
        })
        .await;
    assert_eq!(warned.gpu_health(), v1::GpuHealth::Warning);
    assert_eq!(
        warned.gpus[0].health_reasons,
        ["throttled: hw_thermal_slowdown"]
    );
}

#[test]
fn an_agent_that_requires_a_gpu_on_a_host_without_one_exits_64() {
    // `none` everywhere; `nvml` here too, as these machines have no driver.
    let mut probes = vec!["none"];
    let no_nvml = no_nvml_here();
    if no_nvml {
        probes.push("nvml");
    }
    for probe in probes {
        let host = Host::new();
        let output = Command::new(binary("crossfade-agent").unwrap())
            .args([
                "--set",
                &format!("engine.state_dir={}", host.state_dir().display()),
                "--set",
                "control_tls.insecure=true",
                "--set",
                &format!("listen.control=127.0.0.1:{}", host.control),
                "--set",
                &format!("gpu.probe={probe}"),
                "--set",
                "gpu.require=true",
            ])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{probe}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!(
                "gpu.require is set but the {probe} probe finds no GPU"
            )),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// Whether NVML is missing here (no driver), so that an agent with the
/// NVML probe finds no GPU.
fn no_nvml_here() -> bool {
    [
        "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
        "/usr/lib64/libnvidia-ml.so.1",
    ]
    .iter()
    .all(|p| !std::path::Path::new(p).exists())
}
