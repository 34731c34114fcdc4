//! A Debian container with systemd as PID 1, built here: no registry can
//! be reached, so debootstrap makes the root from Debian's mirror and
//! `docker import` loads it, once, under a fixed tag. With the helpers the
//! systemd tests drive it by: `sh -c` in it, files in and out, `systemctl
//! show`, and guards that remove what a test started.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crossfade_e2e::{TempDir, wait_for};

/// The base image: Debian with systemd, made once by debootstrap. Bump
/// the suffix when [`BASE_PACKAGES`] changes.
pub const IMAGE: &str = "crossfade-systemd:bookworm-1";
/// Beyond debootstrap's minbase: what systemd as PID 1, the packages
/// and the tests need.
pub const BASE_PACKAGES: &str = "systemd,systemd-sysv,dbus,curl,procps,ca-certificates";
/// Where debootstrap downloads from, unless `CROSSFADE_DEBIAN_MIRROR` says.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Says why a test cannot run here, and fails it instead under
/// `CROSSFADE_REQUIRE_SYSTEMD=1`.
pub fn skip<T>(why: &str) -> Option<T> {
    assert!(
        std::env::var("CROSSFADE_REQUIRE_SYSTEMD").as_deref() != Ok("1"),
        "CROSSFADE_REQUIRE_SYSTEMD=1 but {why}"
    );
    eprintln!("SKIPPED: {why}; the systemd test did not run");
    None
}

/// Docker answers and has [`IMAGE`] (made once for all the tests here).
pub fn docker_and_base_image() -> Result<(), String> {
    static MADE: Mutex<()> = Mutex::new(());
    if docker(&["version", "--format", "{{.Server.Version}}"]).is_err() {
        return Err("no Docker Engine answers (docker version)".into());
    }
    let _one_at_a_time = MADE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    base_image()
}

/// Makes [`IMAGE`] unless Docker has it.
fn base_image() -> Result<(), String> {
    if docker(&["image", "inspect", "--format", "{{.Id}}", IMAGE]).is_ok() {
        return Ok(());
    }
    let runs = Command::new("debootstrap")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !runs || !is_root() {
        return Err(format!(
            "debootstrap cannot run (not installed, or not root) and the image {IMAGE} is missing"
        ));
    }
    let dir = TempDir::new().map_err(|e| e.to_string())?;
    let root = dir.path().join("root");
    let mirror =
        std::env::var("CROSSFADE_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.to_owned());
    eprintln!("building {IMAGE} with debootstrap from {mirror} (a few minutes, once)");
    // `timeout`: a mirror that stops answering must not hang the test.
    let made = Command::new("timeout")
        .args(["900", "debootstrap", "--variant=minbase"])
        .arg(format!("--include={BASE_PACKAGES}"))
        .arg("bookworm")
        .arg(&root)
        .arg(&mirror)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("debootstrap cannot run: {e}"))?;
    if !made.status.success() {
        return Err(format!(
            "debootstrap failed ({}): {}",
            made.status,
            tail(&made.stdout, 1500)
        ));
    }
    // Downloaded packages and indexes: not needed to run, 90 MB.
    for cache in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let _ = std::fs::remove_dir_all(root.join(cache));
        let _ = std::fs::create_dir_all(root.join(cache).join("partial"));
    }
    let imported = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' -c . | docker import - {IMAGE}",
            root.display()
        ))
        .output()
        .map_err(|e| e.to_string())?;
    if !imported.status.success() {
        return Err(format!(
            "docker import of the debootstrap root failed: {}",
            tail(&imported.stderr, 1500)
        ));
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Removes the image when dropped.
pub struct Image(pub String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.0]);
    }
}

// === The container ===

/// A container running systemd as PID 1, removed when dropped.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `docker run -d --name NAME ARGS`.
    pub fn run(args: &[&str]) -> Self {
        let name = unique_name("crossfade-systemd");
        let mut run = vec!["run", "-d", "--name", &name];
        run.extend_from_slice(args);
        docker(&run).unwrap();
        Self { name }
    }

    pub fn boot() -> Self {
        let name = unique_name("crossfade-systemd");
        // No --privileged (refused here): systemd runs its units' sandbox
        // where the container lets it, and says which parts it skips. No
        // network either: everything talks on the container's 127.0.0.1.
        docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:ro",
            IMAGE,
            "/sbin/init",
        ])
        .unwrap();
        let container = Self { name };
        // Until systemd answers on its bus and has started every unit it
        // starts at boot ("degraded": one failed, which the container's
        // limits may cause and which the units under test do not need).
        wait_for("systemd to finish booting", Duration::from_secs(60), || {
            let state = container.try_sh("systemctl is-system-running");
            let state = String::from_utf8_lossy(&state.stdout);
            Ok(matches!(state.trim(), "running" | "degraded").then_some(()))
        })
        .unwrap();
        container
    }

    /// `sh -c script` in the container: its standard output, trimmed;
    /// fails the test with both outputs when it fails.
    pub fn sh(&self, script: &str) -> String {
        let output = self.try_sh(script);
        assert!(
            output.status.success(),
            "in the container: {script}\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn try_sh(&self, script: &str) -> Output {
        Command::new("docker")
            .args(["exec", &self.name, "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Writes `text` to `path` in the container.
    pub fn write(&self, path: &str, text: &str) {
        let mut child = Command::new("docker")
            .args(["exec", "-i", &self.name, "sh", "-c"])
            .arg(format!("mkdir -p \"$(dirname {path})\" && cat > {path}"))
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "writing {path}");
    }

    pub fn copy_in(&self, from: &Path, to: &str) {
        docker(&[
            "cp",
            &from.display().to_string(),
            &format!("{}:{to}", self.name),
        ])
        .unwrap();
    }

    /// `systemctl show` of `unit`'s properties.
    pub fn show(&self, unit: &str, properties: &str) -> HashMap<String, String> {
        self.sh(&format!("systemctl show -p {properties} {unit}"))
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    pub fn main_pid(&self, unit: &str) -> u32 {
        self.show(unit, "MainPID")["MainPID"].parse().unwrap()
    }

    /// The unit's journal, for a failure's message.
    pub fn journal(&self, unit: &str) -> String {
        let output = self.try_sh(&format!("journalctl -u {unit} --no-pager | tail -n 40"));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

// === Helpers ===

pub use crossfade_e2e::{docker, unique_name};

pub fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}
