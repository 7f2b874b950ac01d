#!/usr/bin/env python3
"""Writes the seed inputs of the uvdpa fuzz targets into fuzz/seeds/TARGET/.

Each seed is a well-formed input in the target's own input layout (see the doc comment at
the top of each fuzz_targets/TARGET.rs), so the fuzzer starts from deep states: a complete
vhost-user session whose memory table holds a ring with real virtio-blk requests, valid
block requests of every type, a valid split ring with an indirect table, a good IPC request.
Run from anywhere: python3 fuzz/seeds/gen_seeds.py
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def u8(v): return struct.pack("<B", v)
def u16(v): return struct.pack("<H", v)
def u32(v): return struct.pack("<I", v)
def u64(v): return struct.pack("<Q", v)


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- split_chain
NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr, ln, flags, nxt):
    return u64(addr) + u32(ln) + u16(flags) + u16(nxt)


def split_seed(size_exp, flags, heads, descs, rest=b"", avail_idx=None, next_avail=0):
    idx = (next_avail + len(heads)) & 0xFFFF if avail_idx is None else avail_idx
    out = u8(size_exp) + u8(flags) + u16(next_avail) + u16(idx) + u16(0) + u16(0)
    out += u8(len(heads)) + b"".join(u16(h) for h in heads)
    out += u8(len(descs)) + b"".join(descs)
    return out + rest


AREA = 0x3000
write("split_chain", "plain", split_seed(4, 1 | 2, [0, 2], [
    desc(0x8000, 16, NEXT, 1), desc(0x9000, 513, WRITE, 5),
    desc(AREA, 48, INDIRECT, 0), desc(0, 0, 0, 0), desc(0, 0, 0, 0),
    desc(0xa000, 1, WRITE, 0),
], rest=desc(0x8000, 16, NEXT, 1) + desc(0x9000, 4096, WRITE | NEXT, 2) + desc(0xb000, 1, WRITE, 0)))
# Crossing the boundary of two adjacent regions (three-region layout).
write("split_chain", "cross", split_seed(3, 2 | 8, [0], [
    desc(0xff00, 0x200, NEXT, 1), desc(0x1fff0, 0x20, WRITE, 0),
]))
write("split_chain", "wrap", split_seed(1, 1, [1, 0], [
    desc(0x8000, 16, 0, 0), desc(0x9000, 16, WRITE, 0),
], next_avail=0xffff))

# ---------------------------------------------------------------- blk_request
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ = range(6)  # indexes into TYPES


def blk_req(ty_idx, sector, data_mode, data, write_mode, extra=b"", rcuts=(), wcuts=()):
    out = u8(ty_idx) + u8(0) + u16(sector) + u32(0) + u8(data_mode) + data + u8(write_mode) + extra
    out += u8(len(rcuts)) + b"".join(u16(c) for c in rcuts)
    out += u8(len(wcuts)) + b"".join(u16(c) for c in wcuts)
    return out


def zero_seg(sector, n, flags):
    # f: bit0 0 -> sector u16, bit1 0 -> n u8, bit2 0 -> flags from bit 7
    return u8(flags << 7) + u16(sector) + u8(n)


reqs = b"".join([
    blk_req(T_OUT, 3, (2 << 2) | 0, u8(0x41), 2, rcuts=(8, 700)),     # write 1 KiB at sector 3
    blk_req(T_IN, 3, 3, b"", (2 << 2) | 0, wcuts=(100, 513, 1024)),   # read it back
    blk_req(T_GET_ID, 0, 3, b"", (30 << 2) | 3),                      # 22 bytes
    blk_req(T_WZ, 0, (1 << 2) | 2, zero_seg(4, 1, 1), (0 << 2) | 0),  # zero sector 4
    blk_req(T_DISCARD, 0, (2 << 2) | 2, zero_seg(0, 2, 0) + zero_seg(9, 1, 0), 0),
    blk_req(T_FLUSH, 0, 3, b"", 0),
    blk_req(T_IN, 0, 3, b"", (8 << 2) | 0, wcuts=(1, 2, 3)),
])
for cfg, name in [(0x30, "ram"), (0x31, "null"), (0x32, "file"), (0x33, "direct"), (0x3b, "direct4k"), (0x34, "ram_ro")]:
    write("blk_request", name, u8(cfg) + reqs)

# ---------------------------------------------------------------- vhost_user_stream
UADDR = 0x7F00_0000_0000
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, RESET_DEVICE, GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 24, 34, 36, 37, 38
SET_STATUS, GET_STATUS = 39, 40
NEED_REPLY = 0x20
FD_NONE, FD_MEMFD, FD_EVENT = 0, 1, 2


def msg(req, body=b"", fds=FD_NONE, need_reply=False, memfd=b""):
    op = fds | (NEED_REPLY if need_reply else 0)
    return u8(op) + u8(req) + u16(len(body)) + body + memfd


def memfd_spec(size_sel, writes):
    out = u8(size_sel | (len(writes) << 2))
    for off, data in writes:
        out += u32(off) + u16(len(data)) + data
    return out


def ring_memory(size_sel=2):
    """Desc table at 0 (+ an indirect table at 0x100), avail at 0x1000, used at 0x2000,
    request headers at 0x3000, data buffers above."""
    d = b"".join([
        desc(0x3000, 16, NEXT, 1), desc(0x4000, 512, WRITE | NEXT, 2), desc(0x5000, 1, WRITE, 0),
        desc(0x3010, 16, NEXT, 4), desc(0x6000, 512, NEXT, 5), desc(0x5001, 1, WRITE, 0),
        desc(0x100, 48, INDIRECT, 0),
    ])
    d = d.ljust(0x100, b"\0")
    d += desc(0x3020, 16, NEXT, 1) + desc(0x8000, 20, WRITE | NEXT, 2) + desc(0x5002, 1, WRITE, 0)
    avail = u16(0) + u16(3) + u16(0) + u16(3) + u16(6)
    hdrs = u32(0) + u32(0) + u64(0) + u32(1) + u32(0) + u64(1) + u32(8) + u32(0) + u64(0)
    return memfd_spec(size_sel, [(0, d), (0x1000, avail), (0x3000, hdrs)])


def region(gpa, size, uaddr, off):
    return u64(gpa) + u64(size) + u64(uaddr) + u64(off)


FEATURES = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28)
PROTOCOL = 0x1 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x10000


def vring_setup(index=0, num=16, base=0):
    return [
        msg(SET_VRING_NUM, u32(index) + u32(num)),
        msg(SET_VRING_ADDR, u32(index) + u32(0) + u64(UADDR) + u64(UADDR + 0x2000)
            + u64(UADDR + 0x1000) + u64(0), need_reply=True),
        msg(SET_VRING_BASE, u32(index) + u32(base)),
        msg(SET_VRING_CALL, u64(index), fds=FD_EVENT),
        msg(SET_VRING_ERR, u64(index), fds=FD_EVENT),
        msg(SET_VRING_ENABLE, u32(index) + u32(1)),
    ]


negotiate = [
    msg(GET_FEATURES),
    msg(SET_FEATURES, u64(FEATURES)),
    msg(GET_PROTOCOL_FEATURES),
    msg(SET_PROTOCOL_FEATURES, u64(PROTOCOL)),
    msg(SET_OWNER),
    msg(GET_QUEUE_NUM),
    msg(GET_MAX_MEM_SLOTS),
    msg(GET_CONFIG, u32(0) + u32(40) + u32(0) + bytes(40)),
]
mem_table = msg(SET_MEM_TABLE, u32(1) + u32(0) + region(0, 0x10_0000, UADDR, 0),
                fds=FD_MEMFD, need_reply=True, memfd=ring_memory())
run = [
    msg(SET_STATUS, u64(0xB), need_reply=True),
    msg(SET_VRING_KICK, u64(0), fds=FD_EVENT),
    msg(SET_STATUS, u64(0xF)),
    msg(GET_STATUS),
]
stop = [msg(GET_VRING_BASE, u32(0) + u32(0))]

write("vhost_user_stream", "session", u8(0) + b"".join(negotiate + [mem_table] + vring_setup() + run))
write("vhost_user_stream", "session_stop", u8(0) + b"".join(negotiate + [mem_table] + vring_setup() + run + stop))
# Memory replaced while the ring runs, then a device reset and a second start.
write("vhost_user_stream", "remap_reset", u8(1) + b"".join(
    negotiate + [mem_table] + vring_setup() + run + [mem_table, msg(RESET_DEVICE)]
    + [msg(SET_FEATURES, u64(FEATURES))] + [mem_table] + vring_setup() + run))
# CONFIGURE_MEM_SLOTS: ADD_MEM_REG then REM_MEM_REG.
add = msg(ADD_MEM_REG, u64(0) + region(0, 0x10_0000, UADDR, 0), fds=FD_MEMFD,
          need_reply=True, memfd=ring_memory())
add2 = msg(ADD_MEM_REG, u64(0) + region(0x10_0000, 0x1_0000, UADDR + 0x10_0000, 0), fds=FD_MEMFD,
           need_reply=True, memfd=memfd_spec(1, []))
rem2 = msg(REM_MEM_REG, u64(0) + region(0x10_0000, 0x1_0000, UADDR + 0x10_0000, 0), need_reply=True)
write("vhost_user_stream", "mem_slots", u8(0) + b"".join(negotiate + [add, add2] + vring_setup() + run + [rem2]))
# Without protocol features: rings are enabled as soon as they start.
write("vhost_user_stream", "legacy", u8(0) + b"".join(
    [msg(GET_FEATURES), msg(SET_FEATURES, u64((1 << 32) | (1 << 28))), msg(SET_OWNER), mem_table]
    + vring_setup()[:5] + [msg(SET_VRING_KICK, u64(0), fds=FD_EVENT)]))

# ---------------------------------------------------------------- ipc_message
def ipc_structured(action_idx, req_id, payload, fds=0):
    # nfds u8, mode u8 (bits 3-4 = 3: header + raw payload), action u8, f u8 (0: all sane),
    # payload (u16 length + bytes), req_id u64
    return u8(fds) + u8(3 << 3) + u8(action_idx) + u8(0) + u16(len(payload)) + payload + u64(req_id)


write("ipc_message", "echo", ipc_structured(0, 7, b'{"a":[1,2,{"b":null}]}', fds=2))
write("ipc_message", "unknown", ipc_structured(1, 8, b"") + ipc_structured(0, 9, b'"x"', fds=1))
write("ipc_message", "json", u8(0) + u8(2 << 3) + u8(0) + u8(0) + u8(4) + u8(3) + u8(2) + u64(5) + u8(1) + u64(11) + u8(0) + u64(12))

# ---------------------------------------------------------------- packed_chain
P_WRITE, P_INDIRECT, P_FLIP_NEXT, P_BREAK = 1, 2, 4, 8
OP_POP, OP_USED, OP_PUBLISH, OP_NEED, OP_SETN, OP_REWIND, OP_PUSH = 0, 2, 4, 5, 6, 7, 8
OP_RAW, OP_FILL, OP_EVENT, OP_AREA = 10, 11, 12, 13


def pdesc(addr, ln, id_, flags):
    return u64(addr) + u32(ln) + u16(id_) + u16(flags)


def p_desc(addr, ln, f=0, id_=0):
    """A driver-made descriptor operand: addr multiple of 16 below 1 MiB, len < 64 KiB."""
    assert addr % 16 == 0 and addr < (1 << 20) and ln < (1 << 16)
    return u8(f) + u16(addr >> 4) + u16(ln) + u16(id_)


def p_push(*descs):
    return u8(OP_PUSH) + u8(len(descs) - 1) + b"".join(descs)


def p_used(k=0, mode=1):
    return u8(OP_USED) + u8(k) + u8(mode)


def packed_seed(cfg, size, base, ops, area=b"", off_wrap=0, ev_flags=0):
    return u8(cfg) + u16(size - 1) + u16(base) + u16(off_wrap) + u16(ev_flags) + u16(len(area)) + area + b"".join(ops)


round_ = [p_push(p_desc(0x8000, 16), p_desc(0x9000, 512, P_WRITE, 7)), u8(OP_POP), p_used(),
          u8(OP_PUBLISH), u8(OP_NEED)]
# Indirect table (area follows the ring: size 16 -> 0x108) plus direct chains, event idx.
area = pdesc(0x8000, 16, 0, 0) + pdesc(0x9000, 4096, 0, P_WRITE) + pdesc(0xb000, 1, 0, P_WRITE)
write("packed_chain", "plain", packed_seed(3, 16, 0x8000, [
    u8(OP_SETN) + u8(1),
    p_push(p_desc(0x8000, 16), p_desc(0x9000, 513, P_WRITE, 1)),
    p_push(p_desc(0, 3, P_INDIRECT, 2)),
    u8(OP_POP), u8(OP_POP), u8(OP_POP), p_used(), p_used(), u8(OP_PUBLISH), u8(OP_NEED),
    u8(OP_SETN) + u8(0), u8(OP_SETN) + u8(1),
], area=area))
# Non-power-of-two ring, starting mid-ring with wrap counter 0; rounds over several wraps.
write("packed_chain", "wraps5", packed_seed(1, 5, 3, round_ * 8, ev_flags=2, off_wrap=0x8001))
# Pops then a rewind to where they started, then completions out of order.
write("packed_chain", "rewind", packed_seed(0, 8, 0x8000, [
    p_push(p_desc(0x8000, 100)), p_push(p_desc(0x8100, 100, P_WRITE, 3)), u8(OP_POP), u8(OP_POP),
    u8(OP_REWIND) + u8(0), u8(OP_POP), u8(OP_POP), p_used(1), p_used(0, 0), u8(OP_PUBLISH),
    u8(OP_NEED)]))
# Three regions: a buffer crossing the boundary at 0x20000 and one into the hole.
write("packed_chain", "cross", packed_seed(1 << 2, 64, 0x8000, [
    p_push(p_desc(0x1ff00, 0x200), p_desc(0x2ffe0, 0x20, P_WRITE)), u8(OP_POP), p_used(),
    p_push(p_desc(0x30000, 16)), u8(OP_POP), u8(OP_PUBLISH), u8(OP_NEED)]))
# A ring-long chain (fill with NEXT), popped whole.
write("packed_chain", "fill", packed_seed(1, 300, 0x8000, [
    u8(OP_FILL) + u16(299) + u8(2) + u16(0x1000) + u8(64), u8(OP_POP), p_used(), u8(OP_PUBLISH),
    u8(OP_NEED), u8(OP_FILL) + u16(99) + u8(1) + u16(0x2000) + u8(8)] + [u8(OP_POP)] * 4))

# ---------------------------------------------------------------- net_pair
F_MRG, F_CSUM, F_GUEST_CSUM, F_MTU, F_PACKED, F_EVENT_IDX, F_TSO4 = 1, 2, 4, 8, 16, 32, 64
N_TX, N_RX, N_PROCESS, N_REAP, N_SUPPRESS, N_CTRL = 0, 2, 4, 5, 6, 7
BUF_OFF = lambda off: u16(off >> 2)  # buffer at BUF + off


def n_tx(frame_len, hdr=b"", hdr_mode=0, seed=1, cuts=(), flags=0, at=0x20000, extra=b""):
    """hdr_mode 0 zero header, 1 raw (hdr = 12 bytes), 2 NEEDS_CSUM (hdr = start u16 + off u16)."""
    mode = hdr_mode | (1 << 2)  # length: u16
    return (u8(N_TX) + u8(mode) + hdr + u16(frame_len) + u8(seed) + u8(len(cuts) | flags)
            + b"".join(u16(c) for c in cuts) + BUF_OFF(at) + extra)


def n_rx(copies, lens, at):
    """`copies` chains of writable buffers of `lens` (raw u16 lengths), side by side from `at`."""
    body = u8(len(lens) - 1)
    for i, ln in enumerate(lens):
        body += u8(2) + u16(ln) + BUF_OFF(at + sum((n + 3) & ~3 for n in lens[:i]))
    return u8(N_RX | ((copies - 1) << 3)) + body


def net_seed(features, backend, rx_size_sel, tx_size_sel, steps, ctrl=0, mtu=1500, source=b""):
    return u16(features) + u8(ctrl) + u8(backend) + u16(mtu) + u8(rx_size_sel) + u8(tx_size_sel) + source + b"".join(steps)


def udp_frame_hdr():
    # NEEDS_CSUM: csum_start 34 (IPv4 header end), csum_offset 6 (UDP checksum).
    return u16(34) + u16(6)


P, R = u8(N_PROCESS), u8(N_REAP)
# Buffers never overlap in these, so the target also checks what arrives byte for byte.
write("net_pair", "loopback_split", net_seed(F_CSUM, 0, 4, 4, [
    n_rx(4, [2048], 0), n_tx(60), n_tx(1514, cuts=(5, 12, 700), at=0x21000), P, R,
    n_tx(1514, hdr=udp_frame_hdr(), hdr_mode=2, at=0x22000), P]))
write("net_pair", "loopback_csum_guest", net_seed(F_CSUM | F_GUEST_CSUM | F_EVENT_IDX, 0, 3, 3, [
    n_rx(2, [1526], 0x8000), n_tx(200, hdr=udp_frame_hdr(), hdr_mode=2), P, R,
    n_tx(300, hdr=u16(60000) + u16(6), hdr_mode=2, at=0x21000), P]))
write("net_pair", "loopback_mrg_packed", net_seed(F_MRG | F_PACKED | F_EVENT_IDX | F_CSUM, 0, 15, 7, [
    n_rx(8, [64], 0), n_rx(1, [5, 100], 0x1000), n_tx(1514, hdr=udp_frame_hdr(), hdr_mode=2, cuts=(3, 40)), P, R,
    n_tx(9000, at=0x21000), P, n_rx(2, [12, 4096], 0x2000), n_tx(600, at=0x24000), P, R]))
write("net_pair", "source_packed", net_seed(F_PACKED | F_MRG, 2, 9, 9, [n_rx(6, [2048], 0), P, R, n_rx(3, [100], 0x10000), P],
                                            source=u16(1000) + u8(7)))
# Sink with a GSO frame (TSO4 negotiated, MTU bound): header flags NEEDS_CSUM, gso TCPV4,
# hdr_len 54, gso_size 1448, csum 34/16.
gso = u8(1) + u8(1) + u16(54) + u16(1448) + u8(34) + u8(16)
write("net_pair", "sink_gso", net_seed(F_CSUM | F_TSO4 | F_MTU, 1, 4, 4, [
    u8(N_TX) + u8(3 | (1 << 2)) + gso + u16(20000) + u8(3) + u8(0) + BUF_OFF(0x20000), n_tx(1520, at=0x28000),
    n_tx(1519, at=0x29000), P, R]))


def ctrl_req(class_, cmd, data, wsel=1):
    return u8(N_CTRL) + u8(0) + u8(class_) + u8(cmd) + u8(len(data)) + data + u8(wsel) + u8(0) + u8(0)


def mac_tables(uni, multi):
    out = u8(N_CTRL) + u8(1) + u8(1) + u8(0)
    for n, first in ((uni, 0x02), (multi, 0x01)):
        out += u8(n) + u8(1) + u8(first)
    return out + u8(1) + u8(0) + u8(0)


write("net_pair", "ctrl", net_seed(0, 0, 0, 0, [
    ctrl_req(0, 0, u8(0)), ctrl_req(0, 3, u8(1)), mac_tables(2, 70), mac_tables(1, 0),
    ctrl_req(1, 1, bytes([2, 9, 9, 9, 9, 9])), ctrl_req(2, 0, u16(100)), ctrl_req(2, 1, u16(100)),
    ctrl_req(3, 0, b""), ctrl_req(4, 0, u16(8)), ctrl_req(5, 0, u64(2)), ctrl_req(4, 0, u16(9), wsel=3),
], ctrl=0xff))

# ---------------------------------------------------------------- vduse_request
# struct vduse_dev_request (152 bytes): type, request_id, reserved[4], 128-byte union.
def vduse_req(ty, rid, payload=b""):
    return u32(ty) + u32(rid) + bytes(16) + payload + bytes(128 - len(payload))


write("vduse_request", "get_vq_state", vduse_req(0, 1, u32(3)))
write("vduse_request", "set_status", vduse_req(1, 2, u8(0x0f)))
write("vduse_request", "update_iotlb", vduse_req(2, 3, u64(0) + u64(0xffffffffffffffff)))
write("vduse_request", "unknown", vduse_req(3, 4, u32(1) + u32(0)))

# ---------------------------------------------------------------- regressions
# Inputs that crashed the library once (fuzz/regressions/TARGET/): scripts/fuzz.sh replays
# them with the corpus, so a fixed bug stays fixed.


def regression(target, name, data):
    d = os.path.join(HERE, "..", "regressions", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# A 4 KiB memfd offered as a 1 MiB region: mapping it succeeds, the first access past 4 KiB
# (the used ring, when the vring starts) is SIGBUS.
small = msg(SET_MEM_TABLE, u32(1) + u32(0) + region(0, 0x10_0000, UADDR, 0), fds=FD_MEMFD,
            memfd=memfd_spec(0, []))
regression("vhost_user_stream", "region_past_end_of_memfd",
           u8(0) + b"".join(negotiate + [small] + vring_setup() + run))
# mmap_offset 1: aligned ring addresses become odd host pointers (misaligned AtomicU16).
odd = msg(SET_MEM_TABLE, u32(1) + u32(0) + region(0, 0x8_0000, UADDR, 1), fds=FD_MEMFD,
          memfd=memfd_spec(2, []))
regression("vhost_user_stream", "misaligned_ring_host_address",
           u8(0) + b"".join(negotiate + [odd] + vring_setup() + run))

# A source's frame (1000 bytes) and mergeable receive buffers that fall short of it (one
# of 100 bytes in a ring of 2): `arm` reported the buffers as work after every `process`,
# so the worker never slept (fixed: `PairHandler::inbound_ready`).
regression("net_pair", "source_starved_never_sleeps",
           net_seed(F_MRG, 2, 1, 0, [n_rx(1, [100], 0), P], source=u16(1000) + u8(7)))
# The same in a ring of 1: a ring's worth of buffers too small, dropped without taking
# any, so `receive` dropped the same frame forever and `process` never returned.
regression("net_pair", "source_dropped_forever",
           net_seed(F_MRG, 2, 0, 0, [n_rx(1, [100], 0), P], source=u16(1000) + u8(7)))
