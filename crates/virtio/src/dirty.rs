//! Dirty page logging for live migration (vhost-user "Dirty logging", VHOST_F_LOG_ALL).
//!
//! While a migration copies guest RAM, every page the device writes must be copied again.
//! The frontend hands the backend a shared bitmap (SET_LOG_BASE) with one bit per 4 KiB
//! guest-physical page: bit `p % 8` of byte `p / 8` for page `p = gpa / 4096`. After each
//! write into guest memory the device sets the bits of the pages it touched, atomically,
//! since the frontend clears bits concurrently as it copies pages.
//!
//! A queue with a [`DirtyLog`] logs what it writes itself (used ring entries and index,
//! packed used descriptors, event suppression fields) and the device-writable buffers of
//! every chain it completes, in full: the device may have written any byte of them. Host
//! pointers become guest-physical addresses through the memory table; an address the
//! table or the bitmap does not cover is counted and ignored, never a panic.

use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use thiserror::Error;

use crate::chain::DescriptorChain;
use crate::memory::GuestMemory;

/// Size of a logged page (fixed by the vhost-user spec, whatever the host page size).
pub const LOG_PAGE_SIZE: u64 = 4096;

/// Largest bitmap accepted: 1 GiB covers 32 TiB of guest memory.
const MAX_LOG_SIZE: u64 = 1 << 30;

/// Why a log region could not be mapped.
#[derive(Debug, Error)]
pub enum DirtyLogError {
    /// Size zero, too large, or size + offset overflows.
    #[error(
        "Invalid dirty log region: {size} bytes at offset {offset} (1..={MAX_LOG_SIZE} bytes)"
    )]
    Invalid {
        /// mmap_size as sent.
        size: u64,
        /// mmap_offset as sent.
        offset: u64,
    },
    /// The fd is shorter than `offset + size` (a mapping past its end would fault).
    #[error("Dirty log fd holds {have} bytes, the region needs {need}")]
    TooShort {
        /// Bytes the region needs.
        need: u64,
        /// Bytes the file has.
        have: u64,
    },
    /// fstat or mmap failed.
    #[error("Mapping the dirty log failed: {0}")]
    Map(rustix::io::Errno),
}

/// The frontend's dirty bitmap, mapped shared. Cheap to share between queue workers
/// (`Arc<DirtyLog>`); unmapped when the last reference goes.
#[derive(Debug)]
pub struct DirtyLog {
    map_base: NonNull<u8>,
    map_len: usize,
    /// The bitmap's first byte, `offset` bytes into the mapping.
    bits: NonNull<u8>,
    len: usize,
    /// Pages beyond the bitmap, or host ranges outside guest memory, that were not logged.
    ignored: AtomicU64,
}

// SAFETY: the mapping is process-wide memory owned by this value until drop; every access
// to it goes through atomics.
unsafe impl Send for DirtyLog {}
// SAFETY: as above; shared access only does atomic read-modify-writes.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Maps `size` bytes of `fd` at `offset` (VhostUserLog `mmap_size`, `mmap_offset`).
    ///
    /// # Errors
    /// [`DirtyLogError::Invalid`] for a zero, huge or overflowing region,
    /// [`DirtyLogError::TooShort`] for a file that does not hold it,
    /// [`DirtyLogError::Map`] when fstat/mmap fail.
    pub fn map(fd: impl AsFd, size: u64, offset: u64) -> Result<Self, DirtyLogError> {
        let invalid = DirtyLogError::Invalid { size, offset };
        if size == 0 || size > MAX_LOG_SIZE {
            return Err(invalid);
        }
        let end = offset.checked_add(size).ok_or(invalid)?;
        let fd = fd.as_fd();
        let st = rustix::fs::fstat(fd).map_err(DirtyLogError::Map)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && (st.st_size as u64) < end
        {
            return Err(DirtyLogError::TooShort {
                need: end,
                have: st.st_size as u64,
            });
        }
        // mmap wants a page-aligned offset: map from the page below.
        let base = offset & !(LOG_PAGE_SIZE - 1);
        let lead = (offset - base) as usize;
        let map_len =
            usize::try_from(end - base).map_err(|_| DirtyLogError::Invalid { size, offset })?;
        // SAFETY: a fresh shared mapping at an address chosen by the kernel; it aliases no
        // Rust object. The result is checked before use.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                map_len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                base,
            )
        }
        .map_err(DirtyLogError::Map)?;
        let map_base =
            NonNull::new(ptr.cast::<u8>()).ok_or(DirtyLogError::Map(rustix::io::Errno::INVAL))?;
        // lead < LOG_PAGE_SIZE <= map_len - size, so the bitmap lies inside the mapping.
        let bits = NonNull::new(map_base.as_ptr().wrapping_add(lead))
            .ok_or(DirtyLogError::Map(rustix::io::Errno::INVAL))?;
        Ok(Self {
            map_base,
            map_len,
            bits,
            len: size as usize,
            ignored: AtomicU64::new(0),
        })
    }

    /// Bitmap size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap is empty (never, for a mapped log).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages or ranges that could not be logged (beyond the bitmap, or host memory outside
    /// the memory table).
    pub fn ignored(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }

    fn byte(&self, i: usize) -> Option<&AtomicU8> {
        if i >= self.len {
            return None;
        }
        // SAFETY: i < len, inside the mapping, which lives as long as `self`; AtomicU8 has
        // u8's layout and alignment, and the frontend only accesses the byte atomically.
        Some(unsafe { &*(self.bits.as_ptr().add(i) as *const AtomicU8) })
    }

    /// Marks every page of the guest-physical range `[gpa, gpa + len)` dirty. Pages past
    /// the bitmap are counted in [`DirtyLog::ignored`] and skipped.
    pub fn log(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        let mut page = first;
        while page <= last {
            let Some(byte) = usize::try_from(page / 8).ok().and_then(|i| self.byte(i)) else {
                self.ignored.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    gpa,
                    len,
                    "dirty log: page {page} beyond the log, not logged"
                );
                return;
            };
            // All pages of this byte within the range at once.
            let lo = page % 8;
            let hi = (last - (page - lo)).min(7);
            let mask = (0xffu16 << lo) as u8 & (0xffu16 >> (7 - hi)) as u8;
            byte.fetch_or(mask, Ordering::SeqCst);
            page = page - lo + 8;
        }
    }

    /// Marks the pages behind the host range `[host, host + len)` dirty, finding its
    /// guest-physical address in `mem`. A range outside every region is counted and
    /// skipped; one spanning regions is logged piece by piece.
    pub fn log_host(&self, mem: &GuestMemory, host: *const u8, len: usize) {
        let mut addr = host as usize;
        let mut left = len;
        while left > 0 {
            let hit = mem.regions().iter().find_map(|r| {
                let start = r.host_base() as usize;
                let off = addr.checked_sub(start)?;
                let size = usize::try_from(r.size()).ok()?;
                (off < size).then(|| (r.gpa() + off as u64, size - off))
            });
            let Some((gpa, avail)) = hit else {
                self.ignored.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    host = addr,
                    len = left,
                    "dirty log: host range outside guest memory, not logged"
                );
                return;
            };
            let n = avail.min(left);
            self.log(gpa, n as u64);
            addr += n;
            left -= n;
        }
    }

    /// Marks every device-writable buffer of `chain` dirty, in full.
    pub fn log_chain(&self, mem: &GuestMemory, chain: &DescriptorChain) {
        for seg in chain.writable() {
            self.log_host(mem, seg.base, seg.len);
        }
    }

    /// Whether page `page`'s bit is set (tests and tools).
    pub fn is_dirty(&self, page: u64) -> bool {
        usize::try_from(page / 8)
            .ok()
            .and_then(|i| self.byte(i))
            .is_some_and(|b| b.load(Ordering::SeqCst) & (1 << (page % 8)) != 0)
    }

    /// The pages whose bits are set, ascending (tests and tools).
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..self.len {
            let v = self.byte(i).map_or(0, |b| b.load(Ordering::SeqCst));
            for bit in 0..8 {
                if v & (1 << bit) != 0 {
                    out.push(i as u64 * 8 + bit);
                }
            }
        }
        out
    }

    /// Clears every bit (tests; a frontend clears the bits it copied).
    pub fn clear(&self) {
        for i in 0..self.len {
            if let Some(b) = self.byte(i) {
                b.store(0, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; no reference into it outlives
        // `self` (`byte` borrows from `&self`).
        let _ = unsafe { rustix::mm::munmap(self.map_base.as_ptr().cast(), self.map_len) };
    }
}

/// What a queue needs to log its writes: the bitmap, and the guest-physical address of its
/// used ring (SET_VRING_ADDR `log_guest_addr` with VHOST_VRING_F_LOG), if the frontend
/// gave one; without it used-ring writes are found through the memory table.
#[derive(Debug, Clone)]
pub struct QueueLog {
    /// The bitmap.
    pub log: std::sync::Arc<DirtyLog>,
    /// Guest-physical address of the used ring (split) / device area (packed).
    pub used_gpa: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd_log(size: u64) -> DirtyLog {
        let fd = rustix::fs::memfd_create("log", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        DirtyLog::map(&fd, size, 0).unwrap()
    }

    #[test]
    fn logs_pages_of_a_range() {
        let log = memfd_log(8);
        log.log(0x1000, 1);
        assert_eq!(log.dirty_pages(), vec![1]);
        log.log(0x2fff, 2); // pages 2 and 3
        assert_eq!(log.dirty_pages(), vec![1, 2, 3]);
        log.clear();
        log.log(0x5000, 0x10_000); // pages 5..=20, across bytes
        assert_eq!(log.dirty_pages(), (5..=20).collect::<Vec<_>>());
        assert_eq!(log.ignored(), 0);
    }

    #[test]
    fn beyond_the_log_is_ignored() {
        let log = memfd_log(2); // pages 0..16
        log.log(15 * 4096, 2 * 4096);
        assert_eq!(log.dirty_pages(), vec![15]);
        assert_eq!(log.ignored(), 1);
        log.log(u64::MAX - 10, 100);
        assert_eq!(log.ignored(), 2);
        assert_eq!(log.dirty_pages(), vec![15]);
    }

    #[test]
    fn refuses_bad_regions() {
        let fd = rustix::fs::memfd_create("log", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        assert!(matches!(
            DirtyLog::map(&fd, 0, 0),
            Err(DirtyLogError::Invalid { .. })
        ));
        assert!(matches!(
            DirtyLog::map(&fd, 8192, 0),
            Err(DirtyLogError::TooShort { .. })
        ));
        assert!(matches!(
            DirtyLog::map(&fd, 16, u64::MAX),
            Err(DirtyLogError::Invalid { .. })
        ));
        let log = DirtyLog::map(&fd, 16, 100).unwrap();
        log.log(0, 1);
        assert!(log.is_dirty(0));
    }

    fn mem() -> std::sync::Arc<GuestMemory> {
        std::sync::Arc::new(
            GuestMemory::new(vec![
                crate::memory::MemoryRegion::anonymous(0, 0x10_0000).unwrap()
            ])
            .unwrap(),
        )
    }

    fn qlog(log: &std::sync::Arc<DirtyLog>, used_gpa: Option<u64>) -> Option<QueueLog> {
        Some(QueueLog {
            log: log.clone(),
            used_gpa,
        })
    }

    /// A chain with a readable header on page 0x80, writable data over pages 0x90..=0x91
    /// and a status byte on page 0xa0 (a blk read).
    const CHAIN: [(u64, u32, bool); 3] = [
        (0x8_0000, 16, false),
        (0x9_0ff0, 0x20, true),
        (0xa_0000, 1, true),
    ];

    /// Pops one chain, completes it with `len` and publishes.
    fn complete_one(q: &mut crate::Virtqueue, len: u32) {
        let mut c = DescriptorChain::default();
        assert!(q.pop(&mut c).unwrap());
        q.add_used(&c, len);
        q.publish_used();
    }

    #[test]
    fn split_queue_logs_data_and_used_ring_pages() {
        let m = mem();
        let mut dq = crate::split::testing::DriverQueue::new(m.clone(), 0x1000, 8);
        let mut q = crate::Virtqueue::new(&dq.config(false, true), m, false).unwrap();
        let log = std::sync::Arc::new(memfd_log(64)); // pages 0..512
        assert_eq!(dq.used, 0x2000);
        q.set_dirty_log(qlog(&log, Some(dq.used)));
        dq.add_chain(&CHAIN);
        dq.publish();
        complete_one(&mut q, 0x21);
        // Exactly the written pages: data, status, used ring; not the readable header,
        // descriptor table or avail ring.
        assert_eq!(log.dirty_pages(), vec![0x2, 0x90, 0x91, 0xa0]);
        assert_eq!(log.ignored(), 0);

        // The used ring's address comes from log_guest_addr when the frontend gave one.
        log.clear();
        q.set_dirty_log(qlog(&log, Some(0x7000)));
        dq.add_chain(&CHAIN);
        dq.publish();
        complete_one(&mut q, 0x21);
        assert_eq!(log.dirty_pages(), vec![0x7, 0x90, 0x91, 0xa0]);

        // Without it, through the memory table; notification suppression writes count.
        log.clear();
        q.set_dirty_log(qlog(&log, None));
        q.set_notification(false).unwrap();
        assert_eq!(log.dirty_pages(), vec![0x2]);

        // Logging off: nothing.
        log.clear();
        q.set_dirty_log(None);
        dq.add_chain(&CHAIN);
        dq.publish();
        complete_one(&mut q, 0x21);
        q.set_notification(true).unwrap();
        assert!(log.dirty_pages().is_empty());
        assert_eq!(dq.pop_used(), Some((0, 0x21)));
    }

    #[test]
    fn pages_beyond_the_log_are_ignored() {
        let m = mem();
        let mut dq = crate::split::testing::DriverQueue::new(m.clone(), 0x1000, 8);
        let mut q = crate::Virtqueue::new(&dq.config(false, true), m, false).unwrap();
        let log = std::sync::Arc::new(memfd_log(16)); // pages 0..128: not 0x90 nor 0xa0
        q.set_dirty_log(qlog(&log, Some(dq.used)));
        dq.add_chain(&CHAIN);
        dq.publish();
        complete_one(&mut q, 0x21);
        assert_eq!(log.dirty_pages(), vec![0x2]);
        assert_eq!(log.ignored(), 2);
        // A used ring address far outside the log is ignored too.
        q.set_dirty_log(qlog(&log, Some(u64::MAX - 4)));
        q.set_notification(false).unwrap();
        assert_eq!(log.ignored(), 3);
    }

    #[test]
    fn packed_queue_logs_data_and_used_descriptor_pages() {
        let m = mem();
        let mut dq = crate::packed::testing::DriverQueue::new(m.clone(), 0x3000, 16);
        let mut q = crate::Virtqueue::new(&dq.config(false, true), m, true).unwrap();
        let log = std::sync::Arc::new(memfd_log(64));
        q.set_dirty_log(qlog(&log, Some(0x5000)));
        // A batch of three: the first used descriptor is written at publish, the others
        // from the shadow.
        for _ in 0..3 {
            dq.add_chain(&CHAIN);
        }
        let mut chains: Vec<DescriptorChain> = (0..3).map(|_| DescriptorChain::default()).collect();
        for c in &mut chains {
            assert!(q.pop(c).unwrap());
        }
        for c in &chains {
            q.add_used(c, 0x21);
        }
        // Nothing of the ring before publishing (the data pages are logged at add_used).
        assert_eq!(log.dirty_pages(), vec![0x90, 0x91, 0xa0]);
        q.publish_used();
        assert_eq!(log.dirty_pages(), vec![0x3, 0x90, 0x91, 0xa0]);
        for _ in 0..3 {
            assert!(dq.pop_used().is_some());
        }
        // Device event suppression writes go to log_guest_addr.
        log.clear();
        q.set_notification(false).unwrap();
        assert_eq!(log.dirty_pages(), vec![0x5]);

        log.clear();
        q.set_dirty_log(None);
        dq.add_chain(&CHAIN);
        complete_one(&mut q, 0x21);
        q.set_notification(true).unwrap();
        assert!(log.dirty_pages().is_empty());
        assert!(dq.pop_used().is_some());
    }

    #[test]
    fn host_ranges_map_through_the_table() {
        let mem = GuestMemory::new(vec![
            crate::memory::MemoryRegion::anonymous(0x10_0000, 0x2000).unwrap(),
            crate::memory::MemoryRegion::anonymous(0x40_0000, 0x1000).unwrap(),
        ])
        .unwrap();
        let log = memfd_log(256);
        let p = mem.translate(0x10_1ff0, 0x10).unwrap();
        log.log_host(&mem, p, 0x20); // runs past the region's end
        assert_eq!(log.dirty_pages(), vec![0x101]);
        assert_eq!(log.ignored(), 1);
        let q = mem.translate(0x40_0000, 1).unwrap();
        log.log_host(&mem, q, 1);
        assert_eq!(log.dirty_pages(), vec![0x101, 0x400]);
    }
}
