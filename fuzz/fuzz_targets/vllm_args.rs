//! `VLLM_ARGS` splitting and the agent's checks of the flags it owns: no
//! input panics, and a spelling of a flag the agent owns never reaches a
//! launch plan.
#![no_main]

use crossfade_agent::config::Engine;
use crossfade_agent::supervisor;
use crossfade_proto::v1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(args) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crossfade_common::vllm_args::redact(args);
    let spec = v1::EngineSpec {
        deployment_id: "dep-1".into(),
        endpoint: "chat".into(),
        template: Some(v1::Template {
            model: "org/model".into(),
            vllm_args: args.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let Ok(plan) = supervisor::plan(&Engine::default(), &spec, "engine.log".into()) else {
        return;
    };
    // What the agent owns appears once, as the agent wrote it: no other
    // spelling of it got through.
    for owned in ["--port", "--host"] {
        let named = plan
            .args
            .iter()
            .filter(|word| crossfade_common::vllm_args::names(word, owned))
            .count();
        assert_eq!(named, 1, "{owned}: {:?}", plan.args);
    }
});
