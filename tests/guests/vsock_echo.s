# A virtio-vsock echo server in miniature, for husk-vmm's hybrid vsock. It drives the
# virtio-mmio device at 0xd0000000 (id 19): negotiates VERSION_1, sets up the rx and tx
# queues (8 entries each), posts 8 rx buffers and prints "husk vsock: ready". Then, polling
# the rx used ring (no interrupts), it answers every packet from the host:
#   REQUEST -> RESPONSE, RW -> RW with the same payload, SHUTDOWN -> RST,
#   CREDIT_REQUEST -> CREDIT_UPDATE; anything else is dropped.
# It accepts any port, so any number of connections at once. It advertises a 4 KiB
# receive buffer per connection, so the host must wait for credit (carried in fwd_cnt
# of every reply) to send more than that. fwd_cnt is kept per host port (low 8 bits).
.code32
.include "common.s"

.include "vsock_setup.s"
.set FWD, 0x40000            # 256 x u32 fwd_cnt, by host port & 0xff
.set BUF_ALLOC, 0x1000

.macro FAIL step
    PRINT "husk vsock: FAIL \step"
    call newline
    RESET
.endm

.text
.globl _start
_start:
    mov $0x80000, %esp
    VSOCK_SETUP
    PRINT "husk vsock: ready"
    call newline

main:
    mov rx_last, %ecx
1:  cmpw %cx, RXU+2
    je 1b
    mov %ecx, %eax
    and $(QSZ-1), %eax
    mov RXU+4(,%eax,8), %edx        # used element id: the rx descriptor
    and $(QSZ-1), %edx
    mov %edx, cur_id
    mov %edx, %ebx
    shl $12, %ebx
    add $RXBUF, %ebx                # the packet
    movzwl 30(%ebx), %eax           # op
    cmp $1, %eax
    je do_request
    cmp $5, %eax
    je do_rw
    cmp $4, %eax
    je do_shutdown
    cmp $7, %eax
    je do_credit_request
    jmp repost

do_request:
    mov 16(%ebx), %ecx              # host port
    and $0xff, %ecx
    movl $0, FWD(,%ecx,4)
    mov $2, %eax                    # RESPONSE
    xor %edi, %edi
    call reply
    jmp repost
do_rw:
    mov 24(%ebx), %edi              # len
    cmp $(0x1000-44), %edi
    jbe 1f
    FAIL rw_too_long
1:  mov 16(%ebx), %ecx
    and $0xff, %ecx
    add %edi, FWD(,%ecx,4)          # consumed (we echo it right away)
    mov $5, %eax                    # RW
    call reply
    jmp repost
do_shutdown:
    mov $3, %eax                    # RST
    xor %edi, %edi
    call reply
    jmp repost
do_credit_request:
    mov $6, %eax                    # CREDIT_UPDATE
    xor %edi, %edi
    call reply

repost:
    movzwl RXA+2, %eax
    mov %eax, %esi
    and $(QSZ-1), %esi
    mov cur_id, %edx
    movw %dx, RXA+4(,%esi,2)
    inc %eax
    movw %ax, RXA+2
    movl $0, 0x50(%ebp)             # notify rx: buffers are back
    incl rx_last
    jmp main

# reply: send a packet answering the rx packet at %ebx: op %eax, payload length %edi
# (copied from the rx packet's payload). Clobbers everything but %ebx and %ebp.
reply:
    mov tx_idx, %esi
    and $(QSZ-1), %esi
    mov %esi, %edx
    shl $12, %edx
    add $TXBUF, %edx                # tx buffer
    mov 8(%ebx), %ecx               # src_cid = their dst_cid
    mov %ecx, 0(%edx)
    mov 12(%ebx), %ecx
    mov %ecx, 4(%edx)
    mov 0(%ebx), %ecx               # dst_cid = their src_cid
    mov %ecx, 8(%edx)
    mov 4(%ebx), %ecx
    mov %ecx, 12(%edx)
    mov 20(%ebx), %ecx              # src_port = their dst_port
    mov %ecx, 16(%edx)
    mov 16(%ebx), %ecx              # dst_port = their src_port
    mov %ecx, 20(%edx)
    mov %edi, 24(%edx)              # len
    movw $1, 28(%edx)               # STREAM
    movw %ax, 30(%edx)              # op
    movl $0, 32(%edx)               # flags
    movl $BUF_ALLOC, 36(%edx)       # buf_alloc
    mov 16(%ebx), %ecx
    and $0xff, %ecx
    mov FWD(,%ecx,4), %ecx
    mov %ecx, 40(%edx)              # fwd_cnt
    mov %edi, %ecx                  # payload
    lea 44(%ebx), %esi
    lea 44(%edx), %edi
    cld
    rep movsb
    mov tx_idx, %esi                # descriptor j = tx_idx % 8
    and $(QSZ-1), %esi
    mov %esi, %ecx
    shl $4, %ecx
    mov %edx, TXD(%ecx)
    movl $0, TXD+4(%ecx)
    mov 24(%edx), %eax
    add $44, %eax
    mov %eax, TXD+8(%ecx)
    movl $0, TXD+12(%ecx)           # flags 0 (device-readable), next 0
    movzwl TXA+2, %eax
    mov %eax, %ecx
    and $(QSZ-1), %ecx
    movw %si, TXA+4(,%ecx,2)
    inc %eax
    movw %ax, TXA+2
    incl tx_idx
    movl $1, 0x50(%ebp)             # notify tx
    ret

PVH_NOTE _start
