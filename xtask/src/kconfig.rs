//! Kconfig fragments and the check that Kconfig kept what they ask for.
//!
//! `olddefconfig` silently drops a symbol whose dependencies are not met (and renames happen
//! between kernel versions: `SPECULATION_MITIGATIONS` is `CPU_MITIGATIONS` in 6.1). The build
//! therefore compares every line of every fragment with the final `.config` and fails naming
//! the symbols that did not survive.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What a fragment asks of one symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// `CONFIG_X=value` (`y`, `m`, a number, a quoted string).
    Value(String),
    /// `# CONFIG_X is not set`.
    Unset,
}

/// One request of one fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub symbol: String,
    pub want: Want,
    pub fragment: String,
}

/// A symbol whose final value is not the one asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub request: Request,
    /// The final value, `None` when unset.
    pub got: Option<String>,
    /// The kernel defines no such symbol (a rename between versions).
    pub unknown: bool,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let want = match &self.request.want {
            Want::Value(v) => format!("{}={v}", self.request.symbol),
            Want::Unset => format!("{} unset", self.request.symbol),
        };
        let got = match &self.got {
            _ if self.unknown => "no such symbol in this kernel's Kconfig (renamed?)".into(),
            Some(v) => format!("{}={v}", self.request.symbol),
            None => "not set (a dependency is missing)".into(),
        };
        write!(f, "{want} (asked by {}): got {got}", self.request.fragment)
    }
}

/// Parses a fragment (or a `.config`): `CONFIG_X=v` and `# CONFIG_X is not set` lines.
pub fn parse(fragment_name: &str, text: &str) -> Vec<Request> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                let sym = rest.strip_suffix(" is not set")?;
                return sym.starts_with("CONFIG_").then(|| Request {
                    symbol: sym.to_string(),
                    want: Want::Unset,
                    fragment: fragment_name.to_string(),
                });
            }
            let (sym, val) = line.split_once('=')?;
            sym.starts_with("CONFIG_").then(|| Request {
                symbol: sym.to_string(),
                want: Want::Value(val.to_string()),
                fragment: fragment_name.to_string(),
            })
        })
        .collect()
}

/// The set symbols of a final `.config`.
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    parse(".config", text)
        .into_iter()
        .filter_map(|r| match r.want {
            Want::Value(v) => Some((r.symbol, v)),
            Want::Unset => None,
        })
        .collect()
}

/// Every symbol the kernel source defines (`config X` / `menuconfig X` in its Kconfig files).
pub fn known_symbols(src: &Path) -> std::io::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let ft = entry.file_type()?;
            if ft.is_dir() {
                if entry.file_name() != ".git" {
                    stack.push(path);
                }
            } else if ft.is_file() && entry.file_name().to_string_lossy().starts_with("Kconfig") {
                for line in std::fs::read_to_string(&path)?.lines() {
                    let mut w = line.split_whitespace();
                    if let (Some("config" | "menuconfig"), Some(sym)) = (w.next(), w.next()) {
                        out.insert(format!("CONFIG_{sym}"));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The requests that the final configuration does not honour. With `known`, a request for a
/// symbol the kernel does not define is reported too, even an "unset" one that would
/// otherwise pass unnoticed.
pub fn check(
    requests: &[Request],
    config: &BTreeMap<String, String>,
    known: Option<&BTreeSet<String>>,
) -> Vec<Dropped> {
    requests
        .iter()
        .filter_map(|r| {
            let got = config.get(&r.symbol).cloned();
            let unknown = known.is_some_and(|k| !k.contains(&r.symbol));
            let ok = !unknown
                && match (&r.want, &got) {
                    (Want::Value(v), Some(g)) => v == g,
                    (Want::Value(v), None) => v == "n",
                    (Want::Unset, None) => true,
                    (Want::Unset, Some(g)) => g == "n",
                };
            (!ok).then(|| Dropped {
                request: r.clone(),
                got,
                unknown,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAGMENT: &str = "# comment\nCONFIG_VIRTIO=y\nCONFIG_NR_CPUS=64\n# CONFIG_PCI is not set\nCONFIG_SPECULATION_MITIGATIONS=n\nCONFIG_CMDLINE=\"a b\"\n";

    #[test]
    fn parses_values_and_unset_lines() {
        let r = parse("10-x.config", FRAGMENT);
        assert_eq!(r.len(), 5);
        assert_eq!(r[0].symbol, "CONFIG_VIRTIO");
        assert_eq!(r[2].want, Want::Unset);
        assert_eq!(r[4].want, Want::Value("\"a b\"".into()));
        assert_eq!(r[1].fragment, "10-x.config");
    }

    #[test]
    fn a_dropped_symbol_is_reported_with_its_fragment() {
        let config = parse_config(
            "CONFIG_NR_CPUS=64\n# CONFIG_VIRTIO is not set\nCONFIG_PCI=y\nCONFIG_CMDLINE=\"a b\"\n",
        );
        let dropped = check(&parse("10-x.config", FRAGMENT), &config, None);
        let names: Vec<_> = dropped.iter().map(|d| d.request.symbol.as_str()).collect();
        // VIRTIO was dropped, PCI came back although unset was asked; an `=n` request for a
        // symbol absent from the config (renamed in this kernel) is honoured.
        assert_eq!(names, ["CONFIG_VIRTIO", "CONFIG_PCI"]);
        let msg = dropped[0].to_string();
        assert!(
            msg.contains("CONFIG_VIRTIO=y")
                && msg.contains("10-x.config")
                && msg.contains("not set"),
            "{msg}"
        );
        assert!(dropped[1].to_string().contains("got CONFIG_PCI=y"));
    }

    #[test]
    fn a_fully_honoured_fragment_passes() {
        let config = parse_config("CONFIG_VIRTIO=y\nCONFIG_NR_CPUS=64\nCONFIG_CMDLINE=\"a b\"\n");
        assert!(check(&parse("f", FRAGMENT), &config, None).is_empty());
    }

    #[test]
    fn a_symbol_the_kernel_does_not_define_is_reported() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("arch")).unwrap();
        std::fs::write(
            src.path().join("arch/Kconfig"),
            "config CPU_MITIGATIONS\n\tbool \"x\"\nmenuconfig VIRTIO\n",
        )
        .unwrap();
        let known = known_symbols(src.path()).unwrap();
        assert!(known.contains("CONFIG_CPU_MITIGATIONS") && known.contains("CONFIG_VIRTIO"));
        let reqs = parse(
            "00-base.config",
            "CONFIG_SPECULATION_MITIGATIONS=n\n# CONFIG_CPU_MITIGATIONS is not set\n",
        );
        let dropped = check(&reqs, &BTreeMap::new(), Some(&known));
        assert_eq!(dropped.len(), 1);
        assert!(
            dropped[0].to_string().contains("no such symbol"),
            "{}",
            dropped[0]
        );
    }

    #[test]
    fn the_projects_fragments_parse() {
        let dir = crate::paths::workspace().join("guest-kernel-config");
        let mut n = 0;
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "config") {
                let reqs = parse("f", &std::fs::read_to_string(&f).unwrap());
                assert!(!reqs.is_empty(), "{} asks for nothing", f.display());
                n += 1;
            }
        }
        assert!(n >= 8, "expected one fragment per concern, found {n}");
    }
}
