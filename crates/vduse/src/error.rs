//! The crate's error type for the control device, the device fd and the IOTLB.

use std::path::PathBuf;

use rustix::io::Errno;
use thiserror::Error;

use crate::message::MessageError;

/// Errors from the VDUSE control device, a device fd, or IOTLB mapping.
#[derive(Debug, Error)]
pub enum VduseError {
    /// Opening `/dev/vduse/control` or `/dev/vduse/NAME` failed (ENOENT: no VDUSE module
    /// or no such device; EACCES/EPERM: not allowed).
    #[error("Opening {path} failed: {errno}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error from open(2).
        errno: Errno,
    },
    /// `/dev/vduse/NAME` is already open in another process (or file description): the
    /// kernel allows one at a time (EBUSY).
    #[error("VDUSE device {name} is already open elsewhere")]
    Busy {
        /// Device name.
        name: String,
    },
    /// The name cannot be a VDUSE device name.
    #[error("Invalid VDUSE device name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A device specification or argument is out of the kernel's bounds.
    #[error("Invalid VDUSE argument: {what}")]
    InvalidArgument {
        /// What is wrong.
        what: String,
    },
    /// VDUSE_CREATE_DEV: a device with this name already exists (EEXIST). After a daemon
    /// restart this is the device to reattach to.
    #[error("VDUSE device {name} already exists")]
    Exists {
        /// Device name.
        name: String,
    },
    /// VDUSE_DESTROY_DEV: no device has this name (the kernel says EINVAL).
    #[error("No VDUSE device named {name}")]
    NoSuchDevice {
        /// Device name.
        name: String,
    },
    /// An ioctl failed.
    #[error("{op} failed: {errno}")]
    Ioctl {
        /// The ioctl's name, e.g. `VDUSE_VQ_SETUP`.
        op: &'static str,
        /// The error it returned.
        errno: Errno,
    },
    /// read(2) of a request failed.
    #[error("Reading a VDUSE request failed: {errno}")]
    Read {
        /// The error from read(2).
        errno: Errno,
    },
    /// write(2) of a response failed (ENOENT: the kernel has no request with that id,
    /// e.g. it timed out waiting; EINVAL: malformed).
    #[error("Writing a VDUSE response failed: {errno}")]
    Write {
        /// The error from write(2).
        errno: Errno,
    },
    /// write(2) took only part of a response.
    #[error("Short write of a VDUSE response: {written} of {len} bytes")]
    ShortWrite {
        /// Bytes written.
        written: usize,
        /// Response size.
        len: usize,
    },
    /// A request read from the fd is malformed.
    #[error("Malformed VDUSE request")]
    Message(#[from] MessageError),
    /// The kernel returned an IOTLB entry that cannot be used (empty or inverted range,
    /// unknown permission, not overlapping the range asked for, or larger than allowed).
    #[error(
        "Unusable IOTLB entry {start:#x}..={last:#x} perm {perm} for {asked_start:#x}..={asked_last:#x}: {reason}"
    )]
    IotlbEntry {
        /// Entry start.
        start: u64,
        /// Entry last.
        last: u64,
        /// Entry permission byte.
        perm: u8,
        /// Start of the range asked for.
        asked_start: u64,
        /// Last of the range asked for.
        asked_last: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Mapping an IOTLB entry failed.
    #[error("Mapping IOTLB entry {start:#x}..={last:#x} failed")]
    Map {
        /// Entry start.
        start: u64,
        /// Entry last.
        last: u64,
        /// The memory error.
        #[source]
        source: uvdpa_virtio::MemoryError,
    },
}

impl VduseError {
    /// The errno behind this error, if it came from a system call.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Open { errno, .. }
            | Self::Ioctl { errno, .. }
            | Self::Read { errno }
            | Self::Write { errno } => Some(*errno),
            _ => None,
        }
    }
}
