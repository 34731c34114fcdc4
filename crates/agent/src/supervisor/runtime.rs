//! Where the engine runs: the [`Runtime`] trait, and the process runtime
//! (the container runtime is [`super::container`]).
//!
//! A process engine runs in its own process group with its output in a
//! log file under the state directory, so it outlives the agent: a
//! SIGINT at the agent's terminal does not reach it, and no pipe breaks
//! when the agent dies. Its pid and start time (from `/proc`) are what a
//! restarted agent checks before it adopts the engine.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// What to run.
#[derive(Clone)]
pub struct LaunchPlan {
    /// The executable: `vllm`, or `fake-vllm`.
    pub program: String,
    /// Its arguments (see [`super::command::engine_args`]).
    pub args: Vec<String>,
    /// Environment for the engine, over the agent's own. Values may be
    /// secrets: [`fmt::Debug`] prints names only.
    pub env: Vec<(String, String)>,
    /// Where its standard output and error go.
    pub log_path: PathBuf,
    /// The port it listens on.
    pub port: u16,
    /// The image (container runtime).
    pub image: String,
    /// Labels naming the deployment (container runtime).
    pub labels: Vec<(String, String)>,
    /// The GPUs it is given (`engine.cuda_visible_devices`; empty: all).
    pub gpus: String,
}

impl fmt::Debug for LaunchPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        // Credentials in the arguments (`--api-key`) are hidden.
        let args = crossfade_common::vllm_args::redact_words(&self.args);
        f.debug_struct("LaunchPlan")
            .field("program", &self.program)
            .field("args", &args)
            .field("env", &names)
            .field("log_path", &self.log_path)
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

/// How an engine ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Its exit code, when it exited (rather than was killed) and the agent
    /// could see it (an adopted engine's code is its old parent's to read).
    pub code: Option<i32>,
    /// The signal that killed it.
    pub signal: Option<i32>,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(signal) => write!(f, "killed by {signal}"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            (None, None) => f.write_str("exited (status unknown to this agent)"),
        }
    }
}

/// Who an engine is, as the state file records it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Process id (for a container, its main process's on the host, once
    /// it runs; 0 before).
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22):
    /// with the pid, it tells our engine from a reused pid.
    pub start_ticks: u64,
    /// The container's name (empty for a process).
    pub container: String,
}

/// A running engine.
pub trait Engine: Send + fmt::Debug {
    /// Who it is.
    fn identity(&self) -> Identity;
    /// Whether it has ended; never blocks.
    fn try_exit(&mut self) -> Option<Exit>;
    /// Asks it to stop (SIGTERM to the engine's main process: vLLM then
    /// stops its workers, after `--shutdown-timeout` when given).
    fn terminate(&self);
    /// Stops it now, with everything it started (SIGKILL to its group).
    fn kill(&self);
    /// What the runtime still does before the engine runs (a container's
    /// image pull, with its progress), for the `LAUNCHING` phase's detail;
    /// `None` once the engine runs.
    fn preparing(&self) -> Option<String> {
        None
    }
}

/// Why an engine could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Its log file could not be opened.
    #[error("cannot open the engine's log {path}: {source}")]
    Log {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The executable could not be run.
    #[error("cannot run `{program}`: {source}")]
    Spawn {
        /// The executable.
        program: String,
        /// Why (not found, not executable).
        source: std::io::Error,
    },
}

/// Starts engines, and finds those started before.
pub trait Runtime: Send + Sync + fmt::Debug {
    /// `process` or `container`.
    fn kind(&self) -> &'static str;
    /// Starts an engine.
    fn launch(&self, plan: &LaunchPlan) -> Result<Box<dyn Engine>, LaunchError>;
    /// The engine an earlier agent started, if it still runs as recorded.
    fn adopt(&self, identity: &Identity) -> Option<Box<dyn Engine>>;
}

/// Engines as child processes.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessRuntime;

impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn launch(&self, plan: &LaunchPlan) -> Result<Box<dyn Engine>, LaunchError> {
        let log = private_log(&plan.log_path).map_err(|source| LaunchError::Log {
            path: plan.log_path.clone(),
            source,
        })?;
        let log_err = log.try_clone().map_err(|source| LaunchError::Log {
            path: plan.log_path.clone(),
            source,
        })?;
        let child = Command::new(&plan.program)
            .args(&plan.args)
            // systemd's notification and watchdog are the agent's, not
            // the engine's.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(plan.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: signals for the agent's group (a
            // terminal's SIGINT) do not reach it, and a stop can signal
            // everything it started at once.
            .process_group(0)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                program: plan.program.clone(),
                source,
            })?;
        let pid = child.id();
        // A process that exited at once has no stat left; 0 never matches.
        let start_ticks = start_ticks(pid).unwrap_or(0);
        Ok(Box::new(ProcessEngine {
            identity: Identity {
                pid,
                start_ticks,
                container: String::new(),
            },
            child: Some(child),
        }))
    }

    fn adopt(&self, identity: &Identity) -> Option<Box<dyn Engine>> {
        (start_ticks(identity.pid)? == identity.start_ticks).then(|| {
            Box::new(ProcessEngine {
                identity: identity.clone(),
                child: None,
            }) as Box<dyn Engine>
        })
    }
}

/// An engine process: our child, or adopted from an earlier agent.
#[derive(Debug)]
struct ProcessEngine {
    identity: Identity,
    /// `None` when adopted: it is not our child, so its end is seen in
    /// `/proc`, without an exit code.
    child: Option<Child>,
}

impl ProcessEngine {
    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.identity.pid).unwrap_or(i32::MAX))
    }
}

impl Engine for ProcessEngine {
    fn identity(&self) -> Identity {
        self.identity.clone()
    }

    fn try_exit(&mut self) -> Option<Exit> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(Exit {
                    code: status.code(),
                    signal: status.signal(),
                }),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, pid = self.identity.pid, "cannot wait for the engine");
                    None
                }
            },
            None => (start_ticks(self.identity.pid) != Some(self.identity.start_ticks)).then_some(
                Exit {
                    code: None,
                    signal: None,
                },
            ),
        }
    }

    fn terminate(&self) {
        if let Err(e) = kill(self.pid(), Signal::SIGTERM) {
            tracing::debug!(error = %e, pid = self.identity.pid, "SIGTERM to the engine failed");
        }
    }

    fn kill(&self) {
        // The group is the engine's own (process_group(0) at launch).
        if let Err(e) = killpg(self.pid(), Signal::SIGKILL) {
            tracing::debug!(error = %e, pid = self.identity.pid, "SIGKILL to the engine's group failed");
        }
    }
}

/// A process's start time in clock ticks since boot, while it runs (a
/// zombie has ended).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; what
    // follows the last `)` is space-separated: field 3 (state) onwards.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    if matches!(fields.first(), Some(&"Z" | &"X")) {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// The engine's log, emptied, readable by the agent's user only (an engine
/// may print its secrets).
pub(super) fn private_log(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // A file from an older agent keeps its mode: narrow it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// The last `lines` lines of a log file, read from its end (a log can be
/// large; at most 64 KiB are read).
pub fn log_tail(path: &Path, lines: usize) -> Vec<String> {
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(WINDOW);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.take(WINDOW).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        // The first line was cut by the window.
        all.remove(0);
    }
    let skip = all.len().saturating_sub(lines);
    all[skip..].iter().map(|line| (*line).to_owned()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn our_own_start_time_is_read_and_a_missing_pid_has_none() {
        let me = start_ticks(std::process::id()).unwrap();
        assert!(me > 0);
        assert_eq!(start_ticks(std::process::id()), Some(me));
        // Above the kernel's pid_max limit (4194304): never a process.
        assert_eq!(start_ticks(4_194_305), None);
    }

    #[test]
    fn a_launched_engine_is_seen_exiting_with_its_code_and_log() {
        let dir = std::env::temp_dir().join(format!("crossfade-runtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plan = LaunchPlan {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                "for i in 1 2 3 4 5; do echo line $i; done; echo $SECRET_NAME_ONLY >&2; exit 7"
                    .into(),
                "--api-key".into(),
                "sk-flag-value".into(),
                "--hf-token=hf_flag_value".into(),
            ],
            env: vec![("SECRET_NAME_ONLY".into(), "hunter2".into())],
            log_path: dir.join("engine.log"),
            port: 0,
            image: String::new(),
            labels: Vec::new(),
            gpus: String::new(),
        };
        let printed = format!("{plan:?}");
        assert!(
            !printed.contains("hunter2")
                && !printed.contains("sk-flag-value")
                && !printed.contains("hf_flag_value"),
            "{printed}"
        );
        assert!(printed.contains("\"--hf-token=<redacted>\""), "{printed}");
        let mut engine = ProcessRuntime.launch(&plan).unwrap();
        let exit = (0..500)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                engine.try_exit()
            })
            .unwrap();
        assert_eq!(
            exit,
            Exit {
                code: Some(7),
                signal: None
            }
        );
        assert_eq!(exit.to_string(), "exit code 7");
        assert_eq!(log_tail(&plan.log_path, 3), ["line 4", "line 5", "hunter2"]);
        // What the engine prints stays in a log only the agent's user reads.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&plan.log_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_adopted_engine_is_the_same_process_or_nothing() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let identity = Identity {
            pid,
            start_ticks: start_ticks(pid).unwrap(),
            container: String::new(),
        };
        let stale = Identity {
            start_ticks: identity.start_ticks + 1,
            ..identity.clone()
        };
        assert!(
            ProcessRuntime.adopt(&stale).is_none(),
            "a reused pid is not ours"
        );
        let mut adopted = ProcessRuntime.adopt(&identity).unwrap();
        assert_eq!(adopted.try_exit(), None);
        adopted.terminate();
        child.wait().unwrap();
        assert_eq!(
            adopted.try_exit(),
            Some(Exit {
                code: None,
                signal: None
            })
        );
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let plan = LaunchPlan {
            program: "/nonexistent/vllm".into(),
            args: Vec::new(),
            env: Vec::new(),
            log_path: std::env::temp_dir()
                .join(format!("crossfade-missing-{}.log", std::process::id())),
            port: 0,
            image: String::new(),
            labels: Vec::new(),
            gpus: String::new(),
        };
        let error = ProcessRuntime.launch(&plan).unwrap_err().to_string();
        assert!(
            error.starts_with("cannot run `/nonexistent/vllm`: "),
            "{error}"
        );
        let _ = std::fs::remove_file(&plan.log_path);
    }
}
