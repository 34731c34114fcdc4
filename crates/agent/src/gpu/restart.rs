//! The agent's answer to application XIDs (DESIGN §6): the engine's GPU
//! context is unusable after one, so the engine is restarted as after a
//! crash. Repeats escalate: from [`APPLICATION_XID_ESCALATION`] within
//! [`super::XID_WINDOW`] the GPU is classed as needing a reset, the agent
//! stops restarting, and the coordinator moves the replica away.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crossfade_common::Shutdown;
use tokio::sync::watch;

use super::{APPLICATION_XID_ESCALATION, APPLICATION_XIDS, Health, HostGpus};
use crate::supervisor::Supervisor;

/// The newest XID seen on each GPU.
type Seen = BTreeMap<u32, SystemTime>;

/// Restarts the engine on each new application XID while the GPUs are not
/// past escalation. XIDs already there when the agent starts were the last
/// agent's to act on.
pub fn restart_on_application_xids(
    mut gpus: watch::Receiver<HostGpus>,
    supervisor: Supervisor,
    shutdown: &Shutdown,
) {
    let mut seen = baseline(&gpus.borrow_and_update());
    let stop = shutdown.clone();
    shutdown.spawn(async move {
        loop {
            tokio::select! {
                () = stop.triggered() => return,
                changed = gpus.changed() => if changed.is_err() { return },
            }
            let host = gpus.borrow_and_update().clone();
            let new = new_application_xids(&host, &mut seen);
            if new.is_empty() {
                continue;
            }
            let what: Vec<String> = new
                .iter()
                .map(|(gpu, code)| format!("application XID {code} on GPU {gpu}"))
                .collect();
            let what = what.join(", ");
            if host.health >= Health::ResetRequired {
                tracing::warn!(
                    "{what}: not restarting the engine, the GPU needs a reset \
                     ({APPLICATION_XID_ESCALATION} application XIDs or worse)"
                );
                continue;
            }
            match supervisor.restart(what.clone()).await {
                Ok(true) => {}
                Ok(false) => tracing::info!("{what}: no engine runs to restart"),
                Err(_) => return,
            }
        }
    });
}

/// The newest XID of each GPU in `host`.
fn baseline(host: &HostGpus) -> Seen {
    let mut seen = Seen::new();
    new_application_xids(host, &mut seen);
    seen
}

/// The application XIDs in `host` newer than `seen`, as (GPU, XID); `seen`
/// moves on to the newest XID of each GPU.
fn new_application_xids(host: &HostGpus, seen: &mut Seen) -> Vec<(u32, u64)> {
    let mut new = Vec::new();
    for (reading, _, _) in &host.gpus {
        let last = seen.get(&reading.index).copied();
        for xid in &reading.xids {
            if last.is_none_or(|last| xid.at > last) && APPLICATION_XIDS.contains(&xid.code) {
                new.push((reading.index, xid.code));
            }
        }
        if let Some(newest) = reading.xids.iter().map(|x| x.at).max() {
            seen.insert(reading.index, newest);
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::gpu::fake::FakeGpuProbe;
    use crate::gpu::{Xid, assess};

    fn host(xids: &[(u32, u64, u64)]) -> HostGpus {
        let probe = FakeGpuProbe::with_gpus((0..2).map(FakeGpuProbe::h100).collect());
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for &(gpu, code, at) in xids {
            probe.update(gpu, |g| {
                g.xids.push(Xid {
                    code,
                    at: base + Duration::from_secs(at),
                });
            });
        }
        assess(&probe, base + Duration::from_secs(60))
    }

    #[test]
    fn only_new_application_xids_count_once_each() {
        // Those present at the start are not new.
        let mut seen = baseline(&host(&[(0, 13, 1)]));
        assert!(new_application_xids(&host(&[(0, 13, 1)]), &mut seen).is_empty());
        assert_eq!(
            new_application_xids(&host(&[(0, 13, 1), (0, 31, 2), (1, 43, 2)]), &mut seen),
            [(0, 31), (1, 43)]
        );
        // Read again: nothing new.
        assert!(
            new_application_xids(&host(&[(0, 13, 1), (0, 31, 2), (1, 43, 2)]), &mut seen)
                .is_empty()
        );
        // Other XIDs are not the engine's to answer.
        assert!(
            new_application_xids(&host(&[(0, 31, 2), (0, 79, 3), (0, 63, 4)]), &mut seen)
                .is_empty()
        );
        assert_eq!(
            new_application_xids(&host(&[(0, 79, 3), (0, 68, 5)]), &mut seen),
            [(0, 68)]
        );
    }
}
