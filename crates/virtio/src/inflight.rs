//! Inflight I/O tracking (QEMU `docs/interop/vhost-user.rst`, "Inflight I/O tracking",
//! VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), for split and packed virtqueues.
//!
//! The frontend keeps a shared memory region that outlives the backend process. Before the
//! device processes a chain it marks it in flight there; after the used entry is published
//! it clears the mark. A backend that restarts after a crash finds the chains it had taken
//! but not completed and processes them again before anything new, so the driver never
//! sees a request lost.
//!
//! The region holds one queue region per queue, each padded to 64 bytes; queue `q` starts
//! at `q * layout.queue_region_size(queue_size)`. Which [`InflightLayout`] a queue uses
//! follows the negotiated ring layout (VIRTIO_F_RING_PACKED), not the map: a map sized
//! for the larger (packed) layout serves either.
//!
//! Split layout (little-endian):
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```
//! indexed by head descriptor index ([`InflightQueue`]).
//!
//! Packed layout:
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 free_head; u16 old_free_head;
//! u16 used_idx; u16 old_used_idx; u8 used_wrap_counter; u8 old_used_wrap_counter;
//! u8 padding[7]   (the entries start at byte 32)
//! struct { u8 inflight; u8 padding; u16 next; u16 last; u16 num; u64 counter;
//!          u16 id; u16 flags; u32 len; u64 addr; } desc[desc_num];
//! ```
//! Entries are not indexed by ring slot: a chain's ring descriptors are copied into entries
//! taken from a free list (`free_head`, linked by `next`), since both the driver and the
//! device's own used descriptors overwrite the ring slots while the chain is in flight.
//! The chain's first entry holds `inflight`, `num` (ring slots), `last` and `counter`.
//! `old_free_head`, `old_used_idx` and `old_used_wrap_counter` are the committed state: a
//! completion moves `free_head`/`used_idx`/`used_wrap_counter` first, publishes the used
//! descriptor, clears `inflight`, then commits; a restarted backend that finds them
//! different rolls the completion forward if the used descriptor at `old_used_idx` was
//! published, back if not ([`PackedInflight`], used by [`crate::packed::PackedQueue`]).
//! A packed queue region whose `version` is 0 is uninitialized: the first queue attached
//! to it lays out the free list and records the ring's position (the vring base).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::chain::{packed_available, RawPackedDesc};

/// Alignment of each queue's region.
pub const INFLIGHT_ALIGN: usize = 64;
/// Size of the per-queue header (split layout).
const HEADER: usize = 16;
/// Size of one descriptor state entry (split layout).
const DESC: usize = 16;
/// Size of the per-queue header (packed layout, with its padding).
const PACKED_HEADER: usize = 32;
/// Size of one descriptor state entry (packed layout).
const PACKED_DESC: usize = 32;
/// Layout version written by this backend.
pub const INFLIGHT_VERSION: u16 = 1;

/// How a queue region is laid out: the split or the packed form of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightLayout {
    /// `QueueRegionSplit`: one 16-byte entry per head descriptor index.
    Split,
    /// `QueueRegionPacked`: 32-byte entries holding copies of ring descriptors.
    Packed,
}

impl InflightLayout {
    /// The layout for a ring that is packed (`true`) or split.
    pub fn for_ring(packed: bool) -> Self {
        if packed {
            Self::Packed
        } else {
            Self::Split
        }
    }

    /// Bytes of one queue's region for a queue of `queue_size` descriptors (padded to
    /// [`INFLIGHT_ALIGN`]).
    pub fn queue_region_size(self, queue_size: u16) -> usize {
        let (hdr, desc) = match self {
            Self::Split => (HEADER, DESC),
            Self::Packed => (PACKED_HEADER, PACKED_DESC),
        };
        (hdr + desc * usize::from(queue_size)).div_ceil(INFLIGHT_ALIGN) * INFLIGHT_ALIGN
    }

    /// Bytes of a whole buffer of `num_queues` regions.
    pub fn region_size(self, num_queues: u16, queue_size: u16) -> usize {
        usize::from(num_queues) * self.queue_region_size(queue_size)
    }
}

/// Bytes of one queue's region for a split queue of `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> usize {
    InflightLayout::Split.queue_region_size(queue_size)
}

/// Bytes of one queue's region for a packed queue of `queue_size` descriptors.
pub fn packed_queue_region_size(queue_size: u16) -> usize {
    InflightLayout::Packed.queue_region_size(queue_size)
}

/// A mapped inflight buffer shared with the frontend (or a reconnect log).
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
    /// A new zeroed buffer for `num_queues` split queues of `queue_size` (GET_INFLIGHT_FD),
    /// with each queue's header initialised. Same as
    /// `create_in(InflightLayout::Split, ..)`.
    ///
    /// # Errors
    /// Invalid sizes, memfd or mapping failures.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<Arc<Self>> {
        Self::create_in(InflightLayout::Split, num_queues, queue_size)
    }

    /// A new zeroed buffer sized for `num_queues` queues of `queue_size` in `layout`, its
    /// headers written as [`InflightMap::init_layout`] does. A buffer created for the
    /// packed layout also serves split queues (it is larger).
    ///
    /// # Errors
    /// Invalid sizes, memfd or mapping failures.
    pub fn create_in(
        layout: InflightLayout,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<Self>> {
        if num_queues == 0 || queue_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty inflight buffer",
            ));
        }
        let len = layout.region_size(num_queues, queue_size);
        let fd = rustix::fs::memfd_create("uvdpa-inflight", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        let map = Self::map(fd, 0, len, num_queues, queue_size)?;
        if layout == InflightLayout::Split {
            map.init_headers();
        }
        Ok(Arc::new(map))
    }

    /// Writes each split queue's header (layout version and descriptor count) into a
    /// buffer nobody uses yet (a new one, or a reconnect log just created).
    pub fn init_headers(&self) {
        for q in 0..self.num_queues {
            let r = self.region(InflightLayout::Split, q);
            // SAFETY: the header lies inside the region mapped by `map` (num_queues regions
            // of queue_region_size bytes, checked at creation); callers use it before any
            // tracker exists.
            unsafe {
                std::ptr::write_volatile(r.add(8).cast::<u16>(), INFLIGHT_VERSION.to_le());
                std::ptr::write_volatile(r.add(10).cast::<u16>(), self.queue_size.to_le());
            }
        }
    }

    /// Resets a buffer nobody tracks in now (a new reconnect log, or one whose device was
    /// reset) for `layout`: zeroes it all, then writes the split headers (split), or leaves
    /// every packed queue region uninitialized (version 0: the first queue attached lays
    /// it out from the ring's position).
    ///
    /// # Errors
    /// The buffer is too small for `layout`.
    pub fn init_layout(&self, layout: InflightLayout) -> io::Result<()> {
        if !self.fits(layout) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight buffer too small for its layout",
            ));
        }
        // SAFETY: `len` bytes are mapped read-write; no tracker exists (the caller's
        // contract), so nothing else writes them meanwhile.
        unsafe { std::ptr::write_bytes(self.base.as_ptr(), 0, self.len) };
        fence(Ordering::SeqCst);
        if layout == InflightLayout::Split {
            self.init_headers();
        }
        Ok(())
    }

    /// Maps a split-layout buffer the frontend sends back (SET_INFLIGHT_FD). Same as
    /// `open_in(InflightLayout::Split, ..)`.
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
        Self::open_in(
            InflightLayout::Split,
            fd,
            offset,
            len,
            num_queues,
            queue_size,
        )
    }

    /// Maps `len` bytes at `offset` of `fd` as a buffer of `num_queues` queues of
    /// `queue_size` in `layout` (SET_INFLIGHT_FD, a reconnect log). Its content is kept.
    ///
    /// # Errors
    /// The fd is smaller than `offset + len`, `len` is too small for the queues in
    /// `layout`, or mapping fails.
    pub fn open_in(
        layout: InflightLayout,
        fd: OwnedFd,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<Self>> {
        let need = layout.region_size(num_queues, queue_size);
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

    /// Whether the buffer is large enough for its queues in `layout`.
    pub fn fits(&self, layout: InflightLayout) -> bool {
        self.len >= layout.region_size(self.num_queues, self.queue_size)
    }

    /// The fd (to send to the frontend).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn region(&self, layout: InflightLayout, q: u16) -> *mut u8 {
        self.base
            .as_ptr()
            .wrapping_add(usize::from(q) * layout.queue_region_size(self.queue_size))
    }

    /// The split-layout tracker of queue `q`, for a queue of `queue_size` descriptors;
    /// `None` if the buffer has no such queue or was laid out for another size.
    pub fn queue(self: &Arc<Self>, q: u16, queue_size: u16) -> Option<InflightQueue> {
        (q < self.num_queues && queue_size == self.queue_size && self.fits(InflightLayout::Split))
            .then(|| InflightQueue {
                map: self.clone(),
                base: self.region(InflightLayout::Split, q),
                size: queue_size,
                counter: 0,
            })
    }

    /// The packed-layout tracker of queue `q`, for a queue of `queue_size` descriptors;
    /// `None` if the buffer has no such queue, was laid out for another size, or is too
    /// small for the packed layout.
    pub fn packed_queue(self: &Arc<Self>, q: u16, queue_size: u16) -> Option<PackedInflight> {
        (q < self.num_queues && queue_size == self.queue_size && self.fits(InflightLayout::Packed))
            .then(|| PackedInflight {
                map: self.clone(),
                base: self.region(InflightLayout::Packed, q),
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

// Packed layout: header offsets.
const P_VERSION: usize = 8;
const P_DESC_NUM: usize = 10;
/// `free_head` (low half) and `old_free_head` (high half), stored together.
const P_FREE: usize = 12;
/// `used_idx`, `old_used_idx`, `used_wrap_counter`, `old_used_wrap_counter` and two
/// padding bytes, stored together (8-byte aligned).
const P_USED: usize = 16;
// Packed layout: entry field offsets.
const E_INFLIGHT: usize = 0;
const E_NEXT: usize = 2;
const E_LAST: usize = 4;
const E_NUM: usize = 6;
const E_COUNTER: usize = 8;
const E_ID: usize = 16;
const E_FLAGS: usize = 18;
const E_LEN: usize = 20;
const E_ADDR: usize = 24;

/// A ring position: slot and wrap counter.
pub(crate) type Position = (u16, bool);

/// The used positions of a packed header: `(used, old_used)`.
fn unpack_used(v: u64) -> (Position, Position) {
    let used = (v & 0xffff) as u16;
    let old = ((v >> 16) & 0xffff) as u16;
    let wrap = (v >> 32) & 0xff != 0;
    let old_wrap = (v >> 40) & 0xff != 0;
    ((used, wrap), (old, old_wrap))
}

fn pack_used(used: Position, old: Position) -> u64 {
    u64::from(used.0) | u64::from(old.0) << 16 | u64::from(used.1) << 32 | u64::from(old.1) << 40
}

/// What a restarted packed queue resumes from ([`PackedInflight::recover`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PackedRecovery {
    /// The used position: every chain before it was completed and published.
    pub used: Position,
    /// The chains still in flight, oldest first: `(entry, ring slots)`.
    pub chains: Vec<(u16, u16)>,
    /// Ring slots they occupy: the avail position is `used` plus this.
    pub slots: u32,
}

/// One packed queue's inflight tracker (the packed layout of the module docs), owned by
/// the queue (and so by one worker at a time).
#[derive(Debug)]
pub struct PackedInflight {
    map: Arc<InflightMap>,
    base: *mut u8,
    size: u16,
    counter: u64,
}

// SAFETY: `base` points into `map`, kept alive by the Arc; one owner at a time.
unsafe impl Send for PackedInflight {}

impl PackedInflight {
    // Header and entry accessors. Every offset is inside this queue's region (header:
    // below PACKED_HEADER; entry `i < size`: 32 bytes at PACKED_HEADER + 32·i) of a live
    // shared mapping (`map`, checked by `packed_queue` to hold the packed layout), and
    // naturally aligned (the region starts 64-byte aligned). Atomics tolerate a frontend
    // or a later backend reading the same memory.

    fn h16(&self, off: usize) -> &AtomicU16 {
        // SAFETY: see above (header offsets P_VERSION, P_DESC_NUM).
        unsafe { &*(self.base.add(off) as *const AtomicU16) }
    }

    fn h32(&self, off: usize) -> &AtomicU32 {
        // SAFETY: see above (P_FREE, 4-aligned).
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    fn h64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: see above (P_USED, 8-aligned).
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn entry(&self, i: u16, off: usize) -> Option<*mut u8> {
        (i < self.size).then(|| {
            self.base
                .wrapping_add(PACKED_HEADER + PACKED_DESC * usize::from(i) + off)
        })
    }

    fn e8(&self, i: u16, off: usize) -> Option<&AtomicU8> {
        // SAFETY: i < size (checked by `entry`); see above.
        self.entry(i, off)
            .map(|p| unsafe { &*(p as *const AtomicU8) })
    }

    fn e16(&self, i: u16, off: usize) -> Option<&AtomicU16> {
        // SAFETY: as `e8`; `off` is 2-aligned.
        self.entry(i, off)
            .map(|p| unsafe { &*(p as *const AtomicU16) })
    }

    fn e32(&self, i: u16, off: usize) -> Option<&AtomicU32> {
        // SAFETY: as `e8`; `off` is 4-aligned.
        self.entry(i, off)
            .map(|p| unsafe { &*(p as *const AtomicU32) })
    }

    fn e64(&self, i: u16, off: usize) -> Option<&AtomicU64> {
        // SAFETY: as `e8`; `off` is 8-aligned.
        self.entry(i, off)
            .map(|p| unsafe { &*(p as *const AtomicU64) })
    }

    fn get16(&self, i: u16, off: usize) -> Option<u16> {
        self.e16(i, off)
            .map(|a| u16::from_le(a.load(Ordering::Acquire)))
    }

    fn set16(&self, i: u16, off: usize, v: u16) {
        if let Some(a) = self.e16(i, off) {
            a.store(v.to_le(), Ordering::Release);
        }
    }

    fn set8(&self, i: u16, off: usize, v: u8) {
        if let Some(a) = self.e8(i, off) {
            a.store(v, Ordering::Release);
        }
    }

    fn inflight(&self, i: u16) -> bool {
        self.e8(i, E_INFLIGHT)
            .is_some_and(|a| a.load(Ordering::Acquire) == 1)
    }

    /// `(free_head, old_free_head)`.
    fn free(&self) -> (u16, u16) {
        let v = u32::from_le(self.h32(P_FREE).load(Ordering::Acquire));
        (v as u16, (v >> 16) as u16)
    }

    fn set_free(&self, head: u16, old: u16) {
        let v = u32::from(head) | u32::from(old) << 16;
        self.h32(P_FREE).store(v.to_le(), Ordering::Release);
    }

    fn used(&self) -> (Position, Position) {
        unpack_used(u64::from_le(self.h64(P_USED).load(Ordering::Acquire)))
    }

    fn set_used(&self, used: Position, old: Position) {
        self.h64(P_USED)
            .store(pack_used(used, old).to_le(), Ordering::Release);
    }

    /// Whether a backend laid this region out (version set, for this queue size).
    pub fn is_initialized(&self) -> bool {
        u16::from_le(self.h16(P_VERSION).load(Ordering::Acquire)) == INFLIGHT_VERSION
            && u16::from_le(self.h16(P_DESC_NUM).load(Ordering::Acquire)) == self.size
    }

    /// Lays the region out for a ring at `used` with nothing in flight: every entry free
    /// (linked in order), the used position committed, then the version written.
    pub(crate) fn init(&mut self, used: Position) {
        self.h16(P_VERSION).store(0, Ordering::Release);
        for i in 0..self.size {
            self.set8(i, E_INFLIGHT, 0);
            self.set16(i, E_NEXT, i + 1);
            self.set16(i, E_NUM, 0);
        }
        self.set_free(0, 0);
        self.set_used(used, used);
        self.h16(P_DESC_NUM)
            .store(self.size.to_le(), Ordering::Release);
        self.h16(P_VERSION)
            .store(INFLIGHT_VERSION.to_le(), Ordering::Release);
        self.counter = 0;
    }

    /// Marks a chain of `num` ring descriptors in flight, before the device acts on it:
    /// copies `desc(k)` for `k in 0..num` into entries taken from the free list, then sets
    /// the first entry's count, last entry, counter and in-flight flag, then commits the
    /// new free head. Returns the chain's first entry, or `None` (nothing marked) if the
    /// free list runs out (a region not consistent with the ring).
    pub(crate) fn mark(
        &mut self,
        num: u16,
        mut desc: impl FnMut(u16) -> RawPackedDesc,
    ) -> Option<u16> {
        let (head, _) = self.free();
        if num == 0 || head >= self.size {
            return None;
        }
        let mut e = head;
        let mut last = head;
        for k in 0..num {
            if e >= self.size {
                return None;
            }
            let d = desc(k);
            if let Some(a) = self.e64(e, E_ADDR) {
                a.store(d.addr.to_le(), Ordering::Relaxed);
            }
            if let Some(a) = self.e32(e, E_LEN) {
                a.store(d.len.to_le(), Ordering::Relaxed);
            }
            self.set16(e, E_ID, d.id);
            self.set16(e, E_FLAGS, d.flags);
            if k > 0 {
                self.set8(e, E_INFLIGHT, 0);
            }
            last = e;
            e = self.get16(e, E_NEXT)?;
        }
        self.counter += 1;
        self.set16(head, E_NUM, num);
        self.set16(head, E_LAST, last);
        if let Some(a) = self.e64(head, E_COUNTER) {
            a.store(self.counter.to_le(), Ordering::Release);
        }
        self.set8(head, E_INFLIGHT, 1);
        // The mark is committed with the new free head: before, a restart rolls the free
        // head back and clears the half-written entry.
        self.set_free(e, e);
        Some(head)
    }

    /// First half of a completion, before the used descriptor is published: returns the
    /// chain's entries (first `entry`) to the free list and moves the used position to
    /// `used_after`, uncommitted. `entry` `None`: a chain that was not tracked (only the
    /// used position moves).
    pub(crate) fn complete_begin(&mut self, entry: Option<u16>, used_after: Position) {
        let (head, old) = self.free();
        if let Some(h) = entry.filter(|&h| self.inflight(h)) {
            if let Some(last) = self.get16(h, E_LAST).filter(|&l| l < self.size) {
                self.set16(last, E_NEXT, head);
                self.set_free(h, old);
            }
        }
        let (_, old_used) = self.used();
        self.set_used(used_after, old_used);
    }

    /// Second half of a completion, after the used descriptor was published: clears the
    /// chain's in-flight flag, commits the free head, then the used position. `steps` is
    /// 3 (all); fewer only simulate a crash in tests.
    pub(crate) fn complete_end_steps(&mut self, entry: Option<u16>, steps: u8) {
        if steps == 0 {
            return;
        }
        if let Some(h) = entry {
            self.set8(h, E_INFLIGHT, 0);
        }
        if steps == 1 {
            return;
        }
        let (head, _) = self.free();
        // The free head first: a restart that finds the used positions still different
        // rolls forward (the descriptor is published), which commits both anyway.
        self.set_free(head, head);
        if steps == 2 {
            return;
        }
        let (used, _) = self.used();
        self.set_used(used, used);
    }

    /// Forgets a chain marked by [`PackedInflight::mark`] that the device gives back
    /// unprocessed (a rewind): its entries go back to the free list.
    pub(crate) fn unmark(&mut self, entry: u16) {
        if !self.inflight(entry) {
            return;
        }
        let (head, _) = self.free();
        if let Some(last) = self.get16(entry, E_LAST).filter(|&l| l < self.size) {
            self.set16(last, E_NEXT, head);
            self.set_free(entry, entry);
        }
        self.set8(entry, E_INFLIGHT, 0);
    }

    /// The ring descriptors saved for the chain whose first entry is `entry` (`num` of
    /// them, in ring order), as [`PackedInflight::mark`] copied them.
    pub(crate) fn saved_chain(&self, entry: u16, num: u16, out: &mut Vec<RawPackedDesc>) {
        out.clear();
        let mut e = entry;
        for _ in 0..num {
            let (Some(addr), Some(len), Some(id), Some(flags)) = (
                self.e64(e, E_ADDR)
                    .map(|a| u64::from_le(a.load(Ordering::Acquire))),
                self.e32(e, E_LEN)
                    .map(|a| u32::from_le(a.load(Ordering::Acquire))),
                self.get16(e, E_ID),
                self.get16(e, E_FLAGS),
            ) else {
                return;
            };
            out.push(RawPackedDesc {
                addr,
                len,
                id,
                flags,
            });
            match self.get16(e, E_NEXT) {
                Some(n) => e = n,
                None => return,
            }
        }
    }

    /// After a restart: reconciles an interrupted completion and returns where the ring
    /// resumes and the chains still in flight, oldest first. `ring_flags(slot)` reads the
    /// flags of a descriptor ring slot. A completion that moved the used position but was
    /// not committed is rolled forward if the used descriptor at the committed position
    /// was published (its slot no longer shows the chain available under the committed
    /// wrap counter), back otherwise; then every entry on the free list is cleared.
    ///
    /// # Errors
    /// A region inconsistent with itself (positions past the ring, a broken free list,
    /// overlapping chains, more ring slots in flight than the ring holds): the caller
    /// re-initializes it.
    pub(crate) fn recover(
        &mut self,
        ring_flags: impl Fn(u16) -> u16,
    ) -> Result<PackedRecovery, &'static str> {
        let (used, old_used) = self.used();
        if used.0 >= self.size || old_used.0 >= self.size {
            return Err("used position past the ring");
        }
        let (free_head, old_free_head) = self.free();
        let (free_head, used) =
            if used != old_used && !packed_available(ring_flags(old_used.0), old_used.1) {
                // Published before the crash: commit it.
                (free_head, used)
            } else {
                // Not published (or nothing pending): roll back.
                (old_free_head, old_used)
            };
        self.set_free(free_head, free_head);
        self.set_used(used, used);
        let size = usize::from(self.size);
        let mut seen = vec![false; size];
        let mut e = free_head;
        while e < self.size {
            if std::mem::replace(&mut seen[usize::from(e)], true) {
                return Err("free list loops");
            }
            self.set8(e, E_INFLIGHT, 0);
            e = self.get16(e, E_NEXT).unwrap_or(u16::MAX);
        }
        let mut heads: Vec<(u64, u16, u16)> = Vec::new();
        let mut slots = 0u32;
        for h in 0..self.size {
            if seen[usize::from(h)] || !self.inflight(h) {
                continue;
            }
            let num = self.get16(h, E_NUM).unwrap_or(0);
            if num == 0 || num > self.size {
                return Err("in-flight chain of a bad length");
            }
            let last = self.get16(h, E_LAST).unwrap_or(u16::MAX);
            let mut e = h;
            for k in 0..num {
                if e >= self.size || std::mem::replace(&mut seen[usize::from(e)], true) {
                    return Err("in-flight chains overlap");
                }
                if k + 1 < num {
                    e = self.get16(e, E_NEXT).unwrap_or(u16::MAX);
                }
            }
            if e != last {
                return Err("in-flight chain does not end at its last entry");
            }
            slots += u32::from(num);
            let counter = self
                .e64(h, E_COUNTER)
                .map_or(0, |a| u64::from_le(a.load(Ordering::Acquire)));
            heads.push((counter, h, num));
        }
        if slots > u32::from(self.size) {
            return Err("more ring slots in flight than the ring holds");
        }
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |&(c, _, _)| c);
        Ok(PackedRecovery {
            used,
            chains: heads.into_iter().map(|(_, h, n)| (h, n)).collect(),
            slots,
        })
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
