//! What the benchmark reads from and does to the machine: CPU time of one
//! core from `/proc/stat`, resident memory of a process tree, pinning,
//! the file-descriptor limit, ports, and child processes that stop with
//! their guard.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// `/proc/stat` counts in USER_HZ ticks, which Linux fixes at 100 a second
/// for user space whatever the kernel's own tick.
const USER_HZ: f64 = 100.0;

/// Idle ticks (idle and iowait) of one core.
fn idle_ticks(core: usize) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_core(&stat, core).map(|(busy, total)| total - busy)
}

/// Busy and total ticks of a core's line in `/proc/stat`.
fn parse_core(stat: &str, core: usize) -> Option<(u64, u64)> {
    let name = format!("cpu{core}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user).
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let total = busy + get(3) + get(4);
    Some((busy, total))
}

/// Measures the busy time of the core the system under test runs on.
///
/// Busy time is the wall-clock time elapsed minus the core's idle time.
/// The kernel (with `NO_HZ`) measures idle time exactly on idle entry and
/// exit, whereas the user and system columns are sampled at each tick and,
/// over a few seconds of short bursts, are off by tens of percent.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    core: usize,
}

/// A measurement under way.
pub struct CpuUsage {
    core: usize,
    started: Instant,
    idle: u64,
}

impl CpuMeter {
    /// A meter of `core`.
    pub fn new(core: usize) -> Self {
        Self { core }
    }

    /// Starts measuring.
    pub fn start(&self) -> CpuUsage {
        CpuUsage {
            core: self.core,
            started: Instant::now(),
            idle: idle_ticks(self.core).unwrap_or(0),
        }
    }
}

impl CpuUsage {
    /// Microseconds the core was busy since the start.
    pub fn busy_us(&self) -> f64 {
        let elapsed = self.started.elapsed().as_secs_f64() * 1e6;
        let idle = idle_ticks(self.core).map_or(0, |now| now.saturating_sub(self.idle));
        (elapsed - idle as f64 / USER_HZ * 1e6).max(0.0)
    }
}

/// Resident memory, in KiB, of `pid` and every process below it.
pub fn tree_rss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut stack = vec![pid];
    let mut seen = 0;
    while let Some(pid) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                stack.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    total
}

/// Pins this process (and what it starts, unless told otherwise) to `core`.
pub fn pin_self(core: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(core)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// Raises the soft file-descriptor limit to the hard one; returns it.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(free_ports::<1>()?[0])
}

/// `N` distinct loopback ports nothing listens on now (held together while
/// they are picked, so none is handed out twice).
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "nothing listens on port {port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A command run on `core` (by `taskset`).
pub fn on_core(core: usize, program: &str) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(core.to_string()).arg(program);
    command
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 5 s) with
/// its guard, with every process below it.
pub struct Guard {
    name: String,
    child: Child,
}

impl Guard {
    /// Starts `command`, its output appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &std::path::Path) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        command
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {name}: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => anyhow::bail!("{} exited: {status}", self.name),
            None => Ok(()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let mut tree = Vec::new();
        let mut stack = vec![self.child.id()];
        while let Some(pid) = stack.pop() {
            tree.push(pid);
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            stack.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        let signal_all = |signal| {
            for &pid in &tree {
                let _ = kill(Pid::from_raw(pid as i32), signal);
            }
        };
        signal_all(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_)))
                && tree
                    .iter()
                    .all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_all(Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_counts_user_system_and_interrupts_not_idle() {
        let stat =
            "cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 10 0 20 500 9 1 2 3 0 0\ncpu1 7 1 5 100 0 0 0 0 0 0\n";
        assert_eq!(parse_core(stat, 0), Some((36, 545)));
        assert_eq!(parse_core(stat, 1), Some((13, 113)));
        assert_eq!(parse_core(stat, 2), None);
    }

    #[test]
    fn this_process_has_resident_memory() {
        assert!(tree_rss_kib(std::process::id()) > 0);
    }
}
