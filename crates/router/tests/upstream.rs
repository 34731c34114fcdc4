//! The router's connections to gates: a kept-alive connection that the gate
//! closes as the next request goes out costs that request nothing.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crossfade_router::proxy::ProxySettings;
use support::*;

const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

/// Reads one request (its head and a `content-length` body); false when
/// the connection ends first.
async fn read_request(stream: &mut TcpStream) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if seen.len() >= end + 4 + length {
                return true;
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_kept_alive_connection_the_gate_closed_is_sent_again() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gate = listener.local_addr().unwrap();
    // A test double of a gate: answers one request on its first connection,
    // keeps it alive, then closes it the moment the next request's first
    // bytes arrive, unread (an idle close racing with the send). Every
    // later connection is answered.
    let served = tokio::spawn(async move {
        let (mut first, _) = listener.accept().await.unwrap();
        assert!(read_request(&mut first).await);
        first.write_all(ANSWER).await.unwrap();
        let mut byte = [0u8; 1];
        let _ = first.read(&mut byte).await;
        drop(first);
        let (mut second, _) = listener.accept().await.unwrap();
        assert!(read_request(&mut second).await);
        second.write_all(ANSWER).await.unwrap();
        second
    });
    let router = TestRouter::start(
        table(0, vec![deployment("v1", 1, &[gate])]),
        ProxySettings::default(),
    )
    .await;
    let client = client();
    for _ in 0..2 {
        let (status, _, body) = chat(&client, &router).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let _open = tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .unwrap()
        .unwrap();
    let report = report(&router);
    let retries = report[0].deployments[0].retries.unwrap();
    assert_eq!(retries.connect_error, 1, "{retries:?}");
}
