//! The per-queue request processor: parse, execute, write the status byte.
//!
//! Each queue has its own handler with its own scratch buffers (the segment list handed to
//! the backend and the O_DIRECT bounce buffer); the device state is shared read-only
//! through an `Arc`, so no lock is taken per request and nothing is allocated once the
//! buffers have grown to the largest request seen.

use std::sync::Arc;
use std::time::Instant;

use uvdpa_virtio::worker::{DeviceFault, QueueHandler};
use uvdpa_virtio::{DescriptorChain, Segment};

use super::backend::Bounce;
use super::request::{
    parse, status, zero_segment, Limits, Request, RequestError, HEADER_LEN, VIRTIO_BLK_S_OK,
};
use super::trace::TraceTap;
use super::{Shared, SERIAL_LEN};
use crate::ratelimit::guest_debug;

/// Processes the requests of one virtio-blk queue.
pub(crate) struct BlkQueue {
    shared: Arc<Shared>,
    index: u16,
    limits: Limits,
    /// Scratch: the data part of the current request's buffers.
    iov: Vec<Segment>,
    bounce: Bounce,
    /// The live request trace, looked at once per batch.
    trace: TraceTap,
    /// The trace was refreshed for the batch under way (cleared at its end).
    trace_fresh: bool,
}

impl BlkQueue {
    pub(crate) fn new(shared: Arc<Shared>, index: u16, limits: Limits) -> Self {
        let iov = Vec::with_capacity(usize::from(shared.queue_size));
        let trace = TraceTap::new(shared.trace.clone());
        Self {
            shared,
            index,
            limits,
            iov,
            bounce: Bounce::default(),
            trace,
            trace_fresh: false,
        }
    }

    /// The request limits of this queue, with the device's capacity as of now (a resize
    /// may change it between two requests; each request is checked against one value).
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            capacity: self.shared.backend.size(),
            ..self.limits
        }
    }

    /// The queue this handler was made for.
    pub(crate) fn index(&self) -> u16 {
        self.index
    }

    /// The device state shared by its queues.
    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Counts a request that started at `started` and is over now in the queue's latency
    /// histogram.
    pub(crate) fn record_latency(&self, started: Instant) {
        if let Some(h) = self.shared.latency.get(usize::from(self.index)) {
            h.record(started.elapsed());
        }
    }

    /// Once per batch (the group handlers call it at the start of each pass; the
    /// one-request-at-a-time path at its batch's first request): picks up a request trace
    /// attached or detached since the last batch.
    #[inline]
    pub(crate) fn trace_refresh(&mut self) {
        self.trace.refresh();
    }

    /// Counts the request in `chain` of queue `queue`, started at `started` and
    /// completed now with `status`: its latency, and a trace record while a trace is
    /// attached.
    pub(crate) fn completed(
        &self,
        queue: u16,
        chain: &DescriptorChain,
        started: Instant,
        status: u8,
    ) {
        self.record_latency(started);
        self.trace.record(queue, chain, started, status);
    }

    /// A trace record only (the latency is counted elsewhere), as [`BlkQueue::completed`].
    pub(crate) fn traced(&self, queue: u16, chain: &DescriptorChain, started: Instant, status: u8) {
        self.trace.record(queue, chain, started, status);
    }

    /// Logs a failed request (debug level, rate-limited per device).
    pub(crate) fn log_failure(&self, head: u16, error: &RequestError) {
        guest_debug!(
            self.shared.log,
            queue = self.index,
            head,
            error = %error,
            "virtio-blk request failed"
        );
    }

    /// Executes a parsed request; returns the data bytes written to the writable part
    /// (not counting the status byte).
    fn execute(
        &mut self,
        chain: &DescriptorChain,
        req: Request,
        limits: &Limits,
    ) -> Result<usize, RequestError> {
        let Self {
            shared,
            iov,
            bounce,
            ..
        } = self;
        let backend = &shared.backend;
        match req {
            Request::In { offset, len } => {
                select(iov, chain.writable(), 0, len);
                // SAFETY: the segments are a sub-range of the chain's device-writable
                // buffers, which the queue validated against guest memory that stays
                // mapped while the chain is handled; guest memory is never a Rust object.
                unsafe { backend.read(offset, iov, bounce) }.map_err(RequestError::Io)?;
                Ok(len)
            }
            Request::Out { offset, len } => {
                select(iov, chain.readable(), HEADER_LEN, len);
                // SAFETY: as for `In`, with the chain's device-readable buffers.
                unsafe { backend.write(offset, iov, bounce) }.map_err(RequestError::Io)?;
                Ok(0)
            }
            Request::Flush => backend.flush().map(|()| 0).map_err(RequestError::Io),
            Request::GetId { len } => {
                let n = len.min(SERIAL_LEN);
                Ok(chain.write_at(0, shared.serial.get(..n).unwrap_or_default()))
            }
            Request::Discard { count } | Request::WriteZeroes { count } => {
                let write_zeroes = matches!(req, Request::WriteZeroes { .. });
                for i in 0..count {
                    let r = zero_segment(chain, i, write_zeroes, limits)?;
                    if write_zeroes {
                        backend.write_zeroes(r.offset, r.len, r.unmap)
                    } else {
                        backend.discard(r.offset, r.len)
                    }
                    .map_err(RequestError::Io)?;
                }
                Ok(0)
            }
        }
    }
}

impl BlkQueue {
    /// [`QueueHandler::handle`] for a chain of queue `queue` (a group serving several
    /// queues with one handler says which; it is the queue its trace records name).
    pub(crate) fn handle_on(&mut self, queue: u16, chain: &DescriptorChain) -> u32 {
        let started = Instant::now();
        if !self.trace_fresh {
            self.trace_fresh = true;
            self.trace.refresh();
        }
        let Some(status_at) = chain.writable_len().checked_sub(1) else {
            guest_debug!(
                self.shared.log,
                queue = self.index,
                head = chain.head(),
                "Dropping virtio-blk request without a writable status byte"
            );
            return 0;
        };
        let limits = self.limits();
        let result = parse(chain, &limits).and_then(|req| self.execute(chain, req, &limits));
        let (status, written) = match result {
            Ok(n) => (VIRTIO_BLK_S_OK, u32::try_from(n).unwrap_or(status_at)),
            Err(e) => {
                guest_debug!(
                    self.shared.log,
                    queue = self.index,
                    head = chain.head(),
                    error = %e,
                    "virtio-blk request failed"
                );
                (status(&e), 0)
            }
        };
        chain.write_at(status_at as usize, &[status]);
        self.completed(queue, chain, started, status);
        // Data bytes never reach the status byte, so the sum is at most writable_len.
        written.min(status_at) + 1
    }
}

impl QueueHandler for BlkQueue {
    fn handle(&mut self, chain: &DescriptorChain) -> Result<u32, DeviceFault> {
        Ok(self.handle_on(self.index, chain))
    }

    fn end_batch(&mut self) -> Result<(), DeviceFault> {
        self.trace_fresh = false;
        Ok(())
    }
}

/// Replaces `out` with the pieces of `segs` covering bytes `[skip, skip + len)`, leaving
/// out empty pieces. Allocates only when a chain has more pieces than any before.
pub(crate) fn select(out: &mut Vec<Segment>, segs: &[Segment], mut skip: usize, mut len: usize) {
    out.clear();
    for s in segs {
        if len == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(len);
        out.push(Segment {
            base: s.base.wrapping_add(skip),
            len: n,
        });
        len -= n;
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_takes_a_byte_range_across_segments() {
        let mut buf = [0u8; 64];
        let p = buf.as_mut_ptr();
        let segs = [
            Segment { base: p, len: 10 },
            Segment {
                base: p.wrapping_add(10),
                len: 0,
            },
            Segment {
                base: p.wrapping_add(10),
                len: 20,
            },
            Segment {
                base: p.wrapping_add(30),
                len: 5,
            },
        ];
        let mut out = Vec::new();
        select(&mut out, &segs, 16, 18);
        let got: Vec<_> = out
            .iter()
            .map(|s| (s.base as usize - p as usize, s.len))
            .collect();
        assert_eq!(got, vec![(16, 14), (30, 4)]);
        select(&mut out, &segs, 0, 10);
        assert_eq!(out.len(), 1);
        select(&mut out, &segs, 35, 0);
        assert!(out.is_empty());
    }
}
