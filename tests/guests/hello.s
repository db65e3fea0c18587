# The smallest useful guest: entered through PVH (32-bit protected mode), it prints one
# line on COM1 and asks the i8042 controller for a reset, which ends husk-vmm with status 0.
.code32
.text
.globl _start
_start:
    mov $msg, %esi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  mov $0xfe, %al
    outb %al, $0x64
3:  hlt
    jmp 3b
msg:
    .asciz "husk guest: hello\n"

.pushsection .note.Xen, "a"
.balign 4
.long 4, 4, 18
.asciz "Xen"
.long _start
.popsection
