//! uvdpa's vhost-user transport: a backend session per frontend connection, built on the
//! wire definitions of the rust-vmm `vhost` crate (QEMU `docs/interop/vhost-user.rst`).
//!
//! The `vhost` crate's own request dispatcher (`BackendReqHandler`, 0.18) does not route
//! SET_STATUS/GET_STATUS and keeps its socket type private, so the dispatch and socket I/O
//! live here ([`connection`], [`session`]) while every message layout, request code and
//! flag comes from `vhost::vhost_user::message`.

#![deny(missing_docs)]

pub mod connection;
pub mod error;
pub mod handover;
pub mod server;
pub mod session;

pub use error::Error;
pub use handover::SessionHandover;
pub use server::{ServerHandover, ServerOptions, SocketAccess, VhostUserServer};
pub use session::{Session, SessionParams};
pub use uvdpa_runtime::{ResCtx, SessionState};
