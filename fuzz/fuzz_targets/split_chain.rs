//! Split virtqueue chain walking (`SplitQueue::pop`) over hostile rings.
//!
//! The input fills a descriptor table, an avail ring and an area for indirect tables in guest
//! memory (one 1 MiB region, or three regions of which two are adjacent so buffers can cross a
//! region boundary), picks the queue size and the EVENT_IDX / INDIRECT_DESC flags, then pops
//! chains until the ring is empty or broken. Checked:
//! - no panic, and every segment handed out lies inside one mapped region;
//! - each pop agrees with a small reference walker written from virtio 1.2 §2.7.5 (same
//!   accept/refuse decision, same head, same buffers split at region boundaries);
//! - the used-ring and notification calls that follow a pop never panic.
//!
//! Input layout (all little-endian; a short input reads as zeroes):
//! `size_exp u8, flags u8, next_avail u16, avail_idx u16, avail_flags u16, used_event u16,
//!  n_heads u8, heads [u16; n_heads], n_desc u8, descs [16 bytes; n_desc], rest...`
//! where `rest` is copied to guest address 0x3000 (indirect tables live there).

#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use uvdpa_fuzz::Input;
use uvdpa_virtio::chain::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use uvdpa_virtio::{
    DescriptorChain, GuestMemory, MemoryRegion, QueueError, Segment, SplitQueue, VringConfig,
};

const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const AREA: u64 = 0x3000;
const AREA_MAX: usize = 0xd000;

/// Flags byte.
const F_EVENT_IDX: u8 = 1;
const F_INDIRECT: u8 = 2;
/// Fold descriptor addresses and lengths into (mostly) mapped ranges.
const F_MASK: u8 = 4;
/// Three regions instead of one.
const F_MULTI: u8 = 8;

/// Whether a zero-length device-writable descriptor followed by a device-readable one is an
/// error. The spec (§2.7.4.2) says readable descriptors come first whatever their length;
/// `DescriptorChain::parse_split` only refuses the case when a writable descriptor had bytes.
/// Kept at the implementation's behaviour so the fuzzer looks for other differences.
const STRICT_ORDER: bool = true;

fn layouts() -> [Arc<GuestMemory>; 2] {
    let one = GuestMemory::new(vec![MemoryRegion::anonymous(0, 1 << 20).unwrap()]).unwrap();
    let three = GuestMemory::new(vec![
        MemoryRegion::anonymous(0, 0x10000).unwrap(),
        MemoryRegion::anonymous(0x10000, 0x10000).unwrap(),
        MemoryRegion::anonymous(0x10_0000, 0x10000).unwrap(),
    ])
    .unwrap();
    [Arc::new(one), Arc::new(three)]
}

thread_local! {
    static MEMS: RefCell<Option<[Arc<GuestMemory>; 2]>> = const { RefCell::new(None) };
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &GuestMemory, at: u64) -> Option<Desc> {
    let mut b = [0u8; 16];
    mem.read(at, &mut b).ok()?;
    Some(Desc {
        addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
        len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
        flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
        next: u16::from_le_bytes(b[14..16].try_into().unwrap()),
    })
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

/// Reference chain walk (virtio 1.2 §2.7.5, §2.7.5.3): the readable and writable host pieces.
#[allow(clippy::type_complexity)]
fn reference(
    mem: &GuestMemory,
    size: u16,
    head: u16,
    indirect_ok: bool,
) -> Result<(Vec<(usize, usize)>, Vec<(usize, usize)>), &'static str> {
    let (mut tbl, mut tbl_len) = (DESC, u32::from(size));
    let (mut in_indirect, mut index, mut visited) = (false, head, 0u32);
    let (mut rd, mut wr) = (Vec::new(), Vec::new());
    let (mut total, mut saw_writable) = (0u64, false);
    loop {
        if u32::from(index) >= tbl_len {
            return Err("index out of range");
        }
        visited += 1;
        if visited > tbl_len {
            return Err("loop");
        }
        let d = read_desc(mem, tbl + 16 * u64::from(index)).ok_or("table unmapped")?;
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if in_indirect {
                return Err("nested indirect");
            }
            if !indirect_ok {
                return Err("indirect not negotiated");
            }
            if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err("indirect with next");
            }
            if d.len == 0 || d.len % 16 != 0 || d.len / 16 > u32::from(size).max(1024) {
                return Err("indirect length");
            }
            if !in_one_region(mem, d.addr, u64::from(d.len)) {
                return Err("indirect table unmapped");
            }
            (tbl, tbl_len, in_indirect, index, visited) = (d.addr, d.len / 16, true, 0, 0);
            continue;
        }
        let w = d.flags & VIRTQ_DESC_F_WRITE != 0;
        if !w && saw_writable {
            return Err("readable after writable");
        }
        if w && (STRICT_ORDER || d.len > 0) {
            saw_writable = true;
        }
        total += u64::from(d.len);
        if total > u64::from(u32::MAX) {
            return Err("length overflow");
        }
        let p = pieces(mem, d.addr, u64::from(d.len)).ok_or("buffer unmapped")?;
        if w { &mut wr } else { &mut rd }.extend(p);
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok((rd, wr));
        }
        index = d.next;
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

fn fold(mem: &GuestMemory, addr: u64, len: u32) -> (u64, u32) {
    let span = mem
        .regions()
        .iter()
        .map(|r| r.gpa() + r.size())
        .max()
        .unwrap_or(0);
    (addr % (span + 0x1000), len % 0x1_1000)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let flags = input.u8();
    let next_avail = input.u16();
    let avail_idx = input.u16();
    let avail_flags = input.u16();
    let used_event = input.u16();
    let mem = MEMS.with(|m| {
        m.borrow_mut().get_or_insert_with(layouts)[usize::from(flags & F_MULTI != 0)].clone()
    });

    // A clean slate: rings and the indirect area.
    mem.write(0, &vec![0u8; AREA as usize + AREA_MAX]).unwrap();
    let w16 = |at: u64, v: u16| mem.write(at, &v.to_le_bytes()).unwrap();
    w16(AVAIL, avail_flags);
    w16(AVAIL + 2, avail_idx);
    w16(AVAIL + 4 + 2 * u64::from(size), used_event);
    for k in 0..input.u8() {
        let slot = next_avail.wrapping_add(u16::from(k)) % size;
        w16(AVAIL + 4 + 2 * u64::from(slot), input.u16());
    }
    for k in 0..input.u8() {
        let (mut addr, mut len) = (input.u64(), input.u32());
        if flags & F_MASK != 0 {
            (addr, len) = fold(&mem, addr, len);
        }
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&input.u16().to_le_bytes());
        d[14..16].copy_from_slice(&input.u16().to_le_bytes());
        mem.write(DESC + 16 * u64::from(u16::from(k) % size), &d)
            .unwrap();
    }
    let mut rest = input.bytes(AREA_MAX).to_vec();
    if flags & F_MASK != 0 {
        for d in rest.chunks_exact_mut(16) {
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let (addr, len) = fold(&mem, addr, len);
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
        }
    }
    mem.write(AREA, &rest).unwrap();

    let cfg = VringConfig {
        size,
        desc_addr: DESC,
        avail_addr: AVAIL,
        used_addr: USED,
        next_avail,
        event_idx: flags & F_EVENT_IDX != 0,
        indirect: flags & F_INDIRECT != 0,
        addrs_are_uaddr: flags & 0x10 != 0,
    };
    let mut q = SplitQueue::new(&cfg, mem.clone()).expect("the rings are mapped and aligned");
    let mut chain = DescriptorChain::default();
    let mut expect_next = next_avail;
    for round in 0..=u32::from(size) + 1 {
        let pending = avail_idx.wrapping_sub(expect_next);
        let popped = q.pop(&mut chain);
        if pending > size {
            assert!(
                matches!(popped, Err(QueueError::AvailIndexJump { .. })),
                "{popped:?}"
            );
            break;
        }
        if pending == 0 {
            assert!(matches!(popped, Ok(false)), "{popped:?}");
            break;
        }
        let mut h = [0u8; 2];
        mem.read(AVAIL + 4 + 2 * u64::from(expect_next % size), &mut h)
            .unwrap();
        let head = u16::from_le_bytes(h);
        expect_next = expect_next.wrapping_add(1);
        assert_eq!(q.next_avail(), expect_next);
        let want = reference(&mem, size, head, cfg.indirect);
        match (&popped, want) {
            (Ok(true), Ok((rd, wr))) => {
                check_inside(&mem, chain.readable());
                check_inside(&mem, chain.writable());
                assert_eq!(chain.head(), head);
                assert_eq!(as_pairs(chain.readable()), rd, "readable pieces");
                assert_eq!(as_pairs(chain.writable()), wr, "writable pieces");
                let sum = |s: &[Segment]| s.iter().map(|s| s.len as u64).sum::<u64>();
                assert_eq!(u64::from(chain.readable_len()), sum(chain.readable()));
                assert_eq!(u64::from(chain.writable_len()), sum(chain.writable()));
                q.add_used(chain.head(), chain.writable_len());
            }
            (Err(QueueError::Chain { head: h, .. }), Err(_)) => {
                assert_eq!(*h, head);
                q.add_used(head, 0);
            }
            (got, want) => panic!("head {head}: queue says {got:?}, reference says {want:?}"),
        }
        q.publish_used();
        let _ = q.needs_notification();
        let _ = q.set_notification(round % 2 == 0);
    }
});
