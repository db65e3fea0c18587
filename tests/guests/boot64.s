# A guest without a PVH note: husk-vmm must enter it through the Linux 64-bit boot
# protocol (long mode, identity-mapped, %rsi = boot_params). It prints
#   husk boot64: e820=0x........ cmdline=<...>
# from the zero page, then resets.
.code64
.include "common.s"
.text
.globl _start
_start:
    mov $0x80000, %rsp
    mov %rsi, %rbp                  # boot_params
    cmpw $0xaa55, 0x1fe(%rbp)       # hdr.boot_flag
    jne bad
    PRINT "husk boot64: e820="
    movzbl 0x1e8(%rbp), %eax        # e820_entries
    call print_hex
    PRINT " cmdline=<"
    mov 0x228(%rbp), %esi           # hdr.cmd_line_ptr
    call puts
    PRINT ">"
    call newline
    RESET
bad:
    PRINT "husk boot64: no boot_params"
    call newline
    RESET
