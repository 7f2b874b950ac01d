//! Errors of a vhost-user session.

use thiserror::Error;
use uvdpa_virtio::{MemoryError, QueueError, StatusError};

/// What went wrong while serving a frontend. [`Error::ends_session`] says whether the
/// session can go on (the frontend gets a failure reply) or must be closed.
#[derive(Debug, Error)]
pub enum Error {
    /// The frontend closed the connection.
    #[error("Frontend disconnected")]
    Disconnected,
    /// Reading or writing the socket failed.
    #[error("Socket I/O failed: {0}")]
    Socket(rustix::io::Errno),
    /// A header with a wrong version, the reply flag, or reserved flag bits.
    #[error("Bad message header flags {flags:#x}")]
    BadHeader {
        /// The flags field received.
        flags: u32,
    },
    /// A request code this backend does not know.
    #[error("Unknown or unsupported request code {0}")]
    UnknownRequest(u32),
    /// A body larger than the protocol allows.
    #[error("Message body of {size} bytes exceeds {max}")]
    OversizedBody {
        /// Size announced.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// A body whose size does not match the request.
    #[error("{request} body is {got} bytes, expected {expected}")]
    BadBodySize {
        /// Request name.
        request: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// More fds than a message may carry.
    #[error("Too many fds attached (at most {max})")]
    TooManyFds {
        /// Limit.
        max: usize,
    },
    /// The wrong number of fds for this request.
    #[error("{request} carries {got} fds, expected {expected}")]
    WrongFdCount {
        /// Request name.
        request: &'static str,
        /// Fds received.
        got: usize,
        /// Fds expected.
        expected: usize,
    },
    /// A field of the request has an invalid value.
    #[error("Invalid {request}: {reason}")]
    InvalidParam {
        /// Request name.
        request: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A request that needs a protocol feature the frontend did not negotiate.
    #[error("{request} needs protocol feature {feature} which was not negotiated")]
    FeatureNotNegotiated {
        /// Request name.
        request: &'static str,
        /// The protocol feature.
        feature: &'static str,
    },
    /// Virtio features outside the device's offer (seed 002: `features & ~device`).
    #[error("Features {unknown:#x} are not offered by the device")]
    UnofferedFeatures {
        /// The unknown bits.
        unknown: u64,
    },
    /// A vring index past the device's queues.
    #[error("Vring index {index} out of range (device has {num} queues)")]
    VringIndex {
        /// Index received.
        index: u32,
        /// Number of queues.
        num: u16,
    },
    /// A memory table that would map more than the device allows (attribute
    /// `max_memory`); nothing of it was mapped.
    #[error("Memory table refused: it maps {total} bytes, more than the device's max_memory of {limit} bytes")]
    MemoryLimit {
        /// Bytes of address space the table would map (each region's `mmap_offset +
        /// memory_size`, summed; `u64::MAX` when the sum overflows).
        total: u64,
        /// The device's `max_memory`.
        limit: u64,
    },
    /// A memory table that cannot be used.
    #[error("Memory table refused: {0}")]
    Memory(#[from] MemoryError),
    /// A vring that cannot be started.
    #[error("Vring {index} cannot start: {source}")]
    Vring {
        /// Vring index.
        index: u16,
        /// Why.
        source: QueueError,
    },
    /// A status write refused by the status machine.
    #[error("SET_STATUS refused: {0}")]
    Status(#[from] StatusError),
    /// The device refused (config write, queue handler).
    #[error("Device refused: {0}")]
    Device(String),
    /// Starting or stopping a queue worker failed.
    #[error("Queue worker for vring {index}: {reason}")]
    Worker {
        /// Vring index.
        index: u16,
        /// Why.
        reason: String,
    },
    /// A live upgrade cannot hand this session over, or the state handed over is not
    /// one a session can be rebuilt from.
    #[error("Session handover: {0}")]
    Handover(String),
}

impl Error {
    /// Whether the session must end: the connection is gone or the stream can no longer be
    /// trusted to be in step. Other errors are answered with a failure reply where the
    /// frontend asked for one.
    pub fn ends_session(&self) -> bool {
        matches!(
            self,
            Error::Disconnected
                | Error::Socket(_)
                | Error::BadHeader { .. }
                | Error::UnknownRequest(_)
                | Error::OversizedBody { .. }
                | Error::TooManyFds { .. }
        )
    }
}

impl From<uvdpa_runtime::RuntimeError> for Error {
    fn from(e: uvdpa_runtime::RuntimeError) -> Self {
        use uvdpa_runtime::RuntimeError as R;
        match e {
            R::Memory(m) => Self::Memory(m),
            R::Vring { index, source } => Self::Vring { index, source },
            R::Status(s) => Self::Status(s),
            R::Device(d) => Self::Device(d),
            R::Worker { index, reason } => Self::Worker { index, reason },
        }
    }
}
