//! The three programs' configuration files: parsing and validation never
//! panic, whatever the TOML.
#![no_main]

use crossfade_common::config::Validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = toml::from_str::<crossfade_router::config::Config>(text) {
        let _ = config.validate();
    }
    if let Ok(config) = toml::from_str::<crossfade_agent::config::Config>(text) {
        let _ = config.validate();
    }
    if let Ok(config) = toml::from_str::<crossfade_coordinator::config::Config>(text) {
        let _ = config.validate();
    }
});
