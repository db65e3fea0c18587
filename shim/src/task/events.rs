//! Publishing the task's events to containerd (its ttrpc `Events.Forward`), what
//! containerd-shim's `RemotePublisher` does, with ttrpc's async client on the runtime the
//! agent connections use ([`crate::agent`]): the sync publisher's client polls its socket
//! every 10 ms on a thread of its own for as long as the shim lives, ~100 wake-ups a second
//! of an idle pod (docs/FIELD-NOTES.md, "Where an idle pod's host memory is under TCG").
//! One connection for the shim's life, as there; each event is sent before `publish`
//! returns, as there.

use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_async::EventsClient;
use containerd_shim::protos::ttrpc;
use containerd_shim::util::{connect, convert_to_any, timestamp};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

/// The shim's connection to containerd's event service.
pub struct Publisher {
    client: EventsClient,
    runtime: &'static tokio::runtime::Runtime,
}

impl Publisher {
    /// Connects to containerd's ttrpc address (`TTRPC_ADDRESS`).
    pub fn connect(address: &str) -> Result<Self, containerd_shim::Error> {
        let fd = connect(address)?;
        // SAFETY: `fd` is the connected unix socket `connect` just returned, which nothing
        // else owns; the stream takes it over (and closes it if anything below fails).
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        let (client, runtime) =
            crate::agent::async_client(stream).map_err(containerd_shim::Error::Other)?;
        Ok(Self {
            client: EventsClient::new(client),
            runtime,
        })
    }

    /// Sends `event` under `topic` in `namespace`, and waits for containerd to take it.
    pub fn publish(
        &self,
        ctx: ttrpc::context::Context,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), containerd_shim::Error> {
        let mut envelope = Envelope::new();
        envelope.set_topic(topic.to_owned());
        envelope.set_namespace(namespace.to_owned());
        envelope.set_timestamp(timestamp()?);
        envelope.set_event(convert_to_any(event)?);
        let mut req = ForwardRequest::new();
        req.set_envelope(envelope);
        self.runtime.block_on(self.client.forward(ctx, &req))?;
        Ok(())
    }
}
