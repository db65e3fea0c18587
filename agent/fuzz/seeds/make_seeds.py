#!/usr/bin/env python3
"""Seed corpora for the targets, from the real specs in ../specs:
corpus/oci_spec/ and corpus/exec_process/ get the JSON as is, corpus/create_container/ the
specs wrapped in a CreateContainerRequest's protobuf encoding (container_id = 1,
oci_spec_json = 2, terminal = 3: protocols/protos/agent.proto)."""
import glob, os

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data


for d in ("oci_spec", "exec_process", "create_container"):
    os.makedirs(os.path.join(root, "corpus", d), exist_ok=True)
for path in sorted(glob.glob(os.path.join(root, "specs", "*.json"))):
    name = os.path.basename(path)
    data = open(path, "rb").read()
    target = "exec_process" if name.startswith("exec-") else "oci_spec"
    open(os.path.join(root, "corpus", target, name), "wb").write(data)
    if target == "oci_spec":
        for terminal in (0, 1):
            req = field(1, b"c1") + field(2, data) + (bytes([0x18, 1]) if terminal else b"")
            out = os.path.join(root, "corpus", "create_container", f"{name}.{terminal}.pb")
            open(out, "wb").write(req)
