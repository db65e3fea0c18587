//! The one error-chain printer of the shim: every error a user can meet is shown with its
//! whole `source()` chain ("starting qemu-system-x86_64: Permission denied (os error 13)"),
//! never only its top line, which may leave the cause out (the style of the vmm and the
//! hypervisor crate keeps the outer message short and the detail in the source).

/// `e` and each of its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let next = x.to_string();
        // A message that already carries its source's text (the vmm's style, or an error
        // whose message is built from its own chain) is not repeated again.
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawn_error_shows_the_os_error() {
        let e = husk_hypervisor::Error::Spawn {
            program: "qemu-system-x86_64".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(e.to_string(), "starting qemu-system-x86_64");
        let c = chain(&e);
        assert!(
            c.starts_with("starting qemu-system-x86_64: ") && c.contains("Permission denied"),
            "{c}"
        );
    }

    #[test]
    fn a_sandbox_step_carries_its_whole_cause_once() {
        let spawn = husk_hypervisor::Error::Spawn {
            program: "qemu-system-x86_64".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        let e = crate::sandbox::SandboxError::Step {
            sid: "sb".into(),
            step: "starting the VM",
            source: Box::new(spawn.into()),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("sandbox sb: starting the VM: starting qemu-system-x86_64: ")
                && text.ends_with("Permission denied (os error 13)"),
            "{text}"
        );
        assert_eq!(chain(&e), text, "the printer adds nothing the message has");
        let os = std::error::Error::source(&e)
            .and_then(std::error::Error::source)
            .expect("the OS error is still a source");
        assert!(os.downcast_ref::<std::io::Error>().is_some(), "{os:?}");
    }
}
