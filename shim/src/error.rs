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
        // A message that already repeats its source's text is not repeated again.
        if !s.ends_with(&next) {
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
}
