//! Finding a program by name: the one lookup the backends, the helpers, xtask and the tests
//! share. A leaf: it depends on nothing else in the crate.
//!
//! Order: `PATH`, then cargo's bin directory (`$CARGO_HOME/bin`, then `~/.cargo/bin`: where
//! `cargo install` puts virtiofsd and vhost-device-vsock). A name is taken as found when a
//! regular file of that name is there; whether it runs is for its caller to find out.

use std::path::{Path, PathBuf};

/// The first regular file called `name` in a directory of `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `name` in cargo's bin directories: `$CARGO_HOME/bin`, then `~/.cargo/bin`.
pub(crate) fn in_cargo_bin(name: &str) -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME").map(PathBuf::from);
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo"));
    [cargo_home, home]
        .into_iter()
        .flatten()
        .map(|d| d.join("bin").join(name))
        .find(|p| p.is_file())
}

/// `name` on `PATH`, else in cargo's bin directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    on_path(name).or_else(|| in_cargo_bin(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_file_on_path_and_not_a_directory_or_a_missing_name() {
        // `sh` is a file on every PATH the tests run with; `/` names a directory.
        let sh = on_path("sh").expect("sh on PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(find_program("sh"), Some(sh));
        assert_eq!(on_path("husk-no-such-program-14"), None);
        assert_eq!(find_program("husk-no-such-program-14"), None);
        assert_eq!(on_path(""), None, "a directory of PATH is not a program");
    }
}
