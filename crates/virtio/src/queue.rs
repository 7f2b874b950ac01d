//! One queue interface over both ring layouts: the split ring (virtio 1.2 §2.7) and the
//! packed ring (§2.8, VIRTIO_F_RING_PACKED). Devices and workers use [`Virtqueue`] and never
//! look at the layout; the dispatch is a `match` on a two-variant enum (no trait object on
//! the data path).

use std::sync::Arc;

use crate::chain::DescriptorChain;
use crate::dirty::QueueLog;
use crate::inflight::{InflightMap, InflightQueue};
use crate::memory::GuestMemory;
use crate::packed::PackedQueue;
use crate::split::{QueueError, SplitQueue, VringConfig};

/// The device side of one virtqueue, split or packed. Owned by exactly one worker at a time.
#[derive(Debug)]
pub enum Virtqueue {
    /// A split ring (§2.7).
    Split(SplitQueue),
    /// A packed ring (§2.8).
    Packed(PackedQueue),
}

macro_rules! each {
    ($self:ident, $q:ident => $e:expr) => {
        match $self {
            Virtqueue::Split($q) => $e,
            Virtqueue::Packed($q) => $e,
        }
    };
}

impl Virtqueue {
    /// Sets up a split (`packed == false`) or packed ring from `cfg`. For a packed ring,
    /// `cfg.avail_addr`/`cfg.used_addr` are the driver/device event suppression areas and
    /// `cfg.next_avail` carries the wrap counter in bit 15 (the vhost-user vring base).
    ///
    /// # Errors
    /// As [`SplitQueue::new`] / [`PackedQueue::new`]: size, alignment, bounds.
    pub fn new(cfg: &VringConfig, mem: Arc<GuestMemory>, packed: bool) -> Result<Self, QueueError> {
        Ok(if packed {
            Self::Packed(PackedQueue::new(cfg, mem)?)
        } else {
            Self::Split(SplitQueue::new(cfg, mem)?)
        })
    }

    /// Whether this is a packed ring.
    pub fn is_packed(&self) -> bool {
        matches!(self, Self::Packed(_))
    }

    /// Queue size in descriptors.
    pub fn size(&self) -> u16 {
        each!(self, q => q.size())
    }

    /// The vring base to report (GET_VRING_BASE): the next avail index (split), or the next
    /// avail slot with its wrap counter in bit 15 (packed).
    pub fn next_avail(&self) -> u16 {
        each!(self, q => q.next_avail())
    }

    /// The guest memory this queue reads.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        each!(self, q => q.memory())
    }

    /// Whether the driver made a chain available that the device has not consumed.
    ///
    /// # Errors
    /// [`QueueError::AvailIndexJump`] (split) when the driver's index is impossible.
    pub fn has_available(&self) -> Result<bool, QueueError> {
        Ok(each!(self, q => q.available())? > 0)
    }

    /// Takes the next available chain into `chain`; `Ok(false)` when there is none.
    ///
    /// # Errors
    /// [`QueueError::Chain`] for a malformed chain (consumed; the caller fails the queue),
    /// [`QueueError::AvailIndexJump`].
    #[inline]
    pub fn pop(&mut self, chain: &mut DescriptorChain) -> Result<bool, QueueError> {
        each!(self, q => q.pop(chain))
    }

    /// Puts back every chain popped since the vring base was `base` (a value of
    /// [`Virtqueue::next_avail`]), so they are popped again; nothing may have been added to
    /// the used ring for them. Used by devices that need several chains for one request
    /// (virtio-net mergeable receive buffers) and found too few.
    pub fn rewind(&mut self, base: u16) {
        each!(self, q => q.rewind(base))
    }

    /// Records `chain` as used with `len` bytes written into its device-writable part. Not
    /// visible to the driver before [`Virtqueue::publish_used`].
    ///
    /// With dirty logging on, the chain's device-writable buffers are logged in full (the
    /// device wrote them before completing the chain), then the used ring writes.
    #[inline]
    pub fn add_used(&mut self, chain: &DescriptorChain, len: u32) {
        if let Some(l) = self.dirty_log() {
            l.log.log_chain(self.memory(), chain);
        }
        match self {
            Self::Split(q) => q.add_used(chain.head(), len),
            // The packed ring skips the chain's ring slots (§2.8.6); with inflight
            // tracking the chain knows its entry in the region.
            Self::Packed(q) => q.add_used_chain(chain, len),
        }
    }

    /// Makes the used entries added so far visible to the driver.
    #[inline]
    pub fn publish_used(&mut self) {
        each!(self, q => q.publish_used())
    }

    /// Turns dirty page logging (live migration) on with `Some`, off with `None`.
    pub fn set_dirty_log(&mut self, log: Option<QueueLog>) {
        each!(self, q => q.set_dirty_log(log))
    }

    /// The dirty log in use, if logging is on.
    #[inline]
    pub fn dirty_log(&self) -> Option<&QueueLog> {
        each!(self, q => q.dirty_log())
    }

    /// Whether the driver wants a used-buffer notification for what was published since
    /// the last call (event suppression: §2.7.7/§2.7.10 split, §2.8.10 packed).
    pub fn needs_notification(&mut self) -> bool {
        each!(self, q => q.needs_notification())
    }

    /// Enables or suppresses driver notifications (kicks). When enabling, returns whether a
    /// chain became available meanwhile (process it instead of sleeping).
    ///
    /// # Errors
    /// [`QueueError::AvailIndexJump`] from the re-check.
    pub fn set_notification(&mut self, enable: bool) -> Result<bool, QueueError> {
        each!(self, q => q.set_notification(enable))
    }

    /// Attaches inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) from queue `index`
    /// of `map`, in the layout of the ring (split or packed): chains a previous backend
    /// left in flight are resubmitted first. Returns `false` (and tracks nothing) if the
    /// map has no region for this queue in that layout (another queue size, too small).
    pub fn attach_inflight(&mut self, map: &Arc<InflightMap>, index: u16) -> bool {
        match self {
            Self::Split(q) => match map.queue(index, q.size()) {
                Some(t) => {
                    q.set_inflight(t);
                    true
                }
                None => false,
            },
            Self::Packed(q) => q.attach_inflight(map, index),
        }
    }

    /// Attaches a split-layout tracker. Split rings only: returns `false` (and tracks
    /// nothing) for a packed ring (use [`Virtqueue::attach_inflight`]).
    pub fn set_inflight(&mut self, t: InflightQueue) -> bool {
        match self {
            Self::Split(q) => {
                q.set_inflight(t);
                true
            }
            Self::Packed(_) => false,
        }
    }
}
