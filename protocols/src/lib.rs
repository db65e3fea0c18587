//! The agent API between `containerd-shim-husk-v2` (host) and `husk-agent` (guest):
//! `.proto` definitions and the ttrpc code generated from them at build time.
//!
//! Owns the wire format only; neither side's behaviour lives here. The API is versioned
//! (`Check` / `GetGuestDetails` carry the agent and API versions) so that a shim can refuse
//! an agent it does not understand. It lands with the agent issue.
