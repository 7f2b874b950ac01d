//! Pausing a server's threads for a live upgrade: the accept loop stops accepting and the
//! session thread stops between two requests, holds its vrings and leaves an image of
//! its session ([`crate::handover`]) for the daemon to hand over. From there the server
//! either resumes (the upgrade failed: rollback) or is detached (a new daemon serves it
//! now: nothing is closed towards the frontend and the socket file stays).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};

use crate::connection::Request;

/// Where a server stands in a live upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Mode {
    /// Accepting and serving.
    #[default]
    Serving,
    /// Threads paused, vrings held.
    Paused,
    /// Served by another process now: threads end without touching anything.
    Detached,
}

/// A connected frontend's session as a new daemon needs it.
pub struct SessionHandover {
    /// The connected vhost-user socket (a duplicate).
    pub stream: OwnedFd,
    /// The requests that rebuild the session ([`crate::Session::image`]), with their fds.
    pub image: Vec<Request>,
    /// The frontend's pid (SO_PEERCRED), if known.
    pub frontend_pid: Option<u32>,
}

/// What the paused threads left for the daemon.
#[derive(Default)]
pub(crate) struct PauseState {
    pub(crate) mode: Mode,
    /// The paused session should leave an image (a quiesce asked for one).
    pub(crate) want_image: bool,
    /// The accept loop stopped accepting.
    pub(crate) accept_paused: bool,
    /// A duplicate of the listening socket, left by the paused accept loop.
    pub(crate) listener: Option<OwnedFd>,
    /// The paused session's image, or why it has none.
    pub(crate) session: Option<Result<SessionHandover, String>>,
}

/// The pause state, its condition variable and the eventfd that wakes the threads' polls.
pub(crate) struct Control {
    st: Mutex<PauseState>,
    pub(crate) cv: Condvar,
    wake: OwnedFd,
}

/// What woke a server thread.
pub(crate) enum Woken {
    /// The fd it waits on is readable.
    Readable,
    /// The server is shutting down.
    Shutdown,
    /// The pause state changed.
    Control,
}

impl Control {
    /// A control in `mode` (a server adopted from another daemon starts paused).
    pub(crate) fn new(mode: Mode) -> std::io::Result<Self> {
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

    pub(crate) fn lock(&self) -> MutexGuard<'_, PauseState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the threads' polls (level-triggered until [`Control::clear`]).
    pub(crate) fn raise(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Resets the wake eventfd (with the state lock held, after the mode went back to
    /// serving).
    pub(crate) fn clear(&self) {
        let mut b = [0u8; 8];
        // The fd is blocking: read only when set, or this would hang.
        let mut fds = [PollFd::new(&self.wake, PollFlags::IN)];
        if matches!(poll(&mut fds, Some(&rustix::event::Timespec::default())), Ok(n) if n > 0) {
            let _ = rustix::io::read(&self.wake, &mut b);
        }
    }

    /// Waits while the mode is [`Mode::Paused`]; returns the mode that ended the wait.
    pub(crate) fn wait_unpaused<'a>(
        &'a self,
        mut st: MutexGuard<'a, PauseState>,
    ) -> (MutexGuard<'a, PauseState>, Mode) {
        while st.mode == Mode::Paused {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let mode = st.mode;
        (st, mode)
    }

    /// Waits until `done` holds or `timeout` passes; returns the guard and whether it
    /// holds.
    pub(crate) fn wait_for<'a>(
        &'a self,
        mut st: MutexGuard<'a, PauseState>,
        timeout: Duration,
        done: impl Fn(&PauseState) -> bool,
    ) -> (MutexGuard<'a, PauseState>, bool) {
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
    pub(crate) fn wait(&self, fd: impl AsFd, shutdown: &OwnedFd) -> Woken {
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
