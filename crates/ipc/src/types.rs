//! What handlers and callbacks see: requests, replies, notifications and peers.

use std::os::fd::OwnedFd;

use serde_json::Value;

/// A request as the primary's handler receives it.
///
/// The fds are closed when the request is dropped, after the handler returns; a handler
/// that keeps one duplicates it (`OwnedFd::try_clone`).
#[derive(Debug)]
pub struct Request {
    /// The action it names (a handler is registered for it).
    pub action: String,
    /// The id chosen by the secondary; the reply carries it back.
    pub req_id: u64,
    /// The JSON payload (`null` when the payload is empty).
    pub payload: Value,
    /// The fds that came with it (at most [`crate::MAX_FDS`], close-on-exec).
    pub fds: Vec<OwnedFd>,
}

/// A successful reply: a JSON payload and up to [`crate::MAX_FDS`] fds.
///
/// On the primary the fds are sent and then closed; on the secondary they are the
/// received, close-on-exec fds, owned by the caller.
#[derive(Debug, Default)]
pub struct Reply {
    /// The JSON payload (at most [`crate::MAX_PAYLOAD`] bytes once serialized).
    pub payload: Value,
    /// The fds it carries.
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    /// A reply with `payload` and no fds.
    pub fn new(payload: Value) -> Self {
        Self {
            payload,
            fds: Vec::new(),
        }
    }

    /// A reply with `payload` and `fds`.
    pub fn with_fds(payload: Value, fds: Vec<OwnedFd>) -> Self {
        Self { payload, fds }
    }
}

/// A notification as the secondary's handler receives it.
#[derive(Debug)]
pub struct Notification {
    /// The action it names.
    pub action: String,
    /// The JSON payload (`null` when the payload is empty).
    pub payload: Value,
}

/// A connected secondary, as the primary knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Its process id, from SO_PEERCRED at connect time.
    pub pid: i32,
    /// Its user id, from SO_PEERCRED at connect time.
    pub uid: u32,
    /// The id the primary gave the connection (from 1, never reused while it runs).
    pub client_id: u64,
}
