# Loads an empty IDT and raises an exception: with nowhere to deliver it the CPU
# triple-faults, which is how Linux's reboot=t resets. husk-vmm must end with status 0.
.code32
.include "common.s"
.text
.globl _start
_start:
    mov $0x80000, %esp
    PRINT "husk triplefault: faulting"
    call newline
    lidt empty_idt
    ud2

.balign 8
empty_idt:
    .word 0
    .long 0

PVH_NOTE _start
