//! The agent's log level. The agent logs to the guest console (the host keeps it as
//! `/run/husk/<sid>/console.log`): one line per event, `husk-agent: …`. At the default level
//! it prints what always matters (readiness, failed requests, fatal errors); with
//! `husk.log=debug` on the kernel command line (the shim's `debug_console = true`) it also
//! prints every API request with its duration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use husk_protocols::ttrpc::r#async::{MethodHandler, Service, TtrpcContext};
use husk_protocols::ttrpc::{self, Request, Response};
use husk_protocols::DEBUG_LOG_FLAG;

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Sets the level from the kernel command line.
pub fn init_from_cmdline(cmdline: &str) {
    DEBUG.store(debug_in(cmdline), Ordering::Relaxed);
}

fn debug_in(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == DEBUG_LOG_FLAG)
}

pub(crate) fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// A console line at debug level.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::logging::debug_enabled() {
            println!("husk-agent: debug: {}", format_args!($($arg)*));
        }
    };
}
pub(crate) use debug;

/// Requests that are stream traffic, not events: a line per stdio chunk or long poll would
/// flood the serial console (slow under TCG) and bury the requests that tell a story.
/// `GetGuestStats` is asked after every metrics scrape.
const NOT_LOGGED: &[&str] = &[
    "ReadStdout",
    "ReadStderr",
    "WriteStdin",
    "GetOOMEvent",
    "GetGuestStats",
];

/// Wraps each method of each service so that, at debug level, every request is logged once
/// answered.
pub fn log_requests(mut services: HashMap<String, Service>) -> HashMap<String, Service> {
    for service in services.values_mut() {
        service.methods = std::mem::take(&mut service.methods)
            .into_iter()
            .map(|(name, inner)| {
                if !is_logged(&name) {
                    return (name, inner);
                }
                let logged: Box<dyn MethodHandler + Send + Sync> = Box::new(Logged {
                    name: name.clone(),
                    inner,
                });
                (name, logged)
            })
            .collect();
    }
    services
}

fn is_logged(method: &str) -> bool {
    !NOT_LOGGED.contains(&method)
}

struct Logged {
    name: String,
    inner: Box<dyn MethodHandler + Send + Sync>,
}

#[async_trait::async_trait]
impl MethodHandler for Logged {
    async fn handler(&self, ctx: TtrpcContext, req: Request) -> ttrpc::Result<Response> {
        let started = Instant::now();
        let size = req.payload.len();
        let r = self.inner.handler(ctx, req).await;
        // Failed requests are on the console already (server::map); this is the trace.
        debug!(
            "{} ({size} bytes) answered in {:?}",
            self.name,
            started.elapsed()
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_level_from_the_cmdline() {
        assert!(debug_in("console=ttyS0 husk.log=debug quiet"));
        assert!(!debug_in("console=ttyS0 quiet"));
        assert!(!debug_in("husk.log=debugx"));
    }

    #[test]
    fn stream_requests_are_not_logged() {
        assert!(is_logged("CreateContainer"));
        assert!(!is_logged("ReadStdout"));
        assert!(!is_logged("GetOOMEvent"));
    }

    /// The names above are the keys the generated server files its methods under: a name
    /// that is not one would be logged after all, at a line per stdio chunk.
    #[test]
    fn the_unlogged_names_are_the_servers_method_keys() {
        struct Defaults;
        #[async_trait::async_trait]
        impl husk_protocols::agent_ttrpc_async::Agent for Defaults {}
        let services =
            husk_protocols::agent_ttrpc_async::create_agent(std::sync::Arc::new(Defaults));
        let methods: Vec<&String> = services.values().flat_map(|s| s.methods.keys()).collect();
        for name in NOT_LOGGED {
            assert!(
                methods.iter().any(|m| m.as_str() == *name),
                "{name} is no method key of the server: {methods:?}"
            );
        }
    }
}
