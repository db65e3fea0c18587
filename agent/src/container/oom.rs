//! OOM kills of the containers, as inotify reports them: one watch per container on its
//! cgroup's `memory.events` (cgroup v2 raises IN_MODIFY on it when a counter moves), added
//! when the cgroup is made and removed with the container. One thread reads the events and
//! re-reads the file that changed; each rise of its `oom_kill` count is one event for
//! [`OomWatch::next`], however many kills the rise covers.
//!
//! The thread lives as long as the agent: it blocks in `read` on the inotify fd, and there is
//! one engine per agent.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::cgroup::keyed;

#[derive(Debug)]
struct Watched {
    id: String,
    events: PathBuf,
    /// The `oom_kill` count last seen.
    seen: u64,
}

/// Why a container's OOM kills cannot be watched (then it is not created: they would go
/// unreported).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("watching {} for OOM kills: {source} — the guest kernel needs CONFIG_INOTIFY_USER", events.display())]
    NoInotify {
        events: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("watching {} for OOM kills: {source}", events.display())]
    Watch {
        events: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
}

#[derive(Debug, Default)]
struct State {
    watches: HashMap<WatchDescriptor, Watched>,
    /// Ids of containers with a new OOM kill, oldest first.
    queue: VecDeque<String>,
}

#[derive(Debug)]
pub(crate) struct OomWatch {
    /// The inotify instance, or why there is none (then no container with a cgroup can be
    /// created: its OOM kills would go unreported).
    inotify: Result<Inotify, nix::errno::Errno>,
    state: Mutex<State>,
    ready: Condvar,
}

fn oom_kills(events: &Path) -> u64 {
    std::fs::read_to_string(events)
        .ok()
        .and_then(|t| keyed(&t, "oom_kill"))
        .unwrap_or(0)
}

impl OomWatch {
    /// A watcher and its thread.
    pub fn start() -> Arc<Self> {
        let w = Arc::new(Self {
            inotify: Inotify::init(InitFlags::IN_CLOEXEC),
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
        });
        if w.inotify.is_ok() {
            let t = w.clone();
            if let Err(e) = std::thread::Builder::new()
                .name("oom-watch".into())
                .spawn(move || t.run())
            {
                eprintln!("husk-agent: starting the OOM watch thread: {e}; OOM kills will not be reported");
            }
        }
        w
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Watches the `memory.events` of container `id`'s cgroup directory `cgroup`. Its
    /// `oom_kill` count is taken as it is now (0 for a new cgroup). Without the file (no
    /// memory controller) there is nothing to watch, nor any memory cgroup to be OOM-killed in.
    pub fn add(&self, id: &str, cgroup: &Path) -> Result<(), Error> {
        let events = cgroup.join("memory.events");
        if std::fs::metadata(&events).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            return Ok(());
        }
        let inotify = match &self.inotify {
            Ok(i) => i,
            Err(e) => return Err(Error::NoInotify { events, source: *e }),
        };
        // Under the lock, so the thread cannot see an event of this watch before it is known.
        let mut st = self.lock();
        let wd = match inotify.add_watch(&events, AddWatchFlags::IN_MODIFY) {
            Ok(wd) => wd,
            Err(source) => return Err(Error::Watch { events, source }),
        };
        let seen = oom_kills(&events);
        st.watches.insert(
            wd,
            Watched {
                id: id.into(),
                events,
                seen,
            },
        );
        Ok(())
    }

    /// Stops watching container `id` (if it was watched).
    pub fn remove(&self, id: &str) {
        let mut st = self.lock();
        let wds: Vec<WatchDescriptor> = st
            .watches
            .iter()
            .filter(|(_, w)| w.id == id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            st.watches.remove(&wd);
            if let Ok(i) = &self.inotify {
                // EINVAL when the kernel already dropped it (the cgroup is gone): fine.
                let _ = i.rm_watch(wd);
            }
        }
    }

    /// Blocks until a container is OOM-killed; its id.
    pub fn next(&self) -> String {
        loop {
            if let Some(id) = self.next_until(None) {
                return id;
            }
        }
    }

    /// The next OOM event, waiting until `deadline` (for ever: `None`).
    fn next_until(&self, deadline: Option<Instant>) -> Option<String> {
        let mut st = self.lock();
        loop {
            if let Some(id) = st.queue.pop_front() {
                return Some(id);
            }
            st = match deadline {
                None => self
                    .ready
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.ready
                        .wait_timeout(st, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    fn run(&self) {
        let Ok(inotify) = &self.inotify else { return };
        loop {
            let events = match inotify.read_events() {
                Ok(ev) => ev,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("husk-agent: reading OOM events (inotify): {e}; OOM kills are no longer reported");
                    return;
                }
            };
            let mut st = self.lock();
            let mut new = false;
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The kernel dropped the watch: the file (its cgroup) is gone.
                    st.watches.remove(&ev.wd);
                    continue;
                }
                let Some(w) = st.watches.get_mut(&ev.wd) else {
                    continue;
                };
                let n = oom_kills(&w.events);
                if n > w.seen {
                    w.seen = n;
                    let id = w.id.clone();
                    st.queue.push_back(id);
                    new = true;
                }
            }
            if new {
                self.ready.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(10))
    }

    /// A moment for events that must not come.
    fn shortly() -> Option<Instant> {
        Some(Instant::now() + Duration::from_millis(300))
    }

    #[test]
    fn a_rising_oom_kill_count_is_one_event_and_removed_watches_are_quiet() {
        let dir = tempfile_dir("oom-watch");
        let (a, b) = (dir.join("a"), dir.join("b"));
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(
                d.join("memory.events"),
                "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
            )
            .unwrap();
        }
        let w = OomWatch::start();
        w.add("a", &a).unwrap();
        w.add("b", &b).unwrap();
        // Other counters moving is no OOM kill.
        std::fs::write(
            a.join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 1\noom_kill 0\n",
        )
        .unwrap();
        assert_eq!(w.next_until(shortly()), None);
        // Two kills at once: one event, for the right container.
        std::fs::write(
            b.join("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(w.next_until(soon()).as_deref(), Some("b"));
        assert_eq!(w.next_until(shortly()), None);
        std::fs::write(a.join("memory.events"), "oom_kill 1\n").unwrap();
        assert_eq!(w.next_until(soon()).as_deref(), Some("a"));
        // The same count again is nothing new.
        std::fs::write(a.join("memory.events"), "oom_kill 1\n").unwrap();
        assert_eq!(w.next_until(shortly()), None);
        w.remove("a");
        std::fs::write(a.join("memory.events"), "oom_kill 5\n").unwrap();
        assert_eq!(w.next_until(shortly()), None);
        // A file that goes away drops its watch (IN_IGNORED).
        std::fs::remove_dir_all(&b).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.lock().watches.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the removed file's watch is still known: {:?}",
                w.lock().watches
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cgroup_without_memory_events_has_nothing_to_watch() {
        let dir = tempfile_dir("oom-missing");
        let w = OomWatch::start();
        w.add("x", &dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(w.lock().watches.is_empty());
        // A path that is no cgroup directory at all is an error that says what was watched.
        let e = w
            .add("y", Path::new("/proc/self/status"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory.events") && e.contains("OOM"), "{e}");
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
