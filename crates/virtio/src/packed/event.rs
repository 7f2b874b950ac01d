//! Event suppression of a [`PackedQueue`] (§2.8.10, §2.8.14): whether the driver wants a
//! used-buffer notification, and asking it to kick or not.

use std::sync::atomic::{fence, Ordering};

use crate::split::QueueError;

use super::{
    PackedQueue, EVENT_FLAGS, EVENT_OFF_WRAP, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE, WRAP_BIT,
};

impl PackedQueue {
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
