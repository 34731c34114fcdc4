//! GPU health: a [`GpuProbe`] reads each GPU's facts (NVML on a real host,
//! [`fake::FakeGpuProbe`] in tests), and [`classify`] turns them into a
//! health class with reasons, as DESIGN.md §6 specifies:
//!
//! - unhealthy (drain the worker): fatal XIDs (48, 64, 74, 79, 95), a lost
//!   GPU, uncorrected ECC errors, a failed row remap;
//! - reset required (when convenient): XID 63 or 94, a pending row remap,
//!   pages pending retirement, repeated application XIDs;
//! - warning: application XIDs (13, 31, 43, 45, 68: restart the engine),
//!   other XIDs, hardware or thermal slowdown;
//! - unknown, never healthy, when there is no NVML (no driver, no GPU).

pub mod fake;
pub mod nvml;
pub mod restart;

use std::time::{Duration, SystemTime};

use crossfade_proto::v1;

/// XIDs after which the GPU must not serve.
pub const FATAL_XIDS: &[u64] = &[48, 64, 74, 79, 95];
/// XIDs that ask for a GPU reset when convenient.
pub const RESET_XIDS: &[u64] = &[63, 94];
/// XIDs caused by the application (the engine): restart it.
pub const APPLICATION_XIDS: &[u64] = &[13, 31, 43, 45, 68];
/// Application XIDs within [`XID_WINDOW`] from which a reset is asked for:
/// restarting the engine has not helped.
pub const APPLICATION_XID_ESCALATION: usize = 3;
/// How long an XID counts towards the classification.
pub const XID_WINDOW: Duration = Duration::from_secs(600);

/// The GPUs the agent was given: `engine.cuda_visible_devices` read the
/// way CUDA reads `CUDA_VISIBLE_DEVICES` (indices, or `GPU-` UUIDs or
/// their prefixes, comma-separated; empty: every GPU). The probe reports
/// only these, and the engine's container gets exactly these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visible(Option<Vec<String>>);

impl Visible {
    /// From `engine.cuda_visible_devices`.
    pub fn parse(devices: &str) -> Self {
        let entries: Vec<String> = devices
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        Self((!entries.is_empty()).then_some(entries))
    }

    /// The GPUs named, as given (none: every GPU).
    pub fn entries(&self) -> &[String] {
        self.0.as_deref().unwrap_or_default()
    }

    /// Whether GPU `index` (with `uuid`, empty when unreadable) is one of
    /// them.
    pub fn includes(&self, index: u32, uuid: &str) -> bool {
        let Some(entries) = &self.0 else {
            return true;
        };
        entries.iter().any(|entry| match entry.parse::<u32>() {
            Ok(n) => n == index,
            Err(_) => !uuid.is_empty() && uuid.starts_with(entry.as_str()),
        })
    }
}

impl std::fmt::Display for Visible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("every GPU"),
            Some(entries) => write!(f, "GPUs {}", entries.join(",")),
        }
    }
}

/// What a probe read from one GPU. Facts a GPU does not support are `None`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GpuReading {
    /// NVML index.
    pub index: u32,
    /// `GPU-...` UUID.
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Framebuffer memory, total.
    pub memory_total_bytes: u64,
    /// Framebuffer memory, used.
    pub memory_used_bytes: u64,
    /// Utilisation, percent.
    pub utilization_percent: u32,
    /// Core temperature, °C.
    pub temperature_celsius: u32,
    /// Power draw, mW.
    pub power_milliwatts: u32,
    /// Volatile uncorrected ECC errors (since boot).
    pub ecc_volatile_uncorrected: Option<u64>,
    /// A row remap waits for a reset.
    pub row_remap_pending: Option<bool>,
    /// A row remap failed.
    pub row_remap_failed: Option<bool>,
    /// Pages wait for retirement (GPUs before row remapping).
    pub retired_pages_pending: Option<bool>,
    /// Active throttle reasons that degrade service, NVML's names.
    pub throttle_reasons: Vec<String>,
    /// XID events seen on this GPU, oldest first.
    pub xids: Vec<Xid>,
    /// The GPU fell off the bus (NVML answers "GPU is lost").
    pub lost: bool,
}

/// One XID event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Xid {
    /// The XID number.
    pub code: u64,
    /// When it was received.
    pub at: SystemTime,
}

/// A GPU health class, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Health {
    /// Not known (no NVML); never taken as healthy.
    Unknown,
    /// Nothing found.
    Healthy,
    /// Degraded but serving.
    Warning,
    /// Wants a reset when convenient.
    ResetRequired,
    /// Must not serve.
    Unhealthy,
}

impl From<Health> for v1::GpuHealth {
    fn from(health: Health) -> Self {
        match health {
            Health::Unknown => Self::Unknown,
            Health::Healthy => Self::Healthy,
            Health::Warning => Self::Warning,
            Health::ResetRequired => Self::ResetRequired,
            Health::Unhealthy => Self::Unhealthy,
        }
    }
}

/// Why a probe could not read the GPUs.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No NVML on this host (no driver, no library, no GPU).
    #[error("NVML is not available: {0}")]
    Unavailable(String),
    /// NVML is there but a read failed.
    #[error("reading the GPUs failed: {0}")]
    Failed(String),
}

/// Reads the GPUs of this host.
pub trait GpuProbe: Send + Sync {
    /// `nvml`, `fake` or `none`, as `WorkerStatus.gpu_probe` reports it.
    fn kind(&self) -> &'static str;

    /// Every GPU's facts now.
    fn read(&self) -> Result<Vec<GpuReading>, ProbeError>;
}

/// A probe that cannot read any GPU: NVML failed to load, or the
/// configuration turned the probe off. Reads as `unknown`, never `healthy`.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// The probe that is missing (`nvml`, `none`).
    pub kind: &'static str,
    /// Why.
    pub reason: String,
}

impl GpuProbe for Unavailable {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn read(&self) -> Result<Vec<GpuReading>, ProbeError> {
        Err(ProbeError::Unavailable(self.reason.clone()))
    }
}

/// The class of one GPU at `now`, and the reasons, one phrase each.
pub fn classify(gpu: &GpuReading, now: SystemTime) -> (Health, Vec<String>) {
    let mut health = Health::Healthy;
    let mut reasons = Vec::new();
    let mut note = |h: Health, reason: String| {
        health = health.max(h);
        reasons.push(reason);
    };
    if gpu.lost {
        note(Health::Unhealthy, "GPU is lost (fell off the bus)".into());
    }
    if let Some(n) = gpu.ecc_volatile_uncorrected.filter(|&n| n > 0) {
        note(Health::Unhealthy, format!("{n} uncorrected ECC errors"));
    }
    if gpu.row_remap_failed == Some(true) {
        note(Health::Unhealthy, "row remapping failed".into());
    }
    if gpu.row_remap_pending == Some(true) {
        note(Health::ResetRequired, "row remap pending a reset".into());
    }
    if gpu.retired_pages_pending == Some(true) {
        note(Health::ResetRequired, "pages pending retirement".into());
    }
    let recent: Vec<u64> = gpu
        .xids
        .iter()
        .filter(|x| {
            now.duration_since(x.at)
                .map_or(true, |age| age <= XID_WINDOW)
        })
        .map(|x| x.code)
        .collect();
    let mut application = 0;
    for &code in &recent {
        if FATAL_XIDS.contains(&code) {
            note(Health::Unhealthy, format!("fatal XID {code}"));
        } else if RESET_XIDS.contains(&code) {
            note(
                Health::ResetRequired,
                format!("XID {code} asks for a reset"),
            );
        } else if APPLICATION_XIDS.contains(&code) {
            application += 1;
            note(
                Health::Warning,
                format!("application XID {code} (restart the engine)"),
            );
        } else {
            note(Health::Warning, format!("XID {code}"));
        }
    }
    if application >= APPLICATION_XID_ESCALATION {
        note(
            Health::ResetRequired,
            format!("{application} application XIDs within {XID_WINDOW:?}: restarts did not help"),
        );
    }
    for reason in &gpu.throttle_reasons {
        note(Health::Warning, format!("throttled: {reason}"));
    }
    reasons.dedup();
    (health, reasons)
}

/// What a probe found on the whole host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostGpus {
    /// The probe's kind.
    pub probe: &'static str,
    /// Each GPU with its class and reasons.
    pub gpus: Vec<(GpuReading, Health, Vec<String>)>,
    /// The worst class (unknown when there are no GPUs or no NVML).
    pub health: Health,
    /// Why the probe could not read, if it could not.
    pub error: Option<String>,
}

/// Reads and classifies every GPU.
pub fn assess(probe: &dyn GpuProbe, now: SystemTime) -> HostGpus {
    match probe.read() {
        Ok(readings) => {
            let gpus: Vec<_> = readings
                .into_iter()
                .map(|r| {
                    let (health, reasons) = classify(&r, now);
                    (r, health, reasons)
                })
                .collect();
            let health = gpus
                .iter()
                .map(|(_, h, _)| *h)
                .max()
                .unwrap_or(Health::Unknown);
            HostGpus {
                probe: probe.kind(),
                gpus,
                health,
                error: None,
            }
        }
        Err(e) => HostGpus {
            probe: probe.kind(),
            gpus: Vec::new(),
            health: Health::Unknown,
            error: Some(e.to_string()),
        },
    }
}

impl HostGpus {
    /// The GPUs in their wire form, for `WorkerStatus.gpus`.
    pub fn to_proto(&self) -> Vec<v1::GpuDevice> {
        self.gpus
            .iter()
            .map(|(r, health, reasons)| v1::GpuDevice {
                index: r.index,
                uuid: r.uuid.clone(),
                name: r.name.clone(),
                memory_total_bytes: r.memory_total_bytes,
                memory_used_bytes: r.memory_used_bytes,
                utilization_percent: r.utilization_percent,
                temperature_celsius: r.temperature_celsius,
                power_milliwatts: r.power_milliwatts,
                ecc_volatile_uncorrected: r.ecc_volatile_uncorrected.unwrap_or(0),
                row_remap_pending: r.row_remap_pending.unwrap_or(false),
                row_remap_failed: r.row_remap_failed.unwrap_or(false),
                retired_pages_pending: u32::from(r.retired_pages_pending.unwrap_or(false)),
                throttle_reasons: r.throttle_reasons.clone(),
                recent_xids: r
                    .xids
                    .iter()
                    .map(|x| v1::XidEvent {
                        xid: u32::try_from(x.code).unwrap_or(u32::MAX),
                        at: Some(prost_types::Timestamp::from(x.at)),
                    })
                    .collect(),
                health: v1::GpuHealth::from(*health) as i32,
                health_reasons: reasons.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
