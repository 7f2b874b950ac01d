//! The crate's error type and the status codes carried in a reply header.

use std::io;
use std::path::PathBuf;

/// Status codes of the wire header: `0` is success, anything else is a negated Linux errno
/// value. The values are fixed by the wire format, whatever the host's errno numbering.
pub mod code {
    /// Success.
    pub const OK: i32 = 0;
    /// The peer is not allowed (wrong uid).
    pub const EPERM: i32 = -1;
    /// No such action (or object).
    pub const ENOENT: i32 = -2;
    /// A handler failed unexpectedly (it panicked, or an I/O error had no better code).
    pub const EIO: i32 = -5;
    /// Too many fds attached to one message.
    pub const E2BIG: i32 = -7;
    /// Resource busy: the primary already serves its maximum number of clients.
    pub const EBUSY: i32 = -16;
    /// Invalid request: bad kind, action name, length or JSON payload.
    pub const EINVAL: i32 = -22;
    /// Protocol error: a message that breaks the wire format.
    pub const EPROTO: i32 = -71;
    /// Message (payload) too large.
    pub const EMSGSIZE: i32 = -90;
    /// Wire version not supported.
    pub const EPROTONOSUPPORT: i32 = -93;
    /// The other side shut down.
    pub const ESHUTDOWN: i32 = -108;
    /// Timed out.
    pub const ETIMEDOUT: i32 = -110;
}

/// Everything that can go wrong in primary/secondary messaging.
///
/// On the primary, a handler returns one of these to refuse a request; the secondary then
/// receives an error reply with [`IpcError::code`] as status and the error's message, and
/// sees it as [`IpcError::Remote`]. Handlers usually return [`IpcError::Rejected`].
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// A socket operation failed.
    #[error("Socket operation failed")]
    Io(#[from] io::Error),
    /// Binding the primary's socket to its path failed.
    #[error("Cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Connecting to the primary's socket failed.
    #[error("Cannot connect to {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A live primary already answers on the path, or the path is not a socket: it is left
    /// alone.
    #[error("{path} is in use")]
    AddressInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// No reply arrived before the request's deadline (a reply arriving later is discarded).
    #[error("No reply before the deadline")]
    Timeout,
    /// The other side answered with an error status.
    #[error("Remote error {code}: {message}")]
    Remote {
        /// The negative status code of the reply (see [`code`]).
        code: i32,
        /// The reply's `error` message.
        message: String,
    },
    /// A handler refused a request: the secondary receives `code` and `message`.
    #[error("{message}")]
    Rejected {
        /// The negative status code to send (see [`code`]).
        code: i32,
        /// A message for the secondary's user.
        message: String,
    },
    /// A message broke the wire format.
    #[error("Protocol violation: {0}")]
    Protocol(String),
    /// The peer's uid is neither the primary's own uid nor root.
    #[error("uid {0} not allowed")]
    PeerRefused(u32),
    /// The connection is closed (peer gone, or this side shut down).
    #[error("Connection closed")]
    Closed,
    /// Too many requests await a reply on this connection (see [`crate::MAX_PENDING`]).
    #[error("Too many requests await a reply")]
    TooManyPending,
    /// The primary already serves [`crate::MAX_CLIENTS`] clients.
    #[error("Too many clients (at most {max})")]
    TooManyClients {
        /// The limit.
        max: usize,
    },
    /// An action name is empty, longer than 64 bytes or uses characters outside
    /// `[a-z0-9._-]`.
    #[error("Invalid action name {0:?}")]
    InvalidAction(String),
    /// An action already has a handler.
    #[error("Action {0:?} already has a handler")]
    AlreadyRegistered(String),
    /// A payload is larger than [`crate::MAX_PAYLOAD`] once serialized.
    #[error("Payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Serialized size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More fds than [`crate::MAX_FDS`] were attached to one message.
    #[error("Too many fds (at most {max})")]
    TooManyFds {
        /// The limit.
        max: usize,
    },
    /// No connected client has this id.
    #[error("No client {0}")]
    UnknownClient(u64),
    /// A notification was dropped because the client's socket is full (it is not reading).
    #[error("Client {0} is not reading its socket: notification dropped")]
    ClientBusy(u64),
}

impl IpcError {
    /// Shorthand for [`IpcError::Rejected`].
    pub fn rejected(code: i32, message: impl Into<String>) -> Self {
        Self::Rejected {
            code,
            message: message.into(),
        }
    }

    /// The negative status code that reports this error on the wire.
    pub fn code(&self) -> i32 {
        let c = match self {
            Self::Rejected { code, .. } | Self::Remote { code, .. } => *code,
            Self::Io(_) | Self::Bind { .. } | Self::Connect { .. } => code::EIO,
            Self::AddressInUse { .. } | Self::TooManyClients { .. } | Self::ClientBusy(_) => {
                code::EBUSY
            }
            Self::Timeout => code::ETIMEDOUT,
            Self::Protocol(_) => code::EPROTO,
            Self::PeerRefused(_) => code::EPERM,
            Self::Closed => code::ESHUTDOWN,
            Self::TooManyPending => code::EBUSY,
            Self::InvalidAction(_) | Self::AlreadyRegistered(_) => code::EINVAL,
            Self::PayloadTooLarge { .. } => code::EMSGSIZE,
            Self::TooManyFds { .. } => code::E2BIG,
            Self::UnknownClient(_) => code::ENOENT,
        };
        // A success or positive code would make an error reply look like a success.
        if c < 0 {
            c
        } else {
            code::EIO
        }
    }

    /// The message sent in an error reply: this error and its sources, joined by `": "`.
    pub fn wire_message(&self) -> String {
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_negative() {
        let errors = [
            IpcError::rejected(0, "zero"),
            IpcError::rejected(5, "positive"),
            IpcError::Timeout,
            IpcError::Closed,
            IpcError::Io(io::Error::other("x")),
            IpcError::PeerRefused(1000),
        ];
        for e in errors {
            assert!(e.code() < 0, "{e:?}");
        }
        assert_eq!(IpcError::rejected(code::ENOENT, "x").code(), code::ENOENT);
        assert_eq!(IpcError::PeerRefused(7).code(), code::EPERM);
    }

    #[test]
    fn wire_message_includes_sources() {
        let e = IpcError::Bind {
            path: "/x".into(),
            source: io::Error::other("boom"),
        };
        assert_eq!(e.wire_message(), "Cannot listen on /x: boom");
        assert_eq!(
            IpcError::PeerRefused(42).wire_message(),
            "uid 42 not allowed"
        );
    }
}
