//! [`RamDisk`]: a disk in a memfd mapped shared into a reservation of address space that
//! it grows and shrinks in place, and the reservation it lives in.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rustix::io::Errno;
use uvdpa_virtio::Segment;

use super::super::BlkError;
use super::{punch_hole, retry_intr, ResizeError};

/// Address space a RAM disk reserves so it can grow in place: `RamDisk::new` and
/// `RamDisk::from_fd` reserve `max(size, RAM_RESERVE)` bytes, of which only the first
/// `size` (in whole pages) map the disk's memfd (the rest is PROT_NONE: it costs neither
/// memory nor commit charge).
pub const RAM_RESERVE: u64 = 256 << 30;

/// A disk in a memfd (`memfd_create("uvdpa-ram")`), mapped shared into a reservation of
/// address space. It lives as long as the device, across frontend reconnects; its fd
/// ([`RamDisk::fd`]) can be handed to another process (a new daemon taking the devices
/// over on a live upgrade), which maps the same bytes with `RamDisk::from_fd`.
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
    pub(super) size: AtomicU64,
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
    /// mapped as `RamDisk::from_fd` maps it.
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
    /// [`RAM_RESERVE`] bytes, as `RamDisk::new`'s.
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

    /// Changes the capacity (see [`Backend::resize`](super::Backend::resize)).
    pub(super) fn resize(&self, size: u64) -> Result<(), ResizeError> {
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

    /// Host pointer to disk byte `offset`, after [`check_range`](super::check_range) proved
    /// `offset + len <= size` (or, for [`RamDisk::clear`], inside the committed part).
    fn at(&self, offset: u64) -> *mut u8 {
        self.base.as_ptr().wrapping_add(offset as usize)
    }

    /// # Safety
    /// As [`Backend::read`](super::Backend::read); the range was checked against the disk size.
    pub(super) unsafe fn read(&self, offset: u64, bufs: &[Segment]) -> io::Result<()> {
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
    /// As [`Backend::write`](super::Backend::write); the range was checked against the disk size.
    pub(super) unsafe fn write(&self, offset: u64, bufs: &[Segment]) -> io::Result<()> {
        let mut dst = self.at(offset);
        for s in bufs {
            // SAFETY: as in `read`, with the copy direction reversed.
            unsafe { std::ptr::copy_nonoverlapping(s.base, dst, s.len) };
            dst = dst.wrapping_add(s.len);
        }
        Ok(())
    }

    /// Zeroes a checked range (see [`RamDisk::clear`]).
    pub(super) fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
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
