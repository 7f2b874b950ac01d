//! The asynchronous file backend: a virtio-blk queue whose requests go to the disk through
//! io_uring, many at once, and complete in whatever order the disk answers.
//!
//! [`AioGroup`] is the [`GroupHandler`] of one queue of a `file` device with `aio =
//! io_uring`. Each chain popped from the avail ring is taken into a *slot* of a per-queue
//! pool (at most [`MAX_DEPTH`] and the ring size; when every slot is busy the rest wait in
//! the avail ring, and kicks stay off until a completion frees one). A slot owns the
//! [`DescriptorChain`] and the iovec array of its request, so the guest buffers the kernel
//! reads or writes stay described while the I/O runs; slots and their vectors are reused,
//! so nothing is allocated once the pool is warm.
//!
//! - IN/OUT: IORING_OP_READV/WRITEV straight from the chain's guest buffers ([`Segment`]s
//!   are iovecs), at most 1024 (`UIO_MAXIOV`) at a time; short transfers are resumed where
//!   they stopped, -EAGAIN/-EINTR are resubmitted, any other error (or a transfer of 0
//!   bytes) completes that request with VIRTIO_BLK_S_IOERR.
//! - FLUSH: IORING_OP_FSYNC with IORING_FSYNC_DATASYNC (fdatasync).
//! - DISCARD / WRITE_ZEROES: one IORING_OP_FALLOCATE per segment, with the modes of the
//!   synchronous backend (PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE, the other as fallback); where
//!   the file supports neither, discard is a no-op and write-zeroes writes zeroes
//!   *synchronously* in the worker (rare: filesystems without fallocate).
//! - O_DIRECT requests whose guest buffers are not aligned, GET_ID, and requests that fail
//!   parsing are executed synchronously by [`BlkQueue`], in the same pass.
//!
//! Completions are reaped in the worker's own loop: the ring's eventfd is the group's
//! [`GroupHandler::wake_fd`], and a busy-polling worker sees completions in the shared
//! completion queue without a syscall ([`GroupHandler::has_work`]). Used entries are added
//! as requests complete, in any order, and published once per pass; the device never
//! offers VIRTIO_F_IN_ORDER. Inflight tracking (vhost-user INFLIGHT_SHMFD) marks a head
//! when it is popped and clears it when its own used entry is published (split ring:
//! [`uvdpa_virtio::SplitQueue::add_used`]), which holds for any completion order.
//!
//! # Stopping with requests in flight
//! The guest memory a request's buffers point into must stay mapped until the kernel has
//! finished with them. Three things guarantee it:
//! - while any request is in flight the group holds its own reference to the queue's
//!   [`GuestMemory`] (dropped when the last one completes, so a memory-table change after a
//!   stop can take the memory back);
//! - [`GroupHandler::stopped`] (every worker stop: GET_VRING_BASE, reset, disconnect,
//!   `dev del`, memory-table changes) waits for every request in flight and publishes
//!   their used entries before the queue is handed back, so the vring base counts only
//!   completed requests. If the owner gives up (a stuck disk,
//!   [`uvdpa_virtio::worker::StopError::Stuck`]), the group asks the kernel to cancel
//!   everything and keeps waiting — on the abandoned worker thread, which still holds the
//!   queue and so the memory — but no longer touches the ring;
//! - dropping the group with requests in flight (a panic unwinding) waits for them too.

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use uvdpa_virtio::worker::{DeviceFault, GroupHandler, WorkerCtl, WorkerError, WorkerQueue};
use uvdpa_virtio::{DescriptorChain, GuestMemory, Segment};

use super::queue::BlkQueue;
use super::request::{ZeroRange, VIRTIO_BLK_S_IOERR};
use super::uring::{Uring, CANCEL_TAG, MAX_DEPTH};

mod ops;

/// How a file backend does its I/O: the `aio` device attribute (qemu-storage-daemon's
/// `aio=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Aio {
    /// io_uring, many requests in flight per queue (the default). A host where io_uring
    /// cannot be set up falls back to [`Aio::Sync`] when the device is opened.
    #[default]
    IoUring,
    /// preadv/pwritev in the queue worker, one request at a time per queue.
    Sync,
}

impl Aio {
    /// The attribute value: `io_uring` or `sync`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Sync => "sync",
        }
    }
}

impl fmt::Display for Aio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Aio {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "io_uring" => Ok(Self::IoUring),
            "sync" => Ok(Self::Sync),
            other => Err(format!("{other:?}: one of io_uring, sync")),
        }
    }
}

/// Times one operation is resubmitted after -EAGAIN/-EINTR before its request fails.
const MAX_RETRIES: u32 = 1000;
/// How long one wait for completions lasts while stopping, before the abandon flag is
/// looked at again.
const STOP_WAIT_MS: i32 = 10;

/// What a slot's request has at the disk.
#[derive(Debug, Clone, Copy, Default)]
enum Op {
    /// Nothing (a free slot).
    #[default]
    Idle,
    /// READV into the slot's iovecs.
    Read,
    /// WRITEV from the slot's iovecs.
    Write,
    /// FSYNC (DATASYNC).
    Flush,
    /// FALLOCATE of segment `seg` (of `count`) with `zero_modes(range.unmap)[mode]`
    /// (write-zeroes), or PUNCH_HOLE (discard).
    Zero {
        write_zeroes: bool,
        seg: usize,
        count: usize,
        mode: usize,
        range: ZeroRange,
    },
}

/// One request in flight: its chain, the data part of its buffers, and where it stands.
#[derive(Debug, Default)]
struct Slot {
    chain: DescriptorChain,
    /// The data buffers; entries before `pos` are done, `pos` may be partly done (its base
    /// and length were advanced past what the kernel transferred).
    iov: Vec<Segment>,
    pos: usize,
    /// Disk byte offset of the next byte to transfer.
    offset: u64,
    /// Data bytes of a read (what the used length reports besides the status byte).
    len: usize,
    op: Op,
    retries: u32,
    /// When the request went to the ring (its latency is counted when it completes);
    /// `None` for one completed synchronously (counted by the queue handler).
    started: Option<Instant>,
}

/// What a request needs next.
enum Step {
    /// An operation is (again) at the disk.
    Pending,
    /// The request is over: status byte and data bytes written to the writable part.
    Done(u8, usize),
}

/// Requests completed in one pass.
#[derive(Default)]
struct Done {
    n: u64,
    read: u64,
    written: u64,
}

/// The [`GroupHandler`] of one virtio-blk queue over an io_uring file backend (see the
/// module docs).
pub(crate) struct AioGroup {
    blk: BlkQueue,
    fd: i32,
    ring: Uring,
    slots: Vec<Slot>,
    /// Indices of slots not in flight.
    free: Vec<usize>,
    /// Slots in flight.
    busy: usize,
    /// The guest memory of the requests in flight, kept mapped until they complete.
    mem: Option<Arc<GuestMemory>>,
    /// A cancellation of everything in flight was sent (abandoned stop).
    cancelled: bool,
}

impl fmt::Debug for AioGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioGroup")
            .field("ring", &self.ring)
            .field("slots", &self.slots.len())
            .field("busy", &self.busy)
            .finish()
    }
}

/// Requests one queue may have in flight.
fn depth(q: &WorkerQueue) -> usize {
    usize::from(q.queue.size()).clamp(1, MAX_DEPTH)
}

impl AioGroup {
    /// A group over `blk`'s file backend with a new io_uring.
    ///
    /// # Errors
    /// The backend is not a file, or the ring could not be set up ([`Uring::new`]).
    pub(crate) fn new(blk: BlkQueue) -> io::Result<Self> {
        let fd = blk
            .shared()
            .backend
            .file()
            .map(super::backend::FileDisk::fd)
            .ok_or_else(|| io::Error::other("io_uring serves only file backends"))?;
        Ok(Self {
            blk,
            fd,
            ring: Uring::new()?,
            slots: Vec::new(),
            free: Vec::new(),
            busy: 0,
            mem: None,
            cancelled: false,
        })
    }

    /// A free slot, if fewer than `depth` are in flight.
    fn take_slot(&mut self, depth: usize) -> Option<usize> {
        if self.busy >= depth {
            return None;
        }
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        self.slots.push(Slot::default());
        Some(self.slots.len() - 1)
    }

    /// Writes the status byte of slot `i`'s request; returns its used length.
    fn finish(&mut self, i: usize, st: u8, written: usize) -> u32 {
        let Some(slot) = self.slots.get_mut(i) else {
            return 0;
        };
        slot.op = Op::Idle;
        let Some(status_at) = slot.chain.writable_len().checked_sub(1) else {
            return 0;
        };
        slot.chain.write_at(status_at as usize, &[st]);
        if let Some(t) = slot.started {
            self.blk.traced(self.blk.index(), &slot.chain, t, st);
        }
        // Data bytes never reach the status byte.
        u32::try_from(written).unwrap_or(status_at).min(status_at) + 1
    }

    /// Adds slot `i`'s used entry (unless `q` is `None`: an abandoned ring) and frees it.
    fn complete(&mut self, q: Option<&mut WorkerQueue>, i: usize, used: u32, done: &mut Done) {
        let started = self.slots.get_mut(i).and_then(|s| s.started.take());
        if let (Some(t), true) = (started, q.is_some()) {
            self.blk.record_latency(t);
        }
        if let (Some(q), Some(slot)) = (q, self.slots.get(i)) {
            q.queue.add_used(&slot.chain, used);
            done.n += 1;
            done.read += u64::from(slot.chain.readable_len());
            done.written += u64::from(used);
        }
        self.free.push(i);
    }

    /// Pops chains into free slots and starts them; returns how many were popped.
    fn fill(
        &mut self,
        q: &mut WorkerQueue,
        ctl: &WorkerCtl,
        done: &mut Done,
    ) -> Result<usize, WorkerError> {
        let depth = depth(q);
        let mut popped = 0;
        while popped < usize::from(q.queue.size()) {
            let Some(i) = self.take_slot(depth) else {
                break;
            };
            let got = match self.slots.get_mut(i) {
                Some(slot) => q.queue.pop(&mut slot.chain),
                None => Ok(false),
            };
            match got {
                Ok(true) => popped += 1,
                Ok(false) => {
                    self.free.push(i);
                    break;
                }
                Err(e) => {
                    self.free.push(i);
                    return Err(e.into());
                }
            }
            // The memory must be held before the kernel can see a request.
            if self.mem.is_none() {
                self.mem = Some(q.queue.memory().clone());
            }
            let started = Instant::now();
            match self.start(i) {
                Ok(None) => {
                    if let Some(slot) = self.slots.get_mut(i) {
                        slot.started = Some(started);
                    }
                    self.busy += 1;
                }
                Ok(Some(used)) => {
                    if ctl.abandoned() {
                        self.free.push(i);
                        return Err(WorkerError::Abandoned);
                    }
                    self.complete(Some(q), i, used, done);
                }
                Err(e) => {
                    self.free.push(i);
                    return Err(e);
                }
            }
        }
        if self.busy == 0 {
            self.mem = None;
        }
        Ok(popped)
    }

    /// Handles every completion waiting. With `q == None` (the ring was abandoned) requests
    /// end at their current operation and nothing is written to the ring.
    fn reap(&mut self, mut q: Option<&mut WorkerQueue>, done: &mut Done) {
        while let Some(c) = self.ring.next_completion() {
            if c.tag == CANCEL_TAG {
                continue;
            }
            let Ok(i) = usize::try_from(c.tag) else {
                continue;
            };
            let step = if q.is_some() {
                self.advance(i, c.result)
            } else {
                Step::Done(VIRTIO_BLK_S_IOERR, 0)
            };
            if let Step::Done(st, written) = step {
                let used = self.finish(i, st, written);
                self.busy = self.busy.saturating_sub(1);
                self.complete(q.as_deref_mut(), i, used, done);
            }
        }
        if self.busy == 0 {
            self.mem = None;
        }
    }

    /// Waits until nothing is in flight, publishing completions to `q` unless `ctl` says
    /// the ring was abandoned (then the kernel is asked to cancel, and the wait goes on:
    /// the memory must outlive the I/O).
    fn wait_idle(&mut self, mut q: Option<&mut WorkerQueue>, ctl: Option<&WorkerCtl>) {
        while self.busy > 0 {
            let abandoned = ctl.map_or(true, WorkerCtl::abandoned);
            if abandoned && !self.cancelled {
                self.cancelled = true;
                if let Err(e) = self.ring.cancel_all() {
                    tracing::debug!("Cancelling io_uring requests failed: {e}");
                }
            }
            // Entries pushed by resubmissions go to the kernel first.
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submission failed while stopping: {e}");
            }
            self.ring.wait(STOP_WAIT_MS);
            let mut done = Done::default();
            let target = if abandoned { None } else { q.as_deref_mut() };
            self.reap(target, &mut done);
            if done.n > 0 {
                if let Some(q) = q.as_deref_mut() {
                    q.finish_batch(done.n, done.read, done.written);
                }
            }
        }
        self.cancelled = false;
        self.mem = None;
    }
}

impl GroupHandler for AioGroup {
    fn process(&mut self, queues: &mut [WorkerQueue], ctl: &WorkerCtl) -> Result<(), WorkerError> {
        let Some(q) = queues.first_mut() else {
            return Ok(());
        };
        q.queue.set_notification(false)?;
        let draining = ctl.draining();
        loop {
            if ctl.abandoned() {
                return Err(WorkerError::Abandoned);
            }
            self.blk.trace_refresh();
            let mut done = Done::default();
            self.reap(Some(q), &mut done);
            let filled = self.fill(q, ctl, &mut done);
            if matches!(filled, Err(WorkerError::Abandoned)) {
                return filled.map(drop);
            }
            let submitted = self.ring.submit().map_err(|e| {
                WorkerError::Device(DeviceFault(format!("io_uring submission failed: {e}")))
            });
            // A failure part-way still publishes what completed before it.
            if done.n > 0 {
                q.finish_batch(done.n, done.read, done.written);
            }
            let popped = filled?;
            submitted?;
            if done.n == 0 && popped == 0 {
                if !draining || self.busy == 0 {
                    return Ok(());
                }
                // Completing everything before the stop: wait for the disk.
                self.ring.wait(STOP_WAIT_MS);
            }
        }
    }

    fn has_work(&mut self, queues: &mut [WorkerQueue]) -> Result<bool, WorkerError> {
        if self.ring.has_completions() {
            return Ok(true);
        }
        for q in queues.iter() {
            if self.busy < depth(q) && q.queue.has_available()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Kicks are enabled only while a slot is free: with every slot busy the next
    /// completion wakes the worker (the eventfd), and the chains wait in the avail ring.
    fn arm(&mut self, queues: &mut [WorkerQueue]) -> Result<bool, WorkerError> {
        let mut work = self.ring.has_completions();
        for q in queues.iter_mut() {
            if self.busy < depth(q) {
                work |= q.queue.set_notification(true)?;
            }
        }
        Ok(work)
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.ring.eventfd())
    }

    fn stopped(&mut self, queues: &mut [WorkerQueue], ctl: &WorkerCtl) {
        self.wait_idle(queues.first_mut(), Some(ctl));
    }
}

impl Drop for AioGroup {
    fn drop(&mut self) {
        // Only reached with requests in flight when `stopped` did not run (a panic): the
        // memory they write into stays mapped (`self.mem`) until the kernel is done.
        if self.busy > 0 {
            self.wait_idle(None, None);
        }
    }
}
