# A guest that announces itself and then idles with interrupts off: the VMM must neither
# exit nor spin while it waits (used to measure an idle VMM's RSS and for host-side stops).
.code32
.include "common.s"
.text
.globl _start
_start:
    mov $0x80000, %esp
    PRINT "husk idle: ready"
    call newline
    cli
1:  hlt
    jmp 1b

PVH_NOTE _start
