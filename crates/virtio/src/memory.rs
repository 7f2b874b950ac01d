//! Guest memory: regions mapped from the frontend's fds, with bounds-checked translation of
//! guest physical addresses (descriptors) and frontend virtual addresses (vring addresses).
//!
//! Every translation checks `addr + len` for overflow and that the whole range lies inside
//! mapped memory; nothing is dereferenced here. The pointers handed out stay valid while
//! the [`GuestMemory`] they came from is alive (workers hold it in an `Arc`).

use std::os::fd::AsFd;
use std::ptr::NonNull;

use thiserror::Error;

/// Most regions one memory table may hold (the answer to vhost-user GET_MAX_MEM_SLOTS).
pub const MAX_REGIONS: usize = 32;

/// Errors from building or translating guest memory.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum MemoryError {
    /// A region has size 0 or its address ranges overflow 64 bits.
    #[error(
        "Invalid memory region: gpa {gpa:#x} size {size:#x} uaddr {uaddr:#x} offset {offset:#x}"
    )]
    InvalidRegion {
        /// Guest physical address of the region.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Frontend virtual address.
        uaddr: u64,
        /// Offset into the fd.
        offset: u64,
    },
    /// Two regions overlap in guest physical or frontend virtual address space.
    #[error("Memory regions overlap at gpa {gpa:#x}")]
    Overlap {
        /// Start of the later region.
        gpa: u64,
    },
    /// More regions than [`MAX_REGIONS`].
    #[error("Too many memory regions: {count} (at most {MAX_REGIONS})")]
    TooManyRegions {
        /// Number of regions requested.
        count: usize,
    },
    /// No region with this guest address exists (REM_MEM_REG).
    #[error("No memory region at gpa {gpa:#x} size {size:#x}")]
    NoSuchRegion {
        /// Guest physical address asked for.
        gpa: u64,
        /// Size asked for.
        size: u64,
    },
    /// mmap of a region's fd failed.
    #[error("Mapping memory region of {len} bytes failed: {errno}")]
    Map {
        /// Length of the attempted mapping.
        len: u64,
        /// The error from mmap.
        errno: rustix::io::Errno,
    },
    /// The region extends past the end of its fd (touching it would raise SIGBUS).
    #[error("Memory region needs {need} bytes of its fd, which has {size}")]
    PastEndOfFile {
        /// mmap_offset + size.
        need: u64,
        /// The file's size.
        size: u64,
    },
    /// A guest range is not entirely inside mapped memory, or its end overflows.
    #[error("Guest address range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfBounds {
        /// Start address of the range.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// One mapped region of guest memory (vhost-user `VhostUserMemoryRegion`).
#[derive(Debug)]
pub struct MemoryRegion {
    gpa: u64,
    size: u64,
    uaddr: u64,
    mmap_offset: u64,
    /// Start of the whole mapping (offset 0 of the fd).
    map_base: NonNull<u8>,
    map_len: usize,
}

// SAFETY: the region owns a shared mapping; it is only accessed through raw pointers whose
// users copy bytes or use atomics, so moving or sharing the handle between threads is sound.
unsafe impl Send for MemoryRegion {}
// SAFETY: see `Send`; no interior state changes after construction.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Maps `size` bytes of `fd` starting at `mmap_offset`, to appear at guest physical
    /// address `gpa` and frontend virtual address `uaddr`.
    ///
    /// # Errors
    /// [`MemoryError::InvalidRegion`] for a zero size or overflowing range,
    /// [`MemoryError::PastEndOfFile`] when a regular file (memfd) is smaller than
    /// `mmap_offset + size`, [`MemoryError::Map`] if mmap fails.
    pub fn map(
        fd: impl AsFd,
        gpa: u64,
        size: u64,
        uaddr: u64,
        mmap_offset: u64,
    ) -> Result<Self, MemoryError> {
        let invalid = MemoryError::InvalidRegion {
            gpa,
            size,
            uaddr,
            offset: mmap_offset,
        };
        let total = validate_region(gpa, size, uaddr, mmap_offset).ok_or(invalid)?;
        // mmap succeeds past the end of a file and the first access there raises SIGBUS:
        // a frontend must not be able to plant that. Regular files (memfd, tmpfs,
        // hugetlbfs) have a size to check.
        let st = rustix::fs::fstat(&fd).map_err(|errno| MemoryError::Map { len: total, errno })?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && (st.st_size as u64) < total
        {
            return Err(MemoryError::PastEndOfFile {
                need: total,
                size: st.st_size as u64,
            });
        }
        let map_len = usize::try_from(total).map_err(|_| MemoryError::InvalidRegion {
            gpa,
            size,
            uaddr,
            offset: mmap_offset,
        })?;
        // Map from offset 0 so an unaligned mmap_offset is still accepted, as vhost-user
        // backends customarily do.
        // SAFETY: a fresh shared mapping at an address chosen by the kernel; it aliases no
        // Rust object. The result is checked before use.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                map_len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::NORESERVE,
                fd,
                0,
            )
        }
        .map_err(|errno| MemoryError::Map { len: total, errno })?;
        let map_base = NonNull::new(ptr.cast::<u8>()).ok_or(MemoryError::Map {
            len: total,
            errno: rustix::io::Errno::INVAL,
        })?;
        Ok(Self {
            gpa,
            size,
            uaddr,
            mmap_offset,
            map_base,
            map_len,
        })
    }

    /// An anonymous region of `size` bytes at `gpa` (frontend address equal to `gpa`), for
    /// tests and tools that act as their own frontend.
    ///
    /// # Errors
    /// As [`MemoryRegion::map`].
    pub fn anonymous(gpa: u64, size: u64) -> Result<Self, MemoryError> {
        let fd = rustix::fs::memfd_create("uvdpa-guest", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|errno| MemoryError::Map { len: size, errno })?;
        rustix::fs::ftruncate(&fd, size).map_err(|errno| MemoryError::Map { len: size, errno })?;
        Self::map(&fd, gpa, size, gpa, 0)
    }

    /// Whether the two regions overlap in guest physical or frontend virtual address
    /// space (sizes were checked at construction, so the ends do not overflow).
    fn overlaps(&self, other: &Self) -> bool {
        (self.gpa < other.gpa + other.size && other.gpa < self.gpa + self.size)
            || (self.uaddr < other.uaddr + other.size && other.uaddr < self.uaddr + self.size)
    }

    /// Guest physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Frontend virtual address of the first byte.
    pub fn uaddr(&self) -> u64 {
        self.uaddr
    }

    /// Host pointer of the region's first byte.
    pub fn host_base(&self) -> *mut u8 {
        // The offset fits: map_len = mmap_offset + size was checked at construction.
        self.map_base
            .as_ptr()
            .wrapping_add(self.mmap_offset as usize)
    }

    /// Host pointer for `[start, start+len)` of the region's own address space `base`
    /// (gpa or uaddr), if the range is inside.
    fn host_range(&self, base: u64, addr: u64, len: u64) -> Option<*mut u8> {
        let off = addr.checked_sub(base)?;
        let end = off.checked_add(len)?;
        if end > self.size {
            return None;
        }
        Some(self.host_base().wrapping_add(off as usize))
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: map_base/map_len describe the mapping this region created and owns; no
        // pointer into it outlives the region (translations borrow the GuestMemory).
        let _ = unsafe { rustix::mm::munmap(self.map_base.as_ptr().cast(), self.map_len) };
    }
}

/// Checks a region's ranges; returns the mapping length (`mmap_offset + size`).
fn validate_region(gpa: u64, size: u64, uaddr: u64, mmap_offset: u64) -> Option<u64> {
    if size == 0 {
        return None;
    }
    gpa.checked_add(size)?;
    uaddr.checked_add(size)?;
    let total = mmap_offset.checked_add(size)?;
    // Refuse absurd sizes before asking the kernel: more than 2^47 bytes cannot be mapped.
    if total > (1u64 << 47) {
        return None;
    }
    Some(total)
}

/// A guest memory table: non-overlapping regions sorted by guest physical address.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<MemoryRegion>,
}

impl GuestMemory {
    /// Builds a memory table from regions.
    ///
    /// # Errors
    /// [`MemoryError::TooManyRegions`] past [`MAX_REGIONS`]; [`MemoryError::Overlap`] when
    /// two regions overlap in guest physical or frontend virtual address space.
    pub fn new(mut regions: Vec<MemoryRegion>) -> Result<Self, MemoryError> {
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions {
                count: regions.len(),
            });
        }
        regions.sort_by_key(|r| r.gpa);
        for (i, a) in regions.iter().enumerate() {
            if let Some(b) = regions.iter().skip(i + 1).find(|b| a.overlaps(b)) {
                return Err(MemoryError::Overlap { gpa: b.gpa });
            }
        }
        Ok(Self { regions })
    }

    /// Checks that `region` could join this table (ADD_MEM_REG) without building the new
    /// table, so a refused addition leaves the current one in place.
    ///
    /// # Errors
    /// As [`GuestMemory::new`] for the table with `region` added.
    pub fn check_addition(&self, region: &MemoryRegion) -> Result<(), MemoryError> {
        if self.regions.len() >= MAX_REGIONS {
            return Err(MemoryError::TooManyRegions {
                count: self.regions.len() + 1,
            });
        }
        match self.regions.iter().find(|r| r.overlaps(region)) {
            Some(r) => Err(MemoryError::Overlap {
                gpa: r.gpa.max(region.gpa),
            }),
            None => Ok(()),
        }
    }

    /// The region that starts at `gpa` and is `size` bytes long, if mapped (the identity
    /// of a region in ADD_MEM_REG/REM_MEM_REG).
    pub fn region(&self, gpa: u64, size: u64) -> Option<&MemoryRegion> {
        self.regions.iter().find(|r| r.gpa == gpa && r.size == size)
    }

    /// The regions, sorted by guest physical address.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// Consumes the table, returning its regions (to build a new table with one more or
    /// one fewer region, as ADD_MEM_REG / REM_MEM_REG do).
    pub fn into_regions(self) -> Vec<MemoryRegion> {
        self.regions
    }

    /// Total bytes of guest memory mapped.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    fn region_for_gpa(&self, gpa: u64) -> Option<&MemoryRegion> {
        let idx = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = self.regions.get(idx.checked_sub(1)?)?;
        (gpa - r.gpa < r.size).then_some(r)
    }

    /// Host pointer for the guest physical range `[gpa, gpa+len)`, which must lie inside
    /// one region.
    ///
    /// # Errors
    /// [`MemoryError::OutOfBounds`] if any byte of the range is unmapped or `gpa+len`
    /// overflows.
    pub fn translate(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let oob = MemoryError::OutOfBounds { addr: gpa, len };
        let r = self.region_for_gpa(gpa).ok_or(oob.clone())?;
        r.host_range(r.gpa, gpa, len).ok_or(oob)
    }

    /// Splits the guest physical range `[gpa, gpa+len)` into host pieces, one per region it
    /// crosses, calling `f(host_ptr, piece_len)` for each in order.
    ///
    /// # Errors
    /// [`MemoryError::OutOfBounds`] if any byte is unmapped or the end overflows; `f` may
    /// have been called for a prefix of the range.
    pub fn for_each_piece(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(*mut u8, u64),
    ) -> Result<(), MemoryError> {
        let oob = MemoryError::OutOfBounds { addr: gpa, len };
        gpa.checked_add(len).ok_or(oob.clone())?;
        let (mut addr, mut left) = (gpa, len);
        while left > 0 {
            let r = self.region_for_gpa(addr).ok_or(oob.clone())?;
            let in_region = (r.gpa + r.size - addr).min(left);
            f(
                r.host_base().wrapping_add((addr - r.gpa) as usize),
                in_region,
            );
            addr += in_region;
            left -= in_region;
        }
        Ok(())
    }

    /// Host pointer for the frontend virtual range `[uaddr, uaddr+len)` (vhost-user vring
    /// addresses, which are in the frontend's address space), inside one region.
    ///
    /// # Errors
    /// [`MemoryError::OutOfBounds`] as for [`GuestMemory::translate`].
    pub fn translate_uaddr(&self, uaddr: u64, len: u64) -> Result<*mut u8, MemoryError> {
        self.regions
            .iter()
            .find_map(|r| r.host_range(r.uaddr, uaddr, len))
            .ok_or(MemoryError::OutOfBounds { addr: uaddr, len })
    }

    /// Copies `data` into guest memory at `gpa` (test frontends and tools).
    ///
    /// # Errors
    /// [`MemoryError::OutOfBounds`] if the range is not mapped.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        self.for_each_piece(gpa, data.len() as u64, |p, n| {
            // SAFETY: `p..p+n` is inside a live mapping (checked by for_each_piece) and the
            // source slice has at least `done + n` bytes; the regions do not overlap `data`.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(done), p, n as usize) };
            done += n as usize;
        })
    }

    /// Copies guest memory at `gpa` into `buf` (test frontends and tools).
    ///
    /// # Errors
    /// [`MemoryError::OutOfBounds`] if the range is not mapped.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        let dst = buf.as_mut_ptr();
        self.for_each_piece(gpa, buf.len() as u64, |p, n| {
            // SAFETY: as in `write`, with source and destination swapped.
            unsafe { std::ptr::copy_nonoverlapping(p, dst.add(done), n as usize) };
            done += n as usize;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translate_checks_bounds_and_overflow() {
        let mem = GuestMemory::new(vec![
            MemoryRegion::anonymous(0, 0x10000).unwrap(),
            MemoryRegion::anonymous(0x20000, 0x10000).unwrap(),
        ])
        .unwrap();
        assert!(mem.translate(0, 0x10000).is_ok());
        assert!(mem.translate(0xfff0, 0x11).is_err());
        assert!(mem.translate(0x10000, 1).is_err());
        assert!(mem.translate(0x2ffff, 1).is_ok());
        assert!(mem.translate(u64::MAX, 2).is_err());
        assert!(mem.for_each_piece(u64::MAX - 1, 4, |_, _| {}).is_err());
    }

    #[test]
    fn pieces_split_across_adjacent_regions() {
        let mem = GuestMemory::new(vec![
            MemoryRegion::anonymous(0, 0x1000).unwrap(),
            MemoryRegion::anonymous(0x1000, 0x1000).unwrap(),
        ])
        .unwrap();
        let mut pieces = vec![];
        mem.for_each_piece(0xff0, 0x20, |_, n| pieces.push(n))
            .unwrap();
        assert_eq!(pieces, vec![0x10, 0x10]);
        mem.write(0xff8, &[7u8; 16]).unwrap();
        let mut back = [0u8; 16];
        mem.read(0xff8, &mut back).unwrap();
        assert_eq!(back, [7u8; 16]);
    }

    #[test]
    fn overlapping_and_absurd_regions_are_refused() {
        let err = GuestMemory::new(vec![
            MemoryRegion::anonymous(0, 0x2000).unwrap(),
            MemoryRegion::anonymous(0x1000, 0x2000).unwrap(),
        ])
        .unwrap_err();
        assert_eq!(err, MemoryError::Overlap { gpa: 0x1000 });
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        assert!(matches!(
            MemoryRegion::map(&fd, u64::MAX - 10, 0x1000, 0, 0),
            Err(MemoryError::InvalidRegion { .. })
        ));
        assert!(matches!(
            MemoryRegion::map(&fd, 0, 0, 0, 0),
            Err(MemoryError::InvalidRegion { .. })
        ));
        assert!(matches!(
            MemoryRegion::map(&fd, 0, 1 << 50, 0, 0),
            Err(MemoryError::InvalidRegion { .. })
        ));
        // A memfd smaller than the region it is said to back (found by fuzzing: SIGBUS).
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        assert_eq!(
            MemoryRegion::map(&fd, 0, 1 << 20, 0, 0).unwrap_err(),
            MemoryError::PastEndOfFile {
                need: 1 << 20,
                size: 4096
            }
        );
        assert!(matches!(
            MemoryRegion::map(&fd, 0, 4096, 0, 1),
            Err(MemoryError::PastEndOfFile { .. })
        ));
        assert!(MemoryRegion::map(&fd, 0, 4096, 0, 0).is_ok());
    }
}
