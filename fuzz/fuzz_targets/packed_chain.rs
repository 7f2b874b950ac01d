//! Packed virtqueue (`PackedQueue`, virtio 1.2 §2.8) over hostile rings, with the driver
//! acting between the device's calls.
//!
//! The input picks a memory layout (one 1 MiB region; three regions with a boundary inside
//! and a hole; or one region mapped at an mmap offset of 8 so 16-byte aligned ring addresses
//! become misaligned host pointers), a queue size (1..=32768, any value, not only powers of
//! two), EVENT_IDX / INDIRECT_DESC, a vring base (slot + wrap bit, possibly invalid) and
//! where the descriptor ring and the two event suppression areas are (the usual layout,
//! folded addresses that may overlap or be misaligned, or wild ones). Then a program of
//! device calls (`pop`, `add_used`, `publish_used`, `needs_notification`,
//! `set_notification`, `rewind`) interleaved with driver actions (chains made available the
//! driver's way with flags from the input, raw descriptor writes, ring-long fills, driver
//! event suppression writes, indirect table bytes). Checked against a model written from
//! §2.8:
//! - no panic; setup errors and malformed chains are error values;
//! - a successful setup has its rings inside one region and host-aligned;
//! - every pop agrees with a reference walk of §2.8.6/§2.8.7 (available or not, accept or
//!   refuse, buffer ID, ring slots consumed, readable and writable host pieces), and every
//!   segment lies inside a mapped region;
//! - `next_avail`/`next_used` follow the model; `add_used` writes the batch head's len/id
//!   at once and its flags at `publish_used`; later entries of the batch are written whole
//!   at `publish_used` (in order, head flags last), or at once beyond `size` entries; `set_notification` writes the
//!   device area as documented (flags only when they change, except when enabling) and
//!   reports the head's availability; `needs_notification`
//!   follows §2.8.10 with EVENT_IDX;
//! - the device writes nothing else: guest memory equals a shadow copy (driver writes plus
//!   the model's device writes) at the end.
//!
//! Input layout (little-endian; a short input reads as zeroes):
//! `cfg u8, size u16, base u16, [desc u64, driver u64, device u64 if cfg&ADDR_MASK],
//!  event_off_wrap u16, event_flags u16, area_len u16, area bytes..., ops...`
//! where each op is `op u8` and its operands (see `run_op`).

#![no_main]
// `%` as the library crates write it (their MSRV predates `is_multiple_of`).
#![allow(clippy::manual_is_multiple_of)]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use uvdpa_fuzz::Input;
use uvdpa_virtio::chain::{
    VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
};
use uvdpa_virtio::packed::{PackedQueue, WRAP_BIT};
use uvdpa_virtio::{DescriptorChain, GuestMemory, MemoryRegion, QueueError, Segment, VringConfig};

/// cfg bits.
const F_EVENT_IDX: u8 = 1;
const F_INDIRECT: u8 = 2;
/// Layout: 0 one region, 1 three regions, 2 misaligned mapping, 3 one region.
const LAYOUT_SHIFT: u8 = 2;
/// Ring addresses: 0 usual layout, 1 folded into the working area, 2 wild, 3 usual.
const ADDR_SHIFT: u8 = 4;
const ADDR_MASK: u8 = 3 << ADDR_SHIFT;
/// The base is taken raw (its slot may be past the size).
const F_RAW_BASE: u8 = 0x40;
/// Ring addresses are frontend virtual addresses (equal to gpa for these regions).
const F_UADDR: u8 = 0x80;

/// Bytes of indirect-table area after the rings.
const AREA_MAX: u64 = 0x4000;
/// Most program steps.
const MAX_OPS: usize = 512;

fn layouts() -> [Arc<GuestMemory>; 3] {
    let one = GuestMemory::new(vec![MemoryRegion::anonymous(0, 1 << 20).unwrap()]).unwrap();
    let three = GuestMemory::new(vec![
        MemoryRegion::anonymous(0, 0x2_0000).unwrap(),
        MemoryRegion::anonymous(0x2_0000, 0x1_0000).unwrap(),
        MemoryRegion::anonymous(0x8_0000, 0x1_0000).unwrap(),
    ])
    .unwrap();
    let fd = rustix::fs::memfd_create("fuzz-odd", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 0x2_0008).unwrap();
    let odd = GuestMemory::new(vec![MemoryRegion::map(&fd, 0, 0x2_0000, 0, 8).unwrap()]).unwrap();
    [Arc::new(one), Arc::new(three), Arc::new(odd)]
}

/// `UVDPA_FUZZ_DEBUG=1`: print each step (to check what a seed does).
fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("UVDPA_FUZZ_DEBUG").is_some())
}

thread_local! {
    static MEMS: RefCell<Option<[Arc<GuestMemory>; 3]>> = const { RefCell::new(None) };
}

/// Guest memory plus a shadow of its first `shadow.len()` bytes: what the driver wrote and
/// what the model says the device wrote.
struct Guest {
    mem: Arc<GuestMemory>,
    shadow: Vec<u8>,
    /// Ranges written this run past the shadowed bytes. These and the shadowed bytes are
    /// zeroed again when the run ends, so every run starts from zeroed memory.
    dirty: Vec<(u64, usize)>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let zeroes = vec![0u8; self.shadow.len()];
        let _ = self.mem.write(0, &zeroes);
        for &(at, n) in &self.dirty {
            let _ = self.mem.write(at, &vec![0u8; n]);
        }
    }
}

impl Guest {
    /// A driver write: into guest memory (if mapped) and the shadow.
    fn write(&mut self, at: u64, data: &[u8]) {
        if self.mem.write(at, data).is_err() {
            return;
        }
        self.mirror(at, data);
    }

    /// Records a device write the model expects in the shadow.
    fn mirror(&mut self, at: u64, data: &[u8]) {
        let len = self.shadow.len() as u64;
        if at.saturating_add(data.len() as u64) > len {
            self.dirty.push((at, data.len()));
        }
        if at >= len {
            return;
        }
        let n = data.len().min((len - at) as usize);
        self.shadow[at as usize..at as usize + n].copy_from_slice(&data[..n]);
    }

    fn read_u16(&self, at: u64) -> Option<u16> {
        let mut b = [0u8; 2];
        self.mem.read(at, &mut b).ok()?;
        Some(u16::from_le_bytes(b))
    }

    fn read_u32(&self, at: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.mem.read(at, &mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
}

#[derive(Debug, Clone, Copy)]
struct PDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

fn read_pdesc(mem: &GuestMemory, at: u64) -> Option<PDesc> {
    let mut b = [0u8; 16];
    mem.read(at, &mut b).ok()?;
    Some(PDesc {
        addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
        len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
        id: u16::from_le_bytes(b[12..14].try_into().unwrap()),
        flags: u16::from_le_bytes(b[14..16].try_into().unwrap()),
    })
}

fn pdesc_bytes(d: PDesc) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.id.to_le_bytes());
    b[14..16].copy_from_slice(&d.flags.to_le_bytes());
    b
}

/// §2.8.1: available under driver wrap counter `wrap`.
fn is_avail(flags: u16, wrap: bool) -> bool {
    (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap && (flags & VIRTQ_DESC_F_USED != 0) != wrap
}

/// AVAIL/USED bits that make a descriptor available under `wrap`.
fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        VIRTQ_DESC_F_AVAIL
    } else {
        VIRTQ_DESC_F_USED
    }
}

fn encode((slot, wrap): (u16, bool)) -> u16 {
    slot | if wrap { WRAP_BIT } else { 0 }
}

/// The ring position `n` (`<= size`) slots after `pos`.
fn advance(size: u16, (slot, wrap): (u16, bool), n: u16) -> (u16, bool) {
    let next = u32::from(slot) + u32::from(n);
    if next >= u32::from(size) {
        ((next - u32::from(size)) as u16, !wrap)
    } else {
        (next as u16, wrap)
    }
}

/// Whether `[addr, addr+len)` lies inside a single region.
fn in_one_region(mem: &GuestMemory, addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    mem.regions()
        .iter()
        .any(|r| addr >= r.gpa() && end <= r.gpa() + r.size())
}

/// Host pieces of `[addr, addr+len)`, split at region ends; `None` if a byte is unmapped.
fn pieces(mem: &GuestMemory, addr: u64, len: u64) -> Option<Vec<(usize, usize)>> {
    addr.checked_add(len)?;
    let (mut a, mut left) = (addr, len);
    let mut out = Vec::new();
    while left > 0 {
        let r = mem
            .regions()
            .iter()
            .find(|r| a >= r.gpa() && a - r.gpa() < r.size())?;
        let n = (r.gpa() + r.size() - a).min(left);
        out.push((r.host_base() as usize + (a - r.gpa()) as usize, n as usize));
        a += n;
        left -= n;
    }
    Some(out)
}

#[derive(Debug, PartialEq, Eq)]
struct RefChain {
    id: u16,
    rd: Vec<(usize, usize)>,
    wr: Vec<(usize, usize)>,
    wlen: u32,
}

/// Reference walk of the chain whose head is at `(slot, wrap)` (§2.8.6, §2.8.7): the ring
/// slots read and the chain, or why it is refused.
fn reference(
    mem: &GuestMemory,
    desc: u64,
    size: u16,
    (mut slot, mut wrap): (u16, bool),
    indirect_ok: bool,
) -> (u16, Result<RefChain, &'static str>) {
    let mut count = 0u16;
    let (mut rd, mut wr) = (Vec::new(), Vec::new());
    let (mut rlen, mut wlen, mut saw_w) = (0u64, 0u64, false);
    let mut push = |d: &PDesc| -> Result<(), &'static str> {
        let w = d.flags & VIRTQ_DESC_F_WRITE != 0;
        if !w && saw_w {
            return Err("readable after writable");
        }
        if w {
            saw_w = true;
            wlen += u64::from(d.len);
        } else {
            rlen += u64::from(d.len);
        }
        if rlen + wlen > u64::from(u32::MAX) {
            return Err("length overflow");
        }
        let p = pieces(mem, d.addr, u64::from(d.len)).ok_or("buffer unmapped")?;
        if w { &mut wr } else { &mut rd }.extend(p);
        Ok(())
    };
    loop {
        if count >= size {
            return (count, Err("longer than the ring"));
        }
        let d = read_pdesc(mem, desc + 16 * u64::from(slot)).expect("ring is mapped");
        count += 1;
        if !is_avail(d.flags, wrap) {
            return (count, Err("chained descriptor unavailable"));
        }
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if !indirect_ok {
                return (count, Err("indirect not negotiated"));
            }
            if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                return (count, Err("indirect with next"));
            }
            if d.len == 0 || d.len % 16 != 0 || d.len / 16 > u32::from(size).max(1024) {
                return (count, Err("indirect length"));
            }
            if !in_one_region(mem, d.addr, u64::from(d.len)) {
                return (count, Err("indirect table unmapped"));
            }
            for i in 0..u64::from(d.len / 16) {
                let e = read_pdesc(mem, d.addr + 16 * i).expect("table is mapped");
                if e.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                    return (count, Err("nested indirect"));
                }
                if let Err(e) = push(&e) {
                    return (count, Err(e));
                }
            }
            return (
                count,
                Ok(RefChain {
                    id: d.id,
                    rd,
                    wr,
                    wlen: wlen as u32,
                }),
            );
        }
        if let Err(e) = push(&d) {
            return (count, Err(e));
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return (
                count,
                Ok(RefChain {
                    id: d.id,
                    rd,
                    wr,
                    wlen: wlen as u32,
                }),
            );
        }
        slot += 1;
        if slot == size {
            slot = 0;
            wrap = !wrap;
        }
    }
}

fn as_pairs(s: &[Segment]) -> Vec<(usize, usize)> {
    s.iter().map(|s| (s.base as usize, s.len)).collect()
}

fn check_inside(mem: &GuestMemory, segs: &[Segment]) {
    for s in segs {
        let a = s.base as usize;
        let inside = mem.regions().iter().any(|r| {
            let lo = r.host_base() as usize;
            a >= lo
                && a.checked_add(s.len)
                    .is_some_and(|e| e <= lo + r.size() as usize)
        });
        assert!(inside, "segment {:#x}+{:#x} outside guest memory", a, s.len);
    }
}

/// Address/length folding into (mostly) mapped ranges for driver-made descriptors.
fn fold(mem: &GuestMemory, addr: u64, len: u32) -> (u64, u32) {
    let span = mem
        .regions()
        .iter()
        .map(|r| r.gpa() + r.size())
        .max()
        .unwrap_or(0);
    (addr % (span + 0x1000), len % 0x1_1000)
}

/// A popped chain the device still owes a used descriptor for.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    id: u16,
    count: u16,
    wlen: u32,
}

/// The device state as the model sees it.
struct Model {
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
    event_idx: bool,
    indirect: bool,
    avail: (u16, bool),
    used: (u16, bool),
    batch_head: Option<(u16, u16)>,
    /// Entries after the head, written at `publish_used`: (slot, id, len, flags).
    shadow: Vec<(u16, u16, u32, u16)>,
    signalled: (u16, bool),
    /// Whether an event-index decision was made since the queue started: the first one
    /// always notifies, as the driver's last notification point is unknown after a start.
    signalled_valid: bool,
    unsignalled: u32,
    outstanding: Vec<Outstanding>,
    /// `next_avail` before the pops since the last `add_used` (a valid rewind target).
    rewind_to: Option<u16>,
    /// The driver's next avail position.
    drv: (u16, bool),
    /// Device event suppression flags last written by the device.
    event_flags: Option<u16>,
    /// Descriptors the fill op may still write, and rewinds left (keep a run short).
    fill_left: u32,
    rewinds_left: u8,
}

impl Model {
    fn slot_addr(&self, slot: u16) -> u64 {
        self.desc + 16 * u64::from(slot)
    }

    fn cycle_pos(&self, (slot, wrap): (u16, bool)) -> u32 {
        u32::from(slot) + if wrap { 0 } else { u32::from(self.size) }
    }

    fn head_available(&self, g: &Guest) -> bool {
        let flags = g
            .read_u16(self.slot_addr(self.avail.0) + 14)
            .expect("ring is mapped");
        is_avail(flags, self.avail.1)
    }
}

fn check_positions(q: &PackedQueue, m: &Model) {
    assert_eq!(q.next_avail(), encode(m.avail), "next_avail");
    assert_eq!(q.next_used(), encode(m.used), "next_used");
}

fn pop(q: &mut PackedQueue, m: &mut Model, g: &Guest, chain: &mut DescriptorChain) {
    let before = m.avail;
    let avail = m.head_available(g);
    let want = avail.then(|| reference(&g.mem, m.desc, m.size, m.avail, m.indirect));
    let got = q.pop(chain);
    if debug() {
        eprintln!(
            "pop at {before:?}: {got:?} head {} slots {} r {} w {}",
            chain.head(),
            chain.desc_count(),
            chain.readable_len(),
            chain.writable_len()
        );
    }
    match (got, want) {
        (Ok(false), None) => {}
        (Ok(true), Some((count, Ok(r)))) => {
            check_inside(&g.mem, chain.readable());
            check_inside(&g.mem, chain.writable());
            assert_eq!(chain.head(), r.id, "buffer id");
            assert_eq!(chain.desc_count(), count, "ring slots of the chain");
            assert_eq!(as_pairs(chain.readable()), r.rd, "readable pieces");
            assert_eq!(as_pairs(chain.writable()), r.wr, "writable pieces");
            let sum = |s: &[Segment]| s.iter().map(|s| s.len as u64).sum::<u64>();
            assert_eq!(u64::from(chain.readable_len()), sum(chain.readable()));
            assert_eq!(u64::from(chain.writable_len()), sum(chain.writable()));
            assert_eq!(chain.writable_len(), r.wlen);
            m.avail = advance(m.size, m.avail, count);
            m.outstanding.push(Outstanding {
                id: r.id,
                count,
                wlen: r.wlen,
            });
            if m.rewind_to.is_none() {
                m.rewind_to = Some(encode(before));
            }
        }
        (Err(QueueError::Chain { head, .. }), Some((count, Err(_)))) => {
            assert_eq!(head, before.0, "error names the head slot");
            // The walked slots are consumed (at least one).
            m.avail = advance(m.size, m.avail, count.max(1));
        }
        (got, want) => panic!("pop at {before:?}: queue says {got:?}, reference says {want:?}"),
    }
}

fn add_used(q: &mut PackedQueue, m: &mut Model, g: &mut Guest, id: u16, count: u16, len: u32) {
    q.add_used(id, count, len);
    let slot = m.used.0;
    let mut flags = if m.used.1 {
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    } else {
        0
    };
    if len > 0 {
        flags |= VIRTQ_DESC_F_WRITE;
    }
    if m.batch_head.is_none() {
        write_used(m, g, slot, id, len, None);
        m.batch_head = Some((slot, flags));
    } else if m.shadow.len() < usize::from(m.size) {
        m.shadow.push((slot, id, len, flags));
    } else {
        write_used(m, g, slot, id, len, Some(flags));
    }
    let n = count.clamp(1, m.size);
    m.used = advance(m.size, m.used, n);
    m.unsignalled = m.unsignalled.saturating_add(u32::from(n));
    m.rewind_to = None;
}

/// Mirrors a used descriptor's len then id (and flags) as the device writes them (they may
/// overlap the event areas) and checks the device wrote them.
fn write_used(m: &Model, g: &mut Guest, slot: u16, id: u16, len: u32, flags: Option<u16>) {
    let at = m.slot_addr(slot);
    g.mirror(at + 8, &len.to_le_bytes());
    g.mirror(at + 12, &id.to_le_bytes());
    if let Some(f) = flags {
        g.mirror(at + 14, &f.to_le_bytes());
    }
    assert_eq!(g.read_u32(at + 8), Some(len), "used len at slot {slot}");
    assert_eq!(g.read_u16(at + 12), Some(id), "used id at slot {slot}");
    if let Some(f) = flags {
        assert_eq!(g.read_u16(at + 14), Some(f), "used flags at slot {slot}");
    }
}

fn needs_notification(q: &mut PackedQueue, m: &mut Model, g: &Guest) {
    let got = q.needs_notification();
    let want = if m.unsignalled == 0 {
        false
    } else {
        let passed = m.unsignalled;
        let old = m.cycle_pos(m.signalled);
        m.unsignalled = 0;
        m.signalled = m.used;
        let flags = g.read_u16(m.driver + 2).expect("driver area is mapped");
        match flags {
            1 => false,
            2 if m.event_idx && !std::mem::replace(&mut m.signalled_valid, true) => true,
            2 if m.event_idx => {
                let off_wrap = g.read_u16(m.driver).expect("driver area is mapped");
                let off = off_wrap & !WRAP_BIT;
                let cycle = 2 * u32::from(m.size);
                if off >= m.size || passed >= cycle {
                    true
                } else {
                    // Notify iff the used position passed the event position: it lies in
                    // [old, old + passed) on the cycle of 2·size positions.
                    let event = m.cycle_pos((off, off_wrap & WRAP_BIT != 0));
                    (0..passed).any(|k| (old + k) % cycle == event)
                }
            }
            _ => true,
        }
    };
    assert_eq!(got, want, "needs_notification");
}

fn set_notification(q: &mut PackedQueue, m: &mut Model, g: &mut Guest, enable: bool) {
    let got = q.set_notification(enable);
    // The device area is the device's: flags equal to the last ones written are not
    // written again.
    let flags = match (enable, m.event_idx) {
        (false, _) => 1,
        (true, true) => 2,
        (true, false) => 0,
    };
    if enable && m.event_idx {
        g.mirror(m.device, &encode(m.avail).to_le_bytes());
        // off_wrap [device, +2) and flags [device+2, +2) do not overlap.
        assert_eq!(
            g.read_u16(m.device),
            Some(encode(m.avail)),
            "device off_wrap"
        );
    }
    if enable || m.event_flags != Some(flags) {
        g.mirror(m.device + 2, &flags.to_le_bytes());
        assert_eq!(g.read_u16(m.device + 2), Some(flags), "device event flags");
        m.event_flags = Some(flags);
    }
    let want = enable && m.head_available(g);
    assert_eq!(got, Ok(want), "set_notification({enable})");
}

/// Writes a chain of descriptors the driver's way: consecutive slots from the driver's
/// position, each available under its slot's wrap counter (unless asked otherwise), the
/// head's flags last.
fn driver_push(m: &mut Model, g: &mut Guest, descs: &[(PDesc, bool)]) {
    let head = m.drv;
    let mut head_desc = None;
    for (i, &(d, break_avail)) in descs.iter().enumerate() {
        let wrap = if break_avail { !m.drv.1 } else { m.drv.1 };
        let mut d = d;
        d.flags = (d.flags & !(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | avail_bits(wrap);
        if i == 0 {
            head_desc = Some(d);
            // Body first, keeping the old flags.
            let old = g.read_u16(m.slot_addr(head.0) + 14).unwrap_or(0);
            let mut body = d;
            body.flags = old;
            g.write(m.slot_addr(head.0), &pdesc_bytes(body));
        } else {
            g.write(m.slot_addr(m.drv.0), &pdesc_bytes(d));
        }
        m.drv = advance(m.size, m.drv, 1);
    }
    if let Some(d) = head_desc {
        g.write(m.slot_addr(head.0) + 14, &d.flags.to_le_bytes());
    }
}

/// One driver-made descriptor from the input.
fn input_desc(input: &mut Input, mem: &GuestMemory, area: u64, last: bool) -> (PDesc, bool) {
    let f = input.u8();
    let (mut addr, mut len) = if f & 0x80 != 0 {
        (input.u64(), input.u32())
    } else {
        (u64::from(input.u16()) << 4, u32::from(input.u16()))
    };
    let mut flags = 0;
    if f & 1 != 0 {
        flags |= VIRTQ_DESC_F_WRITE;
    }
    if f & 2 != 0 {
        flags |= VIRTQ_DESC_F_INDIRECT;
        if f & 0x40 == 0 {
            // A plausible table in the indirect area.
            addr = area + ((addr % AREA_MAX) & !15);
            len = 16 * (len % 40);
        }
    }
    // NEXT on every descriptor but the last, unless bit 2 flips it.
    if last == (f & 4 != 0) {
        flags |= VIRTQ_DESC_F_NEXT;
    }
    if f & 0x20 != 0 {
        // Unknown flag bits.
        let x = u16::from(input.u8());
        flags |= x << 8 | (x & 0x78);
    }
    if f & 0x80 != 0 && f & 0x10 != 0 {
        (addr, len) = fold(mem, addr, len);
    }
    let id = input.u16();
    (
        PDesc {
            addr,
            len,
            id,
            flags,
        },
        f & 8 != 0,
    )
}

fn run_op(
    op: u8,
    input: &mut Input,
    q: &mut PackedQueue,
    m: &mut Model,
    g: &mut Guest,
    chain: &mut DescriptorChain,
    area: u64,
) {
    match op % 14 {
        0 | 1 => pop(q, m, g, chain),
        2 => {
            // Complete an outstanding chain, honestly or not in its length.
            if m.outstanding.is_empty() {
                return;
            }
            let k = usize::from(input.u8()) % m.outstanding.len();
            let o = m.outstanding.remove(k);
            let len = match input.u8() % 4 {
                0 => 0,
                1 | 2 => o.wlen,
                _ => o.wlen.min(u32::from(input.u16())),
            };
            add_used(q, m, g, o.id, o.count, len);
        }
        3 => {
            // The device API used wrongly: any id, slot count (clamped) and length.
            let (id, count, len) = (input.u16(), input.u16(), input.u32());
            add_used(q, m, g, id, count, len);
        }
        4 => {
            q.publish_used();
            // Later entries first, in order (a later one may land on an earlier one's
            // bytes when the API is used wrongly), then the head's flags.
            for (slot, id, len, flags) in std::mem::take(&mut m.shadow) {
                let at = m.slot_addr(slot);
                g.mirror(at + 8, &len.to_le_bytes());
                g.mirror(at + 12, &id.to_le_bytes());
                g.mirror(at + 14, &flags.to_le_bytes());
            }
            if let Some((slot, flags)) = m.batch_head.take() {
                let at = m.slot_addr(slot) + 14;
                g.mirror(at, &flags.to_le_bytes());
                assert_eq!(
                    g.read_u16(at),
                    Some(flags),
                    "published flags at slot {slot}"
                );
            }
        }
        5 => needs_notification(q, m, g),
        6 => {
            let enable = input.bool();
            set_notification(q, m, g, enable);
        }
        7 => {
            // Rewind: to where the pops since the last completion started, or anywhere.
            if m.rewinds_left == 0 {
                return;
            }
            m.rewinds_left -= 1;
            let base = match (input.u8() % 2, m.rewind_to) {
                (0, Some(b)) => b,
                _ => input.u16(),
            };
            q.rewind(base);
            let slot = base & !WRAP_BIT;
            if slot < m.size {
                m.avail = (slot, base & WRAP_BIT != 0);
            }
            m.rewind_to = None;
        }
        8 | 9 => {
            // The driver makes a chain available.
            let n = usize::from(input.u8() % 8) + 1;
            let descs: Vec<_> = (0..n)
                .map(|i| input_desc(input, &g.mem, area, i + 1 == n))
                .collect();
            driver_push(m, g, &descs);
        }
        10 => {
            // A raw descriptor anywhere in the ring.
            let slot = input.u16() % m.size;
            let raw = input.bytes(16);
            let at = m.slot_addr(slot);
            g.write(at, raw);
        }
        11 => {
            // Fill many slots: single-descriptor chains or one long chain.
            let n = (input.u16() % m.size + 1).min(m.fill_left.min(0xffff) as u16);
            m.fill_left -= u32::from(n);
            let f = input.u8();
            let addr = u64::from(input.u16()) << 4;
            let len = u32::from(input.u8());
            for i in 0..n {
                let mut flags = if f & 1 != 0 { VIRTQ_DESC_F_WRITE } else { 0 };
                if f & 2 != 0 && i + 1 < n {
                    flags |= VIRTQ_DESC_F_NEXT;
                }
                let d = PDesc {
                    addr: addr + u64::from(i) * u64::from(len),
                    len,
                    id: i,
                    flags: flags | avail_bits(m.drv.1),
                };
                g.write(m.slot_addr(m.drv.0), &pdesc_bytes(d));
                m.drv = advance(m.size, m.drv, 1);
            }
        }
        12 => {
            // Driver event suppression: off_wrap then flags.
            let (off_wrap, flags) = (input.u16(), input.u16());
            g.write(m.driver, &off_wrap.to_le_bytes());
            g.write(m.driver + 2, &flags.to_le_bytes());
        }
        _ => {
            // Indirect table bytes.
            let off = u64::from(input.u16()) % AREA_MAX;
            let bytes = input.bytes_u8();
            let n = bytes.len().min((AREA_MAX - off) as usize);
            g.write(area + off, &bytes[..n]);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let cfg = input.u8();
    let layout = usize::from(cfg >> LAYOUT_SHIFT & 3) % 3;
    let mem = MEMS.with(|m| m.borrow_mut().get_or_insert_with(layouts)[layout].clone());
    let max_size: u16 = match layout {
        0 => 32768,
        _ => 4096,
    };
    let size_raw = input.u16();
    // Mostly small rings (fast runs); bit 15 asks for any size up to the layout's maximum.
    let size = match size_raw {
        0xffff => 0,
        s if s & 0x8000 != 0 => (s & 0x7fff) % max_size + 1,
        s => s % 300 + 1,
    };
    let base_raw = input.u16();
    let base = if cfg & F_RAW_BASE != 0 || size == 0 {
        base_raw
    } else {
        ((base_raw & !WRAP_BIT) % size) | (base_raw & WRAP_BIT)
    };
    let ring = 16 * u64::from(size);
    let area = (ring + 8 + 15) & !15;
    let work = area + AREA_MAX;
    let (desc, driver, device) = match cfg & ADDR_MASK {
        m if m == 1 << ADDR_SHIFT => {
            let mut a = || input.u64() % work;
            (a(), a(), a())
        }
        m if m == 2 << ADDR_SHIFT => (input.u64(), input.u64(), input.u64()),
        _ => (0, ring, ring + 4),
    };
    let mut g = Guest {
        shadow: vec![0; work as usize],
        mem: mem.clone(),
        dirty: Vec::new(),
    };

    let (off_wrap, ev_flags) = (input.u16(), input.u16());
    g.write(driver, &off_wrap.to_le_bytes());
    g.write(driver.wrapping_add(2), &ev_flags.to_le_bytes());
    let area_bytes = input.bytes_u16();
    let n = area_bytes.len().min(AREA_MAX as usize);
    g.write(area, &area_bytes[..n]);

    let vcfg = VringConfig {
        size,
        desc_addr: desc,
        avail_addr: driver,
        used_addr: device,
        next_avail: base,
        event_idx: cfg & F_EVENT_IDX != 0,
        indirect: cfg & F_INDIRECT != 0,
        addrs_are_uaddr: cfg & F_UADDR != 0,
    };
    let mut q = match PackedQueue::new(&vcfg, mem.clone()) {
        Ok(q) => q,
        Err(e) => {
            if debug() {
                eprintln!("setup refused: {e}");
            }
            // Refused: make sure it had to be.
            let ok_size = (1..=32768).contains(&size);
            let ok_base = ok_size && base & !WRAP_BIT < size;
            let placed = |addr: u64, len: u64, align: u64| {
                addr % align == 0
                    && in_one_region(&mem, addr, len)
                    && mem
                        .translate(addr, len)
                        .is_ok_and(|p| p as usize % align as usize == 0)
            };
            let ok_rings = placed(desc, ring, 16) && placed(driver, 4, 4) && placed(device, 4, 4);
            assert!(
                !(ok_size && ok_base && ok_rings),
                "valid ring refused: {e:?} ({vcfg:?})"
            );
            return;
        }
    };
    // Accepted: everything it will touch is inside one region and aligned on the host.
    assert!(size >= 1 && base & !WRAP_BIT < size, "{vcfg:?}");
    for (addr, len, align) in [(desc, ring, 16u64), (driver, 4, 4), (device, 4, 4)] {
        assert_eq!(addr % align, 0, "misaligned ring accepted: {vcfg:?}");
        let p = mem
            .translate(addr, len)
            .unwrap_or_else(|e| panic!("ring outside memory accepted ({e}): {vcfg:?}"));
        assert_eq!(
            p as usize % align as usize,
            0,
            "misaligned host ring: {vcfg:?}"
        );
    }
    let pos = (base & !WRAP_BIT, base & WRAP_BIT != 0);
    let mut m = Model {
        size,
        desc,
        driver,
        device,
        event_idx: vcfg.event_idx,
        indirect: vcfg.indirect,
        avail: pos,
        used: pos,
        batch_head: None,
        shadow: Vec::new(),
        signalled: pos,
        signalled_valid: false,
        unsignalled: 0,
        outstanding: Vec::new(),
        rewind_to: None,
        drv: pos,
        event_flags: None,
        fill_left: 1 << 16,
        rewinds_left: 16,
    };
    let mut chain = DescriptorChain::default();
    check_positions(&q, &m);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        if debug() {
            eprintln!("op {}", op % 14);
        }
        run_op(op, &mut input, &mut q, &mut m, &mut g, &mut chain, area);
        check_positions(&q, &m);
    }
    // The device wrote nothing the model did not expect.
    let mut now = vec![0u8; g.shadow.len()];
    mem.read(0, &mut now).unwrap();
    if now == g.shadow {
        return;
    }
    if let Some(i) = (0..now.len()).find(|&i| now[i] != g.shadow[i]) {
        panic!(
            "guest byte {i:#x} is {:#04x}, expected {:#04x} (ring {desc:#x}+{ring:#x}, \
             driver area {driver:#x}, device area {device:#x})",
            now[i], g.shadow[i]
        );
    }
});
