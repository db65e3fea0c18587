//! husk-vmm's seccomp filter: once the VM is built (kernel loaded, devices opened, sockets
//! bound), every thread — those running and those started later, which inherit it — may
//! make only the system calls a running VM needs; any other kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`), so a guest that took over a device thread cannot open
//! files, exec, ptrace or create listening sockets.
//!
//! The list was taken from `strace -f` of the tier-2 tests (boot, serial, rng, vsock both
//! ways, virtio-fs through virtiofsd, net on a tap, the control API) and trimmed to what
//! runs after the build. `ioctl` is limited to the request numbers seen: KVM's vCPU and VM
//! calls, FIONBIO, and TUNSETIFF.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not compile (a bug here, not on the host).
    #[error("building the seccomp filter: {0}")]
    Build(#[source] seccompiler::Error),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter: {0} — the kernel needs CONFIG_SECCOMP_FILTER; run with --no-seccomp only to debug")]
    Install(#[source] seccompiler::Error),
}

/// System calls allowed without conditions.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    // Host streams of vsock connections: guest-initiated ones connect to `<path>_<port>`.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    // Memory and threads (allocator, thread stacks, std's thread start-up).
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_futex,
    libc::SYS_prctl,
    libc::SYS_getrandom,
    // Signals: the vCPU kick (tgkill + handler), termination signals, thread exit.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `ioctl` request numbers allowed (arg 1).
const IOCTLS: &[u64] = &[
    0xae80,      // KVM_RUN
    0x4020_ae46, // KVM_SET_USER_MEMORY_REGION
    0x4008_ae89, // KVM_SET_MSRS
    0xc008_ae88, // KVM_GET_MSRS
    0x4090_ae82, // KVM_SET_REGS
    0x8090_ae81, // KVM_GET_REGS
    0x4138_ae84, // KVM_SET_SREGS
    0x8138_ae83, // KVM_GET_SREGS
    0x41a0_ae8d, // KVM_SET_FPU
    0x4400_ae8f, // KVM_SET_LAPIC
    0x8400_ae8e, // KVM_GET_LAPIC
    0x4008_ae90, // KVM_SET_CPUID2
    0x4020_ae76, // KVM_IRQFD
    0x4040_ae77, // KVM_IOEVENTFD
    0x4008_ae61, // KVM_IRQ_LINE
    0xc008_ae67, // KVM_IRQ_LINE_STATUS
    0x5421,      // FIONBIO
    0x4004_54ca, // TUNSETIFF
];

/// The filter, compiled for this architecture.
pub fn filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|nr| (*nr, Vec::new())).collect();
    let ioctl = IOCTLS
        .iter()
        .map(|req| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *req)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SeccompError::Build(e.into()))?;
    rules.insert(libc::SYS_ioctl, ioctl);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(e.into()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.into()))
}

/// Installs [`filter`] on every thread of the process (TSYNC); threads started later
/// inherit it.
pub fn install() -> Result<(), SeccompError> {
    let f = filter()?;
    seccompiler::apply_filter_all_threads(&f).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks; the child installs the filter and runs `call`, exiting 0 if it returns.
    /// Returns how the child ended.
    fn in_filtered_child(call: fn()) -> libc::c_int {
        let f = filter().unwrap();
        // SAFETY: the child only calls async-signal-safe functions (prctl, seccomp, the
        // syscall under test, _exit) and the filter was built before the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if seccompiler::apply_filter(&f).is_err() {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(2) };
            }
            call();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        status
    }

    #[test]
    fn a_forbidden_call_kills_the_process() {
        // openat: a VM that is running never opens files.
        let status = in_filtered_child(|| {
            // SAFETY: a plain system call on a static, NUL-terminated path.
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0) };
        });
        assert!(libc::WIFSIGNALED(status), "child status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
        // An ioctl request the VMM never makes (TIOCSTI, terminal input injection).
        let status = in_filtered_child(|| {
            // SAFETY: a plain system call; the fd is invalid, the filter decides first.
            unsafe { libc::syscall(libc::SYS_ioctl, -1, libc::TIOCSTI, 0) };
        });
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{status:#x}"
        );
    }

    #[test]
    fn allowed_calls_go_through() {
        let status = in_filtered_child(|| {
            // SAFETY: plain system calls with valid arguments.
            unsafe {
                libc::syscall(libc::SYS_getpid);
                libc::syscall(libc::SYS_ioctl, -1, 0x5421, 0);
            }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
    }
}
