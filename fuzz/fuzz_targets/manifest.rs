//! The manifest parser (every generation a loader opens) on arbitrary bytes:
//! never panics, and what it accepts survives a write/read round trip
//! unchanged, so the agent never publishes a manifest a loader reads back
//! differently.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zerocopy_api::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::from_json(data) else {
        return;
    };
    let written = serde_json::to_vec(&manifest).expect("an accepted manifest serialises");
    let again = Manifest::from_json(&written).expect("a written manifest parses");
    assert_eq!(manifest, again);
});
