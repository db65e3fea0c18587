# Helpers shared by the synthetic guests. No .code directive here: they assemble the same
# in 32-bit (PVH) and 64-bit (Linux boot protocol) guests, and they use no stack beyond
# the return address, so they need nothing set up but %esp/%rsp.

.set COM1, 0x3f8

# PVH entry note: linux-loader looks for Xen's PHYS32_ENTRY (type 18) in a PT_NOTE.
.macro PVH_NOTE entry
    .pushsection .note.Xen, "a"
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .long \entry
    .popsection
.endm

# Print a literal string on COM1.
.macro PRINT text
    .pushsection .rodata
.Lstr\@: .asciz "\text"
    .popsection
    mov $.Lstr\@, %esi
    call puts
.endm

# Ask the i8042 controller to reset the CPU: husk-vmm ends with status 0.
.macro RESET
    mov $0xfe, %al
    outb %al, $0x64
.Lhalt\@:
    hlt
    jmp .Lhalt\@
.endm

.text
# puts: print the NUL-terminated string at %esi. Clobbers %eax, %edx, %esi.
puts:
    mov $COM1, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  ret

# newline: print "\n". Clobbers %eax, %edx.
newline:
    mov $COM1, %dx
    mov $10, %al
    outb %al, %dx
    ret

# print_hex: print %eax as 0x followed by 8 hex digits. Clobbers %eax, %ecx, %edx, %edi.
print_hex:
    mov %eax, %edi
    mov $COM1, %dx
    mov $'0', %al
    outb %al, %dx
    mov $'x', %al
    outb %al, %dx
    mov %edi, %eax
# print_hex_digits: print %eax as 8 hex digits. Clobbers %eax, %ecx, %edx, %edi.
print_hex_digits:
    mov %eax, %edi
    mov $COM1, %dx
    mov $8, %ecx
1:  rol $4, %edi
    mov %edi, %eax
    and $0xf, %eax
    cmp $10, %eax
    jb 2f
    add $('a' - 10 - '0'), %eax
2:  add $'0', %eax
    outb %al, %dx
    dec %ecx
    jnz 1b
    ret
