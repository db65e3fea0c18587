# A guest-initiated vsock connection: connects from guest port 40000 to host port 5000
# (husk-vmm forwards it to the unix socket <vsock-sock>_5000), sends
# "hello from the guest\n", prints what comes back as
#   husk vsock-client: got <data>
# then shuts the connection down and resets. A refused connection prints
#   husk vsock-client: refused
.code32
.include "common.s"

.macro FAIL step
    PRINT "husk vsock-client: FAIL \step"
    call newline
    RESET
.endm

.include "vsock_setup.s"
.set GUEST_PORT, 40000
.set HOST_PORT, 5000

.text
.globl _start
_start:
    mov $0x80000, %esp
    VSOCK_SETUP
    movl $0, rx_last
    movl $0, tx_idx
    movl $0, 0x50(%ebp)             # rx buffers are posted

    mov $1, %eax                    # REQUEST
    xor %edi, %edi
    call send
    call wait_rx
    movzwl 30(%ebx), %eax
    cmp $3, %eax                    # RST: nobody serves the port
    jne 1f
    PRINT "husk vsock-client: refused"
    call newline
    RESET
1:  cmp $2, %eax                    # RESPONSE
    je 1f
    FAIL no_response
1:
    mov $5, %eax                    # RW
    mov $(msg_end - msg), %edi
    mov $msg, %esi
    call send
2:  call wait_rx                    # skip credit updates until data comes
    movzwl 30(%ebx), %eax
    cmp $5, %eax
    je 3f
    cmp $6, %eax
    je 2b
    FAIL no_data
3:  PRINT "husk vsock-client: got "
    mov 24(%ebx), %ecx              # print the payload as it came
    lea 44(%ebx), %esi
    mov $COM1, %dx
4:  test %ecx, %ecx
    jz 5f
    lodsb
    outb %al, %dx
    dec %ecx
    jmp 4b
5:  mov $4, %eax                    # SHUTDOWN, both directions
    xor %edi, %edi
    call send
    RESET

# wait_rx: waits for the next rx packet; returns its buffer in %ebx.
wait_rx:
    mov rx_last, %ecx
    mov $0x4000000, %edx
1:  cmpw %cx, RXU+2
    jne 2f
    dec %edx
    jnz 1b
    FAIL rx_timeout
2:  and $(QSZ-1), %ecx
    mov RXU+4(,%ecx,8), %ebx        # descriptor id
    and $(QSZ-1), %ebx
    shl $12, %ebx
    add $RXBUF, %ebx
    incl rx_last
    ret

# send: op %eax, payload of %edi bytes at %esi, guest port 40000 -> host port 5000.
send:
    mov tx_idx, %edx
    and $(QSZ-1), %edx
    shl $12, %edx
    add $TXBUF, %edx
    mov 0x100(%ebp), %ecx           # our CID from the config space
    mov %ecx, 0(%edx)
    movl $0, 4(%edx)
    movl $2, 8(%edx)                # the host
    movl $0, 12(%edx)
    movl $GUEST_PORT, 16(%edx)
    movl $HOST_PORT, 20(%edx)
    mov %edi, 24(%edx)
    movw $1, 28(%edx)
    movw %ax, 30(%edx)
    movl $3, 32(%edx)               # flags (only SHUTDOWN looks at them)
    movl $0x1000, 36(%edx)          # buf_alloc
    movl $0, 40(%edx)               # fwd_cnt: we have consumed nothing yet
    mov %edi, %ecx
    lea 44(%edx), %edi
    cld
    rep movsb
    mov tx_idx, %esi
    and $(QSZ-1), %esi
    mov %esi, %ecx
    shl $4, %ecx
    mov %edx, TXD(%ecx)
    movl $0, TXD+4(%ecx)
    mov 24(%edx), %eax
    add $44, %eax
    mov %eax, TXD+8(%ecx)
    movl $0, TXD+12(%ecx)
    movzwl TXA+2, %eax
    mov %eax, %ecx
    and $(QSZ-1), %ecx
    movw %si, TXA+4(,%ecx,2)
    inc %eax
    movw %ax, TXA+2
    incl tx_idx
    movl $1, 0x50(%ebp)             # notify tx
    ret

msg:
    .ascii "hello from the guest\n"
msg_end:

PVH_NOTE _start
