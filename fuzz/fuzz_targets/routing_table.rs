//! A routing table as it arrives from the wire (protobuf): decoding and
//! building it never panics, and a table that builds can be swapped in.
#![no_main]

use crossfade_proto::v1;
use crossfade_router::table::Routes;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(table) = v1::RoutingTable::decode(data) else {
        return;
    };
    if let Ok(routes) = Routes::new(&table) {
        let _ = routes.apply_from_config(&table);
    }
});
