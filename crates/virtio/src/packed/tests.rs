//! Packed ring tests: round trips across many wraps, batching, resume, event suppression,
//! and every malformed layout as an error, never a panic.

use std::sync::Arc;

use proptest::prelude::*;

use super::testing::DriverQueue;
use super::*;
use crate::chain::{ChainError, DescriptorChain};
use crate::chain::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::memory::MemoryRegion;

const MEM: u64 = 0x10_0000;
const BUF: u64 = 0x8_0000;
const TABLE: u64 = 0x6_0000;
const RING: u64 = 0x1000;

fn memory() -> Arc<GuestMemory> {
    Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, MEM).unwrap()]).unwrap())
}

fn setup_with(size: u16, event_idx: bool, indirect: bool) -> (DriverQueue, PackedQueue) {
    let mem = memory();
    let dq = DriverQueue::new(mem.clone(), RING, size);
    let q = PackedQueue::new(&dq.config(event_idx, indirect), mem).unwrap();
    (dq, q)
}

fn setup(size: u16) -> (DriverQueue, PackedQueue) {
    setup_with(size, true, true)
}

fn pop_err(q: &mut PackedQueue) -> (u16, ChainError) {
    let mut c = DescriptorChain::default();
    match q.pop(&mut c) {
        Err(QueueError::Chain { head, error }) => (head, error),
        other => panic!("expected a chain error, got {other:?}"),
    }
}

fn host(q: &PackedQueue, gpa: u64) -> *mut u8 {
    q.memory().translate(gpa, 1).unwrap()
}

/// Drives `rounds` batches of chains of 1..=3 descriptors through a ring of `size`,
/// completing each batch in reverse order; returns how many chains wrapped mid-chain.
fn round_trips(size: u16, rounds: usize) -> usize {
    let (mut dq, mut q) = setup(size);
    let mut c = DescriptorChain::default();
    let mut wrapped_mid_chain = 0;
    let mut n = 0usize;
    for round in 0..rounds {
        // A batch of up to 3 chains that fits in the ring (everything before completed).
        let mut batch = vec![];
        let mut free = usize::from(size);
        for _ in 0..3 {
            let len = n % 3 + 1;
            if len > free {
                break;
            }
            free -= len;
            n += 1;
            let bufs: Vec<(u64, u32, bool)> = (0..len)
                .map(|i| {
                    let addr = BUF + 0x1000 * (n % 16) as u64 + 0x100 * i as u64;
                    (addr, 16 + i as u32, i + 1 == len && len > 1)
                })
                .collect();
            let start = dq.next_avail;
            if usize::from(start) + len > usize::from(size) {
                wrapped_mid_chain += 1;
            }
            let id = dq.add_chain(&bufs);
            batch.push((id, len, bufs));
        }
        assert!(!batch.is_empty());
        for (id, len, bufs) in &batch {
            assert!(q.pop(&mut c).unwrap(), "round {round}");
            assert_eq!(c.head(), *id);
            assert_eq!(usize::from(c.desc_count()), *len);
            let segs: Vec<_> = c.readable().iter().chain(c.writable()).collect();
            assert_eq!(segs.len(), *len);
            for (s, (addr, l, _)) in segs.iter().zip(bufs) {
                assert_eq!(s.base, host(&q, *addr));
                assert_eq!(s.len, *l as usize);
            }
            let w = if *len > 1 { 1 } else { 0 };
            assert_eq!(c.writable().len(), w);
        }
        assert!(!q.pop(&mut c).unwrap());
        assert_eq!(q.next_avail(), dq.avail_base());
        for (id, len, _) in batch.iter().rev() {
            q.add_used(*id, *len as u16, 7);
        }
        assert_eq!(dq.pop_used(), None, "nothing visible before publish_used");
        q.publish_used();
        for (id, _, _) in batch.iter().rev() {
            assert_eq!(dq.pop_used(), Some((*id, 7)));
        }
        assert_eq!(dq.pop_used(), None);
        assert_eq!(q.next_used(), dq.used_off_wrap());
    }
    wrapped_mid_chain
}

#[test]
fn round_trips_over_many_wraps_size_4() {
    assert!(round_trips(4, 200) > 10);
}

#[test]
fn round_trips_over_many_wraps_size_256() {
    assert!(round_trips(256, 1000) > 3);
}

#[test]
fn round_trips_non_power_of_two_size() {
    assert!(round_trips(5, 200) > 10);
}

#[test]
fn size_one_ring_round_trips() {
    let (mut dq, mut q) = setup(1);
    let mut c = DescriptorChain::default();
    for i in 0..10u32 {
        let id = dq.add_chain(&[(BUF, 8 + i, true)]);
        assert!(q.pop(&mut c).unwrap());
        assert_eq!(c.writable_len(), 8 + i);
        assert!(!q.pop(&mut c).unwrap());
        q.add_used(id, 1, i);
        q.publish_used();
        assert_eq!(dq.pop_used(), Some((id, i)));
    }
}

#[test]
fn segments_read_and_write_guest_memory() {
    let (mut dq, mut q) = setup(4);
    dq.mem.write(BUF, b"hello").unwrap();
    let id = dq.add_chain(&[(BUF, 5, false), (BUF + 0x100, 8, true)]);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    let mut b = [0u8; 5];
    assert_eq!(c.read_at(0, &mut b), 5);
    assert_eq!(&b, b"hello");
    assert_eq!(c.write_at(0, b"world"), 5);
    q.add_used(id, c.desc_count(), 5);
    q.publish_used();
    assert_eq!(dq.pop_used(), Some((id, 5)));
    let mut back = [0u8; 5];
    dq.mem.read(BUF + 0x100, &mut back).unwrap();
    assert_eq!(&back, b"world");
}

#[test]
fn buffer_id_comes_from_the_last_descriptor() {
    let (mut dq, mut q) = setup(8);
    dq.push_raw(&[
        (BUF, 16, 7, VIRTQ_DESC_F_NEXT),
        (BUF + 0x100, 16, 8, VIRTQ_DESC_F_NEXT),
        (BUF + 0x200, 16, 5, VIRTQ_DESC_F_WRITE),
    ]);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert_eq!((c.head(), c.desc_count()), (5, 3));
    q.add_used(5, 3, 16);
    q.publish_used();
    assert_eq!(dq.pop_used(), Some((5, 16)));
    assert_eq!(dq.next_used, 3);
}

#[test]
fn indirect_table_is_followed() {
    let (mut dq, mut q) = setup(8);
    let id = dq.add_indirect(
        TABLE,
        &[
            (BUF, 16, false),
            (BUF + 0x1000, 4096, true),
            (BUF + 0x3000, 1, true),
        ],
    );
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert_eq!(c.head(), id);
    assert_eq!(c.desc_count(), 1);
    assert_eq!((c.readable_len(), c.writable_len()), (16, 4097));
    assert_eq!(c.writable()[1].base, host(&q, BUF + 0x3000));
    q.add_used(id, c.desc_count(), 4097);
    q.publish_used();
    assert_eq!(dq.pop_used(), Some((id, 4097)));
    assert_eq!(dq.next_used, 1);
}

#[test]
fn indirect_entries_are_consecutive_whatever_their_next_flags() {
    let (mut dq, mut q) = setup(8);
    // NEXT and IDs in table entries are ignored; all len/16 entries are taken in order.
    dq.write_raw(TABLE, BUF, 16, 99, 0);
    dq.write_raw(TABLE + 16, BUF + 0x100, 32, 0, VIRTQ_DESC_F_NEXT);
    dq.write_raw(
        TABLE + 32,
        BUF + 0x200,
        64,
        0,
        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
    );
    // The WRITE flag of the descriptor pointing to the table is ignored too.
    dq.push_raw(&[(TABLE, 48, 3, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)]);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert_eq!(c.head(), 3);
    assert_eq!((c.readable_len(), c.writable_len()), (48, 64));
}

#[test]
fn direct_descriptors_then_indirect_table() {
    let (mut dq, mut q) = setup(8);
    dq.write_raw(TABLE, BUF + 0x100, 64, 0, VIRTQ_DESC_F_WRITE);
    dq.push_raw(&[
        (BUF, 16, 0, VIRTQ_DESC_F_NEXT),
        (TABLE, 16, 4, VIRTQ_DESC_F_INDIRECT),
    ]);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert_eq!((c.head(), c.desc_count()), (4, 2));
    assert_eq!((c.readable_len(), c.writable_len()), (16, 64));
}

#[test]
fn batch_is_invisible_until_published() {
    let (mut dq, mut q) = setup(8);
    let ids: Vec<u16> = (0..3)
        .map(|i| dq.add_chain(&[(BUF + 0x100 * i, 16, true)]))
        .collect();
    let mut c = DescriptorChain::default();
    for _ in 0..3 {
        assert!(q.pop(&mut c).unwrap());
    }
    for &id in &ids {
        q.add_used(id, 1, 16);
    }
    assert_eq!(dq.pop_used(), None);
    // Later entries are not written either before the batch is published.
    dq.next_used = 1;
    assert_eq!(dq.pop_used(), None);
    dq.next_used = 0;
    q.publish_used();
    for &id in &ids {
        assert_eq!(dq.pop_used(), Some((id, 16)));
    }
    assert_eq!(dq.pop_used(), None);
    // Publishing with nothing added changes nothing.
    q.publish_used();
    assert_eq!(dq.pop_used(), None);
}

#[test]
fn zero_length_used_entry_has_no_write_flag() {
    let (mut dq, mut q) = setup(4);
    let id = dq.add_chain(&[(BUF, 16, false)]);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    q.add_used(id, 1, 0);
    q.publish_used();
    let mut f = [0u8; 2];
    dq.mem.read(RING + 14, &mut f).unwrap();
    assert_eq!(
        u16::from_le_bytes(f),
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    );
    assert_eq!(dq.pop_used(), Some((id, 0)));
}

/// Runs `count` single-descriptor chains through `q`, each completed and published.
fn run_singles(dq: &mut DriverQueue, q: &mut PackedQueue, count: usize) {
    let mut c = DescriptorChain::default();
    for _ in 0..count {
        let id = dq.add_chain(&[(BUF, 16, true)]);
        assert!(q.pop(&mut c).unwrap());
        assert_eq!(c.head(), id);
        q.add_used(id, 1, 1);
        q.publish_used();
        assert_eq!(dq.pop_used(), Some((id, 1)));
    }
}

#[test]
fn resume_from_encoded_base_with_either_wrap_counter() {
    let (mut dq, mut q) = setup(4);
    assert_eq!(q.next_avail(), 0x8000);
    run_singles(&mut dq, &mut q, 5);
    // Slot 1 of the second lap: wrap counter 0.
    assert_eq!(q.next_avail(), 0x0001);
    let mut cfg = dq.config(true, true);
    cfg.next_avail = q.next_avail();
    drop(q);
    let mut q = PackedQueue::new(&cfg, dq.mem.clone()).unwrap();
    assert_eq!((q.next_avail(), q.next_used()), (0x0001, 0x0001));
    run_singles(&mut dq, &mut q, 5);
    // Slot 2 of the third lap: wrap counter 1 again.
    assert_eq!(q.next_avail(), 0x8002);
    cfg.next_avail = q.next_avail();
    drop(q);
    let mut q = PackedQueue::new(&cfg, dq.mem.clone()).unwrap();
    run_singles(&mut dq, &mut q, 9);
    assert_eq!(q.next_avail(), dq.avail_base());
}

#[test]
fn resume_with_a_chain_already_waiting() {
    let (mut dq, mut q) = setup(4);
    run_singles(&mut dq, &mut q, 3);
    let base = q.next_avail();
    drop(q);
    // The driver made a chain available (wrapping mid-chain) while no backend ran.
    let id = dq.add_chain(&[(BUF, 16, false), (BUF + 0x100, 32, true)]);
    let mut cfg = dq.config(false, false);
    cfg.next_avail = base;
    let mut q = PackedQueue::new(&cfg, dq.mem.clone()).unwrap();
    assert_eq!(q.available().unwrap(), 1);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert_eq!((c.head(), c.desc_count(), c.writable_len()), (id, 2, 32));
    q.add_used(id, 2, 32);
    q.publish_used();
    assert_eq!(dq.pop_used(), Some((id, 32)));
}

#[test]
fn bad_base_slot_is_refused() {
    let mem = memory();
    let dq = DriverQueue::new(mem.clone(), RING, 6);
    for base in [6u16, 0x8006, 0x7fff, 0xffff] {
        let mut cfg = dq.config(false, false);
        cfg.next_avail = base;
        assert_eq!(
            PackedQueue::new(&cfg, mem.clone()).unwrap_err(),
            QueueError::InvalidBase { base, size: 6 }
        );
    }
    let mut cfg = dq.config(false, false);
    cfg.next_avail = 5;
    assert_eq!(PackedQueue::new(&cfg, mem).unwrap().next_avail(), 5);
}

#[test]
fn ring_setup_is_validated() {
    let mem = memory();
    let dq = DriverQueue::new(mem.clone(), RING, 8);
    for size in [0u16, 32769, u16::MAX] {
        let mut cfg = dq.config(false, false);
        cfg.size = size;
        assert_eq!(
            PackedQueue::new(&cfg, mem.clone()).unwrap_err(),
            QueueError::InvalidSize(u32::from(size))
        );
    }
    let misaligned = [
        ("descriptor", 8u64, 0u64, 0u64),
        ("driver area", 0, 2, 0),
        ("device area", 0, 0, 1),
    ];
    for (ring, d, a, u) in misaligned {
        let mut cfg = dq.config(false, false);
        cfg.desc_addr += d;
        cfg.avail_addr += a;
        cfg.used_addr += u;
        let e = PackedQueue::new(&cfg, mem.clone()).unwrap_err();
        assert!(
            matches!(e, QueueError::Misaligned { ring: r, .. } if r == ring),
            "{e:?}"
        );
    }
    let out = [
        ("descriptor", MEM - 16 * 4, MEM - 16 * 4, MEM - 16 * 4),
        ("driver area", RING, MEM, 0),
        ("device area", RING, 0, u64::MAX - 3),
    ];
    for (ring, d, a, u) in out {
        let mut cfg = dq.config(false, false);
        (cfg.desc_addr, cfg.avail_addr, cfg.used_addr) = (d, a, u);
        let e = PackedQueue::new(&cfg, mem.clone()).unwrap_err();
        assert!(
            matches!(e, QueueError::RingOutOfBounds { ring: r, .. } if r == ring),
            "{e:?}"
        );
    }
    // Frontend virtual addresses are honoured: this memory maps uaddr == gpa.
    let mut cfg = dq.config(false, false);
    cfg.addrs_are_uaddr = true;
    assert!(PackedQueue::new(&cfg, mem.clone()).is_ok());
    // The largest ring fits.
    let mut cfg = dq.config(false, false);
    cfg.size = 32768;
    cfg.next_avail = 0xffff;
    assert_eq!(PackedQueue::new(&cfg, mem).unwrap().next_avail(), 0xffff);
}

#[test]
fn misaligned_host_ring_is_refused() {
    // An odd mmap_offset makes an aligned frontend address land on an odd host address.
    let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, MEM + 1).unwrap();
    let mem =
        Arc::new(GuestMemory::new(vec![MemoryRegion::map(&fd, 0, MEM, 0, 1).unwrap()]).unwrap());
    let dq = DriverQueue::new(mem.clone(), RING, 8);
    assert!(matches!(
        PackedQueue::new(&dq.config(false, false), mem).unwrap_err(),
        QueueError::Misaligned { .. }
    ));
}

#[test]
fn driver_event_enable_and_disable() {
    let (mut dq, mut q) = setup_with(8, false, false);
    assert!(!q.needs_notification(), "nothing added yet");
    run_singles(&mut dq, &mut q, 1);
    assert!(q.needs_notification(), "ENABLE (zeroed area)");
    assert!(!q.needs_notification(), "nothing added since");
    dq.set_driver_event(RING_EVENT_FLAGS_DISABLE, 0);
    run_singles(&mut dq, &mut q, 1);
    assert!(!q.needs_notification());
    // DESC without EVENT_IDX is not honoured: notify.
    dq.set_driver_event(RING_EVENT_FLAGS_DESC, 0x7000);
    run_singles(&mut dq, &mut q, 1);
    assert!(q.needs_notification());
    // Reserved flags value: notify.
    dq.set_driver_event(3, 0);
    run_singles(&mut dq, &mut q, 1);
    assert!(q.needs_notification());
}

#[test]
fn driver_event_desc_position_with_wraps() {
    let (mut dq, mut q) = setup(4);
    let mut c = DescriptorChain::default();
    // The driver asks to be told when the used entry at its next used position appears.
    for round in 0..12 {
        dq.set_driver_event(RING_EVENT_FLAGS_DESC, dq.used_off_wrap());
        run_singles(&mut dq, &mut q, 1);
        assert!(q.needs_notification(), "round {round}");
    }
    // An event further ahead (two entries from now) is not passed by one entry...
    let ahead = |dq: &DriverQueue, n: u16| {
        let slot = dq.next_used + n;
        if slot >= dq.size {
            (slot - dq.size) | if dq.used_wrap { 0 } else { WRAP_BIT }
        } else {
            slot | if dq.used_wrap { WRAP_BIT } else { 0 }
        }
    };
    // The position right after the published entries is not passed yet; the next entry
    // passes it.
    dq.set_driver_event(RING_EVENT_FLAGS_DESC, ahead(&dq, 1));
    run_singles(&mut dq, &mut q, 1);
    assert!(!q.needs_notification());
    run_singles(&mut dq, &mut q, 1);
    assert!(q.needs_notification());
    dq.set_driver_event(RING_EVENT_FLAGS_DESC, ahead(&dq, 2));
    run_singles(&mut dq, &mut q, 1);
    assert!(!q.needs_notification());
    // ...but is by the two after it, published together (the batch crosses the ring end).
    let a = dq.add_chain(&[(BUF, 16, true)]);
    let b = dq.add_chain(&[(BUF, 16, true)]);
    assert!(q.pop(&mut c).unwrap() && q.pop(&mut c).unwrap());
    q.add_used(a, 1, 0);
    q.add_used(b, 1, 0);
    q.publish_used();
    assert!(q.needs_notification());
    // An event position already behind: not notified again.
    dq.pop_used();
    dq.pop_used();
    let behind = dq.used_off_wrap() ^ WRAP_BIT; // the same slot one lap earlier
    dq.set_driver_event(RING_EVENT_FLAGS_DESC, behind);
    run_singles(&mut dq, &mut q, 1);
    assert!(!q.needs_notification());
    // A position within a multi-slot chain's skipped slots counts as passed.
    let start = dq.next_used;
    dq.set_driver_event(RING_EVENT_FLAGS_DESC, ahead(&dq, 2));
    let id = dq.add_chain(&[(BUF, 16, false), (BUF, 16, false), (BUF, 16, true)]);
    assert!(q.pop(&mut c).unwrap());
    q.add_used(id, c.desc_count(), 0);
    q.publish_used();
    assert_eq!(dq.pop_used(), Some((id, 0)));
    assert_eq!((dq.next_used + 4 - start) % 4, 3);
    assert!(q.needs_notification());
    // A meaningless offset (>= size): notify rather than risk a hang.
    dq.set_driver_event(RING_EVENT_FLAGS_DESC, 9);
    run_singles(&mut dq, &mut q, 1);
    assert!(q.needs_notification());
}

#[test]
fn driver_event_desc_after_more_than_a_lap_notifies() {
    let (mut dq, mut q) = setup(4);
    dq.set_driver_event(RING_EVENT_FLAGS_DESC, 0x8000 | 3);
    assert!(!q.needs_notification());
    // Nine entries (more than two laps of positions) without a decision in between.
    run_singles(&mut dq, &mut q, 9);
    assert!(q.needs_notification());
}

#[test]
fn device_event_suppression_and_race_check() {
    let (mut dq, mut q) = setup_with(8, false, false);
    assert!(!q.set_notification(false).unwrap());
    assert_eq!(dq.device_event_flags(), RING_EVENT_FLAGS_DISABLE);
    dq.add_chain(&[(BUF, 16, true)]);
    assert!(q.set_notification(true).unwrap(), "a chain is waiting");
    assert_eq!(dq.device_event_flags(), RING_EVENT_FLAGS_ENABLE);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert!(!q.set_notification(true).unwrap());

    // With EVENT_IDX: DESC at the next avail position.
    let (mut dq, mut q) = setup(4);
    run_singles(&mut dq, &mut q, 5);
    assert!(!q.set_notification(true).unwrap());
    assert_eq!(dq.device_event_flags(), RING_EVENT_FLAGS_DESC);
    assert_eq!(dq.device_event_off_wrap(), 0x0001);
    assert_eq!(dq.device_event_off_wrap(), dq.avail_base());
    q.set_notification(false).unwrap();
    assert_eq!(dq.device_event_flags(), RING_EVENT_FLAGS_DISABLE);
}

#[test]
fn rewind_pops_the_same_chains_again() {
    let (mut dq, mut q) = setup(4);
    run_singles(&mut dq, &mut q, 3);
    let base = q.next_avail();
    let a = dq.add_chain(&[(BUF, 16, false), (BUF + 0x100, 16, true)]);
    let b = dq.add_chain(&[(BUF + 0x200, 16, true)]);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap() && q.pop(&mut c).unwrap());
    assert!(!q.pop(&mut c).unwrap());
    q.rewind(base);
    assert_eq!(q.next_avail(), 0x8003);
    assert!(q.pop(&mut c).unwrap());
    assert_eq!((c.head(), c.desc_count()), (a, 2));
    q.add_used(a, 2, 0);
    assert!(q.pop(&mut c).unwrap());
    assert_eq!(c.head(), b);
    q.add_used(b, 1, 0);
    q.publish_used();
    assert_eq!(dq.pop_used(), Some((a, 0)));
    assert_eq!(dq.pop_used(), Some((b, 0)));
    // A base outside the ring is ignored.
    q.rewind(0x7fff);
    assert_eq!(q.next_avail(), dq.avail_base());
}

#[test]
fn available_reports_the_head_only() {
    let (mut dq, q) = setup(4);
    assert_eq!(q.available().unwrap(), 0);
    dq.add_chain(&[(BUF, 16, true)]);
    dq.add_chain(&[(BUF, 16, true)]);
    assert_eq!(q.available().unwrap(), 1);
}

// ---- hostile layouts ----

#[test]
fn descriptor_outside_memory_is_refused() {
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(MEM - 8, 16, false)]);
    assert!(matches!(pop_err(&mut q), (0, ChainError::Memory(_))));
}

#[test]
fn address_plus_length_overflow_is_refused() {
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(u64::MAX - 4, 16, false)]);
    assert!(matches!(pop_err(&mut q).1, ChainError::Memory(_)));
}

#[test]
fn total_length_overflow_is_refused() {
    // A sparse 4 GiB memfd holds two in-bounds 3 GiB buffers whose sum overflows 32 bits.
    let big = 4u64 << 30;
    let mem = Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, big).unwrap()]).unwrap());
    let mut dq = DriverQueue::new(mem.clone(), RING, 8);
    let mut q = PackedQueue::new(&dq.config(false, false), mem).unwrap();
    dq.add_chain(&[
        (0x10_0000, 0xC000_0000, true),
        (0x10_0000, 0xC000_0000, true),
    ]);
    assert_eq!(pop_err(&mut q).1, ChainError::LengthOverflow);
}

#[test]
fn chain_longer_than_the_ring_is_refused() {
    let (dq, mut q) = setup(4);
    for slot in 0..4 {
        let f = VIRTQ_DESC_F_NEXT | DriverQueue::avail_bits(true);
        dq.write_desc(slot, BUF, 16, 0, f);
    }
    assert_eq!(pop_err(&mut q), (0, ChainError::TooLong { table_len: 4 }));
    // The whole ring was consumed: the device is back at slot 0 of the next lap.
    assert_eq!(q.next_avail(), 0);
    let mut c = DescriptorChain::default();
    assert!(!q.pop(&mut c).unwrap());
}

#[test]
fn chain_filling_the_whole_ring_is_accepted() {
    let (mut dq, mut q) = setup(4);
    run_singles(&mut dq, &mut q, 2);
    let id = dq.add_chain(&[
        (BUF, 1, false),
        (BUF, 2, false),
        (BUF, 3, true),
        (BUF, 4, true),
    ]);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert_eq!(
        (c.desc_count(), c.readable_len(), c.writable_len()),
        (4, 3, 7)
    );
    assert!(!q.pop(&mut c).unwrap());
    q.add_used(id, 4, 7);
    q.publish_used();
    assert_eq!(dq.pop_used(), Some((id, 7)));
    assert_eq!(q.next_used(), dq.used_off_wrap());
}

#[test]
fn unavailable_descriptor_inside_a_chain_is_refused() {
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(BUF, 16, false), (BUF, 16, false), (BUF, 16, true)]);
    // The middle one still carries the previous lap's (used) flags.
    dq.write_desc(1, BUF, 16, 0, VIRTQ_DESC_F_NEXT);
    assert_eq!(pop_err(&mut q), (0, ChainError::Unavailable { slot: 1 }));
    assert_eq!(q.next_avail(), 0x8002, "the slots walked are consumed");

    // Across the ring end the wrap counter toggles: a descriptor after the wrap marked
    // with the old counter is not available.
    let (mut dq, mut q) = setup(4);
    run_singles(&mut dq, &mut q, 3);
    let f = VIRTQ_DESC_F_NEXT | DriverQueue::avail_bits(true);
    dq.write_desc(0, BUF, 16, 0, DriverQueue::avail_bits(true));
    dq.write_desc(3, BUF, 16, 0, f);
    assert_eq!(pop_err(&mut q), (3, ChainError::Unavailable { slot: 0 }));
}

#[test]
fn failed_chain_is_consumed_and_the_next_one_pops() {
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(MEM, 16, false)]);
    let good = dq.add_chain(&[(BUF, 16, false)]);
    assert!(matches!(pop_err(&mut q), (0, ChainError::Memory(_))));
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert_eq!(c.head(), good);
}

#[test]
fn readable_after_writable_is_refused() {
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(BUF, 16, true), (BUF + 64, 16, false)]);
    assert_eq!(pop_err(&mut q).1, ChainError::ReadableAfterWritable);
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(BUF, 0, true), (BUF + 64, 16, false)]);
    assert_eq!(pop_err(&mut q).1, ChainError::ReadableAfterWritable);
    // Inside an indirect table too.
    let (mut dq, mut q) = setup(8);
    dq.add_indirect(TABLE, &[(BUF, 16, true), (BUF + 64, 16, false)]);
    assert_eq!(pop_err(&mut q).1, ChainError::ReadableAfterWritable);
}

#[test]
fn nested_indirect_is_refused() {
    let (mut dq, mut q) = setup(8);
    let t2 = TABLE + 0x1000;
    dq.write_raw(t2, BUF, 16, 0, 0);
    dq.write_raw(TABLE, BUF, 16, 0, 0);
    dq.write_raw(TABLE + 16, t2, 16, 0, VIRTQ_DESC_F_INDIRECT);
    dq.push_raw(&[(TABLE, 32, 0, VIRTQ_DESC_F_INDIRECT)]);
    assert_eq!(pop_err(&mut q).1, ChainError::NestedIndirect);
}

#[test]
fn indirect_with_next_is_refused() {
    let (mut dq, mut q) = setup(8);
    dq.write_raw(TABLE, BUF, 16, 0, 0);
    dq.push_raw(&[
        (TABLE, 16, 0, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT),
        (BUF, 16, 0, 0),
    ]);
    assert_eq!(pop_err(&mut q).1, ChainError::IndirectWithNext);
}

#[test]
fn bad_indirect_tables_are_refused() {
    for len in [0u32, 24, 8, 16 * 1025] {
        let (mut dq, mut q) = setup(8);
        dq.push_raw(&[(TABLE, len, 0, VIRTQ_DESC_F_INDIRECT)]);
        assert_eq!(
            pop_err(&mut q).1,
            ChainError::IndirectBadLength { len, max: 1024 },
            "{len}"
        );
    }
    // A table longer than the ring, as Linux builds from seg_max, is fine up to 1024.
    for n in [8usize, 130] {
        let (mut dq, mut q) = setup(8);
        dq.add_indirect(TABLE, &vec![(BUF, 1, false); n]);
        let mut c = DescriptorChain::default();
        assert!(q.pop(&mut c).unwrap());
        assert_eq!(c.readable_len() as usize, n);
    }
    // Indirect table outside memory.
    let (mut dq, mut q) = setup(8);
    dq.push_raw(&[(MEM - 16, 32, 0, VIRTQ_DESC_F_INDIRECT)]);
    assert!(matches!(pop_err(&mut q).1, ChainError::Memory(_)));
}

#[test]
fn indirect_without_negotiation_is_refused() {
    let (mut dq, mut q) = setup_with(8, true, false);
    dq.add_indirect(TABLE, &[(BUF, 16, false)]);
    assert_eq!(pop_err(&mut q).1, ChainError::IndirectNotNegotiated);
}

#[test]
fn used_descriptor_counts_are_clamped() {
    // A device passing a bogus desc_count cannot push the used position out of the ring.
    let (mut dq, mut q) = setup(4);
    let id = dq.add_chain(&[(BUF, 16, true)]);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    q.add_used(id, 0, 1);
    assert_eq!(q.next_used(), 0x8001);
    q.add_used(id, u16::MAX, 1);
    assert_eq!(q.next_used(), 0x0001);
}

proptest! {
    /// Arbitrary descriptor ring bytes, bases and driver event areas never panic: each pop
    /// is a chain whose buffers are inside memory, or a chain error. Flags are biased so
    /// that most descriptors are available under the wrap counter of their slot.
    #[test]
    fn arbitrary_rings_never_panic(
        descs in proptest::collection::vec(
            (any::<u64>(), any::<u32>(), any::<u16>(), 0u16..4, 0u8..8, 0u8..8, any::<u16>()),
            16,
        ),
        tables in proptest::collection::vec((any::<u64>(), any::<u32>(), 0u16..8), 8),
        base in 0u16..16,
        wrap in any::<bool>(),
        small_addrs in any::<bool>(),
        indirect in any::<bool>(),
        event in (any::<u16>(), 0u16..4),
        used_lens in any::<u32>(),
    ) {
        let mem = memory();
        let dq = DriverQueue::new(mem.clone(), RING, 16);
        let mut cfg = dq.config(true, indirect);
        cfg.next_avail = base | if wrap { WRAP_BIT } else { 0 };
        let mut q = PackedQueue::new(&cfg, mem).unwrap();
        let fix = |addr: u64, len: u32| {
            if small_addrs { (addr % MEM, len % 0x2000) } else { (addr, len) }
        };
        for (i, &(addr, len, id, low, ind, bits, raw)) in descs.iter().enumerate() {
            let slot = i as u16;
            let is_indirect = ind == 0;
            let low = low | if is_indirect { VIRTQ_DESC_F_INDIRECT } else { 0 };
            let (mut addr, mut len) = fix(addr, len);
            if is_indirect && small_addrs {
                addr = TABLE + 16 * (addr % 8);
                len %= 160;
            }
            // Slots before the base are in the device's next lap.
            let slot_wrap = (slot >= base) == wrap;
            let flags = match bits {
                0..=4 => low | DriverQueue::avail_bits(slot_wrap),
                5 => low | DriverQueue::avail_bits(!slot_wrap),
                6 => low | VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED,
                _ => raw,
            };
            dq.write_desc(slot, addr, len, id, flags);
        }
        for (i, &(addr, len, flags)) in tables.iter().enumerate() {
            let (addr, len) = fix(addr, len);
            dq.write_raw(TABLE + 16 * i as u64, addr, len, 0, flags);
        }
        dq.set_driver_event(event.1, event.0);
        let mut c = DescriptorChain::default();
        for _ in 0..40 {
            match q.pop(&mut c) {
                Ok(false) => break,
                Ok(true) => {
                    prop_assert!(c.desc_count() >= 1 && c.desc_count() <= 16);
                    for s in c.readable().iter().chain(c.writable()) {
                        let lo = q.memory().regions()[0].host_base() as usize;
                        let a = s.base as usize;
                        prop_assert!(a >= lo && a + s.len <= lo + MEM as usize);
                    }
                    q.add_used(c.head(), c.desc_count(), used_lens);
                    q.publish_used();
                    let _ = q.needs_notification();
                }
                Err(QueueError::Chain { head, .. }) => prop_assert!(head < 16),
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
            let _ = q.set_notification(true);
        }
    }
}

// ---- Inflight tracking (the packed layout of `crate::inflight`) ----

use std::collections::{HashMap, HashSet};

use crate::inflight::{InflightLayout, InflightMap};

/// A request the driver made available: (request, ring slots, buffers).
type Outstanding = (u64, u16, Vec<(u64, u32, bool)>);

/// A driver and a device over one packed ring and one inflight region. The device can
/// "crash" (be dropped, possibly part-way through a completion) and a new one attach to
/// the same ring and region, as a restarted backend does.
struct Rig {
    dq: DriverQueue,
    map: Arc<InflightMap>,
    q: PackedQueue,
    size: u16,
    free_ids: Vec<u16>,
    /// Driver view, by buffer ID: (request, ring slots, buffers) made available and not
    /// yet seen used.
    outstanding: HashMap<u16, Outstanding>,
    outstanding_slots: u32,
    next_req: u64,
    /// Device: chains popped and not completed, with their request.
    device: Vec<(DescriptorChain, u64)>,
    /// Requests in the order the current device first popped them (oldest first).
    pop_order: Vec<u64>,
    /// Requests whose used descriptor the device published.
    published: HashSet<u64>,
    /// Used descriptors the driver saw, per request.
    seen: HashMap<u64, u32>,
    /// Requests resubmitted by restarts, in order, per restart.
    resubmitted: Vec<Vec<u64>>,
}

fn used_len(req: u64) -> u32 {
    (req % 7) as u32 + 1
}

impl Rig {
    fn new(size: u16) -> Self {
        let mem = memory();
        let dq = DriverQueue::new(mem.clone(), RING, size);
        let map = InflightMap::create_in(InflightLayout::Packed, 1, size).unwrap();
        let mut q = PackedQueue::new(&dq.config(true, true), mem).unwrap();
        assert!(q.attach_inflight(&map, 0));
        Self {
            dq,
            map,
            q,
            size,
            free_ids: (0..size).rev().collect(),
            outstanding: HashMap::new(),
            outstanding_slots: 0,
            next_req: 0,
            device: Vec::new(),
            pop_order: Vec::new(),
            published: HashSet::new(),
            seen: HashMap::new(),
            resubmitted: Vec::new(),
        }
    }

    /// The driver makes a chain of `len` buffers available (through an indirect table if
    /// `indirect`); `None` when the ring or the IDs are full.
    fn add(&mut self, len: usize, indirect: bool) -> Option<u64> {
        let slots = if indirect { 1 } else { len as u16 };
        if u32::from(slots) + self.outstanding_slots > u32::from(self.size) {
            return None;
        }
        let id = self.free_ids.pop()?;
        let req = self.next_req;
        self.next_req += 1;
        let bufs: Vec<(u64, u32, bool)> = (0..len)
            .map(|i| {
                let addr = BUF + (req % 64) * 0x400 + 0x40 * i as u64;
                (addr, 8 + i as u32 + (req % 8) as u32, i + 1 == len)
            })
            .collect();
        if indirect {
            let table = TABLE + u64::from(id) * 0x100;
            for (i, &(addr, l, w)) in bufs.iter().enumerate() {
                let f = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                self.dq.write_raw(table + 16 * i as u64, addr, l, 0, f);
            }
            self.dq
                .push_raw(&[(table, 16 * len as u32, id, VIRTQ_DESC_F_INDIRECT)]);
        } else {
            let descs: Vec<_> = bufs
                .iter()
                .enumerate()
                .map(|(i, &(addr, l, w))| {
                    let next = if i + 1 < len { VIRTQ_DESC_F_NEXT } else { 0 };
                    let f = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                    (addr, l, id, next | f)
                })
                .collect();
            self.dq.push_raw(&descs);
        }
        self.outstanding.insert(id, (req, slots, bufs));
        self.outstanding_slots += u32::from(slots);
        Some(req)
    }

    /// Checks a chain the device got against what the driver made available; returns its
    /// request.
    fn check_chain(&self, c: &DescriptorChain) -> u64 {
        let (req, slots, bufs) = self
            .outstanding
            .get(&c.head())
            .unwrap_or_else(|| panic!("device got buffer ID {} nobody made available", c.head()));
        assert!(
            !self.published.contains(req),
            "request {req} popped again after it was completed"
        );
        assert!(
            !self.device.iter().any(|(_, r)| r == req),
            "request {req} popped twice"
        );
        assert_eq!(c.desc_count(), *slots, "request {req}: ring slots");
        let segs: Vec<_> = c.readable().iter().chain(c.writable()).collect();
        assert_eq!(segs.len(), bufs.len(), "request {req}: buffers");
        for (s, &(addr, len, _)) in segs.iter().zip(bufs) {
            assert_eq!(s.base, host(&self.q, addr), "request {req}: buffer address");
            assert_eq!(s.len, len as usize, "request {req}: buffer length");
        }
        assert_eq!(c.writable().len(), 1, "request {req}: last buffer writable");
        *req
    }

    /// The device pops one chain; returns its request.
    fn pop(&mut self) -> Option<u64> {
        let mut c = DescriptorChain::default();
        if !self.q.pop(&mut c).unwrap() {
            return None;
        }
        let req = self.check_chain(&c);
        self.pop_order.push(req);
        self.device.push((c, req));
        Some(req)
    }

    fn pop_all(&mut self) -> usize {
        let mut n = 0;
        while self.pop().is_some() {
            n += 1;
        }
        n
    }

    /// The device completes its `k`-th chain in flight (modulo); returns the request.
    fn complete(&mut self, k: usize) -> Option<u64> {
        if self.device.is_empty() {
            return None;
        }
        let (c, req) = self.device.remove(k % self.device.len());
        self.q.add_used_chain(&c, used_len(req));
        self.q.publish_used();
        self.published.insert(req);
        Some(req)
    }

    /// The driver takes every used descriptor published.
    fn reap(&mut self) -> usize {
        let mut n = 0;
        while let Some((id, len)) = self.dq.pop_used() {
            let (req, slots, _) = self
                .outstanding
                .remove(&id)
                .unwrap_or_else(|| panic!("used buffer ID {id} is not outstanding"));
            assert!(
                self.published.contains(&req),
                "request {req} used but never completed"
            );
            assert_eq!(len, used_len(req), "request {req}: used length");
            *self.seen.entry(req).or_default() += 1;
            self.free_ids.push(id);
            self.outstanding_slots -= u32::from(slots);
            n += 1;
        }
        n
    }

    /// The device dies; if `stage` is set, part-way through completing its `k`-th chain
    /// (0: used id/len written; 1: region moved, uncommitted; 2: flags published; 3: mark
    /// cleared; 4: free head committed). A new device attaches with the vring base QEMU
    /// would resend (`base`) and must resubmit exactly the chains not published, oldest
    /// first; they are popped here.
    fn crash(&mut self, stage: Option<(u8, usize)>, base: u16) -> Vec<u64> {
        if let Some((stage, k)) = stage {
            if !self.device.is_empty() {
                let (c, req) = self.device.remove(k % self.device.len());
                self.q.crash_after = Some(stage);
                self.q.add_used_chain(&c, used_len(req));
                if stage >= 2 {
                    self.published.insert(req);
                } else {
                    self.device.push((c, req));
                }
            }
        }
        let mut expect: Vec<u64> = self.device.iter().map(|&(_, r)| r).collect();
        let order: HashMap<u64, usize> = self
            .pop_order
            .iter()
            .enumerate()
            .map(|(i, &r)| (r, i))
            .collect();
        expect.sort_by_key(|r| order[r]);
        let mut cfg = self.dq.config(true, true);
        cfg.next_avail = base;
        let mem = self.q.memory().clone();
        self.q = PackedQueue::new(&cfg, mem).unwrap();
        self.device.clear();
        assert!(self.q.attach_inflight(&self.map, 0));
        assert_eq!(self.q.resubmit.len(), expect.len(), "chains resubmitted");
        let mut got = Vec::new();
        for _ in 0..expect.len() {
            let mut c = DescriptorChain::default();
            assert!(self.q.pop(&mut c).unwrap());
            let req = self.check_chain(&c);
            got.push(req);
            self.device.push((c, req));
        }
        assert_eq!(got, expect, "resubmitted requests, oldest first");
        self.pop_order = got.clone();
        self.resubmitted.push(got.clone());
        got
    }

    /// Completes everything (the driver adding nothing new) and checks every request the
    /// driver made available was seen used exactly once.
    fn drain(&mut self) {
        for _ in 0..4 * usize::from(self.size) + 8 {
            self.pop_all();
            while self.complete(0).is_some() {}
            self.reap();
            if self.outstanding.is_empty() {
                break;
            }
        }
        assert!(
            self.outstanding.is_empty(),
            "requests never completed: {:?}",
            self.outstanding.values().map(|v| v.0).collect::<Vec<_>>()
        );
        for req in 0..self.next_req {
            assert_eq!(
                self.seen.get(&req).copied(),
                Some(1),
                "request {req} seen used"
            );
        }
    }
}

#[test]
fn packed_inflight_region_sizes_follow_the_spec_layout() {
    use crate::inflight::packed_queue_region_size;
    // 32-byte header, 32-byte entries, padded to 64.
    assert_eq!(packed_queue_region_size(1), 64);
    assert_eq!(packed_queue_region_size(2), 128);
    assert_eq!(packed_queue_region_size(128), 4160);
    assert_eq!(packed_queue_region_size(256), 8256);
    let m = InflightMap::create_in(InflightLayout::Packed, 2, 8).unwrap();
    assert_eq!(m.len(), 2 * 320);
    assert!(m.fits(InflightLayout::Split) && m.fits(InflightLayout::Packed));
    let s = InflightMap::create(2, 8).unwrap();
    assert!(!s.fits(InflightLayout::Packed));
    assert!(
        s.packed_queue(0, 8).is_none(),
        "a split-sized buffer has no packed regions"
    );
}

#[test]
fn packed_inflight_tracks_out_of_order_completions_without_a_crash() {
    let mut r = Rig::new(8);
    let mut x = 7u64;
    for _ in 0..400 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        match (x >> 33) % 4 {
            0 | 1 => {
                r.add(((x >> 40) % 3 + 1) as usize, (x >> 45).is_multiple_of(4));
            }
            2 => {
                r.pop();
            }
            _ => {
                r.complete((x >> 50) as usize);
                r.reap();
            }
        }
    }
    r.drain();
    // Nothing left in flight: a restart resubmits nothing and resumes where the ring is.
    let (slot, wrap) = (r.dq.next_avail, r.dq.avail_wrap);
    assert!(r.crash(None, WRAP_BIT).is_empty());
    assert_eq!(r.q.next_avail(), encode(slot, wrap));
    assert_eq!(r.q.next_used(), encode(slot, wrap));
}

#[test]
fn crash_after_marking_resubmits_the_popped_chains_oldest_first() {
    let mut r = Rig::new(8);
    for len in [1, 2, 1, 3] {
        r.add(len, false).unwrap();
    }
    assert_eq!(r.pop_all(), 4);
    // Out of order: the third chain completes first.
    assert_eq!(r.complete(2), Some(2));
    assert_eq!(r.reap(), 1);
    // Two more made available, not popped: they stay in the ring for the new device.
    r.add(1, false).unwrap();
    r.add(1, true).unwrap();
    assert_eq!(r.crash(None, WRAP_BIT), vec![0, 1, 3]);
    assert_eq!(
        r.pop(),
        Some(4),
        "then the ring, from where the old device stopped"
    );
    assert_eq!(r.pop(), Some(5));
    assert_eq!(r.pop(), None);
    r.drain();
}

#[test]
fn crash_before_publishing_resubmits_the_chain_being_completed() {
    for stage in [0, 1] {
        let mut r = Rig::new(8);
        for _ in 0..3 {
            r.add(2, false).unwrap();
        }
        r.pop_all();
        r.complete(1);
        // Dies completing request 2: its used descriptor never became visible.
        assert_eq!(
            r.crash(Some((stage, 1)), WRAP_BIT),
            vec![0, 2],
            "stage {stage}"
        );
        assert_eq!(r.reap(), 1, "only request 1 was seen used");
        r.drain();
    }
}

#[test]
fn crash_after_publishing_does_not_resubmit_the_chain() {
    for stage in [2, 3, 4] {
        for reap_first in [false, true] {
            let mut r = Rig::new(8);
            for _ in 0..3 {
                r.add(2, false).unwrap();
            }
            r.pop_all();
            if reap_first {
                // The driver already took it (and may reuse the slots) before the restart.
                r.q.crash_after = Some(stage);
                let (c, req) = r.device.remove(0);
                r.q.add_used_chain(&c, used_len(req));
                r.published.insert(req);
                assert_eq!(r.reap(), 1);
                r.add(1, false).unwrap();
                assert_eq!(r.crash(None, WRAP_BIT), vec![1, 2], "stage {stage}");
            } else {
                assert_eq!(
                    r.crash(Some((stage, 0)), WRAP_BIT),
                    vec![1, 2],
                    "stage {stage}"
                );
            }
            r.drain();
        }
    }
}

#[test]
fn crash_mid_batch_resubmits_exactly_the_unpublished_chains() {
    let mut r = Rig::new(16);
    for i in 0..8 {
        r.add(i % 3 + 1, i % 4 == 3).unwrap();
    }
    assert_eq!(r.pop_all(), 8);
    // A batch of completions in the order a disk returns them; the device dies in the
    // middle of the fourth.
    for k in [5, 1, 3] {
        r.complete(k);
    }
    let left = r.crash(Some((1, 2)), WRAP_BIT);
    assert_eq!(left.len(), 5);
    r.reap();
    // A second crash before any of them completes resubmits the same chains again.
    assert_eq!(r.crash(None, 0x8000 | 3), left);
    r.drain();
}

#[test]
fn crash_across_wraps_with_chains_over_the_ring_end() {
    let mut r = Rig::new(5);
    let mut x = 1u64;
    for round in 0..60 {
        for _ in 0..3 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            r.add(((x >> 40) % 3 + 1) as usize, (x >> 50).is_multiple_of(5));
        }
        r.pop_all();
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        r.complete((x >> 33) as usize);
        r.reap();
        if round % 7 == 3 {
            let stage = ((x >> 44) % 6) as u8;
            let stage = (stage < 5).then_some((stage, (x >> 20) as usize));
            r.crash(stage, WRAP_BIT);
            r.reap();
        }
    }
    assert!(r.resubmitted.iter().any(|v| !v.is_empty()));
    r.drain();
}

#[test]
fn a_fresh_region_starts_at_the_vring_base_and_a_used_one_overrides_a_stale_base() {
    let mem = memory();
    let dq = DriverQueue::new(mem.clone(), RING, 8);
    let map = InflightMap::create_in(InflightLayout::Packed, 1, 8).unwrap();
    let mut cfg = dq.config(false, false);
    cfg.next_avail = 5; // slot 5, wrap counter 0: a ring that ran before (migration).
    let mut q = PackedQueue::new(&cfg, mem.clone()).unwrap();
    assert!(q.attach_inflight(&map, 0));
    assert_eq!(q.next_avail(), 5);
    assert_eq!(q.next_used(), 5);
    drop(q);
    // A restart is given the base the dead backend started from, or anything else: the
    // region's position wins.
    cfg.next_avail = WRAP_BIT;
    let mut q = PackedQueue::new(&cfg, mem).unwrap();
    assert!(q.attach_inflight(&map, 0));
    assert_eq!(q.next_avail(), 5);
    // Starting the region afresh (a device reset) takes the base again.
    map.init_layout(InflightLayout::Packed).unwrap();
    let mut q = PackedQueue::new(&cfg, q.memory().clone()).unwrap();
    assert!(q.attach_inflight(&map, 0));
    assert_eq!(q.next_avail(), WRAP_BIT);
}

#[test]
fn a_corrupt_region_is_started_afresh_without_panicking() {
    let mem = memory();
    let dq = DriverQueue::new(mem.clone(), RING, 8);
    let map = InflightMap::create_in(InflightLayout::Packed, 1, 8).unwrap();
    let mut q = PackedQueue::new(&dq.config(false, false), mem.clone()).unwrap();
    assert!(q.attach_inflight(&map, 0));
    drop(q);
    // SAFETY: the test owns the mapping; no tracker exists now.
    let base = unsafe { std::slice::from_raw_parts_mut(map_base(&map), map.len()) };
    for (i, b) in base.iter_mut().enumerate().skip(12) {
        *b = (i * 37 % 251) as u8;
    }
    let mut q = PackedQueue::new(&dq.config(false, false), mem).unwrap();
    assert!(q.attach_inflight(&map, 0));
    assert_eq!(q.next_avail(), WRAP_BIT);
    assert!(q.resubmit.is_empty());
}

fn map_base(map: &InflightMap) -> *mut u8 {
    let fd = map.fd();
    // SAFETY: a second shared mapping of the same memfd, leaked for the test.
    unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            map.len(),
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            fd,
            0,
        )
    }
    .unwrap()
    .cast()
}

#[test]
fn rewind_unmarks_the_chains_given_back() {
    let mut r = Rig::new(8);
    for _ in 0..3 {
        r.add(1, false).unwrap();
    }
    r.pop();
    let start = r.q.next_avail();
    r.pop();
    r.pop();
    r.q.rewind(start);
    r.device.truncate(1);
    r.pop_order.truncate(1);
    // The two chains given back are not in flight: a restart resubmits only the first,
    // then pops them from the ring.
    assert_eq!(r.crash(None, WRAP_BIT), vec![0]);
    assert_eq!(r.pop(), Some(1));
    assert_eq!(r.pop(), Some(2));
    r.drain();
}

#[derive(Debug, Clone)]
enum Op {
    Add(usize, bool),
    Pop,
    Complete(usize),
    Reap,
    Crash(Option<(u8, usize)>, u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..=3, any::<bool>()).prop_map(|(l, i)| Op::Add(l, i)),
        3 => Just(Op::Pop),
        3 => any::<usize>().prop_map(Op::Complete),
        2 => Just(Op::Reap),
        1 => (proptest::option::of((0u8..5, any::<usize>())), any::<u16>())
            .prop_map(|(s, b)| Op::Crash(s, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any interleaving of driver submissions, device pops, out-of-order completions and
    /// crashes (at any step of a completion, with any vring base handed to the new
    /// device): each restart resubmits exactly the chains not published, oldest first, and
    /// in the end every request is seen used exactly once.
    #[test]
    fn packed_inflight_survives_any_crash(
        size in prop_oneof![Just(1u16), Just(2), Just(3), Just(5), Just(8), Just(16)],
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let mut r = Rig::new(size);
        for op in ops {
            match op {
                Op::Add(len, indirect) => {
                    r.add(len, indirect);
                }
                Op::Pop => {
                    r.pop();
                }
                Op::Complete(k) => {
                    r.complete(k);
                }
                Op::Reap => {
                    r.reap();
                }
                Op::Crash(stage, base) => {
                    let base = (base & WRAP_BIT) | ((base & !WRAP_BIT) % size);
                    r.crash(stage, base);
                }
            }
        }
        r.drain();
    }
}
