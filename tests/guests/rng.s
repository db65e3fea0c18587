# A virtio-rng driver in miniature. It probes the virtio-mmio window at 0xd0000000,
# negotiates VERSION_1 through ACKNOWLEDGE / DRIVER / FEATURES_OK / DRIVER_OK, sets up an
# 8-entry split queue, asks twice for 16 random bytes (polling the used ring, no
# interrupts), prints
#   husk rng: len=0x00000010 0x00000010 bad_len=0x00000000 status=0x0000000f a=<32 hex> b=<32 hex>
# and resets. The third request points outside RAM: it must come back empty while the
# device stays usable (status still DRIVER_OK, no NEEDS_RESET). Any step the device refuses prints "husk rng: FAIL <step>" instead.
.code32
.include "common.s"

.set MMIO, 0xd0000000
.set DESC, 0x10000          # 8 descriptors * 16 bytes
.set AVAIL, 0x10100         # flags, idx, ring[8]
.set USED, 0x10200          # flags, idx, ring[8] of {id, len}
.set BUF, 0x11000           # two 16-byte buffers

.macro FAIL step
    PRINT "husk rng: FAIL \step"
    call newline
    jmp reset
.endm

.text
.globl _start
_start:
    mov $0x80000, %esp
    mov $MMIO, %ebp
    cmpl $0x74726976, 0x00(%ebp)    # magic "virt"
    je 1f
    FAIL magic
1:  cmpl $2, 0x04(%ebp)             # version 2 (virtio 1.x)
    je 1f
    FAIL version
1:  cmpl $4, 0x08(%ebp)             # device id 4: entropy
    je 1f
    FAIL device_id
1:
    movl $0, 0x70(%ebp)             # reset
    movl $1, 0x70(%ebp)             # ACKNOWLEDGE
    movl $3, 0x70(%ebp)             # DRIVER
    movl $1, 0x14(%ebp)             # device features, high half
    testl $1, 0x10(%ebp)            # VERSION_1 (bit 32)
    jnz 1f
    FAIL version_1
1:  movl $0, 0x24(%ebp)
    movl $0, 0x20(%ebp)             # driver features, low half: none
    movl $1, 0x24(%ebp)
    movl $1, 0x20(%ebp)             # high half: VERSION_1
    movl $0xb, 0x70(%ebp)           # FEATURES_OK
    cmpl $0xb, 0x70(%ebp)
    je 1f
    FAIL features_ok
1:  movl $0, 0x30(%ebp)             # queue 0
    cmpl $0, 0x44(%ebp)
    je 1f
    FAIL queue_not_fresh
1:  cmpl $8, 0x34(%ebp)
    jae 1f
    FAIL queue_num_max
1:  movl $8, 0x38(%ebp)
    movl $DESC, 0x80(%ebp)
    movl $0, 0x84(%ebp)
    movl $AVAIL, 0x90(%ebp)
    movl $0, 0x94(%ebp)
    movl $USED, 0xa0(%ebp)
    movl $0, 0xa4(%ebp)
    movl $1, 0x44(%ebp)             # QueueReady
    movl $0xf, 0x70(%ebp)           # DRIVER_OK
    cmpl $0xf, 0x70(%ebp)
    je 1f
    FAIL driver_ok
1:
    movw $1, AVAIL                  # VRING_AVAIL_F_NO_INTERRUPT: we poll
    # Request 1: descriptor 0 -> BUF, 16 bytes, device-writable.
    movl $BUF, DESC
    movl $0, DESC+4
    movl $16, DESC+8
    movw $2, DESC+12                # VRING_DESC_F_WRITE
    movw $0, AVAIL+4                # ring[0] = descriptor 0
    movw $1, AVAIL+2                # idx = 1
    movl $0, 0x50(%ebp)             # QueueNotify
    mov $1, %eax
    call wait_used
    # Request 2: descriptor 1 -> BUF+16.
    movl $BUF+16, DESC+16
    movl $0, DESC+20
    movl $16, DESC+24
    movw $2, DESC+28
    movw $1, AVAIL+6                # ring[1] = descriptor 1
    movw $2, AVAIL+2                # idx = 2
    movl $0, 0x50(%ebp)
    mov $2, %eax
    call wait_used

    # Request 3: a buffer in the MMIO hole, where there is no RAM. The device must end
    # the request with nothing written, and live on.
    movl $0xf0000000, DESC+32
    movl $0, DESC+36
    movl $16, DESC+40
    movw $2, DESC+44
    movw $2, AVAIL+8                # ring[2] = descriptor 2
    movw $3, AVAIL+2                # idx = 3
    movl $0, 0x50(%ebp)
    mov $3, %eax
    call wait_used

    PRINT "husk rng: len="
    mov USED+8, %eax                # used ring[0].len
    call print_hex
    PRINT " "
    mov USED+16, %eax               # used ring[1].len
    call print_hex
    PRINT " bad_len="
    mov USED+24, %eax               # used ring[2].len
    call print_hex
    PRINT " status="
    mov 0x70(%ebp), %eax
    call print_hex
    PRINT " a="
    mov $BUF, %ebx
    call print16
    PRINT " b="
    mov $BUF+16, %ebx
    call print16
    call newline
reset:
    RESET

# wait_used: spin until the used index reaches %eax (bounded). Clobbers %ecx.
wait_used:
    mov $0x1000000, %ecx
1:  cmpw %ax, USED+2
    je 2f
    dec %ecx
    jnz 1b
    FAIL used_ring_timeout
2:  ret

# print16: print the 16 bytes at %ebx as 32 hex digits (four little-endian words).
print16:
    mov (%ebx), %eax
    call print_hex_digits
    mov 4(%ebx), %eax
    call print_hex_digits
    mov 8(%ebx), %eax
    call print_hex_digits
    mov 12(%ebx), %eax
    call print_hex_digits
    ret

PVH_NOTE _start
