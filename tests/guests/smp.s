# Brings up the application processors the way an OS without ACPI does: the boot vCPU
# copies a real-mode trampoline to 0x8000 and sends INIT, SIPI, SIPI to all others through
# its local APIC. Each AP, starting in real mode at 0x8000, atomically counts itself in.
# The boot vCPU waits for the count to reach (MP table CPUs - 1) and prints
#   husk smp: cpus=0x........ aps_up=0x........
# then resets. A missing AP prints aps_up short of cpus-1 after a bounded wait.
.code32
.include "common.s"

.set TRAMPOLINE, 0x8000
.set COUNTER, 0x9000
.set LAPIC_ICR_LO, 0xfee00300
.set LAPIC_ICR_HI, 0xfee00310

.text
.globl _start
_start:
    mov $0x80000, %esp
    movl $0, COUNTER
    # CPUs from CPUID.1:EBX[23:16] (the sysinfo guest checks it matches the MP table).
    mov $1, %eax
    cpuid
    shr $16, %ebx
    and $0xff, %ebx
    mov %ebx, %ebp                  # total vCPUs

    # Copy the trampoline below 1 MiB, where a real-mode AP can start.
    mov $ap_start, %esi
    mov $TRAMPOLINE, %edi
    mov $(ap_end - ap_start), %ecx
    cld
    rep movsb

    movl $0, LAPIC_ICR_HI
    movl $0x000c4500, LAPIC_ICR_LO  # INIT, all excluding self
    call delay
    movl $0x000c4608, LAPIC_ICR_LO  # SIPI, vector 0x08 -> 0x8000
    call delay
    movl $0x000c4608, LAPIC_ICR_LO  # SIPI again, as the MP spec says
    lea -1(%ebp), %ebx              # APs expected
    mov $0x200000, %ecx
wait:
    cmp %ebx, COUNTER
    jae done
    dec %ecx
    jnz wait
done:
    PRINT "husk smp: cpus="
    mov %ebp, %eax
    call print_hex
    PRINT " aps_up="
    mov COUNTER, %eax
    call print_hex
    call newline
    RESET

delay:
    mov $20000, %ecx
1:  dec %ecx
    jnz 1b
    ret

# The AP trampoline: 16-bit real mode at 0x8000 (cs=0x0800, ip=0).
.code16
ap_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lock incl COUNTER
1:  hlt
    jmp 1b
ap_end:

.code32
PVH_NOTE _start
