//! A test double of the GPU probe: tests script every condition (XIDs,
//! ECC errors, remaps, throttling, a lost GPU, no NVML at all) and the agent
//! reads it like NVML.

use std::sync::Mutex;

use super::{GpuProbe, GpuReading, ProbeError};

/// What the fake reports: GPUs, or "no NVML".
#[derive(Debug)]
pub struct FakeGpuProbe {
    state: Mutex<Option<Vec<GpuReading>>>,
}

impl FakeGpuProbe {
    /// A host with these GPUs.
    pub fn with_gpus(gpus: Vec<GpuReading>) -> Self {
        Self {
            state: Mutex::new(Some(gpus)),
        }
    }

    /// A host without NVML (no driver or no GPU).
    pub fn without_nvml() -> Self {
        Self {
            state: Mutex::new(None),
        }
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
}

impl GpuProbe for FakeGpuProbe {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn read(&self) -> Result<Vec<GpuReading>, ProbeError> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| ProbeError::Unavailable("the fake host has no NVML".into()))
    }
}
