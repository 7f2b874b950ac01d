//! virtio-net queue pair (`PairHandler` through `GroupHandler::process`) and control queue
//! (`CtrlHandler::handle`) fed by a hostile driver.
//!
//! The input picks the negotiated features (MRG_RXBUF, CSUM, GUEST_CSUM, MTU, RING_PACKED,
//! EVENT_IDX, HOST_TSO4/TSO6/UFO/ECN, the control-queue features), the backend (loopback,
//! sink, or a source with a frame from the input), the MTU, the ring sizes (split: powers of
//! two up to 128; packed: 1..=128) and which of the two queues are ready. Then a program of
//! driver actions: transmit chains (headers valid or not: bad GSO types and sizes,
//! csum_start/csum_offset past the frame, NEEDS_CSUM without CSUM, frames from 0 bytes to
//! past 64 KiB, split into up to 4 readable pieces, with zero-length or writable
//! descriptors added), receive chains (0-byte, shorter than the header, up to 64 KiB
//! buffers, a readable descriptor in front), buffers anywhere in one shared area so receive
//! and transmit buffers may overlap, event suppression writes, `process` calls, reaping of
//! used entries, and control-queue requests. Checked:
//! - no panic; `process` returns (a run is bounded: at most 48 steps, rings of 128), and a
//!   worker would go to sleep: with the driver idle, `has_work` (busy-polling, if the
//!   input asks) and `arm` stop reporting work after a few `process` rounds;
//! - every used entry names a chain the driver made available and not yet used, with a
//!   length no larger than that chain's writable bytes (0 on the transmit queue);
//! - the queue counters never decrease; after a successful `process`, every transmit chain
//!   used is counted once as a frame or a drop, and with a loopback backend every frame
//!   transmitted is received or dropped on the receive queue;
//! - what arrives on the receive queue: without MRG_RXBUF every used buffer holds nothing
//!   or a header and more; while no two buffers of the run overlap, each frame starts with
//!   a header whose num_buffers counts the buffers it spans (1 without MRG_RXBUF) and is,
//!   byte for byte, a valid frame transmitted (loopback, in order, with its checksum
//!   completed for a receiver without GUEST_CSUM) or the source's frame; a sink receives
//!   nothing;
//! - control requests: `handle` never fails, the ack is the first writable byte and no
//!   other byte is written, used length 1 (0 without a writable byte), and the ack and the
//!   recorded state follow a model of the command table in `net/ctrl.rs` (§5.1.6.5).
//!
//! Input layout: `features u16, ctrl_features u8, backend u8, mtu u16, rx_size u8,
//! tx_size u8, [source frame: len u16, seed u8]`, then at most 48 steps `op u8` + operands.
//! `backend % 3`: loopback, sink, source; `(backend >> 2) % 8`: 6 only the receive queue is
//! ready, 7 only the transmit queue, else both; `backend & 0x20`: the worker busy-polls.
//! `op % 8`: 0-1 a transmit chain (`tx_chain`), 2-3 `(op >> 3) % 8 + 1` receive chains side
//! by side (`rx_chain`), 4 run the worker, 5 reap used entries, 6 driver event suppression
//! (`op & 0x10`: on the transmit queue), 7 a control request (`ctrl_request`).

#![no_main]

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rustix::event::{eventfd, EventfdFlags};
use uvdpa_devices::net::config::{is_multicast, MacAddr, NetConfig};
use uvdpa_devices::net::ctrl::{
    CtrlHandler, NetCtrlState, GUEST_OFFLOAD_BITS, MAC_TABLE_ENTRIES, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use uvdpa_devices::net::hdr::{VirtioNetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_LEN};
use uvdpa_devices::net::pair::{PairBackend, PairHandler, MAX_FRAME};
use uvdpa_fuzz::Input;
use uvdpa_virtio::stats::{QueueStats, QueueStatsRef, StatsTable};
use uvdpa_virtio::worker::{GroupHandler, QueueHandler, WorkerCtl, WorkerQueue};
use uvdpa_virtio::{
    packed, split, DescriptorChain, GuestMemory, MemoryRegion, Segment, VirtioFeatures, Virtqueue,
};

/// Ring bases (each ring with its areas fits in 16 KiB).
const RXQ: u64 = 0;
const TXQ: u64 = 0x4000;
/// The buffer area shared by both queues.
const BUF: u64 = 0x1_0000;
const BUF_LEN: u64 = 0x4_0000;
/// Memory ends 64 KiB past the buffer area: a big buffer near its end is unmapped.
const MEM_LEN: u64 = BUF + BUF_LEN + 0x1_0000;
const MAX_STEPS: usize = 48;
const MAX_RING: u16 = 128;
const SENTINEL: u8 = 0xee;

/// Features a bit of the input's `features` selects, in order.
const FEATURES: [VirtioFeatures; 11] = [
    VirtioFeatures::VIRTIO_NET_F_MRG_RXBUF,
    VirtioFeatures::VIRTIO_NET_F_CSUM,
    VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM,
    VirtioFeatures::VIRTIO_NET_F_MTU,
    VirtioFeatures::VIRTIO_F_RING_PACKED,
    VirtioFeatures::VIRTIO_RING_F_EVENT_IDX,
    VirtioFeatures::VIRTIO_NET_F_HOST_TSO4,
    VirtioFeatures::VIRTIO_NET_F_HOST_TSO6,
    VirtioFeatures::VIRTIO_NET_F_HOST_UFO,
    VirtioFeatures::VIRTIO_NET_F_HOST_ECN,
    VirtioFeatures::VIRTIO_NET_F_GUEST_TSO4,
];
/// Control-queue features a bit of `ctrl_features` selects.
const CTRL_FEATURES: [VirtioFeatures; 7] = [
    VirtioFeatures::VIRTIO_NET_F_CTRL_RX,
    VirtioFeatures::VIRTIO_NET_F_CTRL_RX_EXTRA,
    VirtioFeatures::VIRTIO_NET_F_CTRL_MAC_ADDR,
    VirtioFeatures::VIRTIO_NET_F_CTRL_VLAN,
    VirtioFeatures::VIRTIO_NET_F_GUEST_ANNOUNCE,
    VirtioFeatures::VIRTIO_NET_F_MQ,
    VirtioFeatures::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
];

/// What every run shares: guest memory, a counter table, kick eventfds.
struct Shared {
    mem: Arc<GuestMemory>,
    table: Arc<StatsTable>,
    kicks: [Arc<OwnedFd>; 2],
}

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let kick = || Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap());
        Shared {
            mem: Arc::new(
                GuestMemory::new(vec![MemoryRegion::anonymous(0, MEM_LEN).unwrap()]).unwrap(),
            ),
            table: StatsTable::new("fuzz-net", 2).unwrap(),
            kicks: [kick(), kick()],
        }
    })
}

fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("UVDPA_FUZZ_DEBUG").is_some())
}

/// A used entry as the driver reads it: id, length, the chain's writable buffers.
type Used = (u32, u32, Vec<(u64, u32)>);

/// A chain the driver made available.
struct Posted {
    descs: u16,
    wlen: u32,
    writable: Vec<(u64, u32)>,
}

/// The driver side of one queue (split or packed), with what it has outstanding.
enum Ring {
    Split(split::testing::DriverQueue),
    Packed(packed::testing::DriverQueue),
}

struct Driver {
    ring: Ring,
    size: u16,
    /// Outstanding chains by id: descriptors/slots, writable bytes, writable buffers.
    outstanding: HashMap<u32, Posted>,
    /// Split: descriptor indexes in use.
    desc_used: Vec<bool>,
    /// Packed: ring slots in use.
    slots_used: u32,
    /// Used entries seen.
    completed: u64,
}

impl Driver {
    fn new(mem: &Arc<GuestMemory>, base: u64, size: u16, packed: bool) -> Self {
        let ring = if packed {
            Ring::Packed(packed::testing::DriverQueue::new(mem.clone(), base, size))
        } else {
            Ring::Split(split::testing::DriverQueue::new(mem.clone(), base, size))
        };
        Self {
            ring,
            size,
            outstanding: HashMap::new(),
            desc_used: vec![false; usize::from(size)],
            slots_used: 0,
            completed: 0,
        }
    }

    fn queue(&self, mem: &Arc<GuestMemory>, event_idx: bool) -> Virtqueue {
        match &self.ring {
            Ring::Split(d) => Virtqueue::Split(
                split::SplitQueue::new(&d.config(event_idx, false), mem.clone()).unwrap(),
            ),
            Ring::Packed(d) => Virtqueue::Packed(
                packed::PackedQueue::new(&d.config(event_idx, false), mem.clone()).unwrap(),
            ),
        }
    }

    /// Makes `bufs` available as one chain if the ring has room; returns whether it did.
    fn post(&mut self, bufs: &[(u64, u32, bool)]) -> bool {
        let n = bufs.len() as u16;
        let wlen = bufs
            .iter()
            .filter(|b| b.2)
            .fold(0u32, |a, b| a.saturating_add(b.1));
        let posted = Posted {
            descs: n,
            wlen,
            writable: bufs.iter().filter(|b| b.2).map(|b| (b.0, b.1)).collect(),
        };
        match &mut self.ring {
            Ring::Split(d) => {
                let first = d.next_desc;
                let idx: Vec<usize> = (0..n)
                    .map(|i| usize::from((first + i) % self.size))
                    .collect();
                if n > self.size || idx.iter().any(|&i| self.desc_used[i]) {
                    return false;
                }
                for &i in &idx {
                    self.desc_used[i] = true;
                }
                let head = d.add_chain(bufs);
                d.publish();
                self.outstanding.insert(u32::from(head), posted);
            }
            Ring::Packed(d) => {
                if self.slots_used + u32::from(n) > u32::from(self.size)
                    || self.outstanding.contains_key(&u32::from(d.next_id))
                {
                    return false;
                }
                let id = d.add_chain(bufs);
                self.slots_used += u32::from(n);
                self.outstanding.insert(u32::from(id), posted);
            }
        }
        true
    }

    /// Reads every published used entry, checking it; returns (id, len, writable buffers).
    fn reap(&mut self, what: &str) -> Vec<Used> {
        let mut out = Vec::new();
        loop {
            let e = match &mut self.ring {
                Ring::Split(d) => d.pop_used(),
                Ring::Packed(d) => d.pop_used().map(|(id, len)| (u32::from(id), len)),
            };
            let Some((id, len)) = e else { break };
            let Some(Posted {
                descs: n,
                wlen,
                writable,
            }) = self.outstanding.remove(&id)
            else {
                panic!("{what}: used entry for id {id}, which is not outstanding");
            };
            assert!(
                len <= wlen,
                "{what}: used length {len} > the chain's {wlen} writable bytes (id {id})"
            );
            match &self.ring {
                Ring::Split(d) => {
                    // Descriptors were taken consecutively from the head.
                    for i in 0..n {
                        self.desc_used[usize::from((id as u16 + i) % self.size)] = false;
                    }
                    let _ = d;
                }
                Ring::Packed(_) => self.slots_used -= u32::from(n),
            }
            self.completed += 1;
            out.push((id, len, writable));
        }
        out
    }

    /// Driver event suppression: split `avail->flags` and `used_event`; packed driver area.
    fn suppress(&self, flags: u16, event: u16) {
        match &self.ring {
            Ring::Split(d) => {
                d.set_avail_flags(flags & 1);
                d.set_used_event(event);
            }
            Ring::Packed(d) => d.set_driver_event(flags % 4, event),
        }
    }
}

/// All counters of one queue.
fn counters(s: &QueueStats) -> [u64; 8] {
    [
        &s.requests,
        &s.bytes_read,
        &s.bytes_written,
        &s.kicks,
        &s.calls,
        &s.calls_suppressed,
        &s.errors,
        &s.drops,
    ]
    .map(|c| c.load(Ordering::Relaxed))
}

/// A buffer address in the shared area (4-byte granularity), or a wild one — never below
/// the buffer area: a driver that puts buffers on its own rings makes its used entries
/// unreadable, which this target's bookkeeping cannot tell from a device bug.
fn buf_addr(input: &mut Input) -> u64 {
    let a = input.u16();
    if a == 0xffff {
        input.u64().max(BUF)
    } else {
        BUF + (u64::from(a) << 2) % BUF_LEN
    }
}

/// Bytes of a frame: an Ethernet/IPv4/UDP-looking prefix then a pattern.
fn frame_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)))
        .collect();
    let prefix: [u8; 24] = [
        0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00, 0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17,
    ];
    let n = len.min(prefix.len());
    f[..n].copy_from_slice(&prefix[..n]);
    f
}

/// Splits `total` bytes at `cuts` (folded into range) into piece lengths (empty ones kept
/// if `keep_empty`).
fn pieces(total: usize, cuts: &[u16], keep_empty: bool) -> Vec<usize> {
    let mut at: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (total + 1)).collect();
    at.push(0);
    at.push(total);
    at.sort_unstable();
    if !keep_empty {
        at.dedup();
    }
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

/// A transmit chain from the input: header, frame, how it is cut and placed.
fn tx_chain(input: &mut Input, mem: &GuestMemory, mtu: u16) -> (Vec<(u64, u32, bool)>, Vec<u8>) {
    let mut hdr = [0u8; VIRTIO_NET_HDR_LEN];
    let mode = input.u8();
    match mode % 4 {
        0 => {}
        1 => {
            let b = input.bytes(VIRTIO_NET_HDR_LEN);
            hdr[..b.len()].copy_from_slice(b);
        }
        2 => {
            // NEEDS_CSUM at a chosen place.
            hdr[0] = 1;
            hdr[6..8].copy_from_slice(&input.u16().to_le_bytes());
            hdr[8..10].copy_from_slice(&input.u16().to_le_bytes());
        }
        _ => {
            // GSO: type, size, header length, and a checksum place.
            hdr[0] = input.u8() & 7;
            hdr[1] = input.u8();
            hdr[2..4].copy_from_slice(&input.u16().to_le_bytes());
            hdr[4..6].copy_from_slice(&input.u16().to_le_bytes());
            hdr[6..8].copy_from_slice(&u16::from(input.u8()).to_le_bytes());
            hdr[8..10].copy_from_slice(&u16::from(input.u8()).to_le_bytes());
        }
    }
    let len = match (mode >> 2) % 4 {
        0 => usize::from(input.u8()),
        1 => usize::from(input.u16()) % (MAX_FRAME + 64),
        2 => usize::from(input.u16()) % 1455 + 60,
        // Around the MTU limit (MTU + Ethernet header + VLAN tag).
        _ => (usize::from(mtu) + 18 + usize::from(input.u8() % 5)).saturating_sub(2),
    };
    let seed = input.u8();
    let layout = input.u8();
    let mut bytes = hdr.to_vec();
    bytes.extend_from_slice(&frame_bytes(len, seed));
    let cuts: Vec<u16> = (0..layout % 4).map(|_| input.u16()).collect();
    let parts = pieces(bytes.len(), &cuts, layout & 0x10 != 0);
    let scatter = layout & 4 != 0;
    let mut at = buf_addr(input);
    let mut descs = Vec::new();
    let mut off = 0;
    for (i, &p) in parts.iter().enumerate() {
        if scatter && i > 0 {
            at = buf_addr(input);
        }
        let _ = mem.write(at, &bytes[off..off + p]);
        descs.push((at, p as u32, false));
        off += p;
        at = at.checked_add(p as u64).unwrap_or(BUF);
    }
    if layout & 8 != 0 {
        // A device-writable descriptor at the end (the device must not care).
        descs.push((buf_addr(input), u32::from(input.u16()), true));
    }
    if layout & 0x20 != 0 {
        // A zero-length readable descriptor in front.
        descs.insert(0, (buf_addr(input), 0, false));
    }
    (descs, bytes)
}

/// A receive chain from the input: a few writable buffers (maybe a readable one first).
fn rx_chain(input: &mut Input) -> Vec<(u64, u32, bool)> {
    let f = input.u8();
    let mut descs = Vec::new();
    if f & 0x80 != 0 {
        descs.push((buf_addr(input), u32::from(input.u8()), false));
    }
    for _ in 0..(f % 4) + 1 {
        let m = input.u8();
        let len = match m % 4 {
            0 => u32::from(m >> 2) % 2,
            1 => u32::from(m >> 2) % (VIRTIO_NET_HDR_LEN as u32 + 1),
            2 => u32::from(input.u16()),
            _ => [64, 1526, 2048, 4096, 9014, 65550, 65562, 0x1_0000][usize::from(m >> 2) % 8],
        };
        descs.push((buf_addr(input), len, true));
    }
    descs
}

// ------------------------------------------------------------------ receive contents

/// What the receive queue should carry. Checked only while no two buffers of the run
/// overlap (else later writes change what earlier ones hold): with a loopback, the valid
/// frames transmitted, in order (some may be dropped); with a source, its frame.
struct Expect {
    clean: bool,
    ranges: Vec<(u64, u64)>,
    mrg: bool,
    /// Loopback: header + frame as the receiver must see them (num_buffers aside).
    frames: VecDeque<Vec<u8>>,
    source: Option<Vec<u8>>,
    sink: bool,
    /// A frame spread over mergeable buffers: bytes so far, buffers still to come.
    partial: Option<(Vec<u8>, u16)>,
}

impl Expect {
    /// Notes a buffer written or made available; an overlap ends the content checks.
    fn range(&mut self, at: u64, len: u32) {
        if len == 0 {
            return;
        }
        let end = match at.checked_add(u64::from(len)) {
            Some(e) if at >= BUF && e <= MEM_LEN => e,
            _ => {
                self.clean = false;
                return;
            }
        };
        if self.ranges.iter().any(|&(a, e)| at < e && a < end) {
            self.clean = false;
        }
        self.ranges.push((at, end));
    }

    /// A receive chain used with `len` bytes in its `writable` buffers.
    fn received(&mut self, mem: &GuestMemory, len: u32, writable: &[(u64, u32)]) {
        assert!(!self.sink, "a sink received a frame");
        if !self.mrg {
            assert!(
                len == 0 || len as usize >= VIRTIO_NET_HDR_LEN,
                "receive chain used with {len} bytes: less than the header, more than nothing"
            );
        }
        if !self.clean {
            self.partial = None;
            return;
        }
        let mut bytes = Vec::with_capacity(len as usize);
        let mut left = len as usize;
        for &(a, l) in writable {
            let n = (l as usize).min(left);
            let mut b = vec![0u8; n];
            mem.read(a, &mut b).unwrap();
            bytes.extend_from_slice(&b);
            left -= n;
        }
        assert_eq!(left, 0, "used length past the writable buffers");
        let (acc, to_come) = match self.partial.take() {
            None if len == 0 => return, // a dropped frame's buffer, returned empty
            None => {
                assert!(
                    bytes.len() >= VIRTIO_NET_HDR_LEN,
                    "frame starts in a {len}-byte buffer, shorter than the header"
                );
                let k = u16::from_le_bytes([bytes[10], bytes[11]]);
                assert!(k >= 1, "num_buffers 0");
                assert!(self.mrg || k == 1, "num_buffers {k} without MRG_RXBUF");
                (bytes, k - 1)
            }
            Some((mut acc, to_come)) => {
                assert!(len > 0, "a buffer of a mergeable frame used empty");
                acc.extend_from_slice(&bytes);
                (acc, to_come - 1)
            }
        };
        if to_come > 0 {
            self.partial = Some((acc, to_come));
            return;
        }
        let mut got = acc;
        got[10..12].fill(0);
        if let Some(f) = &self.source {
            let mut want = vec![0u8; VIRTIO_NET_HDR_LEN];
            want.extend_from_slice(f);
            assert!(got == want, "a source frame arrived changed");
            return;
        }
        while let Some(mut f) = self.frames.pop_front() {
            f[10..12].fill(0);
            if f == got {
                return;
            }
        }
        panic!(
            "received a {}-byte frame that is none of the frames transmitted: {:02x?}",
            got.len(),
            &got[..got.len().min(64)]
        );
    }
}

/// What a receiver without VIRTIO_NET_F_GUEST_CSUM gets for a frame with NEEDS_CSUM: the
/// checksum completed (RFC 1071 over `csum_start..`, stored at `csum_start+csum_offset`)
/// and the flag cleared.
fn complete_csum(b: &mut [u8]) {
    let start = usize::from(u16::from_le_bytes([b[6], b[7]]));
    let at = start + usize::from(u16::from_le_bytes([b[8], b[9]]));
    let frame = &mut b[VIRTIO_NET_HDR_LEN..];
    if at + 2 > frame.len() {
        return;
    }
    let mut sum: u64 = frame[start..]
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[at..at + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    b[0] &= !1;
}

fn reap_all(rx: &mut Driver, tx: &mut Driver, expect: &mut Expect, mem: &GuestMemory) {
    let rx_used = rx.reap("rx");
    let tx_used = tx.reap("tx");
    if debug() {
        let r: Vec<_> = rx_used.iter().map(|e| (e.0, e.1)).collect();
        let t: Vec<_> = tx_used.iter().map(|e| (e.0, e.1)).collect();
        eprintln!("rx used {r:?}, tx used {t:?}");
    }
    for (id, len, _) in tx_used {
        assert_eq!(len, 0, "transmit chain {id} used with length {len}");
    }
    for (_, len, w) in rx_used {
        expect.received(mem, len, &w);
    }
}

// ------------------------------------------------------------------ control queue model

#[derive(Debug, Clone, PartialEq, Eq)]
struct CtrlModel {
    rx_mode: u8,
    mac: MacAddr,
    pairs: u16,
    vlans: Vec<bool>,
    announce_acked: bool,
    offloads: Option<u64>,
    uni: (Vec<MacAddr>, bool),
    multi: (Vec<MacAddr>, bool),
}

/// The ack the command table of `net/ctrl.rs` gives `req`, applying its effect to `m`.
fn ctrl_model(m: &mut CtrlModel, feats: VirtioFeatures, max_pairs: u16, req: &[u8]) -> u8 {
    let has = |f: VirtioFeatures| feats.contains(f);
    let ok = |c: bool| if c { VIRTIO_NET_OK } else { VIRTIO_NET_ERR };
    if req.len() < 2 {
        return VIRTIO_NET_ERR;
    }
    let (class, cmd, data) = (req[0], req[1], &req[2..]);
    match (class, cmd) {
        (0, 0..=5) => {
            let f = if cmd < 2 {
                VirtioFeatures::VIRTIO_NET_F_CTRL_RX
            } else {
                VirtioFeatures::VIRTIO_NET_F_CTRL_RX_EXTRA
            };
            if !has(f) || data.len() != 1 || data[0] > 1 {
                return VIRTIO_NET_ERR;
            }
            if data[0] == 1 {
                m.rx_mode |= 1 << cmd;
            } else {
                m.rx_mode &= !(1 << cmd);
            }
            VIRTIO_NET_OK
        }
        (1, 0) => {
            if !has(VirtioFeatures::VIRTIO_NET_F_CTRL_RX) {
                return VIRTIO_NET_ERR;
            }
            let mut at = 0usize;
            let mut table = |multicast: bool| -> Option<(Vec<MacAddr>, bool)> {
                let n = u32::from_le_bytes(data.get(at..at + 4)?.try_into().unwrap()) as u64;
                let end = (at as u64 + 4).checked_add(6 * n)?;
                if end > data.len() as u64 {
                    return None;
                }
                let kept = (n as usize).min(MAC_TABLE_ENTRIES);
                let macs: Vec<MacAddr> = data[at + 4..at + 4 + 6 * kept]
                    .chunks_exact(6)
                    .map(|c| c.try_into().unwrap())
                    .collect();
                if macs.iter().any(|mac| is_multicast(mac) != multicast) {
                    return None;
                }
                at = end as usize;
                Some((macs, n as usize > MAC_TABLE_ENTRIES))
            };
            let Some(uni) = table(false) else {
                return VIRTIO_NET_ERR;
            };
            let Some(multi) = table(true) else {
                return VIRTIO_NET_ERR;
            };
            if at != data.len() {
                return VIRTIO_NET_ERR;
            }
            m.uni = uni;
            m.multi = multi;
            VIRTIO_NET_OK
        }
        (1, 1) => {
            let good = has(VirtioFeatures::VIRTIO_NET_F_CTRL_MAC_ADDR)
                && data.len() == 6
                && !is_multicast(data.try_into().unwrap())
                && data != [0; 6];
            if good {
                m.mac = data.try_into().unwrap();
            }
            ok(good)
        }
        (2, 0 | 1) => {
            if !has(VirtioFeatures::VIRTIO_NET_F_CTRL_VLAN) || data.len() != 2 {
                return VIRTIO_NET_ERR;
            }
            let vid = u16::from_le_bytes([data[0], data[1]]);
            if vid >= 4096 {
                return VIRTIO_NET_ERR;
            }
            m.vlans[usize::from(vid)] = cmd == 0;
            VIRTIO_NET_OK
        }
        (3, 0) => {
            let good = has(VirtioFeatures::VIRTIO_NET_F_GUEST_ANNOUNCE) && data.is_empty();
            m.announce_acked |= good;
            ok(good)
        }
        (4, 0) => {
            if !has(VirtioFeatures::VIRTIO_NET_F_MQ) || data.len() != 2 {
                return VIRTIO_NET_ERR;
            }
            let v = u16::from_le_bytes([data[0], data[1]]);
            if !(1..=max_pairs).contains(&v) {
                return VIRTIO_NET_ERR;
            }
            m.pairs = v;
            VIRTIO_NET_OK
        }
        (5, 0) => {
            if !has(VirtioFeatures::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) || data.len() != 8 {
                return VIRTIO_NET_ERR;
            }
            let v = u64::from_le_bytes(data.try_into().unwrap());
            if v & !(feats.bits() & GUEST_OFFLOAD_BITS) != 0 {
                return VIRTIO_NET_ERR;
            }
            m.offloads = Some(v);
            VIRTIO_NET_OK
        }
        _ => VIRTIO_NET_ERR,
    }
}

/// Splits `buf` into segments at `cuts`, dropping empty pieces.
fn segments(buf: &mut [u8], cuts: &[u16]) -> Vec<Segment> {
    let base = buf.as_mut_ptr();
    let mut off = 0;
    pieces(buf.len(), cuts, false)
        .into_iter()
        .filter(|&n| n > 0)
        .map(|n| {
            let s = Segment {
                base: base.wrapping_add(off),
                len: n,
            };
            off += n;
            s
        })
        .collect()
}

struct Ctrl {
    h: CtrlHandler,
    model: CtrlModel,
    feats: VirtioFeatures,
    max_pairs: u16,
}

fn ctrl_request(c: &mut Ctrl, input: &mut Input) {
    let mode = input.u8();
    let mut req = vec![input.u8() % 8, input.u8() % 8];
    match mode % 4 {
        0 => req.extend_from_slice(input.bytes_u8()),
        1 => {
            // MAC tables: counts (sometimes lying) and addresses.
            for _ in 0..2 {
                let n = input.u8() % 80;
                let claimed = if input.u8() & 7 == 0 {
                    input.u32()
                } else {
                    u32::from(n)
                };
                req.extend_from_slice(&claimed.to_le_bytes());
                let first = input.u8();
                for i in 0..n {
                    req.extend_from_slice(&[first, 0x11, 0x22, 0x33, 0x44, i]);
                }
            }
        }
        2 => req.truncate(usize::from(mode >> 2) % 3),
        _ => {
            let n = usize::from(mode >> 2) % 9;
            req.extend_from_slice(input.bytes(n));
        }
    }
    let wlen = match input.u8() % 4 {
        0 => 0,
        1 | 2 => 1,
        _ => usize::from(input.u8()) % 16,
    };
    let rcuts: Vec<u16> = (0..input.u8() % 4).map(|_| input.u16()).collect();
    let wcuts: Vec<u16> = (0..input.u8() % 3).map(|_| input.u16()).collect();
    let mut readable = req.clone();
    let mut writable = vec![SENTINEL; wlen];
    let rs = segments(&mut readable, &rcuts);
    let ws = segments(&mut writable, &wcuts);
    let gen = c.h.state().generation();
    // SAFETY: the segments point into `readable` and `writable`, which outlive the chain
    // and are not otherwise accessed until `handle` returns.
    let chain = unsafe { DescriptorChain::from_segments(0, rs, ws) };
    let used = c.h.handle(&chain).expect("the control queue never faults");
    drop(chain);
    if debug() {
        eprintln!("ctrl {req:02x?} -> used {used} {writable:02x?}");
    }
    if wlen == 0 {
        assert_eq!(used, 0, "no writable byte, yet used length {used}");
        assert_eq!(
            c.h.state().generation(),
            gen,
            "a request without ack changed state"
        );
        return;
    }
    assert_eq!(used, 1, "used length");
    assert!(
        writable[1..].iter().all(|&b| b == SENTINEL),
        "bytes past the ack written"
    );
    let want = ctrl_model(&mut c.model, c.feats, c.max_pairs, &req);
    assert_eq!(writable[0], want, "ack of {req:02x?}");
    let st = c.h.state();
    assert_eq!(
        st.generation(),
        gen + u64::from(want == VIRTIO_NET_OK),
        "generation after {req:02x?}"
    );
    let mode = st.rx_mode();
    let bits = [
        mode.promisc,
        mode.allmulti,
        mode.alluni,
        mode.nomulti,
        mode.nouni,
        mode.nobcast,
    ]
    .iter()
    .enumerate()
    .fold(0u8, |a, (i, &b)| a | u8::from(b) << i);
    assert_eq!(bits, c.model.rx_mode, "rx mode");
    assert_eq!(st.mac(), c.model.mac, "mac");
    assert_eq!(st.active_queue_pairs(), c.model.pairs, "queue pairs");
    if let [_, _, lo, hi] = req[..] {
        let vid = u16::from_le_bytes([lo, hi]);
        if vid < 4096 {
            assert_eq!(
                st.vlan_allowed(vid),
                c.model.vlans[usize::from(vid)],
                "vlan {vid}"
            );
        }
    }
    let t = st.mac_table();
    assert_eq!(
        (t.unicast, t.unicast_overflow),
        c.model.uni,
        "unicast table"
    );
    assert_eq!(
        (t.multicast, t.multicast_overflow),
        c.model.multi,
        "multicast table"
    );
    let offloads = c
        .model
        .offloads
        .unwrap_or(c.feats.bits() & GUEST_OFFLOAD_BITS);
    assert_eq!(
        st.guest_offloads(c.feats).bits(),
        offloads,
        "guest offloads"
    );
    if c.model.announce_acked {
        assert!(!st.announce_pending());
    }
}

// ------------------------------------------------------------------ the target

fuzz_target!(|data: &[u8]| {
    let sh = shared();
    let mem = &sh.mem;
    let mut input = Input::new(data);
    let fbits = input.u16();
    let mut features = VirtioFeatures::VIRTIO_F_VERSION_1;
    for (i, f) in FEATURES.iter().enumerate() {
        if fbits & (1 << i) != 0 {
            features |= *f;
        }
    }
    let cbits = input.u8();
    let mut ctrl_feats = features;
    for (i, f) in CTRL_FEATURES.iter().enumerate() {
        if cbits & (1 << i) != 0 {
            ctrl_feats |= *f;
        }
    }
    let backend_sel = input.u8();
    let mtu = input.u16().max(68);
    let packed = features.contains(VirtioFeatures::VIRTIO_F_RING_PACKED);
    let event_idx = features.contains(VirtioFeatures::VIRTIO_RING_F_EVENT_IDX);
    let size = |s: u8| {
        if packed {
            u16::from(s) % MAX_RING + 1
        } else {
            1 << (s % 8)
        }
    };
    let (rx_size, tx_size) = (size(input.u8()), size(input.u8()));
    let backend = match backend_sel % 3 {
        0 => PairBackend::Loopback,
        1 => PairBackend::Sink,
        _ => {
            let len = usize::from(input.u16()) % (MAX_FRAME + 1);
            PairBackend::Source(frame_bytes(len, input.u8()))
        }
    };
    let loopback = matches!(backend, PairBackend::Loopback);
    // The worker busy-polls (`has_work`) before it arms notifications.
    let polling = backend_sel & 0x20 != 0;
    // Which queues are ready: both, or one of them (bits 2-3 of the backend byte).
    let (has_rx, has_tx) = match (backend_sel >> 2) % 8 {
        6 => (true, false),
        7 => (false, true),
        _ => (true, true),
    };

    // Clean memory; rings laid out by the drivers.
    mem.write(0, &vec![0u8; MEM_LEN as usize]).unwrap();
    let mut rx = Driver::new(mem, RXQ, rx_size, packed);
    let mut tx = Driver::new(mem, TXQ, tx_size, packed);
    let stats = |i: usize| QueueStatsRef::new(sh.table.clone(), i).unwrap();
    let mk = |index: u16, d: &Driver| WorkerQueue {
        index,
        queue: d.queue(mem, event_idx),
        kick: sh.kicks[usize::from(index)].clone(),
        call: None,
        err: None,
        stats: stats(usize::from(index)),
    };
    let mut queues = Vec::new();
    if has_rx {
        queues.push(mk(0, &rx));
    }
    if has_tx {
        queues.push(mk(1, &tx));
    }
    let mut expect = Expect {
        clean: true,
        ranges: Vec::new(),
        mrg: features.contains(VirtioFeatures::VIRTIO_NET_F_MRG_RXBUF),
        frames: VecDeque::new(),
        source: match &backend {
            PairBackend::Source(f) => Some(f.clone()),
            _ => None,
        },
        sink: matches!(backend, PairBackend::Sink),
        partial: None,
    };
    let mut h = PairHandler::new(backend, features, mtu);
    let ctl = WorkerCtl::default();
    let start = [counters(&stats(0)), counters(&stats(1))];
    let mut last = start;
    let mut failed = false;

    let net_config = NetConfig {
        mac: [0x02, 0, 0, 0, 0, 0x10],
        mtu: 1500,
        max_queue_pairs: u16::from(cbits >> 7) * 7 + 1,
        link_up: true,
    };
    let max_pairs = net_config.max_queue_pairs;
    let mut ctrl = Ctrl {
        h: CtrlHandler::new(
            Arc::new(NetCtrlState::new(&net_config)),
            ctrl_feats,
            max_pairs,
        ),
        model: CtrlModel {
            rx_mode: 1,
            mac: net_config.mac,
            pairs: 1,
            vlans: vec![false; 4096],
            announce_acked: false,
            offloads: None,
            uni: (Vec::new(), false),
            multi: (Vec::new(), false),
        },
        feats: ctrl_feats,
        max_pairs,
    };

    let mut process = |queues: &mut Vec<WorkerQueue>,
                       rx: &mut Driver,
                       tx: &mut Driver,
                       failed: &mut bool,
                       expect: &mut Expect| {
        // As a queue worker: process, then (when busy-polling) look for work, then arm
        // notifications before sleeping, and process again whenever work is reported. The
        // driver is idle here, so work can only "arrive" a bounded number of times; more
        // means the worker would never sleep.
        let mut rounds = 0;
        while !*failed {
            let r = h.process(queues, &ctl).and_then(|()| {
                if polling && h.has_work(queues)? {
                    return Ok(true);
                }
                h.arm(queues)
            });
            if debug() {
                let pos: Vec<_> = queues
                    .iter()
                    .map(|q| (q.index, q.queue.next_avail(), q.queue.has_available()))
                    .collect();
                eprintln!("process+arm: {r:?}, queues (index, next_avail, has_available) {pos:?}");
            }
            match r {
                Ok(false) => break,
                Ok(true) => {
                    rounds += 1;
                    assert!(
                        rounds < 8,
                        "the worker never sleeps: has_work()/arm() report work after every process()"
                    );
                }
                // A broken ring stops the pair (the device needs a reset).
                Err(_) => *failed = true,
            }
        }
        let now = [counters(&stats(0)), counters(&stats(1))];
        for q in 0..2 {
            for k in 0..8 {
                assert!(
                    now[q][k] >= last[q][k],
                    "queue {q} counter {k} went down: {:?} -> {:?}",
                    last[q],
                    now[q]
                );
            }
        }
        last = now;
        reap_all(rx, tx, expect, mem);
        if !*failed {
            let d = |q: usize, k: usize| now[q][k] - start[q][k];
            // requests = frames, drops = dropped frames: every transmit chain is one of them.
            assert_eq!(
                tx.completed,
                d(1, 0) + d(1, 7),
                "transmit chains used vs frames + drops counted"
            );
            if loopback && has_rx {
                assert_eq!(
                    d(0, 0) + d(0, 7),
                    d(1, 0),
                    "loopback: frames received + dropped vs frames transmitted"
                );
            }
        }
    };

    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        match op % 8 {
            0 | 1 => {
                let (c, mut bytes) = tx_chain(&mut input, mem, mtu);
                for &(a, l, _) in &c {
                    expect.range(a, l);
                }
                let posted = tx.post(&c);
                if debug() {
                    eprintln!("tx {c:x?} posted {posted}");
                }
                let h = VirtioNetHdr::from_prefix(&bytes).unwrap();
                let frame_len = bytes.len() - VIRTIO_NET_HDR_LEN;
                if posted && loopback && h.validate_tx(frame_len, features, mtu).is_ok() {
                    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
                        && !features.contains(VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM)
                    {
                        complete_csum(&mut bytes);
                    }
                    expect.frames.push_back(bytes);
                }
            }
            2 | 3 => {
                let c = rx_chain(&mut input);
                let copies = usize::from(op >> 3) % 8 + 1;
                for k in 0..copies {
                    // Copies side by side (at a 64 KiB stride when the buffer is big).
                    let stride = (c.iter().map(|b| u64::from(b.1)).sum::<u64>() + 3).max(4) & !3;
                    let c: Vec<_> = c
                        .iter()
                        .map(|&(a, l, w)| {
                            let a = if (BUF..BUF + BUF_LEN).contains(&a) {
                                BUF + (a - BUF + k as u64 * stride) % BUF_LEN
                            } else {
                                a
                            };
                            (a, l, w)
                        })
                        .collect();
                    for &(a, l, _) in &c {
                        expect.range(a, l);
                    }
                    let posted = rx.post(&c);
                    if debug() {
                        eprintln!("rx {c:x?} posted {posted}");
                    }
                }
            }
            4 => process(&mut queues, &mut rx, &mut tx, &mut failed, &mut expect),
            5 => reap_all(&mut rx, &mut tx, &mut expect, mem),
            6 => {
                let (flags, event) = (input.u16(), input.u16());
                if op & 0x10 == 0 { &rx } else { &tx }.suppress(flags, event);
            }
            _ => ctrl_request(&mut ctrl, &mut input),
        }
    }
    process(&mut queues, &mut rx, &mut tx, &mut failed, &mut expect);
    if debug() {
        eprintln!(
            "end: contents checked {}, {} expected frames not received",
            expect.clean,
            expect.frames.len()
        );
    }
});
