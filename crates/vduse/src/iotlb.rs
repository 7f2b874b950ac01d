//! Guest memory seen through the VDUSE IOTLB (`vduse.rst`, "How VDUSE works": the
//! IOTLB, VDUSE_IOTLB_GET_FD, VDUSE_UPDATE_IOTLB).
//!
//! A VDUSE device addresses memory by IOVA. The kernel keeps an IOTLB of IOVA ranges,
//! each backed by a file the daemon can mmap. Entries appear over time: with virtio-vdpa,
//! the rings are coherent allocations present from the start, while the bounce region
//! `[0, bounce_size)` enters the IOTLB only at the first streaming DMA map, after
//! DRIVER_OK; with vhost-vdpa, entries follow the VM's memory map and change with it
//! (each change is a VDUSE_UPDATE_IOTLB for the range).
//!
//! So the memory workers use is a [`GuestMemory`] whose addresses are IOVAs (build
//! virtqueues with `addrs_are_uaddr: false`): [`prefetch`] maps the entries that exist
//! when the driver sets DRIVER_OK, and an [`IotlbResolver`] maps a missing entry on the
//! first translation that needs it. On VDUSE_UPDATE_IOTLB, call
//! [`GuestMemory::invalidate`]; if it reports a fixed region in the range, build a new
//! table. Prefer handing prefetched regions to [`GuestMemory::insert_late`] when the
//! map may change (vhost-vdpa), and to the fixed table for the fastest lookups when it
//! will not (virtio-vdpa rings).
//!
//! Access rights: read-write and write-only entries are mapped shared read-write (a
//! write-only entry can then also be read by the device, which exposes nothing the driver
//! did not hand it; if the kernel's file cannot be mapped for reading the entry is
//! refused). Read-only entries are mapped *private*: the device reads the driver's data,
//! and a write there (a buggy or hostile descriptor) lands in a private copy instead of
//! faulting or reaching the driver.
//!
//! Hazard outside this module's reach: pages of the VDUSE bounce region that the kernel
//! never populated fault with SIGBUS when touched; only buffers the driver mapped are
//! safe. Registering the bounce region with userspace memory (VDUSE_IOTLB_REG_UMEM) would
//! remove that hazard.
//!
//! Bounds: an entry larger than [`MAX_IOTLB_ENTRY_BYTES`] (by default) is refused, as is a
//! prefetch of more than [`MAX_PREFETCH_ENTRIES`] entries or [`MAX_PREFETCH_BYTES`]
//! bytes; [`GuestMemory`] bounds the late regions it keeps. Hostile answers give errors,
//! never panics or unbounded allocation.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use uvdpa_virtio::memory::{RegionResolver, Sharing, MAX_LATE_REGIONS};
use uvdpa_virtio::{GuestMemory, MemoryRegion};

use crate::dev::{DeviceFd, IotlbEntry, IotlbPerm};
use crate::error::VduseError;

/// Largest single IOTLB entry mapped by default, in bytes (64 GiB).
pub const MAX_IOTLB_ENTRY_BYTES: u64 = 64 << 30;
/// Most bytes [`prefetch`] maps in total (64 GiB).
pub const MAX_PREFETCH_BYTES: u64 = 64 << 30;
/// Most entries [`prefetch`] maps.
pub const MAX_PREFETCH_ENTRIES: usize = MAX_LATE_REGIONS;

/// Something that answers VDUSE_IOTLB_GET_FD: a [`DeviceFd`], or a fake in tests.
pub trait IotlbSource: Send + Sync {
    /// The first IOTLB entry overlapping IOVAs `[start, last]` and an fd to map it from,
    /// or `None` if there is none. Contract as [`DeviceFd::iotlb_get_fd`].
    ///
    /// # Errors
    /// As [`DeviceFd::iotlb_get_fd`].
    fn iotlb_get_fd(
        &self,
        start: u64,
        last: u64,
    ) -> Result<Option<(IotlbEntry, OwnedFd)>, VduseError>;
}

impl IotlbSource for DeviceFd {
    fn iotlb_get_fd(
        &self,
        start: u64,
        last: u64,
    ) -> Result<Option<(IotlbEntry, OwnedFd)>, VduseError> {
        DeviceFd::iotlb_get_fd(self, start, last)
    }
}

/// Maps one IOTLB entry as a [`MemoryRegion`] at guest (and frontend) address
/// `entry.start`, `entry.last - entry.start + 1` bytes from `entry.offset` of `fd`,
/// shared for read-write and write-only entries, private for read-only ones (see the
/// module documentation).
///
/// # Errors
/// [`VduseError::IotlbEntry`] if the entry is inverted, covers all 2^64 addresses or ends
/// at the very last one (a region's end must be representable), or is larger than
/// `max_bytes`; [`VduseError::Map`] if mmap refuses it.
pub fn map_entry(
    entry: &IotlbEntry,
    fd: impl AsFd,
    max_bytes: u64,
) -> Result<MemoryRegion, VduseError> {
    let bad = |reason| VduseError::IotlbEntry {
        start: entry.start,
        last: entry.last,
        perm: entry.perm.to_raw(),
        asked_start: entry.start,
        asked_last: entry.last,
        reason,
    };
    if entry.start > entry.last {
        return Err(bad("start after last"));
    }
    let size = entry
        .size()
        .ok_or_else(|| bad("covers the whole address space"))?;
    if size > max_bytes {
        return Err(bad("larger than allowed"));
    }
    let sharing = match entry.perm {
        IotlbPerm::ReadOnly => Sharing::Private,
        IotlbPerm::WriteOnly | IotlbPerm::ReadWrite => Sharing::Shared,
    };
    MemoryRegion::map_with(fd, entry.start, size, entry.start, entry.offset, sharing).map_err(
        |source| VduseError::Map {
            start: entry.start,
            last: entry.last,
            source,
        },
    )
}

/// Maps every IOTLB entry overlapping IOVAs `[start, last]` (walking from `start`, the
/// next query starting after the last entry found), for the initial table: pass
/// `0, u64::MAX` for everything.
///
/// # Errors
/// The source's errors; [`VduseError::IotlbEntry`] for an entry outside the range or
/// overlapping the previous one, past [`MAX_PREFETCH_ENTRIES`] or
/// [`MAX_PREFETCH_BYTES`]; [`map_entry`]'s errors. Nothing stays mapped on error.
pub fn prefetch<S: IotlbSource + ?Sized>(
    dev: &S,
    start: u64,
    last: u64,
) -> Result<Vec<MemoryRegion>, VduseError> {
    let mut out: Vec<MemoryRegion> = Vec::new();
    let mut total = 0u64;
    let mut cur = start;
    while cur <= last {
        let Some((e, fd)) = dev.iotlb_get_fd(cur, last)? else {
            break;
        };
        let bad = |reason| VduseError::IotlbEntry {
            start: e.start,
            last: e.last,
            perm: e.perm.to_raw(),
            asked_start: cur,
            asked_last: last,
            reason,
        };
        if e.start > e.last || e.last < cur || e.start > last {
            return Err(bad("does not overlap the range asked for"));
        }
        if !out.is_empty() && e.start < cur {
            return Err(bad("overlaps the previous entry"));
        }
        if out.len() >= MAX_PREFETCH_ENTRIES {
            return Err(bad("too many entries"));
        }
        let size = e
            .size()
            .ok_or_else(|| bad("covers the whole address space"))?;
        total = total
            .checked_add(size)
            .filter(|&t| t <= MAX_PREFETCH_BYTES)
            .ok_or_else(|| bad("more memory than allowed"))?;
        out.push(map_entry(&e, &fd, MAX_IOTLB_ENTRY_BYTES)?);
        match e.last.checked_add(1) {
            Some(next) => cur = next,
            None => break,
        }
    }
    Ok(out)
}

/// Resolves guest-memory misses from the VDUSE IOTLB: for a missing IOVA, asks
/// VDUSE_IOTLB_GET_FD for `[addr, addr]` and maps the entry ([`map_entry`]).
pub struct IotlbResolver<S: IotlbSource + ?Sized = DeviceFd> {
    dev: Arc<S>,
    max_entry_bytes: u64,
}

impl<S: IotlbSource + ?Sized> IotlbResolver<S> {
    /// A resolver over `dev` refusing entries above [`MAX_IOTLB_ENTRY_BYTES`].
    pub fn new(dev: Arc<S>) -> Self {
        Self::with_max_entry_bytes(dev, MAX_IOTLB_ENTRY_BYTES)
    }

    /// A resolver over `dev` refusing entries above `max_entry_bytes` bytes.
    pub fn with_max_entry_bytes(dev: Arc<S>, max_entry_bytes: u64) -> Self {
        Self {
            dev,
            max_entry_bytes,
        }
    }

    /// The entry containing `addr`, mapped.
    ///
    /// # Errors
    /// `Ok(None)` if no entry contains it; otherwise as [`map_entry`] and the source.
    pub fn resolve_entry(&self, addr: u64) -> Result<Option<MemoryRegion>, VduseError> {
        let Some((e, fd)) = self.dev.iotlb_get_fd(addr, addr)? else {
            return Ok(None);
        };
        if e.start > addr || e.last < addr {
            return Err(VduseError::IotlbEntry {
                start: e.start,
                last: e.last,
                perm: e.perm.to_raw(),
                asked_start: addr,
                asked_last: addr,
                reason: "does not contain the address",
            });
        }
        map_entry(&e, &fd, self.max_entry_bytes).map(Some)
    }
}

impl<S: IotlbSource + ?Sized> std::fmt::Debug for IotlbResolver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotlbResolver")
            .field("max_entry_bytes", &self.max_entry_bytes)
            .finish_non_exhaustive()
    }
}

impl<S: IotlbSource + ?Sized> RegionResolver for IotlbResolver<S> {
    fn resolve(&self, addr: u64) -> Option<MemoryRegion> {
        match self.resolve_entry(addr) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(addr, error = %e, "IOTLB miss not resolved");
                None
            }
        }
    }
}

/// Builds the memory for a VDUSE device: the entries present now as late (invalidatable)
/// regions, misses resolved from `dev`.
///
/// # Errors
/// As [`prefetch`]; [`VduseError::Map`] if the regions cannot form a table.
pub fn guest_memory<S: IotlbSource + 'static>(dev: Arc<S>) -> Result<GuestMemory, VduseError> {
    let regions = prefetch(&*dev, 0, u64::MAX)?;
    let mem = GuestMemory::with_resolver(Vec::new(), Arc::new(IotlbResolver::new(dev))).map_err(
        |source| VduseError::Map {
            start: 0,
            last: u64::MAX,
            source,
        },
    )?;
    for r in regions {
        let (start, size) = (r.gpa(), r.size());
        mem.insert_late(r).map_err(|source| VduseError::Map {
            start,
            last: start + (size - 1),
            source,
        })?;
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use rustix::fs::{ftruncate, memfd_create, MemfdFlags};

    use super::*;

    /// A fake IOTLB over one memfd: entries map IOVA ranges to offsets of it.
    struct FakeIotlb {
        file: OwnedFd,
        entries: Mutex<Vec<IotlbEntry>>,
        calls: AtomicUsize,
    }

    impl FakeIotlb {
        fn new(size: u64, entries: Vec<IotlbEntry>) -> Self {
            let file = memfd_create("iotlb", MemfdFlags::CLOEXEC).unwrap();
            ftruncate(&file, size).unwrap();
            Self {
                file,
                entries: Mutex::new(entries),
                calls: AtomicUsize::new(0),
            }
        }
    }

    impl IotlbSource for FakeIotlb {
        fn iotlb_get_fd(
            &self,
            start: u64,
            last: u64,
        ) -> Result<Option<(IotlbEntry, OwnedFd)>, VduseError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let entries = self.entries.lock().unwrap();
            let mut hits: Vec<_> = entries
                .iter()
                .filter(|e| e.start <= last && start <= e.last)
                .collect();
            hits.sort_by_key(|e| e.start);
            Ok(hits.first().map(|e| (**e, self.file.try_clone().unwrap())))
        }
    }

    fn entry(start: u64, last: u64, offset: u64, perm: IotlbPerm) -> IotlbEntry {
        IotlbEntry {
            start,
            last,
            offset,
            perm,
        }
    }

    #[test]
    fn prefetch_walks_every_entry() {
        let fake = FakeIotlb::new(
            0x40000,
            vec![
                entry(0x10000, 0x1ffff, 0x0, IotlbPerm::ReadWrite),
                entry(0x30000, 0x30fff, 0x20000, IotlbPerm::ReadOnly),
                entry(0x31000, 0x31fff, 0x21000, IotlbPerm::WriteOnly),
            ],
        );
        let regions = prefetch(&fake, 0, u64::MAX).unwrap();
        let spans: Vec<_> = regions.iter().map(|r| (r.gpa(), r.size())).collect();
        assert_eq!(
            spans,
            vec![(0x10000, 0x10000), (0x30000, 0x1000), (0x31000, 0x1000)]
        );
        assert_eq!(regions[1].sharing(), Sharing::Private);
        assert_eq!(regions[2].sharing(), Sharing::Shared);
        // One query per entry, plus the one that finds nothing more.
        assert_eq!(fake.calls.load(Ordering::Relaxed), 4);
        // A sub-range finds only what overlaps it.
        let some = prefetch(&fake, 0x30800, 0x30900).unwrap();
        assert_eq!(some.len(), 1);
    }

    #[test]
    fn resolver_maps_on_miss_and_data_is_shared() {
        let fake = Arc::new(FakeIotlb::new(
            0x20000,
            vec![
                entry(0x1000_0000, 0x1000_ffff, 0x10000, IotlbPerm::ReadWrite),
                entry(0x2000_0000, 0x2000_0fff, 0x0, IotlbPerm::ReadOnly),
            ],
        ));
        let mem = guest_memory(Arc::clone(&fake)).unwrap();
        assert_eq!(mem.late_stats().active, 2);
        mem.write(0x1000_0010, b"hello").unwrap();
        // The bytes are in the memfd at the entry's offset.
        let mut back = [0u8; 5];
        rustix::io::pread(&fake.file, &mut back, 0x10010).unwrap();
        assert_eq!(&back, b"hello");
        // A read-only entry: reads see the file, writes stay private.
        rustix::io::pwrite(&fake.file, b"ro", 0x0).unwrap();
        let mut ro = [0u8; 2];
        mem.read(0x2000_0000, &mut ro).unwrap();
        assert_eq!(&ro, b"ro");
        mem.write(0x2000_0000, b"xx").unwrap();
        rustix::io::pread(&fake.file, &mut ro, 0x0).unwrap();
        assert_eq!(&ro, b"ro");
        // An entry added later resolves on first use.
        fake.entries.lock().unwrap().push(entry(
            0x3000_0000,
            0x3000_0fff,
            0x1000,
            IotlbPerm::ReadWrite,
        ));
        assert!(mem.translate(0x3000_0800, 0x800).is_ok());
        assert_eq!(mem.late_stats().active, 3);
        assert!(mem.translate(0x4000_0000, 1).is_err());
        // UPDATE_IOTLB: invalidate, the entry moves, the next access maps the new one.
        fake.entries
            .lock()
            .unwrap()
            .retain(|e| e.start != 0x3000_0000);
        fake.entries.lock().unwrap().push(entry(
            0x3000_0000,
            0x3000_0fff,
            0x2000,
            IotlbPerm::ReadWrite,
        ));
        let inv = mem.invalidate(0x3000_0000, 0x3000_0fff);
        assert_eq!(inv.retired, 1);
        assert!(!inv.fixed_overlap);
        mem.write(0x3000_0000, b"new").unwrap();
        rustix::io::pread(&fake.file, &mut back[..3], 0x2000).unwrap();
        assert_eq!(&back[..3], b"new");
    }

    #[test]
    fn hostile_entries_are_refused() {
        // Too large for the resolver's cap.
        let fake = Arc::new(FakeIotlb::new(
            0x1000,
            vec![entry(0, (1 << 40) - 1, 0, IotlbPerm::ReadWrite)],
        ));
        let r = IotlbResolver::with_max_entry_bytes(Arc::clone(&fake), 1 << 30);
        assert!(matches!(
            r.resolve_entry(5),
            Err(VduseError::IotlbEntry { .. })
        ));
        assert!(r.resolve(5).is_none());
        // The whole address space.
        let e = entry(0, u64::MAX, 0, IotlbPerm::ReadWrite);
        assert!(map_entry(&e, &fake.file, u64::MAX).is_err());
        // Past the end of the file: refused by the memory layer, no SIGBUS later.
        let e = entry(0, 0x1fff, 0, IotlbPerm::ReadWrite);
        assert!(matches!(
            map_entry(&e, &fake.file, u64::MAX),
            Err(VduseError::Map { .. })
        ));
        // A source that answers outside the range asked for.
        struct Liar(FakeIotlb);
        impl IotlbSource for Liar {
            fn iotlb_get_fd(
                &self,
                _: u64,
                _: u64,
            ) -> Result<Option<(IotlbEntry, OwnedFd)>, VduseError> {
                Ok(Some((
                    entry(0, 0xfff, 0, IotlbPerm::ReadWrite),
                    self.0.file.try_clone().unwrap(),
                )))
            }
        }
        let liar = Liar(FakeIotlb::new(0x1000, vec![]));
        assert!(prefetch(&liar, 0x1000, u64::MAX).is_err());
        // Starting inside that entry, the walk would loop forever without the overlap
        // check: it must stop with an error instead.
        assert!(prefetch(&liar, 0, u64::MAX).is_err());
        let r = IotlbResolver::new(Arc::new(liar));
        assert!(r.resolve(0x5000).is_none());
    }

    #[test]
    fn prefetch_is_bounded() {
        let entries = (0..=MAX_PREFETCH_ENTRIES as u64)
            .map(|i| entry(i * 0x1000, i * 0x1000 + 0xfff, 0, IotlbPerm::ReadWrite))
            .collect();
        let fake = FakeIotlb::new(0x1000, entries);
        assert!(matches!(
            prefetch(&fake, 0, u64::MAX),
            Err(VduseError::IotlbEntry {
                reason: "too many entries",
                ..
            })
        ));
    }
}
