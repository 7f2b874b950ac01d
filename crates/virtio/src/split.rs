//! The split virtqueue, device side (virtio 1.2 §2.7), with VIRTIO_RING_F_EVENT_IDX (§2.7.7,
//! §2.7.10) and indirect descriptors (§2.7.5.3).
//!
//! Layout in guest memory, for a queue of size N (a power of two, at most 32768):
//! descriptor table 16·N bytes (16-byte aligned), avail ring 6 + 2·N bytes
//! (`flags, idx, ring[N], used_event`; 2-byte aligned), used ring 6 + 8·N bytes
//! (`flags, idx, ring[N]{id, len}, avail_event`; 4-byte aligned).

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use thiserror::Error;

use crate::chain::{ChainError, DescriptorChain, DESC_SIZE};
use crate::dirty::QueueLog;
use crate::inflight::InflightQueue;
use crate::memory::{GuestMemory, MemoryError};

/// Largest split-ring queue size (virtio 1.2 §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// VRING_AVAIL_F_NO_INTERRUPT: the driver asks not to be interrupted.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// VRING_USED_F_NO_NOTIFY: the device asks not to be kicked.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Errors of a virtqueue: its setup or the driver's use of it. Any of these fails the queue
/// (the device goes to DEVICE_NEEDS_RESET); none panics.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum QueueError {
    /// The queue size is 0, not a power of two, or above 32768.
    #[error("Invalid queue size {0} (1..=32768, and a power of two for a split ring)")]
    InvalidSize(u32),
    /// A ring address is misaligned.
    #[error("Misaligned {ring} ring address {addr:#x} (needs {align}-byte alignment)")]
    Misaligned {
        /// Which ring.
        ring: &'static str,
        /// Its address.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// A ring is not inside guest memory.
    #[error("The {ring} ring is outside guest memory: {source}")]
    RingOutOfBounds {
        /// Which ring.
        ring: &'static str,
        /// The translation error.
        source: MemoryError,
    },
    /// The driver moved avail->idx by more than the queue size (§2.7.13.3).
    #[error("avail index jumped from {last} to {idx}, more than queue size {size}")]
    AvailIndexJump {
        /// Last index consumed by the device.
        last: u16,
        /// Index published by the driver.
        idx: u16,
        /// Queue size.
        size: u16,
    },
    /// Packed ring: the vring base's slot (bits 0..14) is not below the queue size.
    #[error("Invalid packed vring base {base:#06x}: slot past queue size {size}")]
    InvalidBase {
        /// The encoded base (bit 15: wrap counter).
        base: u16,
        /// Queue size.
        size: u16,
    },
    /// A malformed descriptor chain.
    #[error("Descriptor chain at head {head}: {error}")]
    Chain {
        /// The head index from the avail ring.
        head: u16,
        /// What was wrong.
        error: ChainError,
    },
}

/// Where a vring lives and the state to resume it from (vhost-user SET_VRING_NUM,
/// SET_VRING_ADDR and SET_VRING_BASE).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VringConfig {
    /// Queue size in descriptors.
    pub size: u16,
    /// Address of the descriptor table.
    pub desc_addr: u64,
    /// Address of the avail (driver) ring.
    pub avail_addr: u64,
    /// Address of the used (device) ring.
    pub used_addr: u64,
    /// Next avail ring index the device will consume (the vring base).
    pub next_avail: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// VIRTIO_RING_F_INDIRECT_DESC negotiated.
    pub indirect: bool,
    /// Ring addresses are frontend virtual addresses (vhost-user) rather than guest
    /// physical addresses.
    pub addrs_are_uaddr: bool,
}

/// The device side of one split virtqueue. Owned by exactly one worker at a time.
#[derive(Debug)]
pub struct SplitQueue {
    mem: Arc<GuestMemory>,
    size: u16,
    desc: *const u8,
    avail: *mut u8,
    used: *mut u8,
    next_avail: u16,
    next_used: u16,
    /// used->idx value at the last notification decision (EVENT_IDX).
    signalled_used: u16,
    /// Whether `signalled_used` is where the driver was last notified. Not after a
    /// (re)start: a backend that died between publishing used entries and signalling them
    /// leaves `used_event` behind the used index, and comparing against the used index at
    /// start would never notify for them (the driver waits forever).
    signalled_valid: bool,
    /// Used entries were added since the last notification decision.
    pending_signal: bool,
    event_idx: bool,
    indirect: bool,
    /// used->flags as last written (only the device writes it): rewriting an unchanged
    /// value would still pull the driver's cache line (it shares used->idx's).
    used_flags: Option<u16>,
    /// avail->idx as last read: entries up to it are popped without reading the driver's
    /// cache line again.
    avail_shadow: u16,
    /// Inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), when the frontend set it up.
    inflight: Option<InflightQueue>,
    /// Heads found in flight at start, processed before new avail entries.
    resubmit: std::collections::VecDeque<u16>,
    /// Dirty page logging (live migration), while the frontend has it on.
    log: Option<QueueLog>,
}

// SAFETY: the raw pointers point into `mem`, which the queue keeps alive through its Arc;
// the queue is owned and used by one thread at a time.
unsafe impl Send for SplitQueue {}

impl SplitQueue {
    /// Sets up a queue over guest memory, checking size, alignment and that all three rings
    /// are inside mapped memory. `next_used` is read from the used ring (where the previous
    /// owner left it).
    ///
    /// # Errors
    /// [`QueueError::InvalidSize`], [`QueueError::Misaligned`],
    /// [`QueueError::RingOutOfBounds`].
    pub fn new(cfg: &VringConfig, mem: Arc<GuestMemory>) -> Result<Self, QueueError> {
        let size = cfg.size;
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(QueueError::InvalidSize(u32::from(size)));
        }
        let n = u64::from(size);
        let rings = [
            ("descriptor", cfg.desc_addr, 16, DESC_SIZE * n),
            ("avail", cfg.avail_addr, 2, 6 + 2 * n),
            ("used", cfg.used_addr, 4, 6 + 8 * n),
        ];
        let mut ptrs = [std::ptr::null_mut::<u8>(); 3];
        for (slot, (ring, addr, align, len)) in ptrs.iter_mut().zip(rings) {
            if addr % align != 0 {
                return Err(QueueError::Misaligned { ring, addr, align });
            }
            let t = if cfg.addrs_are_uaddr {
                mem.translate_uaddr(addr, len)
            } else {
                mem.translate(addr, len)
            };
            *slot = t.map_err(|source| QueueError::RingOutOfBounds { ring, source })?;
            // The frontend's address is aligned, but an odd mmap_offset or region start
            // can still misalign the host pointer (found by fuzzing).
            if (*slot as usize) & (align as usize - 1) != 0 {
                return Err(QueueError::Misaligned { ring, addr, align });
            }
        }
        let mut q = Self {
            mem,
            size,
            desc: ptrs[0],
            avail: ptrs[1],
            used: ptrs[2],
            next_avail: cfg.next_avail,
            next_used: 0,
            signalled_used: 0,
            signalled_valid: false,
            pending_signal: false,
            event_idx: cfg.event_idx,
            indirect: cfg.indirect,
            used_flags: None,
            avail_shadow: cfg.next_avail,
            inflight: None,
            resubmit: std::collections::VecDeque::new(),
            log: None,
        };
        q.next_used = q.used_idx().load(Ordering::Acquire);
        q.signalled_used = q.next_used;
        Ok(q)
    }

    /// Attaches inflight tracking. Heads the previous backend left in flight are taken
    /// back (oldest first) and will be popped before anything new; the next avail index
    /// then becomes `used_idx + resubmitted`, since every entry the old backend took was
    /// either completed (moving the used index) or is among them.
    pub fn set_inflight(&mut self, mut t: InflightQueue) {
        let heads = t.recover(self.next_used);
        if !heads.is_empty() {
            self.next_avail = self.next_used.wrapping_add(heads.len() as u16);
            self.avail_shadow = self.next_avail;
            tracing::info!(
                resubmitted = heads.len(),
                next_avail = self.next_avail,
                "resubmitting inflight requests"
            );
        }
        self.resubmit = heads.into_iter().collect();
        self.inflight = Some(t);
    }

    /// Turns dirty page logging on (`Some`) or off: from now on every write this queue
    /// makes to its used ring marks the page in the log.
    pub fn set_dirty_log(&mut self, log: Option<QueueLog>) {
        self.log = log;
    }

    /// The dirty log in use, if logging is on.
    pub fn dirty_log(&self) -> Option<&QueueLog> {
        self.log.as_ref()
    }

    /// Logs `len` bytes written at `off` into the used ring (after the write).
    #[inline]
    fn log_used(&self, off: usize, len: usize) {
        if let Some(l) = &self.log {
            match l.used_gpa {
                Some(gpa) => l.log.log(gpa.saturating_add(off as u64), len as u64),
                None => l.log.log_host(&self.mem, self.used.wrapping_add(off), len),
            }
        }
    }

    /// Queue size in descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The next avail ring index the device will consume (what GET_VRING_BASE returns).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Sets the next avail index back to `base` (see [`crate::Virtqueue::rewind`]). Not for
    /// use with inflight tracking (the entries would stay marked).
    pub fn rewind(&mut self, base: u16) {
        self.next_avail = base;
        // Entries between `base` and the shadow index are known available already; a
        // rewind past the shadow (never done by callers) re-reads avail->idx.
        if self.avail_shadow.wrapping_sub(base) > self.size {
            self.avail_shadow = base;
        }
    }

    /// The next used ring index the device will fill.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// The guest memory this queue reads.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    fn u16_at(&self, base: *mut u8, byte_offset: usize) -> &AtomicU16 {
        // SAFETY: callers pass offsets inside the ring sizes checked in `new` (all 2-byte
        // aligned since the ring bases are); the mapping lives as long as `self.mem`.
        // AtomicU16 has the layout of u16 and tolerates concurrent driver access.
        unsafe { &*(base.add(byte_offset) as *const AtomicU16) }
    }

    fn avail_idx(&self) -> &AtomicU16 {
        self.u16_at(self.avail, 2)
    }

    fn used_idx(&self) -> &AtomicU16 {
        self.u16_at(self.used, 2)
    }

    /// Number of chains the driver has made available and the device not yet consumed.
    ///
    /// # Errors
    /// [`QueueError::AvailIndexJump`] if the driver's index is more than a queue size ahead.
    pub fn available(&self) -> Result<u16, QueueError> {
        let idx = u16::from_le(self.avail_idx().load(Ordering::Acquire));
        let n = idx.wrapping_sub(self.next_avail);
        if n > self.size {
            return Err(QueueError::AvailIndexJump {
                last: self.next_avail,
                idx,
                size: self.size,
            });
        }
        Ok(n)
    }

    /// Takes the next available chain into `chain`. Returns `Ok(false)` when the avail
    /// ring is empty.
    ///
    /// # Errors
    /// [`QueueError::AvailIndexJump`], or [`QueueError::Chain`] for a malformed chain (the
    /// entry is consumed; the caller fails the queue).
    pub fn pop(&mut self, chain: &mut DescriptorChain) -> Result<bool, QueueError> {
        if let Some(head) = self.resubmit.pop_front() {
            // SAFETY: as below.
            unsafe { chain.parse_split(&self.mem, self.desc, self.size, head, self.indirect) }
                .map_err(|error| QueueError::Chain { head, error })?;
            return Ok(true);
        }
        if self.avail_shadow == self.next_avail {
            let n = self.available()?;
            if n == 0 {
                return Ok(false);
            }
            self.avail_shadow = self.next_avail.wrapping_add(n);
        }
        // Order the ring entry read after the idx read (the Acquire load above).
        let slot = 4 + 2 * usize::from(self.next_avail % self.size);
        let head = u16::from_le(self.u16_at(self.avail, slot).load(Ordering::Relaxed));
        self.next_avail = self.next_avail.wrapping_add(1);
        if let Some(t) = &mut self.inflight {
            t.begin(head);
        }
        // SAFETY: `desc` points to `size` descriptors checked in `new`, kept alive by
        // `self.mem`.
        unsafe { chain.parse_split(&self.mem, self.desc, self.size, head, self.indirect) }
            .map_err(|error| QueueError::Chain { head, error })?;
        Ok(true)
    }

    /// Puts `(head, len)` in the used ring without publishing it; call
    /// [`SplitQueue::publish_used`] after a batch.
    pub fn add_used(&mut self, head: u16, len: u32) {
        if let Some(t) = &mut self.inflight {
            t.pre_put(head);
        }
        let slot = 4 + 8 * usize::from(self.next_used % self.size);
        // SAFETY: the entry lies within the used ring (6 + 8·size bytes, checked in `new`)
        // and is 4-byte aligned; the driver does not read it until used->idx moves.
        unsafe {
            let p = self.used.add(slot) as *mut u32;
            std::ptr::write_volatile(p, u32::from(head).to_le());
            std::ptr::write_volatile(p.add(1), len.to_le());
        }
        self.log_used(slot, 8);
        self.next_used = self.next_used.wrapping_add(1);
        self.pending_signal = true;
        if self.inflight.is_some() {
            // With inflight tracking each entry is published on its own, so a crash leaves
            // at most one head (last_batch_head) published but still marked.
            self.publish_used();
            let used = self.next_used;
            if let Some(t) = &mut self.inflight {
                t.post_put(head, used);
            }
        }
    }

    /// Publishes the used entries added so far by moving used->idx (release ordering, so the
    /// driver sees the entries and the buffer contents first).
    pub fn publish_used(&mut self) {
        self.used_idx()
            .store(self.next_used.to_le(), Ordering::Release);
        self.log_used(2, 2);
    }

    /// Whether the driver wants a used-buffer notification for what was published since
    /// the last call (§2.7.7, §2.7.10). With EVENT_IDX: `used_event` decides; otherwise
    /// VRING_AVAIL_F_NO_INTERRUPT.
    pub fn needs_notification(&mut self) -> bool {
        if !self.pending_signal {
            return false;
        }
        self.pending_signal = false;
        // The driver's suppression fields must be read after used->idx is visible.
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let old = self.signalled_used;
        self.signalled_used = new;
        if self.event_idx && !std::mem::replace(&mut self.signalled_valid, true) {
            // The first decision since the ring started: what the driver was last told is
            // unknown, so tell it (a spurious notification is harmless; §2.7.10).
            return true;
        }
        if self.event_idx {
            let used_event = u16::from_le(
                self.u16_at(self.avail, 4 + 2 * usize::from(self.size))
                    .load(Ordering::Relaxed),
            );
            new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags = u16::from_le(self.u16_at(self.avail, 0).load(Ordering::Relaxed));
            flags & VRING_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver to kick (`enable`) or not to kick. With EVENT_IDX, enabling writes
    /// `avail_event` = next avail index; without, it clears or sets VRING_USED_F_NO_NOTIFY.
    /// Returns whether chains are available after enabling (the caller must then process
    /// them instead of sleeping, closing the race with the driver).
    ///
    /// # Errors
    /// [`QueueError::AvailIndexJump`] from the re-check.
    pub fn set_notification(&mut self, enable: bool) -> Result<bool, QueueError> {
        if self.event_idx {
            if enable {
                let off = 4 + 8 * usize::from(self.size);
                self.u16_at(self.used, off)
                    .store(self.next_avail.to_le(), Ordering::Relaxed);
                self.log_used(off, 2);
            }
        } else {
            let v = if enable { 0 } else { VRING_USED_F_NO_NOTIFY };
            if self.used_flags != Some(v) {
                self.u16_at(self.used, 0)
                    .store(v.to_le(), Ordering::Relaxed);
                self.log_used(0, 2);
                self.used_flags = Some(v);
            }
        }
        if !enable {
            return Ok(false);
        }
        fence(Ordering::SeqCst);
        Ok(self.available()? > 0)
    }
}

/// A driver-side view of a split queue in guest memory, for tests and test frontends:
/// lays out rings, adds chains, reads used entries. It does no validation of its own
/// inputs on purpose, so tests can build hostile layouts.
pub mod testing {
    use super::*;

    /// Driver side of a split ring placed at fixed guest addresses.
    #[derive(Debug)]
    pub struct DriverQueue {
        /// Memory the ring lives in.
        pub mem: Arc<GuestMemory>,
        /// Queue size.
        pub size: u16,
        /// Descriptor table address.
        pub desc: u64,
        /// Avail ring address.
        pub avail: u64,
        /// Used ring address.
        pub used: u64,
        /// Next free descriptor slot to fill.
        pub next_desc: u16,
        /// Driver's avail idx.
        pub avail_idx: u16,
        /// Next used idx the driver will read.
        pub last_used: u16,
    }

    impl DriverQueue {
        /// A ring of `size` at `base` (desc), then avail, then used (4 KiB aligned).
        pub fn new(mem: Arc<GuestMemory>, base: u64, size: u16) -> Self {
            let n = u64::from(size);
            let avail = base + 16 * n;
            let used = (avail + 6 + 2 * n + 4095) & !4095;
            let q = Self {
                mem,
                size,
                desc: base,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            };
            let zeros = vec![0u8; (used + 6 + 8 * n - base) as usize];
            q.mem.write(base, &zeros).unwrap();
            q
        }

        /// The config a device would receive for this ring.
        pub fn config(&self, event_idx: bool, indirect: bool) -> VringConfig {
            VringConfig {
                size: self.size,
                desc_addr: self.desc,
                avail_addr: self.avail,
                used_addr: self.used,
                next_avail: 0,
                event_idx,
                indirect,
                addrs_are_uaddr: false,
            }
        }

        /// Writes a raw descriptor at `index` of the table at `table`.
        pub fn write_desc(
            &self,
            table: u64,
            index: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write(table + 16 * u64::from(index), &d).unwrap();
        }

        /// Adds a chain of `(addr, len, writable)` buffers using consecutive descriptors;
        /// returns its head. Does not publish (see [`DriverQueue::publish`]).
        pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, (addr, len, w)) in bufs.iter().enumerate() {
                let idx = (head + i as u16) % self.size;
                let last = i + 1 == bufs.len();
                let flags = if *w {
                    crate::chain::VIRTQ_DESC_F_WRITE
                } else {
                    0
                } | if last {
                    0
                } else {
                    crate::chain::VIRTQ_DESC_F_NEXT
                };
                self.write_desc(self.desc, idx, *addr, *len, flags, (idx + 1) % self.size);
            }
            self.next_desc = (head + bufs.len() as u16) % self.size;
            self.push_avail(head);
            head
        }

        /// Puts `head` in the avail ring (not yet published).
        pub fn push_avail(&mut self, head: u16) {
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            self.mem.write(slot, &head.to_le_bytes()).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }

        /// Publishes avail->idx.
        pub fn publish(&self) {
            self.set_avail_idx(self.avail_idx);
        }

        /// Writes an arbitrary avail->idx (hostile tests).
        pub fn set_avail_idx(&self, idx: u16) {
            self.mem.write(self.avail + 2, &idx.to_le_bytes()).unwrap();
        }

        /// Writes avail->flags.
        pub fn set_avail_flags(&self, flags: u16) {
            self.mem.write(self.avail, &flags.to_le_bytes()).unwrap();
        }

        /// Writes used_event (the avail ring's trailing field).
        pub fn set_used_event(&self, v: u16) {
            let at = self.avail + 4 + 2 * u64::from(self.size);
            self.mem.write(at, &v.to_le_bytes()).unwrap();
        }

        /// Reads used->flags.
        pub fn used_flags(&self) -> u16 {
            let mut b = [0u8; 2];
            self.mem.read(self.used, &mut b).unwrap();
            u16::from_le_bytes(b)
        }

        /// Reads avail_event (the used ring's trailing field).
        pub fn avail_event(&self) -> u16 {
            let mut b = [0u8; 2];
            self.mem
                .read(self.used + 4 + 8 * u64::from(self.size), &mut b)
                .unwrap();
            u16::from_le_bytes(b)
        }

        /// Returns the next used entry `(id, len)`, if the device published one.
        pub fn pop_used(&mut self) -> Option<(u32, u32)> {
            let mut b = [0u8; 2];
            self.mem.read(self.used + 2, &mut b).unwrap();
            if u16::from_le_bytes(b) == self.last_used {
                return None;
            }
            let mut e = [0u8; 8];
            let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            self.mem.read(at, &mut e).unwrap();
            self.last_used = self.last_used.wrapping_add(1);
            Some((
                u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            ))
        }
    }
}

#[cfg(test)]
mod tests;
