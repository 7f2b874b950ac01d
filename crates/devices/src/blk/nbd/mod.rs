//! The `nbd` backend: a virtio-blk device whose sectors live on an NBD server (the NBD
//! protocol, `doc/proto.md` of NetworkBlockDevice/nbd), e.g. nbdkit or qemu-nbd.
//!
//! # Why a client of our own
//! The maintained NBD client library is libnbd. Its Rust bindings (crate `libnbd`) need
//! libnbd 1.18 or later, while Debian 12 ships 1.14 (no Rust bindings); and its read and
//! write calls take one contiguous buffer (`nbd_aio_pread`), where a virtio-blk request
//! is a scatter-gather list of guest buffers: every multi-segment request would need a
//! bounce copy or one command per segment. Its asynchronous Rust API runs on Tokio, not
//! in a queue worker's epoll loop. The `nbd` crate is synchronous, one request at a time,
//! without structured replies. So the client is written here, for exactly the data path
//! a queue worker needs: non-blocking sockets, many requests in flight per connection
//! matched by cookie, and `sendmsg`/`readv` straight between the socket and guest memory.
//!
//! # What it speaks
//! - Handshake (`handshake`): fixed newstyle, `NBD_OPT_STRUCTURED_REPLY` when the server
//!   knows it, `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE` (falling back to
//!   `NBD_OPT_EXPORT_NAME` for servers without `NBD_OPT_GO`). TLS is not supported yet.
//! - Commands: READ (split at the server's maximum payload, at most 32 MiB), WRITE,
//!   FLUSH, TRIM, WRITE_ZEROES (with `NBD_CMD_FLAG_NO_HOLE` unless the driver allowed
//!   unmapping; `NBD_CMD_FLAG_FAST_ZERO` is never sent: virtio-blk has no "fail if slow"
//!   write-zeroes).
//! - Replies: simple, and structured (`OFFSET_DATA`, `OFFSET_HOLE`, `NONE`, error chunks)
//!   in any order and interleaved, each checked against the request it names.
//!
//! # The device
//! [`BlkDevice::new`](super::BlkDevice::new) connects once to learn the export (size,
//! flags, block sizes) and fails with the server's reason when it refuses. The device
//! offers what the export can do: VIRTIO_BLK_F_FLUSH only with `NBD_FLAG_SEND_FLUSH`,
//! DISCARD with `NBD_FLAG_SEND_TRIM`, WRITE_ZEROES with `NBD_FLAG_SEND_WRITE_ZEROES`, and
//! RO when the export is read-only (`NBD_FLAG_READ_ONLY`) or the device is. The export's
//! minimum block size must not exceed the logical block size; the capacity is the export
//! size rounded down to the logical block size.
//!
//! Each queue worker owns one connection (`group::NbdGroup`). With `connections = N`
//! (where the server advertises `NBD_FLAG_CAN_MULTI_CONN`; otherwise 1) queue `i` runs in
//! worker `i % N`, so the queues share N connections and N threads.
//!
//! # Failures
//! See `group`: a lost connection is re-established with backoff; requests in flight
//! are resent on the new connection when it comes back within `reconnect_delay`, and fail
//! with VIRTIO_BLK_S_IOERR after it. Every request fails with IOERR at the latest
//! `timeout` after it was taken from the ring, and a worker stop waits at most
//! `group::STOP_BUDGET` for requests in flight.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use thiserror::Error;

pub(super) mod group;
mod handshake;
mod proto;
mod uri;

pub use handshake::ExportInfo;
pub use proto::TransmissionFlags;
pub use uri::{NbdAddress, NbdUri, MAX_EXPORT_NAME, NBD_DEFAULT_PORT};

use super::{BlkError, SECTOR_SIZE};

/// Default `timeout`: a request not answered within it fails with IOERR.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one connection attempt (connect and handshake) may block a queue worker when
/// it reconnects: below the runtime's stop timeout, so a worker stop is never stuck
/// behind it.
pub const RECONNECT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `dev add` waits for the server's handshake.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// The attributes of an `nbd` backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdSpec {
    /// The server and export.
    pub uri: NbdUri,
    /// Connections to open (1..=queues): used only where the server advertises
    /// `NBD_FLAG_CAN_MULTI_CONN`, otherwise one.
    pub connections: u16,
    /// After a lost connection, how long requests wait for a reconnect before failing with
    /// IOERR (QEMU's `reconnect-delay`; zero: they fail at once, and new requests fail
    /// until the connection is back).
    pub reconnect_delay: Duration,
    /// The longest a request may take from the ring to its reply; after it, the request
    /// fails with IOERR and the connection is re-established.
    pub timeout: Duration,
}

/// Why talking to an NBD server failed.
#[derive(Debug, Error)]
pub enum NbdError {
    /// No connection to the server.
    #[error("Connecting to {address} failed")]
    Connect {
        /// The server (`HOST:PORT` or the socket path).
        address: String,
        /// The error from connect or name resolution.
        #[source]
        source: io::Error,
    },
    /// The connection failed during the handshake.
    #[error("The NBD handshake failed while {step}")]
    Handshake {
        /// What the client was doing.
        step: &'static str,
        /// The socket error (a timeout included).
        #[source]
        source: io::Error,
    },
    /// The server refused the export (or an option the client needs).
    #[error("The NBD server refused export {export:?}: {reply}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused {
        /// The export name asked for.
        export: String,
        /// The reply type, e.g. `NBD_REP_ERR_UNKNOWN`.
        reply: &'static str,
        /// The server's message (may be empty).
        message: String,
    },
    /// The server broke the protocol.
    #[error("The NBD server broke the protocol: {0}")]
    Protocol(String),
}

impl NbdUri {
    /// The server part, for messages: `HOST:PORT` or the socket path.
    pub fn address_string(&self) -> String {
        match &self.address {
            NbdAddress::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            NbdAddress::Tcp { host, port } => format!("{host}:{port}"),
            NbdAddress::Unix { socket } => socket.display().to_string(),
        }
    }
}

/// An NBD export as a disk: what the probe at open learnt, shared by the queue workers
/// (each opens its own connection).
#[derive(Debug)]
pub(crate) struct NbdDisk {
    pub(crate) spec: NbdSpec,
    /// The export as the probe saw it.
    pub(crate) info: ExportInfo,
    /// Capacity in bytes (the export size rounded down to the logical block size).
    size: AtomicU64,
    /// Connections (and so queue workers) in use: `spec.connections` with multi-conn, 1
    /// without.
    pub(crate) connections: u16,
}

impl NbdDisk {
    /// Connects to the export once (handshake, then `NBD_CMD_DISC`) to learn its size,
    /// flags and block sizes, and checks them against the device.
    ///
    /// # Errors
    /// [`BlkError::Nbd`] when the server cannot be reached or refuses (with its reason),
    /// [`BlkError::NbdExport`] when the export does not fit the device (block size,
    /// size).
    pub(crate) fn open(spec: &NbdSpec, logical_block_size: u32) -> Result<Self, BlkError> {
        let (fd, info) =
            handshake::connect(&spec.uri, OPEN_TIMEOUT).map_err(|source| BlkError::Nbd {
                uri: spec.uri.to_string(),
                source,
            })?;
        handshake::disconnect(&fd);
        drop(fd);
        let export_err = |reason: String| BlkError::NbdExport {
            uri: spec.uri.to_string(),
            reason,
        };
        if info.min_block > logical_block_size {
            return Err(export_err(format!(
                "its minimum block size is {} bytes, more than logical_block_size {logical_block_size}{}",
                info.min_block,
                if info.min_block <= 4096 {
                    format!(" (set logical_block_size {})", info.min_block)
                } else {
                    String::new()
                }
            )));
        }
        let lbs = u64::from(logical_block_size);
        let size = info.size / lbs * lbs;
        if size == 0 {
            return Err(export_err(format!(
                "it is {} bytes, less than one {logical_block_size}-byte block",
                info.size
            )));
        }
        if size != info.size {
            tracing::warn!(
                uri = %spec.uri,
                export_size = info.size,
                capacity = size,
                "NBD export size is not a multiple of the logical block size: the tail is not served"
            );
        }
        debug_assert_eq!(size % SECTOR_SIZE, 0);
        let multi = info.flags.contains(TransmissionFlags::CAN_MULTI_CONN);
        let connections = if multi { spec.connections.max(1) } else { 1 };
        if !multi && spec.connections > 1 {
            tracing::info!(
                uri = %spec.uri,
                asked = spec.connections,
                "the NBD server does not advertise NBD_FLAG_CAN_MULTI_CONN: one connection"
            );
        }
        tracing::info!(
            uri = %spec.uri,
            size,
            flags = ?info.flags,
            min_block = info.min_block,
            preferred_block = info.preferred_block,
            max_payload = info.max_payload,
            structured_replies = info.structured,
            connections,
            "NBD export opened"
        );
        Ok(Self {
            spec: spec.clone(),
            info,
            size: AtomicU64::new(size),
            connections,
        })
    }

    /// Capacity in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether the export refuses writes.
    pub(crate) fn read_only(&self) -> bool {
        self.info.flags.contains(TransmissionFlags::READ_ONLY)
    }
}
