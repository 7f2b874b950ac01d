//! Takeover for a live upgrade: the session's and the accept loop's sides of a pause,
//! [`VhostUserServer::quiesce`] and the [`ServerHandover`] it leaves,
//! [`VhostUserServer::resume`], [`VhostUserServer::detach`], and
//! [`VhostUserServer::adopt`], which rebuilds a server in a new daemon.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rustix::event::{eventfd, EventfdFlags};
use tracing::{info, warn};
use uvdpa_runtime::pause::{Mode, Pause};
use uvdpa_virtio::interrupts::VectorTable;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::VirtioDevice;

use super::{accept_loop, session_params, ServerOptions, Shared, VhostUserServer};
use crate::connection::Connection;
use crate::error::Error;
use crate::handover::SessionHandover;
use crate::session::{Session, SessionState};

/// What a paused session does next.
pub(super) enum AfterPause {
    Serve,
    Detach,
}

/// The session's side of a pause: hold the vrings, leave an image if one is wanted, wait
/// for the verdict, and restart the vrings if the server resumes.
pub(super) fn pause_session(
    name: &str,
    session: &mut Session,
    pid: Option<u32>,
    sh: &Shared,
) -> AfterPause {
    let ctl = &sh.control;
    let mut st = ctl.lock();
    match st.mode {
        Mode::Serving => return AfterPause::Serve,
        Mode::Detached => return AfterPause::Detach,
        Mode::Paused => {}
    }
    session.hold();
    if st.want_image && st.image.is_none() {
        let image = session.image().and_then(|image| {
            let stream = session
                .connection()
                .socket()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::Handover(format!("cannot duplicate the socket: {e}")))?;
            Ok(SessionHandover {
                stream,
                image,
                frontend_pid: pid,
            })
        });
        st.image = Some(image.map_err(|e| e.to_string()));
        ctl.cv.notify_all();
    }
    let (st, mode) = ctl.wait_unpaused(st);
    drop(st);
    match mode {
        Mode::Detached => AfterPause::Detach,
        _ => {
            if let Err(e) = session.release() {
                warn!(device = name, "Vrings did not restart after a pause: {e}");
            }
            AfterPause::Serve
        }
    }
}

/// What a paused server leaves for a new daemon ([`VhostUserServer::quiesce`]), and what
/// [`VhostUserServer::adopt`] rebuilds a server from.
pub struct ServerHandover {
    /// The listening socket (a duplicate; its path stays bound).
    pub listener: OwnedFd,
    /// The per-queue counters' memfd (a duplicate), so counting continues.
    pub stats: OwnedFd,
    /// Session counters so far: (connects, disconnects, refused).
    pub counters: (u64, u64, u64),
    /// The connected frontend's session, if one is connected.
    pub session: Option<SessionHandover>,
}

impl VhostUserServer {
    /// Pauses the server for a live upgrade: it stops accepting, and the connected
    /// frontend's session (if any) stops between two requests with its vrings held
    /// (requests already popped complete first) and leaves an image of itself. Requests the
    /// frontend sends meanwhile wait in the socket for whoever serves next.
    ///
    /// # Errors
    /// [`Error::Handover`]: already paused, the threads did not pause within `timeout`, or
    /// the session cannot be imaged (then the server is resumed before returning).
    pub fn quiesce(&self, timeout: std::time::Duration) -> Result<ServerHandover, Error> {
        let ctl = &self.shared.control;
        let mut st = ctl.lock();
        if st.mode != Mode::Serving {
            return Err(Error::Handover(format!("{} is already paused", self.name)));
        }
        st.mode = Mode::Paused;
        st.want_image = true;
        st.parked = false;
        st.parked_fd = None;
        st.image = None;
        ctl.raise();
        let busy = self.shared.busy.clone();
        let (mut st, paused) = ctl.wait_for(st, timeout, |st| {
            st.parked && (st.image.is_some() || !busy.load(Ordering::Acquire))
        });
        let listener = st.parked_fd.take();
        let session = st.image.take();
        drop(st);
        let fail = |why: String| {
            self.resume();
            Err(Error::Handover(format!("{}: {why}", self.name)))
        };
        if !paused {
            return fail(format!("did not pause within {timeout:?}"));
        }
        let Some(listener) = listener else {
            return fail("cannot duplicate the listening socket".into());
        };
        let session = match session.transpose() {
            Ok(s) => s,
            Err(why) => return fail(why),
        };
        let stats = match self.shared.stats.fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => return fail(format!("cannot duplicate the stats memfd: {e}")),
        };
        let c = &self.shared.sessions;
        Ok(ServerHandover {
            listener,
            stats,
            counters: (
                c.connects.load(Ordering::Relaxed),
                c.disconnects.load(Ordering::Relaxed),
                c.refused.load(Ordering::Relaxed),
            ),
            session,
        })
    }

    /// Ends a pause: the session's vrings restart where they stopped and the server
    /// accepts again (a live upgrade that failed: rollback; or, on a server made by
    /// [`VhostUserServer::adopt`], the start of serving). A no-op when not paused.
    pub fn resume(&self) {
        let ctl = &self.shared.control;
        let mut st = ctl.lock();
        if st.mode != Mode::Paused {
            return;
        }
        st.mode = Mode::Serving;
        st.want_image = false;
        st.parked = false;
        st.parked_fd = None;
        st.image = None;
        ctl.clear();
        ctl.cv.notify_all();
        drop(st);
        info!(device = %self.name, "serving (resumed)");
    }

    /// Ends a paused server's threads without a word to its frontend and without removing
    /// the socket file: another daemon serves the device now (or, for a server made by
    /// [`VhostUserServer::adopt`] that will not serve, the old one still does).
    pub fn detach(mut self) {
        {
            let ctl = &self.shared.control;
            let mut st = ctl.lock();
            st.mode = Mode::Detached;
            ctl.raise();
            ctl.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        info!(device = %self.name, "detached (served elsewhere now)");
    }

    /// Rebuilds a server from what another daemon's [`VhostUserServer::quiesce`] left:
    /// the listening socket, the counters and, with a connected frontend, its session
    /// replayed from its image ([`Session::replay`]). The server starts paused, its vrings
    /// held: [`VhostUserServer::resume`] starts serving, [`VhostUserServer::detach`]
    /// gives up without touching the frontend.
    ///
    /// # Errors
    /// [`Error::Handover`]: the stats memfd does not fit the device, or the session image
    /// was refused (naming the request); or the threads could not start.
    pub fn adopt(
        name: &str,
        path: &Path,
        device: Arc<dyn VirtioDevice>,
        opts: ServerOptions,
        h: ServerHandover,
    ) -> Result<Self, Error> {
        let queues = usize::from(device.num_queues());
        let stats = StatsTable::adopt(h.stats, queues)
            .map_err(|e| Error::Handover(format!("stats table: {e}")))?;
        let io = |e: io::Error| Error::Handover(e.to_string());
        let shared = Shared {
            stats,
            vectors: Arc::new(VectorTable::new(device.num_queues())),
            device,
            state: Arc::new(Mutex::new(SessionState::default())),
            shutdown: Arc::new(eventfd(0, EventfdFlags::CLOEXEC).map_err(|e| io(e.into()))?),
            opts,
            notifier: Arc::default(),
            sessions: Arc::default(),
            control: Arc::new(Pause::new(Mode::Paused).map_err(io)?),
            busy: Arc::default(),
            log_limits: Arc::default(),
        };
        let c = &shared.sessions;
        c.connects.store(h.counters.0, Ordering::Relaxed);
        c.disconnects.store(h.counters.1, Ordering::Relaxed);
        c.refused.store(h.counters.2, Ordering::Relaxed);
        let session = match h.session {
            Some(s) => {
                {
                    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                    *st = SessionState {
                        connected: true,
                        frontend_pid: s.frontend_pid,
                        ..SessionState::default()
                    };
                }
                let stream = UnixStream::from(s.stream);
                let mut session = Session::new(
                    name,
                    Connection::new(stream),
                    session_params(&shared, s.frontend_pid),
                );
                session.replay(s.image)?;
                Some(session)
            }
            None => None,
        };
        let listener = UnixListener::from(h.listener);
        let sh = shared.clone();
        let n = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-listen"))
            .spawn(move || accept_loop(&n, listener, sh, session))
            .map_err(io)?;
        info!(device = name, socket = %path.display(), "vhost-user device adopted (paused)");
        Ok(Self {
            name: name.to_string(),
            path: path.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }
}

/// The accept loop's side of a pause: leave a duplicate of the listener, wait for the
/// verdict. Returns whether to go on accepting (false: detached).
pub(super) fn pause_accept(listener: &UnixListener, sh: &Shared) -> bool {
    let ctl = &sh.control;
    let mut st = ctl.lock();
    match st.mode {
        Mode::Serving => return true,
        Mode::Detached => return false,
        Mode::Paused => {}
    }
    if !st.parked {
        st.parked_fd = listener.as_fd().try_clone_to_owned().ok();
        st.parked = true;
        ctl.cv.notify_all();
    }
    let (_st, mode) = ctl.wait_unpaused(st);
    mode != Mode::Detached
}
