//! Scripted faults: the ways a real vLLM goes wrong, on demand.
//!
//! A fault is chosen at startup (`FAKE_VLLM_FAULT`) or at run time
//! (`POST /_fake/fault`, [`crate::Controls::set_fault`]). Only inference
//! requests (`/v1/completions`, `/v1/chat/completions`) count towards and
//! suffer request faults: health probes and metrics scrapes arrive at times
//! no test controls, so counting them would make `crash-after:N` a lottery.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// One scripted fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behave.
    #[default]
    None,
    /// Exit with status 1 halfway through the model load, before binding.
    ExitDuringLoad,
    /// Serve N inference requests; the next one kills the engine at once.
    CrashAfter(u64),
    /// Answer the next N inference requests with HTTP 500, then behave.
    Error500(u64),
    /// Accept inference requests and never answer them.
    Hang,
}

/// A `FAKE_VLLM_FAULT` / `/_fake/fault` value that names no fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown fault `{0}`: expected one of none, exit-during-load, crash-after:N, error-500:N, hang"
)]
pub struct FaultParseError(pub String);

impl FromStr for Fault {
    type Err = FaultParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || FaultParseError(s.to_owned());
        let count = |n: &str| n.trim().parse::<u64>().map_err(|_| bad());
        match s {
            "" | "none" => Ok(Fault::None),
            "exit-during-load" => Ok(Fault::ExitDuringLoad),
            "hang" => Ok(Fault::Hang),
            _ => match s.split_once(':') {
                Some(("crash-after", n)) => Ok(Fault::CrashAfter(count(n)?)),
                Some(("error-500", n)) => Ok(Fault::Error500(count(n)?)),
                _ => Err(bad()),
            },
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::None => f.write_str("none"),
            Fault::ExitDuringLoad => f.write_str("exit-during-load"),
            Fault::CrashAfter(n) => write!(f, "crash-after:{n}"),
            Fault::Error500(n) => write!(f, "error-500:{n}"),
            Fault::Hang => f.write_str("hang"),
        }
    }
}

/// What the current fault does to one arriving inference request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Serve,
    Error500,
    Crash,
    Hang,
}

/// The fault in force and how far through its script it is.
#[derive(Debug)]
pub(crate) struct FaultState {
    /// Lets the common case (no fault) skip the lock on the hot path.
    active: AtomicBool,
    script: Mutex<Script>,
}

#[derive(Debug)]
struct Script {
    fault: Fault,
    /// Inference requests seen since this fault was set.
    seen: u64,
}

impl FaultState {
    pub(crate) fn new(fault: Fault) -> Self {
        Self {
            active: AtomicBool::new(fault != Fault::None),
            script: Mutex::new(Script { fault, seen: 0 }),
        }
    }

    /// Replaces the fault; its count starts again from zero.
    pub(crate) fn set(&self, fault: Fault) {
        let mut script = self.lock();
        *script = Script { fault, seen: 0 };
        self.active.store(fault != Fault::None, Ordering::Release);
    }

    pub(crate) fn get(&self) -> Fault {
        if !self.active.load(Ordering::Acquire) {
            return Fault::None;
        }
        self.lock().fault
    }

    /// Decides the fate of one arriving inference request.
    pub(crate) fn on_request(&self) -> Action {
        if !self.active.load(Ordering::Acquire) {
            return Action::Serve;
        }
        let mut script = self.lock();
        let seen = script.seen;
        script.seen = seen.saturating_add(1);
        match script.fault {
            // Only meaningful before the port opens; once serving it is inert.
            Fault::None | Fault::ExitDuringLoad => Action::Serve,
            Fault::Hang => Action::Hang,
            Fault::CrashAfter(n) if seen >= n => Action::Crash,
            Fault::CrashAfter(_) => Action::Serve,
            Fault::Error500(n) if seen < n => {
                if seen + 1 == n {
                    // Script done: clear it so `fault()` reports the truth.
                    script.fault = Fault::None;
                    self.active.store(false, Ordering::Release);
                }
                Action::Error500
            }
            Fault::Error500(_) => Action::Serve,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        // The critical sections cannot panic, but poisoning must not take the
        // server down with it either way.
        self.script
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault_and_round_trips() {
        for (text, fault) in [
            ("none", Fault::None),
            ("", Fault::None),
            ("exit-during-load", Fault::ExitDuringLoad),
            ("crash-after:3", Fault::CrashAfter(3)),
            ("error-500:2", Fault::Error500(2)),
            ("hang", Fault::Hang),
        ] {
            assert_eq!(text.parse::<Fault>(), Ok(fault), "{text}");
            if !text.is_empty() {
                assert_eq!(fault.to_string(), text);
            }
        }
        assert_eq!(" error-500:1\n".parse::<Fault>(), Ok(Fault::Error500(1)));
    }

    #[test]
    fn rejects_malformed_faults() {
        for text in [
            "crash",
            "crash-after",
            "crash-after:",
            "crash-after:x",
            "error-500:-1",
            "boom:1",
        ] {
            let err = text.parse::<Fault>().expect_err(text);
            assert!(err.to_string().contains("crash-after:N"), "{err}");
        }
    }

    #[test]
    fn error_500_fails_n_requests_then_serves() {
        let state = FaultState::new(Fault::Error500(2));
        assert_eq!(state.on_request(), Action::Error500);
        assert_eq!(state.on_request(), Action::Error500);
        assert_eq!(state.get(), Fault::None);
        assert_eq!(state.on_request(), Action::Serve);
    }

    #[test]
    fn crash_after_serves_n_then_crashes() {
        let state = FaultState::new(Fault::CrashAfter(1));
        assert_eq!(state.on_request(), Action::Serve);
        assert_eq!(state.on_request(), Action::Crash);
        state.set(Fault::CrashAfter(0));
        assert_eq!(state.on_request(), Action::Crash);
        state.set(Fault::None);
        assert_eq!(state.on_request(), Action::Serve);
    }
}
