//! Completing chains on a [`PackedQueue`]: used descriptors written at the used
//! position, batched and published with one release store (or, with inflight tracking, one
//! at a time in the region's order), and their dirty page logging.

use std::sync::atomic::{fence, Ordering};

use crate::chain::{DescriptorChain, DESC_SIZE};
use crate::chain::{VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE};

use super::{PackedQueue, ID_OFF, LEN_OFF};

impl PackedQueue {
    /// Logs used descriptor `slot` (after its flags were written).
    #[inline]
    fn log_desc(&self, slot: u16) {
        if let Some(l) = &self.log {
            let at = usize::from(slot) * DESC_SIZE as usize;
            l.log
                .log_host(&self.mem, self.desc.wrapping_add(at), DESC_SIZE as usize);
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
}
