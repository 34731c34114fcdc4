//! Prints what the agent's NVML probe reads and how it classifies it, as
//! JSON: `cargo run --example gpu_probe -p crossfade-agent [DEVICES]` on a
//! GPU host, where DEVICES is read as `engine.cuda_visible_devices` (every
//! GPU when absent).

use std::time::SystemTime;

use crossfade_agent::gpu::{self, GpuProbe, Visible, nvml::NvmlProbe};

fn main() {
    let visible = Visible::parse(&std::env::args().nth(1).unwrap_or_default());
    let probe = match NvmlProbe::new(visible) {
        Ok(probe) => probe,
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"probe": "nvml", "health": "Unknown", "error": e.to_string()})
            );
            return;
        }
    };
    let driver = probe.driver_version().unwrap_or_else(|e| e.to_string());
    let host = gpu::assess(&probe as &dyn GpuProbe, SystemTime::now());
    let gpus: Vec<_> = host
        .gpus
        .iter()
        .map(|(reading, health, reasons)| {
            serde_json::json!({"reading": reading, "health": health, "reasons": reasons})
        })
        .collect();
    let report = serde_json::json!({
        "probe": host.probe,
        "driver": driver,
        "health": host.health,
        "error": host.error,
        "gpus": gpus,
    });
    match serde_json::to_string_pretty(&report) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("cannot print the report: {e}"),
    }
}
