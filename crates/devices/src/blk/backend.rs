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

use std::io;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use uvdpa_virtio::Segment;

use super::nbd::NbdDisk;
use super::rbd::RbdDisk;

mod file;
mod ram;

pub(crate) use file::{Bounce, FileDisk};
pub(crate) use ram::RamDisk;
pub use ram::RAM_RESERVE;

/// Most iovecs one preadv/pwritev (or io_uring READV/WRITEV) accepts (Linux `UIO_MAXIOV`);
/// longer chains are done in several calls.
pub(crate) const IOV_MAX: usize = 1024;

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

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use super::super::BlkError;
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
