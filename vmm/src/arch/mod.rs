//! x86-64 specifics: memory layout, CPUID, registers, the MP table.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
