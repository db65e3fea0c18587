//! Builds the synthetic guests in `guests/` with binutils (`as`, `ld`): each `NAME.s`
//! becomes `$OUT_DIR/guests/NAME.elf`, and the tests find them through `HUSK_GUESTS_DIR`.
//! `common.s` is included by the guests, not built on its own.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot run {:?}: {e} — install binutils (as, ld)",
            cmd.get_program()
        )
    });
    assert!(status.success(), "{what}: {cmd:?} failed with {status}");
}

fn main() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("guests");
    std::fs::create_dir_all(&out).expect("create guest output dir");
    println!("cargo:rerun-if-changed={}", src.display());
    let script = src.join("guest.ld");
    let mut entries: Vec<_> = std::fs::read_dir(&src)
        .expect("read tests/guests")
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        println!("cargo:rerun-if-changed={}", path.display());
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".s"))
        else {
            continue;
        };
        if name == "common" {
            continue;
        }
        let obj = out.join(format!("{name}.o"));
        let elf = out.join(format!("{name}.elf"));
        run(
            Command::new("as")
                .arg("--64")
                .arg("-I")
                .arg(&src)
                .arg("-o")
                .arg(&obj)
                .arg(&path),
            name,
        );
        run(
            Command::new("ld")
                .args([
                    "-m",
                    "elf_x86_64",
                    "-nostdlib",
                    "--build-id=none",
                    "-z",
                    "max-page-size=0x1000",
                ])
                .arg("--no-warn-rwx-segments")
                .arg("-T")
                .arg(&script)
                .arg("-o")
                .arg(&elf)
                .arg(&obj),
            name,
        );
    }
    println!("cargo:rustc-env=HUSK_GUESTS_DIR={}", out.display());
}
