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
//! then skips the chain's slot count ([`DescriptorChain::desc_count`]), so completions may
//! be out of order.
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
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use crate::chain::{packed_available, ChainError, DescriptorChain, RawPackedDesc, DESC_SIZE};
pub use crate::chain::{VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED};
use crate::chain::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::dirty::QueueLog;
use crate::inflight::{InflightMap, PackedInflight};
use crate::memory::GuestMemory;
use crate::split::{QueueError, VringConfig, MAX_QUEUE_SIZE};

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

    /// Attaches inflight tracking from queue `index` of `map` (packed layout). Returns
    /// `false` (and tracks nothing) if the map has no packed region for this queue and
    /// size. See [`PackedQueue::set_inflight`].
    pub fn attach_inflight(&mut self, map: &Arc<InflightMap>, index: u16) -> bool {
        match map.packed_queue(index, self.size) {
            Some(t) => {
                self.set_inflight(t);
                true
            }
            None => false,
        }
    }

    /// Attaches inflight tracking. A region nobody laid out yet is initialized at the
    /// queue's position (the vring base). A region a previous backend used is recovered
    /// (see the module docs): the queue resumes at its used position, with the chains it
    /// left in flight resubmitted first, oldest first. A region inconsistent with itself
    /// is logged and initialized afresh.
    pub fn set_inflight(&mut self, mut t: PackedInflight) {
        let base = (self.next_used, self.used_wrap);
        if !t.is_initialized() {
            t.init(base);
        } else {
            let r = t.recover(|slot| {
                if slot < self.size {
                    u16::from_le(self.desc_flags(slot).load(Ordering::Acquire))
                } else {
                    0
                }
            });
            match r {
                Ok(r) => {
                    (self.next_used, self.used_wrap) = r.used;
                    (self.next_avail, self.avail_wrap) = if r.slots == 0 {
                        r.used
                    } else {
                        // slots <= size (checked by recover).
                        self.advance(r.used.0, r.used.1, r.slots as u16)
                    };
                    self.signalled_used = self.next_used;
                    self.signalled_wrap = self.used_wrap;
                    if !r.chains.is_empty() || base != r.used {
                        tracing::info!(
                            resubmitted = r.chains.len(),
                            base = encode(base.0, base.1),
                            next_avail = self.next_avail(),
                            next_used = self.next_used(),
                            "resubmitting inflight requests (packed ring)"
                        );
                    }
                    self.resubmit = r.chains.into();
                }
                Err(why) => {
                    tracing::warn!(
                        base = encode(base.0, base.1),
                        "inflight region not usable ({why}); starting it afresh at the vring base"
                    );
                    t.init(base);
                }
            }
        }
        self.since_used.clear();
        self.inflight = Some(t);
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

    /// Logs used descriptor `slot` (after its flags were written).
    #[inline]
    fn log_desc(&self, slot: u16) {
        if let Some(l) = &self.log {
            let at = usize::from(slot) * DESC_SIZE as usize;
            l.log
                .log_host(&self.mem, self.desc.wrapping_add(at), DESC_SIZE as usize);
        }
    }

    /// Logs `len` bytes written at `off` into the device event suppression area.
    #[inline]
    fn log_device_area(&self, off: usize, len: usize) {
        if let Some(l) = &self.log {
            match l.used_gpa {
                Some(gpa) => l.log.log(gpa.saturating_add(off as u64), len as u64),
                None => l
                    .log
                    .log_host(&self.mem, self.device.wrapping_add(off), len),
            }
        }
    }

    /// Queue size in descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The next avail slot with its wrap counter in bit 15 (what GET_VRING_BASE returns).
    pub fn next_avail(&self) -> u16 {
        encode(self.next_avail, self.avail_wrap)
    }

    /// Sets the next avail position back to `base` (a value of
    /// [`PackedQueue::next_avail`]), so the chains popped since then are popped again
    /// (see [`crate::queue::Virtqueue::rewind`]). No used descriptor may have been added
    /// for them: the ring still marks them available. A `base` whose slot is not below the
    /// queue size is ignored.
    pub fn rewind(&mut self, base: u16) {
        let slot = base & !WRAP_BIT;
        if slot < self.size {
            self.next_avail = slot;
            self.avail_wrap = base & WRAP_BIT != 0;
            if let Some(t) = &mut self.inflight {
                // The chains popped since `base` go back to the ring: unmark them.
                if let Some(k) = self.since_used.iter().position(|&(_, at)| at == base) {
                    for (entry, _) in self.since_used.drain(k..).rev() {
                        t.unmark(entry);
                    }
                }
            }
        }
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

    /// 1 if the driver made a chain available at the next avail slot, else 0. Never fails;
    /// the `Result` mirrors [`crate::split::SplitQueue::available`].
    ///
    /// # Errors
    /// None.
    pub fn available(&self) -> Result<u16, QueueError> {
        if !self.resubmit.is_empty() {
            return Ok(1);
        }
        let flags = u16::from_le(self.desc_flags(self.next_avail).load(Ordering::Acquire));
        Ok(u16::from(packed_available(flags, self.avail_wrap)))
    }

    /// Takes the next available chain into `chain`. Returns `Ok(false)` when the
    /// descriptor at the next avail slot is not available.
    ///
    /// # Errors
    /// [`QueueError::Chain`] for a malformed chain, with the ring slot of its head. The
    /// slots walked are consumed (at least one); the caller fails the queue.
    pub fn pop(&mut self, chain: &mut DescriptorChain) -> Result<bool, QueueError> {
        if let Some((entry, num)) = self.resubmit.pop_front() {
            return self.pop_saved(entry, num, chain);
        }
        // The Acquire load of the head's flags orders the reads of the chain after it (the
        // driver publishes the head's flags last).
        if self.available()? == 0 {
            return Ok(false);
        }
        let head = self.next_avail;
        // SAFETY: `desc` points to `size` descriptors checked in `new`, kept alive by
        // `self.mem`; `head < size` by the invariant.
        let r = unsafe {
            chain.parse_packed(
                &self.mem,
                self.desc,
                self.size,
                head,
                self.avail_wrap,
                self.indirect,
            )
        };
        let (slot, wrap) =
            self.advance(self.next_avail, self.avail_wrap, chain.desc_count().max(1));
        let before = encode(self.next_avail, self.avail_wrap);
        self.next_avail = slot;
        self.avail_wrap = wrap;
        r.map_err(|error| QueueError::Chain { head, error })?;
        if let Some(t) = &mut self.inflight {
            let (ring, size) = (self.desc, self.size);
            let entry = t.mark(chain.desc_count(), |k| {
                let at = (u32::from(head) + u32::from(k)) % u32::from(size);
                // SAFETY: at < size: a slot of the ring checked in `new`, alive with
                // `self.mem`.
                unsafe { RawPackedDesc::read(ring, at as u16) }
            });
            if entry.is_none() {
                tracing::warn!(
                    slot = head,
                    "inflight region has no free entry for a chain; it is not tracked"
                );
            }
            chain.set_inflight_entry(entry);
            if let Some(e) = entry {
                if self.since_used.len() >= usize::from(self.size) {
                    self.since_used.clear();
                }
                self.since_used.push((e, before));
            }
        }
        Ok(true)
    }

    /// Pops a chain a previous backend left in flight, from the copy of its ring
    /// descriptors in the inflight region (the ring slots may have been overwritten),
    /// parsed and validated like a ring chain.
    fn pop_saved(
        &mut self,
        entry: u16,
        num: u16,
        chain: &mut DescriptorChain,
    ) -> Result<bool, QueueError> {
        let Some(t) = &self.inflight else {
            return Ok(false);
        };
        t.saved_chain(entry, num, &mut self.saved);
        let ring_len = usize::from(self.size) * DESC_SIZE as usize;
        if self.scratch.len() != ring_len {
            self.scratch = vec![0; ring_len];
        }
        let n = self.saved.len();
        for (k, d) in self.saved.iter().enumerate() {
            // Available under wrap counter 1 in the private ring.
            let flags = (d.flags & !(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | VIRTQ_DESC_F_AVAIL;
            let at = k * DESC_SIZE as usize;
            let e = &mut self.scratch[at..at + DESC_SIZE as usize];
            e[0..8].copy_from_slice(&d.addr.to_le_bytes());
            e[8..12].copy_from_slice(&d.len.to_le_bytes());
            e[12..14].copy_from_slice(&d.id.to_le_bytes());
            e[14..16].copy_from_slice(&flags.to_le_bytes());
        }
        if n < usize::from(self.size) {
            // A saved chain whose last descriptor says NEXT ends here (not available).
            let at = n * DESC_SIZE as usize;
            self.scratch[at + FLAGS_OFF..at + FLAGS_OFF + 2].fill(0);
        }
        // SAFETY: `scratch` holds `size` descriptors and lives across the call; slot 0 <
        // size.
        let r = unsafe {
            chain.parse_packed(
                &self.mem,
                self.scratch.as_ptr(),
                self.size,
                0,
                true,
                self.indirect,
            )
        };
        r.map_err(|error| QueueError::Chain { head: entry, error })?;
        if usize::from(chain.desc_count()) != n || n != usize::from(num) {
            return Err(QueueError::Chain {
                head: entry,
                error: ChainError::Unavailable {
                    slot: chain.desc_count(),
                },
            });
        }
        chain.set_inflight_entry(Some(entry));
        Ok(true)
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

    /// Writes a used descriptor for buffer `id` with `len` bytes written, at the used
    /// position, then skips the chain's `desc_count` ring slots (clamped to `1..=size`).
    /// Not visible to the driver before [`PackedQueue::publish_used`]: the first used
    /// descriptor of a batch gets its flags only then, so the driver sees the whole batch
    /// at once.
    pub fn add_used(&mut self, id: u16, desc_count: u16, len: u32) {
        self.add_used_entry(id, desc_count, len, None);
    }

    /// [`PackedQueue::add_used`] for a chain this queue popped: with inflight tracking the
    /// chain's mark is cleared once its used descriptor is published (at once).
    pub fn add_used_chain(&mut self, chain: &DescriptorChain, len: u32) {
        self.add_used_entry(
            chain.head(),
            chain.desc_count(),
            len,
            chain.inflight_entry(),
        );
    }

    fn add_used_entry(&mut self, id: u16, desc_count: u16, len: u32, entry: Option<u16>) {
        if self.inflight.is_some() {
            self.add_used_tracked(id, desc_count, len, entry);
            return;
        }
        let slot = self.next_used;
        let mut flags = if self.used_wrap {
            VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
        } else {
            0
        };
        if len > 0 {
            flags |= VIRTQ_DESC_F_WRITE;
        }
        if self.batch_head.is_none() {
            self.write_used(slot, id, len);
            self.batch_head = Some((slot, flags));
        } else if self.shadow.len() < usize::from(self.size) {
            self.shadow.push((slot, id, len, flags));
        } else {
            // More entries than slots in one batch (a caller that never publishes): write
            // through.
            self.write_used(slot, id, len);
            self.desc_flags(slot)
                .store(flags.to_le(), Ordering::Release);
            self.log_desc(slot);
        }
        let n = desc_count.clamp(1, self.size);
        let (s, w) = self.advance(slot, self.used_wrap, n);
        self.next_used = s;
        self.used_wrap = w;
        self.unsignalled = self.unsignalled.saturating_add(u32::from(n));
    }

    /// With inflight tracking: writes and publishes one used descriptor on its own, in the
    /// order the region's rules need (see [`crate::inflight`]): id and length, the region's
    /// used position and free list (uncommitted), the flags, the mark cleared, committed.
    /// A crash leaves at most this one descriptor to reconcile, and no published flags
    /// past an unpublished one.
    fn add_used_tracked(&mut self, id: u16, desc_count: u16, len: u32, entry: Option<u16>) {
        // Anything batched before tracking started goes out first.
        self.publish_used();
        self.since_used.clear();
        let slot = self.next_used;
        let mut flags = if self.used_wrap {
            VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
        } else {
            0
        };
        if len > 0 {
            flags |= VIRTQ_DESC_F_WRITE;
        }
        let n = desc_count.clamp(1, self.size);
        let (s, w) = self.advance(slot, self.used_wrap, n);
        self.write_used(slot, id, len);
        if self.crashes_after(0) {
            return;
        }
        if let Some(t) = &mut self.inflight {
            t.complete_begin(entry, (s, w));
        }
        if self.crashes_after(1) {
            return;
        }
        fence(Ordering::Release);
        self.desc_flags(slot)
            .store(flags.to_le(), Ordering::Release);
        self.log_desc(slot);
        if self.crashes_after(2) {
            return;
        }
        let steps = self.end_steps();
        if let Some(t) = &mut self.inflight {
            t.complete_end_steps(entry, steps);
        }
        self.next_used = s;
        self.used_wrap = w;
        self.unsignalled = self.unsignalled.saturating_add(u32::from(n));
    }

    #[cfg(test)]
    fn crashes_after(&self, step: u8) -> bool {
        self.crash_after == Some(step)
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn crashes_after(&self, _step: u8) -> bool {
        false
    }

    /// Steps of the region's commit to run (3: all; tests stop earlier).
    #[cfg(test)]
    fn end_steps(&self) -> u8 {
        match self.crash_after {
            Some(3) => 1,
            Some(4) => 2,
            _ => 3,
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn end_steps(&self) -> u8 {
        3
    }

    /// Publishes the used descriptors added so far: writes the flags of the batch's first
    /// one with release ordering, so the driver sees the entries and the buffer contents
    /// first.
    pub fn publish_used(&mut self) {
        for k in 0..self.shadow.len() {
            let (slot, id, len, flags) = self.shadow[k];
            self.write_used(slot, id, len);
            self.desc_flags(slot)
                .store(flags.to_le(), Ordering::Release);
        }
        if let Some((slot, flags)) = self.batch_head.take() {
            fence(Ordering::Release);
            self.desc_flags(slot)
                .store(flags.to_le(), Ordering::Release);
            if self.log.is_some() {
                self.log_desc(slot);
                for k in 0..self.shadow.len() {
                    self.log_desc(self.shadow[k].0);
                }
            }
        }
        self.shadow.clear();
    }

    /// Writes a used descriptor's id and length (its flags are written by the caller).
    fn write_used(&self, slot: u16, id: u16, len: u32) {
        let at = usize::from(slot) * DESC_SIZE as usize;
        // SAFETY: slot < size, so the descriptor's 16 bytes lie inside the ring checked in
        // `new`, whose host address is 16-byte aligned; `len` and `id` are at 4- and
        // 2-byte aligned offsets. The driver does not read them before the flags mark the
        // slot used.
        unsafe {
            std::ptr::write_volatile(self.desc.add(at + LEN_OFF) as *mut u32, len.to_le());
            std::ptr::write_volatile(self.desc.add(at + ID_OFF) as *mut u16, id.to_le());
        }
    }

    /// A position as a point on the cycle of `2·size` (slot, wrap) pairs.
    fn cycle_pos(&self, slot: u16, wrap: bool) -> u32 {
        u32::from(slot) + if wrap { 0 } else { u32::from(self.size) }
    }

    /// Whether the driver wants a used-buffer notification for what was added since the
    /// last call (§2.8.10, §2.8.14): its event suppression flags ENABLE → yes, DISABLE →
    /// no, DESC (with EVENT_IDX) → whether the used entries since the last call passed the
    /// position in `off_wrap`. `false` when nothing was added since the last call.
    pub fn needs_notification(&mut self) -> bool {
        if self.unsignalled == 0 {
            return false;
        }
        // The driver's suppression fields must be read after the used flags are visible.
        fence(Ordering::SeqCst);
        let passed = self.unsignalled;
        let old = self.cycle_pos(self.signalled_used, self.signalled_wrap);
        self.unsignalled = 0;
        self.signalled_used = self.next_used;
        self.signalled_wrap = self.used_wrap;
        let flags = u16::from_le(
            self.u16_at(self.driver, EVENT_FLAGS)
                .load(Ordering::Relaxed),
        );
        match flags {
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_DESC if self.event_idx => {
                if !std::mem::replace(&mut self.signalled_valid, true) {
                    // The first decision since the ring started: what the driver was last
                    // told is unknown, so tell it (harmless if spurious).
                    return true;
                }
                let off_wrap = u16::from_le(
                    self.u16_at(self.driver, EVENT_OFF_WRAP)
                        .load(Ordering::Relaxed),
                );
                let off = off_wrap & !WRAP_BIT;
                let cycle = 2 * u32::from(self.size);
                if off >= self.size || passed >= cycle {
                    // A meaningless position, or one lap or more since the last decision:
                    // notifying too often is harmless, too rarely hangs the driver.
                    return true;
                }
                let event = self.cycle_pos(off, off_wrap & WRAP_BIT != 0);
                // The event lies in [old, old + passed) on the cycle.
                (event + cycle - old) % cycle < passed
            }
            // ENABLE, DESC without EVENT_IDX, reserved values: notify.
            _ => true,
        }
    }

    /// Asks the driver to kick (`enable`) or not to kick, in the device event suppression
    /// area. With EVENT_IDX, enabling asks for a kick when the next avail position is made
    /// available (DESC with that `off_wrap`); without, it writes ENABLE; disabling writes
    /// DISABLE. Returns whether a chain is available after enabling (the caller must then
    /// process it instead of sleeping, closing the race with the driver).
    ///
    /// # Errors
    /// None in practice; the `Result` mirrors [`crate::split::SplitQueue::set_notification`].
    pub fn set_notification(&mut self, enable: bool) -> Result<bool, QueueError> {
        let flags = self.u16_at(self.device, EVENT_FLAGS);
        if !enable {
            if self.event_flags != Some(RING_EVENT_FLAGS_DISABLE) {
                flags.store(RING_EVENT_FLAGS_DISABLE.to_le(), Ordering::Relaxed);
                self.event_flags = Some(RING_EVENT_FLAGS_DISABLE);
                self.log_device_area(EVENT_FLAGS, 2);
            }
            return Ok(false);
        }
        if self.event_idx {
            self.u16_at(self.device, EVENT_OFF_WRAP)
                .store(self.next_avail().to_le(), Ordering::Relaxed);
            flags.store(RING_EVENT_FLAGS_DESC.to_le(), Ordering::Release);
            self.event_flags = Some(RING_EVENT_FLAGS_DESC);
        } else {
            flags.store(RING_EVENT_FLAGS_ENABLE.to_le(), Ordering::Relaxed);
            self.event_flags = Some(RING_EVENT_FLAGS_ENABLE);
        }
        self.log_device_area(0, 4);
        fence(Ordering::SeqCst);
        Ok(self.available()? > 0)
    }
}

/// A driver-side view of a packed queue in guest memory, for tests and test frontends:
/// lays out the ring, makes chains available, reads used descriptors. It does no
/// validation of its own inputs on purpose, so tests can build hostile layouts.
pub mod testing {
    use std::sync::atomic::{fence, Ordering};

    use super::*;

    /// Driver side of a packed ring placed at fixed guest addresses.
    #[derive(Debug)]
    pub struct DriverQueue {
        /// Memory the ring lives in.
        pub mem: Arc<GuestMemory>,
        /// Queue size.
        pub size: u16,
        /// Descriptor ring address.
        pub desc: u64,
        /// Driver event suppression area address.
        pub driver_area: u64,
        /// Device event suppression area address.
        pub device_area: u64,
        /// Next slot the driver will make available.
        pub next_avail: u16,
        /// The driver's avail wrap counter.
        pub avail_wrap: bool,
        /// Next slot the driver will look at for a used descriptor.
        pub next_used: u16,
        /// The driver's used wrap counter.
        pub used_wrap: bool,
        /// Next buffer ID [`DriverQueue::add_chain`] hands out (`< size`).
        pub next_id: u16,
        /// Ring slots of the chain with each buffer ID (`< size`), to skip in `pop_used`.
        slots_of_id: Vec<u16>,
    }

    impl DriverQueue {
        /// A ring of `size` at `base`, the driver area right after it and the device area
        /// right after that; all zeroed (nothing available, notifications enabled).
        pub fn new(mem: Arc<GuestMemory>, base: u64, size: u16) -> Self {
            let ring = DESC_SIZE * u64::from(size);
            let q = Self {
                mem,
                size,
                desc: base,
                driver_area: base + ring,
                device_area: base + ring + 4,
                next_avail: 0,
                avail_wrap: true,
                next_used: 0,
                used_wrap: true,
                next_id: 0,
                slots_of_id: vec![1; usize::from(size)],
            };
            q.mem.write(base, &vec![0u8; ring as usize + 8]).unwrap();
            q
        }

        /// The config a device would receive for this ring (fresh: base `0x8000`).
        pub fn config(&self, event_idx: bool, indirect: bool) -> VringConfig {
            VringConfig {
                size: self.size,
                desc_addr: self.desc,
                avail_addr: self.driver_area,
                used_addr: self.device_area,
                next_avail: WRAP_BIT,
                event_idx,
                indirect,
                addrs_are_uaddr: false,
            }
        }

        /// AVAIL/USED bits that make a descriptor available under wrap counter `wrap`.
        pub fn avail_bits(wrap: bool) -> u16 {
            if wrap {
                VIRTQ_DESC_F_AVAIL
            } else {
                VIRTQ_DESC_F_USED
            }
        }

        /// Writes a raw 16-byte descriptor at guest address `at` (a ring slot or an
        /// indirect table entry); `flags` are written as given.
        pub fn write_raw(&self, at: u64, addr: u64, len: u32, id: u16, flags: u16) {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&id.to_le_bytes());
            d[14..16].copy_from_slice(&flags.to_le_bytes());
            self.mem.write(at, &d).unwrap();
        }

        /// Writes a raw descriptor at ring `slot`; `flags` are written as given (add
        /// [`DriverQueue::avail_bits`] to make it available).
        pub fn write_desc(&self, slot: u16, addr: u64, len: u32, id: u16, flags: u16) {
            self.write_raw(self.slot_addr(slot), addr, len, id, flags);
        }

        fn slot_addr(&self, slot: u16) -> u64 {
            self.desc + DESC_SIZE * u64::from(slot)
        }

        fn read_u16(&self, at: u64) -> u16 {
            let mut b = [0u8; 2];
            self.mem.read(at, &mut b).unwrap();
            u16::from_le_bytes(b)
        }

        fn write_u16(&self, at: u64, v: u16) {
            self.mem.write(at, &v.to_le_bytes()).unwrap();
        }

        /// Makes `descs` (`(addr, len, id, flags)`, flags without AVAIL/USED) available at
        /// consecutive slots from the next avail slot, wrapping at the ring end with the
        /// wrap counter of each slot; the head's flags are written last, after a release
        /// fence. The chain's slot count is remembered under the last descriptor's ID.
        pub fn push_raw(&mut self, descs: &[(u64, u32, u16, u16)]) {
            let head = self.next_avail;
            let mut head_flags = 0;
            for (i, &(addr, len, id, flags)) in descs.iter().enumerate() {
                let f = flags | Self::avail_bits(self.avail_wrap);
                if i == 0 {
                    // Body only: the slot keeps its old (not available) flags for now.
                    let old = self.read_u16(self.slot_addr(head) + FLAGS_OFF as u64);
                    self.write_desc(head, addr, len, id, old);
                    head_flags = f;
                } else {
                    self.write_desc(self.next_avail, addr, len, id, f);
                }
                self.next_avail += 1;
                if self.next_avail >= self.size {
                    self.next_avail = 0;
                    self.avail_wrap = !self.avail_wrap;
                }
            }
            if let Some(&(_, _, id, _)) = descs.last() {
                if let Some(n) = self.slots_of_id.get_mut(usize::from(id)) {
                    *n = descs.len() as u16;
                }
                fence(Ordering::Release);
                self.write_u16(self.slot_addr(head) + FLAGS_OFF as u64, head_flags);
            }
        }

        fn take_id(&mut self) -> u16 {
            let id = self.next_id;
            self.next_id = (id + 1) % self.size;
            id
        }

        /// Makes a chain of `(addr, len, writable)` buffers available at consecutive slots;
        /// returns its buffer ID (set in every descriptor).
        pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let id = self.take_id();
            let descs: Vec<_> = bufs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, w))| {
                    let next = if i + 1 < bufs.len() {
                        VIRTQ_DESC_F_NEXT
                    } else {
                        0
                    };
                    let write = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                    (addr, len, id, next | write)
                })
                .collect();
            self.push_raw(&descs);
            id
        }

        /// Writes `bufs` as a table of consecutive descriptors at guest address `table` and
        /// makes one INDIRECT descriptor pointing to it available; returns its buffer ID.
        pub fn add_indirect(&mut self, table: u64, bufs: &[(u64, u32, bool)]) -> u16 {
            for (i, &(addr, len, w)) in bufs.iter().enumerate() {
                let write = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                self.write_raw(table + DESC_SIZE * i as u64, addr, len, 0, write);
            }
            let id = self.take_id();
            let len = (DESC_SIZE as usize * bufs.len()) as u32;
            self.push_raw(&[(table, len, id, VIRTQ_DESC_F_INDIRECT)]);
            id
        }

        /// Returns the next used descriptor `(id, len)`, if the device published one, and
        /// skips the slots of that buffer's chain.
        pub fn pop_used(&mut self) -> Option<(u16, u32)> {
            let at = self.slot_addr(self.next_used);
            let flags = self.read_u16(at + FLAGS_OFF as u64);
            let avail = flags & VIRTQ_DESC_F_AVAIL != 0;
            let used = flags & VIRTQ_DESC_F_USED != 0;
            if avail != self.used_wrap || used != self.used_wrap {
                return None;
            }
            fence(Ordering::Acquire);
            let id = self.read_u16(at + ID_OFF as u64);
            let mut b = [0u8; 4];
            self.mem.read(at + LEN_OFF as u64, &mut b).unwrap();
            let n = self
                .slots_of_id
                .get(usize::from(id))
                .copied()
                .unwrap_or(1)
                .clamp(1, self.size);
            let next = u32::from(self.next_used) + u32::from(n);
            if next >= u32::from(self.size) {
                self.next_used = (next - u32::from(self.size)) as u16;
                self.used_wrap = !self.used_wrap;
            } else {
                self.next_used = next as u16;
            }
            Some((id, u32::from_le_bytes(b)))
        }

        /// The driver's next avail position encoded as a vring base.
        pub fn avail_base(&self) -> u16 {
            encode(self.next_avail, self.avail_wrap)
        }

        /// The driver's next used position encoded as an `off_wrap`.
        pub fn used_off_wrap(&self) -> u16 {
            encode(self.next_used, self.used_wrap)
        }

        /// Writes the driver event suppression area: `off_wrap` then `flags`.
        pub fn set_driver_event(&self, flags: u16, off_wrap: u16) {
            self.write_u16(self.driver_area + EVENT_OFF_WRAP as u64, off_wrap);
            fence(Ordering::Release);
            self.write_u16(self.driver_area + EVENT_FLAGS as u64, flags);
        }

        /// Reads the device event suppression area's `flags`.
        pub fn device_event_flags(&self) -> u16 {
            self.read_u16(self.device_area + EVENT_FLAGS as u64)
        }

        /// Reads the device event suppression area's `off_wrap`.
        pub fn device_event_off_wrap(&self) -> u16 {
            self.read_u16(self.device_area + EVENT_OFF_WRAP as u64)
        }
    }
}

#[cfg(test)]
mod tests;
