//! A small eBPF assembler: the handful of instructions a device-cgroup program needs, with
//! forward labels, encoded in the kernel's `struct bpf_insn` format. Pure: no syscalls here.
//!
//! Why hand-written: the program uses seven opcodes, and each is one 8-byte struct. The
//! maintained pure-Rust options are rbpf (an eBPF interpreter and JIT whose `insn_builder` youki
//! uses; we would ship a VM to emit 80 instructions) and aya-obj (an ELF/BTF object loader).
//! Neither earns its size in the static agent, and the encoding is fixed kernel ABI.
//!
//! `struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }`, little-endian
//! (the guest is x86-64). A jump's `off` counts instructions from the one after the jump.

/// Registers: r0 is the return value, r1 the context pointer on entry, r1–r5 scratch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    R0 = 0,
    R1 = 1,
    R2 = 2,
    R3 = 3,
    R4 = 4,
    R5 = 5,
}

// Instruction classes, sizes, modes, operations (include/uapi/linux/bpf_common.h, bpf.h).
pub const CLASS_LDX: u8 = 0x01;
pub const CLASS_ALU: u8 = 0x04; // 32-bit ALU
pub const CLASS_JMP: u8 = 0x05; // 64-bit compares
pub const CLASS_JMP32: u8 = 0x06; // 32-bit compares (Linux 5.1)
pub const CLASS_ALU64: u8 = 0x07;
pub const SIZE_W: u8 = 0x00;
pub const MODE_MEM: u8 = 0x60;
pub const SRC_K: u8 = 0x00;
pub const OP_AND: u8 = 0x50;
pub const OP_RSH: u8 = 0x70;
pub const OP_MOV: u8 = 0xb0;
pub const JMP_JA: u8 = 0x00;
pub const JMP_JSET: u8 = 0x40;
pub const JMP_JNE: u8 = 0x50;
pub const JMP_EXIT: u8 = 0x90;

/// One instruction, as the kernel reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    /// The 8 bytes of `struct bpf_insn`.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.dst & 0x0f) | ((self.src & 0x0f) << 4);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }

    /// The class bits (low three).
    #[cfg(test)]
    pub fn class(self) -> u8 {
        self.code & 0x07
    }

    /// A jump other than `exit`: it has a target.
    #[cfg(test)]
    pub fn is_jump(self) -> bool {
        matches!(self.class(), CLASS_JMP | CLASS_JMP32) && self.code & 0xf0 != JMP_EXIT
    }

    /// An unconditional jump (`ja`).
    #[cfg(test)]
    pub fn is_ja(self) -> bool {
        self.code == CLASS_JMP | JMP_JA
    }

    #[cfg(test)]
    pub fn is_exit(self) -> bool {
        self.code == CLASS_JMP | JMP_EXIT
    }
}

/// The whole program as the bytes `BPF_PROG_LOAD` takes.
pub fn encode(prog: &[Insn]) -> Vec<u8> {
    prog.iter().flat_map(|i| i.to_bytes()).collect()
}

/// A jump target, bound to an instruction index once (`Asm::bind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// An assembly error: a label never bound, or a jump further than `off` (16 bits) reaches.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("label {0} is jumped to but never bound")]
    Unbound(usize),
    #[error("a jump from instruction {from} to {to} does not fit the 16-bit offset: the rule list is too long")]
    TooFar { from: usize, to: usize },
}

/// Instructions with symbolic forward jumps, resolved by [`Asm::finish`].
#[derive(Debug, Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    /// (instruction index, label) of each jump.
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` to the next instruction emitted.
    pub fn bind(&mut self, l: Label) {
        debug_assert!(self.labels[l.0].is_none(), "label bound twice");
        self.labels[l.0] = Some(self.insns.len());
    }

    /// Whether any jump so far targets `l`.
    pub fn used(&self, l: Label) -> bool {
        self.fixups.iter().any(|(_, f)| *f == l)
    }

    fn push(&mut self, code: u8, dst: Reg, src: Reg, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst: dst as u8,
            src: src as u8,
            off,
            imm,
        });
    }

    fn jump(&mut self, code: u8, dst: Reg, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.push(code, dst, Reg::R0, 0, imm);
    }

    /// `dst = *(u32 *)(src + off)`, zero-extended.
    pub fn ldx_w(&mut self, dst: Reg, src: Reg, off: i16) {
        self.push(CLASS_LDX | MODE_MEM | SIZE_W, dst, src, off, 0);
    }

    /// `dst = (u32)dst & imm` (32-bit ALU ops clear the upper half).
    pub fn and32(&mut self, dst: Reg, imm: i32) {
        self.push(CLASS_ALU | OP_AND | SRC_K, dst, Reg::R0, 0, imm);
    }

    /// `dst = (u32)dst >> imm`.
    pub fn rsh32(&mut self, dst: Reg, imm: i32) {
        self.push(CLASS_ALU | OP_RSH | SRC_K, dst, Reg::R0, 0, imm);
    }

    /// `dst = imm` (64-bit, sign-extended).
    pub fn mov64(&mut self, dst: Reg, imm: i32) {
        self.push(CLASS_ALU64 | OP_MOV | SRC_K, dst, Reg::R0, 0, imm);
    }

    /// `if (u32)dst != (u32)imm goto to`.
    pub fn jne32(&mut self, dst: Reg, imm: u32, to: Label) {
        self.jump(
            CLASS_JMP32 | JMP_JNE | SRC_K,
            dst,
            i32::from_ne_bytes(imm.to_ne_bytes()),
            to,
        );
    }

    /// `if dst & imm goto to`.
    pub fn jset(&mut self, dst: Reg, imm: i32, to: Label) {
        self.jump(CLASS_JMP | JMP_JSET | SRC_K, dst, imm, to);
    }

    /// `goto to`.
    pub fn ja(&mut self, to: Label) {
        self.jump(CLASS_JMP | JMP_JA, Reg::R0, 0, to);
    }

    pub fn exit(&mut self) {
        self.push(CLASS_JMP | JMP_EXIT, Reg::R0, Reg::R0, 0, 0);
    }

    /// Resolves every jump to its label's offset.
    pub fn finish(mut self) -> Result<Vec<Insn>, Error> {
        for &(at, l) in &self.fixups {
            let to = self.labels[l.0].ok_or(Error::Unbound(l.0))?;
            let off =
                i64::try_from(to).unwrap_or(i64::MAX) - i64::try_from(at).unwrap_or(i64::MAX) - 1;
            self.insns[at].off = i16::try_from(off).map_err(|_| Error::TooFar { from: at, to })?;
        }
        Ok(self.insns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        let mut a = Asm::new();
        let end = a.label();
        a.ldx_w(Reg::R2, Reg::R1, 4); // r2 = *(u32 *)(r1 + 4)
        a.and32(Reg::R2, 0xffff);
        a.rsh32(Reg::R3, 16);
        a.jne32(Reg::R4, 0xffff_fff0, end); // an immediate above i32::MAX keeps its bits
        a.jset(Reg::R3, 2, end);
        a.ja(end);
        a.bind(end);
        a.mov64(Reg::R0, 1);
        a.exit();
        let p = a.finish().unwrap();
        let bytes: Vec<[u8; 8]> = p.iter().map(|i| i.to_bytes()).collect();
        // The same encodings as the kernel's BPF_LDX_MEM(BPF_W, 2, 1, 4), BPF_ALU32_IMM(BPF_AND,
        // 2, 0xffff), BPF_ALU32_IMM(BPF_RSH, 3, 16), BPF_JMP32_IMM(BPF_JNE, 4, -16, 2),
        // BPF_JMP_IMM(BPF_JSET, 3, 2, 1), BPF_JMP_A(0), BPF_MOV64_IMM(0, 1), BPF_EXIT_INSN().
        assert_eq!(
            bytes,
            vec![
                [0x61, 0x12, 4, 0, 0, 0, 0, 0],
                [0x54, 0x02, 0, 0, 0xff, 0xff, 0, 0],
                [0x74, 0x03, 0, 0, 16, 0, 0, 0],
                [0x56, 0x04, 2, 0, 0xf0, 0xff, 0xff, 0xff],
                [0x45, 0x03, 1, 0, 2, 0, 0, 0],
                [0x05, 0x00, 0, 0, 0, 0, 0, 0],
                [0xb7, 0x00, 0, 0, 1, 0, 0, 0],
                [0x95, 0x00, 0, 0, 0, 0, 0, 0],
            ]
        );
        assert_eq!(encode(&p).len(), 64);
        assert!(p[3].is_jump() && p[5].is_ja() && !p[7].is_jump() && p[7].is_exit());
    }

    #[test]
    fn unbound_labels_and_far_jumps_are_errors() {
        let mut a = Asm::new();
        let l = a.label();
        a.ja(l);
        assert_eq!(a.finish(), Err(Error::Unbound(0)));

        let mut a = Asm::new();
        let l = a.label();
        a.ja(l);
        for _ in 0..40_000 {
            a.mov64(Reg::R0, 0);
        }
        a.bind(l);
        a.exit();
        assert_eq!(
            a.finish(),
            Err(Error::TooFar {
                from: 0,
                to: 40_001
            })
        );
    }
}
