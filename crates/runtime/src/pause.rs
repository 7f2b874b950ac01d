//! Pausing a transport's threads for a live upgrade, shared by both transports: the
//! thread that reads the driver's requests (a vhost-user session, a VDUSE message loop)
//! stops between two requests, holds its vrings ([`crate::DeviceRuntime::hold`]) and
//! leaves an image of its state for the daemon to hand over; a second thread (the
//! vhost-user accept loop) can park too and leave an fd. From there the transport either
//! resumes (the upgrade failed: rollback) or is detached (a new daemon serves it now:
//! nothing is said to the driver and nothing is removed).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};

/// Where a transport stands in a live upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Accepting and serving.
    #[default]
    Serving,
    /// Threads paused, vrings held.
    Paused,
    /// Served by another process now: threads end without touching anything.
    Detached,
}

/// What the paused threads left for the daemon; `T` is the transport's image.
pub struct PauseState<T> {
    /// Serving, paused or detached.
    pub mode: Mode,
    /// The paused thread should leave an image (a quiesce asked for one).
    pub want_image: bool,
    /// The second thread (vhost-user: the accept loop) parked.
    pub parked: bool,
    /// An fd the parked second thread left (vhost-user: a duplicate of the listening
    /// socket).
    pub parked_fd: Option<OwnedFd>,
    /// The paused thread's image, or why it has none.
    pub image: Option<Result<T, String>>,
}

impl<T> Default for PauseState<T> {
    fn default() -> Self {
        Self {
            mode: Mode::Serving,
            want_image: false,
            parked: false,
            parked_fd: None,
            image: None,
        }
    }
}

/// The pause state, its condition variable and the eventfd that wakes the threads' polls.
pub struct Pause<T> {
    st: Mutex<PauseState<T>>,
    /// Signalled at every change of the state.
    pub cv: Condvar,
    wake: OwnedFd,
}

/// What woke a transport thread.
pub enum Woken {
    /// The fd it waits on is readable.
    Readable,
    /// The server is shutting down.
    Shutdown,
    /// The pause state changed.
    Control,
}

impl<T> Pause<T> {
    /// A control in `mode` (a transport adopted from another daemon starts paused).
    ///
    /// # Errors
    /// The wake eventfd could not be created.
    pub fn new(mode: Mode) -> std::io::Result<Self> {
        let c = Self {
            st: Mutex::new(PauseState {
                mode,
                ..PauseState::default()
            }),
            cv: Condvar::new(),
            wake: eventfd(0, EventfdFlags::CLOEXEC)?,
        };
        if mode != Mode::Serving {
            c.raise();
        }
        Ok(c)
    }

    /// The pause state.
    pub fn lock(&self) -> MutexGuard<'_, PauseState<T>> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the threads' polls (level-triggered until [`Pause::clear`]).
    pub fn raise(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Resets the wake eventfd (with the state lock held, after the mode went back to
    /// serving).
    pub fn clear(&self) {
        let mut b = [0u8; 8];
        // The fd is blocking: read only when set, or this would hang.
        let mut fds = [PollFd::new(&self.wake, PollFlags::IN)];
        if matches!(poll(&mut fds, Some(&rustix::event::Timespec::default())), Ok(n) if n > 0) {
            let _ = rustix::io::read(&self.wake, &mut b);
        }
    }

    /// The eventfd that wakes the threads' polls (for a thread that polls other fds too).
    pub fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Waits while the mode is [`Mode::Paused`]; returns the mode that ended the wait.
    pub fn wait_unpaused<'a>(
        &'a self,
        mut st: MutexGuard<'a, PauseState<T>>,
    ) -> (MutexGuard<'a, PauseState<T>>, Mode) {
        while st.mode == Mode::Paused {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let mode = st.mode;
        (st, mode)
    }

    /// Waits until `done` holds or `timeout` passes; returns the guard and whether it
    /// holds.
    pub fn wait_for<'a>(
        &'a self,
        mut st: MutexGuard<'a, PauseState<T>>,
        timeout: Duration,
        done: impl Fn(&PauseState<T>) -> bool,
    ) -> (MutexGuard<'a, PauseState<T>>, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&st) {
                return (st, true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (st, false);
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until `fd` is readable, `shutdown` fires or the pause state changes.
    pub fn wait(&self, fd: impl AsFd, shutdown: &OwnedFd) -> Woken {
        loop {
            let mut fds = [
                PollFd::new(&fd, PollFlags::IN),
                PollFd::new(shutdown, PollFlags::IN),
                PollFd::new(&self.wake, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {
                    if !fds[1].revents().is_empty() {
                        return Woken::Shutdown;
                    }
                    if !fds[2].revents().is_empty() {
                        return Woken::Control;
                    }
                    if !fds[0].revents().is_empty() {
                        return Woken::Readable;
                    }
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return Woken::Shutdown,
            }
        }
    }
}
