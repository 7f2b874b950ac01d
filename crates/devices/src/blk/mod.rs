//! virtio-blk (virtio 1.2 §5.2): a block device over a RAM, file, null, NBD or Ceph RBD backend.
//!
//! [`BlkDevice::new`] validates a [`BlkConfig`], opens the backend and fixes the config
//! space; the device then serves any number of frontends in turn (the backend, and so a RAM
//! disk's data, lives as long as the device). A RAM disk's data lives in a memfd
//! ([`BlkDevice::ram_fd`]) that a new daemon adopts on a live upgrade
//! ([`BlkDevice::with_ram_fd`]). Each queue gets its own handler
//! ([`VirtioDevice::queue_handler`]) sharing the device through an `Arc`.
//!
//! Requests are parsed first (header, lengths and sector ranges are checked before the
//! backend is touched), executed second, and every failure maps to one status byte:
//! `VIRTIO_BLK_S_UNSUPP` for what the device does not implement, `VIRTIO_BLK_S_IOERR` for
//! everything else. A request without a writable status byte is dropped (used length 0).
//! Guest-caused errors are logged at debug level, at most [`LOG_PER_SEC`] per second per
//! device.
//!
//! The capacity can change while the device is served ([`BlkDevice::resize`]): requests
//! are checked against the capacity at the moment they are parsed (and the backend checks
//! again), the config space reports the new value, and the transport then tells the
//! driver (a configuration change notification, virtio 1.2 §2.5).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bitflags::bitflags;
use thiserror::Error;
use uvdpa_virtio::split::MAX_QUEUE_SIZE;
use uvdpa_virtio::worker::{ChainGroup, DeviceFault, GroupHandler, QueueHandler};
use uvdpa_virtio::{VirtioDevice, VirtioFeatures};

use crate::ratelimit::RateLimiter;

mod aio;
#[cfg(test)]
mod aio_tests;
mod backend;
mod config;
pub mod latency;
pub mod nbd;
mod queue;
pub mod rbd;
mod request;
#[cfg(test)]
mod tests;
pub mod trace;
mod uring;

pub use aio::Aio;
pub use config::{VirtioBlkConfig, VirtioBlkGeometry, VirtioBlkTopology, VIRTIO_BLK_CONFIG_SIZE};
pub use request::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

use backend::{Backend, FileDisk, RamDisk};
pub use backend::{ResizeError, RAM_RESERVE};
use queue::BlkQueue;
use request::Limits;

/// virtio-blk device ID (virtio 1.2 §5).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Bytes per sector: the unit of `capacity` and of request sector numbers.
pub const SECTOR_SIZE: u64 = 512;
/// Longest serial (device ID string) GET_ID returns.
pub const SERIAL_LEN: usize = 20;
/// Most queues a device may have.
pub const MAX_NUM_QUEUES: u16 = 64;
/// Largest segment the driver may use (config `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// The default queue size: QEMU's `vhost-user-blk-pci` default `queue-size`, so a frontend
/// with default settings meets the `seg_max` it was made for (see [`seg_max`]).
pub const DEFAULT_QUEUE_SIZE: u16 = 128;
/// Most sectors in one discard or write-zeroes segment (config `max_discard_sectors`,
/// `max_write_zeroes_sectors`): 2 GiB - 512, as QEMU.
pub const MAX_ZERO_SECTORS: u32 = (i32::MAX as u32) >> 9;
/// Most segments in one discard or write-zeroes request (config `max_discard_seg`,
/// `max_write_zeroes_seg`).
pub const MAX_ZERO_SEGMENTS: u32 = 256;
/// Guest-caused debug messages logged per second per device, at most.
pub const LOG_PER_SEC: u32 = 10;

bitflags! {
    /// virtio-blk feature bits (virtio 1.2 §5.2.3), named as in the spec.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct BlkFeatures: u64 {
        /// VIRTIO_BLK_F_SIZE_MAX (bit 1): `size_max` is valid.
        const VIRTIO_BLK_F_SIZE_MAX = 1 << 1;
        /// VIRTIO_BLK_F_SEG_MAX (bit 2): `seg_max` is valid.
        const VIRTIO_BLK_F_SEG_MAX = 1 << 2;
        /// VIRTIO_BLK_F_GEOMETRY (bit 4): `geometry` is valid.
        const VIRTIO_BLK_F_GEOMETRY = 1 << 4;
        /// VIRTIO_BLK_F_RO (bit 5): the device is read-only.
        const VIRTIO_BLK_F_RO = 1 << 5;
        /// VIRTIO_BLK_F_BLK_SIZE (bit 6): `blk_size` is valid.
        const VIRTIO_BLK_F_BLK_SIZE = 1 << 6;
        /// VIRTIO_BLK_F_FLUSH (bit 9): the flush command is supported.
        const VIRTIO_BLK_F_FLUSH = 1 << 9;
        /// VIRTIO_BLK_F_TOPOLOGY (bit 10): `topology` is valid.
        const VIRTIO_BLK_F_TOPOLOGY = 1 << 10;
        /// VIRTIO_BLK_F_CONFIG_WCE (bit 11): `writeback` can be toggled by the driver.
        const VIRTIO_BLK_F_CONFIG_WCE = 1 << 11;
        /// VIRTIO_BLK_F_MQ (bit 12): `num_queues` is valid.
        const VIRTIO_BLK_F_MQ = 1 << 12;
        /// VIRTIO_BLK_F_DISCARD (bit 13): the discard command is supported.
        const VIRTIO_BLK_F_DISCARD = 1 << 13;
        /// VIRTIO_BLK_F_WRITE_ZEROES (bit 14): the write-zeroes command is supported.
        const VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14;
    }
}

/// Where a device's sectors live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// `size` bytes of memory, zero-filled, kept as long as the device: a memfd the device
    /// maps shared, which another process can map too ([`BlkDevice::ram_fd`],
    /// [`BlkDevice::with_ram_fd`]).
    Ram {
        /// Capacity in bytes (a multiple of the logical block size).
        size: u64,
    },
    /// A file or block device; the capacity is its size.
    File {
        /// Path to open.
        path: PathBuf,
        /// Open with O_DIRECT (bypass the host page cache). Request offsets and lengths
        /// must then be multiples of the logical block size (others fail with IOERR);
        /// requests whose guest buffers are not aligned to it are copied through a
        /// per-queue aligned bounce buffer, the others go straight to guest memory.
        direct: bool,
        /// How requests reach the file: io_uring (many in flight per queue; falls back to
        /// `Sync` where io_uring cannot be set up) or synchronous preadv/pwritev.
        aio: Aio,
    },
    /// No storage: reads return zeroes, writes are discarded.
    Null {
        /// Capacity in bytes (a multiple of the logical block size).
        size: u64,
    },
    /// An export of an NBD server ([`nbd`]); the capacity is the export's size.
    Nbd(nbd::NbdSpec),
    /// A Ceph RBD image ([`rbd`]); the capacity is the image's size.
    Rbd(rbd::RbdSpec),
}

impl BackendSpec {
    /// The `backend` attribute: `ram`, `file`, `null`, `nbd` or `rbd`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ram { .. } => "ram",
            Self::File { .. } => "file",
            Self::Null { .. } => "null",
            Self::Nbd(_) => "nbd",
            Self::Rbd(_) => "rbd",
        }
    }
}

/// What a virtio-blk device is made of; checked by [`BlkDevice::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Backend.
    pub backend: BackendSpec,
    /// Refuse writes (offers VIRTIO_BLK_F_RO; the file is opened read-only).
    pub read_only: bool,
    /// Request queues, 1..=[`MAX_NUM_QUEUES`].
    pub num_queues: u16,
    /// Largest queue size, a power of two in 1..=32768.
    pub queue_size: u16,
    /// Device ID string returned by GET_ID, at most [`SERIAL_LEN`] bytes.
    pub serial: String,
    /// Logical block size in bytes, a power of two in 512..=4096.
    pub logical_block_size: u32,
}

/// Why a virtio-blk device could not be created.
#[derive(Debug, Error)]
pub enum BlkError {
    /// `logical_block_size` out of range.
    #[error("Invalid logical_block_size {value}: must be a power of two in 512..=4096")]
    InvalidLogicalBlockSize {
        /// The value given.
        value: u32,
    },
    /// `num_queues` out of range.
    #[error("Invalid num_queues {value}: must be in 1..={MAX_NUM_QUEUES}")]
    InvalidNumQueues {
        /// The value given.
        value: u16,
    },
    /// `queue_size` out of range.
    #[error("Invalid queue_size {value}: must be a power of two in 1..={MAX_QUEUE_SIZE}")]
    InvalidQueueSize {
        /// The value given.
        value: u16,
    },
    /// `serial` too long.
    #[error("Invalid serial: {len} bytes, at most {SERIAL_LEN}")]
    SerialTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A RAM or null backend size that is zero or not a whole number of blocks.
    #[error(
        "Invalid size {size}: must be greater than 0 and a multiple of \
         logical_block_size {logical_block_size}"
    )]
    InvalidSize {
        /// The size given.
        size: u64,
        /// The logical block size it must be a multiple of.
        logical_block_size: u32,
    },
    /// Mapping the memory of a RAM backend failed.
    #[error("Mapping {size} bytes of memory for a RAM disk failed")]
    MapMemory {
        /// Bytes asked for.
        size: u64,
        /// The error from mmap.
        #[source]
        source: io::Error,
    },
    /// [`BlkDevice::with_ram_fd`] given a backend other than RAM.
    #[error("Only a RAM disk adopts a memory fd; this device's backend is {backend}")]
    AdoptFdNotRam {
        /// The backend asked for (`file` or `null`).
        backend: &'static str,
    },
    /// Adopting the memfd of a RAM disk failed before mapping it.
    #[error("Adopting the memory fd of a {size}-byte RAM disk failed: {step}")]
    AdoptRamFd {
        /// The disk's size in bytes.
        size: u64,
        /// What was being done.
        step: &'static str,
        /// The error from fcntl or fstat.
        #[source]
        source: io::Error,
    },
    /// The memfd of a RAM disk is smaller than the disk.
    #[error("The memory fd holds {fd_size} bytes, fewer than the RAM disk's {size}")]
    RamFdTooSmall {
        /// The disk's size in bytes.
        size: u64,
        /// The file's size in bytes.
        fd_size: u64,
    },
    /// Opening a file backend failed.
    #[error("Opening backing file {} failed", path.display())]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// The error from open.
        #[source]
        source: io::Error,
    },
    /// Measuring a file backend failed.
    #[error("Reading the size of backing file {} failed", path.display())]
    FileSize {
        /// The file.
        path: PathBuf,
        /// The error from lseek.
        #[source]
        source: io::Error,
    },
    /// A file backend that is neither a regular file nor a block device.
    #[error("Backing file {} is neither a regular file nor a block device", path.display())]
    NotAFileOrBlockDevice {
        /// The path.
        path: PathBuf,
    },
    /// A file backend smaller than one logical block.
    #[error(
        "Backing file {} is {size} bytes: must hold at least one \
         {logical_block_size}-byte block",
        path.display()
    )]
    FileTooSmall {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The logical block size.
        logical_block_size: u32,
    },
    /// A resize of a read-only device.
    #[error("The device is read-only: its capacity cannot change")]
    ResizeReadOnly,
    /// The backend cannot take the new capacity.
    #[error("Cannot change the capacity to {size} bytes: {source}")]
    Resize {
        /// The capacity asked for, in bytes.
        size: u64,
        /// Why not.
        #[source]
        source: ResizeError,
    },
    /// The NBD server could not be reached, refused the export, or broke the protocol.
    #[error("Opening NBD export {uri} failed")]
    Nbd {
        /// The export's URI.
        uri: String,
        /// What went wrong, with the server's reason when it gave one.
        #[source]
        source: nbd::NbdError,
    },
    /// The RBD image could not be opened (cluster, pool, image): the step that failed.
    #[error("Opening RBD image {name} failed")]
    Rbd {
        /// `POOL/IMAGE`.
        name: String,
        /// The step and librados' or librbd's errno.
        #[source]
        source: rbd::RbdError,
    },
    /// The RBD image does not fit the device.
    #[error("RBD image {name} cannot back this device: {reason}")]
    RbdImage {
        /// `POOL/IMAGE`.
        name: String,
        /// Why.
        reason: String,
    },
    /// The NBD export does not fit the device.
    #[error("NBD export {uri} cannot back this device: {reason}")]
    NbdExport {
        /// The export's URI.
        uri: String,
        /// Why (block size, size).
        reason: String,
    },
    /// An O_DIRECT file needs more alignment than the logical block size.
    #[error(
        "Backing file {} needs {required}-byte alignment for O_DIRECT, more than \
         logical_block_size {logical_block_size}",
        path.display()
    )]
    DirectIoAlignment {
        /// The file.
        path: PathBuf,
        /// Alignment the file reports (statx DIOALIGN).
        required: u32,
        /// The logical block size.
        logical_block_size: u32,
    },
}

/// State shared by the device and all its queue handlers.
#[derive(Debug)]
struct Shared {
    backend: Backend,
    /// How a file backend does its I/O (after the io_uring probe); `None` for the others.
    aio: Option<Aio>,
    read_only: bool,
    num_queues: u16,
    queue_size: u16,
    serial: [u8; SERIAL_LEN],
    features: VirtioFeatures,
    /// The config space; `capacity` is filled in from the backend when it is read.
    config: VirtioBlkConfig,
    logical_block_size: u32,
    /// Held while the capacity changes (one resize at a time).
    resizing: Mutex<()>,
    log: RateLimiter,
    /// Request latency of each queue (index = queue index).
    latency: Box<[latency::LatencyHistogram]>,
    /// Where a live request trace attaches ([`trace`]).
    trace: Arc<crate::net::capture::CapturePoint>,
}

/// A virtio-blk device. Cheap to share: all queue handlers hold its state in an `Arc`.
#[derive(Debug)]
pub struct BlkDevice {
    shared: Arc<Shared>,
}

impl BlkConfig {
    /// Checks every attribute except the backend's size; returns the NUL-padded serial.
    fn validate(&self) -> Result<[u8; SERIAL_LEN], BlkError> {
        let lbs = self.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=4096).contains(&lbs) {
            return Err(BlkError::InvalidLogicalBlockSize { value: lbs });
        }
        if !(1..=MAX_NUM_QUEUES).contains(&self.num_queues) {
            return Err(BlkError::InvalidNumQueues {
                value: self.num_queues,
            });
        }
        let qs = self.queue_size;
        if !qs.is_power_of_two() || qs > MAX_QUEUE_SIZE {
            return Err(BlkError::InvalidQueueSize { value: qs });
        }
        let mut serial = [0u8; SERIAL_LEN];
        serial
            .get_mut(..self.serial.len())
            .ok_or(BlkError::SerialTooLong {
                len: self.serial.len(),
            })?
            .copy_from_slice(self.serial.as_bytes());
        Ok(serial)
    }
}

/// What a backend can do beyond reads and writes.
#[derive(Debug, Clone, Copy)]
struct Caps {
    flush: bool,
    discard: bool,
    write_zeroes: bool,
}

impl Caps {
    /// RAM, file and null backends do everything.
    const ALL: Self = Self {
        flush: true,
        discard: true,
        write_zeroes: true,
    };

    /// An NBD export does what its transmission flags say.
    fn nbd(flags: nbd::TransmissionFlags) -> Self {
        use nbd::TransmissionFlags as F;
        Self {
            flush: flags.contains(F::SEND_FLUSH),
            discard: flags.contains(F::SEND_TRIM),
            write_zeroes: flags.contains(F::SEND_WRITE_ZEROES),
        }
    }
}

/// Features offered for a device (virtio 1.2 §5.2.3, plus the ring and transport bits).
fn offered_features(read_only: bool, caps: Caps) -> VirtioFeatures {
    let mut blk = BlkFeatures::VIRTIO_BLK_F_SIZE_MAX
        | BlkFeatures::VIRTIO_BLK_F_SEG_MAX
        | BlkFeatures::VIRTIO_BLK_F_BLK_SIZE
        | BlkFeatures::VIRTIO_BLK_F_TOPOLOGY
        | BlkFeatures::VIRTIO_BLK_F_MQ;
    if caps.flush {
        blk |= BlkFeatures::VIRTIO_BLK_F_FLUSH;
    }
    if read_only {
        blk |= BlkFeatures::VIRTIO_BLK_F_RO;
    } else {
        if caps.discard {
            blk |= BlkFeatures::VIRTIO_BLK_F_DISCARD;
        }
        if caps.write_zeroes {
            blk |= BlkFeatures::VIRTIO_BLK_F_WRITE_ZEROES;
        }
    }
    VirtioFeatures::VIRTIO_F_VERSION_1
        | VirtioFeatures::VIRTIO_RING_F_INDIRECT_DESC
        | VirtioFeatures::VIRTIO_RING_F_EVENT_IDX
        | VirtioFeatures::VIRTIO_F_RING_PACKED
        | VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES
        | VirtioFeatures::from_raw(blk.bits())
}

/// `seg_max` (virtio 1.2 §5.2.4) of a device whose queue size is `queue_size`:
/// `min(queue_size, 1024) - 2` (at least 1).
///
/// Two descriptors of a request carry the header and the status byte. Linux puts a request
/// of `seg_max + 2` descriptors in one indirect table whatever the ring size, and every
/// ring accepts indirect tables of up to `max(ring size, 1024)` entries
/// ([`uvdpa_virtio::chain::INDIRECT_TABLE_MAX`]), so with VIRTIO_RING_F_INDIRECT_DESC
/// every ring size works. Without indirect descriptors a request's chain sits in the ring
/// itself, so the frontend's ring must hold `seg_max + 2` descriptors: at least the
/// device's `queue_size` (QEMU's default 128 meets the default).
pub fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size)
        .min(uvdpa_virtio::chain::INDIRECT_TABLE_MAX)
        .saturating_sub(2)
        .max(1)
}

/// The I/O mode a file device at `path` runs with: `asked`, unless that is io_uring and
/// io_uring cannot be set up here (old kernel, seccomp, `kernel.io_uring_disabled`): then
/// synchronous I/O. Says which, once, in the log.
fn choose_aio(path: &std::path::Path, asked: Aio) -> Aio {
    let chosen = match asked {
        Aio::Sync => Aio::Sync,
        Aio::IoUring => match uring::probe() {
            Ok(()) => Aio::IoUring,
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    "io_uring is unavailable ({e}): the file backend does synchronous I/O"
                );
                return Aio::Sync;
            }
        },
    };
    tracing::info!(path = %path.display(), aio = %chosen, "file backend opened");
    chosen
}

/// The config space of a device with `capacity` bytes whose backend can do `caps`;
/// discards are aligned to `discard_align` bytes (at least the logical block size).
fn config_space(cfg: &BlkConfig, capacity: u64, caps: Caps, discard_align: u32) -> VirtioBlkConfig {
    let sectors_per_block = discard_align.max(cfg.logical_block_size) / SECTOR_SIZE as u32;
    VirtioBlkConfig {
        capacity: capacity / SECTOR_SIZE,
        size_max: SIZE_MAX,
        seg_max: seg_max(cfg.queue_size),
        blk_size: cfg.logical_block_size,
        topology: VirtioBlkTopology {
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
        },
        // With FLUSH the driver sees a writeback cache; without, a write-through one.
        writeback: u8::from(caps.flush),
        num_queues: cfg.num_queues,
        max_discard_sectors: MAX_ZERO_SECTORS,
        max_discard_seg: MAX_ZERO_SEGMENTS,
        discard_sector_alignment: sectors_per_block,
        max_write_zeroes_sectors: MAX_ZERO_SECTORS,
        max_write_zeroes_seg: MAX_ZERO_SEGMENTS,
        write_zeroes_may_unmap: 1,
        ..VirtioBlkConfig::default()
    }
}

impl BlkDevice {
    /// Validates `cfg` and opens its backend (a RAM disk gets a new, zero-filled memfd).
    ///
    /// # Errors
    /// A [`BlkError`] naming the invalid attribute and its allowed range, or the backend
    /// action that failed (making or mapping the memfd, opening or measuring the file).
    pub fn new(cfg: BlkConfig) -> Result<Self, BlkError> {
        Self::open(cfg, None)
    }

    /// As [`BlkDevice::new`] for a RAM disk whose bytes already exist: the disk maps the
    /// first `size` bytes (`BackendSpec::Ram { size }`, in bytes) of `fd`, the memfd of a
    /// RAM disk (another device's [`BlkDevice::ram_fd`], typically received from the
    /// daemon being replaced on a live upgrade). Both devices then share those bytes: what
    /// one writes, the other reads. `fd` is sealed against shrinking if it is not yet and
    /// is never truncated; resizes of this device extend it as [`BlkDevice::resize`] says.
    ///
    /// # Errors
    /// [`BlkError::AdoptFdNotRam`] when `cfg` is not a RAM disk; the errors of
    /// [`BlkDevice::new`]; [`BlkError::AdoptRamFd`] when `fd` is not a memfd that can be
    /// sealed against shrinking (made with `MFD_ALLOW_SEALING`) or cannot be measured;
    /// [`BlkError::RamFdTooSmall`] when it holds fewer than `size` bytes.
    pub fn with_ram_fd(cfg: BlkConfig, fd: OwnedFd) -> Result<Self, BlkError> {
        Self::open(cfg, Some(fd))
    }

    /// The memfd holding a RAM disk's bytes, to pass to another process (which maps it
    /// with [`BlkDevice::with_ram_fd`]); `None` for file and null backends. The disk's
    /// bytes are its first [`BlkDevice::capacity_bytes`] bytes (the file may be longer: a
    /// shrink punches a hole in it rather than truncating it).
    pub fn ram_fd(&self) -> Option<BorrowedFd<'_>> {
        self.shared.backend.ram_fd()
    }

    /// [`BlkDevice::new`], or [`BlkDevice::with_ram_fd`] when `ram_fd` is given.
    fn open(cfg: BlkConfig, ram_fd: Option<OwnedFd>) -> Result<Self, BlkError> {
        let serial = cfg.validate()?;
        let lbs = cfg.logical_block_size;
        let check_size = |size: u64| {
            if size == 0 || size % u64::from(lbs) != 0 {
                Err(BlkError::InvalidSize {
                    size,
                    logical_block_size: lbs,
                })
            } else {
                Ok(size)
            }
        };
        let backend = match (&cfg.backend, ram_fd) {
            (BackendSpec::Ram { size }, None) => Backend::Ram(RamDisk::new(check_size(*size)?)?),
            (BackendSpec::Ram { size }, Some(fd)) => {
                Backend::Ram(RamDisk::from_fd(fd, check_size(*size)?)?)
            }
            (BackendSpec::Null { size }, None) => Backend::null(check_size(*size)?),
            (BackendSpec::File { path, direct, .. }, None) => {
                Backend::File(FileDisk::open(path, *direct, cfg.read_only, lbs)?)
            }
            (BackendSpec::Null { .. }, Some(_)) => {
                return Err(BlkError::AdoptFdNotRam { backend: "null" })
            }
            (BackendSpec::Nbd(spec), None) => Backend::Nbd(nbd::NbdDisk::open(spec, lbs)?),
            (BackendSpec::File { .. }, Some(_)) => {
                return Err(BlkError::AdoptFdNotRam { backend: "file" })
            }
            (BackendSpec::Nbd(_), Some(_)) => {
                return Err(BlkError::AdoptFdNotRam { backend: "nbd" })
            }
            (BackendSpec::Rbd(spec), None) => {
                Backend::Rbd(rbd::RbdDisk::open(spec, lbs, cfg.read_only)?)
            }
            (BackendSpec::Rbd(_), Some(_)) => {
                return Err(BlkError::AdoptFdNotRam { backend: "rbd" })
            }
        };
        let aio = match &cfg.backend {
            BackendSpec::File { path, aio, .. } => Some(choose_aio(path, *aio)),
            _ => None,
        };
        let (caps, discard_align, read_only) = match backend.nbd() {
            Some(n) => (
                Caps::nbd(n.info.flags),
                n.info.min_block,
                cfg.read_only || n.read_only(),
            ),
            None => (Caps::ALL, lbs, cfg.read_only),
        };
        let config = config_space(&cfg, backend.size(), caps, discard_align);
        Ok(Self {
            shared: Arc::new(Shared {
                backend,
                aio,
                read_only,
                num_queues: cfg.num_queues,
                queue_size: cfg.queue_size,
                serial,
                features: offered_features(read_only, caps),
                config,
                logical_block_size: lbs,
                resizing: Mutex::new(()),
                log: RateLimiter::new(LOG_PER_SEC),
                latency: (0..cfg.num_queues)
                    .map(|_| latency::LatencyHistogram::default())
                    .collect(),
                trace: Arc::default(),
            }),
        })
    }

    /// Capacity in bytes (a multiple of the logical block size).
    pub fn capacity_bytes(&self) -> u64 {
        self.shared.backend.size()
    }

    /// Changes the capacity to `size` bytes while the device is served (qemu's
    /// `block_resize`); returns the previous capacity. The caller then raises a
    /// configuration change notification on the transport, after which the driver reads
    /// the new `capacity` from the config space.
    ///
    /// Requests are checked against the capacity when they are parsed: from the moment
    /// this returns, any request reaching past `size` fails with IOERR. RAM disks grow in
    /// place inside the address space reserved at creation (at least [`RAM_RESERVE`]
    /// bytes) and read zeroes in the grown part; a regular file is extended or truncated
    /// to `size` (a shrink drops the data past the new end, as qemu's resize of a raw
    /// image); a block device's capacity may be anything up to the device's size.
    ///
    /// # Errors
    /// [`BlkError::ResizeReadOnly`] for a read-only device, [`BlkError::InvalidSize`] for
    /// zero or a size that is not a multiple of the logical block size,
    /// [`BlkError::Resize`] when the backend cannot take it.
    pub fn resize(&self, size: u64) -> Result<u64, BlkError> {
        let sh = &self.shared;
        if sh.read_only {
            return Err(BlkError::ResizeReadOnly);
        }
        let lbs = sh.logical_block_size;
        if size == 0 || size % u64::from(lbs) != 0 {
            return Err(BlkError::InvalidSize {
                size,
                logical_block_size: lbs,
            });
        }
        let _one_at_a_time = sh.resizing.lock().unwrap_or_else(|e| e.into_inner());
        let old = sh.backend.size();
        sh.backend
            .resize(size)
            .map_err(|source| BlkError::Resize { size, source })?;
        tracing::info!(old, new = size, "virtio-blk capacity changed");
        Ok(old)
    }

    /// Whether the device refuses writes (asked for, or a read-only NBD export).
    pub fn read_only(&self) -> bool {
        self.shared.read_only
    }

    /// The NBD connections (and queue workers) an `nbd` device uses; `None` for other
    /// backends.
    pub fn nbd_connections(&self) -> Option<u16> {
        self.shared.backend.nbd().map(|n| n.connections)
    }

    /// How the file backend does its I/O: what was asked for, or [`Aio::Sync`] where
    /// io_uring could not be set up. `None` for RAM and null backends.
    pub fn aio(&self) -> Option<Aio> {
        self.shared.aio
    }

    /// The request latency histogram of queue `index` (kept across sessions), if the
    /// device has that queue.
    pub fn latency(&self, index: u16) -> Option<latency::LatencySnapshot> {
        self.shared
            .latency
            .get(usize::from(index))
            .map(latency::LatencyHistogram::snapshot)
    }

    /// Where a live request trace of this device attaches (`uvdpa dev capture`, see
    /// [`trace`]): one at a time, kept across sessions.
    pub fn trace_point(&self) -> &Arc<crate::net::capture::CapturePoint> {
        &self.shared.trace
    }

    /// The request processor of queue `index` (shared by both I/O modes).
    fn blk_queue(&self, index: u16, features: VirtioFeatures) -> Result<BlkQueue, DeviceFault> {
        if index >= self.shared.num_queues {
            return Err(DeviceFault(format!(
                "virtio-blk has no queue {index} (it has {})",
                self.shared.num_queues
            )));
        }
        let offered = BlkFeatures::from_bits_truncate(self.shared.features.bits());
        let limits = Limits {
            capacity: self.shared.backend.size(),
            read_only: self.shared.read_only,
            features: BlkFeatures::from_bits_truncate(features.bits()) & offered,
            direct_align: self.shared.backend.direct_align(),
        };
        Ok(BlkQueue::new(self.shared.clone(), index, limits))
    }

    /// The config space fields (what [`VirtioDevice::config`] encodes), with the current
    /// capacity.
    pub fn config_space(&self) -> VirtioBlkConfig {
        VirtioBlkConfig {
            capacity: self.shared.backend.size() / SECTOR_SIZE,
            ..self.shared.config
        }
    }
}

impl VirtioDevice for BlkDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn num_queues(&self) -> u16 {
        self.shared.num_queues
    }

    fn queue_size(&self) -> u16 {
        self.shared.queue_size
    }

    fn features(&self) -> VirtioFeatures {
        self.shared.features
    }

    fn config(&self) -> Vec<u8> {
        self.config_space().to_le_bytes().to_vec()
    }

    fn queue_handler(
        &self,
        index: u16,
        features: VirtioFeatures,
    ) -> Result<Box<dyn QueueHandler>, DeviceFault> {
        Ok(Box::new(self.blk_queue(index, features)?))
    }

    /// An `nbd` device with N connections runs queue `i` in worker `i % N` (each worker
    /// owns one connection); every other queue has its own worker.
    fn queue_group(&self, index: u16, _features: VirtioFeatures) -> u16 {
        match self.shared.backend.nbd() {
            Some(n) => index % n.connections.max(1),
            None => index,
        }
    }

    /// A file backend with `aio = io_uring` runs its queue on an `AioGroup` (many
    /// requests in flight, completions in any order), an `nbd` backend its queues on an
    /// `NbdGroup` (one connection, many requests in flight), an `rbd` backend each queue on
    /// an `RbdGroup` (librbd completions, many in flight); every other queue runs one
    /// request at a time ([`ChainGroup`]).
    fn group_handler(
        &self,
        group: u16,
        features: VirtioFeatures,
    ) -> Result<Box<dyn GroupHandler>, DeviceFault> {
        if self.shared.backend.rbd().is_some() {
            let q = self.blk_queue(group, features)?;
            return rbd::group::RbdGroup::new(q)
                .map(|g| Box::new(g) as Box<dyn GroupHandler>)
                .map_err(|e| DeviceFault(format!("Setting up the RBD queue worker failed: {e}")));
        }
        if self.shared.backend.nbd().is_some() {
            let q = self.blk_queue(group, features)?;
            return nbd::group::NbdGroup::new(q)
                .map(|g| Box::new(g) as Box<dyn GroupHandler>)
                .map_err(|e| DeviceFault(format!("Setting up the NBD queue worker failed: {e}")));
        }
        if self.shared.aio == Some(Aio::IoUring) {
            // The probe at open succeeded, so this fails only when the host is out of
            // resources (locked memory, file descriptors): serve the queue anyway.
            match aio::AioGroup::new(self.blk_queue(group, features)?) {
                Ok(g) => return Ok(Box::new(g)),
                Err(e) => tracing::warn!(
                    queue = group,
                    "io_uring setup failed ({e}); this queue does synchronous I/O"
                ),
            }
        }
        let q = self.blk_queue(group, features)?;
        Ok(Box::new(ChainGroup::new(Box::new(q))))
    }

    fn flush(&self) -> Result<(), DeviceFault> {
        self.shared
            .backend
            .flush()
            .map_err(|e| DeviceFault(format!("Flushing the virtio-blk backend failed: {e}")))
    }
}
