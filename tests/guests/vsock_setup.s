# Shared by the vsock guests: the memory layout, and VSOCK_SETUP, which finds the
# virtio-vsock device at 0xd0000000, negotiates VERSION_1, sets up the rx (0) and tx (1)
# queues with 8 entries each (polled: no interrupts), posts 8 rx buffers of 4 KiB and
# leaves %ebp = the MMIO window. Needs a FAIL macro (print + reset) defined before it.

.set MMIO, 0xd0000000
.set QSZ, 8
.set RXD, 0x10000
.set RXA, 0x10100
.set RXU, 0x10200
.set TXD, 0x10400
.set TXA, 0x10500
.set TXU, 0x10600
.set RXBUF, 0x20000          # 8 x 4 KiB
.set TXBUF, 0x30000          # 8 x 4 KiB
.set VARS, 0x41000
.set rx_last, VARS           # u32: rx used entries handled
.set tx_idx, VARS+4          # u32: tx packets sent
.set cur_id, VARS+8          # u32: rx descriptor being handled


.macro VSOCK_SETUP
    mov $MMIO, %ebp
    cmpl $0x74726976, 0x00(%ebp)
    je 91f
    FAIL magic
91: cmpl $19, 0x08(%ebp)            # vsock
    je 91f
    FAIL device_id
91: movl $0, 0x70(%ebp)
    movl $1, 0x70(%ebp)
    movl $3, 0x70(%ebp)
    movl $1, 0x14(%ebp)
    testl $1, 0x10(%ebp)            # VERSION_1
    jnz 91f
    FAIL version_1
91: movl $0, 0x24(%ebp)
    movl $0, 0x20(%ebp)
    movl $1, 0x24(%ebp)
    movl $1, 0x20(%ebp)
    movl $0xb, 0x70(%ebp)
    cmpl $0xb, 0x70(%ebp)
    je 91f
    FAIL features_ok
91: movl $0, 0x30(%ebp)             # queue 0: rx
    movl $QSZ, 0x38(%ebp)
    movl $RXD, 0x80(%ebp)
    movl $0, 0x84(%ebp)
    movl $RXA, 0x90(%ebp)
    movl $0, 0x94(%ebp)
    movl $RXU, 0xa0(%ebp)
    movl $0, 0xa4(%ebp)
    movl $1, 0x44(%ebp)
    movl $1, 0x30(%ebp)             # queue 91: tx
    movl $QSZ, 0x38(%ebp)
    movl $TXD, 0x80(%ebp)
    movl $0, 0x84(%ebp)
    movl $TXA, 0x90(%ebp)
    movl $0, 0x94(%ebp)
    movl $TXU, 0xa0(%ebp)
    movl $0, 0xa4(%ebp)
    movl $1, 0x44(%ebp)
    movl $0xf, 0x70(%ebp)           # DRIVER_OK
    cmpl $0xf, 0x70(%ebp)
    je 91f
    FAIL driver_ok
91:
    # Post the 8 rx buffers: descriptor i -> RXBUF + i * 4 KiB, device-writable.
    xor %ecx, %ecx
92: mov %ecx, %eax
    shl $4, %eax
    mov %ecx, %edx
    shl $12, %edx
    add $RXBUF, %edx
    mov %edx, RXD(%eax)
    movl $0, RXD+4(%eax)
    movl $0x1000, RXD+8(%eax)
    movw $2, RXD+12(%eax)           # VRING_DESC_F_WRITE
    movw $0, RXD+14(%eax)
    movw %cx, RXA+4(,%ecx,2)
    inc %ecx
    cmp $QSZ, %ecx
    jb 92b
    movw $1, RXA                    # no interrupts: we poll
    movw $1, TXA
    movw $QSZ, RXA+2
    movl $0, rx_last
    movl $0, tx_idx
    movl $0, 0x50(%ebp)             # notify rx
.endm
