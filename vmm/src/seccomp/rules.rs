//! The rules: which system calls each thread kind may make once the VM is built, and with
//! which arguments.
//!
//! Taken from `strace -f` of the tier-2 tests (every synthetic guest and device: boot,
//! serial, rng, vsock both ways, virtio-fs through virtiofsd, net on a tap, the control
//! API, pause/resume, SIGTERM, fatal exits), thread by thread, keeping only what runs
//! after the point where that thread installs its filter. What is left out on purpose:
//! every call that takes a path (`open*`, `unlink*`, `mkdir*`, `rename*`, `*stat*` by
//! path, `bind`, `connect` — the broker does the few a running VM needs, see
//! [`crate::broker`]), `socket`, `clone`/`clone3`/`fork`, `execve*`, `ptrace`, `prctl`,
//! `kill`, and executable memory (`mmap`/`mprotect` with `PROT_EXEC`).

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::{Context, SeccompError, ThreadKind};

/// `ioctl` request numbers (the kernel compares the low 32 bits, an `unsigned int`).
pub mod ioctl {
    /// `KVM_RUN` (vCPU fd).
    pub(crate) const KVM_RUN: u64 = 0xae80;
    /// `KVM_GET_REGS` (vCPU fd): the register dump of a fatal exit.
    pub(crate) const KVM_GET_REGS: u64 = 0x8090_ae81;
    /// `KVM_GET_SREGS` (vCPU fd): the same.
    pub(crate) const KVM_GET_SREGS: u64 = 0x8138_ae83;
    /// `FIONBIO` (sockets): `set_nonblocking` on accepted and brokered vsock streams.
    pub(crate) const FIONBIO: u64 = 0x5421;
}

/// `FUTEX_CMD_MASK`: the operation without `FUTEX_PRIVATE_FLAG` and `FUTEX_CLOCK_REALTIME`.
const FUTEX_CMD_MASK: u64 = 0x7f;
/// The futex operations std's locks, condvars, channels and `join` use. Not the
/// requeue and priority-inheritance ones, the usual targets of futex exploits.
const FUTEX_OPS: &[u64] = &[
    0,  // FUTEX_WAIT
    1,  // FUTEX_WAKE
    9,  // FUTEX_WAIT_BITSET
    10, // FUTEX_WAKE_BITSET
];
/// `MAP_TYPE | MAP_ANONYMOUS`: the bits that say what a mapping maps.
const MAP_KIND_MASK: u64 = 0x0f | 0x20;
/// Private anonymous memory: the only kind the allocator and thread exit ask for.
const MAP_PRIVATE_ANON: u64 = 0x02 | 0x20;
/// Page protections memory may get: never executable.
const PROT_ALLOWED: &[u64] = &[
    0,     // PROT_NONE (allocator arenas, guard pages)
    0b011, // PROT_READ | PROT_WRITE
];

/// One argument test: (argument index, comparison, value), on the low 32 bits.
type Cond = (u8, SeccompCmpOp, u64);

/// A filter's rules being put together.
#[derive(Debug, Default)]
pub(super) struct Rules(BTreeMap<i64, Vec<SeccompRule>>);

impl Rules {
    /// Allows each of `nrs` with any arguments.
    fn allow(&mut self, nrs: &[i64]) {
        for nr in nrs {
            let prev = self.0.insert(*nr, Vec::new());
            debug_assert!(
                !matches!(prev, Some(r) if !r.is_empty()),
                "syscall {nr} is allowed with and without conditions"
            );
        }
    }

    /// Allows `nr` when every condition in `conds` holds (several calls: when any set does).
    fn allow_if(&mut self, nr: i64, conds: &[Cond]) -> Result<(), SeccompError> {
        let conds = conds
            .iter()
            .map(|(arg, op, val)| {
                SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *val)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SeccompError::Build(e.into()))?;
        let rule = SeccompRule::new(conds).map_err(|e| SeccompError::Build(e.into()))?;
        match self.0.get_mut(&nr) {
            Some(rules) => {
                // An empty list allows any arguments: a condition added to it would narrow it.
                debug_assert!(
                    !rules.is_empty(),
                    "syscall {nr} is allowed with and without conditions"
                );
                rules.push(rule);
            }
            None => {
                self.0.insert(nr, vec![rule]);
            }
        }
        Ok(())
    }

    /// Allows `nr` when argument `arg` equals one of `values`.
    fn allow_arg_in(&mut self, nr: i64, arg: u8, values: &[u64]) -> Result<(), SeccompError> {
        for v in values {
            self.allow_if(nr, &[(arg, SeccompCmpOp::Eq, *v)])?;
        }
        Ok(())
    }

    /// The map seccompiler compiles.
    pub(super) fn into_map(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
    }
}

/// A non-negative C constant (flag, signal, pid) as a filter argument.
fn c(v: libc::c_int) -> u64 {
    u64::from(v.unsigned_abs())
}

/// What every husk-vmm thread needs once running: I/O on fds it already has, the
/// allocator, locks, sleeping, the clock, thread exit and process exit, and `abort`.
fn base(r: &mut Rules, ctx: &Context) -> Result<(), SeccompError> {
    r.allow(&[
        libc::SYS_read,
        libc::SYS_write,
        // std's socket read/write (recv/send) on streams it already holds.
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_close,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        // Thread exit: std removes the alternate signal stack.
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_restart_syscall,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_sched_yield,
        libc::SYS_gettid,
        libc::SYS_getpid,
        // std's hash-map keys, taken once per thread.
        libc::SYS_getrandom,
    ]);
    for op in FUTEX_OPS {
        r.allow_if(
            libc::SYS_futex,
            &[(1, SeccompCmpOp::MaskedEq(FUTEX_CMD_MASK), *op)],
        )?;
    }
    for prot in PROT_ALLOWED {
        r.allow_if(
            libc::SYS_mmap,
            &[
                (2, SeccompCmpOp::Eq, *prot),
                (3, SeccompCmpOp::MaskedEq(MAP_KIND_MASK), MAP_PRIVATE_ANON),
            ],
        )?;
    }
    r.allow_arg_in(libc::SYS_mprotect, 2, PROT_ALLOWED)?;
    r.allow_arg_in(
        libc::SYS_madvise,
        2,
        &[c(libc::MADV_DONTNEED), c(libc::MADV_FREE)],
    )?;
    // Growing a vector in place or by moving it; not MREMAP_FIXED.
    r.allow_arg_in(libc::SYS_mremap, 3, &[0, c(libc::MREMAP_MAYMOVE)])?;
    // Debug builds of std check that an fd is open before closing it.
    r.allow_arg_in(libc::SYS_fcntl, 1, &[c(libc::F_GETFD)])?;
    // abort() (a panic while panicking): SIGABRT to this very process, default action.
    r.allow_if(
        libc::SYS_tgkill,
        &[
            (0, SeccompCmpOp::Eq, c(ctx.pid)),
            (2, SeccompCmpOp::Eq, c(libc::SIGABRT)),
        ],
    )?;
    r.allow_arg_in(libc::SYS_rt_sigaction, 0, &[c(libc::SIGABRT)])?;
    Ok(())
}

/// Knocking vCPU threads out of KVM_RUN (pause, stop): the kick signal, to this process.
fn kick(r: &mut Rules, ctx: &Context) -> Result<(), SeccompError> {
    r.allow_if(
        libc::SYS_tgkill,
        &[
            (0, SeccompCmpOp::Eq, c(ctx.pid)),
            (2, SeccompCmpOp::Eq, c(ctx.kick_signal)),
        ],
    )
}

/// Device emulation on host fds, which runs on vCPU threads (queue notifications) and
/// device threads alike: the vsock muxer's streams and epoll set, the broker's answers
/// (an fd), the vhost-user socket (activation), eventfds and the tap (read/write).
fn device_io(r: &mut Rules) -> Result<(), SeccompError> {
    r.allow(&[
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
    ]);
    // The muxer's listener: host clients connecting (std asks for SOCK_CLOEXEC).
    r.allow_arg_in(libc::SYS_accept4, 3, &[c(libc::SOCK_CLOEXEC)])?;
    Ok(())
}

/// The rules of thread kind `kind`.
pub(super) fn for_kind(kind: ThreadKind, ctx: &Context) -> Result<Rules, SeccompError> {
    let mut r = Rules::default();
    base(&mut r, ctx)?;
    match kind {
        ThreadKind::Vmm => {
            // Stopping the vCPUs, then asking the broker to remove our sockets (its answer
            // comes with recvmsg) and reaping it.
            kick(&mut r, ctx)?;
            r.allow(&[libc::SYS_recvmsg]);
            if let Some(pid) = ctx.broker_pid {
                r.allow_if(libc::SYS_wait4, &[(0, SeccompCmpOp::Eq, c(pid))])?;
            }
        }
        ThreadKind::Vcpu => {
            device_io(&mut r)?;
            r.allow_arg_in(
                libc::SYS_ioctl,
                1,
                &[
                    ioctl::KVM_RUN,
                    ioctl::KVM_GET_REGS,
                    ioctl::KVM_GET_SREGS,
                    ioctl::FIONBIO,
                ],
            )?;
        }
        ThreadKind::Device => {
            device_io(&mut r)?;
            r.allow(&[libc::SYS_poll, libc::SYS_ppoll]);
            r.allow_arg_in(libc::SYS_ioctl, 1, &[ioctl::FIONBIO])?;
        }
        ThreadKind::Api => {
            // One client at a time: accept, then a second handle on its stream.
            r.allow_arg_in(libc::SYS_accept4, 3, &[c(libc::SOCK_CLOEXEC)])?;
            r.allow_arg_in(libc::SYS_fcntl, 1, &[c(libc::F_DUPFD_CLOEXEC)])?;
            // `pause` kicks the vCPUs.
            kick(&mut r, ctx)?;
        }
        ThreadKind::Signals => {
            r.allow(&[libc::SYS_rt_sigtimedwait]);
        }
    }
    Ok(r)
}

/// The broker process's rules: its requests, the unix streams it opens for the guest's
/// connections, removing the sockets at the end, and the allocator (fd passing
/// allocates). It never opens a file, binds, or makes any other kind of socket.
pub(super) fn for_broker() -> Result<Rules, SeccompError> {
    let mut r = Rules::default();
    r.allow(&[
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_write,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_connect,
        libc::SYS_unlink,
        libc::SYS_close,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_restart_syscall,
    ]);
    for prot in PROT_ALLOWED {
        r.allow_if(
            libc::SYS_mmap,
            &[
                (2, SeccompCmpOp::Eq, *prot),
                (3, SeccompCmpOp::MaskedEq(MAP_KIND_MASK), MAP_PRIVATE_ANON),
            ],
        )?;
    }
    r.allow_arg_in(libc::SYS_mprotect, 2, PROT_ALLOWED)?;
    // Debug builds of std check that an fd is open before closing it.
    r.allow_arg_in(libc::SYS_fcntl, 1, &[c(libc::F_GETFD)])?;
    r.allow_if(
        libc::SYS_socket,
        &[
            (0, SeccompCmpOp::Eq, c(libc::AF_UNIX)),
            (1, SeccompCmpOp::Eq, c(crate::broker::STREAM_FLAGS)),
            (2, SeccompCmpOp::Eq, 0),
        ],
    )?;
    Ok(r)
}
