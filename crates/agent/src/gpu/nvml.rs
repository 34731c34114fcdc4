//! The real probe: NVML through nvml-wrapper. It loads `libnvidia-ml` at run
//! time, so it builds everywhere and, on a host without the driver, reports
//! NVML as unavailable (health unknown) instead of failing.
//!
//! Remapped rows are read as NVML field values (nvml-wrapper has no safe
//! call for them), and XIDs arrive on a thread that waits on an NVML event
//! set, because NVML only reports them as events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_PENDING, NVML_FI_DEV_RETIRED_PENDING,
};

use super::{GpuProbe, GpuReading, ProbeError, Visible, Xid};

/// XIDs kept per GPU (oldest dropped first).
const XIDS_KEPT: usize = 32;
/// How long the event thread waits per call, so that it notices shutdown.
const EVENT_WAIT_MS: u32 = 1_000;

/// Throttle reasons that degrade service (idle, application clocks and the
/// like are normal operation and not reported).
const DEGRADING: &[(ThrottleReasons, &str)] = &[
    (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
    (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
    (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
    (
        ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        "hw_power_brake_slowdown",
    ),
];

type XidLog = Arc<Mutex<HashMap<u32, Vec<Xid>>>>;

/// NVML, with a thread collecting XID events.
pub struct NvmlProbe {
    nvml: Arc<Nvml>,
    /// The indices of the GPUs the agent was given.
    gpus: Vec<u32>,
    /// What `engine.cuda_visible_devices` asked for, for errors.
    visible: Visible,
    xids: XidLog,
    stop: Arc<AtomicBool>,
    events: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NvmlProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlProbe").finish_non_exhaustive()
    }
}

impl NvmlProbe {
    /// Initialises NVML, finds the `visible` GPUs (by index or UUID, once:
    /// a GPU lost later keeps its index) and starts the XID thread for
    /// them. `Unavailable` on a host without the driver.
    pub fn new(visible: Visible) -> Result<Self, ProbeError> {
        let nvml = Arc::new(Nvml::init().map_err(|e| ProbeError::Unavailable(e.to_string()))?);
        let count = nvml
            .device_count()
            .map_err(|e| ProbeError::Failed(format!("counting GPUs: {e}")))?;
        let gpus: Vec<u32> = (0..count)
            .filter(|&index| {
                let uuid = nvml
                    .device_by_index(index)
                    .and_then(|d| d.uuid())
                    .unwrap_or_default();
                visible.includes(index, &uuid)
            })
            .collect();
        let xids: XidLog = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let events = {
            let (nvml, xids, stop) = (Arc::clone(&nvml), Arc::clone(&xids), Arc::clone(&stop));
            let watched = gpus.clone();
            std::thread::Builder::new()
                .name("nvml-xid-events".into())
                .spawn(move || watch_xids(&nvml, &watched, &xids, &stop))
                .map_err(|e| ProbeError::Failed(format!("starting the XID thread: {e}")))?
        };
        Ok(Self {
            nvml,
            gpus,
            visible,
            xids,
            stop,
            events: Some(events),
        })
    }

    /// The driver's version, for the agent's start-up log.
    pub fn driver_version(&self) -> Result<String, ProbeError> {
        self.nvml
            .sys_driver_version()
            .map_err(|e| ProbeError::Failed(e.to_string()))
    }

    fn read_one(&self, index: u32) -> Result<GpuReading, NvmlError> {
        let device = match self.nvml.device_by_index(index) {
            Err(NvmlError::GpuLost) => {
                return Ok(GpuReading {
                    index,
                    lost: true,
                    ..GpuReading::default()
                });
            }
            other => other?,
        };
        let memory = device.memory_info()?;
        // Optional facts: a GPU that does not support one reports `None`.
        let ecc = device
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            .ok();
        let fields = device
            .field_values_for(&[
                FieldId(NVML_FI_DEV_REMAPPED_PENDING),
                FieldId(NVML_FI_DEV_REMAPPED_FAILURE),
                FieldId(NVML_FI_DEV_RETIRED_PENDING),
            ])
            .unwrap_or_default();
        let field = |i: usize| -> Option<bool> {
            let sample = fields.get(i)?.as_ref().ok()?;
            Some(match sample.value.as_ref().ok()? {
                SampleValue::U32(v) => *v != 0,
                SampleValue::U64(v) => *v != 0,
                SampleValue::I64(v) => *v != 0,
                SampleValue::F64(v) => *v != 0.0,
            })
        };
        let throttle = device
            .current_throttle_reasons()
            .unwrap_or(ThrottleReasons::NONE);
        let xids = self
            .xids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&index)
            .cloned()
            .unwrap_or_default();
        Ok(GpuReading {
            index,
            uuid: device.uuid()?,
            name: device.name()?,
            memory_total_bytes: memory.total,
            memory_used_bytes: memory.used,
            utilization_percent: device.utilization_rates().map_or(0, |u| u.gpu),
            temperature_celsius: device.temperature(TemperatureSensor::Gpu).unwrap_or(0),
            power_milliwatts: device.power_usage().unwrap_or(0),
            ecc_volatile_uncorrected: ecc,
            row_remap_pending: field(0),
            row_remap_failed: field(1),
            retired_pages_pending: field(2),
            throttle_reasons: DEGRADING
                .iter()
                .filter(|(flag, _)| throttle.contains(*flag))
                .map(|(_, name)| (*name).to_owned())
                .collect(),
            xids,
            lost: false,
        })
    }
}

impl GpuProbe for NvmlProbe {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn read(&self) -> Result<Vec<GpuReading>, ProbeError> {
        if self.gpus.is_empty() && self.visible != Visible::default() {
            return Err(ProbeError::Failed(format!(
                "engine.cuda_visible_devices names {}, which NVML does not find",
                self.visible
            )));
        }
        self.gpus
            .iter()
            .map(|&index| {
                self.read_one(index)
                    .map_err(|e| ProbeError::Failed(format!("GPU {index}: {e}")))
            })
            .collect()
    }
}

impl Drop for NvmlProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.events.take() {
            // It wakes within EVENT_WAIT_MS.
            let _ = thread.join();
        }
    }
}

/// An event set with XID events registered on each of `gpus` that supports
/// them.
///
/// A failed registration frees the set (nvml-wrapper cannot hand it back),
/// so the set is then rebuilt with the GPUs registered so far.
fn xid_event_set<'n>(nvml: &'n Nvml, gpus: &[u32]) -> Result<EventSet<'n>, NvmlError> {
    let mut set = nvml.create_event_set()?;
    let mut registered = Vec::new();
    for &index in gpus {
        let supported = nvml
            .device_by_index(index)
            .and_then(|d| d.supported_event_types())
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if !supported {
            tracing::warn!(gpu = index, "XID events are not supported on this GPU");
            continue;
        }
        set = match register_xids(nvml, set, index) {
            Ok(set) => {
                registered.push(index);
                set
            }
            Err(e) => {
                tracing::warn!(gpu = index, error = %e, "XID events could not be registered");
                let mut fresh = nvml.create_event_set()?;
                for &i in &registered {
                    fresh = register_xids(nvml, fresh, i)?;
                }
                fresh
            }
        };
    }
    Ok(set)
}

/// Adds GPU `index`'s XID events to `set` (consumed, and freed on failure).
fn register_xids<'n>(
    nvml: &'n Nvml,
    set: EventSet<'n>,
    index: u32,
) -> Result<EventSet<'n>, NvmlError> {
    nvml.device_by_index(index)?
        .register_events(EventTypes::CRITICAL_XID_ERROR, set)
        .map_err(|e| e.error)
}

/// Waits for XID events on `gpus` until `stop`; records them by index.
fn watch_xids(nvml: &Nvml, gpus: &[u32], xids: &XidLog, stop: &AtomicBool) {
    let set = match xid_event_set(nvml, gpus) {
        Ok(set) => set,
        Err(e) => {
            tracing::warn!(error = %e, "no NVML event set: XIDs will not be reported");
            return;
        }
    };
    while !stop.load(Ordering::Relaxed) {
        match set.wait(EVENT_WAIT_MS) {
            Ok(event) => {
                let Ok(index) = event.device.index() else {
                    continue;
                };
                let code = match event.event_data {
                    Some(XidError::Value(code)) => code,
                    Some(XidError::Unknown) | None => continue,
                };
                tracing::warn!(gpu = index, xid = code, "XID event");
                let mut log = xids
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let entry = log.entry(index).or_default();
                entry.push(Xid {
                    code,
                    at: SystemTime::now(),
                });
                if entry.len() > XIDS_KEPT {
                    entry.remove(0);
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::warn!(error = %e, "waiting for XID events failed; stopping");
                return;
            }
        }
    }
}
