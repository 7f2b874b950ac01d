//! Guest memory: regions mapped from the frontend's fds, with bounds-checked translation of
//! guest physical addresses (descriptors) and frontend virtual addresses (vring addresses).
//!
//! Every translation checks `addr + len` for overflow and that the whole range lies inside
//! mapped memory; nothing is dereferenced here. The pointers handed out stay valid while
//! the [`GuestMemory`] they came from is alive (workers hold it in an `Arc`).
//!
//! A table is a fixed, immutable set of regions (the vhost-user memory table), optionally
//! followed by *late* regions that a [`RegionResolver`] supplies on a translation miss
//! (VDUSE: IOTLB entries fetched from the kernel when first used). Late regions live behind
//! a read-write lock that is only taken on a miss in the fixed table, so translations that
//! hit the fixed table cost what they always did. [`GuestMemory::invalidate`] stops late
//! regions from being used for new translations but keeps them mapped until the table is
//! dropped (or [`GuestMemory::purge_retired`] runs with exclusive access), so a host
//! pointer a worker obtained earlier never dangles: after an invalidation it may point at
//! stale memory, never at unmapped memory.
//!
//! Every mapping is registered with [`crate::fault`]: if its fd shrinks under it (a
//! frontend truncates an unsealed memfd), the SIGBUS of the next access is contained in
//! that mapping and [`GuestMemory::faulted_region`] names the region. [`fd_seals`] tells
//! whether an fd is sealed against that.

use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::{Arc, PoisonError, RwLock};

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
    /// Start of the whole mapping (offset 0 of the fd for [`MemoryRegion::map`], the
    /// 64 KiB-aligned offset below `mmap_offset` for [`MemoryRegion::map_with`]).
    map_base: NonNull<u8>,
    map_len: usize,
    /// Offset of the region's first byte from `map_base`.
    host_offset: usize,
    /// How the fd is mapped.
    sharing: Sharing,
    /// The mapping's entry in the SIGBUS registry ([`crate::fault`]); `None` when the
    /// registry was full.
    fault: Option<crate::fault::Registration>,
}

/// How [`MemoryRegion::map_with`] maps a region's fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// `MAP_SHARED`, readable and writable: reads see the other side's stores and stores
    /// reach it (guest RAM, VDUSE IOTLB entries with read-write or write-only access).
    Shared,
    /// `MAP_PRIVATE`, readable and writable: reads see the file (until the page is
    /// written), stores land in a private copy that the other side never sees. Used for
    /// memory the driver made read-only to the device (VDUSE `VDUSE_ACCESS_RO`): a device
    /// that writes there by mistake or because a driver told it to cannot fault and cannot
    /// change the driver's memory. Refused on hugetlbfs, where a copy-on-write fault can
    /// fail with SIGBUS when no huge page is free.
    Private,
}

/// Alignment of the file offset [`MemoryRegion::map_with`] maps from: a multiple of every
/// page size Linux uses (4, 16 and 64 KiB), so it is always a valid mmap offset.
const MAP_OFFSET_ALIGN: u64 = 1 << 16;

/// `statfs.f_type` of hugetlbfs (`HUGETLBFS_MAGIC`, linux/magic.h).
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
/// `statfs.f_type` of anonymous-inode files (`ANON_INODE_FS_MAGIC`, linux/magic.h).
const ANON_INODE_FS_MAGIC: u64 = 0x0904_1934;

/// The filesystem magic of `fd`'s file, if fstatfs works.
fn fs_magic(fd: impl AsFd) -> Option<u64> {
    let sfs = rustix::fs::fstatfs(fd).ok()?;
    u64::try_from(sfs.f_type).ok()
}

/// `statfs.f_type` of tmpfs and shmem (`TMPFS_MAGIC`, linux/magic.h).
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// Whether a memory fd can shrink under its mapping, as [`fd_seals`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdSeals {
    /// The fd carries `F_SEAL_SHRINK`: nobody can truncate it, so its mapping cannot fault.
    pub shrink_sealed: bool,
    /// What the fd is, for log lines: `memfd`, `hugetlbfs`, `tmpfs` or `file`.
    pub kind: &'static str,
}

/// Queries `fd`'s seals (`F_GET_SEALS`) and kind. Only memfds (and other shmem files) carry
/// seals; a file, or a file on hugetlbfs, is never sealed and relies on SIGBUS containment
/// ([`crate::fault`]) if the frontend shrinks it.
pub fn fd_seals(fd: impl AsFd) -> FdSeals {
    let fd = fd.as_fd();
    let shrink_sealed =
        rustix::fs::fcntl_get_seals(fd).is_ok_and(|s| s.contains(rustix::fs::SealFlags::SHRINK));
    let memfd = rustix::fs::fcntl_get_seals(fd).is_ok()
        && std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:"));
    let kind = match (memfd, fs_magic(fd)) {
        (true, _) => "memfd",
        (false, Some(HUGETLBFS_MAGIC)) => "hugetlbfs",
        (false, Some(TMPFS_MAGIC)) => "tmpfs",
        _ => "file",
    };
    FdSeals {
        shrink_sealed,
        kind,
    }
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
        // Map from offset 0 so an unaligned mmap_offset is still accepted, as vhost-user
        // backends customarily do.
        Self::map_inner(fd, gpa, size, uaddr, mmap_offset, Sharing::Shared, 0)
    }

    /// Maps `size` bytes of `fd` starting at `mmap_offset`, to appear at guest address
    /// `gpa` (and frontend address `uaddr`), shared or private as `sharing` says.
    ///
    /// Unlike [`MemoryRegion::map`], the mapping starts at the 64 KiB boundary below
    /// `mmap_offset` rather than at offset 0 of the fd, so a small region far into a large
    /// file (an IOTLB entry of a VM's memory) costs only its own size of address space.
    ///
    /// # Errors
    /// As [`MemoryRegion::map`]; [`MemoryError::Map`] with `EOPNOTSUPP` for
    /// [`Sharing::Private`] on hugetlbfs.
    pub fn map_with(
        fd: impl AsFd,
        gpa: u64,
        size: u64,
        uaddr: u64,
        mmap_offset: u64,
        sharing: Sharing,
    ) -> Result<Self, MemoryError> {
        let base = mmap_offset - mmap_offset % MAP_OFFSET_ALIGN;
        Self::map_inner(fd, gpa, size, uaddr, mmap_offset, sharing, base)
    }

    /// Maps `[base, mmap_offset + size)` of `fd`; the region starts at `mmap_offset`.
    fn map_inner(
        fd: impl AsFd,
        gpa: u64,
        size: u64,
        uaddr: u64,
        mmap_offset: u64,
        sharing: Sharing,
        base: u64,
    ) -> Result<Self, MemoryError> {
        let fd = fd.as_fd();
        let invalid = MemoryError::InvalidRegion {
            gpa,
            size,
            uaddr,
            offset: mmap_offset,
        };
        let total = validate_region(gpa, size, uaddr, mmap_offset).ok_or(invalid.clone())?;
        // mmap succeeds past the end of a file and the first access there raises SIGBUS:
        // a frontend must not be able to plant that. Regular files (memfd, tmpfs,
        // hugetlbfs) have a size to check. Anonymous-inode files (the VDUSE IOVA domain)
        // may report a regular-file mode with size 0 on newer kernels: their size means
        // nothing, so they are not checked.
        let st = rustix::fs::fstat(fd).map_err(|errno| MemoryError::Map { len: total, errno })?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && (st.st_size as u64) < total
            && fs_magic(fd) != Some(ANON_INODE_FS_MAGIC)
        {
            return Err(MemoryError::PastEndOfFile {
                need: total,
                size: st.st_size as u64,
            });
        }
        if sharing == Sharing::Private && fs_magic(fd) == Some(HUGETLBFS_MAGIC) {
            return Err(MemoryError::Map {
                len: total,
                errno: rustix::io::Errno::OPNOTSUPP,
            });
        }
        // base <= mmap_offset (callers pass 0 or mmap_offset rounded down).
        let host_offset = usize::try_from(mmap_offset - base).map_err(|_| invalid.clone())?;
        let map_len = usize::try_from(total - base).map_err(|_| invalid.clone())?;
        let flags = match sharing {
            Sharing::Shared => rustix::mm::MapFlags::SHARED,
            Sharing::Private => rustix::mm::MapFlags::PRIVATE,
        } | rustix::mm::MapFlags::NORESERVE;
        // SAFETY: a fresh mapping at an address chosen by the kernel; it aliases no Rust
        // object. The result is checked before use.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                map_len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                flags,
                fd,
                base,
            )
        }
        .map_err(|errno| MemoryError::Map { len: total, errno })?;
        let map_base = NonNull::new(ptr.cast::<u8>()).ok_or(MemoryError::Map {
            len: total,
            errno: rustix::io::Errno::INVAL,
        })?;
        let fault = crate::fault::register(map_base.as_ptr(), map_len);
        if fault.is_none() {
            tracing::warn!(
                gpa,
                size,
                "Guest memory registry full: a SIGBUS in this region kills the daemon"
            );
        }
        Ok(Self {
            gpa,
            size,
            uaddr,
            mmap_offset,
            map_base,
            map_len,
            host_offset,
            sharing,
            fault,
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

    /// Bytes of address space the region's mapping takes (for [`MemoryRegion::map`]:
    /// `mmap_offset + size`, as it maps from offset 0 of the fd).
    pub fn mapped_len(&self) -> u64 {
        self.map_len as u64
    }

    /// Frontend virtual address of the first byte.
    pub fn uaddr(&self) -> u64 {
        self.uaddr
    }

    /// How the region's fd is mapped ([`Sharing::Shared`] for [`MemoryRegion::map`]).
    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// Whether a SIGBUS inside the region's mapping was contained ([`crate::fault`]): its
    /// fd shrank under it, and the mapping now holds private zeros, not guest memory.
    pub fn faulted(&self) -> bool {
        self.fault
            .as_ref()
            .is_some_and(crate::fault::Registration::faulted)
    }

    /// Host pointer of the region's first byte.
    pub fn host_base(&self) -> *mut u8 {
        // The offset is inside the mapping: checked at construction.
        self.map_base.as_ptr().wrapping_add(self.host_offset)
    }

    /// Whether `addr` lies inside the region's guest address range.
    fn contains_gpa(&self, addr: u64) -> bool {
        addr >= self.gpa && addr - self.gpa < self.size
    }

    /// Whether the two regions overlap in guest address space only.
    fn overlaps_gpa(&self, other: &Self) -> bool {
        self.gpa < other.gpa + other.size && other.gpa < self.gpa + self.size
    }

    /// Whether the region overlaps the inclusive guest range `[start, last]`.
    fn overlaps_range(&self, start: u64, last: u64) -> bool {
        self.gpa <= last && start <= self.gpa + (self.size - 1)
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
        // Unregistered before the unmap, so the SIGBUS handler never maps over an address
        // range something else may get next.
        drop(self.fault.take());
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

/// Supplies regions that were not in a [`GuestMemory`]'s fixed table when it was built
/// (VDUSE: the IOTLB entry covering an IOVA, fetched from the kernel when first used).
///
/// # Contract
/// [`RegionResolver::resolve`] is called without any lock of the table held, possibly
/// from several worker threads at once, once per translation miss. A returned region must
/// contain `addr` and must not overlap a region the table already uses; otherwise it is
/// dropped (unmapped) and the translation fails. Returning `None` makes the translation
/// fail with [`MemoryError::OutOfBounds`], as an unmapped address always has.
pub trait RegionResolver: Send + Sync {
    /// The region containing guest address `addr`, freshly mapped, or `None` if there is
    /// none (or it cannot be mapped).
    fn resolve(&self, addr: u64) -> Option<MemoryRegion>;
}

/// Default for [`LateLimits::max_regions`].
pub const MAX_LATE_REGIONS: usize = 256;
/// Default for [`LateLimits::max_bytes`]: 256 GiB of address space.
pub const MAX_LATE_BYTES: u64 = 256 << 30;

/// Bounds on the late regions of a [`GuestMemory`], counting the active ones and the
/// retired ones still mapped (see [`GuestMemory::invalidate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LateLimits {
    /// Most late regions, active plus retired.
    pub max_regions: usize,
    /// Most bytes of late regions, active plus retired (their sizes, in bytes).
    pub max_bytes: u64,
}

impl Default for LateLimits {
    fn default() -> Self {
        Self {
            max_regions: MAX_LATE_REGIONS,
            max_bytes: MAX_LATE_BYTES,
        }
    }
}

/// Counters of a table's late regions ([`GuestMemory::late_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LateStats {
    /// Late regions used for translations.
    pub active: usize,
    /// Late regions invalidated but still mapped.
    pub retired: usize,
    /// Bytes of active plus retired late regions.
    pub bytes: u64,
    /// Number of [`GuestMemory::invalidate`] calls so far.
    pub generation: u64,
}

/// What [`GuestMemory::invalidate`] did.
#[must_use = "a fixed region in the range is still used: the table must be replaced"]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Invalidated {
    /// Late regions moved to the retired list.
    pub retired: usize,
    /// Whether a region of the fixed table overlaps the range. Fixed regions cannot be
    /// invalidated (their lookup takes no lock): the caller must build a new table (for
    /// example through the runtime's memory replacement) if they changed.
    pub fixed_overlap: bool,
}

/// The late part of a table: a resolver and what it returned.
struct Late {
    resolver: Arc<dyn RegionResolver>,
    limits: LateLimits,
    table: RwLock<LateTable>,
}

impl std::fmt::Debug for Late {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Late")
            .field("limits", &self.limits)
            .field("active", &t.active)
            .field("retired", &t.retired.len())
            .field("generation", &t.generation)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct LateTable {
    /// Used for translations; non-overlapping, sorted by gpa.
    active: Vec<MemoryRegion>,
    /// Invalidated, still mapped so that older pointers stay valid.
    retired: Vec<MemoryRegion>,
    /// Sizes of active plus retired regions.
    bytes: u64,
    /// Bumped by every invalidation, so a resolution that raced with one is not used.
    generation: u64,
}

impl LateTable {
    /// Host pointer for `addr` and the bytes left in its region, from the active list.
    fn piece(&self, addr: u64) -> Option<(*mut u8, u64)> {
        let idx = self.active.partition_point(|r| r.gpa <= addr);
        let r = self.active.get(idx.checked_sub(1)?)?;
        r.contains_gpa(addr).then(|| region_piece(r, addr))
    }

    /// Adds `region` to the active list if it fits the limits and overlaps nothing;
    /// gives it back otherwise (the caller drops it outside the lock).
    fn insert(
        &mut self,
        region: MemoryRegion,
        fixed: &[MemoryRegion],
        limits: &LateLimits,
    ) -> Result<usize, (MemoryRegion, MemoryError)> {
        let count = self.active.len() + self.retired.len();
        if count >= limits.max_regions {
            return Err((region, MemoryError::TooManyRegions { count: count + 1 }));
        }
        let within =
            matches!(self.bytes.checked_add(region.size), Some(b) if b <= limits.max_bytes);
        if !within {
            let (gpa, size, uaddr, offset) =
                (region.gpa, region.size, region.uaddr, region.mmap_offset);
            return Err((
                region,
                MemoryError::InvalidRegion {
                    gpa,
                    size,
                    uaddr,
                    offset,
                },
            ));
        }
        if let Some(r) = fixed
            .iter()
            .chain(self.active.iter())
            .find(|r| r.overlaps_gpa(&region))
        {
            let gpa = r.gpa.max(region.gpa);
            return Err((region, MemoryError::Overlap { gpa }));
        }
        let idx = self.active.partition_point(|r| r.gpa <= region.gpa);
        self.bytes += region.size;
        self.active.insert(idx, region);
        Ok(idx)
    }
}

/// Host pointer for `addr` inside `r` (which contains it) and the bytes left in `r`.
fn region_piece(r: &MemoryRegion, addr: u64) -> (*mut u8, u64) {
    let off = addr - r.gpa;
    // off < size <= map_len, so the offset fits in usize.
    (r.host_base().wrapping_add(off as usize), r.size - off)
}

/// A guest memory table: non-overlapping regions sorted by guest physical address, plus,
/// when built with [`GuestMemory::with_resolver`], late regions found on demand.
#[derive(Debug, Default)]
pub struct GuestMemory {
    regions: Vec<MemoryRegion>,
    late: Option<Box<Late>>,
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
        Ok(Self {
            regions,
            late: None,
        })
    }

    /// Builds a table whose fixed part is `regions` (as [`GuestMemory::new`]) and whose
    /// misses are resolved by `resolver`, with the default [`LateLimits`].
    ///
    /// A translation that misses the fixed table looks in the late regions (under a read
    /// lock), then asks `resolver` once for the missing address and, if it returns a
    /// region that contains the address, overlaps nothing in use and fits the limits,
    /// adds it and uses it.
    ///
    /// # Errors
    /// As [`GuestMemory::new`].
    pub fn with_resolver(
        regions: Vec<MemoryRegion>,
        resolver: Arc<dyn RegionResolver>,
    ) -> Result<Self, MemoryError> {
        Self::with_resolver_limits(regions, resolver, LateLimits::default())
    }

    /// [`GuestMemory::with_resolver`] with explicit bounds on the late regions.
    ///
    /// # Errors
    /// As [`GuestMemory::new`].
    pub fn with_resolver_limits(
        regions: Vec<MemoryRegion>,
        resolver: Arc<dyn RegionResolver>,
        limits: LateLimits,
    ) -> Result<Self, MemoryError> {
        let mut mem = Self::new(regions)?;
        mem.late = Some(Box::new(Late {
            resolver,
            limits,
            table: RwLock::new(LateTable::default()),
        }));
        Ok(mem)
    }

    /// Adds an already-mapped late region (for example one found by an eager walk of the
    /// VDUSE IOTLB), which [`GuestMemory::invalidate`] can later retire.
    ///
    /// # Errors
    /// [`MemoryError::NoSuchRegion`] if the table has no resolver (it was built with
    /// [`GuestMemory::new`]); [`MemoryError::Overlap`] if the region overlaps a fixed or
    /// active late region in guest address space; [`MemoryError::TooManyRegions`] or
    /// [`MemoryError::InvalidRegion`] past [`LateLimits::max_regions`] or
    /// [`LateLimits::max_bytes`].
    pub fn insert_late(&self, region: MemoryRegion) -> Result<(), MemoryError> {
        let Some(late) = self.late.as_deref() else {
            return Err(MemoryError::NoSuchRegion {
                gpa: region.gpa,
                size: region.size,
            });
        };
        let res = late
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(region, &self.regions, &late.limits);
        // A refused region is dropped (unmapped) here, outside the lock.
        res.map(|_| ()).map_err(|(_, e)| e)
    }

    /// Stops using the late regions that overlap the inclusive guest range
    /// `[start, last]` for new translations; the next access there asks the resolver
    /// again (VDUSE: after VDUSE_UPDATE_IOTLB).
    ///
    /// The retired regions stay mapped until the table is dropped or
    /// [`GuestMemory::purge_retired`] runs: a host pointer a worker still holds (a ring,
    /// a buffer in flight) keeps pointing at mapped memory, possibly stale, never at an
    /// unmapped page. They still count against [`LateLimits`]; a long-lived table that is
    /// invalidated often should be replaced now and then (vhost-vdpa's memory map updates
    /// invalidate everything, a natural point to build a new table).
    ///
    /// Fixed regions are never invalidated; [`Invalidated::fixed_overlap`] says if one
    /// overlaps the range. A translation that resolved concurrently with this call is not
    /// used (it may have fetched the old entry).
    pub fn invalidate(&self, start: u64, last: u64) -> Invalidated {
        let fixed_overlap =
            start <= last && self.regions.iter().any(|r| r.overlaps_range(start, last));
        let mut retired = 0;
        if let Some(late) = self.late.as_deref() {
            let mut t = late.table.write().unwrap_or_else(PoisonError::into_inner);
            t.generation += 1;
            if start <= last {
                let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut t.active)
                    .into_iter()
                    .partition(|r| r.overlaps_range(start, last));
                t.active = keep;
                retired = gone.len();
                t.retired.extend(gone);
            }
        }
        Invalidated {
            retired,
            fixed_overlap,
        }
    }

    /// Unmaps the retired late regions. Exclusive access (`&mut`, for example through
    /// `Arc::get_mut` once every worker let go of the table) guarantees no worker still
    /// holds a pointer obtained from this table; returns how many were unmapped.
    pub fn purge_retired(&mut self) -> usize {
        let Some(late) = self.late.as_deref_mut() else {
            return 0;
        };
        let t = late.table.get_mut().unwrap_or_else(PoisonError::into_inner);
        let gone: u64 = t.retired.iter().map(|r| r.size).sum();
        t.bytes -= gone;
        std::mem::take(&mut t.retired).len()
    }

    /// Counters of the late regions (all zero without a resolver).
    pub fn late_stats(&self) -> LateStats {
        let Some(late) = self.late.as_deref() else {
            return LateStats::default();
        };
        let t = late.table.read().unwrap_or_else(PoisonError::into_inner);
        LateStats {
            active: t.active.len(),
            retired: t.retired.len(),
            bytes: t.bytes,
            generation: t.generation,
        }
    }

    /// Host pointer for `addr` and the bytes left in its region, from the late regions,
    /// resolving a miss. Slow path: only called on a miss in the fixed table.
    #[cold]
    #[inline(never)]
    fn late_piece(&self, addr: u64) -> Option<(*mut u8, u64)> {
        let late = self.late.as_deref()?;
        // Two attempts: a resolution that raced with an invalidation is tried once more.
        for _ in 0..2 {
            let generation = {
                let t = late.table.read().unwrap_or_else(PoisonError::into_inner);
                if let Some(p) = t.piece(addr) {
                    return Some(p);
                }
                t.generation
            };
            let region = late.resolver.resolve(addr)?;
            if !region.contains_gpa(addr) {
                tracing::debug!(
                    addr,
                    gpa = region.gpa,
                    size = region.size,
                    "resolved region does not contain the address"
                );
                return None;
            }
            let mut t = late.table.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(p) = t.piece(addr) {
                // Another worker resolved it first; ours is dropped after the lock.
                drop(t);
                drop(region);
                return Some(p);
            }
            if t.generation != generation {
                drop(t);
                drop(region);
                continue;
            }
            return match t.insert(region, &self.regions, &late.limits) {
                Ok(idx) => t.active.get(idx).map(|r| region_piece(r, addr)),
                Err((region, e)) => {
                    drop(t);
                    tracing::debug!(addr, error = %e, "resolved region refused");
                    drop(region);
                    None
                }
            };
        }
        None
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

    /// The fixed regions, sorted by guest physical address (late regions are not listed).
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// Consumes the table, returning its regions (to build a new table with one more or
    /// one fewer region, as ADD_MEM_REG / REM_MEM_REG do).
    pub fn into_regions(mut self) -> Vec<MemoryRegion> {
        std::mem::take(&mut self.regions)
    }

    /// The first region (fixed or late) whose mapping took a contained SIGBUS, as
    /// `(gpa, size)`; see [`crate::fault`]. Walks every region: call it only when
    /// [`crate::fault::generation`] changed.
    pub fn faulted_region(&self) -> Option<(u64, u64)> {
        let hit = |r: &MemoryRegion| r.faulted().then_some((r.gpa, r.size));
        if let Some(x) = self.regions.iter().find_map(hit) {
            return Some(x);
        }
        let late = self.late.as_deref()?;
        let t = late.table.read().unwrap_or_else(PoisonError::into_inner);
        t.active.iter().chain(t.retired.iter()).find_map(hit)
    }

    /// Total bytes of the fixed regions (late ones: [`GuestMemory::late_stats`]).
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    fn region_for_gpa(&self, gpa: u64) -> Option<&MemoryRegion> {
        let idx = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = self.regions.get(idx.checked_sub(1)?)?;
        (gpa - r.gpa < r.size).then_some(r)
    }

    /// Host pointer for the guest physical range `[gpa, gpa+len)`, which must lie inside
    /// one region (fixed, or late: resolved on a miss when the table has a resolver).
    ///
    /// # Errors
    /// [`MemoryError::OutOfBounds`] if any byte of the range is unmapped or `gpa+len`
    /// overflows.
    pub fn translate(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let oob = MemoryError::OutOfBounds { addr: gpa, len };
        let Some(r) = self.region_for_gpa(gpa) else {
            let (p, left) = self.late_piece(gpa).ok_or(oob.clone())?;
            return if len <= left { Ok(p) } else { Err(oob) };
        };
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
            let (p, avail) = match self.region_for_gpa(addr) {
                Some(r) => region_piece(r, addr),
                None => self.late_piece(addr).ok_or(oob.clone())?,
            };
            let in_region = avail.min(left);
            f(p, in_region);
            addr += in_region;
            left -= in_region;
        }
        Ok(())
    }

    /// Host pointer for the frontend virtual range `[uaddr, uaddr+len)` (vhost-user vring
    /// addresses, which are in the frontend's address space), inside one fixed region
    /// (late regions have no frontend address space and are not searched).
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
    fn seals_say_whether_a_region_can_shrink() {
        use rustix::fs::{MemfdFlags, SealFlags};
        let plain = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC).unwrap();
        assert_eq!(
            fd_seals(&plain),
            FdSeals {
                shrink_sealed: false,
                kind: "memfd"
            }
        );
        let sealed =
            rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&sealed, 4096).unwrap();
        rustix::fs::fcntl_add_seals(&sealed, SealFlags::SHRINK).unwrap();
        assert!(fd_seals(&sealed).shrink_sealed);
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(!fd_seals(&file).shrink_sealed);
        assert_ne!(fd_seals(&file).kind, "memfd");
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

#[cfg(test)]
#[path = "memory_late_tests.rs"]
mod late_tests;
