# Prints "husk tick 0x<n>" about every few milliseconds, forever: a guest whose progress
# the host can watch stop (pause) and start again (resume).
.code32
.include "common.s"
.text
.globl _start
_start:
    mov $0x80000, %esp
    xor %ebx, %ebx
tick:
    PRINT "husk tick "
    mov %ebx, %eax
    call print_hex
    call newline
    inc %ebx
    mov $50000, %ecx
1:  dec %ecx
    jnz 1b
    jmp tick

PVH_NOTE _start
