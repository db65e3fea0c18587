//! Generates the agent API's protobuf messages and ttrpc service code into OUT_DIR.
//!
//! The generated files start with inner attributes (`#![allow(...)]`), which `include!` does
//! not accept inside a module; they are stripped here and the same allowances are put on the
//! modules in lib.rs.

use std::path::Path;

use ttrpc_codegen::{Codegen, Customize};

fn main() {
    println!("cargo:rerun-if-changed=protos/agent.proto");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    Codegen::new()
        .out_dir(&out)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(Customize::default())
        .run()
        .expect("generating the agent API from protos/agent.proto");
    // Client and server once more, async (on tokio), into a directory of its own: the shim's
    // connections to the agent and the agent's server (see agent_ttrpc_async in lib.rs).
    let async_out = Path::new(&out).join("async");
    std::fs::create_dir_all(&async_out).expect("creating OUT_DIR/async");
    Codegen::new()
        .out_dir(&async_out)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Customize::default()
        })
        .run()
        .expect("generating the async agent client and server from protos/agent.proto");
    for name in ["agent.rs", "agent_ttrpc.rs", "async/agent_ttrpc.rs"] {
        let path = Path::new(&out).join(name);
        let text = std::fs::read_to_string(&path).expect("generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("#![") && !l.trim_start().starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("rewriting generated file");
    }
}
