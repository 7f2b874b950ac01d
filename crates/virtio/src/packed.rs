//! The packed virtqueue, device side (virtio 1.2 §2.8, VIRTIO_F_RING_PACKED), with
//! VIRTIO_RING_F_EVENT_IDX (§2.8.10, §2.8.14) and indirect descriptors (§2.8.7).
//!
//! [`PackedQueue`] has the same methods as [`crate::split::SplitQueue`] (except
//! `add_used`, which also takes the chain's ring slot count), so
//! [`crate::queue::Virtqueue`] can dispatch to either.
//!
//! # Layout
//! For a queue of size N (1..=32768, not necessarily a power of two):
//! - descriptor ring ([`VringConfig::desc_addr`]): N descriptors of 16 bytes
//!   (`le64 addr, le32 len, le16 id, le16 flags`), 16-byte aligned;
//! - driver event suppression area ([`VringConfig::avail_addr`]): 4 bytes
//!   (`le16 off_wrap, le16 flags`), 4-byte aligned; written by the driver to control used
//!   buffer notifications;
//! - device event suppression area ([`VringConfig::used_addr`]): 4 bytes, same layout,
//!   4-byte aligned; written by the device to control driver notifications (kicks).
//!
//! Positions are ring slots (descriptor units) paired with a wrap counter that starts at 1
//! and toggles each time the position passes the ring end. The driver makes a descriptor
//! available by setting its AVAIL flag to its wrap counter and USED to the opposite; the
//! device marks it used by setting both to its own wrap counter (§2.8.1). The vring base
//! exchanged with the frontend (SET/GET_VRING_BASE) encodes the next avail slot in bits
//! 0..14 and its wrap counter in bit 15, so a fresh ring starts at `0x8000`.
//!
//! A chain occupies consecutive slots (NEXT) and its buffer ID is in its last descriptor
//! (§2.8.6); the device writes one used descriptor per chain at its used position and
//! then skips the chain's slot count
//! ([`DescriptorChain::desc_count`](crate::chain::DescriptorChain::desc_count)), so
//! completions may be out of order.
//!
//! # Errors
//! Setup errors are [`QueueError::InvalidSize`], [`QueueError::Misaligned`],
//! [`QueueError::RingOutOfBounds`] and [`QueueError::InvalidBase`]. A malformed chain is
//! [`QueueError::Chain`] with the ring slot of its head; see
//! [`crate::chain::ChainError`] for what is checked. Nothing read from guest memory can
//! panic.
//!
//! # Inflight tracking
//! With VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD ([`PackedQueue::attach_inflight`], the packed
//! layout of [`crate::inflight`]) every chain popped from the ring is copied into the
//! inflight region and marked before the device sees it, and each used descriptor is
//! published on its own: the region moves to the new used position, the descriptor's flags
//! are written, the mark is cleared and the change committed. A queue attached to a region
//! a previous backend left resumes from the region, not from the vring base (QEMU resends
//! the base the dead backend started from): the used position is the committed one, the
//! chains still marked are resubmitted from their saved copies, oldest first, before
//! anything new, and the next avail position is the used position plus their ring slots
//! (every chain the old backend took was either completed, moving the used position by its
//! slots, or is among them).

use std::collections::VecDeque;
use std::sync::atomic::AtomicU16;
use std::sync::Arc;

use crate::chain::{RawPackedDesc, DESC_SIZE};
pub use crate::chain::{VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED};
use crate::dirty::QueueLog;
use crate::inflight::PackedInflight;
use crate::memory::GuestMemory;
use crate::split::{QueueError, VringConfig, MAX_QUEUE_SIZE};

mod avail;
mod event;
mod inflight;
pub mod testing;
mod used;

/// RING_EVENT_FLAGS_ENABLE: notifications enabled.
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// RING_EVENT_FLAGS_DISABLE: notifications disabled.
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// RING_EVENT_FLAGS_DESC: notify when the position in `off_wrap` is passed (only with
/// VIRTIO_RING_F_EVENT_IDX).
pub const RING_EVENT_FLAGS_DESC: u16 = 2;
/// Bit of `off_wrap` and of the encoded vring base holding the wrap counter.
pub const WRAP_BIT: u16 = 1 << 15;

/// Byte offset of a descriptor's `len` field.
const LEN_OFF: usize = 8;
/// Byte offset of a descriptor's `id` field.
const ID_OFF: usize = 12;
/// Byte offset of a descriptor's `flags` field.
const FLAGS_OFF: usize = 14;
/// Byte offset of `off_wrap` in an event suppression area.
const EVENT_OFF_WRAP: usize = 0;
/// Byte offset of `flags` in an event suppression area.
const EVENT_FLAGS: usize = 2;

/// Encodes a ring position as the vring base / `off_wrap` do.
fn encode(slot: u16, wrap: bool) -> u16 {
    slot | if wrap { WRAP_BIT } else { 0 }
}

/// The device side of one packed virtqueue. Owned by exactly one worker at a time.
///
/// Invariants: `next_avail < size` and `next_used < size`, so every slot offset derived
/// from them lies inside the descriptor ring checked in [`PackedQueue::new`].
#[derive(Debug)]
pub struct PackedQueue {
    mem: Arc<GuestMemory>,
    size: u16,
    desc: *mut u8,
    /// Driver event suppression area.
    driver: *mut u8,
    /// Device event suppression area.
    device: *mut u8,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// The first used descriptor of the unpublished batch: its slot and the flags that
    /// publish it.
    batch_head: Option<(u16, u16)>,
    /// Used descriptors of the batch after its first, `(slot, id, len, flags)`, written in
    /// one go by `publish_used`: the driver writes new descriptors into the same cache
    /// lines meanwhile, so interleaving our writes with its would bounce them per entry
    /// (as DPDK's shadow used ring avoids). Capacity `size`, kept.
    shadow: Vec<(u16, u16, u32, u16)>,
    /// Used position at the last notification decision.
    signalled_used: u16,
    signalled_wrap: bool,
    /// Whether the signalled position is where the driver was last notified; not after a
    /// (re)start (see the split ring's field of the same name).
    signalled_valid: bool,
    /// Used slots advanced since the last notification decision (saturating).
    unsignalled: u32,
    event_idx: bool,
    indirect: bool,
    /// The device event suppression flags last written (only the device writes them):
    /// rewriting an unchanged value would still pull the driver's cache line.
    event_flags: Option<u16>,
    /// Inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), when the frontend set it up.
    inflight: Option<PackedInflight>,
    /// Chains a previous backend left in flight, `(entry, ring slots)`, popped (from their
    /// saved copies) before the ring.
    resubmit: VecDeque<(u16, u16)>,
    /// Chains marked since the last used descriptor, `(entry, avail position before the
    /// pop)`, so a rewind can unmark them.
    since_used: Vec<(u16, u16)>,
    /// A private descriptor ring a resubmitted chain is parsed from (allocated on first
    /// use), and the saved descriptors read into it.
    scratch: Vec<u8>,
    saved: Vec<RawPackedDesc>,
    /// Dirty page logging (live migration), while the frontend has it on.
    log: Option<QueueLog>,
    /// Tests: stop a tracked `add_used` after this step, as a crash would (see
    /// `add_used_tracked`).
    #[cfg(test)]
    crash_after: Option<u8>,
}

// SAFETY: the raw pointers point into `mem`, which the queue keeps alive through its Arc;
// the queue is owned and used by one thread at a time.
unsafe impl Send for PackedQueue {}

impl PackedQueue {
    /// Sets up a queue over guest memory, checking size, alignment, that the ring and both
    /// event suppression areas are inside mapped memory, and the vring base
    /// (`cfg.next_avail`: slot in bits 0..14, wrap counter in bit 15). The device's used
    /// position starts equal to the avail position: every chain before it was completed.
    ///
    /// # Errors
    /// [`QueueError::InvalidSize`], [`QueueError::Misaligned`],
    /// [`QueueError::RingOutOfBounds`], [`QueueError::InvalidBase`].
    pub fn new(cfg: &VringConfig, mem: Arc<GuestMemory>) -> Result<Self, QueueError> {
        let size = cfg.size;
        if size == 0 || size > MAX_QUEUE_SIZE {
            return Err(QueueError::InvalidSize(u32::from(size)));
        }
        let slot = cfg.next_avail & !WRAP_BIT;
        if slot >= size {
            return Err(QueueError::InvalidBase {
                base: cfg.next_avail,
                size,
            });
        }
        let wrap = cfg.next_avail & WRAP_BIT != 0;
        let rings = [
            ("descriptor", cfg.desc_addr, 16, DESC_SIZE * u64::from(size)),
            ("driver area", cfg.avail_addr, 4, 4),
            ("device area", cfg.used_addr, 4, 4),
        ];
        let mut ptrs = [std::ptr::null_mut::<u8>(); 3];
        for (p, (ring, addr, align, len)) in ptrs.iter_mut().zip(rings) {
            if addr % align != 0 {
                return Err(QueueError::Misaligned { ring, addr, align });
            }
            let t = if cfg.addrs_are_uaddr {
                mem.translate_uaddr(addr, len)
            } else {
                mem.translate(addr, len)
            };
            *p = t.map_err(|source| QueueError::RingOutOfBounds { ring, source })?;
            // An odd mmap_offset or region start can misalign an aligned frontend address.
            if (*p as usize) & (align as usize - 1) != 0 {
                return Err(QueueError::Misaligned { ring, addr, align });
            }
        }
        Ok(Self {
            mem,
            size,
            desc: ptrs[0],
            driver: ptrs[1],
            device: ptrs[2],
            next_avail: slot,
            avail_wrap: wrap,
            next_used: slot,
            used_wrap: wrap,
            batch_head: None,
            shadow: Vec::with_capacity(usize::from(cfg.size)),
            signalled_used: slot,
            signalled_wrap: wrap,
            signalled_valid: false,
            unsignalled: 0,
            event_idx: cfg.event_idx,
            indirect: cfg.indirect,
            event_flags: None,
            inflight: None,
            resubmit: VecDeque::new(),
            since_used: Vec::new(),
            scratch: Vec::new(),
            saved: Vec::new(),
            log: None,
            #[cfg(test)]
            crash_after: None,
        })
    }

    /// Turns dirty page logging on (`Some`) or off: from now on every used descriptor and
    /// event suppression write of this queue marks its page in the log.
    pub fn set_dirty_log(&mut self, log: Option<QueueLog>) {
        self.log = log;
    }

    /// The dirty log in use, if logging is on.
    pub fn dirty_log(&self) -> Option<&QueueLog> {
        self.log.as_ref()
    }

    /// Queue size in descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The next avail slot with its wrap counter in bit 15 (what GET_VRING_BASE returns).
    pub fn next_avail(&self) -> u16 {
        encode(self.next_avail, self.avail_wrap)
    }

    /// The next used slot with its wrap counter in bit 15.
    pub fn next_used(&self) -> u16 {
        encode(self.next_used, self.used_wrap)
    }

    /// The guest memory this queue reads.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    fn u16_at(&self, base: *mut u8, byte_offset: usize) -> &AtomicU16 {
        // SAFETY: callers pass even offsets inside the areas checked in `new` (descriptor
        // ring: 16·size bytes, 16-byte aligned; event areas: 4 bytes, 4-byte aligned), so
        // the pointer is in bounds and 2-byte aligned; the mapping lives as long as
        // `self.mem`. AtomicU16 has the layout of u16 and tolerates concurrent driver
        // access.
        unsafe { &*(base.add(byte_offset) as *const AtomicU16) }
    }

    /// The flags of descriptor `slot` (`slot < size`).
    fn desc_flags(&self, slot: u16) -> &AtomicU16 {
        self.u16_at(
            self.desc,
            usize::from(slot) * DESC_SIZE as usize + FLAGS_OFF,
        )
    }

    /// The position `n` slots (`1..=size`) after `(slot, wrap)`.
    fn advance(&self, slot: u16, wrap: bool, n: u16) -> (u16, bool) {
        let next = u32::from(slot) + u32::from(n);
        let size = u32::from(self.size);
        if next >= size {
            // slot < size and n <= size, so next - size < size.
            ((next - size) as u16, !wrap)
        } else {
            (next as u16, wrap)
        }
    }
}

#[cfg(test)]
mod tests;
