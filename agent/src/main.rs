//! `husk-agent`: the guest's PID 1.
//!
//! Owns everything inside the VM: it moves itself onto a tmpfs root, mounts the basic file
//! systems and the shared virtio-fs, reaps every orphan, serves the agent API (ttrpc on vsock
//! port 1024) and runs the containers, reports readiness on the console and stops the VM.
//! It must never exit: when PID 1 exits the kernel panics. Every fatal error therefore ends
//! in a clean power-off, with the reason on the console.
//!
//! The same binary has more roles:
//! - `husk-agent init|exec|warm`: the container helper, re-executed by the agent inside a
//!   container's namespaces (see `container::spawn`);
//! - `husk-agent rehearse`: the process of a pooled VM's rehearsal container (see
//!   `container::rehearsal`);
//! - `husk-agent serve --listen unix:///PATH --shared-dir DIR [--cgroup-root DIR]`: the API
//!   on a unix socket outside a VM, for the host-side container tests (root needed).

use husk_agent::{container, debug_console, guest_info, logging, pid1, power, reaper, server};

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use husk_protocols::AGENT_VSOCK_PORT;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(mode @ ("init" | "exec" | "warm")) => container::helper::main(mode),
        Some(container::rehearsal::MODE) => container::rehearsal::process_main(),
        Some("serve") => serve(&args[2..]),
        _ => {}
    }
    if std::process::id() != 1 {
        eprintln!("husk-agent: must run as PID 1 inside a husk guest (it is the initramfs's /init); `husk-agent serve --help` runs the API outside a VM");
        std::process::exit(2);
    }
    pid1_main();
}

fn pid1_main() -> ! {
    if let Err(e) = pid1::switch_to_tmpfs_root() {
        power::fatal(&format!("moving to a tmpfs root: {e}"));
    }
    if let Err(e) = pid1::mount_basics() {
        power::fatal(&format!("mounting the basic file systems: {e}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    logging::init_from_cmdline(&cmdline);
    if let Err(e) = reaper::start() {
        power::fatal(&format!("starting the zombie reaper: {e}"));
    }
    if let Err(e) = pid1::loopback_up() {
        println!("husk-agent: warning: {e}");
    }
    let controllers = match pid1::enable_controllers(std::path::Path::new(pid1::CGROUP_ROOT)) {
        Ok(c) => c,
        Err(e) => power::fatal(&format!("cgroup v2: {e}")),
    };
    match pid1::mount_shared() {
        Ok(true) => {}
        Ok(false) => println!(
            "husk-agent: no virtio-fs device tagged {}: containers cannot be created",
            pid1::SHARED_FS_TAG
        ),
        Err(e) => power::fatal(&e.to_string()),
    }
    let engine = container::Engine::new(container::Config {
        shared_dir: PathBuf::from(pid1::SHARED_DIR),
        cgroup_root: Some(PathBuf::from(pid1::CGROUP_ROOT)),
        rehearsal: Some(container::rehearsal::Place {
            dir: PathBuf::from(pid1::REHEARSAL_DIR),
            binary: PathBuf::from(pid1::AGENT_BINARY),
        }),
    });
    let info = guest_info::GuestInfo::read();
    let service = server::Service {
        engine,
        ready_ms: info.since_boot_ms,
        on_destroy: server::OnDestroy::PowerOff,
        cgroup_controllers: controllers,
    };
    // No vsock device (a VM without one): the console requests below still work.
    if let Err(e) = server::start(&format!("vsock://-1:{AGENT_VSOCK_PORT}"), service) {
        println!("husk-agent: not serving the API: {e}");
    }
    if debug_console::enabled(&cmdline) {
        let shell =
            std::path::Path::new(pid1::SHARED_DIR).join(husk_protocols::DEBUG_SHELL_IN_SHARE);
        if let Err(e) = debug_console::start(shell) {
            println!("husk-agent: debug console not available: {e}");
        }
    }
    println!("{}", info.ready_line());

    if let Some(secs) = guest_info::timeout_from_cmdline(&cmdline) {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            power::off(&format!("husk.timeout={secs} expired"));
        });
    }

    // Console requests, one per line.
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("poweroff") => power::off("poweroff requested on the console"),
            Ok("") => {}
            Ok(other) => {
                println!("husk-agent: unknown console request {other:?} (known: poweroff)")
            }
            Err(e) => {
                println!("husk-agent: console read failed: {e}");
                break;
            }
        }
    }
    // No console input (closed or unreadable): serve until DestroySandbox or the timeout.
    loop {
        std::thread::park();
    }
}

/// `husk-agent serve`: the API outside a VM (host tests). Exits on DestroySandbox.
fn serve(args: &[String]) -> ! {
    let mut listen = None;
    let mut shared = None;
    let mut cgroup_root = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => listen = it.next().cloned(),
            "--shared-dir" => shared = it.next().map(PathBuf::from),
            "--cgroup-root" => cgroup_root = it.next().map(PathBuf::from),
            _ => {
                eprintln!("usage: husk-agent serve --listen unix:///PATH --shared-dir DIR [--cgroup-root CGROUP2_DIR]");
                std::process::exit(2);
            }
        }
    }
    let (Some(listen), Some(shared)) = (listen, shared) else {
        eprintln!("husk-agent serve: --listen and --shared-dir are required");
        std::process::exit(2);
    };
    if let Err(e) = reaper::start() {
        eprintln!("husk-agent serve: {e}");
        std::process::exit(1);
    }
    // Orphans of exec helpers come back to us, not to init.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let engine = container::Engine::new(container::Config {
        shared_dir: shared,
        cgroup_root,
        rehearsal: None,
    });
    let service = server::Service {
        engine,
        ready_ms: 0,
        on_destroy: server::OnDestroy::Exit,
        cgroup_controllers: Vec::new(),
    };
    if let Err(e) = server::start(&listen, service) {
        eprintln!("husk-agent serve: {e}");
        std::process::exit(1);
    }
    eprintln!("husk-agent serve: listening on {listen}");
    loop {
        std::thread::park();
    }
}
