//! The router's request path, from the first byte a client controls:
//! method, path, headers and body, through the URL and header limits, the
//! body reading, the `model` extraction and the table lookup. The only
//! endpoint has no weight, so nothing is dialled, and no request is held
//! for a replica (`queue_max = 0`). Any answer is fine; a panic is a
//! finding.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use crossfade_proto::v1;
use crossfade_router::proxy::{Proxy, ProxySettings};
use crossfade_router::table::Routes;
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;

fn proxy() -> &'static (Proxy, tokio::runtime::Runtime) {
    static PROXY: OnceLock<(Proxy, tokio::runtime::Runtime)> = OnceLock::new();
    PROXY.get_or_init(|| {
        let table = v1::RoutingTable {
            version: 1,
            endpoints: vec![v1::EndpointRoute {
                created: 0,
                name: "chat".into(),
                aliases: vec!["org/model".into()],
                deployments: vec![v1::DeploymentRoute {
                    max_model_len: 0,
                    id: "v1".into(),
                    weight: 0,
                    workers: vec![v1::WorkerRoute {
                        address: "127.0.0.1:9".into(),
                        worker_id: String::new(),
                    }],
                }],
            }],
        };
        let routes = Arc::new(Routes::new(&table).expect("a valid table"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        let settings = ProxySettings {
            queue_max: 0,
            ..ProxySettings::default()
        };
        (Proxy::new(routes, settings), runtime)
    })
}

fuzz_target!(|data: &[u8]| {
    // METHOD \n PATH \n (NAME: VALUE \n)* \n BODY
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or_default();
    let path = lines.next().unwrap_or_default();
    let mut request = http::Request::builder().method(method).uri(path);
    let mut consumed = method.len() + path.len() + 2;
    for line in lines.by_ref() {
        consumed += line.len() + 1;
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            request = request.header(name.trim(), value.trim());
        }
    }
    let body = Bytes::copy_from_slice(data.get(consumed.min(data.len())..).unwrap_or_default());
    let Ok(request) = request.body(Full::new(body)) else {
        return;
    };
    let (proxy, runtime) = proxy();
    let response = runtime.block_on(proxy.handle(request, [127, 0, 0, 1].into()));
    assert!(response.status().as_u16() >= 200);
});
