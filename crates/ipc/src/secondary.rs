//! The secondary: connects to the primary, sends requests (sync or async, each with a
//! deadline) and receives replies and notifications on one receiver thread.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use serde_json::Value;
use tracing::{debug, error, warn};

use crate::error::{code, IpcError};
use crate::sock::{self, Wait};
use crate::types::{Notification, Reply};
use crate::wire::{self, Kind, MAX_FDS, MAX_MESSAGE, WELCOME_ACTION};

/// Most requests awaiting a reply on one connection; one more fails with
/// [`IpcError::TooManyPending`].
pub const MAX_PENDING: usize = 1024;
/// How long [`Secondary::connect`] waits for the primary's welcome.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages handled per wake-up of the receiver before it checks deadlines again.
const RECV_BATCH: usize = 64;

/// A notification handler; runs on the receiver thread.
pub type NotificationHandler = dyn Fn(&Notification) + Send + Sync;
type Callback = Box<dyn FnOnce(Result<Reply, IpcError>) + Send>;

/// The secondary side: a connection to the primary (see the crate documentation).
///
/// Requests may be sent from any thread (`&self`). Replies, async callbacks and
/// notification handlers are handled on one receiver thread: callbacks and handlers must
/// not block, and must not call [`Secondary::request_sync`] (its reply could only be read
/// by the thread that waits for it; the call would end in [`IpcError::Timeout`]).
///
/// Dropping it closes the connection; requests still pending complete with
/// [`IpcError::Closed`].
pub struct Secondary {
    inner: Arc<Inner>,
    client_id: u64,
    receiver: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Secondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secondary")
            .field("client_id", &self.client_id)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

struct Inner {
    sock: OwnedFd,
    wake: OwnedFd,
    stopping: AtomicBool,
    next_req: AtomicU64,
    state: Mutex<State>,
    handlers: RwLock<HashMap<String, Arc<NotificationHandler>>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    closed: Option<CloseReason>,
}

/// Why the connection ended.
#[derive(Debug, Clone)]
enum CloseReason {
    /// End of stream, a socket error, or this side closed.
    Closed,
    /// The primary sent a connection-level error (req_id 0) before closing.
    Refused { code: i32, message: String },
}

impl CloseReason {
    fn error(&self) -> IpcError {
        match self {
            Self::Closed => IpcError::Closed,
            Self::Refused { code, message } => IpcError::Remote {
                code: *code,
                message: message.clone(),
            },
        }
    }
}

/// A request awaiting its reply.
enum Pending {
    /// `request_sync`: the caller waits on the channel (and enforces its own deadline).
    Sync(SyncSender<Result<Reply, IpcError>>),
    /// `request_async`: the receiver enforces the deadline.
    Async {
        deadline: Instant,
        callback: Callback,
    },
}

impl Pending {
    /// Delivers the outcome; never called with the state lock held.
    fn complete(self, result: Result<Reply, IpcError>) {
        match self {
            Self::Sync(tx) => {
                // The waiter may be gone (it timed out): the result is discarded.
                let _ = tx.send(result);
            }
            Self::Async { callback, .. } => {
                if catch_unwind(AssertUnwindSafe(|| callback(result))).is_err() {
                    error!("IPC async callback panicked");
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    // A timeout too large to represent: one day is forever enough.
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400))
}

fn send_error(e: io::Error) -> IpcError {
    match e.kind() {
        io::ErrorKind::TimedOut => IpcError::Timeout,
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::NotConnected => IpcError::Closed,
        _ => IpcError::Io(e),
    }
}

impl Secondary {
    /// Connects to the primary at `path` and waits (up to [`CONNECT_TIMEOUT`]) for its
    /// welcome.
    ///
    /// # Errors
    /// [`IpcError::Connect`], [`IpcError::Timeout`], [`IpcError::Remote`] if the primary
    /// refuses the connection (EPERM: wrong uid; EBUSY: too many clients),
    /// [`IpcError::Closed`], [`IpcError::Protocol`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, IpcError> {
        Self::connect_timeout(path, CONNECT_TIMEOUT)
    }

    /// As [`Secondary::connect`], waiting at most `timeout` for the welcome.
    ///
    /// # Errors
    /// As [`Secondary::connect`].
    pub fn connect_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, IpcError> {
        let path = path.as_ref();
        let sock = sock::connect(path).map_err(|source| IpcError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let client_id = wait_welcome(sock.as_fd(), deadline_after(timeout))?;
        let inner = Arc::new(Inner {
            sock,
            wake: sock::new_wake()?,
            stopping: AtomicBool::new(false),
            next_req: AtomicU64::new(1),
            state: Mutex::default(),
            handlers: RwLock::default(),
        });
        let receiver = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name(format!("uvdpa-ipc-rx-{client_id}"))
                .spawn(move || inner.receive_loop())?
        };
        Ok(Self {
            inner,
            client_id,
            receiver: Some(receiver),
        })
    }

    /// The id the primary gave this connection (its [`crate::Peer::client_id`]).
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// How many requests await a reply.
    pub fn pending(&self) -> usize {
        lock(&self.inner.state).pending.len()
    }

    /// Whether the connection has ended (every request now fails at once).
    pub fn is_closed(&self) -> bool {
        lock(&self.inner.state).closed.is_some()
    }

    /// Sends a request and waits for its reply, at most `timeout` in all (as
    /// `rte_mp_request_sync`). The fds are duplicated into the message; the caller keeps
    /// its own.
    ///
    /// # Errors
    /// [`IpcError::Timeout`] (a reply arriving later is discarded), [`IpcError::Remote`]
    /// for an error reply, [`IpcError::InvalidAction`], [`IpcError::PayloadTooLarge`],
    /// [`IpcError::TooManyFds`], [`IpcError::TooManyPending`], [`IpcError::Closed`],
    /// [`IpcError::Io`].
    pub fn request_sync(
        &self,
        action: &str,
        payload: &Value,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Reply, IpcError> {
        let deadline = deadline_after(timeout);
        let (tx, rx) = mpsc::sync_channel(1);
        let req_id = self.submit(action, payload, fds, deadline, Pending::Sync(tx));
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                let mine = lock(&self.inner.state).pending.remove(&req_id);
                match mine {
                    Some(_) => Err(IpcError::Timeout),
                    // The receiver took it a moment ago and is sending the result now.
                    None => rx.recv().unwrap_or(Err(IpcError::Closed)),
                }
            }
            Err(RecvTimeoutError::Disconnected) => Err(IpcError::Closed),
        }
    }

    /// Sends a request; `callback` runs exactly once, with the reply, an error, or
    /// [`IpcError::Timeout`] after `timeout` (as `rte_mp_request_async`). It runs on the
    /// receiver thread, or on the caller's thread before this returns if the request could
    /// not be sent (bad action, too large, too many pending, closed).
    pub fn request_async<F>(
        &self,
        action: &str,
        payload: &Value,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
        callback: F,
    ) where
        F: FnOnce(Result<Reply, IpcError>) + Send + 'static,
    {
        let deadline = deadline_after(timeout);
        let pending = Pending::Async {
            deadline,
            callback: Box::new(callback),
        };
        self.submit(action, payload, fds, deadline, pending);
    }

    /// Sets the handler of notifications named `action`, replacing any previous one.
    /// Notifications without a handler are dropped.
    ///
    /// # Errors
    /// [`IpcError::InvalidAction`].
    pub fn on_notification<F>(&self, action: &str, handler: F) -> Result<(), IpcError>
    where
        F: Fn(&Notification) + Send + Sync + 'static,
    {
        wire::check_action(action)?;
        self.inner
            .handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(action.to_owned(), Arc::new(handler));
        Ok(())
    }

    /// Registers `pending` under a new request id and sends the request; on any failure,
    /// completes `pending` with the error. Returns the request id.
    fn submit(
        &self,
        action: &str,
        payload: &Value,
        fds: &[BorrowedFd<'_>],
        deadline: Instant,
        pending: Pending,
    ) -> u64 {
        let req_id = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        let msg = if fds.len() > MAX_FDS {
            Err(IpcError::TooManyFds { max: MAX_FDS })
        } else {
            wire::encode(Kind::Request, code::OK, req_id, action, payload)
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                pending.complete(Err(e));
                return req_id;
            }
        };
        let is_async = matches!(pending, Pending::Async { .. });
        let refused = {
            let mut st = lock(&self.inner.state);
            if let Some(reason) = &st.closed {
                Some((pending, reason.error()))
            } else if st.pending.len() >= MAX_PENDING {
                Some((pending, IpcError::TooManyPending))
            } else {
                st.pending.insert(req_id, pending);
                None
            }
        };
        if let Some((pending, e)) = refused {
            pending.complete(Err(e));
            return req_id;
        }
        if is_async {
            // The receiver enforces this deadline: let it recompute its poll timeout.
            sock::wake(&self.inner.wake);
        }
        if let Err(e) = sock::send(self.inner.sock.as_fd(), &msg, fds, Wait::Until(deadline)) {
            let e = send_error(e);
            let mine = {
                let mut st = lock(&self.inner.state);
                if matches!(e, IpcError::Closed) {
                    // The receiver will see the end of stream too; say so at once.
                    st.closed.get_or_insert(CloseReason::Closed);
                }
                st.pending.remove(&req_id)
            };
            if let Some(p) = mine {
                p.complete(Err(e));
            }
        }
        req_id
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        sock::wake(&self.inner.wake);
        if let Some(t) = self.receiver.take() {
            // A callback may drop the last handle: the receiver then ends on its own.
            if t.thread().id() != std::thread::current().id() && t.join().is_err() {
                error!("IPC receiver thread panicked");
            }
        }
    }
}

/// Reads the primary's first message: its welcome (our client id) or a refusal.
fn wait_welcome(sock: BorrowedFd<'_>, deadline: Instant) -> Result<u64, IpcError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        if !sock::wait_ready(sock, PollFlags::IN, Some(deadline))? {
            return Err(IpcError::Timeout);
        }
        let rx = match sock::recv(sock, &mut buf, true) {
            Ok(rx) => rx,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(IpcError::Io(e)),
        };
        if rx.truncated {
            return Err(IpcError::Protocol("oversized first message".into()));
        }
        if rx.len == 0 {
            return Err(IpcError::Closed);
        }
        let msg = wire::decode(buf.get(..rx.len).unwrap_or_default())
            .map_err(|f| IpcError::Protocol(format!("bad first message: {f:?}")))?;
        return match msg.kind {
            Kind::Reply if msg.status < 0 => Err(IpcError::Remote {
                code: msg.status,
                message: wire::error_message(&msg.payload),
            }),
            Kind::Notification if msg.action == WELCOME_ACTION => msg
                .payload
                .get("client_id")
                .and_then(Value::as_u64)
                .ok_or_else(|| IpcError::Protocol("welcome without a client_id".into())),
            _ => Err(IpcError::Protocol(format!(
                "expected a welcome, got a {:?} {}",
                msg.kind, msg.action
            ))),
        };
    }
}

impl Inner {
    fn receive_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let reason = loop {
            if self.stopping.load(Ordering::SeqCst) {
                break CloseReason::Closed;
            }
            let deadline = self.next_deadline();
            let mut fds = [
                PollFd::new(&self.sock, PollFlags::IN),
                PollFd::new(&self.wake, PollFlags::IN),
            ];
            if let Err(e) = sock::poll_until(&mut fds, deadline) {
                warn!(error = %e, "IPC receiver cannot poll: closing");
                break CloseReason::Closed;
            }
            let [sock_fd, wake_fd] = &fds;
            let (readable, woken) = (!sock_fd.revents().is_empty(), !wake_fd.revents().is_empty());
            if woken {
                sock::drain_wake(&self.wake);
            }
            if readable {
                if let Err(reason) = self.read_batch(&mut buf) {
                    break reason;
                }
            }
            self.expire(Instant::now());
        };
        self.close(reason);
    }

    /// Handles up to [`RECV_BATCH`] queued messages; `Err` when the connection ended.
    fn read_batch(&self, buf: &mut [u8]) -> Result<(), CloseReason> {
        for _ in 0..RECV_BATCH {
            let rx = match sock::recv(self.sock.as_fd(), buf, true) {
                Ok(rx) => rx,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    debug!(error = %e, "IPC receive failed: closing");
                    return Err(self.reason());
                }
            };
            if rx.truncated {
                warn!("IPC message from the primary longer than {MAX_MESSAGE} bytes dropped");
                continue;
            }
            if rx.len == 0 {
                return Err(self.reason());
            }
            self.dispatch(buf.get(..rx.len).unwrap_or_default(), rx.fds);
        }
        Ok(())
    }

    /// The reason to report when the stream ends: a refusal received earlier, or closed.
    fn reason(&self) -> CloseReason {
        lock(&self.state)
            .closed
            .clone()
            .unwrap_or(CloseReason::Closed)
    }

    fn dispatch(&self, bytes: &[u8], fds: Vec<OwnedFd>) {
        let msg = match wire::decode(bytes) {
            Ok(m) => m,
            Err(f) => {
                debug!("bad IPC message from the primary dropped: {f:?}");
                return;
            }
        };
        match msg.kind {
            Kind::Reply if msg.req_id == 0 && msg.status < 0 => {
                // A connection-level error: the primary closes next.
                let reason = CloseReason::Refused {
                    code: msg.status,
                    message: wire::error_message(&msg.payload),
                };
                warn!("IPC primary reports: {}", reason.error());
                lock(&self.state).closed = Some(reason);
            }
            Kind::Reply => {
                let pending = lock(&self.state).pending.remove(&msg.req_id);
                let Some(pending) = pending else {
                    debug!(req_id = msg.req_id, "late or unknown IPC reply discarded");
                    return;
                };
                let result = if msg.status == code::OK {
                    Ok(Reply::with_fds(msg.payload, fds))
                } else {
                    Err(IpcError::Remote {
                        code: msg.status,
                        message: wire::error_message(&msg.payload),
                    })
                };
                pending.complete(result);
            }
            Kind::Notification => {
                let handler = self
                    .handlers
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&msg.action)
                    .cloned();
                let Some(handler) = handler else {
                    debug!(action = %msg.action, "IPC notification without handler dropped");
                    return;
                };
                let n = Notification {
                    action: msg.action,
                    payload: msg.payload,
                };
                if catch_unwind(AssertUnwindSafe(|| handler(&n))).is_err() {
                    error!(action = %n.action, "IPC notification handler panicked");
                }
            }
            Kind::Request => debug!("IPC request from the primary dropped"),
        }
    }

    /// The earliest deadline of an async request.
    fn next_deadline(&self) -> Option<Instant> {
        lock(&self.state)
            .pending
            .values()
            .filter_map(|p| match p {
                Pending::Async { deadline, .. } => Some(*deadline),
                Pending::Sync(_) => None,
            })
            .min()
    }

    /// Completes every async request whose deadline has passed with a timeout.
    fn expire(&self, now: Instant) {
        let expired: Vec<Pending> = {
            let mut st = lock(&self.state);
            let ids: Vec<u64> = st
                .pending
                .iter()
                .filter(|(_, p)| matches!(p, Pending::Async { deadline, .. } if *deadline <= now))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| st.pending.remove(id)).collect()
        };
        for p in expired {
            p.complete(Err(IpcError::Timeout));
        }
    }

    /// Marks the connection closed and fails every pending request.
    fn close(&self, reason: CloseReason) {
        let (drained, reason) = {
            let mut st = lock(&self.state);
            let reason = st.closed.get_or_insert(reason).clone();
            let drained: Vec<Pending> = st.pending.drain().map(|(_, p)| p).collect();
            (drained, reason)
        };
        sock::shutdown(&self.sock);
        for p in drained {
            p.complete(Err(reason.error()));
        }
    }
}
