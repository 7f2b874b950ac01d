//! Per-queue counters in shared memory.
//!
//! A device's counters live in one memfd-backed table of [`QueueStats`], one 64-byte entry
//! per virtqueue. Workers update them with relaxed atomic adds; tools read them by mapping
//! the same memfd (the daemon hands its fd to the CLI over IPC), so watching live rates
//! costs no request per sample.
//!
//! Layout (stable, little-endian u64 counters, 8 per entry, entry `i` at byte `64 * i`):
//! `requests, bytes_read, bytes_written, kicks, calls, calls_suppressed, errors, drops`.

use std::io;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Counters of one virtqueue.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Chains completed.
    pub requests: AtomicU64,
    /// Bytes offered by the driver in device-readable buffers of completed chains.
    pub bytes_read: AtomicU64,
    /// Bytes written into device-writable buffers (sum of used lengths).
    pub bytes_written: AtomicU64,
    /// Kick eventfd wake-ups.
    pub kicks: AtomicU64,
    /// Call eventfd signals sent.
    pub calls: AtomicU64,
    /// Batches whose signal was suppressed by EVENT_IDX or VRING_AVAIL_F_NO_INTERRUPT.
    pub calls_suppressed: AtomicU64,
    /// Queue or device errors that stopped the queue.
    pub errors: AtomicU64,
    /// Frames (virtio-net) the device dropped: malformed or oversized on transmit, no
    /// receive buffer space on receive.
    pub drops: AtomicU64,
}

/// Size in bytes of one [`QueueStats`] entry.
pub const ENTRY_SIZE: usize = std::mem::size_of::<QueueStats>();

/// A shared-memory table of [`QueueStats`].
#[derive(Debug)]
pub struct StatsTable {
    fd: OwnedFd,
    base: NonNull<QueueStats>,
    queues: usize,
}

// SAFETY: the table is a shared mapping of atomics; all access goes through `&AtomicU64`.
unsafe impl Send for StatsTable {}
// SAFETY: as for Send: concurrent access is through atomics only.
unsafe impl Sync for StatsTable {}

impl StatsTable {
    /// A zeroed table for `queues` virtqueues, in a new memfd named `uvdpa-stats-NAME`.
    ///
    /// # Errors
    /// memfd creation, sizing or mapping failed.
    pub fn new(name: &str, queues: usize) -> io::Result<Arc<Self>> {
        let fd = rustix::fs::memfd_create(
            format!("uvdpa-stats-{name}"),
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )?;
        let len = queues.max(1) * ENTRY_SIZE;
        rustix::fs::ftruncate(&fd, len as u64)?;
        Ok(Arc::new(Self::map(fd, queues, true)?))
    }

    /// Maps an existing table from its fd (a tool reading the daemon's counters).
    ///
    /// # Errors
    /// The fd is smaller than `queues` entries, or mapping failed.
    pub fn open(fd: OwnedFd, queues: usize) -> io::Result<Self> {
        Self::check_size(&fd, queues)?;
        Self::map(fd, queues, false)
    }

    /// Maps an existing table from its fd to keep counting in it (a new daemon taking a
    /// device over on live upgrade: the counters continue where the old daemon left them).
    ///
    /// # Errors
    /// The fd is smaller than `queues` entries, or mapping failed.
    pub fn adopt(fd: OwnedFd, queues: usize) -> io::Result<Arc<Self>> {
        Self::check_size(&fd, queues)?;
        Ok(Arc::new(Self::map(fd, queues, true)?))
    }

    fn check_size(fd: &OwnedFd, queues: usize) -> io::Result<()> {
        let st = rustix::fs::fstat(fd)?;
        if (st.st_size as u64) < (queues.max(1) * ENTRY_SIZE) as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "stats table too small",
            ));
        }
        Ok(())
    }

    fn map(fd: OwnedFd, queues: usize, writable: bool) -> io::Result<Self> {
        let len = queues.max(1) * ENTRY_SIZE;
        let prot = if writable {
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE
        } else {
            rustix::mm::ProtFlags::READ
        };
        // SAFETY: a new shared mapping chosen by the kernel, aliasing no Rust object.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }?;
        let base = NonNull::new(p.cast::<QueueStats>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { fd, base, queues })
    }

    /// Number of entries.
    pub fn queues(&self) -> usize {
        self.queues
    }

    /// The counters of queue `index`.
    pub fn queue(&self, index: usize) -> Option<&QueueStats> {
        // SAFETY: index < queues entries of a live, page-aligned mapping; QueueStats is made
        // of atomics, valid for any bit pattern (zeroed by ftruncate). A read-only mapping
        // is only ever loaded from, never stored to, by the reader's code.
        (index < self.queues).then(|| unsafe { &*self.base.as_ptr().add(index) })
    }

    /// The memfd backing the table (to pass to a tool).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for StatsTable {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with this length and is not used after.
        let _ = unsafe {
            rustix::mm::munmap(self.base.as_ptr().cast(), self.queues.max(1) * ENTRY_SIZE)
        };
    }
}

/// One queue's entry of a shared [`StatsTable`], as a worker holds it.
#[derive(Debug, Clone)]
pub struct QueueStatsRef {
    table: Arc<StatsTable>,
    index: usize,
}

impl QueueStatsRef {
    /// Entry `index` of `table`; `None` if out of range.
    pub fn new(table: Arc<StatsTable>, index: usize) -> Option<Self> {
        (index < table.queues()).then_some(Self { table, index })
    }
}

impl Deref for QueueStatsRef {
    type Target = QueueStats;
    fn deref(&self) -> &QueueStats {
        // The index was checked in `new`; the fallback is never taken.
        static EMPTY: QueueStats = QueueStats {
            requests: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            calls_suppressed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            drops: AtomicU64::new(0),
        };
        self.table.queue(self.index).unwrap_or(&EMPTY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn entries_are_64_bytes_and_shared_through_the_fd() {
        assert_eq!(ENTRY_SIZE, 64);
        let t = StatsTable::new("t", 3).unwrap();
        let r = QueueStatsRef::new(t.clone(), 2).unwrap();
        r.requests.fetch_add(7, Ordering::Relaxed);
        r.errors.fetch_add(1, Ordering::Relaxed);
        let dup = t.fd().try_clone_to_owned().unwrap();
        let reader = StatsTable::open(dup, 3).unwrap();
        assert_eq!(reader.queue(2).unwrap().requests.load(Ordering::Relaxed), 7);
        assert_eq!(reader.queue(2).unwrap().errors.load(Ordering::Relaxed), 1);
        assert_eq!(reader.queue(0).unwrap().requests.load(Ordering::Relaxed), 0);
        assert!(reader.queue(3).is_none());
        assert!(QueueStatsRef::new(t, 3).is_none());
    }

    #[test]
    fn a_short_fd_is_refused() {
        let t = StatsTable::new("t", 1).unwrap();
        let dup = t.fd().try_clone_to_owned().unwrap();
        assert!(StatsTable::open(dup, 2).is_err());
    }
}
