//! [`FileDisk`]: a disk in a regular file or block device, with `preadv`/`pwritev`
//! straight to guest memory and, for O_DIRECT requests with unaligned guest buffers, the
//! per-queue [`Bounce`] buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::mem::{align_of, offset_of, size_of};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::FallocateFlags;
use rustix::io::Errno;
use uvdpa_virtio::Segment;

use super::super::{BlkError, SECTOR_SIZE};
use super::{
    advance, buffers_aligned, gather, retry_intr, scatter, unsupported, zero_modes, ResizeError,
    IOV_MAX,
};

// `Segment` is documented as layout-compatible with `struct iovec`; the file backend relies
// on it to pass a chain's segments to preadv/pwritev without copying them.
const _: () = {
    assert!(size_of::<Segment>() == size_of::<libc::iovec>());
    assert!(align_of::<Segment>() == align_of::<libc::iovec>());
    assert!(offset_of!(Segment, base) == offset_of!(libc::iovec, iov_base));
    assert!(offset_of!(Segment, len) == offset_of!(libc::iovec, iov_len));
};

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

/// A disk in a regular file or block device.
///
/// With O_DIRECT (`direct_align` is set), the kernel needs request offsets, lengths and
/// memory aligned to the logical block size. Offsets and lengths are checked by the request
/// parser (misaligned ones fail with IOERR); requests whose *guest buffers* are not aligned
/// in address or length go through a per-queue aligned bounce buffer ([`Bounce`]) in 1 MiB
/// chunks. Only those requests are copied; aligned ones still go straight to guest memory.
#[derive(Debug)]
pub(crate) struct FileDisk {
    pub(super) file: File,
    path: PathBuf,
    /// A block device (its size is fixed), not a regular file.
    block_device: bool,
    pub(super) size: AtomicU64,
    pub(super) direct_align: Option<usize>,
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

    /// Changes the capacity (see [`Backend::resize`](super::Backend::resize)): a regular
    /// file is extended before the new capacity is published, or truncated after the old
    /// one stopped being served.
    pub(super) fn resize(&self, size: u64) -> Result<(), ResizeError> {
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
    /// As [`Backend::read`](super::Backend::read).
    pub(super) unsafe fn read(
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
    /// As [`Backend::write`](super::Backend::write).
    pub(super) unsafe fn write(
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
    /// As [`Backend::read`](super::Backend::read) (reads) or
    /// [`Backend::write`](super::Backend::write) (writes).
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
    /// As [`Backend::read`](super::Backend::read).
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
    /// As [`Backend::write`](super::Backend::write).
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

    pub(super) fn fallocate(
        &self,
        mode: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> Result<(), Errno> {
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
    pub(super) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
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
