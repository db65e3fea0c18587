//! Where a CreateContainer's time goes, at debug level (`husk.log=debug`): the agent marks its
//! steps, the init helper marks its own and sends them with a `steps` line before `ready`,
//! and the agent logs them all as one console line, in ms since the request came in:
//!
//! ```text
//! husk-agent: debug: CreateContainer c0 steps (ms): checked 1.2, cgroup 3.0, spawned 21.4, helper main 24.9, …, ready 118.0
//! ```
//!
//! Both sides read `CLOCK_MONOTONIC`, which is one clock for every process of the guest.

use std::cell::RefCell;

/// Now on `CLOCK_MONOTONIC`, in µs.
pub fn now_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        let us = i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_nsec()) / 1000;
        u64::try_from(us).unwrap_or(0)
    })
}

thread_local! {
    /// The helper's marks (it is single-threaded): step name, time.
    static MARKS: RefCell<Vec<(&'static str, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Helper side: `step` just ended. Cheap enough to run whether or not anyone asked.
pub fn mark(step: &'static str) {
    let t = now_us();
    MARKS.with(|m| m.borrow_mut().push((step, t)));
}

/// Helper side: the `steps` line (without its newline): `steps <name>=<µs> …`, names with
/// spaces written with `_`.
pub fn line() -> String {
    MARKS.with(|m| {
        m.borrow()
            .iter()
            .fold(String::from("steps"), |mut s, (name, t)| {
                s.push_str(&format!(" {}={t}", name.replace(' ', "_")));
                s
            })
    })
}

/// Agent side: a CreateContainer's marks, kept only at debug level.
#[derive(Debug)]
pub struct Trace {
    start: u64,
    marks: Vec<(String, u64)>,
}

impl Trace {
    pub fn new() -> Option<Self> {
        crate::logging::debug_enabled().then(|| Self {
            start: now_us(),
            marks: Vec::new(),
        })
    }

    pub fn mark(&mut self, step: &str) {
        self.marks.push((step.to_string(), now_us()));
    }

    /// Takes a helper's `steps` line in; a malformed entry is skipped (it is a debug aid).
    pub fn add_helper(&mut self, line: &str) {
        let entries = line.strip_prefix("steps").unwrap_or("").split_whitespace();
        for (name, t) in entries.filter_map(|e| e.split_once('=')) {
            if let Ok(t) = t.parse::<u64>() {
                self.marks
                    .push((format!("helper {}", name.replace('_', " ")), t));
            }
        }
    }

    /// The marks in ms since the request, in time order.
    pub fn render(&self) -> String {
        let mut marks: Vec<&(String, u64)> = self.marks.iter().collect();
        marks.sort_by_key(|(_, t)| *t);
        let ms = |t: u64| {
            let us = t.saturating_sub(self.start);
            format!("{}.{}", us / 1000, us % 1000 / 100)
        };
        marks
            .iter()
            .map(|(name, t)| format!("{name} {}", ms(*t)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_marks_travel_as_one_line_and_render_in_time_order() {
        MARKS.with(|m| m.borrow_mut().clear());
        mark("config read");
        mark("mounts");
        let line = line();
        assert!(line.starts_with("steps config_read="), "{line}");
        let mut t = Trace {
            start: 0,
            marks: vec![("spawned".into(), 5_000)],
        };
        t.add_helper("steps a=3000 b=7250 junk c=x");
        t.mark_at("ready", 9_999);
        assert_eq!(
            t.render(),
            "helper a 3.0, spawned 5.0, helper b 7.2, ready 9.9"
        );
        let mut t = Trace {
            start: 0,
            marks: Vec::new(),
        };
        t.add_helper(&line);
        let r = t.render();
        assert!(
            r.starts_with("helper config read ") && r.contains(", helper mounts "),
            "{r}"
        );
    }

    impl Trace {
        fn mark_at(&mut self, step: &str, t: u64) {
            self.marks.push((step.into(), t));
        }
    }
}
