//! Packed ring tests: round trips across many wraps, batching, resume, event suppression,
//! and every malformed layout as an error, never a panic.

use std::sync::Arc;

use proptest::prelude::*;

use super::testing::DriverQueue;
use super::*;
use crate::chain::ChainError;
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
