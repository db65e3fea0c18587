# A virtio-net driver in miniature: finds the NIC at 0xd0000000 (id 1), negotiates
# VERSION_1 and MAC, sets up rx (8 x 2 KiB buffers) and tx, reads its MAC from the config
# space and broadcasts an ARP request for 10.99.0.1 from 10.99.0.2. It polls rx for the
# ARP reply (resending a few times) and prints
#   husk net: arp reply from xx:xx:xx:xx:xx:xx
# with the replier's MAC, then resets. No reply prints "husk net: FAIL no_reply".
.code32
.include "common.s"

.set MMIO, 0xd0000000
.set QSZ, 8
.set RXD, 0x10000
.set RXA, 0x10100
.set RXU, 0x10200
.set TXD, 0x10400
.set TXA, 0x10500
.set TXU, 0x10600
.set RXBUF, 0x20000             # 8 x 2 KiB
.set TXBUF, 0x30000
.set rx_last, 0x41000
.set tries, 0x41004

.macro FAIL step
    PRINT "husk net: FAIL \step"
    call newline
    RESET
.endm

.text
.globl _start
_start:
    mov $0x80000, %esp
    mov $MMIO, %ebp
    cmpl $0x74726976, 0x00(%ebp)
    je 1f
    FAIL magic
1:  cmpl $1, 0x08(%ebp)             # network card
    je 1f
    FAIL device_id
1:  movl $0, 0x70(%ebp)
    movl $1, 0x70(%ebp)
    movl $3, 0x70(%ebp)
    movl $0, 0x24(%ebp)
    movl $0x20, 0x20(%ebp)          # VIRTIO_NET_F_MAC
    movl $1, 0x24(%ebp)
    movl $1, 0x20(%ebp)             # VERSION_1
    movl $0xb, 0x70(%ebp)
    cmpl $0xb, 0x70(%ebp)
    je 1f
    FAIL features_ok
1:  movl $0, 0x30(%ebp)             # rx
    movl $QSZ, 0x38(%ebp)
    movl $RXD, 0x80(%ebp)
    movl $0, 0x84(%ebp)
    movl $RXA, 0x90(%ebp)
    movl $0, 0x94(%ebp)
    movl $RXU, 0xa0(%ebp)
    movl $0, 0xa4(%ebp)
    movl $1, 0x44(%ebp)
    movl $1, 0x30(%ebp)             # tx
    movl $QSZ, 0x38(%ebp)
    movl $TXD, 0x80(%ebp)
    movl $0, 0x84(%ebp)
    movl $TXA, 0x90(%ebp)
    movl $0, 0x94(%ebp)
    movl $TXU, 0xa0(%ebp)
    movl $0, 0xa4(%ebp)
    movl $1, 0x44(%ebp)
    movl $0xf, 0x70(%ebp)
    cmpl $0xf, 0x70(%ebp)
    je 1f
    FAIL driver_ok
1:  xor %ecx, %ecx                  # rx buffers: descriptor i -> RXBUF + i * 2 KiB
2:  mov %ecx, %eax
    shl $4, %eax
    mov %ecx, %edx
    shl $11, %edx
    add $RXBUF, %edx
    mov %edx, RXD(%eax)
    movl $0, RXD+4(%eax)
    movl $0x800, RXD+8(%eax)
    movl $2, RXD+12(%eax)           # WRITE, next 0
    movw %cx, RXA+4(,%ecx,2)
    inc %ecx
    cmp $QSZ, %ecx
    jb 2b
    movw $1, RXA
    movw $1, TXA
    movw $QSZ, RXA+2
    movl $0, 0x50(%ebp)
    movl $0, rx_last
    movl $0, tries

    # The frame: a zeroed virtio-net header, then the ARP request from the template,
    # with our MAC (config space bytes 0-5) patched in.
    mov $arp, %esi
    mov $TXBUF, %edi
    mov $(arp_end - arp), %ecx
    cld
    rep movsb
    mov 0x100(%ebp), %eax           # MAC bytes 0-3
    movzwl 0x104(%ebp), %edx        # MAC bytes 4-5
    mov %eax, TXBUF+12+6
    movw %dx, TXBUF+12+10
    mov %eax, TXBUF+12+22
    movw %dx, TXBUF+12+26
    movl $TXBUF, TXD
    movl $0, TXD+4
    movl $(arp_end - arp), TXD+8
    movl $0, TXD+12

send:
    incl tries
    cmpl $6, tries
    jbe 1f
    FAIL no_reply
1:  movzwl TXA+2, %eax
    mov %eax, %ecx
    and $(QSZ-1), %ecx
    movw $0, TXA+4(,%ecx,2)         # always descriptor 0: the same frame
    inc %eax
    movw %ax, TXA+2
    movl $1, 0x50(%ebp)
    mov $0x40000, %edi              # polls before resending

poll:
    mov rx_last, %ecx
    cmpw %cx, RXU+2
    jne got
    dec %edi
    jnz poll
    jmp send
got:
    and $(QSZ-1), %ecx
    mov RXU+4(,%ecx,8), %edx        # descriptor id
    and $(QSZ-1), %edx
    mov %edx, %ebx
    shl $11, %ebx
    add $RXBUF+12, %ebx             # the frame
    incl rx_last
    cmpw $0x0608, 12(%ebx)          # ethertype ARP
    jne repost
    cmpw $0x0200, 20(%ebx)          # reply
    jne repost
    cmpl $0x0100630a, 28(%ebx)      # from 10.99.0.1
    jne repost
    PRINT "husk net: arp reply from "
    lea 22(%ebx), %esi              # sender MAC
    mov $6, %ebx
3:  lodsb
    call print_byte
    dec %ebx
    jz 4f
    mov $COM1, %dx
    mov $':', %al
    outb %al, %dx
    jmp 3b
4:  call newline
    RESET
repost:
    movzwl RXA+2, %eax
    mov %eax, %ecx
    and $(QSZ-1), %ecx
    movw %dx, RXA+4(,%ecx,2)
    inc %eax
    movw %ax, RXA+2
    movl $0, 0x50(%ebp)
    jmp poll

# print_byte: %al as two hex digits. Clobbers %eax, %ecx, %edx.
print_byte:
    mov %eax, %ecx
    shr $4, %al
    call 5f
    mov %ecx, %eax
5:  and $0xf, %al
    cmp $10, %al
    jb 6f
    add $('a' - 10 - '0'), %al
6:  add $'0', %al
    mov $COM1, %dx
    outb %al, %dx
    ret

arp:
    .fill 12, 1, 0                  # virtio_net_hdr_v1
    .byte 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
    .fill 6, 1, 0                   # source MAC (patched)
    .byte 0x08, 0x06                # ARP
    .byte 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01
    .fill 6, 1, 0                   # sender MAC (patched)
    .byte 10, 99, 0, 2
    .fill 6, 1, 0
    .byte 10, 99, 0, 1
arp_end:

PVH_NOTE _start
