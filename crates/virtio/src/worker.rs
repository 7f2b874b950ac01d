//! The queue worker: one thread that owns a group of virtqueues while it runs (DESIGN.md,
//! "Data path"). Most devices run one queue per worker; virtio-net runs a receive and a
//! transmit queue together, so a frame can move from one to the other without a hand-off.
//!
//! The worker waits on the group's kick eventfds (and an optional backend eventfd) with
//! epoll, asks its [`GroupHandler`] to process what is available, and optionally busy-polls
//! with kicks suppressed. [`ChainGroup`] is the handler of per-request devices (virtio-blk,
//! the net control queue): it drains the avail ring in batches, publishes used entries once
//! per batch and signals the call eventfd at most once per batch, honouring
//! VIRTIO_RING_F_EVENT_IDX / VRING_AVAIL_F_NO_INTERRUPT (or the packed ring's event
//! suppression).
//!
//! [`QueueWorker::spawn`] hands the queues to the worker; [`QueueWorker::stop`] takes them
//! back with their ring state, after the request being processed has completed. No lock is
//! taken per request.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::event::{eventfd, EventfdFlags};
use thiserror::Error;

use crate::chain::DescriptorChain;
use crate::interrupts::{Fired, VectorHandle};
use crate::queue::Virtqueue;
use crate::split::QueueError;
use crate::stats::QueueStatsRef;

/// A device's request processor for one queue, driven by [`ChainGroup`].
pub trait QueueHandler: Send {
    /// Processes one validated chain and returns the number of bytes written into its
    /// device-writable part (the used length). Request-level failures are reported to the
    /// driver in-band (for example a virtio-blk status byte) and return `Ok`.
    ///
    /// # Errors
    /// A [`DeviceFault`] for a failure the device cannot recover from: the queue stops and
    /// the device is marked DEVICE_NEEDS_RESET.
    fn handle(&mut self, chain: &DescriptorChain) -> Result<u32, DeviceFault>;

    /// Called once per batch, after its requests were handled and before used entries are
    /// published, for devices that complete I/O in batches. The default does nothing.
    ///
    /// # Errors
    /// As [`QueueHandler::handle`].
    fn end_batch(&mut self) -> Result<(), DeviceFault> {
        Ok(())
    }
}

/// What a worker runs over its queues.
///
/// # Contract
/// `queues` holds the group's queues that are ready, in index order; any subset of the
/// group may be present (a driver configures queues one at a time).
/// [`GroupHandler::process`] suppresses driver notifications while it works and leaves
/// them suppressed: a busy-polling worker keeps them off (so the driver neither kicks nor
/// has its ring cache lines written for nothing), and a worker about to sleep calls
/// [`GroupHandler::arm`] first.
pub trait GroupHandler: Send {
    /// Processes everything available, publishing used entries and signalling the driver
    /// (see [`WorkerQueue::finish_batch`]). Must check [`WorkerCtl::abandoned`] after any
    /// call that can block, and then return [`WorkerError::Abandoned`] without touching
    /// the rings again.
    ///
    /// # Errors
    /// A [`WorkerError`] stops the group and marks the device DEVICE_NEEDS_RESET.
    fn process(&mut self, queues: &mut [WorkerQueue], ctl: &WorkerCtl) -> Result<(), WorkerError>;

    /// Whether work is waiting, without blocking (used while busy-polling, with
    /// notifications suppressed).
    ///
    /// # Errors
    /// As [`GroupHandler::process`].
    fn has_work(&mut self, queues: &mut [WorkerQueue]) -> Result<bool, WorkerError> {
        for q in queues.iter() {
            if q.queue.has_available()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Enables the driver notifications the handler needs to be woken for, before the
    /// worker sleeps, and returns whether work arrived meanwhile (then the worker processes
    /// it instead of sleeping). The default enables every queue's.
    ///
    /// # Errors
    /// As [`GroupHandler::process`].
    fn arm(&mut self, queues: &mut [WorkerQueue]) -> Result<bool, WorkerError> {
        let mut work = false;
        for q in queues.iter_mut() {
            work |= q.queue.set_notification(true)?;
        }
        Ok(work)
    }

    /// An extra fd to wake on (edge-triggered), e.g. a backend's receive readiness.
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Called once when the worker ends, with the queues still owned (for handlers that
    /// hold resources tied to the run). A handler with requests still in flight (an
    /// asynchronous backend) completes them here before the queues, and so the guest
    /// memory their buffers point into, are handed back; it must check
    /// [`WorkerCtl::abandoned`] while it waits and, once set, stop touching the rings
    /// (but still wait for the I/O: the memory must stay mapped until it is done).
    fn stopped(&mut self, _queues: &mut [WorkerQueue], _ctl: &WorkerCtl) {}

    /// System calls the handler makes beyond the common data path, for the worker's
    /// seccomp filter ([`crate::sandbox`]). The default needs none.
    fn sandbox_needs(&self) -> crate::sandbox::Needs {
        crate::sandbox::Needs::empty()
    }
}

/// A device failure that stops the queue (the device needs a reset).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("Device fault: {0}")]
pub struct DeviceFault(pub String);

/// Why a worker stopped processing before it was asked to.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum WorkerError {
    /// The driver broke the ring.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceFault),
    /// The owner stopped waiting for this worker (see [`StopError::Stuck`]).
    #[error("Worker abandoned after a stuck request")]
    Abandoned,
    /// Waiting on or reading an eventfd failed.
    #[error("Waiting for kicks failed: {0}")]
    Wait(rustix::io::Errno),
    /// A guest memory region's fd shrank under its mapping (the frontend truncated it);
    /// the SIGBUS was contained ([`crate::fault`]) and the region now reads as zeros.
    #[error(
        "Guest memory region gpa {gpa:#x} size {size:#x} faulted (SIGBUS: its fd shrank); it now reads as zeros"
    )]
    MemoryFault {
        /// Guest physical address of the region.
        gpa: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// The worker made a system call outside its seccomp allow-list ([`crate::sandbox`],
    /// trap mode): the call failed with EPERM.
    #[error("Queue worker {worker} made a forbidden system call: {call}; the device is failed")]
    Forbidden {
        /// The worker thread's name (`blk0-q0`).
        worker: String,
        /// The call.
        call: crate::sandbox::Forbidden,
    },
    /// The worker could not install its seccomp filter.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// One virtqueue as a worker runs it: the ring and its eventfds and counters.
pub struct WorkerQueue {
    /// Virtqueue index within the device.
    pub index: u16,
    /// The ring.
    pub queue: Virtqueue,
    /// Kick eventfd (driver → device).
    pub kick: Arc<OwnedFd>,
    /// Call vector (device → driver); `None` means the driver polls.
    pub call: Option<VectorHandle>,
    /// Error eventfd signalled when the queue fails (vhost-user SET_VRING_ERR).
    pub err: Option<Arc<OwnedFd>>,
    /// Counters.
    pub stats: QueueStatsRef,
}

impl WorkerQueue {
    /// Publishes the used entries added since the last publish, adds `done` requests and
    /// the byte counts to the counters, and signals the driver if it wants a notification
    /// (the vector applies masking and coalescing, seed 001).
    pub fn finish_batch(&mut self, done: u64, read: u64, written: u64) {
        self.queue.publish_used();
        self.stats.requests.fetch_add(done, Ordering::Relaxed);
        self.stats.bytes_read.fetch_add(read, Ordering::Relaxed);
        self.stats
            .bytes_written
            .fetch_add(written, Ordering::Relaxed);
        self.notify();
    }

    /// Signals the driver for what was published, if its event suppression asks for it.
    pub fn notify(&mut self) {
        if self.queue.needs_notification() {
            if let Some(v) = &self.call {
                if v.fire() == Fired::Sent {
                    self.stats.calls.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else {
            self.stats.calls_suppressed.fetch_add(1, Ordering::Relaxed);
            if let Some(v) = &self.call {
                v.note_event_idx_suppressed();
            }
        }
    }
}

/// Everything a worker needs to run a group of queues.
pub struct WorkerParams {
    /// Thread name (shown by `ps`/`top`), e.g. `blk0-q0`.
    pub name: String,
    /// The queues, handed over to the worker (at least one).
    pub queues: Vec<WorkerQueue>,
    /// What processes them.
    pub handler: Box<dyn GroupHandler>,
    /// Called once, from the worker thread, when the group fails.
    pub on_error: Arc<dyn Fn(&WorkerError) + Send + Sync>,
    /// Adaptive busy-polling: after the rings run empty, keep looking at them for this long
    /// (with kicks suppressed) before sleeping in epoll. Zero turns polling off.
    pub poll: Duration,
    /// Kept alive for as long as the worker thread runs and dropped when it ends — also
    /// when its owner gave up on a stuck request (e.g. a resource-tracker reference to the
    /// device, so deleting the device waits for, and names, a worker still inside it).
    pub hold: Option<Box<dyn std::any::Any + Send>>,
}

/// What a stopped worker hands back.
pub struct WorkerExit {
    /// The queues with their ring state (`next_avail` is the vring base).
    pub queues: Vec<WorkerQueue>,
    /// The processor.
    pub handler: Box<dyn GroupHandler>,
    /// The failure that stopped processing, if any.
    pub error: Option<WorkerError>,
}

/// A running queue worker.
pub struct QueueWorker {
    thread: JoinHandle<WorkerExit>,
    stop: Arc<OwnedFd>,
    flags: Arc<WorkerCtl>,
}

/// How the owner tells the worker (and its handler) to stop.
#[derive(Debug, Default)]
pub struct WorkerCtl {
    stop: AtomicBool,
    drain: AtomicBool,
    /// The owner gave up waiting: the worker must not touch the rings again.
    abandoned: AtomicBool,
}

impl WorkerCtl {
    /// The owner gave up waiting for a stuck request: do not touch the rings again.
    #[inline]
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    /// The owner asked the worker to stop (handlers may end a long batch early).
    #[inline]
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The owner asked the worker to stop after completing every chain already in the
    /// avail rings ([`QueueWorker::stop_drained`]); set for the final
    /// [`GroupHandler::process`] call.
    #[inline]
    pub fn draining(&self) -> bool {
        self.drain.load(Ordering::Acquire) && self.stopping()
    }
}

/// Why a bounded stop did not hand the queue back.
#[derive(Debug)]
pub enum StopError {
    /// The worker thread panicked (a bug); the queue is lost.
    Panicked,
    /// The worker did not stop within the timeout (a backend request is stuck). It has
    /// been told to abandon the ring: when its request returns it exits without writing
    /// a used entry. The handle lets a caller wait for that (tests do).
    Stuck(JoinHandle<WorkerExit>),
}

const STOP: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;

/// Consecutive wake-ups by kicks that found no ring with new chains after which a worker
/// backs off ([`SPURIOUS_KICK_BACKOFF`]): a driver kicks when it adds work, so only a
/// frontend flooding the kick eventfd gets there.
pub const SPURIOUS_KICK_LIMIT: u32 = 64;
/// How long a worker sleeps before each further wake-up once [`SPURIOUS_KICK_LIMIT`]
/// empty kicks came in a row: a kick flood then costs the daemon at most one wake-up a
/// millisecond of that worker, instead of a CPU. A kick that brings work ends it.
pub const SPURIOUS_KICK_BACKOFF: Duration = Duration::from_millis(1);

impl QueueWorker {
    /// Starts a worker thread that owns `params.queues` until [`QueueWorker::stop`].
    ///
    /// # Errors
    /// Creating the stop eventfd, the epoll instance or the thread failed, or the
    /// seccomp filter did not compile.
    pub fn spawn(params: WorkerParams) -> io::Result<Self> {
        let filter = crate::sandbox::worker_filter(params.handler.sandbox_needs())
            .map_err(io::Error::other)?;
        let stop = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        for (k, q) in params.queues.iter().enumerate() {
            epoll::add(
                &ep,
                q.kick.as_fd(),
                epoll::EventData::new_u64(k as u64),
                epoll::EventFlags::IN,
            )?;
        }
        if let Some(fd) = params.handler.wake_fd() {
            epoll::add(
                &ep,
                fd,
                epoll::EventData::new_u64(WAKE),
                epoll::EventFlags::IN | epoll::EventFlags::ET,
            )?;
        }
        epoll::add(
            &ep,
            &stop,
            epoll::EventData::new_u64(STOP),
            epoll::EventFlags::IN,
        )?;
        let name = params.name.clone();
        let flags = Arc::new(WorkerCtl::default());
        let f = flags.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            // The thread keeps the stop eventfd open (and so registered in its epoll set)
            // even if the owner gives up on it (`stop_timeout`).
            .spawn({
                let stop = stop.clone();
                move || run(params, ep, &f, &stop, filter.as_deref())
            })?;
        Ok(Self {
            thread,
            stop,
            flags,
        })
    }

    /// Asks the worker to stop after the batch in progress and returns the queues. Chains
    /// still in the avail rings stay there (the vring base says where to resume).
    ///
    /// # Errors
    /// The worker thread panicked (a bug; the queues are lost).
    pub fn stop(self) -> Result<WorkerExit, String> {
        self.flags.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        self.thread
            .join()
            .map_err(|_| "queue worker panicked".to_string())
    }

    /// As [`QueueWorker::stop`], but first completes every chain already in the avail rings
    /// (at most one ring's worth), so a device going away answers the requests it was given.
    ///
    /// # Errors
    /// The worker thread panicked (a bug; the queues are lost).
    pub fn stop_drained(self) -> Result<WorkerExit, String> {
        self.flags.drain.store(true, Ordering::Release);
        self.stop()
    }

    /// As [`QueueWorker::stop`] (or [`QueueWorker::stop_drained`] with `drain`), waiting at
    /// most `timeout` for the request in progress: an unresponsive backend must not hang
    /// the frontend (seed 004).
    ///
    /// # Errors
    /// [`StopError::Stuck`] when the worker did not stop in time (the rings are abandoned;
    /// the caller marks the device DEVICE_NEEDS_RESET), [`StopError::Panicked`].
    pub fn stop_timeout(self, drain: bool, timeout: Duration) -> Result<WorkerExit, StopError> {
        if drain {
            self.flags.drain.store(true, Ordering::Release);
        }
        self.flags.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                self.flags.abandoned.store(true, Ordering::Release);
                if self.thread.is_finished() {
                    break;
                }
                return Err(StopError::Stuck(self.thread));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.thread.join().map_err(|_| StopError::Panicked)
    }
}

fn signal(fd: &OwnedFd) {
    // An eventfd write only fails when the counter would overflow, which means the
    // driver has 2^64 pending signals: nothing to add.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn drain(fd: &OwnedFd) -> Result<(), rustix::io::Errno> {
    let mut buf = [0u8; 8];
    match rustix::io::read(fd, &mut buf) {
        Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The [`GroupHandler`] of a per-request device: one queue, one [`QueueHandler`] call per
/// chain, completions published and signalled once per batch (at most one ring's worth).
pub struct ChainGroup {
    handler: Box<dyn QueueHandler>,
    chain: DescriptorChain,
}

impl ChainGroup {
    /// Wraps a per-chain handler.
    pub fn new(handler: Box<dyn QueueHandler>) -> Self {
        Self {
            handler,
            chain: DescriptorChain::default(),
        }
    }
}

/// What one batch completed.
#[derive(Default)]
struct Batch {
    done: usize,
    read: u64,
    written: u64,
}

impl ChainGroup {
    fn run_batch(
        &mut self,
        q: &mut WorkerQueue,
        ctl: &WorkerCtl,
        budget: usize,
        b: &mut Batch,
    ) -> Result<(), WorkerError> {
        while b.done < budget && q.queue.pop(&mut self.chain)? {
            let len = self.handler.handle(&self.chain)?;
            if ctl.abandoned() {
                // The owner gave up on us while the request ran: leave the ring alone.
                return Err(WorkerError::Abandoned);
            }
            q.queue.add_used(&self.chain, len);
            b.read += u64::from(self.chain.readable_len());
            b.written += u64::from(len);
            b.done += 1;
        }
        Ok(())
    }
}

impl GroupHandler for ChainGroup {
    fn process(&mut self, queues: &mut [WorkerQueue], ctl: &WorkerCtl) -> Result<(), WorkerError> {
        for q in queues.iter_mut() {
            let budget = usize::from(q.queue.size());
            q.queue.set_notification(false)?;
            loop {
                let mut batch = Batch::default();
                // A failure part-way still publishes what the batch completed before it,
                // so well-formed requests ahead of a hostile chain are answered.
                let outcome = self.run_batch(q, ctl, budget, &mut batch);
                if matches!(outcome, Err(WorkerError::Abandoned)) {
                    // The owner gave up on this worker: publish nothing, signal nothing.
                    return outcome;
                }
                if batch.done > 0 {
                    let ended = self.handler.end_batch();
                    q.finish_batch(batch.done as u64, batch.read, batch.written);
                    ended?;
                }
                outcome?;
                if batch.done < budget {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Spins on the rings for up to `p.poll` with kicks suppressed (as `process` left them);
/// returns whether work arrived.
fn poll_for_work(p: &mut WorkerParams, flags: &WorkerCtl) -> Result<bool, WorkerError> {
    if flags.abandoned() {
        return Ok(false);
    }
    let deadline = Instant::now() + p.poll;
    let mut spins = 0u32;
    loop {
        if p.handler.has_work(&mut p.queues)? {
            return Ok(true);
        }
        spins = spins.wrapping_add(1);
        // Reading the clock costs more than a ring check: look at it every 64 spins.
        if spins.is_multiple_of(64) && (flags.stopping() || Instant::now() >= deadline) {
            break;
        }
        std::hint::spin_loop();
    }
    Ok(false)
}

/// A contained SIGBUS in the memory of one of `queues`, checked only when the process-wide
/// fault generation moved since `seen` (one atomic load per call otherwise).
fn memory_fault(queues: &[WorkerQueue], seen: &mut u64) -> Option<WorkerError> {
    let g = crate::fault::generation();
    if g == *seen {
        return None;
    }
    *seen = g;
    queues
        .iter()
        .find_map(|q| q.queue.memory().faulted_region())
        .map(|(gpa, size)| WorkerError::MemoryFault { gpa, size })
}

/// A system call this worker thread was stopped from making since the last look (one
/// thread-local load when there is none).
fn forbidden(name: &str) -> Option<WorkerError> {
    crate::sandbox::take_forbidden().map(|call| WorkerError::Forbidden {
        worker: name.to_string(),
        call,
    })
}

/// A contained fault of this worker: a forbidden system call, or a SIGBUS in its memory.
fn contained(p: &WorkerParams, seen: &mut u64) -> Option<WorkerError> {
    forbidden(&p.name).or_else(|| memory_fault(&p.queues, seen))
}

/// Reports the group's failure; a contained fault (a forbidden system call, a memory
/// fault), if one happened, is the cause reported (it explains whatever the queue made of
/// the EPERM or the zeroed memory).
fn fail(p: &mut WorkerParams, error: &mut Option<WorkerError>, e: WorkerError, seen: &mut u64) {
    let e = match e {
        WorkerError::Abandoned
        | WorkerError::MemoryFault { .. }
        | WorkerError::Forbidden { .. }
        | WorkerError::Sandbox(_) => e,
        other => contained(p, seen).unwrap_or(other),
    };
    for q in &p.queues {
        q.stats.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(err) = &q.err {
            signal(err);
        }
    }
    (p.on_error)(&e);
    *error = Some(e);
}

fn run(
    mut p: WorkerParams,
    ep: OwnedFd,
    flags: &WorkerCtl,
    _stop: &OwnedFd,
    filter: Option<&crate::sandbox::Filter>,
) -> WorkerExit {
    let mut error: Option<WorkerError> = None;
    let mut events = [epoll::Event {
        flags: epoll::EventFlags::empty(),
        data: epoll::EventData::new_u64(0),
    }; 8];
    // Chains may already be waiting when the queues are (re)started: look before sleeping.
    let mut work = true;
    // Zero, so a worker started on memory that faulted earlier fails at its first batch.
    let mut faults_seen = 0u64;
    // Wake-ups in a row that were kicks only, with no new chain in any ring.
    let mut spurious = 0u32;
    // Before the first look at a ring: everything the worker does from here is filtered.
    if let Some(Err(e)) = filter.map(crate::sandbox::Filter::apply) {
        fail(&mut p, &mut error, e.into(), &mut faults_seen);
    }
    while !flags.stopping() {
        if work && error.is_none() {
            match p.handler.process(&mut p.queues, flags) {
                Err(e) => fail(&mut p, &mut error, e, &mut faults_seen),
                Ok(()) => {
                    if let Some(e) = contained(&p, &mut faults_seen) {
                        fail(&mut p, &mut error, e, &mut faults_seen);
                    }
                }
            }
        }
        work = false;
        // No busy-polling after an empty kick: a kick flood must not keep the worker spinning.
        if !p.poll.is_zero() && error.is_none() && spurious == 0 {
            match poll_for_work(&mut p, flags) {
                Ok(true) => {
                    work = true;
                    continue;
                }
                Ok(false) => {}
                Err(e) => fail(&mut p, &mut error, e, &mut faults_seen),
            }
        }
        if flags.stopping() {
            break;
        }
        // About to sleep: ask for kicks, and look once more (closing the race with a
        // driver that added work before it saw them enabled).
        if error.is_none() {
            if let Some(e) = contained(&p, &mut faults_seen) {
                fail(&mut p, &mut error, e, &mut faults_seen);
                continue;
            }
            match p.handler.arm(&mut p.queues) {
                Ok(true) => {
                    work = true;
                    continue;
                }
                Ok(false) => {}
                Err(e) => fail(&mut p, &mut error, e, &mut faults_seen),
            }
        }
        // Going idle: deliver a signal that coalescing held back.
        for q in &p.queues {
            if let Some(v) = &q.call {
                if v.flush() {
                    q.stats.calls.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let n = match epoll::wait(&ep, &mut events[..], None) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                error.get_or_insert(WorkerError::Wait(e));
                break;
            }
        };
        let (mut kicked, mut useful) = (false, false);
        for ev in events.iter().take(n) {
            match ev.data.u64() {
                STOP => useful = true,
                WAKE => {
                    work = true;
                    useful = true;
                }
                k => {
                    if let Some(q) = p.queues.get(k as usize) {
                        if let Err(e) = drain(&q.kick) {
                            error.get_or_insert(WorkerError::Wait(e));
                        }
                        // Counted once drained: a kick seen in the count is consumed, and
                        // the next one wakes the worker again.
                        q.stats.kicks.fetch_add(1, Ordering::Relaxed);
                        work = true;
                        kicked = true;
                        // A failed group serves nothing more; an error reading the ring is
                        // for `process` to report.
                        useful |= error.is_none() && !matches!(q.queue.has_available(), Ok(false));
                    }
                }
            }
        }
        if kicked && !useful {
            spurious = spurious.saturating_add(1);
            if spurious >= SPURIOUS_KICK_LIMIT && !flags.stopping() {
                std::thread::sleep(SPURIOUS_KICK_BACKOFF);
            }
        } else {
            spurious = 0;
        }
    }
    if flags.drain.load(Ordering::Acquire) && error.is_none() {
        if let Err(e) = p.handler.process(&mut p.queues, flags) {
            fail(&mut p, &mut error, e, &mut faults_seen);
        }
    }
    p.handler.stopped(&mut p.queues, flags);
    if let Some(e) = forbidden(&p.name) {
        // Too late to fail the device for it: say so, it is a gap in the allow-list.
        tracing::error!("{e} (while stopping)");
        error.get_or_insert(e);
    }
    WorkerExit {
        queues: p.queues,
        handler: p.handler,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemory, MemoryRegion};
    use crate::split::testing::DriverQueue;
    use crate::split::SplitQueue;
    use crate::stats::StatsTable;

    struct Echo;
    impl QueueHandler for Echo {
        fn handle(&mut self, chain: &DescriptorChain) -> Result<u32, DeviceFault> {
            Ok(chain.writable_len())
        }
    }

    fn one_queue(queue: SplitQueue, kick: Arc<OwnedFd>, table: &Arc<StatsTable>) -> WorkerQueue {
        WorkerQueue {
            index: 0,
            queue: Virtqueue::Split(queue),
            kick,
            call: None,
            err: None,
            stats: crate::stats::QueueStatsRef::new(table.clone(), 0).unwrap(),
        }
    }

    fn setup(poll: Duration) -> (DriverQueue, QueueWorker, Arc<OwnedFd>, Arc<StatsTable>) {
        let mem =
            Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, 1 << 20).unwrap()]).unwrap());
        let dq = DriverQueue::new(mem.clone(), 0x1000, 16);
        let queue = SplitQueue::new(&dq.config(false, false), mem).unwrap();
        let kick = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap());
        let table = StatsTable::new("t", 1).unwrap();
        let w = QueueWorker::spawn(WorkerParams {
            name: "test-q0".into(),
            queues: vec![one_queue(queue, kick.clone(), &table)],
            handler: Box::new(ChainGroup::new(Box::new(Echo))),
            on_error: Arc::new(|_| {}),
            poll,
            hold: None,
        })
        .unwrap();
        (dq, w, kick, table)
    }

    #[test]
    fn kicked_chains_complete_and_stop_returns_the_ring_state() {
        let (mut dq, w, kick, table) = setup(Duration::ZERO);
        for _ in 0..3 {
            dq.add_chain(&[(0x8_0000, 64, true)]);
        }
        dq.publish();
        rustix::io::write(&*kick, &1u64.to_ne_bytes()).unwrap();
        let mut seen = 0;
        for _ in 0..5000 {
            while dq.pop_used().is_some() {
                seen += 1;
            }
            if seen == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(seen, 3);
        let exit = w.stop().unwrap();
        assert_eq!(exit.queues[0].queue.next_avail(), 3);
        assert!(exit.error.is_none());
        assert_eq!(table.queue(0).unwrap().requests.load(Ordering::Relaxed), 3);
    }

    /// Kicks into an empty ring (a kick flood) make the worker back off after
    /// SPURIOUS_KICK_LIMIT of them in a row, and a kick with work is still served.
    #[test]
    fn empty_kicks_back_off_and_work_still_completes() {
        let (mut dq, w, kick, table) = setup(Duration::from_micros(32));
        let kicks = || table.queue(0).unwrap().kicks.load(Ordering::Relaxed);
        let extra = 100u64;
        let t0 = Instant::now();
        for i in 1..=u64::from(SPURIOUS_KICK_LIMIT) + extra {
            rustix::io::write(&*kick, &1u64.to_ne_bytes()).unwrap();
            // One wake-up per kick: wait until the worker took it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while kicks() < i {
                assert!(Instant::now() < deadline, "kick {i} not taken");
                std::thread::yield_now();
            }
        }
        dq.add_chain(&[(0x8_0000, 64, true)]);
        dq.publish();
        rustix::io::write(&*kick, &1u64.to_ne_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while dq.pop_used().is_none() {
            assert!(
                Instant::now() < deadline,
                "the chain after the flood was not served"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Each empty kick past the limit was followed by a back-off sleep (a lower bound:
        // a slow machine only takes longer).
        let floor = SPURIOUS_KICK_BACKOFF * (extra as u32 - 1);
        assert!(t0.elapsed() >= floor, "{:?} < {floor:?}", t0.elapsed());
        let exit = w.stop().unwrap();
        assert!(exit.error.is_none());
        assert_eq!(exit.queues[0].queue.next_avail(), 1);
    }

    /// A handler that says when it is entered and blocks until released.
    struct Stuck(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);
    impl QueueHandler for Stuck {
        fn handle(&mut self, _: &DescriptorChain) -> Result<u32, DeviceFault> {
            let _ = self.0.send(());
            let _ = self.1.recv();
            Ok(0)
        }
    }

    #[test]
    fn a_stuck_request_does_not_hang_stop_and_the_ring_is_left_alone() {
        let mem =
            Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, 1 << 20).unwrap()]).unwrap());
        let mut dq = DriverQueue::new(mem.clone(), 0x1000, 16);
        let queue = SplitQueue::new(&dq.config(false, false), mem).unwrap();
        let (release, rx) = std::sync::mpsc::channel();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let table = StatsTable::new("t", 1).unwrap();
        dq.add_chain(&[(0x8_0000, 16, true)]);
        dq.publish();
        let held = Arc::new(());
        let kick = Arc::new(eventfd(0, EventfdFlags::CLOEXEC).unwrap());
        let w = QueueWorker::spawn(WorkerParams {
            name: "stuck-q0".into(),
            queues: vec![one_queue(queue, kick, &table)],
            handler: Box::new(ChainGroup::new(Box::new(Stuck(entered_tx, rx)))),
            on_error: Arc::new(|_| {}),
            poll: Duration::ZERO,
            hold: Some(Box::new(held.clone())),
        })
        .unwrap();
        entered.recv().unwrap();
        let handle = match w.stop_timeout(false, Duration::from_millis(50)) {
            Err(StopError::Stuck(h)) => h,
            other => panic!("expected Stuck, got {:?}", other.map(|e| e.error)),
        };
        assert_eq!(
            Arc::strong_count(&held),
            2,
            "a stuck worker still holds what it was given"
        );
        release.send(()).unwrap();
        let exit = handle.join().unwrap();
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "released when the stuck worker ends"
        );
        assert_eq!(exit.error, Some(WorkerError::Abandoned));
        assert!(
            dq.pop_used().is_none(),
            "an abandoned worker wrote a used entry"
        );
    }

    /// A one-queue worker running `handler` (no polling) whose group errors arrive on the
    /// returned channel; also its kick eventfd and stats table.
    fn spawn_reporting(
        name: &str,
        queue: SplitQueue,
        handler: Box<dyn QueueHandler>,
    ) -> (
        QueueWorker,
        Arc<OwnedFd>,
        Arc<StatsTable>,
        std::sync::mpsc::Receiver<WorkerError>,
    ) {
        let kick = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap());
        let table = StatsTable::new("t", 1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let w = QueueWorker::spawn(WorkerParams {
            name: name.into(),
            queues: vec![one_queue(queue, kick.clone(), &table)],
            handler: Box::new(ChainGroup::new(handler)),
            on_error: Arc::new(move |e| {
                let _ = tx.lock().unwrap().send(e.clone());
            }),
            poll: Duration::ZERO,
            hold: None,
        })
        .unwrap();
        (w, kick, table, rx)
    }

    #[test]
    fn a_shrunk_memfd_fails_the_group_with_a_memory_fault() {
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
        let region = MemoryRegion::map(&fd, 0, 1 << 20, 0, 0).unwrap();
        let mem = Arc::new(GuestMemory::new(vec![region]).unwrap());
        let mut dq = DriverQueue::new(mem.clone(), 0x1000, 16);
        let queue = SplitQueue::new(&dq.config(false, false), mem).unwrap();
        let (w, kick, table, rx) = spawn_reporting("fault-q0", queue, Box::new(Echo));
        dq.add_chain(&[(0x8_0000, 64, true)]);
        dq.publish();
        rustix::fs::ftruncate(&fd, 0).unwrap();
        rustix::io::write(&*kick, &1u64.to_ne_bytes()).unwrap();
        let e = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let fault = WorkerError::MemoryFault {
            gpa: 0,
            size: 1 << 20,
        };
        assert_eq!(e, fault);
        assert_eq!(w.stop().unwrap().error, Some(fault));
        assert_eq!(table.queue(0).unwrap().errors.load(Ordering::Relaxed), 1);
    }

    /// A handler that makes a system call no worker needs.
    struct Rogue;
    impl QueueHandler for Rogue {
        fn handle(&mut self, chain: &DescriptorChain) -> Result<u32, DeviceFault> {
            // SAFETY: socket() takes integers and returns an fd or -1; a returned fd is
            // closed at once.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            if fd >= 0 {
                // SAFETY: `fd` was just returned to us and is not used again.
                unsafe { libc::close(fd) };
            }
            Ok(chain.writable_len())
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_forbidden_system_call_fails_the_group_and_names_the_call() {
        assert_eq!(crate::sandbox::mode(), crate::sandbox::Mode::Trap);
        let mem =
            Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, 1 << 20).unwrap()]).unwrap());
        let mut dq = DriverQueue::new(mem.clone(), 0x1000, 16);
        let queue = SplitQueue::new(&dq.config(false, false), mem).unwrap();
        let (w, kick, table, rx) = spawn_reporting("rogue-q0", queue, Box::new(Rogue));
        dq.add_chain(&[(0x8_0000, 64, true)]);
        dq.publish();
        rustix::io::write(&*kick, &1u64.to_ne_bytes()).unwrap();
        let e = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            e.to_string(),
            "Queue worker rogue-q0 made a forbidden system call: 41 (socket); the device is failed"
        );
        // The batch that made it was still answered; nothing after it is processed.
        assert!(dq.pop_used().is_some());
        assert!(matches!(
            w.stop().unwrap().error,
            Some(WorkerError::Forbidden { .. })
        ));
        assert_eq!(table.queue(0).unwrap().errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn stop_drained_completes_chains_that_were_never_kicked() {
        let (mut dq, w, _kick, _t) = setup(Duration::ZERO);
        for _ in 0..5 {
            dq.add_chain(&[(0x8_0000, 16, true)]);
        }
        dq.publish();
        let exit = w.stop_drained().unwrap();
        assert_eq!(exit.queues[0].queue.next_avail(), 5);
        let mut seen = 0;
        while dq.pop_used().is_some() {
            seen += 1;
        }
        assert_eq!(seen, 5);
    }

    #[test]
    fn busy_polling_finds_work_without_a_kick_and_suppresses_kicks() {
        // A long window, so the chain added below lands inside it however the threads run.
        let (mut dq, w, _kick, table) = setup(Duration::from_secs(20));
        dq.add_chain(&[(0x8_0000, 16, true)]);
        dq.publish();
        let mut done = false;
        for _ in 0..5000 {
            if dq.pop_used().is_some() {
                done = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(done, "a polling worker did not pick up an unkicked chain");
        assert_eq!(table.queue(0).unwrap().kicks.load(Ordering::Relaxed), 0);
        // While it polls, the driver is told not to kick.
        let mut suppressed = false;
        for _ in 0..5000 {
            if dq.used_flags() == crate::split::VRING_USED_F_NO_NOTIFY {
                suppressed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(suppressed);
        // stop() interrupts the polling window.
        let exit = w.stop().unwrap();
        assert_eq!(exit.queues[0].queue.next_avail(), 1);
    }
}
