//! The primary: listens on a socket path, admits secondaries of its own uid (or root), serves
//! each on its own thread and dispatches their requests to handlers by action.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::fs::Mode;
use rustix::io::Errno;
use rustix::net::SocketFlags;
use serde_json::{json, Value};
use tracing::{debug, error, info, warn};

use crate::error::{code, IpcError};
use crate::sock::{self, Wait};
use crate::types::{Peer, Reply, Request};
use crate::wire::{self, Fault, Kind, ERROR_ACTION, MAX_FDS, MAX_MESSAGE, WELCOME_ACTION};

/// Most secondaries served at once; one more is sent an EBUSY error and closed.
pub const MAX_CLIENTS: usize = 64;
/// Longest a client thread waits for room in its client's socket to send a reply (or the
/// welcome); a client that does not read that long is disconnected.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A request handler: runs on the requesting client's thread; its result is always sent
/// back (an error as an error reply with [`IpcError::code`] and the error's message; a
/// panic as EIO).
pub type Handler = dyn Fn(&Request, &Peer) -> Result<Reply, IpcError> + Send + Sync;
/// A connect or disconnect hook.
pub type Hook = dyn Fn(&Peer) + Send + Sync;

/// Whether a peer with `peer_uid` may talk to a primary running as `own_uid`: only the same
/// uid, or root.
///
/// # Errors
/// [`IpcError::PeerRefused`] with the peer's uid.
pub fn check_peer_uid(peer_uid: u32, own_uid: u32) -> Result<(), IpcError> {
    if peer_uid == own_uid || peer_uid == 0 {
        Ok(())
    } else {
        Err(IpcError::PeerRefused(peer_uid))
    }
}

/// The primary side: the daemon's IPC listener (see the crate documentation).
///
/// Dropping it shuts it down ([`Primary::shutdown`]).
pub struct Primary {
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// The listening socket until [`Primary::start`] hands it to the accept thread.
    listener: Mutex<Option<OwnedFd>>,
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field("path", &self.path())
            .field("clients", &self.clients())
            .finish_non_exhaustive()
    }
}

struct Shared {
    /// Where the socket file is (it moves with [`Primary::move_to`]).
    path: Mutex<PathBuf>,
    /// (device, inode) of the socket file we bound, so shutdown removes only our own file.
    file_id: Option<(u64, u64)>,
    own_uid: u32,
    wake: OwnedFd,
    stopping: AtomicBool,
    next_client: AtomicU64,
    handlers: RwLock<HashMap<String, Arc<Handler>>>,
    clients: Mutex<HashMap<u64, Slot>>,
    on_connect: RwLock<Option<Arc<Hook>>>,
    on_disconnect: RwLock<Option<Arc<Hook>>>,
}

struct Client {
    peer: Peer,
    sock: OwnedFd,
    /// Notifications dropped because the socket was full.
    dropped: AtomicU64,
}

struct Slot {
    client: Arc<Client>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(PoisonError::into_inner).clone()
}

fn write<T>(l: &RwLock<T>, v: T) {
    *l.write().unwrap_or_else(PoisonError::into_inner) = v;
}

impl Primary {
    /// Listens on `path` (mode 0600) and starts accepting secondaries.
    ///
    /// A socket file left at `path` by a dead primary (nothing answers on it) is removed
    /// first; a live one, or anything that is not a socket, is left alone.
    ///
    /// # Errors
    /// [`IpcError::AddressInUse`] if something answers on `path` or it is not a socket,
    /// [`IpcError::Bind`] if the socket cannot be created, bound or listened on.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, IpcError> {
        let p = Self::bind_unstarted(path)?;
        p.start()?;
        Ok(p)
    }

    /// As [`Primary::bind`], but secondaries are not served before [`Primary::start`]:
    /// register the actions in between, so a secondary that connects as soon as the socket
    /// file appears never meets an "unknown action" (its connection waits in the listen
    /// backlog meanwhile).
    ///
    /// # Errors
    /// As [`Primary::bind`].
    pub fn bind_unstarted(path: impl AsRef<Path>) -> Result<Self, IpcError> {
        let path = path.as_ref().to_path_buf();
        let bind_err = |source: io::Error| IpcError::Bind {
            path: path.clone(),
            source,
        };
        remove_stale(&path)?;
        let listener = sock::seqpacket().map_err(bind_err)?;
        let addr = sock::unix_addr(&path).map_err(bind_err)?;
        // The socket file takes the socket inode's mode (minus umask) at bind: make it
        // owner-only from the start, and chmod the file too before anyone can connect
        // (a socket that is not listening refuses connections).
        let owner_only = Mode::RUSR | Mode::WUSR;
        let _ = rustix::fs::fchmod(&listener, owner_only);
        rustix::net::bind(&listener, &addr).map_err(|e| bind_err(e.into()))?;
        let file_id = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let prepared = rustix::fs::chmod(&path, owner_only)
            .and_then(|()| rustix::io::ioctl_fionbio(&listener, true))
            .and_then(|()| rustix::net::listen(&listener, 128));
        if let Err(e) = prepared {
            let _ = std::fs::remove_file(&path);
            return Err(bind_err(e.into()));
        }
        let shared = Arc::new(Shared {
            path: Mutex::new(path.clone()),
            file_id,
            own_uid: rustix::process::getuid().as_raw(),
            wake: sock::new_wake().map_err(bind_err)?,
            stopping: AtomicBool::new(false),
            next_client: AtomicU64::new(1),
            handlers: RwLock::default(),
            clients: Mutex::default(),
            on_connect: RwLock::default(),
            on_disconnect: RwLock::default(),
        });
        info!(path = %path.display(), "IPC primary listening");
        Ok(Self {
            shared,
            acceptor: Mutex::new(None),
            listener: Mutex::new(Some(listener)),
        })
    }

    /// Starts serving secondaries (after [`Primary::bind_unstarted`]; a second call does
    /// nothing).
    ///
    /// # Errors
    /// [`IpcError::Bind`] if the accept thread cannot be started (the socket file is
    /// removed then).
    pub fn start(&self) -> Result<(), IpcError> {
        let Some(listener) = lock(&self.listener).take() else {
            return Ok(());
        };
        let shared = Arc::clone(&self.shared);
        let acceptor = std::thread::Builder::new()
            .name("uvdpa-ipc-accept".into())
            .spawn(move || shared.accept_loop(listener));
        match acceptor {
            Ok(t) => {
                *lock(&self.acceptor) = Some(t);
                Ok(())
            }
            Err(e) => {
                self.shared.remove_socket_file();
                Err(IpcError::Bind {
                    path: self.path(),
                    source: e,
                })
            }
        }
    }

    /// The socket path.
    pub fn path(&self) -> PathBuf {
        lock(&self.shared.path).clone()
    }

    /// Moves the socket file to `to` with rename(2): secondaries connecting to `to` reach
    /// this primary from then on, atomically (a live upgrade binds the new daemon's socket
    /// beside the old one's and moves it over when it takes over). The file at `to`, if
    /// any, is replaced; shutdown then removes the file at `to`, if it is still ours.
    ///
    /// # Errors
    /// The rename failed (the socket stays where it was).
    pub fn move_to(&self, to: impl AsRef<Path>) -> io::Result<()> {
        let mut path = lock(&self.shared.path);
        std::fs::rename(&*path, to.as_ref())?;
        info!(from = %path.display(), to = %to.as_ref().display(), "IPC socket moved");
        *path = to.as_ref().to_path_buf();
        Ok(())
    }

    /// Registers the handler of `action` (as `rte_mp_action_register`).
    ///
    /// # Errors
    /// [`IpcError::InvalidAction`] for a bad name (and for the reserved `ipc.` prefix),
    /// [`IpcError::AlreadyRegistered`] if the action has a handler.
    pub fn register<F>(&self, action: &str, handler: F) -> Result<(), IpcError>
    where
        F: Fn(&Request, &Peer) -> Result<Reply, IpcError> + Send + Sync + 'static,
    {
        wire::check_action(action)?;
        if action.starts_with("ipc.") {
            return Err(IpcError::InvalidAction(action.to_owned()));
        }
        let mut handlers = self
            .shared
            .handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if handlers.contains_key(action) {
            return Err(IpcError::AlreadyRegistered(action.to_owned()));
        }
        handlers.insert(action.to_owned(), Arc::new(handler));
        Ok(())
    }

    /// Removes the handler of `action`; returns whether there was one. Requests already
    /// dispatched finish with it.
    pub fn unregister(&self, action: &str) -> bool {
        self.shared
            .handlers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(action)
            .is_some()
    }

    /// Sets the hook called on a client's thread when it is admitted, before its welcome
    /// and its first request.
    pub fn on_connect(&self, hook: impl Fn(&Peer) + Send + Sync + 'static) {
        write(&self.shared.on_connect, Some(Arc::new(hook) as Arc<Hook>));
    }

    /// Sets the hook called on a client's thread when it disconnects (or is disconnected).
    pub fn on_disconnect(&self, hook: impl Fn(&Peer) + Send + Sync + 'static) {
        write(
            &self.shared.on_disconnect,
            Some(Arc::new(hook) as Arc<Hook>),
        );
    }

    /// The connected secondaries, by client id.
    pub fn clients(&self) -> Vec<Peer> {
        let mut peers: Vec<Peer> = lock(&self.shared.clients)
            .values()
            .map(|s| s.client.peer)
            .collect();
        peers.sort_by_key(|p| p.client_id);
        peers
    }

    /// How many notifications to `client_id` were dropped because its socket was full.
    pub fn dropped_notifications(&self, client_id: u64) -> Option<u64> {
        lock(&self.shared.clients)
            .get(&client_id)
            .map(|s| s.client.dropped.load(Ordering::Relaxed))
    }

    /// Sends a notification to one secondary without ever waiting (as `rte_mp_sendmsg`).
    ///
    /// # Errors
    /// [`IpcError::InvalidAction`], [`IpcError::PayloadTooLarge`],
    /// [`IpcError::UnknownClient`], [`IpcError::ClientBusy`] if its socket is full (the
    /// notification is dropped and counted), [`IpcError::Closed`] if it is going away.
    pub fn notify(&self, client_id: u64, action: &str, payload: &Value) -> Result<(), IpcError> {
        let msg = wire::encode(Kind::Notification, code::OK, 0, action, payload)?;
        let client = lock(&self.shared.clients)
            .get(&client_id)
            .map(|s| Arc::clone(&s.client))
            .ok_or(IpcError::UnknownClient(client_id))?;
        client.notify(&msg)
    }

    /// Sends a notification to every secondary without ever waiting; returns how many got
    /// it. A secondary whose socket is full misses it (counted, see
    /// [`Primary::dropped_notifications`]).
    ///
    /// # Errors
    /// [`IpcError::InvalidAction`], [`IpcError::PayloadTooLarge`].
    pub fn notify_all(&self, action: &str, payload: &Value) -> Result<usize, IpcError> {
        let msg = wire::encode(Kind::Notification, code::OK, 0, action, payload)?;
        let clients: Vec<Arc<Client>> = lock(&self.shared.clients)
            .values()
            .map(|s| Arc::clone(&s.client))
            .collect();
        Ok(clients.iter().filter(|c| c.notify(&msg).is_ok()).count())
    }

    /// Stops accepting, disconnects every secondary, waits for the client threads (each
    /// finishes the handler it is running, if any) and removes the socket file. Idempotent.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        sock::wake(&self.shared.wake);
        let acceptor = lock(&self.acceptor).take();
        let Some(acceptor) = acceptor else {
            return;
        };
        if acceptor.join().is_err() {
            error!("IPC accept thread panicked");
        }
        self.shared.remove_socket_file();
        let slots: Vec<Slot> = lock(&self.shared.clients).drain().map(|(_, s)| s).collect();
        for s in &slots {
            sock::shutdown(&s.client.sock);
        }
        let me = std::thread::current().id();
        for t in slots.into_iter().filter_map(|s| s.thread) {
            // A handler may call shutdown: its own thread ends after it returns.
            if t.thread().id() != me && t.join().is_err() {
                error!("IPC client thread panicked");
            }
        }
        info!(path = %lock(&self.shared.path).display(), "IPC primary shut down");
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a socket file nobody answers on; refuses to touch a live socket or a non-socket.
fn remove_stale(path: &Path) -> Result<(), IpcError> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(IpcError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !md.file_type().is_socket() {
        return Err(IpcError::AddressInUse {
            path: path.to_path_buf(),
        });
    }
    match sock::connect(path) {
        Ok(_) => Err(IpcError::AddressInUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing stale IPC socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(IpcError::Bind {
                    path: path.to_path_buf(),
                    source: e,
                }),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(IpcError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Sends one error message and lets the caller close the connection.
fn refuse(sock: BorrowedFd<'_>, err: &IpcError) {
    let msg = wire::encode_error(0, ERROR_ACTION, err.code(), &err.wire_message());
    let _ = sock::send(sock, &msg, &[], Wait::No);
}

/// What to do after a message.
enum Outcome {
    /// Send this reply and go on.
    Reply { msg: Vec<u8>, fds: Vec<OwnedFd> },
    /// Send this error and close the connection.
    Close { msg: Vec<u8> },
}

fn error_reply(req_id: u64, action: &str, code: i32, message: &str) -> Outcome {
    Outcome::Reply {
        msg: wire::encode_error(req_id, action, code, message),
        fds: Vec::new(),
    }
}

impl Shared {
    fn remove_socket_file(&self) {
        let path = lock(&self.path);
        let same = std::fs::symlink_metadata(&*path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if same.is_some() && same == self.file_id {
            let _ = std::fs::remove_file(&*path);
        }
    }

    fn accept_loop(self: Arc<Self>, listener: OwnedFd) {
        loop {
            let mut fds = [
                PollFd::new(&listener, PollFlags::IN),
                PollFd::new(&self.wake, PollFlags::IN),
            ];
            if let Err(e) = sock::poll_until(&mut fds, None) {
                error!(error = %e, "IPC accept loop cannot poll: no more clients");
                return;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let conn = match rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) {
                Ok(c) => c,
                Err(Errno::AGAIN | Errno::INTR | Errno::CONNABORTED) => continue,
                Err(e) => {
                    // Out of fds or memory: back off rather than spin.
                    warn!(error = %e, "IPC accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            self.admit(conn);
        }
    }

    /// Checks a new connection (uid, client limit) and starts its thread.
    fn admit(self: &Arc<Self>, conn: OwnedFd) {
        let cred = match rustix::net::sockopt::socket_peercred(&conn) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "IPC client without credentials refused");
                return;
            }
        };
        let (pid, uid) = (cred.pid.as_raw_pid(), cred.uid.as_raw());
        if let Err(e) = check_peer_uid(uid, self.own_uid) {
            warn!(pid, uid, "IPC client refused: {e}");
            refuse(conn.as_fd(), &e);
            return;
        }
        let client_id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client {
            peer: Peer {
                pid,
                uid,
                client_id,
            },
            sock: conn,
            dropped: AtomicU64::new(0),
        });
        {
            let mut clients = lock(&self.clients);
            if clients.len() >= MAX_CLIENTS {
                drop(clients);
                warn!(
                    pid,
                    uid, "IPC client refused: {MAX_CLIENTS} clients already"
                );
                refuse(
                    client.sock.as_fd(),
                    &IpcError::TooManyClients { max: MAX_CLIENTS },
                );
                return;
            }
            clients.insert(
                client_id,
                Slot {
                    client: Arc::clone(&client),
                    thread: None,
                },
            );
        }
        let spawned = {
            let shared = Arc::clone(self);
            let client = Arc::clone(&client);
            std::thread::Builder::new()
                .name(format!("uvdpa-ipc-{client_id}"))
                .spawn(move || shared.serve(&client))
        };
        match spawned {
            Ok(t) => {
                if let Some(slot) = lock(&self.clients).get_mut(&client_id) {
                    slot.thread = Some(t);
                }
            }
            Err(e) => {
                lock(&self.clients).remove(&client_id);
                warn!(pid, uid, error = %e, "IPC client refused: no thread");
                refuse(client.sock.as_fd(), &IpcError::Io(e));
            }
        }
    }

    /// A client's thread: hooks, welcome, then one request at a time until it goes away.
    fn serve(&self, client: &Client) {
        let peer = client.peer;
        debug!(?peer, "IPC client connected");
        run_hook(&read(&self.on_connect), &peer);
        let welcome = wire::encode(
            Kind::Notification,
            code::OK,
            0,
            WELCOME_ACTION,
            &json!({ "client_id": peer.client_id, "version": wire::VERSION }),
        );
        let welcomed = welcome.and_then(|w| {
            sock::send(
                client.sock.as_fd(),
                &w,
                &[],
                Wait::Until(Instant::now() + REPLY_TIMEOUT),
            )
            .map_err(IpcError::Io)
        });
        if let Err(e) = welcomed {
            debug!(?peer, "IPC client not welcomed: {}", e.wire_message());
        } else {
            self.serve_requests(client);
        }
        lock(&self.clients).remove(&peer.client_id);
        run_hook(&read(&self.on_disconnect), &peer);
        debug!(?peer, "IPC client disconnected");
    }

    fn serve_requests(&self, client: &Client) {
        let peer = client.peer;
        let mut buf = vec![0u8; MAX_MESSAGE];
        while !self.stopping.load(Ordering::SeqCst) {
            let rx = match sock::recv(client.sock.as_fd(), &mut buf, false) {
                Ok(rx) => rx,
                Err(e) => {
                    debug!(?peer, error = %e, "IPC receive failed");
                    return;
                }
            };
            if rx.truncated {
                warn!(
                    ?peer,
                    "IPC message longer than {MAX_MESSAGE} bytes: closing the connection"
                );
                return;
            }
            if rx.len == 0 {
                // End of stream (an empty record is no message either).
                return;
            }
            let bytes = buf.get(..rx.len).unwrap_or_default();
            match self.process(&peer, bytes, rx.fds, rx.fds_truncated) {
                Outcome::Reply { msg, fds } => {
                    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
                    let deadline = Instant::now() + REPLY_TIMEOUT;
                    if let Err(e) =
                        sock::send(client.sock.as_fd(), &msg, &borrowed, Wait::Until(deadline))
                    {
                        debug!(?peer, error = %e, "IPC reply not sent: closing the connection");
                        return;
                    }
                }
                Outcome::Close { msg } => {
                    let _ = sock::send(client.sock.as_fd(), &msg, &[], Wait::No);
                    return;
                }
            }
        }
    }

    /// Validates one message and runs its handler, in a fixed order: header, fds, kind,
    /// status, action, handler. Always yields a reply (or a final error).
    fn process(
        &self,
        peer: &Peer,
        bytes: &[u8],
        fds: Vec<OwnedFd>,
        fds_truncated: bool,
    ) -> Outcome {
        let msg = match wire::decode(bytes) {
            Ok(m) => m,
            Err(Fault::Fatal { code, message }) => {
                debug!(?peer, "bad IPC message: {message}; closing the connection");
                return Outcome::Close {
                    msg: wire::encode_error(0, ERROR_ACTION, code, &message),
                };
            }
            Err(Fault::Reply {
                req_id,
                action,
                code,
                message,
            }) => {
                debug!(?peer, req_id, "bad IPC message: {message}");
                return error_reply(req_id, &action, code, &message);
            }
        };
        let refuse = |code: i32, message: &str| {
            debug!(?peer, req_id = msg.req_id, action = %msg.action, "IPC request refused: {message}");
            error_reply(msg.req_id, &msg.action, code, message)
        };
        if fds_truncated {
            drop(fds);
            return refuse(code::E2BIG, &format!("more than {MAX_FDS} fds attached"));
        }
        if msg.kind != Kind::Request {
            return refuse(
                code::EINVAL,
                &format!("expected a request (kind 1), got {:?}", msg.kind),
            );
        }
        if msg.status != code::OK {
            return refuse(code::EINVAL, "a request's status must be 0");
        }
        let handler = self
            .handlers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&msg.action)
            .cloned();
        let Some(handler) = handler else {
            return refuse(code::ENOENT, &format!("unknown action {}", msg.action));
        };
        let req = Request {
            action: msg.action,
            req_id: msg.req_id,
            payload: msg.payload,
            fds,
        };
        let result = catch_unwind(AssertUnwindSafe(|| handler(&req, peer))).unwrap_or_else(|_| {
            error!(?peer, action = %req.action, "IPC handler panicked");
            Err(IpcError::rejected(
                code::EIO,
                format!("handler for {} panicked", req.action),
            ))
        });
        let reply = result.and_then(|reply| {
            if reply.fds.len() > MAX_FDS {
                return Err(IpcError::TooManyFds { max: MAX_FDS });
            }
            let msg = wire::encode(
                Kind::Reply,
                code::OK,
                req.req_id,
                &req.action,
                &reply.payload,
            )?;
            Ok(Outcome::Reply {
                msg,
                fds: reply.fds,
            })
        });
        reply.unwrap_or_else(|e| {
            debug!(?peer, req_id = req.req_id, action = %req.action, "IPC request failed: {}", e.wire_message());
            error_reply(req.req_id, &req.action, e.code(), &e.wire_message())
        })
    }
}

impl Client {
    fn notify(&self, msg: &[u8]) -> Result<(), IpcError> {
        match sock::send(self.sock.as_fd(), msg, &[], Wait::No) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged at 1, 2, 4, 8, ... drops: a stuck client cannot flood the log.
                if n.is_power_of_two() {
                    warn!(peer = ?self.peer, dropped = n, "IPC client is not reading: notification dropped");
                }
                Err(IpcError::ClientBusy(self.peer.client_id))
            }
            Err(e) => {
                debug!(peer = ?self.peer, error = %e, "IPC notification not sent");
                Err(IpcError::Closed)
            }
        }
    }
}

fn run_hook(hook: &Option<Arc<Hook>>, peer: &Peer) {
    if let Some(hook) = hook {
        if catch_unwind(AssertUnwindSafe(|| hook(peer))).is_err() {
            error!(?peer, "IPC connect/disconnect hook panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_check() {
        assert!(check_peer_uid(1000, 1000).is_ok());
        assert!(check_peer_uid(0, 1000).is_ok(), "root is allowed");
        assert!(check_peer_uid(0, 0).is_ok());
        let e = check_peer_uid(1001, 1000).unwrap_err();
        assert!(matches!(e, IpcError::PeerRefused(1001)));
        assert_eq!(e.code(), code::EPERM);
        assert_eq!(e.wire_message(), "uid 1001 not allowed");
        assert!(
            check_peer_uid(1000, 0).is_err(),
            "root primary admits root only"
        );
    }
}
