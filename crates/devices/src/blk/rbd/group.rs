//! [`RbdGroup`]: the [`GroupHandler`] of one virtio-blk queue over an RBD image, many
//! requests in flight, completed in whatever order librbd answers.
//!
//! # Requests
//! Each chain popped from the avail ring is taken into a *slot* (at most [`MAX_DEPTH`] and
//! the ring size in flight; the rest wait in the ring, kicks off, until a completion frees
//! a slot). A slot owns the chain and the iovec array of its data buffers, which point
//! straight into guest memory: librbd reads into them and writes from them, no copy of
//! ours in between, and keeps pointers to both until the operation completes (slots are
//! neither reused nor moved in memory meanwhile: a `Vec`'s buffer stays put when the slot
//! moves).
//!
//! - IN / OUT: `rbd_aio_readv` / `rbd_aio_writev` of the whole request (at most
//!   [`IOV_MAX`] segments, which `seg_max` keeps every driver under).
//! - FLUSH: `rbd_aio_flush`.
//! - DISCARD: one `rbd_aio_discard` per segment of the table, one after the other.
//! - WRITE_ZEROES: one `rbd_aio_write_zeroes` per segment, thick-provisioned unless the
//!   driver set VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
//! - GET_ID, and requests the parser rejects (a range past the capacity, a write to a
//!   read-only device, an unknown type), are answered synchronously by [`BlkQueue`] with
//!   the status the other backends give.
//!
//! A negative result fails the request with VIRTIO_BLK_S_IOERR (`-ETIMEDOUT` after the
//! `timeout` attribute's `rados_osd_op_timeout` included), except a discard that librbd
//! does not support, which is a no-op (a discard is a hint).
//!
//! # Completions
//! librbd runs each operation's callback on one of its own threads. The callback
//! ([`on_complete`]) takes the result, releases the librbd completion, pushes
//! `(slot, result)` into the group's [`Sink`] (a mutex-guarded vector, held for one push)
//! and, if it is the first push since the worker last looked, writes the sink's eventfd,
//! which is the group's [`GroupHandler::wake_fd`]. The worker swaps the vector out and finishes those requests on its own thread; only it
//! touches the rings. Each operation's callback argument is a boxed reference to the sink,
//! so a callback that comes late never sees freed memory.
//!
//! # Stopping with requests in flight
//! As for the io_uring group: the group holds the queue's [`GuestMemory`] while anything
//! is in flight; [`GroupHandler::stopped`] waits until nothing is (publishing the used
//! entries, or, once the owner abandoned the ring, no longer touching it but still
//! waiting, since librbd may still write into guest memory); dropping the group waits too.
//! librbd has no cancellation; every wait is bounded by `rados_osd_op_timeout`.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};
use uvdpa_virtio::worker::{GroupHandler, WorkerCtl, WorkerError, WorkerQueue};
use uvdpa_virtio::{DescriptorChain, GuestMemory, Segment};

use super::super::backend::IOV_MAX;
use super::super::queue::{select, BlkQueue};
use super::super::request::{
    parse, status, zero_segment, Request, RequestError, HEADER_LEN, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};
use super::ffi::{self, AioOp, CompletionT, Image};

/// Most requests one queue has at librbd at once.
pub(crate) const MAX_DEPTH: usize = 256;
/// How long one wait for completions lasts while stopping, before the abandon flag is
/// looked at again.
const STOP_WAIT: Duration = Duration::from_millis(10);

/// Where librbd's callbacks leave completions for the worker.
///
/// The eventfd is written once per batch, not once per completion: the first push after
/// the worker's last take writes it, later pushes only queue. Writing and clearing it under
/// the same lock as the queue keeps the two in step (a write never lands after the take
/// that cleared its flag), so the worker reads the eventfd only when it was written and
/// never spins on a stale count.
#[derive(Debug)]
pub(super) struct Sink {
    /// Readable while [`Completed::signalled`]; the worker's wake-up.
    efd: OwnedFd,
    done: Mutex<Completed>,
}

/// The completions a [`Sink`] holds.
#[derive(Debug, Default)]
struct Completed {
    /// `(slot, result)` of the operations over since the worker last looked.
    ops: Vec<(usize, isize)>,
    /// The eventfd was written since the last take.
    signalled: bool,
}

impl Sink {
    fn new() -> io::Result<Self> {
        Ok(Self {
            efd: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            done: Mutex::new(Completed::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Completed> {
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, slot: usize, result: isize) {
        let mut d = self.lock();
        d.ops.push((slot, result));
        if !std::mem::replace(&mut d.signalled, true) {
            // A full counter (never, at 2^64 - 2) or EAGAIN still leaves it readable.
            let _ = rustix::io::write(&self.efd, &1u64.to_ne_bytes());
        }
    }

    /// Takes what is queued, clearing the eventfd if a push wrote it (a push after the
    /// take writes it again).
    fn take(&self, into: &mut Vec<(usize, isize)>) {
        let mut d = self.lock();
        if std::mem::take(&mut d.signalled) {
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&self.efd, &mut b);
        }
        std::mem::swap(&mut d.ops, into);
    }

    fn pending(&self) -> bool {
        !self.lock().ops.is_empty()
    }

    /// Waits up to `t` for the eventfd.
    fn wait(&self, t: Duration) {
        let mut fds = [rustix::event::PollFd::new(
            &self.efd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
    }
}

/// The callback argument of one operation.
struct CbArg {
    sink: Arc<Sink>,
    slot: usize,
}

/// librbd's completion callback (on a librbd thread).
///
/// # Safety
/// `arg` is a `Box<CbArg>` leaked by [`RbdGroup::submit`] for this operation only.
unsafe extern "C" fn on_complete(c: CompletionT, arg: *mut std::ffi::c_void) {
    // SAFETY: `c` is this callback's completion, not used again.
    let result = unsafe { ffi::finish(c) };
    if arg.is_null() {
        return;
    }
    // SAFETY: see the function's contract: the box is taken back exactly once, here.
    let arg = unsafe { Box::from_raw(arg.cast::<CbArg>()) };
    arg.sink.push(arg.slot, result);
}

/// What a slot's request has at librbd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Op {
    /// Nothing (a free slot).
    #[default]
    Idle,
    Read,
    Write,
    Flush,
    /// Segment `seg` (of `count`) of a discard or write-zeroes table.
    Zero {
        write_zeroes: bool,
        seg: usize,
        count: usize,
    },
}

/// One request in flight.
#[derive(Debug, Default)]
struct Slot {
    chain: DescriptorChain,
    /// The data buffers (iovecs for librbd).
    iov: Vec<Segment>,
    offset: u64,
    /// Data bytes of a read.
    len: usize,
    op: Op,
    started: Option<Instant>,
}

/// What a request needs next.
enum Step {
    /// An operation is at librbd.
    Pending,
    /// Over: status byte and data bytes written to the writable part.
    Done(u8, usize),
}

/// How a request started.
enum Started {
    /// Its operation is at librbd.
    Pending,
    /// Answered synchronously by the queue handler (status written, counted there): the
    /// used length.
    Sync(u32),
    /// Over already (librbd refused it): status and used length.
    Done(u8, u32),
}

/// Requests completed in one pass.
#[derive(Default)]
struct Done {
    n: u64,
    read: u64,
    written: u64,
}

/// The [`GroupHandler`] of one virtio-blk queue over an RBD image (see the module docs).
pub(crate) struct RbdGroup {
    blk: BlkQueue,
    image: Arc<Image>,
    sink: Arc<Sink>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    busy: usize,
    /// The guest memory of the requests in flight, kept mapped until they complete.
    mem: Option<Arc<GuestMemory>>,
    /// Scratch for [`Sink::take`].
    reaped: Vec<(usize, isize)>,
}

impl fmt::Debug for RbdGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RbdGroup")
            .field("slots", &self.slots.len())
            .field("busy", &self.busy)
            .finish()
    }
}

/// Requests one queue may have in flight.
fn depth(q: &WorkerQueue) -> usize {
    usize::from(q.queue.size()).clamp(1, MAX_DEPTH)
}

impl RbdGroup {
    /// A group over `blk`'s RBD backend.
    ///
    /// # Errors
    /// The backend is not RBD, or no eventfd could be made.
    pub(crate) fn new(blk: BlkQueue) -> io::Result<Self> {
        let image = blk
            .shared()
            .backend
            .rbd()
            .map(|d| d.image.clone())
            .ok_or_else(|| io::Error::other("the RBD group serves only rbd backends"))?;
        Ok(Self {
            blk,
            image,
            sink: Arc::new(Sink::new()?),
            slots: Vec::new(),
            free: Vec::new(),
            busy: 0,
            mem: None,
            reaped: Vec::new(),
        })
    }

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

    /// Writes slot `i`'s status byte; returns its used length.
    fn finish(&mut self, i: usize, st: u8, written: usize) -> u32 {
        let Some(slot) = self.slots.get_mut(i) else {
            return 0;
        };
        slot.op = Op::Idle;
        let Some(status_at) = slot.chain.writable_len().checked_sub(1) else {
            return 0;
        };
        slot.chain.write_at(status_at as usize, &[st]);
        u32::try_from(written).unwrap_or(status_at).min(status_at) + 1
    }

    /// Adds slot `i`'s used entry (unless `q` is `None`: an abandoned ring) and frees it.
    fn complete(
        &mut self,
        q: Option<&mut WorkerQueue>,
        i: usize,
        st: u8,
        used: u32,
        done: &mut Done,
    ) {
        let started = self.slots.get_mut(i).and_then(|s| s.started.take());
        if let (Some(q), Some(slot)) = (q, self.slots.get(i)) {
            if let Some(t) = started {
                self.blk.completed(q.index, &slot.chain, t, st);
            }
            q.queue.add_used(&slot.chain, used);
            done.n += 1;
            done.read += u64::from(slot.chain.readable_len());
            done.written += u64::from(used);
        }
        self.free.push(i);
    }

    /// Hands slot `i`'s current operation to librbd.
    fn submit(&mut self, i: usize) -> io::Result<()> {
        let limits = self.blk.limits();
        let slot = self
            .slots
            .get(i)
            .ok_or_else(|| io::Error::other("no such slot"))?;
        let iovcnt = || {
            i32::try_from(slot.iov.len())
                .ok()
                .filter(|&n| n > 0 && slot.iov.len() <= IOV_MAX)
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} data segments (1..={IOV_MAX})", slot.iov.len()),
                    )
                })
        };
        let iov = slot.iov.as_ptr().cast::<libc::iovec>();
        let op = match slot.op {
            Op::Read => AioOp::Readv {
                iov,
                iovcnt: iovcnt()?,
                off: slot.offset,
            },
            Op::Write => AioOp::Writev {
                iov,
                iovcnt: iovcnt()?,
                off: slot.offset,
            },
            Op::Flush => AioOp::Flush,
            Op::Zero {
                write_zeroes, seg, ..
            } => {
                // Re-read and re-checked: the driver may have changed the table meanwhile.
                let r = zero_segment(&slot.chain, seg, write_zeroes, &limits)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
                if write_zeroes {
                    AioOp::WriteZeroes {
                        off: r.offset,
                        len: usize::try_from(r.len).map_err(io::Error::other)?,
                        thick: !r.unmap,
                    }
                } else {
                    AioOp::Discard {
                        off: r.offset,
                        len: r.len,
                    }
                }
            }
            Op::Idle => return Err(io::Error::other("idle slot submitted")),
        };
        let arg = Box::into_raw(Box::new(CbArg {
            sink: self.sink.clone(),
            slot: i,
        }));
        // SAFETY: `arg` is the `CbArg` box `on_complete` expects. For reads and writes the
        // iovec array is the slot's `iov`, neither touched nor freed until this
        // operation's completion is reaped (slots never shrink; a Vec's buffer does not
        // move with it), and `Segment` is layout-identical to `iovec` (asserted in
        // `backend`). The buffers are guest memory validated by the queue and kept mapped
        // by `self.mem` (set before any submission) until the request completes; guest
        // memory is never a Rust object.
        let r = unsafe { self.image.aio(op, on_complete, arg.cast()) };
        if r.is_err() {
            // SAFETY: the operation was refused, so the callback will never run: the box
            // is taken back here, once.
            drop(unsafe { Box::from_raw(arg) });
        }
        r
    }

    /// Logs a failed request and returns its status.
    fn failed(&self, i: usize, e: RequestError) -> Step {
        let head = self.slots.get(i).map_or(0, |s| s.chain.head());
        self.blk.log_failure(head, &e);
        Step::Done(status(&e), 0)
    }

    fn push(&mut self, i: usize) -> Step {
        match self.submit(i) {
            Ok(()) => Step::Pending,
            Err(e) => self.failed(i, RequestError::Io(e)),
        }
    }

    /// Moves a discard/write-zeroes request to its next non-empty segment (`first`: its
    /// first) and submits it.
    fn next_zero(&mut self, i: usize, first: bool) -> Step {
        let limits = self.blk.limits();
        let Some(slot) = self.slots.get_mut(i) else {
            return Step::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        let Op::Zero {
            write_zeroes,
            mut seg,
            count,
        } = slot.op
        else {
            return Step::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        if !first {
            seg += 1;
        }
        loop {
            if seg >= count {
                return Step::Done(VIRTIO_BLK_S_OK, 0);
            }
            match zero_segment(&slot.chain, seg, write_zeroes, &limits) {
                Ok(r) if r.len == 0 => seg += 1,
                Ok(_) => break,
                Err(e) => return self.failed(i, e),
            }
        }
        slot.op = Op::Zero {
            write_zeroes,
            seg,
            count,
        };
        self.push(i)
    }

    /// Starts the request just popped into slot `i`.
    fn start(&mut self, i: usize) -> Started {
        let limits = self.blk.limits();
        let Some(slot) = self.slots.get_mut(i) else {
            return Started::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        let chain = &slot.chain;
        let req = match chain.writable_len() {
            0 => None,
            _ => parse(chain, &limits).ok(),
        };
        slot.len = 0;
        if let Some(Request::In { len: 0, .. } | Request::Out { len: 0, .. }) = req {
            // Nothing to move: done, as on every backend.
            return Started::Done(VIRTIO_BLK_S_OK, self.finish(i, VIRTIO_BLK_S_OK, 0));
        }
        slot.op = match req {
            Some(Request::In { offset, len }) if len > 0 => {
                select(&mut slot.iov, chain.writable(), 0, len);
                slot.offset = offset;
                slot.len = len;
                Op::Read
            }
            Some(Request::Out { offset, len }) if len > 0 => {
                select(&mut slot.iov, chain.readable(), HEADER_LEN, len);
                slot.offset = offset;
                Op::Write
            }
            Some(Request::Flush) => Op::Flush,
            Some(Request::Discard { count } | Request::WriteZeroes { count }) => Op::Zero {
                write_zeroes: matches!(req, Some(Request::WriteZeroes { .. })),
                seg: 0,
                count,
            },
            // GET_ID, and requests that fail parsing (the synchronous
            // path writes their status without touching the backend).
            _ => Op::Idle,
        };
        if slot.op == Op::Idle {
            let chain = &slot.chain;
            return Started::Sync(self.blk.handle_on(self.blk.index(), chain));
        }
        let step = if matches!(slot.op, Op::Zero { .. }) {
            self.next_zero(i, true)
        } else {
            self.push(i)
        };
        match step {
            Step::Pending => Started::Pending,
            Step::Done(st, written) => Started::Done(st, self.finish(i, st, written)),
        }
    }

    /// What slot `i` does after its operation completed with `result`.
    fn advance(&mut self, i: usize, result: isize) -> Step {
        let Some(slot) = self.slots.get(i) else {
            return Step::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        let op = slot.op;
        let len = slot.len;
        if result < 0 {
            let errno = i32::try_from(result.saturating_neg()).unwrap_or(libc::EIO);
            if matches!(
                op,
                Op::Zero {
                    write_zeroes: false,
                    ..
                }
            ) && errno == libc::EOPNOTSUPP
            {
                // A discard the image cannot do is a no-op (a hint).
                return self.next_zero(i, false);
            }
            return self.failed(i, RequestError::Io(io::Error::from_raw_os_error(errno)));
        }
        match op {
            Op::Read => Step::Done(VIRTIO_BLK_S_OK, len),
            Op::Write | Op::Flush => Step::Done(VIRTIO_BLK_S_OK, 0),
            Op::Zero { .. } => self.next_zero(i, false),
            Op::Idle => Step::Done(VIRTIO_BLK_S_IOERR, 0),
        }
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
            // The memory must be held before librbd can see a request.
            if self.mem.is_none() {
                self.mem = Some(q.queue.memory().clone());
            }
            let started = Instant::now();
            let (st, used, counted) = match self.start(i) {
                Started::Pending => {
                    if let Some(slot) = self.slots.get_mut(i) {
                        slot.started = Some(started);
                    }
                    self.busy += 1;
                    continue;
                }
                // Counted (latency, trace) by the queue handler already.
                Started::Sync(used) => (VIRTIO_BLK_S_OK, used, true),
                Started::Done(st, used) => (st, used, false),
            };
            if ctl.abandoned() {
                self.free.push(i);
                return Err(WorkerError::Abandoned);
            }
            if let Some(slot) = self.slots.get_mut(i) {
                slot.started = (!counted).then_some(started);
            }
            self.complete(Some(q), i, st, used, done);
        }
        if self.busy == 0 {
            self.mem = None;
        }
        Ok(popped)
    }

    /// Handles every completion waiting. With `q == None` (the ring was abandoned)
    /// requests end at their current operation and nothing is written to the ring.
    fn reap(&mut self, mut q: Option<&mut WorkerQueue>, done: &mut Done) {
        let mut reaped = std::mem::take(&mut self.reaped);
        self.sink.take(&mut reaped);
        for &(i, result) in &reaped {
            let step = if q.is_some() {
                self.advance(i, result)
            } else {
                Step::Done(VIRTIO_BLK_S_IOERR, 0)
            };
            if let Step::Done(st, written) = step {
                let used = self.finish(i, st, written);
                self.busy = self.busy.saturating_sub(1);
                self.complete(q.as_deref_mut(), i, st, used, done);
            }
        }
        reaped.clear();
        self.reaped = reaped;
        if self.busy == 0 {
            self.mem = None;
        }
    }

    /// Waits until nothing is in flight, publishing completions to `q` unless `ctl` says
    /// the ring was abandoned (the wait goes on then: librbd may still write into guest
    /// memory).
    fn wait_idle(&mut self, mut q: Option<&mut WorkerQueue>, ctl: Option<&WorkerCtl>) {
        while self.busy > 0 {
            let abandoned = ctl.map_or(true, WorkerCtl::abandoned);
            self.sink.wait(STOP_WAIT);
            let mut done = Done::default();
            let target = if abandoned { None } else { q.as_deref_mut() };
            self.reap(target, &mut done);
            if done.n > 0 {
                if let Some(q) = q.as_deref_mut() {
                    q.finish_batch(done.n, done.read, done.written);
                }
            }
        }
        self.mem = None;
    }
}

impl GroupHandler for RbdGroup {
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
            if done.n > 0 {
                q.finish_batch(done.n, done.read, done.written);
            }
            let popped = filled?;
            if done.n == 0 && popped == 0 {
                if !draining || self.busy == 0 {
                    return Ok(());
                }
                self.sink.wait(STOP_WAIT);
            }
        }
    }

    fn has_work(&mut self, queues: &mut [WorkerQueue]) -> Result<bool, WorkerError> {
        if self.sink.pending() {
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
        let mut work = self.sink.pending();
        for q in queues.iter_mut() {
            if self.busy < depth(q) {
                work |= q.queue.set_notification(true)?;
            }
        }
        Ok(work)
    }

    fn sandbox_needs(&self) -> uvdpa_virtio::sandbox::Needs {
        // librbd aio submission and completion polling run on the worker.
        uvdpa_virtio::sandbox::Needs::LIBRBD
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.sink.efd.as_fd())
    }

    fn stopped(&mut self, queues: &mut [WorkerQueue], ctl: &WorkerCtl) {
        self.wait_idle(queues.first_mut(), Some(ctl));
    }
}

impl Drop for RbdGroup {
    fn drop(&mut self) {
        // Only reached with requests in flight when `stopped` did not run (a panic): the
        // memory librbd writes into stays mapped (`self.mem`) until it is done.
        if self.busy > 0 {
            self.wait_idle(None, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Completions pushed from other threads (as librbd's callbacks do) wake the eventfd
    /// and are all taken, none twice.
    #[test]
    fn the_sink_delivers_every_completion_once_and_wakes_the_worker() {
        let sink = Arc::new(Sink::new().unwrap());
        assert!(!sink.pending());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        s.push(t * 100 + i, isize::try_from(i).unwrap());
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        let mut batch = Vec::new();
        while got.len() < 400 {
            sink.wait(Duration::from_secs(5));
            sink.take(&mut batch);
            got.append(&mut batch);
        }
        for t in threads {
            t.join().unwrap();
        }
        sink.take(&mut batch);
        got.append(&mut batch);
        got.sort_unstable();
        let want: Vec<(usize, isize)> = (0..4)
            .flat_map(|t| (0..100).map(move |i| (t * 100 + i, i as isize)))
            .collect();
        assert_eq!(got, want);
        assert!(!sink.pending());
        // Taking cleared the eventfd: nothing wakes a worker now.
        let mut b = [0u8; 8];
        assert!(rustix::io::read(&sink.efd, &mut b).is_err());
    }

    /// A batch of completions writes the eventfd once; the first push after a take
    /// writes it again.
    #[test]
    fn the_sink_signals_once_per_batch() {
        let sink = Sink::new().unwrap();
        let count = |s: &Sink| {
            let mut b = [0u8; 8];
            rustix::io::read(&s.efd, &mut b).map_or(0, |_| u64::from_ne_bytes(b))
        };
        let mut batch = Vec::new();
        for i in 0..5 {
            sink.push(i, 0);
        }
        sink.take(&mut batch);
        assert_eq!(batch.len(), 5);
        assert_eq!(count(&sink), 0, "the take left the eventfd readable");
        sink.push(9, 0);
        sink.push(10, 0);
        assert_eq!(count(&sink), 1, "two pushes after a take: one write");
    }
}
