# Reads one line from COM1 (polling the line status register's data-ready bit), then
# prints "husk serial: got <line>" and resets: console input reaches the guest.
.code32
.include "common.s"

.set LINE, 0x40000

.text
.globl _start
_start:
    mov $0x80000, %esp
    PRINT "husk serial: ready"
    call newline
    mov $LINE, %edi
1:  mov $(COM1 + 5), %dx            # LSR
    inb %dx, %al
    test $1, %al                    # data ready
    jz 1b
    mov $COM1, %dx                  # RBR
    inb %dx, %al
    mov %al, (%edi)
    inc %edi
    cmp $(LINE + 200), %edi
    jae 2f
    cmp $10, %al
    jne 1b
2:  movb $0, (%edi)
    PRINT "husk serial: got "
    mov $LINE, %esi
    call puts
    RESET

PVH_NOTE _start
