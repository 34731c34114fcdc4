//! The start-up and shutdown behaviour as a process shows it: exit status 64
//! for a bad configuration, `--print-config`, and SIGTERM / SIGINT handling.
//!
//! The test binary re-runs itself as the "program": the ignored test
//! `program` is the child's entry point, selected with `--exact --ignored`
//! and driven by environment variables.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use crossfade_common::config::{self, CommonArgs, FieldError, Validate};
use crossfade_common::{Secret, Shutdown, telemetry};
use serde::{Deserialize, Serialize};

// Not `CROSSFADE_`-prefixed: the loader would (rightly) refuse it as an unknown key.
const ROLE: &str = "COMMON_PROCESS_TEST_ARGS";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProgramConfig {
    log: telemetry::LogConfig,
    listen: Listen,
    api_key: Secret<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Listen {
    public: String,
}

impl Validate for ProgramConfig {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = self.log.validate("log");
        if self.listen.public.parse::<std::net::SocketAddr>().is_err() {
            errors.push(FieldError::new(
                "listen.public",
                format!("expected host:port, got `{}`", self.listen.public),
            ));
        }
        errors
    }
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

/// The child: a miniature program that loads its configuration, prints
/// `ready`, and on a signal prints `draining`, waits a moment, prints `done`.
#[test]
#[ignore = "entry point of the child process, run by the other tests"]
fn program() {
    let Ok(args) = std::env::var(ROLE) else {
        return;
    };
    let cli = Cli::parse_from(
        std::iter::once("program".to_owned()).chain(args.split_whitespace().map(str::to_owned)),
    );
    let config: ProgramConfig = config::load_or_exit("program", &cli.common);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals().unwrap();
        let worker = shutdown.clone();
        shutdown.spawn(async move {
            worker.triggered().await;
            println!("draining");
            tokio::time::sleep(Duration::from_millis(300)).await;
            println!("done");
        });
        println!("ready {}", config.listen.public);
        shutdown.triggered().await;
        let clean = shutdown.wait_for_tasks(Duration::from_secs(5)).await;
        println!("exiting clean={clean}");
    });
}

fn child(args: &str, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "program",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    command
}

fn run(args: &str, env: &[(&str, &str)]) -> Output {
    child(args, env).output().unwrap()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn send(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The child's stdout, line by line, read on a thread so that a silent
/// child cannot hang the test.
fn lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits up to 10 s for a line containing `prefix` (libtest may print before it on the same line).
fn expect_line(lines: &mpsc::Receiver<String>, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(prefix) => return,
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("waited 10 s for a line `{prefix}`"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the child's output ended before a line `{prefix}`")
            }
        }
    }
}

fn wait_bounded(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the child did not exit within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_invalid_configuration_exits_64_naming_the_key() {
    let out = run("", &[("CROSSFADE_LISTEN__PUBLIC", "localhost")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(
            "program: invalid configuration: `listen.public`: expected host:port, got `localhost`"
        ),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));

    let out = run("--set log.format=xml", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("`log.format` (from --set log.format)"),
        "{stderr}"
    );
}

#[test]
fn print_config_shows_the_effective_values_without_secrets() {
    let out = run(
        "--print-config --set listen.public=127.0.0.1:1",
        &[
            ("CROSSFADE_API_KEY", "sk-do-not-print"),
            ("CROSSFADE_LOG__FORMAT", "json"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("public = \"127.0.0.1:1\""), "{stdout}");
    assert!(stdout.contains("format = \"json\""), "{stdout}");
    assert!(stdout.contains("api_key = \"<redacted>\""), "{stdout}");
    assert!(!stdout.contains("sk-do-not-print"), "{stdout}");
    assert!(!stdout.contains("ready"), "{stdout}");
}

#[test]
fn sigterm_drains_then_exits_and_a_second_signal_forces_it() {
    for (signal, twice) in [("TERM", false), ("INT", false), ("TERM", true)] {
        let mut process = Running(
            child("--set listen.public=127.0.0.1:1", &[])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let lines = lines(process.0.stdout.take().unwrap());
        expect_line(&lines, "ready");
        send(&process.0, signal);
        expect_line(&lines, "draining");
        if twice {
            send(&process.0, signal);
        } else {
            expect_line(&lines, "done");
            expect_line(&lines, "exiting clean=true");
        }
        let status = wait_bounded(&mut process.0);
        if twice {
            assert_eq!(
                status.code(),
                Some(130),
                "a second SIG{signal} exits at once"
            );
        } else {
            assert!(status.success(), "SIG{signal}: {status}");
        }
    }
}
