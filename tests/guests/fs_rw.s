# A virtio-fs driver in miniature: finds the device at 0xd0000000 (id 26), checks the
# tag "husk" in its config space, sets up the request queue (queue 1), and sends FUSE
# requests to the backend (virtiofsd) one at a time, polling the used ring:
#   INIT, LOOKUP "hello.txt", OPEN (read-write), READ, WRITE (appends a line)
# It prints
#   husk fs: read <file contents>
#   husk fs: wrote 0x........
# and resets. A failing step prints "husk fs: FAIL <step>" (with FUSE's error number).
.code32
.include "common.s"

.set MMIO, 0xd0000000
.set QD, 0x10000
.set QA, 0x10100
.set QU, 0x10200
.set IN, 0x20000                 # request: fuse_in_header + arguments (device-readable)
.set OUT, 0x21000                # reply: fuse_out_header + data (device-writable)
.set NODE, 0x41000               # u64 nodeid of hello.txt
.set FH, 0x41008                 # u64 file handle
.set READ_LEN, 0x41010           # u32 bytes read
.set UNIQUE, 0x41014             # u32 request counter
.set O_RDWR, 2

.macro FAIL step
    PRINT "husk fs: FAIL \step"
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
1:  cmpl $26, 0x08(%ebp)            # virtio-fs
    je 1f
    FAIL device_id
1:  cmpl $0x6b737568, 0x100(%ebp)   # tag "husk"
    je 1f
    FAIL tag
1:  movl $0, 0x70(%ebp)
    movl $1, 0x70(%ebp)
    movl $3, 0x70(%ebp)
    movl $0, 0x24(%ebp)
    movl $0, 0x20(%ebp)
    movl $1, 0x24(%ebp)
    movl $1, 0x20(%ebp)             # VERSION_1 only
    movl $0xb, 0x70(%ebp)
    cmpl $0xb, 0x70(%ebp)
    je 1f
    FAIL features_ok
1:  movl $1, 0x30(%ebp)             # queue 1: requests
    movl $8, 0x38(%ebp)
    movl $QD, 0x80(%ebp)
    movl $0, 0x84(%ebp)
    movl $QA, 0x90(%ebp)
    movl $0, 0x94(%ebp)
    movl $QU, 0xa0(%ebp)
    movl $0, 0xa4(%ebp)
    movl $1, 0x44(%ebp)
    movl $0xf, 0x70(%ebp)
    cmpl $0xf, 0x70(%ebp)
    je 1f
    FAIL driver_ok
1:  movw $1, QA                     # no interrupts: we poll
    movl $0, UNIQUE

    # INIT: fuse_init_in { major 7, minor 31, max_readahead, flags, flags2, unused[11] }
    mov $26, %eax
    xor %edx, %edx
    call header
    movl $7, IN+40
    movl $31, IN+44
    mov $(40 + 64), %ecx
    call request
    jz 1f
    FAIL init
1:
    # LOOKUP "hello.txt" in the root (nodeid 1)
    mov $1, %eax
    mov $1, %edx
    call header
    mov $name, %esi
    mov $IN+40, %edi
    mov $(name_end - name), %ecx
    cld
    rep movsb
    mov $(40 + name_end - name), %ecx
    call request
    jz 1f
    FAIL lookup
1:  mov OUT+16, %eax                # fuse_entry_out.nodeid
    mov %eax, NODE
    mov OUT+20, %eax
    mov %eax, NODE+4

    # OPEN read-write: fuse_open_in { flags, open_flags }
    mov $14, %eax
    mov NODE, %edx
    call header
    movl $O_RDWR, IN+40
    mov $(40 + 8), %ecx
    call request
    jz 1f
    FAIL open
1:  mov OUT+16, %eax                # fuse_open_out.fh
    mov %eax, FH
    mov OUT+20, %eax
    mov %eax, FH+4

    # READ 256 bytes at 0: fuse_read_in { fh, offset, size, read_flags, lock_owner, flags, pad }
    mov $15, %eax
    mov NODE, %edx
    call header
    call put_fh
    movl $256, IN+56
    mov $(40 + 40), %ecx
    call request
    jz 1f
    FAIL read
1:  mov OUT, %ecx                   # out header len
    sub $16, %ecx
    mov %ecx, READ_LEN
    PRINT "husk fs: read "
    mov $OUT+16, %esi
    mov $COM1, %dx
2:  test %ecx, %ecx
    jz 3f
    lodsb
    outb %al, %dx
    dec %ecx
    jmp 2b
3:
    # WRITE at the end of what we read: fuse_write_in (40 bytes) + data
    mov $16, %eax
    mov NODE, %edx
    call header
    call put_fh
    mov READ_LEN, %eax
    mov %eax, IN+48                 # offset
    movl $(text_end - text), IN+56  # size
    mov $text, %esi
    mov $IN+80, %edi
    mov $(text_end - text), %ecx
    cld
    rep movsb
    mov $(40 + 40 + text_end - text), %ecx
    call request
    jz 1f
    FAIL write
1:  PRINT "husk fs: wrote "
    mov OUT+16, %eax                # fuse_write_out.size
    call print_hex
    call newline
    RESET

# header: fuse_in_header for opcode %eax on node %edx (low half), zeroing the arguments.
header:
    push %eax
    mov $IN, %edi
    mov $(0x200 / 4), %ecx
    xor %eax, %eax
    cld
    rep stosl
    pop %eax
    mov %eax, IN+4                  # opcode
    incl UNIQUE
    mov UNIQUE, %eax
    mov %eax, IN+8                  # unique
    mov %edx, IN+16                 # nodeid
    ret

put_fh:
    mov FH, %eax
    mov %eax, IN+40
    mov FH+4, %eax
    mov %eax, IN+44
    ret

# request: sends IN (%ecx bytes) with OUT as the reply buffer, waits for the reply.
# Returns ZF set when the reply's error is 0; otherwise prints it.
request:
    mov %ecx, IN                    # fuse_in_header.len
    movl $IN, QD                    # descriptor 0: the request, chained to 1
    movl $0, QD+4
    mov %ecx, QD+8
    movw $1, QD+12                  # NEXT
    movw $1, QD+14
    movl $OUT, QD+16                # descriptor 1: the reply
    movl $0, QD+20
    movl $0x1000, QD+24
    movw $2, QD+28                  # WRITE
    movw $0, QD+30
    movl $0, OUT+4
    movzwl QA+2, %eax
    mov %eax, %ecx
    and $7, %ecx
    movw $0, QA+4(,%ecx,2)
    inc %eax
    movw %ax, QA+2
    movl $1, 0x50(%ebp)             # notify queue 1
    mov $0x8000000, %ecx
1:  cmpw %ax, QU+2
    je 2f
    dec %ecx
    jnz 1b
    FAIL reply_timeout
2:  cmpl $0, OUT+4                  # fuse_out_header.error
    je 3f
    PRINT "husk fs: error "
    mov OUT+4, %eax
    call print_hex
    call newline
    cmpl $1, %esp                   # clear ZF
3:  ret

name:
    .asciz "hello.txt"
name_end:
text:
    .ascii "written by the guest\n"
text_end:

PVH_NOTE _start
