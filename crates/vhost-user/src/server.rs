//! The per-device vhost-user socket: accepts one frontend at a time, runs its session on a
//! thread, and refuses a second frontend while one is connected (it is accepted and closed
//! at once, with a log line). A frontend that disconnects leaves the device ready for the
//! next one on the same socket.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use tracing::{info, warn};
use uvdpa_runtime::ConfigNotifier;
use uvdpa_virtio::interrupts::VectorTable;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::VirtioDevice;

use crate::connection::Connection;
use crate::error::Error;
use crate::session::{ResCtx, Session, SessionParams, SessionState};

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
#[derive(Clone, Default)]
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

/// Waits until `fd` is readable or `shutdown` fires; returns false on shutdown.
fn wait_readable(fd: impl AsFd, shutdown: &OwnedFd) -> bool {
    loop {
        let mut fds = [
            PollFd::new(&fd, PollFlags::IN),
            PollFd::new(shutdown, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {
                if !fds[1].revents().is_empty() {
                    return false;
                }
                if !fds[0].revents().is_empty() {
                    return true;
                }
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

fn peer_pid(s: &UnixStream) -> Option<u32> {
    rustix::net::sockopt::socket_peercred(s)
        .ok()
        .map(|c| c.pid.as_raw_nonzero().get() as u32)
}

/// Runs one session to its end: until the frontend disconnects, breaks the protocol, or
/// the server shuts down.
fn run_session(name: &str, stream: UnixStream, sh: &Shared) {
    let pid = peer_pid(&stream);
    info!(device = name, frontend_pid = pid, "frontend connected");
    sh.sessions.connects.fetch_add(1, Ordering::Relaxed);
    {
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        *st = SessionState {
            connected: true,
            frontend_pid: pid,
            ..SessionState::default()
        };
    }
    let mut session = Session::new(
        name,
        Connection::new(stream),
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
        },
    );
    *sh.notifier.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.config_notifier());
    loop {
        if !wait_readable(session.connection().socket(), &sh.shutdown) {
            info!(device = name, "closing session for shutdown");
            break;
        }
        match session.handle_one() {
            Ok(()) => {}
            Err(Error::Disconnected) => {
                info!(device = name, frontend_pid = pid, "frontend disconnected");
                break;
            }
            Err(e) => {
                warn!(device = name, frontend_pid = pid, "Ending session: {e}");
                break;
            }
        }
    }
    *sh.notifier.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
        let listener = UnixListener::bind(path)?;
        let shared = Shared {
            stats: StatsTable::new(name, usize::from(device.num_queues()))?,
            vectors: Arc::new(VectorTable::new(device.num_queues())),
            device,
            state: Arc::new(Mutex::new(SessionState::default())),
            shutdown: Arc::new(eventfd(0, EventfdFlags::CLOEXEC)?),
            opts,
            notifier: Arc::default(),
            sessions: Arc::default(),
        };
        let sh = shared.clone();
        let n = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-listen"))
            .spawn(move || accept_loop(&n, listener, sh))?;
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

fn accept_loop(name: &str, listener: UnixListener, sh: Shared) {
    let busy = Arc::new(AtomicBool::new(false));
    let mut session_thread: Option<JoinHandle<()>> = None;
    while wait_readable(&listener, &sh.shutdown) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(device = name, "accept failed: {e}");
                continue;
            }
        };
        // A frontend that just disconnected may still be winding down (stopping its
        // vrings): give it a bounded moment before calling the newcomer a second frontend.
        let deadline = std::time::Instant::now() + SESSION_END_GRACE;
        while busy.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if busy.load(Ordering::Acquire) {
            warn!(
                device = name,
                frontend_pid = peer_pid(&stream),
                "Refusing a second frontend: one is already connected"
            );
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
