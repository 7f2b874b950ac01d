//! Inflight tracking of a [`PackedQueue`]: attaching a region, and resuming from one a
//! previous backend left (its used position, the chains it left in flight).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::inflight::{InflightMap, PackedInflight};

use super::{encode, PackedQueue};

impl PackedQueue {
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
}
