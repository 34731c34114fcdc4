//! The coordinator's REST API (`[listen] http`) as a CI job or a browser
//! calls it: Baseten's resource names, one error shape, and schemathesis
//! against the committed OpenAPI description.
#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crossfade_e2e::{Process, TempDir, binary, free_port, in_ci, wait_for_port};
use serde_json::{Value, json};

/// A coordinator with no agent, its REST API on a free port: (process,
/// the REST address).
fn coordinator(dir: &TempDir) -> (Process, SocketAddr) {
    let [api, admin, http] =
        [0; 3].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())));
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[control_tls]\ninsecure = true\n[listen]\napi = \"{api}\"\nadmin = \"{admin}\"\nhttp = \"{http}\"\n[store]\npath = \"{}\"\n",
            dir.path().join("state.db").display()
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("crossfade-coordinator").unwrap());
    command.arg("--config").arg(&config).env("RUST_LOG", "warn");
    let process = Process::spawn("crossfade-coordinator", command).unwrap();
    wait_for_port(http, Duration::from_secs(20)).unwrap();
    (process, http)
}

/// One HTTP/1.1 call: (status, headers, body as JSON or text).
fn call(
    http: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> (u16, String, Value) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {http}\r\nconnection: close\r\n");
    if let Some((content_type, body)) = body {
        request.push_str(&format!(
            "content-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    let answer = raw(http, &request);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    (status, head.to_ascii_lowercase(), body)
}

/// A request written by hand; the whole answer.
fn raw(http: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

fn json_call(http: SocketAddr, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let text = body.to_string();
    let (status, _, body) = call(http, method, path, Some(("application/json", &text)));
    (status, body)
}

#[test]
fn the_rest_api_speaks_baseten_names_and_one_error_shape() {
    let dir = TempDir::new().unwrap();
    let (_coordinator, http) = coordinator(&dir);

    // Created with Baseten's settings shape; read back in it.
    let (status, endpoint) = json_call(
        http,
        "POST",
        "/v1/endpoints",
        &json!({
            "name": "chat",
            "aliases": ["Qwen/Qwen3-8B"],
            "promotion_settings": {
                "rolling_deploy": true,
                "rolling_deploy_config": {"max_surge_percent": 25, "stabilization_time_seconds": 60},
                "promotion_cleanup_strategy": "KEEP"
            }
        }),
    );
    assert_eq!(status, 201, "{endpoint}");
    let settings = &endpoint["promotion_settings"];
    assert_eq!(settings["rolling_deploy"], true);
    assert_eq!(settings["rolling_deploy_config"]["max_surge_percent"], 25);
    assert_eq!(
        settings["rolling_deploy_config"]["stabilization_time_seconds"],
        60
    );
    assert_eq!(settings["promotion_cleanup_strategy"], "KEEP");
    assert!(settings.get("max_surge_percent").is_none(), "{settings}");

    // PATCH changes only what it names (Baseten's PATCH of an environment).
    let (status, endpoint) = json_call(
        http,
        "PATCH",
        "/v1/endpoints/chat",
        &json!({"promotion_settings": {"rolling_deploy_config": {"max_unavailable_percent": 0, "max_surge_percent": 10}}}),
    );
    assert_eq!(status, 200, "{endpoint}");
    let config = &endpoint["promotion_settings"]["rolling_deploy_config"];
    assert_eq!(config["max_surge_percent"], 10);
    assert_eq!(config["stabilization_time_seconds"], 60);

    // The coordinator's own checks, with its words, as HTTP statuses.
    let (status, error) = json_call(
        http,
        "PATCH",
        "/v1/endpoints/chat",
        &json!({"promotion_settings": {"rolling_deploy_config": {"max_surge_percent": 60}}}),
    );
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "INVALID_ARGUMENT");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_surge_percent"),
        "{error}"
    );
    let (status, error) = json_call(
        http,
        "POST",
        "/v1/endpoints/chat/pause_promotion",
        &json!({}),
    );
    assert_eq!(status, 409, "{error}");
    assert_eq!(error["error"]["code"], "FAILED_PRECONDITION");
    let (status, _, error) = call(http, "GET", "/v1/endpoints/nope", None);
    assert_eq!(status, 404);
    assert_eq!(error["error"]["code"], "NOT_FOUND");

    // Bad requests are refused before any call, naming what is wrong.
    let (status, error) = json_call(
        http,
        "PATCH",
        "/v1/endpoints/chat",
        &json!({"promotion_settings": {"rolling_deploy_config": {"max_surgeon_percent": 1}}}),
    );
    assert_eq!(status, 400);
    assert!(error.to_string().contains("max_surgeon_percent"), "{error}");
    let (status, _, _) = call(
        http,
        "POST",
        "/v1/endpoints",
        Some(("application/json", "{not json")),
    );
    assert_eq!(status, 400);
    let (status, _, _) = call(http, "POST", "/v1/endpoints", Some(("text/plain", "{}")));
    assert_eq!(status, 415);
    let (status, head, _) = call(http, "PUT", "/v1/endpoints/chat", None);
    assert_eq!(status, 405);
    assert!(head.contains("allow: get, patch, delete"), "{head}");

    // Workers and routers, by address.
    let (status, worker) = json_call(
        http,
        "POST",
        "/v1/workers",
        &json!({"control_address": "127.0.0.1:9"}),
    );
    assert_eq!(status, 200, "{worker}");
    let (_, _, workers) = call(http, "GET", "/v1/workers", None);
    assert_eq!(workers["workers"][0]["control_address"], "127.0.0.1:9");
    let (status, _, _) = call(http, "DELETE", "/v1/workers/127.0.0.1:9", None);
    assert_eq!(status, 200);

    // What a browser sends for a page of another site is refused: a
    // cross-site POST, and a DNS name rebound to 127.0.0.1.
    let refused = raw(
        http,
        &format!(
            "POST /v1/endpoints/chat/force_cancel_promotion HTTP/1.1\r\nhost: {http}\r\norigin: http://evil.example\r\nconnection: close\r\n\r\n"
        ),
    );
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("PERMISSION_DENIED"), "{refused}");
    let refused = raw(
        http,
        &format!(
            "GET /v1/endpoints HTTP/1.1\r\nhost: evil.example:{}\r\nconnection: close\r\n\r\n",
            http.port()
        ),
    );
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    // The dashboard's own page: its origin is this server.
    let allowed = raw(
        http,
        &format!(
            "GET /v1/endpoints HTTP/1.1\r\nhost: {http}\r\norigin: http://{http}\r\nconnection: close\r\n\r\n"
        ),
    );
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    let allowed = raw(
        http,
        &format!(
            "GET /v1/endpoints HTTP/1.1\r\nhost: localhost:{}\r\nconnection: close\r\n\r\n",
            http.port()
        ),
    );
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");

    // The description and the page are served too.
    let (status, _, openapi) = call(http, "GET", "/openapi.json", None);
    assert_eq!(status, 200);
    assert_eq!(openapi["openapi"], "3.0.3");
    let (status, head, page) = call(http, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    assert!(page.as_str().unwrap().contains("/dashboard.js"));
}

/// Where schemathesis is: `CROSSFADE_SCHEMATHESIS`, the repository's
/// `.venv` (as `.ci/run` installs it), or the `PATH`.
fn schemathesis() -> Option<String> {
    let repository = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/schemathesis");
    let candidates = [
        std::env::var("CROSSFADE_SCHEMATHESIS").ok(),
        Some(repository.to_owned()),
        Some("schemathesis".to_owned()),
    ];
    for candidate in candidates.into_iter().flatten() {
        let found = Command::new(&candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return Some(candidate);
        }
    }
    None
}

/// schemathesis (PyPI) against `docs/openapi.json` and a running
/// coordinator: no server error, no response outside the schema, no
/// status or content type the description does not list.
#[test]
fn schemathesis_finds_no_server_error_and_no_response_outside_the_schema() {
    let Some(schemathesis) = schemathesis() else {
        assert!(
            !in_ci() && std::env::var("CROSSFADE_REQUIRE_SCHEMATHESIS").as_deref() != Ok("1"),
            "schemathesis is required here (.venv/bin/pip install schemathesis)"
        );
        eprintln!("SKIPPED: no schemathesis (.venv/bin/pip install schemathesis)");
        return;
    };
    let dir = TempDir::new().unwrap();
    let (_coordinator, http) = coordinator(&dir);
    // What the description's examples name, so calls reach past "not found".
    json_call(http, "POST", "/v1/endpoints", &json!({"name": "chat"}));
    json_call(
        http,
        "POST",
        "/v1/workers",
        &json!({"control_address": "127.0.0.1:9"}),
    );
    json_call(
        http,
        "POST",
        "/v1/routers",
        &json!({"control_address": "127.0.0.1:9"}),
    );
    let description = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let output = Command::new(&schemathesis)
        .args(["run", description, "--url"])
        .arg(format!("http://{http}"))
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--max-examples",
            "25",
        ])
        // Its Hypothesis database and reports stay in the test's directory.
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("passed"), "{stdout}");
}
