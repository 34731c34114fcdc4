//! The simulated fleet speaks the Agent API as an agent does: an engine
//! loads, serves through the gate, drains, stops and crashes on command,
//! and an older coordinator's calls are refused.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crossfade_proto::v1::{self, EngineState, agent_client::AgentClient};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn state(client: &mut AgentClient<tonic::transport::Channel>) -> EngineState {
    let status = client
        .get_status(v1::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    status.engine.unwrap().state()
}

async fn wait_state(client: &mut AgentClient<tonic::transport::Channel>, want: EngineState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(client).await != want {
        assert!(Instant::now() < deadline, "waited for {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The gate's status code for a chat request.
async fn chat(address: SocketAddr) -> u16 {
    let body = r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#;
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text[9..12].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_engine_loads_serves_drains_stops_and_crashes() {
    let port = crossfade_common::net::free_loopback_port().unwrap();
    let fleet = crossfade_fleet_sim::start(crossfade_fleet_sim::Settings {
        workers: 3,
        first: Ipv4Addr::new(127, 77, 0, 1),
        port,
        load_time: Duration::from_millis(200),
        drain_time: Duration::ZERO,
        fail_model: Some("org/broken".into()),
    })
    .await
    .unwrap();
    let addresses = fleet.addresses();
    assert_eq!(addresses.len(), 3);
    assert_eq!(addresses[2], SocketAddr::from(([127, 77, 0, 3], port)));
    let mut client = AgentClient::connect(format!("http://{}", addresses[1]))
        .await
        .unwrap();
    assert_eq!(state(&mut client).await, EngineState::Stopped);
    assert_eq!(chat(addresses[1]).await, 503);

    let apply = |epoch, model: &str| v1::ApplyRequest {
        coordinator_epoch: epoch,
        spec: Some(v1::EngineSpec {
            deployment_id: format!("dep-{model}"),
            endpoint: "chat".into(),
            template: Some(v1::Template {
                model: model.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        drain_timeout: None,
    };
    let applied = client.apply(apply(5, "org/m")).await.unwrap().into_inner();
    assert!(!applied.already_applied);
    assert_eq!(
        applied.status.unwrap().engine.unwrap().state(),
        EngineState::Starting
    );
    wait_state(&mut client, EngineState::Ready).await;
    assert_eq!(chat(addresses[1]).await, 200);
    // The same deployment again changes nothing; an older epoch is refused.
    assert!(
        client
            .apply(apply(5, "org/m"))
            .await
            .unwrap()
            .into_inner()
            .already_applied
    );
    let refused = client.apply(apply(4, "org/other")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    let drained = client
        .drain(v1::DrainRequest {
            coordinator_epoch: 5,
            deadline: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.drained);
    assert_eq!(state(&mut client).await, EngineState::Draining);
    assert_eq!(chat(addresses[1]).await, 503);
    client
        .stop(v1::StopRequest {
            coordinator_epoch: 5,
            grace: None,
        })
        .await
        .unwrap();
    assert_eq!(state(&mut client).await, EngineState::Stopped);

    // A model set to fail fails once loaded; a crash on command fails a
    // ready engine; the census counts both.
    client.apply(apply(6, "org/broken")).await.unwrap();
    wait_state(&mut client, EngineState::Failed).await;
    let mut other = AgentClient::connect(format!("http://{}", addresses[0]))
        .await
        .unwrap();
    other.apply(apply(6, "org/m")).await.unwrap();
    wait_state(&mut other, EngineState::Ready).await;
    fleet.crash(0);
    assert_eq!(state(&mut other).await, EngineState::Failed);
    let census = fleet.census();
    assert_eq!(census.get("ENGINE_STATE_FAILED"), Some(&2), "{census:?}");
    assert_eq!(census.get("ENGINE_STATE_STOPPED"), Some(&1), "{census:?}");

    // Watching: the first message is the status now, the next one the
    // change.
    let mut watch = other
        .watch_status(v1::WatchStatusRequest {
            heartbeat_interval: None,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.engine.unwrap().state(), EngineState::Failed);
    other.apply(apply(7, "org/m2")).await.unwrap();
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.engine.unwrap().state(), EngineState::Starting);
    assert_eq!(next.coordinator_epoch, 7);
    drop((client, other, watch));
    assert!(
        fleet.stop(Duration::from_secs(5)).await,
        "tasks outlived the fleet"
    );
}
