//! The sandbox's OOM events: the agent reports each OOM kill in the guest on a long poll of
//! its own, and the shim publishes it to containerd as `TaskOOM` (which the kubelet shows as
//! the container's `OOMKilled`). The guest names the container and sets the pace, and root in
//! the guest controls both: an event is published only for a container of this sandbox, and
//! at most [`EVENTS_PER_SECOND`] a second.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::protos::events::task::TaskOOM;
use containerd_shim::protos::topics;
use husk_protocols::agent::GetOOMEventRequest;

use super::events::Publisher;
use super::{publish, Inner};
use crate::agent::long_poll;
use crate::sandbox::Sandbox;

/// The most OOM events one sandbox publishes a second. Past it the watch waits out the
/// second before it asks for the next: the guest's further events wait in the guest, and a
/// guest that makes them up cannot flood containerd's event service through the shim.
const EVENTS_PER_SECOND: u32 = 10;

/// Asks the agent for OOM events until the connection ends, on a thread of its own.
pub(super) fn watch_oom(
    sb: &Arc<Sandbox>,
    inner: Arc<Mutex<Inner>>,
    publisher: Arc<Publisher>,
    ns: String,
) {
    let sid = sb.id.clone();
    let agent = sb.agent.clone();
    // The connection is opened on the watch's own thread: the container's start does not
    // wait for it (a new connection costs the emulated guest ~5 ms under TCG).
    std::thread::spawn(move || {
        let Ok(client) = agent.connection() else {
            log::warn!("sandbox {sid}: no connection for OOM events");
            return;
        };
        let mut gate = Gate::default();
        while let Ok(ev) = client.get_oom_event(long_poll(), &GetOOMEventRequest::default()) {
            let known = inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .containers
                .contains_key(&ev.container_id);
            match gate.admit(known) {
                Verdict::Publish => {
                    crate::metrics::oom_event();
                    let e = TaskOOM {
                        container_id: ev.container_id,
                        ..Default::default()
                    };
                    publish(&publisher, &ns, topics::TASK_OOM_EVENT_TOPIC, Box::new(e));
                }
                Verdict::Drop { dropped, say } => {
                    if say {
                        log::warn!(
                            "sandbox {sid}: the guest reported an OOM kill of {:?}, which is no container of this sandbox: not published ({dropped} so far)",
                            husk_hypervisor::guest_text::message(&ev.container_id)
                        );
                    }
                }
            }
            if let Some(pause) = gate.pause(Instant::now()) {
                std::thread::sleep(pause);
            }
        }
    });
}

/// What becomes of one event from the guest.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Publish,
    /// Not a container of this sandbox; `say`: log it (the 1st, 2nd, 4th, 8th … such event,
    /// so that a guest making them up cannot flood the log either).
    Drop {
        dropped: u64,
        say: bool,
    },
}

/// The watch's bookkeeping: which events pass, and when to pause.
#[derive(Debug, Default)]
struct Gate {
    /// When the last [`EVENTS_PER_SECOND`] events came (at most that many).
    recent: VecDeque<Instant>,
    dropped: u64,
}

impl Gate {
    fn admit(&mut self, known: bool) -> Verdict {
        if known {
            return Verdict::Publish;
        }
        self.dropped += 1;
        Verdict::Drop {
            dropped: self.dropped,
            say: self.dropped.is_power_of_two(),
        }
    }

    /// After an event at `now`: how long to wait before asking for the next, so that no
    /// second (any second, not only whole ones from the first event) holds more than
    /// [`EVENTS_PER_SECOND`] events: the next may come once the oldest of the last that
    /// many is a second old.
    fn pause(&mut self, now: Instant) -> Option<Duration> {
        let limit = EVENTS_PER_SECOND as usize;
        self.recent.push_back(now);
        if self.recent.len() > limit {
            self.recent.pop_front();
        }
        if self.recent.len() < limit {
            return None;
        }
        let next = self.recent[0] + Duration::from_secs(1);
        (next > now).then(|| next - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_sandboxs_containers_pass_and_the_log_hears_of_few_of_the_rest() {
        let mut g = Gate::default();
        assert_eq!(g.admit(true), Verdict::Publish);
        let said: Vec<u64> = (0..1000)
            .filter_map(|_| match g.admit(false) {
                Verdict::Drop { dropped, say: true } => Some(dropped),
                _ => None,
            })
            .collect();
        assert_eq!(said, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
    }

    #[test]
    fn a_flood_is_paced_to_the_limit_a_trickle_is_not() {
        let t0 = Instant::now();
        let mut g = Gate::default();
        // A trickle: one event every 200 ms, never a pause.
        for i in 1..=20 {
            g.admit(true);
            assert_eq!(g.pause(t0 + Duration::from_millis(200 * i)), None);
        }
        // A flood within one instant: the limit's worth, then a wait for the second's end.
        let t1 = t0 + Duration::from_secs(10);
        let mut g = Gate::default();
        let mut paused = Duration::ZERO;
        let mut now = t1;
        for _ in 0..(EVENTS_PER_SECOND * 5) {
            g.admit(false);
            if let Some(p) = g.pause(now) {
                paused += p;
                now += p;
            }
        }
        // 50 events at 10 a second: at least 4 seconds waited.
        assert!(paused >= Duration::from_secs(4), "{paused:?}");
        // However they are spaced, never more than the limit within any one second.
        let t2 = t1 + Duration::from_secs(100);
        let mut g = Gate::default();
        let mut times = Vec::new();
        let mut now = t2;
        // A second not used up (nine events, 100 ms apart), one event just after it, then
        // a burst 1 ms apart.
        let gaps = std::iter::repeat_n(100, 8)
            .chain([250])
            .chain(std::iter::repeat_n(1, 30));
        for gap in gaps {
            g.admit(true);
            times.push(now);
            now += g
                .pause(now)
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(gap));
        }
        for (i, t) in times.iter().enumerate() {
            let within = times[i..]
                .iter()
                .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
                .count();
            assert!(
                within <= EVENTS_PER_SECOND as usize,
                "{within} within a second of event {i}"
            );
        }
    }
}
