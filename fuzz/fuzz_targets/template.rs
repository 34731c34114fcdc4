//! A template as the Coordinator API receives it (protobuf): the checks at
//! `Promote` never panic.
#![no_main]

use std::collections::BTreeSet;

use crossfade_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(template) = v1::Template::decode(data) else {
        return;
    };
    let allowed = BTreeSet::from(["HF_TOKEN".to_owned()]);
    let _ = crossfade_coordinator::template::validate(&template, &allowed, |name| {
        (name == "HF_TOKEN").then(|| "hf_secret".to_owned())
    });
});
