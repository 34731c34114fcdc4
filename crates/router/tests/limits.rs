//! Limits that keep one client from taking the router from the others:
//! slow bodies on many HTTP/2 connections, and API keys.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crossfade_router::keys::{KeyFile, Keys};
use crossfade_router::proxy::ProxySettings;
use support::*;

type Trickle = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// An HTTP/2 connection to `router` from the local address `from`.
async fn connection_from(
    from: IpAddr,
    router: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Trickle> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let stream = socket.connect(router).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_http2_connections_of_slow_bodies_do_not_stop_another_client() {
    const CONNECTIONS: usize = 40;
    const STREAMS: usize = 8;
    let engine = engine("org/model", f64::INFINITY).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[engine.addr()])]),
        ProxySettings {
            // Fewer slots than the attacker's streams.
            max_concurrent_requests: 100,
            max_concurrent_per_client: 50,
            min_body_rate: 0,
            ..ProxySettings::default()
        },
    )
    .await;

    // Four clients (127.0.0.2 to .5): 40 connections, 8 streams each,
    // every body one byte and then nothing. Together they could hold twice
    // the router's slots, if bodies still being read held one.
    const ATTACKERS: u8 = 4;
    let mut held = Vec::new();
    let (answers, mut answered) = mpsc::unbounded_channel();
    for i in 0..CONNECTIONS {
        let attacker = IpAddr::from([127, 0, 0, 2 + i as u8 % ATTACKERS]);
        let sender = connection_from(attacker, router.addr).await;
        for _ in 0..STREAMS {
            let (body, frames) = mpsc::channel(1);
            body.send(Ok(Frame::data(Bytes::from_static(b"{"))))
                .await
                .unwrap();
            held.push(body);
            let request = Request::post(router.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(StreamBody::new(ReceiverStream::new(frames)))
                .unwrap();
            let mut sender = sender.clone();
            let answers = answers.clone();
            tokio::spawn(async move {
                sender.ready().await.unwrap();
                if let Ok(response) = sender.send_request(request).await {
                    let status = response.status();
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    let _ = answers.send((status, body));
                }
            });
        }
    }
    // All but 50 of each are refused at once, as its own limit.
    let refused = CONNECTIONS * STREAMS - 50 * usize::from(ATTACKERS);
    for _ in 0..refused {
        let (status, body) = tokio::time::timeout(Duration::from_secs(20), answered.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "client_rate_limit_exceeded");
    }

    // Another client is served while those 200 bodies trickle.
    for _ in 0..3 {
        let (status, _, body) = chat(&client(), &router).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert!(answered.try_recv().is_err(), "a held stream was answered");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_key_get_401_and_never_reach_an_engine() {
    let engine = engine("org/model", f64::INFINITY).await;
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[engine.addr()])]),
        ProxySettings::default(),
    )
    .await;
    let mut file = KeyFile::default();
    let good = file.add("ci", 0, vec![], "now".into()).unwrap();
    let limited = file
        .add("other-team", 0, vec!["elsewhere".into()], "now".into())
        .unwrap();
    let revoked = file.add("laptop", 0, vec![], "now".into()).unwrap();
    file.revoke("laptop");
    router
        .proxy
        .admission()
        .set_keys(Some(Keys::new(&file).unwrap()));
    let url = router.url("/v1/chat/completions");
    let client = client();
    let bearer = |key: &str| format!("Bearer {key}");

    let wrong = format!("{}x", &good[..good.len() - 1]);
    for headers in [
        vec![],
        vec![("authorization", bearer(&wrong))],
        vec![("authorization", bearer(&revoked))],
        vec![("authorization", "Basic dXNlcjpwYXNz".to_owned())],
        vec![("api-key", "sk-not-ours".to_owned())],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, response_headers, body) =
            post(&client, &url, chat_body("chat", false), &headers)
                .await
                .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}: {body}");
        assert_eq!(response_headers["www-authenticate"], "Bearer");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"]["code"], "invalid_api_key");
        assert!(!body.contains(&good[good.len() - 8..]), "{body}");
    }
    let (status, _, body) = post(
        &client,
        &url,
        chat_body("chat", false),
        &[("authorization", &bearer(&limited))],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        engine.stats().served,
        0,
        "a refused request reached the engine"
    );

    for header in ["authorization", "api-key"] {
        let value = if header == "api-key" {
            good.clone()
        } else {
            bearer(&good)
        };
        let (status, _, body) = post(&client, &url, chat_body("chat", false), &[(header, &value)])
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{header}: {body}");
    }
    assert_eq!(engine.stats().served, 2);
}
