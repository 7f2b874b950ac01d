//! The queue worker: one thread that owns one virtqueue while it runs (DESIGN.md, "Data
//! path"). It waits on the kick eventfd with epoll, drains the avail ring in batches,
//! publishes used entries once per batch and signals the call eventfd at most once per
//! batch, honouring VIRTIO_RING_F_EVENT_IDX / VRING_AVAIL_F_NO_INTERRUPT.
//!
//! [`QueueWorker::spawn`] hands the queue to the worker; [`QueueWorker::stop`] takes it
//! back with its ring state, after the request being processed has completed. No lock is
//! taken per request.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::event::{eventfd, EventfdFlags};
use thiserror::Error;

use crate::chain::DescriptorChain;
use crate::interrupts::{Fired, VectorHandle};
use crate::split::{QueueError, SplitQueue};
use crate::stats::QueueStatsRef;

/// A device's request processor for one queue.
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
}

/// Everything a worker needs to run one queue.
pub struct WorkerParams {
    /// Thread name (shown by `ps`/`top`), e.g. `blk0-q0`.
    pub name: String,
    /// The queue, handed over to the worker.
    pub queue: SplitQueue,
    /// Kick eventfd (driver → device).
    pub kick: Arc<OwnedFd>,
    /// Call eventfd (device → driver); `None` means the driver polls.
    pub call: Option<VectorHandle>,
    /// Error eventfd signalled when the queue fails (vhost-user SET_VRING_ERR).
    pub err: Option<Arc<OwnedFd>>,
    /// The device's request processor for this queue.
    pub handler: Box<dyn QueueHandler>,
    /// Counters.
    pub stats: QueueStatsRef,
    /// Called once, from the worker thread, when the queue fails.
    pub on_error: Arc<dyn Fn(&WorkerError) + Send + Sync>,
    /// Adaptive busy-polling: after the ring runs empty, keep looking at it for this long
    /// (with kicks suppressed) before sleeping in epoll. Zero turns polling off.
    pub poll: Duration,
    /// Kept alive for as long as the worker thread runs and dropped when it ends — also
    /// when its owner gave up on a stuck request (e.g. a resource-tracker reference to the
    /// device, so deleting the device waits for, and names, a worker still inside it).
    pub hold: Option<Box<dyn std::any::Any + Send>>,
}

/// What a stopped worker hands back.
pub struct WorkerExit {
    /// The queue with its ring state (`next_avail` is the vring base).
    pub queue: SplitQueue,
    /// The request processor.
    pub handler: Box<dyn QueueHandler>,
    /// The failure that stopped processing, if any.
    pub error: Option<WorkerError>,
}

/// A running queue worker.
pub struct QueueWorker {
    thread: JoinHandle<WorkerExit>,
    stop: Arc<OwnedFd>,
    flags: Arc<StopFlags>,
}

/// How the owner asks the worker to stop.
#[derive(Debug, Default)]
struct StopFlags {
    stop: AtomicBool,
    drain: AtomicBool,
    /// The owner gave up waiting: the worker must not touch the ring again.
    abandoned: AtomicBool,
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

const KICK: u64 = 0;
const STOP: u64 = 1;

impl QueueWorker {
    /// Starts a worker thread that owns `params.queue` until [`QueueWorker::stop`].
    ///
    /// # Errors
    /// Creating the stop eventfd, the epoll instance or the thread failed.
    pub fn spawn(params: WorkerParams) -> io::Result<Self> {
        let stop = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &ep,
            params.kick.as_fd(),
            epoll::EventData::new_u64(KICK),
            epoll::EventFlags::IN,
        )?;
        epoll::add(
            &ep,
            &stop,
            epoll::EventData::new_u64(STOP),
            epoll::EventFlags::IN,
        )?;
        let name = params.name.clone();
        let flags = Arc::new(StopFlags::default());
        let f = flags.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            // The thread keeps the stop eventfd open (and so registered in its epoll set)
            // even if the owner gives up on it (`stop_timeout`).
            .spawn({
                let stop = stop.clone();
                move || run(params, ep, &f, &stop)
            })?;
        Ok(Self {
            thread,
            stop,
            flags,
        })
    }

    /// Asks the worker to stop after the batch in progress and returns the queue. Chains
    /// still in the avail ring stay there (the vring base says where to resume).
    ///
    /// # Errors
    /// The worker thread panicked (a bug; the queue is lost).
    pub fn stop(self) -> Result<WorkerExit, String> {
        self.flags.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        self.thread
            .join()
            .map_err(|_| "queue worker panicked".to_string())
    }

    /// As [`QueueWorker::stop`], but first completes every chain already in the avail ring
    /// (at most one ring's worth), so a device going away answers the requests it was given.
    ///
    /// # Errors
    /// The worker thread panicked (a bug; the queue is lost).
    pub fn stop_drained(self) -> Result<WorkerExit, String> {
        self.flags.drain.store(true, Ordering::Release);
        self.flags.stop.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
        self.thread
            .join()
            .map_err(|_| "queue worker panicked".to_string())
    }

    /// As [`QueueWorker::stop`] (or [`QueueWorker::stop_drained`] with `drain`), waiting at
    /// most `timeout` for the request in progress: an unresponsive backend must not hang
    /// the frontend (seed 004).
    ///
    /// # Errors
    /// [`StopError::Stuck`] when the worker did not stop in time (the ring is abandoned;
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

/// Drains the ring until it is empty with notifications enabled.
fn process(
    p: &mut WorkerParams,
    chain: &mut DescriptorChain,
    flags: &StopFlags,
) -> Result<(), WorkerError> {
    let budget = usize::from(p.queue.size());
    loop {
        p.queue.set_notification(false)?;
        let mut batch = Batch::default();
        // A failure part-way still publishes what the batch completed before it, so
        // well-formed requests ahead of a hostile chain are answered.
        let outcome = run_batch(p, chain, flags, budget, &mut batch);
        if matches!(outcome, Err(WorkerError::Abandoned)) {
            // The owner gave up on this worker: publish nothing, signal nothing.
            return outcome;
        }
        if batch.done > 0 {
            let ended = p.handler.end_batch();
            finish_batch(p, &batch);
            ended?;
        }
        outcome?;
        if batch.done == budget {
            continue;
        }
        if !p.queue.set_notification(true)? {
            return Ok(());
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

fn run_batch(
    p: &mut WorkerParams,
    chain: &mut DescriptorChain,
    flags: &StopFlags,
    budget: usize,
    b: &mut Batch,
) -> Result<(), WorkerError> {
    while b.done < budget && p.queue.pop(chain)? {
        let len = p.handler.handle(chain)?;
        if flags.abandoned.load(Ordering::Acquire) {
            // The owner gave up on us while the request ran: leave the ring alone.
            return Err(WorkerError::Abandoned);
        }
        p.queue.add_used(chain.head(), len);
        b.read += u64::from(chain.readable_len());
        b.written += u64::from(len);
        b.done += 1;
    }
    Ok(())
}

/// Publishes a batch's used entries and signals the driver if it wants it.
fn finish_batch(p: &mut WorkerParams, b: &Batch) {
    p.queue.publish_used();
    p.stats.requests.fetch_add(b.done as u64, Ordering::Relaxed);
    p.stats.bytes_read.fetch_add(b.read, Ordering::Relaxed);
    p.stats
        .bytes_written
        .fetch_add(b.written, Ordering::Relaxed);
    if p.queue.needs_notification() {
        // The vector applies masking and coalescing (seed 001).
        if let Some(v) = &p.call {
            if v.fire() == Fired::Sent {
                p.stats.calls.fetch_add(1, Ordering::Relaxed);
            }
        }
    } else {
        p.stats.calls_suppressed.fetch_add(1, Ordering::Relaxed);
        if let Some(v) = &p.call {
            v.note_event_idx_suppressed();
        }
    }
}

/// Spins on the avail ring for up to `p.poll` with kicks suppressed; returns whether work
/// arrived (kicks stay suppressed then, as `process` wants them).
fn poll_for_work(p: &mut WorkerParams, flags: &StopFlags) -> Result<bool, WorkerError> {
    if flags.abandoned.load(Ordering::Acquire) {
        return Ok(false);
    }
    p.queue.set_notification(false)?;
    let deadline = Instant::now() + p.poll;
    loop {
        if p.queue.available()? > 0 {
            return Ok(true);
        }
        if flags.stop.load(Ordering::Acquire) || Instant::now() >= deadline {
            break;
        }
        std::hint::spin_loop();
    }
    Ok(p.queue.set_notification(true)?)
}

fn fail(p: &mut WorkerParams, error: &mut Option<WorkerError>, e: WorkerError) {
    p.stats.errors.fetch_add(1, Ordering::Relaxed);
    if let Some(err) = &p.err {
        signal(err);
    }
    (p.on_error)(&e);
    *error = Some(e);
}

fn run(mut p: WorkerParams, ep: OwnedFd, flags: &StopFlags, _stop: &OwnedFd) -> WorkerExit {
    let mut chain = DescriptorChain::default();
    let mut error: Option<WorkerError> = None;
    let mut events = [epoll::Event {
        flags: epoll::EventFlags::empty(),
        data: epoll::EventData::new_u64(0),
    }; 2];
    // Chains may already be waiting when the queue is (re)started: look before sleeping.
    let mut work = true;
    while !flags.stop.load(Ordering::Acquire) {
        if work && error.is_none() {
            if let Err(e) = process(&mut p, &mut chain, flags) {
                fail(&mut p, &mut error, e);
            }
        }
        work = false;
        if !p.poll.is_zero() && error.is_none() {
            match poll_for_work(&mut p, flags) {
                Ok(true) => {
                    work = true;
                    continue;
                }
                Ok(false) => {}
                Err(e) => fail(&mut p, &mut error, e),
            }
        }
        if flags.stop.load(Ordering::Acquire) {
            break;
        }
        // Going idle: deliver a signal that coalescing held back.
        if let Some(v) = &p.call {
            if v.flush() {
                p.stats.calls.fetch_add(1, Ordering::Relaxed);
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
        for ev in events.iter().take(n) {
            if ev.data.u64() == KICK {
                p.stats.kicks.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = drain(&p.kick) {
                    error.get_or_insert(WorkerError::Wait(e));
                }
                work = true;
            }
        }
    }
    if flags.drain.load(Ordering::Acquire) && error.is_none() {
        if let Err(e) = process(&mut p, &mut chain, flags) {
            fail(&mut p, &mut error, e);
        }
    }
    WorkerExit {
        queue: p.queue,
        handler: p.handler,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemory, MemoryRegion};
    use crate::split::testing::DriverQueue;
    use crate::stats::StatsTable;

    struct Echo;
    impl QueueHandler for Echo {
        fn handle(&mut self, chain: &DescriptorChain) -> Result<u32, DeviceFault> {
            Ok(chain.writable_len())
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
            queue,
            kick: kick.clone(),
            call: None,
            err: None,
            handler: Box::new(Echo),
            stats: crate::stats::QueueStatsRef::new(table.clone(), 0).unwrap(),
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
        assert_eq!(exit.queue.next_avail(), 3);
        assert!(exit.error.is_none());
        assert_eq!(table.queue(0).unwrap().requests.load(Ordering::Relaxed), 3);
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
        let w = QueueWorker::spawn(WorkerParams {
            name: "stuck-q0".into(),
            queue,
            kick: Arc::new(eventfd(0, EventfdFlags::CLOEXEC).unwrap()),
            call: None,
            err: None,
            handler: Box::new(Stuck(entered_tx, rx)),
            stats: crate::stats::QueueStatsRef::new(table, 0).unwrap(),
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

    #[test]
    fn stop_drained_completes_chains_that_were_never_kicked() {
        let (mut dq, w, _kick, _t) = setup(Duration::ZERO);
        for _ in 0..5 {
            dq.add_chain(&[(0x8_0000, 16, true)]);
        }
        dq.publish();
        let exit = w.stop_drained().unwrap();
        assert_eq!(exit.queue.next_avail(), 5);
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
        assert_eq!(exit.queue.next_avail(), 1);
    }
}
