//! Taking chains from a [`PackedQueue`]: whether one is available, popping it from the
//! ring (or, after a previous backend's crash, from its saved copy in the inflight region),
//! and rewinding the avail position.

use std::sync::atomic::Ordering;

use crate::chain::{packed_available, ChainError, DescriptorChain, RawPackedDesc, DESC_SIZE};
use crate::chain::{VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED};
use crate::split::QueueError;

use super::{encode, PackedQueue, FLAGS_OFF, WRAP_BIT};

impl PackedQueue {
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
}
