//! RouterControl over real gRPC: tables swapped by a "coordinator" (this
//! test), statistics of real proxied requests.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, SystemTime};

use crossfade_common::Shutdown;
use crossfade_proto::v1::router_control_client::RouterControlClient;
use crossfade_proto::v1::{self, TableSource};
use crossfade_router::proxy::ProxySettings;
use http::StatusCode;
use support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_swaps_tables_and_reads_stats() {
    let v1 = engine("org/model-v1", f64::INFINITY).await;
    let v2 = engine("org/model-v2", f64::INFINITY).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[v1.addr()])]),
        ProxySettings::default(),
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let server = tokio::spawn(crossfade_router::control::serve(
        listener,
        std::sync::Arc::clone(&router.routes),
        "router-test".into(),
        crossfade_proto::tls::Control::Insecure { remote: false },
        shutdown.clone(),
    ));
    let mut control = RouterControlClient::connect(format!("http://{control_addr}"))
        .await
        .unwrap();

    let got = control
        .get_table(v1::GetTableRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.source(), TableSource::Config);
    assert_eq!(got.table.unwrap().endpoints[0].deployments[0].id, "v1");

    // The coordinator moves all traffic to v2.
    let apply = |version: u64, epoch: u64, weight: u32| v1::ApplyTableRequest {
        coordinator_epoch: epoch,
        table: Some(table(
            version,
            vec![
                deployment("v2", weight, &[v2.addr()]),
                deployment("v1", 0, &[v1.addr()]),
            ],
        )),
    };
    let applied = control
        .apply_table(apply(5, 1, 10_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.version_in_force, 5);
    let got = control
        .get_table(v1::GetTableRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.source(), TableSource::Coordinator);
    assert_eq!(got.coordinator_epoch, 1);

    let client = client();
    for _ in 0..5 {
        let (status, headers, _) = chat(&client, &router).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-crossfade-deployment"], "v2");
    }

    // Older versions and older coordinators are refused; so is nonsense.
    let stale = control.apply_table(apply(4, 1, 10_000)).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(
        stale.message().contains("version 4 is older than"),
        "{}",
        stale.message()
    );
    control.apply_table(apply(6, 3, 10_000)).await.unwrap();
    let fenced = control.apply_table(apply(7, 2, 10_000)).await.unwrap_err();
    assert_eq!(fenced.code(), Code::FailedPrecondition);
    assert!(
        fenced.message().contains("coordinator_epoch 2"),
        "{}",
        fenced.message()
    );
    let invalid = control.apply_table(apply(8, 3, 20_000)).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid
            .message()
            .contains("`weight` must be within 0..=10000"),
        "{}",
        invalid.message()
    );
    let missing = control
        .apply_table(v1::ApplyTableRequest {
            coordinator_epoch: 3,
            table: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert_eq!(router.routes.load().version(), 6);

    let stats = control
        .get_stats(v1::GetStatsRequest {
            since: None,
            endpoint: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.router_id, "router-test");
    assert_eq!(stats.table_version, 6);
    let v2_stats = &stats.endpoints[0].deployments[0];
    assert_eq!(v2_stats.deployment_id, "v2");
    let requests = v2_stats.requests.unwrap();
    assert_eq!((requests.total, requests.success), (5, 5));
    assert_eq!(v2_stats.time_to_first_token.unwrap().count, 5);
    assert_eq!(v2_stats.in_flight, 0);
    assert_eq!(v2_stats.workers[0].address, v2.addr().to_string());
    assert_eq!(v2_stats.workers[0].requests.unwrap().success, 5);

    let future = SystemTime::now() + Duration::from_secs(3_600);
    let err = control
        .get_stats(v1::GetStatsRequest {
            since: Some(future.into()),
            endpoint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = control
        .get_stats(v1::GetStatsRequest {
            since: None,
            endpoint: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    shutdown.trigger();
    server.await.unwrap().unwrap();
}
