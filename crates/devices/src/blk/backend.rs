//! Disk backends: where a virtio-blk device's sectors live.
//!
//! - [`RamDisk`]: a memfd mapped shared by the device; requests copy straight between it
//!   and guest buffers. Its fd can be passed to another process (a new daemon on a live
//!   upgrade), which maps the same bytes.
//! - [`FileDisk`]: a regular file or block device; requests are `preadv`/`pwritev` with the
//!   guest buffers as the iovecs, so data moves between the kernel and guest memory without
//!   a copy in between.
//! - `Null`: reads return zeroes, writes are dropped (benchmarks of the request path).
//! - [`NbdDisk`]: an export of an NBD server; its requests never come here but go through
//!   each queue's own connection ([`super::nbd::group::NbdGroup`]), so the synchronous
//!   calls below refuse data operations on it.
//! - [`RbdDisk`]: a Ceph RBD image; likewise served only by each queue's
//!   [`super::rbd::group::RbdGroup`] (librbd's asynchronous calls).
//!
//! Every backend's capacity can change while queues run ([`Backend::resize`], `uvdpa dev
//! set NAME capacity SIZE`): it is an atomic that every request checks its range against,
//! so a request is served either entirely inside the capacity it saw or fails with IOERR.
//! A RAM disk reserves the address space it may grow into when it is created, so growing
//! never moves the memory workers copy to and from.
//!
//! Backends are shared by every queue of a device (`&self` everywhere, no lock): the
//! kernel serialises file I/O, and concurrent RAM copies to the same sectors race exactly
//! as concurrent DMA to a real disk would, which drivers already avoid.
//!
//! Read and write are `unsafe fn`s: they dereference the raw guest buffer pointers of
//! [`Segment`]s. Ranges are checked here again (on top of the request parser) so that a
//! backend never touches memory outside its own disk, whatever its caller passes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::mem::{align_of, offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use uvdpa_virtio::Segment;

use super::nbd::NbdDisk;
use super::rbd::RbdDisk;
use super::{BlkError, SECTOR_SIZE};

// `Segment` is documented as layout-compatible with `struct iovec`; the file backend relies
// on it to pass a chain's segments to preadv/pwritev without copying them.
const _: () = {
    assert!(size_of::<Segment>() == size_of::<libc::iovec>());
    assert!(align_of::<Segment>() == align_of::<libc::iovec>());
    assert!(offset_of!(Segment, base) == offset_of!(libc::iovec, iov_base));
    assert!(offset_of!(Segment, len) == offset_of!(libc::iovec, iov_len));
};

/// Most iovecs one preadv/pwritev (or io_uring READV/WRITEV) accepts (Linux `UIO_MAXIOV`);
/// longer chains are done in several calls.
pub(crate) const IOV_MAX: usize = 1024;
/// Size of the per-queue bounce buffer used for O_DIRECT requests with unaligned buffers;
/// larger requests go through it in chunks.
const BOUNCE_LEN: usize = 1 << 20;
/// Alignment of the bounce buffer (at least any logical block size we accept).
const BOUNCE_ALIGN: usize = 4096;

/// Zeroes to write when a file cannot deallocate or zero a range itself; aligned so it can
/// be written to an O_DIRECT file.
#[repr(C, align(4096))]
struct ZeroBlock([u8; 64 * 1024]);
static ZEROES: ZeroBlock = ZeroBlock([0; 64 * 1024]);

/// A device's backend, chosen by [`super::BackendSpec`].
#[derive(Debug)]
pub(crate) enum Backend {
    /// Sectors in a memfd mapped shared.
    Ram(RamDisk),
    /// Sectors in a file or block device.
    File(FileDisk),
    /// No sectors: reads are zeroes, writes vanish.
    Null {
        /// Capacity in bytes.
        size: AtomicU64,
    },
    /// Sectors on an NBD server.
    Nbd(NbdDisk),
    /// Sectors in a Ceph RBD image.
    Rbd(RbdDisk),
}

/// A per-queue aligned buffer for O_DIRECT requests whose guest buffers are not aligned;
/// allocated on first use and kept, so the data path does not allocate once warm.
#[derive(Default)]
pub(crate) struct Bounce {
    buf: Vec<u8>,
}

impl Bounce {
    /// The aligned window of the buffer, [`BOUNCE_LEN`] bytes.
    fn get(&mut self) -> io::Result<&mut [u8]> {
        if self.buf.is_empty() {
            self.buf = vec![0; BOUNCE_LEN + BOUNCE_ALIGN];
        }
        let off = self.buf.as_ptr().align_offset(BOUNCE_ALIGN);
        off.checked_add(BOUNCE_LEN)
            .and_then(|end| self.buf.get_mut(off..end))
            .ok_or_else(|| io::Error::other("bounce buffer cannot be aligned"))
    }
}

impl Backend {
    /// A null backend of `size` bytes.
    pub(crate) fn null(size: u64) -> Self {
        Self::Null {
            size: AtomicU64::new(size),
        }
    }

    /// Capacity in bytes (a multiple of the logical block size), as of now: a resize may
    /// change it at any time.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Self::Ram(r) => r.size.load(Ordering::Acquire),
            Self::File(f) => f.size.load(Ordering::Acquire),
            Self::Null { size } => size.load(Ordering::Acquire),
            Self::Nbd(n) => n.size(),
            Self::Rbd(r) => r.size(),
        }
    }

    /// Changes the capacity to `size` bytes (already checked to be a non-zero multiple of
    /// the logical block size); callers serialise resizes. What lies beyond the new end
    /// is published only once it exists (growth), and the range that goes away stops
    /// being served before it is released (shrink).
    ///
    /// - RAM: grows inside the address space reserved at creation (never moving the
    ///   mapping; the memfd is extended); a shrink punches a hole in the memfd past the new
    ///   end (its memory goes back, the file keeps its size), and a later growth reads
    ///   zeroes there.
    /// - File: a regular file is truncated or extended to `size` (as qemu-storage-daemon's
    ///   `block_resize` resizes the image: a shrink drops the data past the new end); a
    ///   block device keeps its size and the capacity may be anything up to it.
    /// - Null: just the number.
    ///
    /// # Errors
    /// Why the backend cannot take that size (past the RAM reservation, past a block
    /// device's end), or the error of truncating the file.
    pub(crate) fn resize(&self, size: u64) -> Result<(), ResizeError> {
        match self {
            Self::Ram(r) => r.resize(size),
            Self::File(f) => f.resize(size),
            Self::Null { size: s } => {
                s.store(size, Ordering::Release);
                Ok(())
            }
            Self::Nbd(_) => Err(ResizeError::Nbd),
            Self::Rbd(_) => Err(ResizeError::Rbd),
        }
    }

    /// Alignment that O_DIRECT needs for request offsets, lengths and buffers, if the
    /// backend uses O_DIRECT.
    pub(crate) fn direct_align(&self) -> Option<usize> {
        match self {
            Self::File(f) => f.direct_align,
            _ => None,
        }
    }

    /// The file of a file backend (what the asynchronous path submits to).
    pub(crate) fn file(&self) -> Option<&FileDisk> {
        match self {
            Self::File(f) => Some(f),
            _ => None,
        }
    }

    /// The export of an NBD backend.
    pub(crate) fn nbd(&self) -> Option<&NbdDisk> {
        match self {
            Self::Nbd(n) => Some(n),
            _ => None,
        }
    }

    /// The image of an RBD backend.
    pub(crate) fn rbd(&self) -> Option<&RbdDisk> {
        match self {
            Self::Rbd(r) => Some(r),
            _ => None,
        }
    }

    /// The memfd of a RAM backend (what a new daemon adopts on a live upgrade).
    pub(crate) fn ram_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Self::Ram(r) => Some(r.fd()),
            _ => None,
        }
    }

    /// Reads `bufs.len()` segments' worth of bytes at `offset` into `bufs`. `bufs` is
    /// scratch: it may be modified (advanced past partial transfers).
    ///
    /// # Safety
    /// Every segment must be valid for writes of its length for the whole call and must
    /// not overlap any Rust object (it points into guest memory the caller keeps mapped).
    pub(crate) unsafe fn read(
        &self,
        offset: u64,
        bufs: &mut [Segment],
        bounce: &mut Bounce,
    ) -> io::Result<()> {
        let len = total_len(bufs)?;
        check_range(offset, len, self.size())?;
        match self {
            // SAFETY: forwarded from this function's contract.
            Self::Ram(r) => unsafe { r.read(offset, bufs) },
            // SAFETY: forwarded from this function's contract.
            Self::File(f) => unsafe { f.read(offset, bufs, bounce) },
            Self::Null { .. } => {
                for s in bufs.iter() {
                    // SAFETY: the caller guarantees each segment is writable for its length.
                    unsafe { std::ptr::write_bytes(s.base, 0, s.len) };
                }
                Ok(())
            }
            Self::Nbd(_) | Self::Rbd(_) => Err(nbd_sync()),
        }
    }

    /// Writes the bytes of `bufs` at `offset`. `bufs` is scratch, as for
    /// [`Backend::read`].
    ///
    /// # Safety
    /// Every segment must be valid for reads of its length for the whole call and must not
    /// overlap any Rust object.
    pub(crate) unsafe fn write(
        &self,
        offset: u64,
        bufs: &mut [Segment],
        bounce: &mut Bounce,
    ) -> io::Result<()> {
        let len = total_len(bufs)?;
        check_range(offset, len, self.size())?;
        match self {
            // SAFETY: forwarded from this function's contract.
            Self::Ram(r) => unsafe { r.write(offset, bufs) },
            // SAFETY: forwarded from this function's contract.
            Self::File(f) => unsafe { f.write(offset, bufs, bounce) },
            Self::Null { .. } => Ok(()),
            Self::Nbd(_) | Self::Rbd(_) => Err(nbd_sync()),
        }
    }

    /// Makes completed writes durable.
    pub(crate) fn flush(&self) -> io::Result<()> {
        match self {
            Self::File(f) => retry_intr(|| rustix::fs::fdatasync(&f.file)),
            // Each queue's connection flushes when its worker stops.
            Self::Ram(_) | Self::Null { .. } | Self::Nbd(_) | Self::Rbd(_) => Ok(()),
        }
    }

    /// Discards `len` bytes at `offset` (a hint: the file backend ignores filesystems that
    /// cannot punch holes). Reads of a discarded range return zeroes where the backend
    /// could deallocate it.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.size())?;
        match self {
            Self::Ram(r) => r.zero(offset, len),
            Self::File(f) => match f.fallocate(punch_hole(), offset, len) {
                Err(e) if unsupported(e) => Ok(()),
                r => r.map_err(io::Error::from),
            },
            Self::Null { .. } => Ok(()),
            Self::Nbd(_) | Self::Rbd(_) => Err(nbd_sync()),
        }
    }

    /// Makes `len` bytes at `offset` read back as zeroes, deallocating them if `unmap`
    /// allows and the backend can.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        check_range(offset, len, self.size())?;
        match self {
            Self::Ram(r) => r.zero(offset, len),
            Self::File(f) => f.write_zeroes(offset, len, unmap),
            Self::Null { .. } => Ok(()),
            Self::Nbd(_) | Self::Rbd(_) => Err(nbd_sync()),
        }
    }
}

/// The error of a synchronous data operation on an NBD or RBD backend (never reached:
/// their queues run on [`super::nbd::group::NbdGroup`] and
/// [`super::rbd::group::RbdGroup`]).
fn nbd_sync() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "NBD and RBD backends serve requests through their queue groups only",
    )
}

/// Sum of segment lengths, as a byte count on the disk.
fn total_len(bufs: &[Segment]) -> io::Result<u64> {
    bufs.iter()
        .try_fold(0u64, |acc, s| acc.checked_add(s.len as u64))
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Refuses a range that does not lie inside a disk of `size` bytes.
fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is past the end of the disk ({size} bytes)"),
        )),
    }
}

fn retry_intr<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Drops the first `n` bytes of `bufs`, and any empty segments after them.
fn advance(bufs: &mut &mut [Segment], mut n: usize) {
    let mut done = 0;
    for s in bufs.iter_mut() {
        if n < s.len {
            s.base = s.base.wrapping_add(n);
            s.len -= n;
            break;
        }
        n -= s.len;
        done += 1;
    }
    let all = std::mem::take(bufs);
    *bufs = all.get_mut(done..).unwrap_or_default();
}

/// Copies `src` into the bytes of `segs` starting `skip` bytes in.
///
/// # Safety
/// Every segment must be valid for writes of its length and must not overlap `src`.
unsafe fn scatter(segs: &[Segment], mut skip: usize, src: &[u8]) {
    let mut done = 0;
    for s in segs {
        if done == src.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(src.len() - done);
        // SAFETY: `skip + n <= s.len`, so the destination lies in the segment (caller's
        // contract); `done + n <= src.len()`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), s.base.add(skip), n) };
        done += n;
        skip = 0;
    }
}

/// Copies the bytes of `segs` starting `skip` bytes in into `dst`.
///
/// # Safety
/// Every segment must be valid for reads of its length and must not overlap `dst`.
unsafe fn gather(segs: &[Segment], mut skip: usize, dst: &mut [u8]) {
    let mut done = 0;
    for s in segs {
        if done == dst.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(dst.len() - done);
        // SAFETY: as in `scatter`, with source and destination swapped.
        unsafe { std::ptr::copy_nonoverlapping(s.base.add(skip), dst.as_mut_ptr().add(done), n) };
        done += n;
        skip = 0;
    }
}

/// Address space a RAM disk reserves so it can grow in place: [`RamDisk::new`] and
/// [`RamDisk::from_fd`] reserve `max(size, RAM_RESERVE)` bytes, of which only the first
/// `size` (in whole pages) map the disk's memfd (the rest is PROT_NONE: it costs neither
/// memory nor commit charge).
pub const RAM_RESERVE: u64 = 256 << 30;

/// Why a backend cannot take a new capacity.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// A RAM disk asked to grow past the address space it reserved at creation.
    #[error(
        "a RAM disk grows in place up to the {reserved} bytes it reserved when it was \
         created; {size} is more"
    )]
    PastReservation {
        /// Capacity asked for.
        size: u64,
        /// Bytes reserved.
        reserved: u64,
    },
    /// A block device cannot hold more than it has.
    #[error("block device {} is {device_size} bytes: it cannot grow to {size}", path.display())]
    PastBlockDevice {
        /// The device.
        path: PathBuf,
        /// Capacity asked for.
        size: u64,
        /// The device's size.
        device_size: u64,
    },
    /// An NBD export's size is the server's.
    #[error("an NBD export's size is set by its server")]
    Nbd,
    /// An RBD image is resized with `rbd resize`, not here.
    #[error("an RBD image's size is set with `rbd resize`")]
    Rbd,
    /// A system call failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Its error.
        source: io::Error,
    },
}

/// A disk in a memfd (`memfd_create("uvdpa-ram")`), mapped shared into a reservation of
/// address space. It lives as long as the device, across frontend reconnects; its fd
/// ([`RamDisk::fd`]) can be handed to another process (a new daemon taking the devices
/// over on a live upgrade), which maps the same bytes with [`RamDisk::from_fd`].
///
/// The reservation is `reserved` bytes of PROT_NONE address space that never moves; its
/// first `committed` bytes (whole pages) are the file's first `committed` bytes, mapped
/// `MAP_SHARED` read and write. `size` (at most `committed`) is the capacity requests are
/// checked against. The reservation and the committed mapping stay in place for the
/// disk's whole life, so a request that passed its range check just before a shrink still
/// copies to mapped memory.
///
/// Touching a shared file mapping past the file's end raises SIGBUS, so the file never
/// gets shorter than what is mapped: growth extends it before mapping the new range,
/// a shrink punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) over the released range
/// instead of truncating (its pages go back to the kernel; they read back as zeroes, and a
/// later growth maps them again as they are), and the file is sealed against shrinking
/// (`F_SEAL_SHRINK`) so that no other holder of the fd can truncate it either. Untouched
/// and punched pages cost no memory.
#[derive(Debug)]
pub(crate) struct RamDisk {
    memfd: OwnedFd,
    base: NonNull<u8>,
    reserved: usize,
    committed: AtomicUsize,
    size: AtomicU64,
}

// SAFETY: the mapping is owned by this value and only accessed through raw-pointer copies
// (never references), so it may move between and be shared by queue threads; concurrent
// copies to the same bytes (from queue threads, or from another process mapping the same
// memfd) are the guest's own race, as with DMA.
unsafe impl Send for RamDisk {}
// SAFETY: see `Send`.
unsafe impl Sync for RamDisk {}

impl RamDisk {
    /// A new memfd of `size` bytes of zeroes (`size` rounded up to whole pages in the file),
    /// mapped as [`RamDisk::from_fd`] maps it.
    ///
    /// # Errors
    /// [`BlkError::MapMemory`] when the memfd cannot be created, sealed, sized or mapped.
    pub(crate) fn new(size: u64) -> Result<Self, BlkError> {
        let map_err = |e: Errno| BlkError::MapMemory {
            size,
            source: e.into(),
        };
        let memfd = rustix::fs::memfd_create(
            "uvdpa-ram",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .map_err(map_err)?;
        rustix::fs::fcntl_add_seals(&memfd, rustix::fs::SealFlags::SHRINK).map_err(map_err)?;
        Self::map(memfd, size)
    }

    /// Adopts `fd`, a memfd holding at least `size` bytes (another disk's [`RamDisk::fd`]),
    /// as a disk of `size` bytes: its first `size` bytes are the disk's, shared with every
    /// other mapping of the file. The file is sealed against shrinking (`F_SEAL_SHRINK`) if
    /// it is not yet, and extended to whole pages if `size` ends inside a page past its end;
    /// it is never truncated. The mapping sits in a new reservation of at least
    /// [`RAM_RESERVE`] bytes, as [`RamDisk::new`]'s.
    ///
    /// # Errors
    /// [`BlkError::AdoptRamFd`] when `fd` is not a memfd that can be sealed against
    /// shrinking (one made without `MFD_ALLOW_SEALING`, a regular file) or cannot be
    /// measured, [`BlkError::RamFdTooSmall`] when it holds fewer than `size` bytes (nothing
    /// is mapped then), [`BlkError::MapMemory`] when mapping it fails.
    pub(crate) fn from_fd(fd: OwnedFd, size: u64) -> Result<Self, BlkError> {
        let adopt_err = |step: &'static str| {
            move |e: Errno| BlkError::AdoptRamFd {
                size,
                step,
                source: e.into(),
            }
        };
        let shrink = rustix::fs::SealFlags::SHRINK;
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(adopt_err("reading its seals (it must be a memfd)"))?;
        if !seals.contains(shrink) {
            rustix::fs::fcntl_add_seals(&fd, shrink).map_err(adopt_err(
                "sealing it against shrinking (it must be a memfd made with MFD_ALLOW_SEALING)",
            ))?;
        }
        // Measured after sealing: the file can only grow from here on.
        let fd_size = rustix::fs::fstat(&fd)
            .map_err(adopt_err("reading its size"))?
            .st_size;
        let fd_size = u64::try_from(fd_size).unwrap_or(0);
        if fd_size < size {
            return Err(BlkError::RamFdTooSmall { size, fd_size });
        }
        Self::map(fd, size)
    }

    /// The memfd holding the disk's bytes.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Maps the first `size` bytes of `memfd` (rounded up to whole pages, the file extended
    /// to them if shorter), in a reservation of at least [`RAM_RESERVE`] bytes of address
    /// space (or exactly the mapped length where the system refuses that much, e.g. under
    /// `RLIMIT_AS`: such a disk cannot grow).
    fn map(memfd: OwnedFd, size: u64) -> Result<Self, BlkError> {
        let map_err = |source| BlkError::MapMemory { size, source };
        let len = usize::try_from(size)
            .map_err(|_| map_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let page = rustix::param::page_size();
        let committed = len
            .checked_next_multiple_of(page)
            .ok_or_else(|| map_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let want = usize::try_from(RAM_RESERVE)
            .unwrap_or(usize::MAX)
            .max(committed);
        let (ptr, reserved) = match reserve(want) {
            Ok(p) => (p, want),
            Err(_) if want > committed => (reserve(committed).map_err(map_err)?, committed),
            Err(e) => return Err(map_err(e)),
        };
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| map_err(io::Error::from(io::ErrorKind::OutOfMemory)))?;
        let disk = Self {
            memfd,
            base,
            reserved,
            committed: AtomicUsize::new(0),
            size: AtomicU64::new(0),
        };
        // On error the disk is dropped, which unmaps the whole reservation.
        disk.commit(committed).map_err(map_err)?;
        disk.size.store(size, Ordering::Release);
        Ok(disk)
    }

    /// Maps the file's first `upto` bytes (page aligned, within the reservation) over the
    /// start of the reservation, read and write, extending the file first if it is
    /// shorter. Bytes already committed are not touched.
    fn commit(&self, upto: usize) -> io::Result<()> {
        let from = self.committed.load(Ordering::Acquire);
        if upto <= from {
            return Ok(());
        }
        if upto > self.reserved {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // Only ever extended, never truncated: a mapped page past the end would SIGBUS.
        let file_len = rustix::fs::fstat(&self.memfd)?.st_size;
        if u64::try_from(file_len).map_or(true, |l| l < upto as u64) {
            retry_intr(|| rustix::fs::ftruncate(&self.memfd, upto as u64))?;
        }
        let at = self.at(from as u64).cast::<std::ffi::c_void>();
        let len = upto - from;
        // SAFETY: `at..at + len` lies inside the reservation this value owns and is still
        // PROT_NONE: nothing (no Rust object, no request) points into it, so replacing it
        // (MAP_FIXED) invalidates nothing. It maps file bytes `from..upto`, all inside the
        // file (extended above, and sealed against shrinking).
        let mapped = unsafe {
            rustix::mm::mmap(
                at,
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::FIXED,
                &self.memfd,
                from as u64,
            )
        };
        if let Err(e) = mapped {
            // A failed MAP_FIXED may have unmapped the range already: put the reservation
            // back so that it stays whole (Drop unmaps all of it).
            // SAFETY: as above; the range is ours and nothing points into it.
            let _ = unsafe {
                rustix::mm::mmap_anonymous(
                    at,
                    len,
                    rustix::mm::ProtFlags::empty(),
                    reserve_flags() | rustix::mm::MapFlags::FIXED,
                )
            };
            return Err(e.into());
        }
        // Transparent huge pages cut TLB misses on random access across a large disk (for
        // shmem, where `shmem_enabled` allows them). A kernel without THP refuses the
        // advice; the disk works the same without it.
        // SAFETY: the range is the mapping just made; advice does not change contents.
        let _ = unsafe { rustix::mm::madvise(at, len, rustix::mm::Advice::LinuxHugepage) };
        self.committed.store(upto, Ordering::Release);
        Ok(())
    }

    /// Changes the capacity (see [`Backend::resize`]).
    fn resize(&self, size: u64) -> Result<(), ResizeError> {
        let too_big = || ResizeError::PastReservation {
            size,
            reserved: self.reserved as u64,
        };
        let len = usize::try_from(size).map_err(|_| too_big())?;
        if len > self.reserved {
            return Err(too_big());
        }
        let old = self.size.load(Ordering::Acquire) as usize;
        if len >= old {
            let page = rustix::param::page_size();
            let upto = len.next_multiple_of(page).min(self.reserved);
            self.commit(upto).map_err(|source| ResizeError::Io {
                what: format!("Mapping {upto} bytes of the RAM disk's memfd"),
                source,
            })?;
            // What a shrink released (or a request still in flight at the shrink wrote)
            // reads back as zeroes, as a newly grown disk must.
            self.clear(old, len);
            self.size.store(size, Ordering::Release);
        } else {
            // Stop serving the tail, then give its memory back.
            self.size.store(size, Ordering::Release);
            self.clear(len, old);
        }
        Ok(())
    }

    /// Host pointer to disk byte `offset`, after [`check_range`] proved
    /// `offset + len <= size` (or, for [`RamDisk::clear`], inside the committed part).
    fn at(&self, offset: u64) -> *mut u8 {
        self.base.as_ptr().wrapping_add(offset as usize)
    }

    /// # Safety
    /// As [`Backend::read`]; the range was checked against the disk size.
    unsafe fn read(&self, offset: u64, bufs: &[Segment]) -> io::Result<()> {
        let mut src = self.at(offset);
        for s in bufs {
            // SAFETY: the source lies inside the committed mapping (range checked by the
            // caller), the destination is a writable guest segment (caller's contract);
            // the disk's reservation and guest memory mappings never overlap.
            unsafe { std::ptr::copy_nonoverlapping(src, s.base, s.len) };
            src = src.wrapping_add(s.len);
        }
        Ok(())
    }

    /// # Safety
    /// As [`Backend::write`]; the range was checked against the disk size.
    unsafe fn write(&self, offset: u64, bufs: &[Segment]) -> io::Result<()> {
        let mut dst = self.at(offset);
        for s in bufs {
            // SAFETY: as in `read`, with the copy direction reversed.
            unsafe { std::ptr::copy_nonoverlapping(s.base, dst, s.len) };
            dst = dst.wrapping_add(s.len);
        }
        Ok(())
    }

    /// Zeroes a checked range (see [`RamDisk::clear`]).
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        // Both fit: check_range proved offset + len <= size, a usize.
        self.clear(offset as usize, (offset + len) as usize);
        Ok(())
    }

    /// Zeroes bytes `start..end` of the committed memory by punching a hole in the memfd:
    /// whole pages are given back to the kernel, partial pages at the edges are cleared,
    /// and the file keeps its size, so the mapping stays backed (a later access gets a
    /// fresh zero page, never SIGBUS). Where the hole cannot be punched the bytes are
    /// cleared in place.
    fn clear(&self, start: usize, end: usize) {
        let end = end.min(self.committed.load(Ordering::Acquire));
        if start >= end {
            return;
        }
        let (offset, len) = (start as u64, (end - start) as u64);
        if retry_intr(|| rustix::fs::fallocate(&self.memfd, punch_hole(), offset, len)).is_err() {
            // SAFETY: the range lies inside the committed (readable and writable) part of
            // the mapping and no Rust reference points into it.
            unsafe { std::ptr::write_bytes(self.at(offset), 0, end - start) };
        }
    }
}

/// Flags of a reservation: private anonymous, no commit charge.
fn reserve_flags() -> rustix::mm::MapFlags {
    rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE
}

/// Reserves `len` bytes of private anonymous address space, inaccessible (PROT_NONE).
fn reserve(len: usize) -> io::Result<*mut std::ffi::c_void> {
    // SAFETY: a fresh private anonymous mapping at an address the kernel chooses; it
    // aliases nothing.
    let ptr = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::empty(),
            reserve_flags(),
        )
    }?;
    Ok(ptr)
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        // SAFETY: base/reserved describe the mapping this value created and owns; queue
        // handlers hold the device (and so this disk) alive while they run. The memfd is
        // closed after this (field drop); the bytes live on while another process holds it.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.reserved) };
    }
}

/// A disk in a regular file or block device.
///
/// With O_DIRECT (`direct_align` is set), the kernel needs request offsets, lengths and
/// memory aligned to the logical block size. Offsets and lengths are checked by the request
/// parser (misaligned ones fail with IOERR); requests whose *guest buffers* are not aligned
/// in address or length go through a per-queue aligned bounce buffer ([`Bounce`]) in 1 MiB
/// chunks. Only those requests are copied; aligned ones still go straight to guest memory.
#[derive(Debug)]
pub(crate) struct FileDisk {
    file: File,
    path: PathBuf,
    /// A block device (its size is fixed), not a regular file.
    block_device: bool,
    size: AtomicU64,
    direct_align: Option<usize>,
}

impl FileDisk {
    /// Opens `path` (read-only if `read_only`, with O_DIRECT if `direct`). The capacity is
    /// the file's size rounded down to a multiple of `logical_block_size`.
    pub(crate) fn open(
        path: &Path,
        direct: bool,
        read_only: bool,
        logical_block_size: u32,
    ) -> Result<Self, BlkError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(path).map_err(|source| BlkError::OpenFile {
            path: path.to_path_buf(),
            source,
        })?;
        let kind = file
            .metadata()
            .map_err(|source| BlkError::FileSize {
                path: path.to_path_buf(),
                source,
            })?
            .file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BlkError::NotAFileOrBlockDevice {
                path: path.to_path_buf(),
            });
        }
        // Seeking to the end measures regular files and block devices alike.
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlkError::FileSize {
                path: path.to_path_buf(),
                source,
            })?;
        let size = len - len % u64::from(logical_block_size);
        if size == 0 {
            return Err(BlkError::FileTooSmall {
                path: path.to_path_buf(),
                size: len,
                logical_block_size,
            });
        }
        if size != len {
            tracing::warn!(
                path = %path.display(),
                file_size = len,
                capacity = size,
                "Backing file size is not a multiple of the logical block size; \
                 the last partial block is not exposed"
            );
        }
        let direct_align = if direct {
            check_direct_alignment(&file, path, logical_block_size)?;
            Some(logical_block_size as usize)
        } else {
            None
        };
        debug_assert!(size % SECTOR_SIZE == 0);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            block_device: kind.is_block_device(),
            size: AtomicU64::new(size),
            direct_align,
        })
    }

    /// Changes the capacity (see [`Backend::resize`]): a regular file is extended before
    /// the new capacity is published, or truncated after the old one stopped being
    /// served.
    fn resize(&self, size: u64) -> Result<(), ResizeError> {
        if self.block_device {
            let device_size =
                rustix::fs::seek(&self.file, rustix::fs::SeekFrom::End(0)).map_err(|e| {
                    ResizeError::Io {
                        what: format!("Measuring block device {}", self.path.display()),
                        source: e.into(),
                    }
                })?;
            if size > device_size {
                return Err(ResizeError::PastBlockDevice {
                    path: self.path.clone(),
                    size,
                    device_size,
                });
            }
            self.size.store(size, Ordering::Release);
            return Ok(());
        }
        let truncate = || {
            self.file.set_len(size).map_err(|source| ResizeError::Io {
                what: format!("Resizing {} to {size} bytes", self.path.display()),
                source,
            })
        };
        if size >= self.size.load(Ordering::Acquire) {
            truncate()?;
            self.size.store(size, Ordering::Release);
        } else {
            self.size.store(size, Ordering::Release);
            truncate()?;
        }
        Ok(())
    }

    /// # Safety
    /// As [`Backend::read`].
    unsafe fn read(
        &self,
        offset: u64,
        bufs: &mut [Segment],
        bounce: &mut Bounce,
    ) -> io::Result<()> {
        match self.direct_align {
            Some(align) if !buffers_aligned(bufs, align) => {
                // SAFETY: forwarded from this function's contract.
                unsafe { self.read_bounced(offset, bufs, bounce) }
            }
            // SAFETY: forwarded from this function's contract.
            _ => unsafe { self.transfer(offset, bufs, false) },
        }
    }

    /// # Safety
    /// As [`Backend::write`].
    unsafe fn write(
        &self,
        offset: u64,
        bufs: &mut [Segment],
        bounce: &mut Bounce,
    ) -> io::Result<()> {
        match self.direct_align {
            Some(align) if !buffers_aligned(bufs, align) => {
                // SAFETY: forwarded from this function's contract.
                unsafe { self.write_bounced(offset, bufs, bounce) }
            }
            // SAFETY: forwarded from this function's contract.
            _ => unsafe { self.transfer(offset, bufs, true) },
        }
    }

    /// preadv/pwritev of all of `bufs` at `offset`, resuming after short transfers and in
    /// groups of at most [`IOV_MAX`] segments.
    ///
    /// # Safety
    /// As [`Backend::read`] (reads) or [`Backend::write`] (writes).
    unsafe fn transfer(
        &self,
        mut offset: u64,
        mut bufs: &mut [Segment],
        write: bool,
    ) -> io::Result<()> {
        advance(&mut bufs, 0);
        while !bufs.is_empty() {
            let count = bufs.len().min(IOV_MAX);
            let iovcnt = libc::c_int::try_from(count).unwrap_or(1);
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let iov = bufs.as_ptr().cast::<libc::iovec>();
            let fd = self.file.as_raw_fd();
            // SAFETY: `Segment` is layout-identical to `iovec` (asserted at the top of this
            // module) and `iov` points to at least `iovcnt` of them; each describes guest
            // memory valid for the transfer's direction (caller's contract). The kernel
            // only accesses those buffers during the call.
            let n = unsafe {
                if write {
                    libc::pwritev(fd, iov, iovcnt, off)
                } else {
                    libc::preadv(fd, iov, iovcnt, off)
                }
            };
            match usize::try_from(n) {
                Ok(0) if write => return Err(io::ErrorKind::WriteZero.into()),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    offset += n as u64;
                    advance(&mut bufs, n);
                }
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// # Safety
    /// As [`Backend::read`].
    unsafe fn read_bounced(
        &self,
        offset: u64,
        bufs: &[Segment],
        bounce: &mut Bounce,
    ) -> io::Result<()> {
        let total = bufs.iter().map(|s| s.len).sum::<usize>();
        let buf = bounce.get()?;
        let mut done = 0usize;
        while done < total {
            let n = (total - done).min(buf.len());
            let chunk = buf.get_mut(..n).unwrap_or_default();
            let mut at = 0;
            while at < n {
                let rest = chunk.get_mut(at..).unwrap_or_default();
                let pos = offset + (done + at) as u64;
                match retry_intr(|| rustix::io::pread(&self.file, &mut *rest, pos))? {
                    0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                    k => at += k,
                }
            }
            // SAFETY: forwarded from this function's contract; the bounce buffer is ours.
            unsafe { scatter(bufs, done, chunk) };
            done += n;
        }
        Ok(())
    }

    /// # Safety
    /// As [`Backend::write`].
    unsafe fn write_bounced(
        &self,
        offset: u64,
        bufs: &[Segment],
        bounce: &mut Bounce,
    ) -> io::Result<()> {
        let total = bufs.iter().map(|s| s.len).sum::<usize>();
        let buf = bounce.get()?;
        let mut done = 0usize;
        while done < total {
            let n = (total - done).min(buf.len());
            let chunk = buf.get_mut(..n).unwrap_or_default();
            // SAFETY: forwarded from this function's contract; the bounce buffer is ours.
            unsafe { gather(bufs, done, chunk) };
            self.pwrite_all(chunk, offset + done as u64)?;
            done += n;
        }
        Ok(())
    }

    fn pwrite_all(&self, mut data: &[u8], mut offset: u64) -> io::Result<()> {
        while !data.is_empty() {
            match retry_intr(|| rustix::io::pwrite(&self.file, data, offset))? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                k => {
                    data = data.get(k..).unwrap_or_default();
                    offset += k as u64;
                }
            }
        }
        Ok(())
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<(), Errno> {
        if len == 0 {
            return Ok(());
        }
        loop {
            match rustix::fs::fallocate(&self.file, mode, offset, len) {
                Err(Errno::INTR) => continue,
                r => return r,
            }
        }
    }

    /// The open file (its fd is what io_uring requests name).
    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// ZERO_RANGE (or PUNCH_HOLE first when `unmap` allows deallocation), falling back to
    /// the other, then to writing zeroes, when the filesystem or device cannot do it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        for mode in zero_modes(unmap) {
            match self.fallocate(mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.fill_zeroes(offset, len)
    }

    /// Writes zeroes over `len` bytes at `offset` (the last resort of write-zeroes, for
    /// files that can neither zero nor deallocate a range). Synchronous.
    pub(crate) fn fill_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let n = (end - at).min(ZEROES.0.len() as u64) as usize;
            self.pwrite_all(ZEROES.0.get(..n).unwrap_or_default(), at)?;
            at += n as u64;
        }
        Ok(())
    }
}

pub(crate) fn punch_hole() -> FallocateFlags {
    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
}

/// The fallocate modes write-zeroes tries, in order: PUNCH_HOLE first when the driver
/// allows deallocation (`unmap`), else ZERO_RANGE first.
pub(crate) fn zero_modes(unmap: bool) -> [FallocateFlags; 2] {
    if unmap {
        [punch_hole(), FallocateFlags::ZERO_RANGE]
    } else {
        [FallocateFlags::ZERO_RANGE, punch_hole()]
    }
}

/// fallocate errors meaning "this file or device cannot do that mode".
pub(crate) fn unsupported(e: Errno) -> bool {
    matches!(
        e,
        Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL | Errno::NODEV
    )
}

/// Whether every buffer's address and length are multiples of `align`.
pub(crate) fn buffers_aligned(bufs: &[Segment], align: usize) -> bool {
    bufs.iter()
        .all(|s| (s.base as usize) % align == 0 && s.len % align == 0)
}

/// Refuses an O_DIRECT file that needs more alignment than the logical block size (the
/// guest would send requests the file cannot take). Kernels before 6.1 cannot tell; the
/// file is then trusted.
fn check_direct_alignment(
    file: &File,
    path: &Path,
    logical_block_size: u32,
) -> Result<(), BlkError> {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    let Ok(stx) = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) else {
        return Ok(());
    };
    if stx.stx_mask & StatxFlags::DIOALIGN.bits() == 0 || stx.stx_dio_offset_align == 0 {
        return Ok(());
    }
    let required = stx.stx_dio_offset_align.max(stx.stx_dio_mem_align);
    if required > logical_block_size {
        return Err(BlkError::DirectIoAlignment {
            path: path.to_path_buf(),
            required,
            logical_block_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(buf: &mut [u8]) -> Segment {
        Segment {
            base: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    #[test]
    fn advance_skips_whole_and_partial_segments() {
        let (mut a, mut b, mut c) = ([0u8; 4], [0u8; 0], [0u8; 8]);
        let mut segs = [seg(&mut a), seg(&mut b), seg(&mut c)];
        let c_base = segs[2].base;
        let mut view: &mut [Segment] = &mut segs;
        advance(&mut view, 4);
        // The empty segment after the consumed one is dropped too.
        assert_eq!(view.len(), 1);
        advance(&mut view, 3);
        assert_eq!(view[0].len, 5);
        assert_eq!(view[0].base, c_base.wrapping_add(3));
        advance(&mut view, 5);
        assert!(view.is_empty());
        advance(&mut view, 1);
        assert!(view.is_empty());
    }

    #[test]
    fn scatter_and_gather_cross_segments_from_an_offset() {
        let (mut a, mut b) = ([0u8; 3], [0u8; 5]);
        let segs = [seg(&mut a), seg(&mut b)];
        // SAFETY: the segments point to the live local arrays above.
        unsafe { scatter(&segs, 2, &[1, 2, 3, 4]) };
        let mut out = [0u8; 6];
        // SAFETY: as above.
        unsafe { gather(&segs, 1, &mut out) };
        assert_eq!(out, [0, 1, 2, 3, 4, 0]);
        assert_eq!((a, b), ([0, 0, 1], [2, 3, 4, 0, 0]));
    }

    #[test]
    fn ram_disk_zero_keeps_bytes_outside_the_range() {
        let page = rustix::param::page_size();
        let disk = RamDisk::new((4 * page) as u64).unwrap();
        let mut fill = vec![0xabu8; 4 * page];
        let mut segs = [seg(&mut fill)];
        // SAFETY: the segment points to the live vector above.
        unsafe { disk.write(0, &segs).unwrap() };
        disk.zero(100, (2 * page) as u64).unwrap();
        let mut back = vec![0u8; 4 * page];
        segs[0] = seg(&mut back);
        // SAFETY: as above.
        unsafe { disk.read(0, &segs).unwrap() };
        for (i, b) in back.iter().enumerate() {
            let zeroed = (100..100 + 2 * page).contains(&i);
            assert_eq!(*b, if zeroed { 0 } else { 0xab }, "byte {i}");
        }
    }

    /// A memfd of `len` bytes, sealable if `sealing`.
    fn memfd(len: u64, sealing: bool) -> OwnedFd {
        let mut flags = rustix::fs::MemfdFlags::CLOEXEC;
        if sealing {
            flags |= rustix::fs::MemfdFlags::ALLOW_SEALING;
        }
        let fd = rustix::fs::memfd_create("uvdpa-test", flags).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        fd
    }

    /// (length, bytes allocated) of a file.
    fn file_usage(fd: BorrowedFd<'_>) -> (u64, u64) {
        let st = rustix::fs::fstat(fd).unwrap();
        (st.st_size as u64, st.st_blocks as u64 * 512)
    }

    #[test]
    fn ram_disk_shrink_punches_a_hole_and_keeps_the_file_length() {
        let page = rustix::param::page_size();
        let disk = RamDisk::new((16 * page) as u64).unwrap();
        let mut fill = vec![0x5au8; 16 * page];
        let mut segs = [seg(&mut fill)];
        // SAFETY: the segment points to the live vector above.
        unsafe { disk.write(0, &segs).unwrap() };
        assert_eq!(file_usage(disk.fd()).0, (16 * page) as u64);
        assert!(file_usage(disk.fd()).1 >= (16 * page) as u64);

        // The 12 pages past the new end go back to the kernel; the file keeps its length,
        // so the committed mapping stays backed.
        disk.resize((4 * page) as u64).unwrap();
        let (len, used) = file_usage(disk.fd());
        assert_eq!(len, (16 * page) as u64);
        assert!(used <= (4 * page) as u64, "{used} bytes still allocated");

        // Growing again maps nothing new (the file is long enough) and reads zeroes there.
        disk.resize((16 * page) as u64).unwrap();
        segs[0] = seg(&mut fill);
        // SAFETY: as above.
        unsafe { disk.read(0, &segs).unwrap() };
        assert!(fill[..4 * page].iter().all(|&b| b == 0x5a));
        assert!(fill[4 * page..].iter().all(|&b| b == 0));
        // Growth past the file's end extends it.
        disk.resize((20 * page) as u64).unwrap();
        assert_eq!(file_usage(disk.fd()).0, (20 * page) as u64);
        // Nobody can shrink it under the mapping.
        assert_eq!(rustix::fs::ftruncate(disk.fd(), 0), Err(Errno::PERM));
    }

    #[test]
    fn ram_disk_from_fd_maps_the_same_bytes() {
        let page = rustix::param::page_size();
        // A size that ends inside a page: the file is extended to the whole page, never
        // mapped past its end.
        let size = 3 * 512;
        let fd = memfd(size, true);
        let other = RamDisk::from_fd(fd.try_clone().unwrap(), size).unwrap();
        assert_eq!(file_usage(fd.as_fd()).0, page as u64);
        let disk = RamDisk::from_fd(fd, size).unwrap();
        let mut data = [7u8; 512];
        let segs = [seg(&mut data)];
        // SAFETY: the segment points to the live array above.
        unsafe { other.write(1024, &segs).unwrap() };
        let mut back = [0u8; 512];
        let segs = [seg(&mut back)];
        // SAFETY: as above.
        unsafe { disk.read(1024, &segs).unwrap() };
        assert_eq!(back, [7u8; 512]);
    }

    #[test]
    fn ram_disk_from_fd_refuses_small_and_unsealable_fds() {
        let page = rustix::param::page_size() as u64;
        let e = RamDisk::from_fd(memfd(page, true), 2 * page).unwrap_err();
        assert!(
            matches!(e, BlkError::RamFdTooSmall { size, fd_size } if size == 2 * page && fd_size == page),
            "{e}"
        );
        let e = RamDisk::from_fd(memfd(2 * page, false), 2 * page).unwrap_err();
        assert!(matches!(e, BlkError::AdoptRamFd { .. }), "{e}");
        assert!(e.to_string().contains("MFD_ALLOW_SEALING"), "{e}");
    }

    #[test]
    fn range_checks_refuse_overflow_and_overrun() {
        assert!(check_range(0, 4096, 4096).is_ok());
        assert!(check_range(512, 4096, 4096).is_err());
        assert!(check_range(u64::MAX, 2, 4096).is_err());
        let disk = Backend::null(1024);
        assert!(disk.discard(1024, 1).is_err());
        assert!(disk.write_zeroes(0, 1024, false).is_ok());
    }
}
