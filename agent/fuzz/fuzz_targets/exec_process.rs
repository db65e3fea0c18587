//! ExecProcess: the request's protobuf bytes decoded when they decode, else the input taken as
//! the process JSON itself (seeds: `specs/exec-*.json`); checked, then the exec helper's
//! configuration built against containers with and without a seccomp profile, serialised and
//! read back as the helper does.
#![no_main]

use husk_agent::container::{self, exec, helper::ExecConfig};
use husk_protocols::agent::ExecProcessRequest;
use husk_protocols::protobuf::Message;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn inherited() -> &'static [exec::Inherited; 2] {
    static I: OnceLock<[exec::Inherited; 2]> = OnceLock::new();
    I.get_or_init(|| {
        let spec = |b: &[u8]| container::spec::parse_spec(b).unwrap();
        [
            exec::Inherited::from_spec(&spec(include_bytes!("../specs/ctr-default.json"))),
            exec::Inherited::from_spec(&spec(include_bytes!("../specs/cri-container.json"))),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let (exec_id, json) = match ExecProcessRequest::parse_from_bytes(data) {
        Ok(r) if !r.oci_process_json.is_empty() => (r.exec_id, r.oci_process_json),
        _ => ("e1".to_string(), data.to_vec()),
    };
    match container::check_exec("c1", &exec_id, &json) {
        Ok(p) => {
            for inh in inherited() {
                let terminal = p.terminal().unwrap_or(false);
                let cfg = exec::config("c1", 8, inh, p.clone(), None, terminal);
                let text = serde_json::to_vec(&cfg).expect("an exec configuration serialises");
                let _: ExecConfig =
                    serde_json::from_slice(&text).expect("the helper reads it back");
            }
        }
        Err(e) => husk_agent_fuzz::check_refusal(&e),
    }
});
