//! `crossfade`, the CLI, as a user runs it: the demo end to end, and the
//! errors a user meets first.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crossfade_e2e::{Process, TempDir, binary, free_port, wait_for_port};

/// Runs `crossfade demo -o json ARGS` briefly; its summary.
fn demo(args: &[&str]) -> serde_json::Value {
    let output = Command::new(binary("crossfade").unwrap())
        .args([
            "demo",
            "-o",
            "json",
            "--before",
            "2",
            "--after",
            "1",
            "--clients",
            "4",
        ])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn the_demo_promotes_under_load_without_a_failed_request() {
    let summary = demo(&[]);
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["promotion_status"], "SUCCEEDED");
    let sent = summary["requests_sent"].as_u64().unwrap();
    assert!(sent > 10, "{summary}");
    assert_eq!(summary["succeeded"].as_u64().unwrap(), sent);
    // Both versions answered: the promotion happened under the load.
    let by = summary["by_deployment"].as_object().unwrap();
    assert_eq!(by.len(), 2, "{summary}");
    assert!(summary["promotion_seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn one_host_updated_in_place_fails_no_request_the_router_holds_them() {
    let summary = demo(&["--workers", "1", "--replicas", "1"]);
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["promotion_status"], "SUCCEEDED");
    assert_eq!(
        summary["by_deployment"].as_object().unwrap().len(),
        2,
        "{summary}"
    );
    // The only replica reloaded: requests arriving meanwhile waited.
    assert!(
        summary["held_for_a_replica"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert!(
        summary["longest_hold_ms"].as_u64().unwrap() > 0,
        "{summary}"
    );
}

/// `crossfade --coordinator URL ARGS`: (succeeded, stdout, stderr).
fn crossfade(coordinator: &str, args: &[&str]) -> (bool, String, String) {
    let (code, stdout, stderr) = crossfade_code(coordinator, args);
    (code == Some(0), stdout, stderr)
}

/// A coordinator with no agent (enough for the API), in `dir`; its URL.
fn lone_coordinator(dir: &TempDir) -> (Process, String) {
    let api = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[control_tls]\ninsecure = true\n[listen]\napi = \"{api}\"\nadmin = \"127.0.0.1:{}\"\n[store]\npath = \"{}\"\n",
            free_port().unwrap(),
            dir.path().join("state.json").display()
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("crossfade-coordinator").unwrap());
    command.arg("--config").arg(&config).env("RUST_LOG", "warn");
    let coordinator = Process::spawn("crossfade-coordinator", command).unwrap();
    wait_for_port(api, Duration::from_secs(20)).unwrap();
    (coordinator, format!("http://{api}"))
}

/// `crossfade ARGS` with its exit code.
fn crossfade_code(coordinator: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(binary("crossfade").unwrap())
        .arg("--coordinator")
        .arg(coordinator)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn errors_name_the_coordinator_or_the_setting() {
    let (ok, _, stderr) = crossfade("http://127.0.0.1:1", &["status", "chat"]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot reach the coordinator at http://127.0.0.1:1"),
        "{stderr}"
    );

    let dir = TempDir::new().unwrap();
    let (_coordinator, url) = lone_coordinator(&dir);

    let (ok, stdout, stderr) = crossfade(&url, &["endpoint", "create", "chat"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("endpoint   chat"), "{stdout}");
    let (ok, _, stderr) = crossfade(&url, &["settings", "chat", "--max-surge-percent", "60"]);
    assert!(!ok);
    assert!(
        stderr.contains("`settings.max_surge_percent`: must be within 0..=50, got 60"),
        "{stderr}"
    );
    let (ok, stdout, _) = crossfade(&url, &["-o", "json", "endpoint", "get", "chat"]);
    assert!(ok);
    let endpoint: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(endpoint["name"], "chat");
    assert_eq!(endpoint["promotion_settings"]["max_surge_percent"], 10);
    let (ok, _, stderr) = crossfade(&url, &["pause", "chat"]);
    assert!(!ok);
    assert!(stderr.contains("has no promotion under way"), "{stderr}");
    let (ok, stdout, _) = crossfade(&url, &["endpoint", "list"]);
    assert!(ok);
    assert!(stdout.lines().any(|l| l.starts_with("chat ")), "{stdout}");
    let (ok, _, stderr) = crossfade(&url, &["promote", "chat"]);
    assert!(!ok);
    assert!(stderr.contains("--template"), "{stderr}");
}

#[test]
fn the_fleet_commands_print_what_they_set_and_json_errors_have_one_shape() {
    let dir = TempDir::new().unwrap();
    let (_coordinator, url) = lone_coordinator(&dir);
    let (ok, stdout, stderr) = crossfade(&url, &["endpoint", "create", "chat"]);
    assert!(ok, "{stdout}{stderr}");

    // Aliases: added and removed by name, the result printed.
    let (ok, stdout, stderr) = crossfade(&url, &["aliases", "chat", "--add", "a", "--add", "b"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "a\nb\n");
    let (ok, stdout, _) = crossfade(&url, &["-o", "json", "aliases", "chat", "--remove", "a"]);
    assert!(ok);
    let aliases: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(aliases["aliases"], serde_json::json!(["b"]));

    // The selector: only what a flag names changes.
    let (ok, _, stderr) = crossfade(&url, &["selector", "chat", "--label", "gpu=h100"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = crossfade(&url, &["selector", "chat", "--min-gpu-count", "2"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("label gpu"), "{stdout}");
    assert!(stdout.contains("h100"), "{stdout}");
    assert!(stdout.contains("min_gpu_count"), "{stdout}");

    // Settings print the settings, by Baseten's names.
    let (ok, stdout, stderr) = crossfade(&url, &["settings", "chat", "--max-surge-percent", "25"]);
    assert!(ok, "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("max_surge_percent"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.ends_with(" 25"), "{line}");
    assert!(stdout.contains("promotion_cleanup_strategy"), "{stdout}");

    // Workers and routers are added and removed by address; an unreachable
    // one is listed as such.
    let (ok, _, stderr) = crossfade(&url, &["workers", "add", "127.0.0.1:9"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = crossfade(&url, &["workers"]);
    assert!(ok);
    assert!(stdout.starts_with("WORKER "), "{stdout}");
    assert!(stdout.contains("127.0.0.1:9"), "{stdout}");
    let (ok, _, stderr) = crossfade(&url, &["workers", "remove", "127.0.0.1:9"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = crossfade(&url, &["workers", "list"]);
    assert!(ok);
    assert!(!stdout.contains("127.0.0.1:9"), "{stdout}");
    let (ok, _, stderr) = crossfade(&url, &["routers", "add", "127.0.0.1:9"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = crossfade(&url, &["-o", "json", "routers", "list"]);
    assert!(ok);
    let routers: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(routers["routers"][0]["control_address"], "127.0.0.1:9");
    let (ok, _, stderr) = crossfade(&url, &["routers", "remove", "127.0.0.1:9"]);
    assert!(ok, "{stderr}");

    // History: each promotion with its timing and how it moved (none
    // yet: an endpoint created without a template).
    let (ok, stdout, _) = crossfade(&url, &["history", "chat"]);
    assert!(ok);
    assert!(stdout.starts_with("PROMOTION "), "{stdout}");
    assert!(stdout.contains("STARTED (UTC)"), "{stdout}");

    // With -o json, an error is one JSON object on stderr.
    let (code, _, stderr) = crossfade_code(&url, &["-o", "json", "status", "nope"]);
    assert_eq!(code, Some(1));
    let error: serde_json::Value = serde_json::from_str(stderr.trim()).unwrap();
    assert_eq!(error["error"]["code"], "NOT_FOUND", "{stderr}");
    assert!(error["error"]["message"].as_str().unwrap().contains("nope"));
    let (_, _, stderr) = crossfade_code("http://127.0.0.1:1", &["-o", "json", "workers"]);
    let error: serde_json::Value = serde_json::from_str(stderr.trim()).unwrap();
    assert_eq!(error["error"]["code"], "UNAVAILABLE", "{stderr}");

    // `status --watch` with nothing promoting waits for a promotion, until
    // its --timeout: exit 3.
    let (code, stdout, stderr) =
        crossfade_code(&url, &["status", "chat", "--watch", "--timeout", "2s"]);
    assert_eq!(code, Some(3), "{stdout}{stderr}");
    assert!(
        stdout.contains("waiting for a promotion to start"),
        "{stdout}"
    );
    assert!(stderr.contains("--timeout passed"), "{stderr}");
}
