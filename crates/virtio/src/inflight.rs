//! Inflight I/O tracking for split virtqueues (QEMU `docs/interop/vhost-user.rst`,
//! "Inflight I/O tracking", VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
//!
//! The frontend keeps a shared memory region that outlives the backend process. Before the
//! device processes a chain it marks the head in flight there; after the used entry is
//! published it clears the mark. A backend that restarts after a crash finds the heads it
//! had taken but not completed and processes them again before anything new, so the
//! driver never sees a request lost.
//!
//! Layout per queue (little-endian), at `index * queue_region_size(queue_size)`:
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```
//! padded to 64 bytes.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Alignment of each queue's region.
pub const INFLIGHT_ALIGN: usize = 64;
/// Size of the per-queue header.
const HEADER: usize = 16;
/// Size of one descriptor state entry.
const DESC: usize = 16;
/// Layout version written by this backend.
pub const INFLIGHT_VERSION: u16 = 1;

/// Bytes of one queue's region for a queue of `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(INFLIGHT_ALIGN) * INFLIGHT_ALIGN
}

/// A mapped inflight buffer shared with the frontend.
#[derive(Debug)]
pub struct InflightMap {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is shared memory accessed only through atomics and volatile copies.
unsafe impl Send for InflightMap {}
// SAFETY: as for Send.
unsafe impl Sync for InflightMap {}

impl InflightMap {
    /// A new zeroed buffer for `num_queues` queues of `queue_size` (GET_INFLIGHT_FD), with
    /// each queue's header initialised.
    ///
    /// # Errors
    /// Invalid sizes, memfd or mapping failures.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<Arc<Self>> {
        if num_queues == 0 || queue_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty inflight buffer",
            ));
        }
        let len = usize::from(num_queues) * queue_region_size(queue_size);
        let fd = rustix::fs::memfd_create("uvdpa-inflight", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        let map = Self::map(fd, 0, len, num_queues, queue_size)?;
        map.init_headers();
        Ok(Arc::new(map))
    }

    /// Writes each queue's header (layout version and descriptor count) into a buffer
    /// nobody uses yet (a new one, or a reconnect log just created).
    pub fn init_headers(&self) {
        for q in 0..self.num_queues {
            let r = self.region(q);
            // SAFETY: the header lies inside the region mapped by `map` (num_queues regions
            // of queue_region_size bytes); callers use it before any tracker exists.
            unsafe {
                std::ptr::write_volatile(r.add(8).cast::<u16>(), INFLIGHT_VERSION.to_le());
                std::ptr::write_volatile(r.add(10).cast::<u16>(), self.queue_size.to_le());
            }
        }
    }

    /// Maps a buffer the frontend sends back (SET_INFLIGHT_FD).
    ///
    /// # Errors
    /// The fd is smaller than `offset + len`, `len` is too small for the queues, or mapping
    /// fails.
    pub fn open(
        fd: OwnedFd,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<Self>> {
        let need = usize::from(num_queues) * queue_region_size(queue_size);
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if num_queues == 0 || queue_size == 0 || len < need || len > (1 << 30) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight buffer size does not match its queues",
            ));
        }
        let st = rustix::fs::fstat(&fd)?;
        let end = offset
            .checked_add(len as u64)
            .ok_or(io::Error::from(io::ErrorKind::InvalidInput))?;
        if (st.st_size as u64) < end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight fd smaller than announced",
            ));
        }
        Ok(Arc::new(Self::map(
            fd, offset, len, num_queues, queue_size,
        )?))
    }

    fn map(
        fd: OwnedFd,
        offset: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Self> {
        // SAFETY: a new shared mapping chosen by the kernel, aliasing no Rust object.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                offset,
            )
        }?;
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            fd,
            base,
            len,
            num_queues,
            queue_size,
        })
    }

    /// Total mapped size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: creation refuses it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues described.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue size the buffer was laid out for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The fd (to send to the frontend).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn region(&self, q: u16) -> *mut u8 {
        self.base
            .as_ptr()
            .wrapping_add(usize::from(q) * queue_region_size(self.queue_size))
    }

    /// The tracker of queue `q`, for a queue of `queue_size` descriptors; `None` if the
    /// buffer has no such queue or was laid out for another size.
    pub fn queue(self: &Arc<Self>, q: u16, queue_size: u16) -> Option<InflightQueue> {
        (q < self.num_queues && queue_size == self.queue_size).then(|| InflightQueue {
            map: self.clone(),
            base: self.region(q),
            size: queue_size,
            counter: 0,
        })
    }
}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: the mapping this object created; no tracker outlives it (they hold an Arc).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One queue's inflight tracker, owned by the queue (and so by one worker at a time).
#[derive(Debug)]
pub struct InflightQueue {
    map: Arc<InflightMap>,
    base: *mut u8,
    size: u16,
    counter: u64,
}

// SAFETY: `base` points into `map`, kept alive by the Arc; one owner at a time.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: offsets used are inside this queue's region (header fields, 2-aligned) of
        // a live shared mapping; atomics tolerate the frontend reading concurrently.
        unsafe { &*(self.base.add(off) as *const AtomicU16) }
    }

    fn desc_inflight(&self, head: u16) -> Option<&AtomicU8> {
        (head < self.size).then(|| {
            // SAFETY: head < size, so the entry lies inside the region.
            unsafe { &*(self.base.add(HEADER + DESC * usize::from(head)) as *const AtomicU8) }
        })
    }

    fn desc_counter(&self, head: u16) -> Option<&AtomicU64> {
        (head < self.size).then(|| {
            // SAFETY: as above; the counter is 8-byte aligned (16-byte entries after a
            // 16-byte header in a 64-byte aligned region).
            unsafe { &*(self.base.add(HEADER + DESC * usize::from(head) + 8) as *const AtomicU64) }
        })
    }

    /// Marks `head` in flight, before the device acts on it.
    pub fn begin(&mut self, head: u16) {
        self.counter += 1;
        if let (Some(c), Some(f)) = (self.desc_counter(head), self.desc_inflight(head)) {
            c.store(self.counter.to_le(), Ordering::Relaxed);
            f.store(1, Ordering::Release);
        }
    }

    /// Records `head` as the entry about to be published (`last_batch_head`).
    pub fn pre_put(&mut self, head: u16) {
        self.u16_at(12).store(head.to_le(), Ordering::Release);
    }

    /// Clears `head` after its used entry was published, and records `used_idx`.
    pub fn post_put(&mut self, head: u16, used_idx: u16) {
        if let Some(f) = self.desc_inflight(head) {
            f.store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.u16_at(14).store(used_idx.to_le(), Ordering::Release);
    }

    /// After a restart: reconciles with the used ring's index and returns the heads still
    /// in flight, oldest first. If the previous backend died between publishing a used
    /// entry and clearing its mark, that head (`last_batch_head`) is cleared rather than
    /// resubmitted.
    pub fn recover(&mut self, ring_used_idx: u16) -> Vec<u16> {
        let recorded = u16::from_le(self.u16_at(14).load(Ordering::Acquire));
        if recorded != ring_used_idx {
            let last = u16::from_le(self.u16_at(12).load(Ordering::Acquire));
            if let Some(f) = self.desc_inflight(last) {
                f.store(0, Ordering::Release);
            }
            self.u16_at(14)
                .store(ring_used_idx.to_le(), Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter(|&h| {
                self.desc_inflight(h)
                    .is_some_and(|f| f.load(Ordering::Acquire) == 1)
            })
            .map(|h| {
                (
                    self.desc_counter(h)
                        .map_or(0, |c| u64::from_le(c.load(Ordering::Acquire))),
                    h,
                )
            })
            .collect();
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |(c, _)| *c);
        heads.into_iter().map(|(_, h)| h).collect()
    }

    /// The map this tracker lives in.
    pub fn map(&self) -> &Arc<InflightMap> {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_sizes_follow_the_spec_layout() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
    }

    #[test]
    fn begin_and_post_put_track_heads_across_a_reopen() {
        let m = InflightMap::create(2, 8).unwrap();
        let mut q = m.queue(1, 8).unwrap();
        q.begin(3);
        q.begin(5);
        q.begin(1);
        q.pre_put(5);
        q.post_put(5, 1);
        // A "new backend" maps the same fd.
        let fd = m.fd().try_clone_to_owned().unwrap();
        let m2 = InflightMap::open(fd, 0, m.len() as u64, 2, 8).unwrap();
        let mut q2 = m2.queue(1, 8).unwrap();
        assert_eq!(
            q2.recover(1),
            vec![3, 1],
            "oldest first, completed head cleared"
        );
        assert!(m2.queue(0, 8).unwrap().recover(0).is_empty());
        assert!(m2.queue(2, 8).is_none());
        assert!(m2.queue(1, 16).is_none());
    }

    #[test]
    fn crash_after_publishing_clears_the_last_batch_head() {
        let m = InflightMap::create(1, 8).unwrap();
        let mut q = m.queue(0, 8).unwrap();
        q.begin(2);
        q.begin(4);
        q.pre_put(2);
        // The used ring moved to 1 but the backend died before post_put(2).
        assert_eq!(q.recover(1), vec![4]);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(InflightMap::create(0, 8).is_err());
        let m = InflightMap::create(1, 8).unwrap();
        let fd = m.fd().try_clone_to_owned().unwrap();
        assert!(InflightMap::open(fd, 0, 10, 1, 8).is_err());
        let fd = m.fd().try_clone_to_owned().unwrap();
        assert!(
            InflightMap::open(fd, 0, 1 << 20, 1, 8).is_err(),
            "larger than the fd"
        );
    }
}
