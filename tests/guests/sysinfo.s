# Reports what the VMM handed over, then resets:
#   husk sysinfo: mp_cpus=0x........ cpuid_cpus=0x........ ram=0x................ cmdline=<...>
# mp_cpus counts processor entries of the MP table found in the EBDA; cpuid_cpus is
# CPUID.1:EBX[23:16]; ram is the sum of the RAM entries of the PVH memory map (16 hex digits);
# cmdline is the string at start_info.cmdline_paddr.
.code32
.include "common.s"
.text
.globl _start
_start:
    mov $0x80000, %esp
    mov %ebx, %ebp                  # hvm_start_info
    cmpl $0x336ec578, (%ebp)
    jne bad

    PRINT "husk sysinfo: mp_cpus="
    mov $0x9fc00, %edi              # the MP floating pointer lives in the EBDA's first KiB
scan:
    cmpl $0x5f504d5f, (%edi)        # "_MP_"
    je found
    add $16, %edi
    cmp $0xa0000, %edi
    jb scan
    jmp bad
found:
    mov 4(%edi), %esi               # configuration table
    cmpl $0x504d4350, (%esi)        # "PCMP"
    jne bad
    movzwl 34(%esi), %ecx           # entry count
    lea 44(%esi), %edi
    xor %ebx, %ebx
entry:
    test %ecx, %ecx
    jz counted
    cmpb $0, (%edi)
    jne other
    inc %ebx
    add $20, %edi                   # processor entries are 20 bytes
    jmp next
other:
    add $8, %edi                    # every other entry is 8
next:
    dec %ecx
    jmp entry
counted:
    mov %ebx, %eax
    call print_hex

    PRINT " cpuid_cpus="
    mov $1, %eax
    cpuid
    mov %ebx, %eax
    shr $16, %eax
    and $0xff, %eax
    call print_hex

    PRINT " ram=0x"
    mov 40(%ebp), %esi              # memmap_paddr (low half; the map lives below 4 GiB)
    mov 48(%ebp), %ecx              # memmap_entries
    xor %ebx, %ebx                  # RAM total, low half
    xor %edi, %edi                  # RAM total, high half
mem:
    test %ecx, %ecx
    jz mem_done
    cmpl $1, 16(%esi)               # E820 RAM
    jne mem_next
    add 8(%esi), %ebx
    adc 12(%esi), %edi
mem_next:
    add $24, %esi
    dec %ecx
    jmp mem
mem_done:
    mov %edi, %eax
    call print_hex_digits           # clobbers %edi, so the low half waits in %ebx
    mov %ebx, %eax
    call print_hex_digits

    PRINT " cmdline=<"
    mov 24(%ebp), %esi              # cmdline_paddr
    call puts
    PRINT ">"
    call newline
    RESET

bad:
    PRINT "husk sysinfo: bad boot information"
    call newline
    RESET

PVH_NOTE _start
