//! Live capture of a net device's frames (`uvdpa dev capture`, in the manner of DPDK's
//! pdump): the daemon mirrors frames into a shared-memory ring that a secondary process
//! (the CLI) maps from an fd it received over IPC, drains and writes out as pcapng.
//!
//! # Shared memory layout (version 1, native endianness: both ends run on one host)
//! One memfd: a header page followed by one data area per sub-ring.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `b"UVDPCAP1"` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | `rings`: number of sub-rings |
//! | 16 | 8 | `ring_size`: data bytes per sub-ring, a power of two |
//! | 24 | 4 | `snaplen`: most frame bytes copied per record |
//! | 28 | 4 | `detached`: set to 1 by the daemon when it stops writing |
//! | 64 + 128·i | 128 | sub-ring `i`'s header: `head` (u64, at 0), `frames` (u64, at 8), `drops` (u64, at 16), `tail` (u64, at 64) |
//! | `data_offset` + `ring_size`·i | `ring_size` | sub-ring `i`'s records |
//!
//! `data_offset` is the header size rounded up to 4096. Each sub-ring has exactly one
//! producer, the worker of one queue pair (sub-ring `p` for pair `p`, or sub-ring 0 when a
//! single queue is captured), and one consumer: a single-producer single-consumer ring.
//! `head` and `tail` count bytes since the start and only grow; a position is `pos &
//! (ring_size - 1)`. The producer writes a record at `head` then publishes it with a
//! release store of `head`; the consumer reads up to `head` (acquire), then frees the space
//! with a release store of `tail`.
//!
//! A record is 8-byte aligned and never wraps: [`REC_HDR`] bytes of header (`len: u32`
//! total record bytes, `qidx: u16`, `flags: u8` ([`REC_PAD`]), a zero byte, `orig_len: u32`
//! the frame's length, `cap_len: u32` bytes that follow, `ts_ns: u64` CLOCK_REALTIME
//! nanoseconds), then `cap_len` frame bytes. When a record does not fit before the end of
//! the area, a padding record fills the rest and the record starts at position 0.
//!
//! # Never blocking the data path
//! A producer that finds too little free space drops the frame and counts it in `drops`.
//! The consumer is another process and is not trusted with the daemon's memory: the
//! producer computes every write position from its own masked `head` and checks the record
//! fits in the area, so a consumer that scribbles on `tail` (or anything else in the
//! mapping) can garble its own capture, never make the daemon write outside the mapping.
//!
//! # Attaching
//! A [`CapturePoint`] per device is what the queue-pair workers look at: once per batch a
//! worker loads the point's generation (one relaxed atomic load, all a capture costs while
//! none is attached) and only when it changed takes the point's lock to pick up the
//! attached ring ([`CaptureTap::refresh`]).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use uvdpa_virtio::Segment;

/// The first 8 bytes of a capture memfd.
pub const MAGIC: [u8; 8] = *b"UVDPCAP1";
/// Layout version.
pub const VERSION: u32 = 1;
/// Bytes of a record header.
pub const REC_HDR: usize = 24;
/// Record flag: padding up to the end of the area, no frame.
pub const REC_PAD: u8 = 1;
/// Most sub-rings (one per queue pair: virtio-net has at most 0x8000 pairs, uvdpa 64).
pub const MAX_RINGS: u32 = 256;
/// Smallest data area per sub-ring.
pub const MIN_RING_SIZE: u64 = 64 << 10;
/// Largest data area per sub-ring.
pub const MAX_RING_SIZE: u64 = 64 << 20;
/// Largest snaplen (tcpdump's default maximum).
pub const MAX_SNAPLEN: u32 = 262_144;

const GLOBAL_HDR: usize = 64;
const RING_HDR: usize = 128;
const PAGE: usize = 4096;
const OFF_HEAD: usize = 0;
const OFF_FRAMES: usize = 8;
const OFF_DROPS: usize = 16;
const OFF_TAIL: usize = 64;
const OFF_DETACHED: usize = 28;

/// Bytes of one capture memfd with `rings` sub-rings of `ring_size` bytes.
fn layout(rings: u32, ring_size: u64) -> Option<(usize, usize)> {
    let hdr = GLOBAL_HDR.checked_add(RING_HDR.checked_mul(rings as usize)?)?;
    let data_offset = hdr.checked_next_multiple_of(PAGE)?;
    let total = data_offset.checked_add(
        usize::try_from(ring_size)
            .ok()?
            .checked_mul(rings as usize)?,
    )?;
    Some((data_offset, total))
}

fn round8(n: usize) -> usize {
    (n + 7) & !7
}

/// One record read back from a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordInfo {
    /// The virtqueue the frame went through (even: receive, odd: transmit).
    pub qidx: u16,
    /// The frame's length on the wire.
    pub orig_len: u32,
    /// When it was captured, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
}

/// Counters of one sub-ring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingCounters {
    /// Records written.
    pub frames: u64,
    /// Frames dropped because the ring was full.
    pub drops: u64,
}

/// A capture memfd, mapped: the daemon's side writes ([`CaptureRing::push`]), the CLI's
/// side reads ([`CaptureRing::drain`]).
#[derive(Debug)]
pub struct CaptureRing {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
    rings: u32,
    ring_size: u64,
    data_offset: usize,
    snaplen: u32,
}

// SAFETY: the mapping is shared memory accessed through atomics (ring indices, counters)
// and raw copies into ranges the SPSC protocol gives to one side at a time; the struct
// itself is immutable after creation.
unsafe impl Send for CaptureRing {}
// SAFETY: as for Send.
unsafe impl Sync for CaptureRing {}

/// Why a capture ring could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A parameter out of range.
    #[error("Invalid capture {field}: {reason}")]
    Invalid {
        /// The parameter.
        field: &'static str,
        /// What is allowed.
        reason: String,
    },
    /// memfd creation, sizing or mapping failed.
    #[error("Cannot set up the capture memory: {0}")]
    Io(#[from] io::Error),
    /// The fd does not hold a capture ring of this version.
    #[error("Not a uvdpa capture ring: {0}")]
    Format(String),
    /// A capture is already attached to this device.
    #[error("A capture is already attached")]
    Busy,
}

impl CaptureRing {
    /// A zeroed ring of `rings` sub-rings of `ring_size` bytes (a power of two), copying at
    /// most `snaplen` bytes per frame, in a new memfd named `uvdpa-capture-NAME`.
    ///
    /// # Errors
    /// [`CaptureError::Invalid`] for a parameter out of range, [`CaptureError::Io`].
    pub fn new(name: &str, rings: u32, ring_size: u64, snaplen: u32) -> Result<Self, CaptureError> {
        if rings == 0 || rings > MAX_RINGS {
            return Err(CaptureError::Invalid {
                field: "rings",
                reason: format!("{rings} (1..={MAX_RINGS})"),
            });
        }
        if !ring_size.is_power_of_two() || !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&ring_size) {
            return Err(CaptureError::Invalid {
                field: "ring_size",
                reason: format!("{ring_size} (a power of two, {MIN_RING_SIZE}..={MAX_RING_SIZE})"),
            });
        }
        if snaplen == 0 || snaplen > MAX_SNAPLEN {
            return Err(CaptureError::Invalid {
                field: "snaplen",
                reason: format!("{snaplen} (1..={MAX_SNAPLEN})"),
            });
        }
        let (data_offset, total) =
            layout(rings, ring_size).ok_or_else(|| CaptureError::Invalid {
                field: "ring_size",
                reason: "too large".into(),
            })?;
        let fd = rustix::fs::memfd_create(
            format!("uvdpa-capture-{name}"),
            rustix::fs::MemfdFlags::CLOEXEC,
        )
        .map_err(io::Error::from)?;
        rustix::fs::ftruncate(&fd, total as u64).map_err(io::Error::from)?;
        let ring = Self::map(fd, total, rings, ring_size, data_offset, snaplen)?;
        // SAFETY: the mapping is `total` bytes, at least GLOBAL_HDR; nobody else has the fd
        // yet, so plain writes cannot race.
        unsafe {
            let p = ring.base.as_ptr();
            std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), p, 8);
            p.add(8).cast::<u32>().write(VERSION);
            p.add(12).cast::<u32>().write(rings);
            p.add(16).cast::<u64>().write(ring_size);
            p.add(24).cast::<u32>().write(snaplen);
        }
        Ok(ring)
    }

    /// Maps a ring from the fd the daemon sent, after checking its header against the
    /// fd's size.
    ///
    /// # Errors
    /// [`CaptureError::Format`] for a wrong magic, version or geometry, [`CaptureError::Io`].
    pub fn open(fd: OwnedFd) -> Result<Self, CaptureError> {
        let size = rustix::fs::fstat(&fd).map_err(io::Error::from)?.st_size;
        let size =
            usize::try_from(size).map_err(|_| CaptureError::Format("negative size".into()))?;
        let mut hdr = [0u8; 32];
        let n = rustix::io::pread(&fd, &mut hdr, 0).map_err(io::Error::from)?;
        if n < hdr.len() || hdr[..8] != MAGIC {
            return Err(CaptureError::Format("bad magic".into()));
        }
        let u32_at = |o: usize| u32::from_ne_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
        let version = u32_at(8);
        if version != VERSION {
            return Err(CaptureError::Format(format!(
                "version {version}, expected {VERSION}"
            )));
        }
        let rings = u32_at(12);
        let mut rs = [0u8; 8];
        rs.copy_from_slice(&hdr[16..24]);
        let ring_size = u64::from_ne_bytes(rs);
        let snaplen = u32_at(24);
        let geometry_ok = (1..=MAX_RINGS).contains(&rings)
            && ring_size.is_power_of_two()
            && (MIN_RING_SIZE..=MAX_RING_SIZE).contains(&ring_size);
        let Some((data_offset, total)) = layout(rings, ring_size).filter(|_| geometry_ok) else {
            return Err(CaptureError::Format(format!(
                "{rings} rings of {ring_size} bytes"
            )));
        };
        if size < total {
            return Err(CaptureError::Format(format!(
                "{size} bytes, the header describes {total}"
            )));
        }
        Self::map(fd, total, rings, ring_size, data_offset, snaplen)
    }

    fn map(
        fd: OwnedFd,
        len: usize,
        rings: u32,
        ring_size: u64,
        data_offset: usize,
        snaplen: u32,
    ) -> Result<Self, CaptureError> {
        // SAFETY: a new shared mapping chosen by the kernel, aliasing no Rust object.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(io::Error::from)?;
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            fd,
            base,
            len,
            rings,
            ring_size,
            data_offset,
            snaplen,
        })
    }

    /// The memfd (to send to the CLI).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Number of sub-rings.
    pub fn rings(&self) -> u32 {
        self.rings
    }

    /// Data bytes per sub-ring.
    pub fn ring_size(&self) -> u64 {
        self.ring_size
    }

    /// Most frame bytes copied per record.
    pub fn snaplen(&self) -> u32 {
        self.snaplen
    }

    fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset + 8 <= self.data_offset && offset % 8 == 0);
        // SAFETY: every caller passes an 8-aligned offset inside the header page (ring
        // headers of ring < rings, checked by the callers), within the live page-aligned
        // mapping; AtomicU64 is valid for any bit pattern.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn ring_hdr(&self, ring: u32) -> usize {
        GLOBAL_HDR + RING_HDR * ring as usize
    }

    fn data(&self, ring: u32) -> *mut u8 {
        // SAFETY: callers pass ring < rings, so the offset stays inside the mapping.
        unsafe {
            self.base
                .as_ptr()
                .add(self.data_offset + ring as usize * self.ring_size as usize)
        }
    }

    fn detached_flag(&self) -> &AtomicU32 {
        // SAFETY: offset 28 is 4-aligned inside the global header of the live mapping.
        unsafe { &*self.base.as_ptr().add(OFF_DETACHED).cast::<AtomicU32>() }
    }

    /// Marks the ring as no longer written by the daemon (the CLI stops when it sees it).
    pub fn set_detached(&self) {
        self.detached_flag().store(1, Ordering::Release);
    }

    /// Whether the daemon stopped writing (device deleted, daemon shutting down).
    pub fn is_detached(&self) -> bool {
        self.detached_flag().load(Ordering::Acquire) != 0
    }

    /// Counters of sub-ring `ring` (zero for a ring out of range).
    pub fn counters(&self, ring: u32) -> RingCounters {
        if ring >= self.rings {
            return RingCounters::default();
        }
        let h = self.ring_hdr(ring);
        RingCounters {
            frames: self.atomic_u64(h + OFF_FRAMES).load(Ordering::Relaxed),
            drops: self.atomic_u64(h + OFF_DROPS).load(Ordering::Relaxed),
        }
    }

    /// Producer: writes one frame of `orig_len` bytes from `src` into sub-ring `ring`,
    /// at most `snaplen` bytes of it. Returns false (and counts a drop) when the ring has
    /// no room. Never blocks. Only one thread may push to a given sub-ring at a time.
    pub fn push(
        &self,
        ring: u32,
        qidx: u16,
        ts_ns: u64,
        orig_len: usize,
        src: FrameSrc<'_>,
    ) -> bool {
        if ring >= self.rings {
            return false;
        }
        let h = self.ring_hdr(ring);
        let size = self.ring_size as usize;
        let mask = size - 1;
        let cap = orig_len.min(self.snaplen as usize);
        let rec = round8(REC_HDR + cap);
        let head_a = self.atomic_u64(h + OFF_HEAD);
        let head = head_a.load(Ordering::Relaxed) & !7;
        let tail = self.atomic_u64(h + OFF_TAIL).load(Ordering::Acquire);
        let used = head.wrapping_sub(tail);
        let pos = (head as usize) & mask;
        let to_end = size - pos;
        let pad = if rec > to_end { to_end } else { 0 };
        // `used > size`: a tail the consumer corrupted; treat the ring as full.
        let fits = used <= size as u64 && (size as u64 - used) >= (pad + rec) as u64;
        if !fits || rec > size {
            bump(self.atomic_u64(h + OFF_DROPS));
            return false;
        }
        let area = self.data(ring);
        let mut at = pos;
        if pad > 0 {
            // SAFETY: `pos..size` lies in this ring's area (pos < size, pad = size - pos ≥ 8
            // since positions are 8-aligned); the consumer does not read past `head`.
            unsafe { write_hdr(area.add(pos), pad as u32, 0, REC_PAD, 0, 0, 0) };
            at = 0;
        }
        // SAFETY: `at + rec <= size` (either rec <= to_end, or at = 0 and rec <= size),
        // so the header and `cap` bytes lie in this ring's area, in space the consumer has
        // freed (checked against `tail` above).
        unsafe {
            let p = area.add(at);
            write_hdr(p, rec as u32, qidx, 0, orig_len as u32, cap as u32, ts_ns);
            src.copy_to(p.add(REC_HDR), cap);
        }
        head_a.store(head.wrapping_add((pad + rec) as u64), Ordering::Release);
        bump(self.atomic_u64(h + OFF_FRAMES));
        true
    }

    /// Consumer: reads every record published in sub-ring `ring`, calling `f` with its
    /// header and captured bytes, then frees their space. Returns the records read. A
    /// malformed record (only a daemon bug could write one) ends the pass and resets the
    /// consumer to the producer's position.
    pub fn drain(&self, ring: u32, mut f: impl FnMut(RecordInfo, &[u8])) -> usize {
        if ring >= self.rings {
            return 0;
        }
        let h = self.ring_hdr(ring);
        let size = self.ring_size as usize;
        let mask = size - 1;
        let head = self.atomic_u64(h + OFF_HEAD).load(Ordering::Acquire);
        let tail_a = self.atomic_u64(h + OFF_TAIL);
        let mut tail = tail_a.load(Ordering::Relaxed);
        let area = self.data(ring);
        let mut n = 0;
        let mut buf = Vec::new();
        while tail != head {
            let avail = head.wrapping_sub(tail);
            let pos = (tail as usize) & mask;
            let mut hdr = [0u8; REC_HDR];
            let hdr_len = (size - pos).min(REC_HDR);
            // SAFETY: `pos..pos+hdr_len` lies in this ring's area; the producer published
            // it (before `head`) and does not write it before `tail` moves past it.
            unsafe { std::ptr::copy_nonoverlapping(area.add(pos), hdr.as_mut_ptr(), hdr_len) };
            let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
            let qidx = u16::from_ne_bytes([hdr[4], hdr[5]]);
            let flags = hdr[6];
            let orig_len = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
            let cap = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]) as usize;
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&hdr[16..24]);
            let bad = len == 0
                || len % 8 != 0
                || len > size - pos
                || len as u64 > avail
                || (flags & REC_PAD == 0 && (len < REC_HDR || cap > len - REC_HDR));
            if bad {
                tail = head;
                break;
            }
            if flags & REC_PAD == 0 {
                buf.resize(cap, 0);
                // SAFETY: `pos + REC_HDR + cap <= pos + len <= size`: inside the area, in
                // published space, as above.
                unsafe {
                    std::ptr::copy_nonoverlapping(area.add(pos + REC_HDR), buf.as_mut_ptr(), cap)
                };
                f(
                    RecordInfo {
                        qidx,
                        orig_len,
                        ts_ns: u64::from_ne_bytes(ts),
                    },
                    &buf,
                );
                n += 1;
            }
            tail = tail.wrapping_add(len as u64);
        }
        tail_a.store(tail, Ordering::Release);
        n
    }
}

/// Adds one to a counter only the producer writes: a load and a store, no locked
/// read-modify-write on the data path.
#[inline]
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Writes a record header at `p`.
///
/// # Safety
/// `p..p + 8` (padding) or `p..p + REC_HDR` (a record) must be writable memory.
unsafe fn write_hdr(p: *mut u8, len: u32, qidx: u16, flags: u8, orig_len: u32, cap: u32, ts: u64) {
    // SAFETY: the caller guarantees the range; unaligned writes tolerate any alignment.
    unsafe {
        p.cast::<u32>().write_unaligned(len);
        p.add(4).cast::<u16>().write_unaligned(qidx);
        p.add(6).write(flags);
        p.add(7).write(0);
        if flags & REC_PAD == 0 {
            p.add(8).cast::<u32>().write_unaligned(orig_len);
            p.add(12).cast::<u32>().write_unaligned(cap);
            p.add(16).cast::<u64>().write_unaligned(ts);
        }
    }
}

impl Drop for CaptureRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with this length and is not used after.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Where a captured frame's bytes are.
#[derive(Clone, Copy)]
pub enum FrameSrc<'a> {
    /// Host bytes: the frame.
    Bytes(&'a [u8]),
    /// A transmit chain's readable segments, the frame starting `skip` bytes in (after the
    /// virtio-net header).
    Segments(&'a [Segment], usize),
}

impl FrameSrc<'_> {
    /// Copies the first `n` bytes of the frame to `dst` (fewer if the frame is shorter).
    ///
    /// # Safety
    /// `dst..dst + n` must be writable; `Segments` must be validated, mapped segments.
    unsafe fn copy_to(self, dst: *mut u8, n: usize) {
        match self {
            FrameSrc::Bytes(b) => {
                let n = n.min(b.len());
                // SAFETY: caller's contract for dst; `b[..n]` is in bounds.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), dst, n) };
            }
            FrameSrc::Segments(segs, mut skip) => {
                let mut done = 0;
                for s in segs {
                    if done == n {
                        break;
                    }
                    if skip >= s.len {
                        skip -= s.len;
                        continue;
                    }
                    let k = (s.len - skip).min(n - done);
                    // SAFETY: the segment is validated mapped guest memory (caller's
                    // contract), `skip + k <= s.len`; `done + k <= n` for dst. Guest memory
                    // never overlaps the capture mapping, but `ptr::copy` is used as the
                    // data path does for guest memory.
                    unsafe { std::ptr::copy(s.base.add(skip), dst.add(done), k) };
                    done += k;
                    skip = 0;
                }
            }
        }
    }
}

/// A device's attachment point for a capture (one at a time).
#[derive(Debug, Default)]
pub struct CapturePoint {
    /// Changes on every attach and detach; what workers check once per batch.
    gen: AtomicU64,
    current: Mutex<Option<Attached>>,
}

/// A capture attached to a device.
#[derive(Debug, Clone)]
pub struct Attached {
    /// The ring frames go to.
    pub ring: Arc<CaptureRing>,
    /// Only this virtqueue (then sub-ring 0 takes every frame), or every data queue (then
    /// queue pair `p` writes to sub-ring `p`).
    pub qidx: Option<u16>,
}

impl CapturePoint {
    /// Attaches `ring`, capturing queue `qidx` or every data queue.
    ///
    /// # Errors
    /// [`CaptureError::Busy`] if a capture is already attached.
    pub fn attach(&self, ring: Arc<CaptureRing>, qidx: Option<u16>) -> Result<(), CaptureError> {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if cur.is_some() {
            return Err(CaptureError::Busy);
        }
        *cur = Some(Attached { ring, qidx });
        self.gen.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Detaches the capture, if any: workers stop writing at their next batch. Returns
    /// whether one was attached.
    pub fn detach(&self) -> bool {
        let old = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.gen.fetch_add(1, Ordering::Release);
        match old {
            Some(a) => {
                a.ring.set_detached();
                true
            }
            None => false,
        }
    }

    /// What a worker calls once per batch: one relaxed load of the generation; only when
    /// it moved past `seen` (a capture was attached or detached since), `seen` is updated
    /// and the attached capture (or `None`) is returned under the lock, as `Some(..)`.
    #[inline]
    pub fn changed(&self, seen: &mut u64) -> Option<Option<Attached>> {
        let g = self.gen.load(Ordering::Relaxed);
        if g == *seen {
            return None;
        }
        *seen = g;
        Some(
            self.current
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }

    /// Whether a capture is attached.
    pub fn is_attached(&self) -> bool {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

/// A queue-pair worker's view of its device's [`CapturePoint`].
#[derive(Debug)]
pub struct CaptureTap {
    point: Arc<CapturePoint>,
    pair: u16,
    seen: u64,
    ring: Option<Arc<CaptureRing>>,
    sub: u32,
    rx: bool,
    tx: bool,
    /// Timestamp of the current batch (0: not taken yet).
    ts: u64,
}

impl CaptureTap {
    /// The tap of queue pair `pair` on `point`; it picks up an attached capture at its
    /// first [`CaptureTap::refresh`].
    pub fn new(point: Arc<CapturePoint>, pair: u16) -> Self {
        Self {
            point,
            pair,
            seen: 0,
            ring: None,
            sub: 0,
            rx: false,
            tx: false,
            ts: 0,
        }
    }

    /// Once per batch: one relaxed load, plus a lock when a capture was attached or
    /// detached since the last call. Also starts a new batch timestamp.
    #[inline]
    pub fn refresh(&mut self) {
        self.ts = 0;
        let Some(cur) = self.point.changed(&mut self.seen) else {
            return;
        };
        let (rx_q, tx_q) = (2 * self.pair, 2 * self.pair + 1);
        match cur {
            Some(Attached { ring, qidx: None }) => {
                (self.rx, self.tx, self.sub) = (true, true, u32::from(self.pair));
                self.ring = Some(ring);
            }
            Some(Attached {
                ring,
                qidx: Some(q),
            }) if q == rx_q || q == tx_q => {
                (self.rx, self.tx, self.sub) = (q == rx_q, q == tx_q, 0);
                self.ring = Some(ring);
            }
            _ => {
                (self.rx, self.tx) = (false, false);
                self.ring = None;
            }
        }
    }

    /// Whether frames received (`rx`) or transmitted are captured now.
    #[inline]
    pub fn wants(&self, rx: bool) -> bool {
        if rx {
            self.rx
        } else {
            self.tx
        }
    }

    /// Mirrors one frame that went through the receive (`rx`) or transmit queue.
    pub fn record(&mut self, rx: bool, orig_len: usize, src: FrameSrc<'_>) {
        let Some(ring) = &self.ring else {
            return;
        };
        if self.ts == 0 {
            self.ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        }
        let qidx = if rx { 2 * self.pair } else { 2 * self.pair + 1 };
        ring.push(self.sub, qidx, self.ts, orig_len, src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(r: &CaptureRing, ring: u32) -> Vec<(RecordInfo, Vec<u8>)> {
        let mut v = Vec::new();
        r.drain(ring, |i, b| v.push((i, b.to_vec())));
        v
    }

    #[test]
    fn frames_round_trip_through_the_fd() {
        let w = CaptureRing::new("t", 2, MIN_RING_SIZE, 100).unwrap();
        let r = CaptureRing::open(w.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(
            (r.rings(), r.ring_size(), r.snaplen()),
            (2, MIN_RING_SIZE, 100)
        );
        let frame: Vec<u8> = (0..150u8).collect();
        assert!(w.push(1, 3, 42, 150, FrameSrc::Bytes(&frame)));
        assert!(w.push(1, 2, 43, 60, FrameSrc::Bytes(&frame[..60])));
        assert!(records(&r, 0).is_empty());
        let got = records(&r, 1);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0].0,
            RecordInfo {
                qidx: 3,
                orig_len: 150,
                ts_ns: 42
            }
        );
        assert_eq!(got[0].1, frame[..100], "cut at snaplen");
        assert_eq!(got[1].0.orig_len, 60);
        assert_eq!(got[1].1, frame[..60]);
        assert_eq!(
            r.counters(1),
            RingCounters {
                frames: 2,
                drops: 0
            }
        );
        assert!(!r.is_detached());
        w.set_detached();
        assert!(r.is_detached());
    }

    #[test]
    fn segments_skip_the_header_and_span_segments() {
        let mut a = vec![0xAAu8; 12];
        a.extend_from_slice(&[1, 2, 3]);
        let mut b = vec![4u8, 5, 6, 7];
        let segs = [
            Segment {
                base: a.as_mut_ptr(),
                len: a.len(),
            },
            Segment {
                base: b.as_mut_ptr(),
                len: b.len(),
            },
        ];
        let w = CaptureRing::new("t", 1, MIN_RING_SIZE, 5).unwrap();
        assert!(w.push(0, 1, 1, 7, FrameSrc::Segments(&segs, 12)));
        let got = records(&w, 0);
        assert_eq!(got[0].1, [1, 2, 3, 4, 5]);
        assert_eq!(got[0].0.orig_len, 7);
    }

    #[test]
    fn a_full_ring_drops_and_counts_and_wraps_after_draining() {
        let w = CaptureRing::new("t", 1, MIN_RING_SIZE, 1000).unwrap();
        let frame = vec![7u8; 1000];
        let mut pushed = 0;
        while w.push(0, 0, 1, 1000, FrameSrc::Bytes(&frame)) {
            pushed += 1;
        }
        assert_eq!(pushed, MIN_RING_SIZE as usize / round8(REC_HDR + 1000));
        assert!(!w.push(0, 0, 1, 1000, FrameSrc::Bytes(&frame)));
        assert_eq!(w.counters(0).drops, 2);
        // Drain, then push across the end of the area many times: padding is skipped.
        let mut total = records(&w, 0).len();
        for i in 0..2000u32 {
            let len = 60 + (i as usize * 37) % 900;
            assert!(w.push(
                0,
                (i % 4) as u16,
                u64::from(i),
                len,
                FrameSrc::Bytes(&frame[..len])
            ));
            if i % 7 == 0 {
                for (info, b) in records(&w, 0) {
                    assert_eq!(b.len(), info.orig_len as usize);
                    total += 1;
                }
            }
        }
        total += records(&w, 0).len();
        assert_eq!(total, pushed + 2000);
        assert_eq!(w.counters(0).frames as usize, total);
    }

    #[test]
    fn a_corrupt_tail_never_lets_the_producer_overrun() {
        let w = CaptureRing::new("t", 1, MIN_RING_SIZE, 64).unwrap();
        let h = w.ring_hdr(0);
        for bogus in [u64::MAX, 1 << 40, 3, MIN_RING_SIZE * 5 + 1] {
            w.atomic_u64(h + OFF_TAIL).store(bogus, Ordering::Relaxed);
            for _ in 0..3000 {
                w.push(0, 0, 1, 64, FrameSrc::Bytes(&[0; 64]));
            }
            // The consumer side stops at a malformed record and resyncs.
            let _ = records(&w, 0);
        }
        // Still usable after the consumer resynced.
        assert!(w.push(0, 0, 1, 64, FrameSrc::Bytes(&[9; 64])));
        assert_eq!(records(&w, 0).len(), 1);
    }

    #[test]
    fn open_refuses_what_is_not_a_ring() {
        let fd = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        assert!(matches!(
            CaptureRing::open(fd),
            Err(CaptureError::Format(_))
        ));
        let w = CaptureRing::new("t", 1, MIN_RING_SIZE, 64).unwrap();
        let dup = w.fd().try_clone_to_owned().unwrap();
        rustix::fs::ftruncate(&dup, 4096).unwrap();
        assert!(matches!(
            CaptureRing::open(dup),
            Err(CaptureError::Format(_))
        ));
        assert!(CaptureRing::new("t", 0, MIN_RING_SIZE, 64).is_err());
        assert!(CaptureRing::new("t", 1, MIN_RING_SIZE + 1, 64).is_err());
        assert!(CaptureRing::new("t", 1, MIN_RING_SIZE, 0).is_err());
    }

    #[test]
    fn taps_pick_up_attach_and_detach_per_batch() {
        let point = Arc::new(CapturePoint::default());
        let mut t0 = CaptureTap::new(point.clone(), 0);
        let mut t1 = CaptureTap::new(point.clone(), 1);
        t0.refresh();
        assert!(!t0.wants(true) && !t0.wants(false));
        let ring = Arc::new(CaptureRing::new("t", 2, MIN_RING_SIZE, 64).unwrap());
        point.attach(ring.clone(), None).unwrap();
        assert!(matches!(
            point.attach(ring.clone(), None),
            Err(CaptureError::Busy)
        ));
        t0.refresh();
        t1.refresh();
        assert!(t0.wants(true) && t0.wants(false) && t1.wants(true));
        t1.record(false, 60, FrameSrc::Bytes(&[1; 60]));
        let got = records(&ring, 1);
        assert_eq!(got[0].0.qidx, 3);
        assert!(got[0].0.ts_ns > 0);
        assert!(point.detach());
        assert!(ring.is_detached());
        t1.refresh();
        assert!(!t1.wants(true) && !t1.wants(false));
        // One queue: sub-ring 0, only that direction of that pair.
        let ring = Arc::new(CaptureRing::new("t", 1, MIN_RING_SIZE, 64).unwrap());
        point.attach(ring.clone(), Some(2)).unwrap();
        t0.refresh();
        t1.refresh();
        assert!(!t0.wants(true) && !t0.wants(false));
        assert!(t1.wants(true) && !t1.wants(false));
        t1.record(true, 60, FrameSrc::Bytes(&[1; 60]));
        assert_eq!(records(&ring, 0)[0].0.qidx, 2);
    }
}
