//! Each filter compiles, kills the calls no thread of a running VM may make, and lets
//! through what its kind needs. Every check forks a child that installs one filter and
//! makes one call; the parent looks at how the child ended.

use super::*;

/// The broker pid the filters are built with here (no such process: wait4 gets ECHILD).
const FAKE_BROKER: libc::pid_t = 999_999;

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// SIGSYS: the filter killed it.
    Killed,
    /// It made the call and went on.
    Survived,
    /// Anything else (the raw wait status).
    Other(libc::c_int),
}

/// Forks; the child installs the filter of `kind` (the broker's for `None`), built for
/// itself, makes `call` and exits 0 if it comes back.
fn end_of(kind: Option<ThreadKind>, call: fn()) -> End {
    // Compiling in the parent first shows a rule that does not build as a test failure.
    match kind {
        Some(k) => drop(filter(k, &Context::current(Some(FAKE_BROKER))).unwrap()),
        None => drop(broker_filter().unwrap()),
    }
    // SAFETY: the child builds the filter (allocation is fork-safe in glibc), installs it,
    // makes one system call and leaves with _exit; it takes no lock another thread holds.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let f = match kind {
            Some(k) => filter(k, &Context::current(Some(FAKE_BROKER))),
            None => broker_filter(),
        };
        let code = match f {
            Ok(f) => {
                let applied = seccompiler::apply_filter(&f).is_ok();
                // Never freed: a free() under the filter may trim the heap (brk, munmap,
                // madvise — whichever the allocator's state at the fork calls for), which the
                // filter kills, and the test would read that as the call under test killed.
                std::mem::forget(f);
                if applied {
                    call();
                    0
                } else {
                    3
                }
            }
            Err(_) => 3,
        };
        // SAFETY: _exit is always safe to call.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS {
        End::Killed
    } else if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        End::Survived
    } else {
        End::Other(status)
    }
}

/// A path no test creates.
const NEW_PATH: &std::ffi::CStr = c"/tmp/husk-seccomp-test-never-created";

/// Makes a raw system call; its result does not matter (the filter decides first).
macro_rules! sys {
    ($($arg:expr),+ $(,)?) => {{
        // SAFETY: a raw system call whose pointer arguments are null or point to static,
        // NUL-terminated strings; its result is ignored.
        unsafe { libc::syscall($($arg as libc::c_long),+) };
    }};
}

/// Calls no husk-vmm thread may make once the VM runs, whatever its kind.
const FORBIDDEN: &[(&str, fn())] = &[
    ("open(O_CREAT) of a new path", || {
        sys!(
            libc::SYS_open,
            NEW_PATH.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY,
            0o600
        )
    }),
    ("openat(/etc/passwd)", || {
        sys!(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/etc/passwd".as_ptr(),
            libc::O_RDONLY
        )
    }),
    ("unlink", || sys!(libc::SYS_unlink, NEW_PATH.as_ptr())),
    ("unlinkat", || {
        sys!(libc::SYS_unlinkat, libc::AT_FDCWD, NEW_PATH.as_ptr(), 0)
    }),
    ("mkdir", || sys!(libc::SYS_mkdir, NEW_PATH.as_ptr(), 0o700)),
    ("mkdirat", || {
        sys!(libc::SYS_mkdirat, libc::AT_FDCWD, NEW_PATH.as_ptr(), 0o700)
    }),
    ("rename", || {
        sys!(
            libc::SYS_rename,
            NEW_PATH.as_ptr(),
            c"/tmp/husk-seccomp-x".as_ptr()
        )
    }),
    ("renameat2", || {
        sys!(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            NEW_PATH.as_ptr(),
            libc::AT_FDCWD,
            c"/tmp/husk-seccomp-x".as_ptr(),
            0
        )
    }),
    ("symlink", || {
        sys!(
            libc::SYS_symlink,
            c"/etc/shadow".as_ptr(),
            NEW_PATH.as_ptr()
        )
    }),
    ("stat of a path", || {
        sys!(libc::SYS_newfstatat, libc::AT_FDCWD, c"/".as_ptr(), 0, 0)
    }),
    ("socket(AF_INET)", || {
        sys!(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0)
    }),
    ("socket(AF_UNIX, SOCK_STREAM)", || {
        sys!(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0)
    }),
    ("connect", || sys!(libc::SYS_connect, -1, 0, 0)),
    ("bind", || sys!(libc::SYS_bind, -1, 0, 0)),
    ("clone of a process (fork)", || {
        sys!(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0)
    }),
    ("clone3", || sys!(libc::SYS_clone3, 0, 0)),
    ("execve", || {
        sys!(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0)
    }),
    ("ptrace", || {
        sys!(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0)
    }),
    ("prctl", || {
        sys!(libc::SYS_prctl, libc::PR_SET_NAME, c"x".as_ptr(), 0, 0, 0)
    }),
    ("ioctl TIOCSTI", || {
        sys!(libc::SYS_ioctl, -1, libc::TIOCSTI, 0)
    }),
    ("ioctl KVM_CREATE_VM", || {
        sys!(libc::SYS_ioctl, -1, 0xae01, 0)
    }),
    ("executable memory (mmap)", || {
        sys!(
            libc::SYS_mmap,
            0,
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0
        )
    }),
    ("executable memory (mprotect)", || {
        sys!(
            libc::SYS_mprotect,
            0,
            4096,
            libc::PROT_READ | libc::PROT_EXEC
        )
    }),
    ("shared mapping", || {
        sys!(
            libc::SYS_mmap,
            0,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0
        )
    }),
    ("kill", || sys!(libc::SYS_kill, 1, 0)),
    ("tgkill of another process", || {
        sys!(libc::SYS_tgkill, -1, -1, libc::SIGABRT)
    }),
    ("futex requeue", || {
        sys!(libc::SYS_futex, 0, libc::FUTEX_CMP_REQUEUE, 0, 0, 0, 0)
    }),
];

#[test]
fn every_kind_compiles_within_the_kernel_limit() {
    let filters = Filters::build(&Context::current(Some(FAKE_BROKER))).unwrap();
    assert!(filters.on());
    for kind in ThreadKind::ALL {
        let f = filter(kind, &Context::current(Some(FAKE_BROKER))).unwrap();
        assert!(f.len() < 4096, "{kind}: {} BPF instructions", f.len());
    }
    assert!(!Filters::off().on());
    Filters::off().install(ThreadKind::Vcpu).unwrap();
}

#[test]
fn path_taking_calls_sockets_processes_and_exec_memory_are_killed_in_every_kind() {
    for kind in ThreadKind::ALL {
        for (what, call) in FORBIDDEN {
            assert_eq!(
                end_of(Some(kind), *call),
                End::Killed,
                "{kind} thread: {what}"
            );
        }
    }
}

/// A call some kinds need and others must not make: what it is, the call, who may.
type KindCall = (&'static str, fn(), &'static [ThreadKind]);

/// Calls some kinds need and others must not make, with the kinds that may.
const BY_KIND: &[KindCall] = &[
    (
        "ioctl KVM_RUN",
        || sys!(libc::SYS_ioctl, -1, ioctl::KVM_RUN, 0),
        &[ThreadKind::Vcpu],
    ),
    (
        "ioctl KVM_GET_REGS",
        || sys!(libc::SYS_ioctl, -1, ioctl::KVM_GET_REGS, 0),
        &[ThreadKind::Vcpu],
    ),
    (
        "ioctl FIONBIO",
        || sys!(libc::SYS_ioctl, -1, ioctl::FIONBIO, 0),
        &[ThreadKind::Vcpu, ThreadKind::Device],
    ),
    (
        "poll",
        || sys!(libc::SYS_poll, 0, 0, 0),
        &[ThreadKind::Device],
    ),
    (
        "epoll_wait",
        || sys!(libc::SYS_epoll_wait, -1, 0, 0, 0),
        &[ThreadKind::Vcpu, ThreadKind::Device],
    ),
    (
        "recvmsg",
        || sys!(libc::SYS_recvmsg, -1, 0, 0),
        &[ThreadKind::Vcpu, ThreadKind::Device, ThreadKind::Vmm],
    ),
    (
        "accept4(SOCK_CLOEXEC)",
        || sys!(libc::SYS_accept4, -1, 0, 0, libc::SOCK_CLOEXEC),
        &[ThreadKind::Vcpu, ThreadKind::Device, ThreadKind::Api],
    ),
    (
        "accept4 without SOCK_CLOEXEC",
        || sys!(libc::SYS_accept4, -1, 0, 0, 0),
        &[],
    ),
    (
        "fcntl(F_DUPFD_CLOEXEC)",
        || sys!(libc::SYS_fcntl, -1, libc::F_DUPFD_CLOEXEC, 0),
        &[ThreadKind::Api],
    ),
    (
        "the vCPU kick to this process",
        || {
            // tid 0 is invalid: allowed, the kernel answers EINVAL and signals nobody.
            sys!(
                libc::SYS_tgkill,
                std::process::id(),
                0,
                crate::vstate::run_state::kick_signal()
            )
        },
        &[ThreadKind::Vmm, ThreadKind::Api],
    ),
    (
        "wait4 of the broker",
        || sys!(libc::SYS_wait4, FAKE_BROKER, 0, libc::WNOHANG, 0),
        &[ThreadKind::Vmm],
    ),
    (
        "wait4 of any child",
        || sys!(libc::SYS_wait4, -1, 0, libc::WNOHANG, 0),
        &[],
    ),
    (
        "rt_sigtimedwait",
        || sys!(libc::SYS_rt_sigtimedwait, 0, 0, 0, 8),
        &[ThreadKind::Signals],
    ),
];

/// Calls every kind makes: the allocator, locks, the clock, I/O on open fds.
const COMMON: &[(&str, fn())] = &[
    ("getpid", || sys!(libc::SYS_getpid)),
    ("write", || sys!(libc::SYS_write, -1, 0, 0)),
    ("futex wake (private)", || {
        sys!(
            libc::SYS_futex,
            0,
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1
        )
    }),
    ("futex wait bitset", || {
        sys!(libc::SYS_futex, 0, libc::FUTEX_WAIT_BITSET, 0, 0, 0, 0)
    }),
    ("private anonymous read-write memory", || {
        sys!(
            libc::SYS_mmap,
            0,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0
        )
    }),
    ("madvise(MADV_DONTNEED)", || {
        sys!(libc::SYS_madvise, 0, 0, libc::MADV_DONTNEED)
    }),
    ("clock_nanosleep", || {
        sys!(libc::SYS_clock_nanosleep, 0, 0, 0, 0)
    }),
];

#[test]
fn each_kind_gets_its_own_calls_and_the_common_ones() {
    for kind in ThreadKind::ALL {
        for (what, call, kinds) in BY_KIND {
            let want = if kinds.contains(&kind) {
                End::Survived
            } else {
                End::Killed
            };
            assert_eq!(end_of(Some(kind), *call), want, "{kind} thread: {what}");
        }
        for (what, call) in COMMON {
            assert_eq!(
                end_of(Some(kind), *call),
                End::Survived,
                "{kind} thread: {what}"
            );
        }
    }
}

#[test]
fn the_broker_may_connect_unix_streams_and_unlink_and_nothing_else() {
    let allowed: &[(&str, fn())] = &[
        ("socket(AF_UNIX, its stream flags)", || {
            sys!(
                libc::SYS_socket,
                libc::AF_UNIX,
                crate::broker::STREAM_FLAGS,
                0
            )
        }),
        ("connect", || sys!(libc::SYS_connect, -1, 0, 0)),
        ("unlink", || sys!(libc::SYS_unlink, NEW_PATH.as_ptr())),
    ];
    for (what, call) in allowed {
        assert_eq!(end_of(None, *call), End::Survived, "broker: {what}");
    }
    let also_forbidden: &[(&str, fn())] = &[
        ("socket(AF_UNIX, SOCK_DGRAM)", || {
            sys!(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_DGRAM, 0)
        }),
        ("ioctl FIONBIO", || {
            sys!(libc::SYS_ioctl, -1, ioctl::FIONBIO, 0)
        }),
    ];
    let skip = ["unlink", "connect"];
    for (what, call) in FORBIDDEN
        .iter()
        .filter(|(w, _)| !skip.contains(w))
        .chain(also_forbidden)
    {
        assert_eq!(end_of(None, *call), End::Killed, "broker: {what}");
    }
}
