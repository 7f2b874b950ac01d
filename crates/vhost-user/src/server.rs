//! The per-device vhost-user socket: accepts one frontend at a time, runs its session on a
//! thread, and refuses a second frontend while one is connected (it is accepted and closed
//! at once, with a log line). A frontend that disconnects leaves the device ready for the
//! next one on the same socket.
//!
//! For a live upgrade the server can be paused ([`VhostUserServer::quiesce`]), resumed
//! ([`VhostUserServer::resume`]) or detached ([`VhostUserServer::detach`]); a new daemon
//! rebuilds it from what the pause left ([`VhostUserServer::adopt`]).

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::event::{eventfd, EventfdFlags};
use tracing::{info, warn};
use uvdpa_runtime::ConfigNotifier;
use uvdpa_virtio::interrupts::VectorTable;
use uvdpa_virtio::loglimit::DeviceLogLimits;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::VirtioDevice;

use crate::connection::Connection;
use crate::error::Error;
use crate::handover::SessionHandover;
use crate::session::{ResCtx, Session, SessionParams, SessionState, DEFAULT_MAX_MEMORY};
use uvdpa_runtime::pause::{Mode, Pause, Woken};

mod takeover;

pub use takeover::ServerHandover;
use takeover::{pause_accept, pause_session, AfterPause};

/// What the server shares with its session thread.
#[derive(Clone)]
struct Shared {
    device: Arc<dyn VirtioDevice>,
    stats: Arc<StatsTable>,
    state: Arc<Mutex<SessionState>>,
    shutdown: Arc<OwnedFd>,
    opts: ServerOptions,
    vectors: Arc<VectorTable>,
    /// How to tell the current session's frontend that the config space changed; `None`
    /// while no frontend is connected.
    notifier: Arc<Mutex<Option<ConfigNotifier>>>,
    sessions: Arc<SessionCounters>,
    /// Live-upgrade pause state of the accept loop and the session thread.
    control: Arc<Pause<SessionHandover>>,
    /// A session thread runs (set by the accept loop, cleared when the session ends).
    busy: Arc<AtomicBool>,
    /// Log limits of the device, shared by every session (a frontend looping connect and
    /// disconnect must not flood the log).
    log_limits: Arc<DeviceLogLimits>,
}

/// Frontend connections of one device's socket since it was created (read with relaxed
/// loads, e.g. by the daemon's metrics endpoint).
#[derive(Debug, Default)]
pub struct SessionCounters {
    /// Sessions started (frontends accepted).
    pub connects: AtomicU64,
    /// Sessions ended (the frontend left, broke the protocol, or the server stopped).
    pub disconnects: AtomicU64,
    /// Connections refused because a frontend was already connected.
    pub refused: AtomicU64,
}

/// Per-device options of a vhost-user server.
#[derive(Clone)]
pub struct ServerOptions {
    /// Where sessions record their resources (sessions, memory regions, virtqueues,
    /// workers, call vectors, under the device's entry); running workers hold a reference
    /// to the device entry.
    pub res: Option<ResCtx>,
    /// Each worker's busy-poll window after its ring runs empty (zero: sleep at once).
    pub poll: std::time::Duration,
    /// Features the driver must accept for FEATURES_OK, beyond the device's own mandate
    /// (set at device creation, VDUSE-style; seed 004).
    pub mandated: uvdpa_virtio::VirtioFeatures,
    /// Device features withheld from the offer (attribute `unoffer`).
    pub unoffered: uvdpa_virtio::VirtioFeatures,
    /// Who may connect to the socket.
    pub access: SocketAccess,
    /// Most bytes of address space a frontend's memory table may map (attribute
    /// `max_memory`, default [`DEFAULT_MAX_MEMORY`]); see [`crate::session`].
    pub max_memory: u64,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            res: None,
            poll: std::time::Duration::ZERO,
            mandated: uvdpa_virtio::VirtioFeatures::empty(),
            unoffered: uvdpa_virtio::VirtioFeatures::empty(),
            access: SocketAccess::default(),
            max_memory: DEFAULT_MAX_MEMORY,
        }
    }
}

/// Connections a device's socket accepts at once before the accept loop slows down
/// ([`ACCEPT_PER_SEC`]).
pub const ACCEPT_BURST: u32 = 20;
/// Connections per second a device's socket accepts once its burst is spent: each
/// further one waits `1 s / ACCEPT_PER_SEC` (50 ms) in the listen backlog. A frontend that
/// loops connect/disconnect costs the daemon at most this many sessions a second; a QEMU
/// with `reconnect=1` tries once a second.
pub const ACCEPT_PER_SEC: u32 = 20;

/// A token bucket of accepted connections: [`ACCEPT_BURST`] tokens, refilled at
/// [`ACCEPT_PER_SEC`].
struct AcceptBudget {
    tokens: f64,
    last: std::time::Instant,
    /// Connections that had to wait, since the last log line saying so.
    delayed: u64,
}

impl AcceptBudget {
    fn new() -> Self {
        Self {
            tokens: f64::from(ACCEPT_BURST),
            last: std::time::Instant::now(),
            delayed: 0,
        }
    }

    /// Takes a token; returns how long to wait first when none is left.
    fn take(&mut self, now: std::time::Instant) -> Option<std::time::Duration> {
        let rate = f64::from(ACCEPT_PER_SEC);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(ACCEPT_BURST));
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            return None;
        }
        // Negative: the wait that brings this token back to zero.
        Some(std::time::Duration::from_secs_f64(-self.tokens / rate))
    }
}

/// Who may connect to a device's socket: its file mode and owner, and the peers accepted
/// (SO_PEERCRED): the daemon's own uid, root, `user`, and any process whose primary group
/// is `group` (supplementary groups are not consulted). Anyone else is accepted by the
/// kernel only if the mode lets them, and is then closed at once with a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits of the socket file (default 0600).
    pub mode: u32,
    /// Owner given to the socket file and accepted as a peer.
    pub user: Option<u32>,
    /// Group given to the socket file and accepted as a peer's primary group.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        Self {
            mode: 0o600,
            user: None,
            group: None,
        }
    }
}

impl SocketAccess {
    /// Whether a peer of `uid`/`gid` may be served.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == rustix::process::geteuid().as_raw()
            || Some(uid) == self.user
            || Some(gid) == self.group
    }
}

/// Binds a listening socket at `path` with `access`'s mode from the start (the mode is set
/// on the socket before bind, so the file never exists with wider permissions), its owner
/// and group, then listens.
fn bind_socket(path: &Path, access: SocketAccess) -> io::Result<UnixListener> {
    use rustix::fs::{Gid, Mode, Uid};
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let mode = Mode::from_raw_mode(access.mode & 0o777);
    rustix::fs::fchmod(&sock, mode)?;
    rustix::net::bind(&sock, &SocketAddrUnix::new(path)?)?;
    let set = rustix::fs::chmod(path, mode).and_then(|()| {
        if access.user.is_some() || access.group.is_some() {
            rustix::fs::chown(
                path,
                access.user.map(Uid::from_raw),
                access.group.map(Gid::from_raw),
            )
        } else {
            Ok(())
        }
    });
    if let Err(e) = set.and_then(|()| rustix::net::listen(&sock, 16)) {
        let _ = std::fs::remove_file(path);
        return Err(e.into());
    }
    Ok(UnixListener::from(sock))
}

/// How long a new connection waits for a previous session that is ending before it is
/// refused as a second frontend.
pub const SESSION_END_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A device served on a vhost-user socket.
pub struct VhostUserServer {
    name: String,
    path: PathBuf,
    shared: Shared,
    thread: Option<JoinHandle<()>>,
}

fn peer_pid(s: &UnixStream) -> Option<u32> {
    rustix::net::sockopt::socket_peercred(s)
        .ok()
        .map(|c| c.pid.as_raw_nonzero().get() as u32)
}

/// Runs one session to its end: until the frontend disconnects, breaks the protocol, the
/// server shuts down, or it is detached (handed over to a new daemon).
fn run_session(name: &str, stream: UnixStream, sh: &Shared) {
    let pid = peer_pid(&stream);
    if let Some(suppressed) = sh.log_limits.session.check() {
        info!(
            device = name,
            frontend_pid = pid,
            suppressed,
            "frontend connected"
        );
    }
    sh.sessions.connects.fetch_add(1, Ordering::Relaxed);
    {
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        *st = SessionState {
            connected: true,
            frontend_pid: pid,
            ..SessionState::default()
        };
    }
    let session = Session::new(name, Connection::new(stream), session_params(sh, pid));
    serve_session(name, session, pid, sh);
}

fn session_params(sh: &Shared, pid: Option<u32>) -> SessionParams {
    SessionParams {
        device: sh.device.clone(),
        stats: sh.stats.clone(),
        state: sh.state.clone(),
        res: sh.opts.res.clone(),
        frontend_pid: pid,
        poll: sh.opts.poll,
        mandated: sh.opts.mandated,
        unoffered: sh.opts.unoffered,
        vectors: sh.vectors.clone(),
        max_memory: sh.opts.max_memory,
        log_limits: sh.log_limits.clone(),
    }
}

/// Serves `session` until it ends; a detached session ends without a word to the
/// frontend (its new daemon goes on with the same socket).
fn serve_session(name: &str, mut session: Session, pid: Option<u32>, sh: &Shared) {
    *sh.notifier.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.config_notifier());
    let mut detached = false;
    if session.held() {
        // A session adopted from another daemon starts held: wait for the verdict here,
        // not only on a wakeup (a resume may come before this thread first polls).
        let (st, mode) = sh.control.wait_unpaused(sh.control.lock());
        drop(st);
        if mode == Mode::Detached {
            detached = true;
        } else if let Err(e) = session.release() {
            warn!(
                device = name,
                "Vrings did not start after the takeover: {e}"
            );
        }
    }
    while !detached {
        match sh.control.wait(session.connection().socket(), &sh.shutdown) {
            Woken::Shutdown => {
                info!(device = name, "closing session for shutdown");
                break;
            }
            Woken::Control => match pause_session(name, &mut session, pid, sh) {
                AfterPause::Serve => continue,
                AfterPause::Detach => {
                    detached = true;
                    break;
                }
            },
            Woken::Readable => {}
        }
        match session.handle_one() {
            Ok(()) => {}
            Err(Error::Disconnected) => {
                if let Some(suppressed) = sh.log_limits.session.check() {
                    info!(
                        device = name,
                        frontend_pid = pid,
                        suppressed,
                        "frontend disconnected"
                    );
                }
                break;
            }
            Err(e) => {
                if let Some(suppressed) = sh.log_limits.session.check() {
                    warn!(
                        device = name,
                        frontend_pid = pid,
                        suppressed,
                        "Ending session: {e}"
                    );
                }
                break;
            }
        }
    }
    *sh.notifier.lock().unwrap_or_else(|e| e.into_inner()) = None;
    if detached {
        info!(device = name, frontend_pid = pid, "session handed over");
        // Its vrings held: nothing is drained, flushed, sent or reset.
        session.abandon();
        drop(session);
        return;
    }
    session.close();
    sh.sessions.disconnects.fetch_add(1, Ordering::Relaxed);
}

impl VhostUserServer {
    /// Binds `path` (replacing a stale socket file) and starts serving `device`.
    ///
    /// # Errors
    /// Binding the socket or starting the thread failed.
    pub fn start(name: &str, path: &Path, device: Arc<dyn VirtioDevice>) -> io::Result<Self> {
        Self::start_with(name, path, device, ServerOptions::default())
    }

    /// As [`VhostUserServer::start`], with options.
    ///
    /// # Errors
    /// Binding the socket or starting the thread failed.
    pub fn start_with(
        name: &str,
        path: &Path,
        device: Arc<dyn VirtioDevice>,
        opts: ServerOptions,
    ) -> io::Result<Self> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = bind_socket(path, opts.access)?;
        let shared = Shared {
            stats: StatsTable::new(name, usize::from(device.num_queues()))?,
            vectors: Arc::new(VectorTable::new(device.num_queues())),
            device,
            state: Arc::new(Mutex::new(SessionState::default())),
            shutdown: Arc::new(eventfd(0, EventfdFlags::CLOEXEC)?),
            opts,
            notifier: Arc::default(),
            sessions: Arc::default(),
            control: Arc::new(Pause::new(Mode::Serving)?),
            busy: Arc::default(),
            log_limits: Arc::default(),
        };
        let sh = shared.clone();
        let n = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-listen"))
            .spawn(move || accept_loop(&n, listener, sh, None))?;
        info!(device = name, socket = %path.display(), "serving vhost-user");
        Ok(Self {
            name: name.to_string(),
            path: path.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    /// The current session's state (default when no frontend is connected).
    pub fn session_state(&self) -> SessionState {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The device's per-queue counters (kept across sessions).
    pub fn stats(&self) -> &Arc<StatsTable> {
        &self.shared.stats
    }

    /// Frontend connections of this socket so far.
    pub fn sessions(&self) -> &Arc<SessionCounters> {
        &self.shared.sessions
    }

    /// The device's interrupt vector table (vector `i` = vring `i`'s call eventfd).
    pub fn vectors(&self) -> &Arc<VectorTable> {
        &self.shared.vectors
    }

    /// Tells the connected frontend that the device's config space changed (virtio 1.2
    /// §2.5: a configuration change notification), e.g. after a new capacity: sends
    /// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG over the backend channel the frontend set
    /// with SET_BACKEND_REQ_FD; the frontend then reads the config space (GET_CONFIG) and
    /// interrupts its driver. Returns whether the notice went out: false with no frontend,
    /// or one that negotiated no backend channel (it sees the change on its next
    /// GET_CONFIG). Never blocks.
    pub fn config_changed(&self) -> bool {
        let notifier = self
            .shared
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        notifier.is_some_and(|notify| notify())
    }

    /// The device served.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.shared.device
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends the session (its vrings stopped and the device flushed),
    /// and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = rustix::io::write(&*self.shared.shutdown, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        info!(device = %self.name, "stopped serving");
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// Waits up to `wait` for the shutdown eventfd; true if it fired.
fn shutdown_within(shutdown: &OwnedFd, wait: std::time::Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let t = Timespec {
        tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(wait.subsec_nanos()),
    };
    let mut fds = [PollFd::new(shutdown, PollFlags::IN)];
    loop {
        match poll(&mut fds, Some(&t)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

fn accept_loop(name: &str, listener: UnixListener, sh: Shared, adopted: Option<Session>) {
    let busy = sh.busy.clone();
    let mut budget = AcceptBudget::new();
    let mut session_thread: Option<JoinHandle<()>> = None;
    if let Some(session) = adopted {
        busy.store(true, Ordering::Release);
        let (b, sh2, n) = (busy.clone(), sh.clone(), name.to_string());
        let pid = session.frontend_pid();
        match std::thread::Builder::new()
            .name(format!("{name}-session"))
            .spawn(move || {
                serve_session(&n, session, pid, &sh2);
                b.store(false, Ordering::Release);
                sh2.control.cv.notify_all();
            }) {
            Ok(t) => session_thread = Some(t),
            Err(e) => {
                warn!(device = name, "cannot start session thread: {e}");
                busy.store(false, Ordering::Release);
            }
        }
    }
    loop {
        match sh.control.wait(&listener, &sh.shutdown) {
            Woken::Shutdown => break,
            Woken::Control => {
                if pause_accept(&listener, &sh) {
                    continue;
                }
                break;
            }
            Woken::Readable => {}
        }
        // A frontend looping connect/disconnect gets ACCEPT_PER_SEC sessions a second: the
        // rest wait in the listen backlog (the wait ends early for a shutdown).
        if let Some(wait) = budget.take(std::time::Instant::now()) {
            budget.delayed += 1;
            if let Some(suppressed) = sh.log_limits.session.check() {
                info!(
                    device = name,
                    delayed = budget.delayed,
                    suppressed,
                    "Connections arrive faster than {ACCEPT_PER_SEC}/s: accepting them slower"
                );
                budget.delayed = 0;
            }
            if shutdown_within(&sh.shutdown, wait) {
                break;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(device = name, "accept failed: {e}");
                continue;
            }
        };
        if let Ok(c) = rustix::net::sockopt::socket_peercred(&stream) {
            let (uid, gid) = (c.uid.as_raw(), c.gid.as_raw());
            if !sh.opts.access.allows(uid, gid) {
                if let Some(suppressed) = sh.log_limits.session.check() {
                    warn!(
                        device = name,
                        frontend_pid = peer_pid(&stream),
                        uid,
                        gid,
                        suppressed,
                        "Refusing a frontend of uid {uid}: only the daemon's uid, root, socket_user and socket_group may connect"
                    );
                }
                sh.sessions.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        // A frontend that just disconnected may still be winding down (stopping its
        // vrings): give it a bounded moment before calling the newcomer a second frontend.
        let deadline = std::time::Instant::now() + SESSION_END_GRACE;
        while busy.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if busy.load(Ordering::Acquire) {
            if let Some(suppressed) = sh.log_limits.session.check() {
                warn!(
                    device = name,
                    frontend_pid = peer_pid(&stream),
                    suppressed,
                    "Refusing a second frontend: one is already connected"
                );
            }
            sh.sessions.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        if let Some(t) = session_thread.take() {
            let _ = t.join();
        }
        busy.store(true, Ordering::Release);
        let (b, sh2, n) = (busy.clone(), sh.clone(), name.to_string());
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-session"))
            .spawn(move || {
                run_session(&n, stream, &sh2);
                b.store(false, Ordering::Release);
                sh2.control.cv.notify_all();
            });
        match spawned {
            Ok(t) => session_thread = Some(t),
            Err(e) => {
                warn!(device = name, "cannot start session thread: {e}");
                busy.store(false, Ordering::Release);
            }
        }
    }
    if let Some(t) = session_thread.take() {
        let _ = t.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn accept_budget_allows_a_burst_then_paces_connections() {
        let t0 = Instant::now();
        let mut b = AcceptBudget::new();
        b.last = t0;
        for i in 0..ACCEPT_BURST {
            assert_eq!(b.take(t0), None, "connection {i} of the burst delayed");
        }
        // Past the burst, each connection waits one refill period more than the last.
        let step = Duration::from_secs(1) / ACCEPT_PER_SEC;
        let w1 = b.take(t0).expect("no wait past the burst");
        let w2 = b.take(t0).expect("no wait past the burst");
        assert!(w1.abs_diff(step) < Duration::from_millis(1), "{w1:?}");
        assert!(w2.abs_diff(2 * step) < Duration::from_millis(1), "{w2:?}");
        // A quiet second refills the bucket.
        assert_eq!(b.take(t0 + Duration::from_secs(2)), None);
    }
}
