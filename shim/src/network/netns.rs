//! Running netlink work inside a network namespace given by path (`/var/run/netns/<name>`,
//! `/proc/<pid>/ns/net`).
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, so the work runs on a short-lived
//! thread of its own that enters the namespace and then ends: the shim's other threads never
//! change namespace. Sockets and tap files opened there stay bound to that namespace after the
//! thread has gone, which is what lets the tap fd be handed to the VM afterwards.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use super::NetworkError;

/// Runs `f` on a new thread inside the network namespace `path`, with a current-thread tokio
/// runtime (rtnetlink is async) and a netlink connection opened in that namespace.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: AsyncFnOnce(rtnetlink::Handle) -> Result<T, NetworkError> + Send + 'static,
{
    let path: PathBuf = path.to_path_buf();
    let thread_path = path.clone();
    let worker = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> Result<T, NetworkError> {
            let ns = File::open(&thread_path).map_err(|source| NetworkError::Netns {
                path: thread_path.clone(),
                source,
            })?;
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetworkError::Netns {
                path: thread_path.clone(),
                source: std::io::Error::from(e),
            })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|source| NetworkError::Io {
                    what: "starting the netlink runtime".into(),
                    source,
                })?;
            rt.block_on(async move {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|source| NetworkError::Io {
                        what: format!("opening a netlink socket in {}", thread_path.display()),
                        source,
                    })?;
                let task = tokio::spawn(conn);
                let r = f(handle).await;
                task.abort();
                r
            })
        })
        .map_err(|source| NetworkError::Io {
            what: "starting the network-namespace thread".into(),
            source,
        })?;
    worker.join().unwrap_or_else(|_| {
        Err(NetworkError::Invalid(format!(
            "the thread working in {} panicked",
            path.display()
        )))
    })
}
