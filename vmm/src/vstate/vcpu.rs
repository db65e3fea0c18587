//! vCPUs: configuration (CPUID, MSRs, FPU, LAPIC, boot registers) and the run loop, one
//! thread per vCPU. The run loop turns exits into bus accesses and exit reasons; it never
//! decides policy (the VMM's main thread does).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::{cpuid, regs};
use crate::boot::KernelEntry;
use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSender};
use crate::seccomp::{Filters, ThreadKind};
use crate::vstate::run_state::RunState;

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {index}: KVM {what}: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// What failed.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Register setup failed.
    #[error("vCPU {index}: {source}")]
    Regs {
        /// vCPU index.
        index: u8,
        /// The cause.
        #[source]
        source: regs::RegsError,
    },
}

/// Counts of vCPU exits by kind, shared with the control API.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// HLT exits.
    pub hlt: AtomicU64,
    /// Exits caused by a signal (kicks).
    pub interrupted: AtomicU64,
    /// Everything else.
    pub other: AtomicU64,
    /// `CLOCK_MONOTONIC` in ns when vCPU 0 was about to enter the guest for the first time;
    /// 0 until then. Read against the launcher's own clock at spawn, it is how long husk-vmm
    /// took to start the guest (`cargo xtask nested-boot` reports it).
    pub first_entry_ns: AtomicU64,
}

/// `CLOCK_MONOTONIC` in ns (0 if the clock cannot be read, which Linux never does).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec; CLOCK_MONOTONIC always exists.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    let (Ok(s), Ok(ns)) = (u64::try_from(ts.tv_sec), u64::try_from(ts.tv_nsec)) else {
        return 0;
    };
    s.saturating_mul(1_000_000_000).saturating_add(ns)
}

/// A vCPU, configured and ready to run.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
}

impl Vcpu {
    /// Creates vCPU `index` and configures it; the boot vCPU (index 0) gets the entry state.
    pub fn new(
        vm: &super::vm::KvmVm,
        mem: &GuestMemoryMmap,
        supported_cpuid: &CpuId,
        emulated: cpuid::Emulated,
        index: u8,
        count: u8,
        entry: KernelEntry,
    ) -> Result<Self, VcpuError> {
        let kvm_err = |what| {
            move |source| VcpuError::Kvm {
                index,
                what,
                source,
            }
        };
        let regs_err = |source| VcpuError::Regs { index, source };
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create vCPU"))?;
        let mut cpuid = supported_cpuid.clone();
        cpuid::normalise(
            &mut cpuid,
            cpuid::Topology {
                cpu_index: index,
                cpu_count: count,
            },
            emulated,
        );
        fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        regs::setup_msrs(&fd).map_err(regs_err)?;
        regs::setup_fpu(&fd).map_err(regs_err)?;
        regs::setup_lapic(&fd).map_err(regs_err)?;
        if index == 0 {
            regs::setup_regs(&fd, entry.protocol, entry.entry).map_err(regs_err)?;
            regs::setup_sregs(mem, &fd, entry.protocol).map_err(regs_err)?;
        }
        // Other vCPUs wait in the in-kernel LAPIC for the guest's INIT/SIPI.
        Ok(Self { fd, index })
    }

    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// A register dump for fatal errors.
    pub fn dump(&self) -> String {
        let mut s = format!("vCPU {} registers:", self.index);
        if let Ok(r) = self.fd.get_regs() {
            s += &format!(
                "\n  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
            );
        }
        if let Ok(sr) = self.fd.get_sregs() {
            s += &format!(
                "\n  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n  cs={:#x} (base {:#x}, l={} db={}) ss={:#x}",
                sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector, sr.cs.base, sr.cs.l, sr.cs.db, sr.ss.selector
            );
        }
        s
    }

    /// Runs until the VM stops: returns after reporting an exit reason, or when the run
    /// state says stop (the thread is kicked out of KVM_RUN with a signal). Parks while
    /// the VM is paused. The vCPU threads' seccomp filter goes on first, before the guest
    /// runs a single instruction on this vCPU.
    pub fn run(mut self, shared: &VcpuShared) {
        let VcpuShared {
            pio,
            mmio,
            exit_tx: exit,
            run_state,
            counters,
            filters,
            ..
        } = shared;
        filters.install_or_exit(ThreadKind::Vcpu, &format!("vcpu{}", self.index));
        run_state.register_current_thread();
        if self.index == 0 {
            counters
                .first_entry_ns
                .store(monotonic_ns(), Ordering::Relaxed);
        }
        while !run_state.stopping() {
            #[cfg(debug_assertions)]
            crate::debug_hooks::run_pending(ThreadKind::Vcpu);
            if run_state.pause_requested() {
                run_state.park();
                continue;
            }
            let reason = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    counters.pio.fetch_add(1, Ordering::Relaxed);
                    if !pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    counters.pio.fetch_add(1, Ordering::Relaxed);
                    pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    counters.mmio.fetch_add(1, Ordering::Relaxed);
                    if !mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    counters.mmio.fetch_add(1, Ordering::Relaxed);
                    mmio.write(addr, data);
                    None
                }
                Ok(VcpuExit::Hlt) => {
                    counters.hlt.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault),
                Ok(VcpuExit::SystemEvent(..)) => Some(ExitReason::Reset),
                Ok(VcpuExit::InternalError) => {
                    let suberror = {
                        let run = self.fd.get_kvm_run();
                        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the `internal`
                        // member of the union is the one KVM filled in.
                        unsafe { run.__bindgen_anon_1.internal.suberror }
                    };
                    Some(ExitReason::Fatal(format!(
                        "KVM internal error (suberror {suberror})\n{}",
                        self.dump()
                    )))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Fatal(format!(
                    "KVM entry failure (hardware reason {reason:#x} on cpu {cpu})\n{}",
                    self.dump()
                ))),
                Ok(VcpuExit::Intr) => {
                    counters.interrupted.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Ok(other) => {
                    counters.other.fetch_add(1, Ordering::Relaxed);
                    let what = format!("{other:?}");
                    Some(ExitReason::Fatal(format!(
                        "unexpected vCPU exit {what}\n{}",
                        self.dump()
                    )))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    counters.interrupted.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(e) => Some(ExitReason::Fatal(format!(
                    "KVM_RUN failed: {e}\n{}",
                    self.dump()
                ))),
            };
            if let Some(r) = reason {
                let _ = exit.send(r);
                return;
            }
        }
    }
}

/// Shared state the vCPU threads need.
#[derive(Debug, Clone)]
pub struct VcpuShared {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Run, pause or stop.
    pub run_state: Arc<RunState>,
    /// Exit counters.
    pub counters: Arc<ExitCounters>,
    /// Where exit reasons are sent.
    pub exit_tx: ExitSender,
    /// Where the VMM's main thread waits for them.
    pub exit_rx: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<ExitReason>>>,
    /// The seccomp filters each thread installs on itself.
    pub filters: Filters,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_ns_reads_the_clock_std_measures_with() {
        let a = monotonic_ns();
        let t = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = monotonic_ns();
        let elapsed = u64::try_from(t.elapsed().as_nanos()).unwrap();
        assert!(a > 0 && b > a);
        // Same clock as Instant: the two intervals agree within a few ms.
        assert!(
            (b - a).abs_diff(elapsed) < 5_000_000,
            "{} vs {elapsed}",
            b - a
        );
    }
}
