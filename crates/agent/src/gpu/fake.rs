//! A test double of the GPU probe: tests script every condition (XIDs,
//! ECC errors, remaps, throttling, a lost GPU, no NVML at all) and the agent
//! reads it like NVML.
//!
//! A running agent's fake is scripted through a file (`gpu.fake_faults`),
//! read at every poll: a JSON object from GPU index to the faults it shows,
//! for example
//!
//! ```json
//! {"0": {"xids": [13], "throttle_reasons": ["hw_thermal_slowdown"]},
//!  "1": {"ecc_volatile_uncorrected": 2, "lost": false}}
//! ```
//!
//! `xids` lists every XID so far: one appended to the list is a new event,
//! stamped when the probe first reads it. A missing file is no fault; a
//! file that does not parse is a failed read (health `unknown`, the error
//! in the worker's status).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use super::{GpuProbe, GpuReading, ProbeError, Visible, Xid};

/// What the fake reports: GPUs, or "no NVML".
#[derive(Debug)]
pub struct FakeGpuProbe {
    state: Mutex<Option<Vec<GpuReading>>>,
    visible: Visible,
    faults: Option<PathBuf>,
    /// The fault file's XIDs by GPU, as first read.
    seen: Mutex<BTreeMap<u32, Vec<Xid>>>,
}

/// The faults one GPU shows, from the fault file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Faults {
    xids: Vec<u64>,
    ecc_volatile_uncorrected: u64,
    lost: bool,
    row_remap_pending: bool,
    row_remap_failed: bool,
    retired_pages_pending: bool,
    throttle_reasons: Vec<String>,
}

impl FakeGpuProbe {
    /// A host with these GPUs.
    pub fn with_gpus(gpus: Vec<GpuReading>) -> Self {
        Self {
            state: Mutex::new(Some(gpus)),
            visible: Visible::default(),
            faults: None,
            seen: Mutex::default(),
        }
    }

    /// A host without NVML (no driver or no GPU).
    pub fn without_nvml() -> Self {
        Self {
            state: Mutex::new(None),
            ..Self::with_gpus(Vec::new())
        }
    }

    /// Reports only the GPUs the agent was given.
    #[must_use]
    pub fn visible(mut self, visible: Visible) -> Self {
        self.visible = visible;
        self
    }

    /// Reads faults from `path` at every read.
    #[must_use]
    pub fn faults_from(mut self, path: PathBuf) -> Self {
        self.faults = Some(path);
        self
    }

    /// A healthy GPU as an H100 would report it, for tests to alter.
    pub fn h100(index: u32) -> GpuReading {
        GpuReading {
            index,
            uuid: format!("GPU-00000000-0000-0000-0000-{index:012}"),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
            memory_used_bytes: 1 << 30,
            utilization_percent: 0,
            temperature_celsius: 35,
            power_milliwatts: 70_000,
            ecc_volatile_uncorrected: Some(0),
            row_remap_pending: Some(false),
            row_remap_failed: Some(false),
            retired_pages_pending: Some(false),
            throttle_reasons: Vec::new(),
            xids: Vec::new(),
            lost: false,
        }
    }

    /// Changes GPU `index` (no-op without NVML or without that GPU).
    pub fn update(&self, index: u32, change: impl FnOnce(&mut GpuReading)) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(gpu) = state.iter_mut().flatten().find(|g| g.index == index) {
            change(gpu);
        }
    }

    /// The fault file's faults by GPU; none without a file.
    fn read_faults(&self) -> Result<BTreeMap<u32, Faults>, ProbeError> {
        let Some(path) = &self.faults else {
            return Ok(BTreeMap::new());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => {
                return Err(ProbeError::Failed(format!(
                    "gpu.fake_faults {}: {e}",
                    path.display()
                )));
            }
        };
        serde_json::from_str(&text)
            .map_err(|e| ProbeError::Failed(format!("gpu.fake_faults {}: {e}", path.display())))
    }

    /// Applies `faults` to `gpu`; new XIDs are stamped `now`.
    fn apply(&self, gpu: &mut GpuReading, faults: &Faults, now: SystemTime) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = seen.entry(gpu.index).or_default();
        let extends = seen.len() <= faults.xids.len()
            && seen.iter().zip(&faults.xids).all(|(x, &c)| x.code == c);
        if !extends {
            // The file was rewritten: its XIDs start again.
            seen.clear();
        }
        let start = seen.len();
        seen.extend(
            faults.xids[start..]
                .iter()
                .map(|&code| Xid { code, at: now }),
        );
        gpu.xids.extend(seen.iter().copied());
        if faults.ecc_volatile_uncorrected > 0 {
            gpu.ecc_volatile_uncorrected = Some(faults.ecc_volatile_uncorrected);
        }
        gpu.lost |= faults.lost;
        for (flag, set) in [
            (&mut gpu.row_remap_pending, faults.row_remap_pending),
            (&mut gpu.row_remap_failed, faults.row_remap_failed),
            (&mut gpu.retired_pages_pending, faults.retired_pages_pending),
        ] {
            if set {
                *flag = Some(true);
            }
        }
        gpu.throttle_reasons
            .extend(faults.throttle_reasons.iter().cloned());
    }
}

impl GpuProbe for FakeGpuProbe {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn read(&self) -> Result<Vec<GpuReading>, ProbeError> {
        let gpus = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| ProbeError::Unavailable("the fake host has no NVML".into()))?;
        let faults = self.read_faults()?;
        let now = SystemTime::now();
        Ok(gpus
            .into_iter()
            .filter(|g| self.visible.includes(g.index, &g.uuid))
            .map(|mut gpu| {
                if let Some(faults) = faults.get(&gpu.index) {
                    self.apply(&mut gpu, faults, now);
                }
                gpu
            })
            .collect())
    }
}
