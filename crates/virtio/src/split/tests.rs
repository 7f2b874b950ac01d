//! Split ring and chain validation tests: every malformed layout is an error, never a panic.

use std::sync::Arc;

use proptest::prelude::*;

use super::testing::DriverQueue;
use super::*;
use crate::chain::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::memory::MemoryRegion;

const MEM: u64 = 0x10_0000;
const BUF: u64 = 0x8_0000;

fn setup(size: u16) -> (DriverQueue, SplitQueue) {
    let mem = Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, MEM).unwrap()]).unwrap());
    let dq = DriverQueue::new(mem.clone(), 0x1000, size);
    let q = SplitQueue::new(&dq.config(true, true), mem).unwrap();
    (dq, q)
}

fn pop_err(q: &mut SplitQueue) -> ChainError {
    let mut c = DescriptorChain::default();
    match q.pop(&mut c) {
        Err(QueueError::Chain { error, .. }) => error,
        other => panic!("expected a chain error, got {other:?}"),
    }
}

#[test]
fn well_formed_chain_yields_segments_in_order() {
    let (mut dq, mut q) = setup(8);
    let head = dq.add_chain(&[
        (BUF, 16, false),
        (BUF + 0x100, 512, true),
        (BUF + 0x400, 1, true),
    ]);
    dq.publish();
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert_eq!(c.head(), head);
    assert_eq!(c.readable_len(), 16);
    assert_eq!(c.writable_len(), 513);
    assert_eq!(c.writable().len(), 2);
    assert!(!q.pop(&mut c).unwrap());
    q.add_used(head, 513);
    q.publish_used();
    assert_eq!(dq.pop_used(), Some((u32::from(head), 513)));
}

#[test]
fn descriptor_outside_memory_is_refused() {
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(MEM - 8, 16, false)]);
    dq.publish();
    assert!(matches!(pop_err(&mut q), ChainError::Memory(_)));
}

#[test]
fn address_plus_length_overflow_is_refused() {
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(u64::MAX - 4, 16, false)]);
    dq.publish();
    assert!(matches!(pop_err(&mut q), ChainError::Memory(_)));
}

#[test]
fn total_length_overflow_is_refused() {
    // A sparse 4 GiB memfd holds two in-bounds 3 GiB buffers whose sum overflows 32 bits.
    let big = 4u64 << 30;
    let mem = Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, big).unwrap()]).unwrap());
    let mut dq = DriverQueue::new(mem.clone(), 0x1000, 8);
    let mut q = SplitQueue::new(&dq.config(false, false), mem).unwrap();
    dq.write_desc(
        dq.desc,
        0,
        0x10_0000,
        0xC000_0000,
        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
        1,
    );
    dq.write_desc(dq.desc, 1, 0x10_0000, 0xC000_0000, VIRTQ_DESC_F_WRITE, 0);
    dq.push_avail(0);
    dq.publish();
    assert_eq!(pop_err(&mut q), ChainError::LengthOverflow);
}

#[test]
fn chain_loop_is_refused() {
    let (mut dq, mut q) = setup(4);
    dq.write_desc(dq.desc, 0, BUF, 16, VIRTQ_DESC_F_NEXT, 1);
    dq.write_desc(dq.desc, 1, BUF, 16, VIRTQ_DESC_F_NEXT, 0);
    dq.push_avail(0);
    dq.publish();
    assert_eq!(pop_err(&mut q), ChainError::TooLong { table_len: 4 });
}

#[test]
fn next_index_out_of_range_is_refused() {
    let (mut dq, mut q) = setup(4);
    dq.write_desc(dq.desc, 0, BUF, 16, VIRTQ_DESC_F_NEXT, 9);
    dq.push_avail(0);
    dq.publish();
    assert_eq!(
        pop_err(&mut q),
        ChainError::IndexOutOfRange {
            index: 9,
            table_len: 4
        }
    );
}

#[test]
fn head_index_out_of_range_is_refused() {
    let (mut dq, mut q) = setup(4);
    dq.push_avail(200);
    dq.publish();
    assert_eq!(
        pop_err(&mut q),
        ChainError::IndexOutOfRange {
            index: 200,
            table_len: 4
        }
    );
}

#[test]
fn readable_after_writable_is_refused() {
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(BUF, 16, true), (BUF + 64, 16, false)]);
    dq.publish();
    assert_eq!(pop_err(&mut q), ChainError::ReadableAfterWritable);
}

#[test]
fn indirect_table_is_followed() {
    let (mut dq, mut q) = setup(8);
    let table = 0x6_0000;
    dq.write_desc(table, 0, BUF, 16, VIRTQ_DESC_F_NEXT, 1);
    dq.write_desc(
        table,
        1,
        BUF + 0x1000,
        4096,
        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
        2,
    );
    dq.write_desc(table, 2, BUF + 0x3000, 1, VIRTQ_DESC_F_WRITE, 0);
    dq.write_desc(dq.desc, 0, table, 48, VIRTQ_DESC_F_INDIRECT, 0);
    dq.push_avail(0);
    dq.publish();
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert_eq!((c.readable_len(), c.writable_len()), (16, 4097));
}

/// Linux's virtio_blk sizes indirect tables by `seg_max + 2`, not by the ring: a 1 MiB
/// request in 4 KiB pages on a 128-entry ring is a 258-entry table.
#[test]
fn indirect_table_longer_than_the_ring_is_followed_up_to_1024() {
    for n in [9u16, 258, 1024] {
        let (mut dq, mut q) = setup(8);
        let table = 0x6_0000;
        for i in 0..n {
            let flags = if i + 1 < n { VIRTQ_DESC_F_NEXT } else { 0 };
            dq.write_desc(table, i, BUF + u64::from(i), 1, flags, i + 1);
        }
        dq.write_desc(
            dq.desc,
            0,
            table,
            16 * u32::from(n),
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        dq.push_avail(0);
        dq.publish();
        let mut c = DescriptorChain::default();
        assert!(q.pop(&mut c).unwrap(), "{n}");
        assert_eq!(c.readable_len(), u32::from(n));
    }
    // A chain that loops inside such a table is still caught.
    let (mut dq, mut q) = setup(8);
    let table = 0x6_0000;
    for i in 0..300u16 {
        dq.write_desc(table, i, BUF, 1, VIRTQ_DESC_F_NEXT, (i + 1) % 300);
    }
    dq.write_desc(dq.desc, 0, table, 16 * 300, VIRTQ_DESC_F_INDIRECT, 0);
    dq.push_avail(0);
    dq.publish();
    assert_eq!(pop_err(&mut q), ChainError::TooLong { table_len: 300 });
}

#[test]
fn nested_indirect_is_refused() {
    let (mut dq, mut q) = setup(8);
    let (t1, t2) = (0x6_0000, 0x6_1000);
    dq.write_desc(t2, 0, BUF, 16, 0, 0);
    dq.write_desc(t1, 0, t2, 16, VIRTQ_DESC_F_INDIRECT, 0);
    dq.write_desc(dq.desc, 0, t1, 16, VIRTQ_DESC_F_INDIRECT, 0);
    dq.push_avail(0);
    dq.publish();
    assert_eq!(pop_err(&mut q), ChainError::NestedIndirect);
}

#[test]
fn bad_indirect_tables_are_refused() {
    for (len, flags) in [
        (0u32, VIRTQ_DESC_F_INDIRECT),
        (24, VIRTQ_DESC_F_INDIRECT),
        (16 * 1025, VIRTQ_DESC_F_INDIRECT),
        (16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT),
    ] {
        let (mut dq, mut q) = setup(8);
        dq.write_desc(dq.desc, 0, 0x6_0000, len, flags, 1);
        dq.push_avail(0);
        dq.publish();
        let e = pop_err(&mut q);
        assert!(
            matches!(
                e,
                ChainError::IndirectBadLength { .. } | ChainError::IndirectWithNext
            ),
            "{len} {flags}: {e:?}"
        );
    }
    // Indirect table outside memory.
    let (mut dq, mut q) = setup(8);
    dq.write_desc(dq.desc, 0, MEM - 16, 32, VIRTQ_DESC_F_INDIRECT, 0);
    dq.push_avail(0);
    dq.publish();
    assert!(matches!(pop_err(&mut q), ChainError::Memory(_)));
}

#[test]
fn indirect_without_negotiation_is_refused() {
    let mem = Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, MEM).unwrap()]).unwrap());
    let mut dq = DriverQueue::new(mem.clone(), 0x1000, 8);
    let mut q = SplitQueue::new(&dq.config(false, false), mem).unwrap();
    dq.write_desc(dq.desc, 0, 0x6_0000, 16, VIRTQ_DESC_F_INDIRECT, 0);
    dq.push_avail(0);
    dq.publish();
    assert_eq!(pop_err(&mut q), ChainError::IndirectNotNegotiated);
}

#[test]
fn avail_index_jump_is_refused() {
    let (dq, mut q) = setup(8);
    dq.set_avail_idx(9);
    let mut c = DescriptorChain::default();
    assert_eq!(
        q.pop(&mut c).unwrap_err(),
        QueueError::AvailIndexJump {
            last: 0,
            idx: 9,
            size: 8
        }
    );
}

#[test]
fn ring_setup_is_validated() {
    let mem = Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, MEM).unwrap()]).unwrap());
    let dq = DriverQueue::new(mem.clone(), 0x1000, 8);
    let mut cfg = dq.config(false, false);
    cfg.size = 6;
    assert_eq!(
        SplitQueue::new(&cfg, mem.clone()).unwrap_err(),
        QueueError::InvalidSize(6)
    );
    let mut cfg = dq.config(false, false);
    cfg.used_addr = MEM - 8;
    assert!(matches!(
        SplitQueue::new(&cfg, mem.clone()).unwrap_err(),
        QueueError::RingOutOfBounds { ring: "used", .. }
    ));
    let mut cfg = dq.config(false, false);
    cfg.desc_addr += 8;
    assert!(matches!(
        SplitQueue::new(&cfg, mem).unwrap_err(),
        QueueError::Misaligned {
            ring: "descriptor",
            ..
        }
    ));
}

#[test]
fn event_idx_suppresses_and_requests_notifications() {
    let (mut dq, mut q) = setup(8);
    let mut c = DescriptorChain::default();
    for round in 0..3u16 {
        dq.add_chain(&[(BUF, 16, true)]);
        dq.publish();
        assert!(q.pop(&mut c).unwrap());
        q.add_used(c.head(), 0);
        q.publish_used();
        // The driver asks to be told once used idx passes `round` (i.e. now).
        dq.set_used_event(round);
        assert!(q.needs_notification(), "round {round}");
    }
    dq.add_chain(&[(BUF, 16, true)]);
    dq.publish();
    assert!(q.pop(&mut c).unwrap());
    q.add_used(c.head(), 0);
    q.publish_used();
    dq.set_used_event(100);
    assert!(!q.needs_notification());
    // Enabling notifications publishes avail_event = next avail.
    assert!(!q.set_notification(true).unwrap());
    assert_eq!(dq.avail_event(), 4);
}

/// A backend that published used entries and died before signalling them leaves
/// `used_event` behind the used index; the queue of the backend started next must notify
/// at its first completion, or the driver (waiting for those entries) never hears again.
#[test]
fn a_restarted_queue_notifies_at_its_first_completion() {
    let mem = Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, MEM).unwrap()]).unwrap());
    let mut dq = DriverQueue::new(mem.clone(), 0x1000, 8);
    let mut c = DescriptorChain::default();
    let mut dead = SplitQueue::new(&dq.config(true, true), mem.clone()).unwrap();
    for _ in 0..3 {
        dq.add_chain(&[(BUF, 16, true)]);
    }
    dq.publish();
    // The driver wants to hear once the first entry is used.
    dq.set_used_event(0);
    for _ in 0..2 {
        assert!(dead.pop(&mut c).unwrap());
        dead.add_used(c.head(), 0);
    }
    dead.publish_used();
    drop(dead); // killed before needs_notification: nothing was signalled
    let mut cfg = dq.config(true, true);
    cfg.next_avail = 2;
    let mut q = SplitQueue::new(&cfg, mem).unwrap();
    assert!(q.pop(&mut c).unwrap());
    q.add_used(c.head(), 0);
    q.publish_used();
    assert!(
        q.needs_notification(),
        "the first completion after a restart notifies"
    );
    // From then on used_event decides again: the driver has not asked for more.
    dq.add_chain(&[(BUF, 16, true)]);
    dq.publish();
    assert!(q.pop(&mut c).unwrap());
    q.add_used(c.head(), 0);
    q.publish_used();
    assert!(!q.needs_notification());
}

#[test]
fn no_interrupt_flag_and_no_notify_flag() {
    let mem = Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, MEM).unwrap()]).unwrap());
    let mut dq = DriverQueue::new(mem.clone(), 0x1000, 8);
    let mut q = SplitQueue::new(&dq.config(false, false), mem).unwrap();
    q.set_notification(false).unwrap();
    assert_eq!(dq.used_flags(), VRING_USED_F_NO_NOTIFY);
    dq.add_chain(&[(BUF, 16, true)]);
    dq.publish();
    assert!(q.set_notification(true).unwrap(), "a chain is waiting");
    assert_eq!(dq.used_flags(), 0);
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    q.add_used(c.head(), 0);
    q.publish_used();
    dq.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT);
    assert!(!q.needs_notification());
}

proptest! {
    /// Arbitrary descriptor tables and avail entries never panic: each pop is a chain whose
    /// buffers are inside memory, or an error.
    #[test]
    fn arbitrary_rings_never_panic(
        descs in proptest::collection::vec((any::<u64>(), any::<u32>(), 0u16..8, any::<u16>()), 16),
        heads in proptest::collection::vec(any::<u16>(), 1..16),
        small_addrs in any::<bool>(),
        avail_idx in any::<u16>(),
    ) {
        let (mut dq, mut q) = setup(16);
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let addr = if small_addrs { addr % MEM } else { *addr };
            let len = if small_addrs { len % 0x2000 } else { *len };
            dq.write_desc(dq.desc, i as u16, addr, len, *flags, next % 20);
        }
        for h in &heads {
            dq.push_avail(h % 20);
        }
        dq.set_avail_idx(avail_idx % 24);
        let mut c = DescriptorChain::default();
        for _ in 0..20 {
            match q.pop(&mut c) {
                Ok(false) | Err(QueueError::AvailIndexJump { .. }) => break,
                Ok(true) => {
                    for s in c.readable().iter().chain(c.writable()) {
                        let lo = q.memory().regions()[0].host_base() as usize;
                        let a = s.base as usize;
                        prop_assert!(a >= lo && a + s.len <= lo + MEM as usize);
                    }
                }
                Err(QueueError::Chain { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
    }
}

#[test]
fn inflight_heads_are_resubmitted_before_new_entries() {
    use crate::inflight::InflightMap;
    let map = InflightMap::create(1, 8).unwrap();
    let (mut dq, mut q) = setup(8);
    q.set_inflight(map.queue(0, 8).unwrap());
    let a = dq.add_chain(&[(BUF, 16, true)]);
    let b = dq.add_chain(&[(BUF + 64, 16, true)]);
    dq.publish();
    let mut c = DescriptorChain::default();
    assert!(q.pop(&mut c).unwrap());
    assert!(q.pop(&mut c).unwrap());
    // Only `a` completes; then the backend "dies".
    q.add_used(a, 0);
    drop(q);
    let d2 = dq.add_chain(&[(BUF + 128, 16, true)]);
    dq.publish();
    // A new backend starts on the same rings (vring base as the frontend restores it: the
    // used index) and the same inflight buffer.
    let mut cfg = dq.config(true, true);
    cfg.next_avail = 1;
    let mut q2 = SplitQueue::new(&cfg, dq.mem.clone()).unwrap();
    q2.set_inflight(map.queue(0, 8).unwrap());
    assert!(q2.pop(&mut c).unwrap());
    assert_eq!(c.head(), b, "the in-flight head comes first");
    assert!(q2.pop(&mut c).unwrap());
    assert_eq!(c.head(), d2, "then the new entry, not `b` again");
    assert!(!q2.pop(&mut c).unwrap());
}

#[test]
fn zero_length_writable_then_readable_is_refused() {
    let (mut dq, mut q) = setup(8);
    dq.add_chain(&[(BUF, 0, true), (BUF + 64, 16, false)]);
    dq.publish();
    assert_eq!(pop_err(&mut q), ChainError::ReadableAfterWritable);
}

#[test]
fn misaligned_host_ring_is_refused() {
    // An odd mmap_offset makes an aligned frontend address land on an odd host address.
    let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, MEM + 1).unwrap();
    let mem =
        Arc::new(GuestMemory::new(vec![MemoryRegion::map(&fd, 0, MEM, 0, 1).unwrap()]).unwrap());
    let dq = DriverQueue::new(mem.clone(), 0x1000, 8);
    assert!(matches!(
        SplitQueue::new(&dq.config(false, false), mem).unwrap_err(),
        QueueError::Misaligned { .. }
    ));
}
