//! A per-queue io_uring (Linux ≥ 5.6: READV, WRITEV, FSYNC, FALLOCATE, ASYNC_CANCEL) with
//! an eventfd registered for completions, so a queue worker sleeping in epoll wakes when
//! the disk answers ([`uvdpa_virtio::worker::GroupHandler::wake_fd`]).
//!
//! The ring is sized for [`MAX_DEPTH`] requests in flight, each with at most one operation
//! submitted at a time, plus one cancellation: the submission queue can never be full when
//! a request is pushed, and the completion queue (twice the submission queue) never
//! overflows.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use io_uring::{opcode, squeue, IoUring};
use rustix::event::{eventfd, EventfdFlags};

/// Most requests one queue has at the disk at once; more wait in the avail ring.
pub(crate) const MAX_DEPTH: usize = 128;
/// Submission queue entries: room for every request's operation and a cancellation.
const SQ_ENTRIES: u32 = 2 * MAX_DEPTH as u32;
/// `user_data` of the cancellation request (slot indices are below [`MAX_DEPTH`]).
pub(crate) const CANCEL_TAG: u64 = u64::MAX;

/// One completed operation: the slot it belongs to and the kernel's result (bytes, or a
/// negated errno).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    /// `user_data` given at submission.
    pub(crate) tag: u64,
    /// Result of the operation.
    pub(crate) result: i32,
}

/// An io_uring instance with its completion eventfd.
pub(crate) struct Uring {
    ring: IoUring,
    eventfd: OwnedFd,
    /// Entries pushed and not yet handed to the kernel.
    unsubmitted: usize,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("fd", &self.ring.as_raw_fd())
            .field("unsubmitted", &self.unsubmitted)
            .finish()
    }
}

impl Uring {
    /// Sets up a ring and registers a fresh eventfd with it.
    ///
    /// # Errors
    /// io_uring_setup failed (ENOSYS on old kernels, EPERM under seccomp or with
    /// `kernel.io_uring_disabled`, ENOMEM), the kernel lacks an operation the file backend
    /// needs (EOPNOTSUPP), or the eventfd could not be made or registered.
    pub(crate) fn new() -> io::Result<Self> {
        let ring = IoUring::builder().dontfork().build(SQ_ENTRIES)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let needed = [
            opcode::Readv::CODE,
            opcode::Writev::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
            opcode::AsyncCancel::CODE,
        ];
        if let Some(op) = needed.iter().find(|&&op| !probe.is_supported(op)) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring operation {op} is not supported by this kernel"),
            ));
        }
        let eventfd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Self {
            ring,
            eventfd,
            unsubmitted: 0,
        })
    }

    /// The eventfd the kernel signals for every completion.
    pub(crate) fn eventfd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }

    /// Queues `entry` for the next [`Uring::submit`].
    ///
    /// # Safety
    /// Every buffer and iovec array `entry` points to must stay valid (and, for reads,
    /// not be accessed as a Rust object) until its completion has been reaped.
    pub(crate) unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: forwarded from this function's contract.
        if unsafe { self.ring.submission().push(entry) }.is_err() {
            // Cannot happen with at most one operation per slot (see the module docs);
            // hand the queued entries to the kernel and retry once.
            self.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(entry) }.map_err(|_| {
                io::Error::new(io::ErrorKind::WouldBlock, "io_uring submission queue full")
            })?;
        }
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands the queued entries to the kernel (one io_uring_enter), retrying on EINTR and
    /// EAGAIN/EBUSY (the kernel is short of resources: what it took stays taken).
    ///
    /// # Errors
    /// io_uring_enter failed otherwise.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        let mut spins = 0u32;
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && spins < 10_000 =>
                {
                    spins += 1;
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether completions are waiting to be reaped (a read of the shared tail: no
    /// syscall).
    pub(crate) fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Takes the next completion, if any.
    pub(crate) fn next_completion(&mut self) -> Option<Completion> {
        self.ring.completion().next().map(|c| Completion {
            tag: c.user_data(),
            result: c.result(),
        })
    }

    /// Sleeps until a completion is posted or `timeout_ms` passes, then clears the
    /// eventfd.
    pub(crate) fn wait(&mut self, timeout_ms: i32) {
        if self.has_completions() {
            return;
        }
        let mut fds = [rustix::event::PollFd::new(
            &self.eventfd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: i64::from(timeout_ms / 1000),
            tv_nsec: i64::from(timeout_ms % 1000) * 1_000_000,
        };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.eventfd, &mut buf);
    }

    /// Asks the kernel to cancel every request in flight (IORING_ASYNC_CANCEL_ANY,
    /// Linux ≥ 5.19; an older kernel answers -EINVAL and the requests run to completion).
    /// Cancelled requests complete with -ECANCELED (or -EINTR).
    pub(crate) fn cancel_all(&mut self) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(io_uring::types::CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: a cancellation points to no memory.
        unsafe { self.push(&entry) }?;
        self.submit()
    }
}

/// Whether io_uring can serve a file backend on this host (the setup and probe
/// [`Uring::new`] does, on a throw-away ring).
///
/// # Errors
/// Why not, as from [`Uring::new`].
pub(crate) fn probe() -> io::Result<()> {
    Uring::new().map(drop)
}
