# Jumps into the MMIO hole, where there is no RAM to fetch instructions from: KVM cannot
# run or emulate that, reports an internal error, and husk-vmm must stop with a register
# dump (rip inside the hole) and a failing status instead of hanging or spinning.
.code32
.include "common.s"
.text
.globl _start
_start:
    mov $0x80000, %esp
    PRINT "husk mmiojump: jumping to 0xe0000000"
    call newline
    mov $0xe0000000, %eax
    jmp *%eax

PVH_NOTE _start
