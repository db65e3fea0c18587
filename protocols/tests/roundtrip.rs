//! The generated client and server talk to each other over a unix socket: the versions cross
//! the wire, an unimplemented RPC is a NOT_FOUND status, and an error status keeps its message.

use std::sync::Arc;

use husk_protocols::agent::{CheckRequest, CheckResponse, ContainerRef, Empty};
use husk_protocols::agent_ttrpc::{create_agent, Agent, AgentClient};
use husk_protocols::ttrpc::{self, context, Code, TtrpcContext};
use husk_protocols::API_VERSION;

struct Fake;

impl Agent for Fake {
    fn check(&self, _: &TtrpcContext, req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        let mut r = CheckResponse::new();
        r.api_version = API_VERSION;
        r.agent_version = format!("fake, asked {}", req.api_version);
        Ok(r)
    }

    fn pause_container(&self, _: &TtrpcContext, req: ContainerRef) -> ttrpc::Result<Empty> {
        Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::NOT_FOUND,
            format!("{}: no such container", req.container_id),
        )))
    }
}

#[test]
fn client_and_server_agree() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("agent.sock").display());
    let mut server = ttrpc::Server::new()
        .bind(&addr)
        .unwrap()
        .register_service(create_agent(Arc::new(Fake)));
    server.start().unwrap();

    let client = AgentClient::new(ttrpc::Client::connect(&addr).unwrap());
    let mut req = CheckRequest::new();
    req.api_version = 7;
    let r = client
        .check(context::with_timeout(5_000_000_000), &req)
        .unwrap();
    assert_eq!(r.api_version, API_VERSION);
    assert_eq!(r.agent_version, "fake, asked 7");

    let mut c = ContainerRef::new();
    c.container_id = "c1".into();
    match client.pause_container(context::with_timeout(5_000_000_000), &c) {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), Code::NOT_FOUND);
            assert_eq!(s.message(), "c1: no such container");
        }
        other => panic!("expected a NOT_FOUND status, got {other:?}"),
    }
    match client.resume_container(context::with_timeout(5_000_000_000), &c) {
        Err(ttrpc::Error::RpcStatus(s)) => assert_eq!(s.code(), Code::NOT_FOUND),
        other => panic!("expected NOT_FOUND for an unimplemented RPC, got {other:?}"),
    }
    server.shutdown();
}
