#!/usr/bin/env python3
"""Writes seed inputs that take the fuzz targets past setup: a driver's full virtio-mmio
init sequence ending in a QueueNotify (mmio_transport), and a guest vsock connection to
host port 1 with data (vsock_queues). Run from vmm/fuzz: python3 seeds/make_seeds.py"""
import os
import struct

def poke(off, data):
    return struct.pack("<HH", off, len(data)) + data

def desc(addr, length, flags, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)

# --- mmio_transport: op byte 0x04 = 4-byte write of register (index*4), then u64 value;
# op 0x40 = poke guest memory.
def w(reg, val):
    return bytes([0x04, reg // 4]) + struct.pack("<Q", val)

def mpoke(off, data):
    return b"\x40" + poke(off, data)

mmio = b"".join([
    w(0x70, 1), w(0x70, 3),
    w(0x24, 1), w(0x20, 1),          # DriverFeaturesSel=1, VERSION_1
    w(0x70, 0xB),                     # FEATURES_OK
    w(0x30, 0), w(0x38, 16),
    w(0x80, 0x1000), w(0x84, 0), w(0x90, 0x2000), w(0x94, 0), w(0xA0, 0x3000), w(0xA4, 0),
    w(0x44, 1), w(0x70, 0xF),         # QueueReady, DRIVER_OK
    mpoke(0x1000, desc(0x4000, 64, 2)),
    mpoke(0x2000, struct.pack("<HHH", 0, 1, 0)),
    w(0x50, 0),                       # QueueNotify
    w(0x64, 1),                       # InterruptACK
])

# --- vsock_queues: three queues (sel 4 = size 16), then rounds of poke + notified queue.
def q(d, a, u):
    return bytes([4]) + struct.pack("<HHH", d, a, u)

def hdr(op, length, src_port=1000, dst_port=1):
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, 0, 65536, 0)

def rnd(off, data, notified):
    return poke(off, data) + bytes([notified])

vsock = q(0x1000, 0x2000, 0x3000) + q(0x4000, 0x5000, 0x6000) + q(0x7000, 0x7800, 0x7C00)
vsock += rnd(0x1000, desc(0x9000, 4096, 2) + desc(0xA000, 4096, 2), 2)
vsock += rnd(0x2000, struct.pack("<HHHH", 0, 2, 0, 1), 0)       # two rx buffers
vsock += rnd(0x4000, desc(0x8000, 44, 0) + desc(0x8100, 49, 0), 2)
vsock += rnd(0x8000, hdr(1, 0), 2)                                # REQUEST to port 1
vsock += rnd(0x8100, hdr(5, 5) + b"hello", 2)                     # RW "hello"
vsock += rnd(0x5000, struct.pack("<HHH", 0, 1, 0), 1)             # REQUEST available
vsock += rnd(0x5000, struct.pack("<HHHH", 0, 2, 0, 1), 1)         # and RW
vsock += rnd(0x2000, struct.pack("<HHHHH", 0, 4, 0, 1, 0), 0)

for target, data in [("mmio_transport", mmio), ("vsock_queues", vsock)]:
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + target), "wb") as f:
        f.write(data)
