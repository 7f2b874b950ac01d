//! Primary/secondary messaging for uvdpa, with fd passing, in the spirit of DPDK's `rte_mp`.
//!
//! The daemon is the **primary**: it listens on a Unix `SOCK_SEQPACKET` socket (mode 0600)
//! and registers a handler per named action ([`Primary::register`], as
//! `rte_mp_action_register`). The CLI and helper processes are **secondaries**: they send
//! requests that name an action and wait for the reply with a deadline
//! ([`Secondary::request_sync`], [`Secondary::request_async`]); replies may carry fds. The
//! primary can also push notifications ([`Primary::notify`], [`Primary::notify_all`], as
//! `rte_mp_sendmsg`).
//!
//! # Trust and limits
//! - Each connection's peer credentials are read with SO_PEERCRED; a uid other than the
//!   primary's own (or root) is sent one error (`EPERM`, `"uid U not allowed"`) and closed
//!   ([`check_peer_uid`]).
//! - At most [`MAX_CLIENTS`] secondaries; another is sent `EBUSY` and closed.
//! - Every request is validated before its handler runs, always in the same order (see
//!   below), and always gets exactly one reply: an unknown action, a bad message, a handler
//!   error or a handler panic become an error reply, never a crash.
//! - Each secondary has its own thread on the primary: a slow handler delays only its own
//!   client. Notifications are sent with `MSG_DONTWAIT`: a secondary that does not read its
//!   socket misses them (they are counted and logged), and never stalls the primary.
//! - Bounded everything: payload ([`MAX_PAYLOAD`]), fds per message ([`MAX_FDS`]), clients
//!   ([`MAX_CLIENTS`]), requests awaiting a reply per secondary ([`MAX_PENDING`]), and every
//!   wait (request deadlines, [`REPLY_TIMEOUT`], [`CONNECT_TIMEOUT`]).
//!
//! # Wire format (version 1)
//! One message per SEQPACKET record: an 88-byte header, little-endian, then the payload.
//!
//! | offset | size | field         | meaning                                                       |
//! |-------:|-----:|---------------|---------------------------------------------------------------|
//! | 0      | 4    | `magic`       | `"UVDP"` (`0x50445655` as a `u32`)                            |
//! | 4      | 2    | `version`     | 1                                                             |
//! | 6      | 1    | `kind`        | 1 request, 2 reply, 3 notification                            |
//! | 7      | 1    | `reserved`    | 0                                                             |
//! | 8      | 4    | `status`      | `i32`: 0 ok, else a negated Linux errno ([`code`])            |
//! | 12     | 8    | `req_id`      | `u64` chosen by the secondary, echoed in the reply; 0 otherwise |
//! | 20     | 64   | `action`      | 1..=64 bytes of `[a-z0-9._-]`, NUL-padded                      |
//! | 84     | 4    | `payload_len` | `u32`, bytes of JSON that follow (at most [`MAX_PAYLOAD`])     |
//!
//! The payload is JSON (an empty payload reads as `null`). Up to [`MAX_FDS`] fds ride with
//! the record as SCM_RIGHTS. An error reply has `status < 0` and payload
//! `{"error": "message"}`.
//!
//! A connection starts with one message from the primary: either the notification
//! `ipc.welcome` with payload `{"client_id": N, "version": 1}`, or an error reply with
//! `req_id` 0 (refused: `EPERM` wrong uid, `EBUSY` too many clients) after which the
//! primary closes. Action names starting with `ipc.` are reserved.
//!
//! # How the primary treats each record
//! 1. Longer than 88 + [`MAX_PAYLOAD`] bytes (MSG_TRUNC): logged, connection closed.
//! 2. Empty (end of stream): connection closed.
//! 3. Shorter than the header, or wrong magic: error reply with `req_id` 0 (`EPROTO`),
//!    connection closed — the header cannot be trusted.
//! 4. Wrong version: error reply `EPROTONOSUPPORT`. Then each of these is an error reply to
//!    the message's `req_id` and the connection goes on: unknown kind, non-zero reserved
//!    byte or invalid action name (`EINVAL`); `payload_len` different from the bytes
//!    received (`EINVAL`); payload that is not JSON (`EINVAL`); more than [`MAX_FDS`] fds
//!    (MSG_CTRUNC, `E2BIG`, every received fd closed); a kind other than request or a
//!    non-zero status (`EINVAL`); an action without handler (`ENOENT`,
//!    `"unknown action X"`).
//! 5. The handler runs; its error becomes an error reply with [`IpcError::code`], a panic
//!    becomes `EIO`. A reply too large or with too many fds becomes `EMSGSIZE` / `E2BIG`.
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use serde_json::json;
//! use uvdpa_ipc::{IpcError, Primary, Reply, Secondary, code};
//!
//! # fn main() -> Result<(), IpcError> {
//! let primary = Primary::bind("/run/uvdpa/ipc.sock")?;
//! primary.register("dev.show", |req, _peer| match req.payload["name"].as_str() {
//!     Some("blk0") => Ok(Reply::new(json!({"name": "blk0", "type": "blk"}))),
//!     Some(name) => Err(IpcError::rejected(code::ENOENT, format!("no device {name}"))),
//!     None => Err(IpcError::rejected(code::EINVAL, "name missing")),
//! })?;
//!
//! let cli = Secondary::connect("/run/uvdpa/ipc.sock")?;
//! let reply = cli.request_sync("dev.show", &json!({"name": "blk0"}), &[], Duration::from_secs(1))?;
//! assert_eq!(reply.payload["type"], "blk");
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod error;
pub mod primary;
pub mod secondary;
mod sock;
pub mod types;
pub mod wire;

pub use error::{code, IpcError};
pub use primary::{check_peer_uid, Handler, Hook, Primary, MAX_CLIENTS, REPLY_TIMEOUT};
pub use secondary::{NotificationHandler, Secondary, CONNECT_TIMEOUT, MAX_PENDING};
pub use types::{Notification, Peer, Reply, Request};
pub use wire::{MAX_FDS, MAX_PAYLOAD};
