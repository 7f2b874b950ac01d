//! Errors of the device runtime.

use thiserror::Error;
use uvdpa_virtio::{MemoryError, QueueError, StatusError};

/// What the runtime refused or failed to do. Transports map these into their own replies
/// (a vhost-user failure reply, a VDUSE `VDUSE_REQ_RESULT_FAILED`).
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// Guest memory that cannot be used.
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
    /// A status write or feature set refused by the status machine (virtio 1.2 §2.1).
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
}
