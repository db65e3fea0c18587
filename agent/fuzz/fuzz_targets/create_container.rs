//! CreateContainer as the agent's ttrpc server hands it over: the request's protobuf bytes
//! decoded, then the id and the OCI spec checked and turned into the container's
//! configuration (`container::check_create`, then `husk_agent_fuzz::after_create`).
#![no_main]

use husk_agent::container;
use husk_protocols::agent::CreateContainerRequest;
use husk_protocols::protobuf::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = CreateContainerRequest::parse_from_bytes(data) else {
        return;
    };
    match container::check_create(&req.container_id, &req.oci_spec_json) {
        Ok(s) => husk_agent_fuzz::after_create(&req.container_id, &s),
        Err(e) => husk_agent_fuzz::check_refusal(&e),
    }
});
