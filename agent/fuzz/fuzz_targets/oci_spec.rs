//! The OCI spec of a CreateContainer request, as JSON bytes (seeds: `specs/`, real specs of
//! `ctr` and CRI), checked and turned into the container's configuration.
#![no_main]

use husk_agent::container;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match container::check_create("c1", data) {
        Ok(s) => husk_agent_fuzz::after_create("c1", &s),
        Err(e) => husk_agent_fuzz::check_refusal(&e),
    }
});
