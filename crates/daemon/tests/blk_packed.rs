//! virtio-blk over packed virtqueues (virtio 1.2 §2.8, VIRTIO_F_RING_PACKED) end to end,
//! driven by two drivers nobody here wrote:
//!
//! - libblkio's own virtqueue library, `virtio-driver` 0.6.1 (libblkio 0.5.1 never offers
//!   RING_PACKED over vhost-user, so the library is used directly): its packed ring, event
//!   suppression and virtio-blk request layout against the real daemon, at queue depth 1
//!   and with as many requests in flight as the ring holds, thousands of requests per
//!   ring so it wraps hundreds of times, with and without VIRTIO_RING_F_EVENT_IDX, 1 and 2
//!   queues, a busy-polling worker, and sessions of either layout one after the other on
//!   one device (libblkio's split rings in between);
//! - a Linux guest's virtio_blk driver under QEMU with `vhost-user-blk-pci,packed=on`.
//!
//! Each test also checks through `uvdpa -j dev show` that the device negotiated
//! VIRTIO_F_RING_PACKED.
//!
//! `virtio-driver` 0.6.1 starts every vhost-user vring with SET_VRING_BASE 0, which for a
//! packed ring means "slot 0, wrap counter 0" (vhost-user spec; DPDK and Linux vhost read it
//! the same way), while its own ring starts with wrap counter 1 as virtio 1.2 §2.8.1 says.
//! The library's packed rings are only used over VFIO-PCI, where a reset device starts at
//! wrap counter 1. A device that honours the base sees none of the driver's descriptors as
//! available. The tests therefore talk to the daemon through [`Relay`], which forwards the
//! vhost-user stream unchanged except that it turns that one value into 0x8000 (slot 0,
//! wrap counter 1) once RING_PACKED is acked, and counts how often it did.

mod common;

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use virtio_driver::{
    EventFd, QueueNotifier, VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags, VirtioBlkQueue,
    VirtioBlkReqBuf, VirtioBlkTransport, VirtioFeatureFlags,
};

const MIB: u64 = 1 << 20;
/// How long a driver waits for one used-buffer notification before the test fails.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The relay that corrects virtio-driver's packed vring base (see the module docs).

const VHOST_USER_SET_FEATURES: u32 = 2;
const VHOST_USER_SET_VRING_BASE: u32 = 10;
const F_RING_PACKED: u64 = 1 << 34;
/// The vring base of a packed ring that never ran: slot 0, wrap counter 1 (bit 15).
const PACKED_FRESH_BASE: u32 = 0x8000;
/// Most fds one vhost-user message carries (SET_MEM_TABLE: one per region, at most 8).
const MAX_FDS: usize = 8;

/// A vhost-user relay on `<dir>/relay.sock` for one frontend connection to `backend`.
struct Relay {
    path: PathBuf,
    /// SET_VRING_BASE messages whose base 0 was turned into [`PACKED_FRESH_BASE`].
    fixed_bases: Arc<AtomicU32>,
}

impl Relay {
    fn start(backend: PathBuf, dir: &Path, name: &str) -> Relay {
        let path = dir.join(format!("{name}.sock"));
        let listener = UnixListener::bind(&path).expect("bind the relay socket");
        let fixed_bases = Arc::new(AtomicU32::new(0));
        let fixed = fixed_bases.clone();
        // Ends when either side closes (the frontend is dropped, or the daemon exits).
        std::thread::spawn(move || {
            let Ok((fe, _)) = listener.accept() else {
                return;
            };
            let be = UnixStream::connect(&backend).expect("relay: connect to the daemon");
            let (fe2, be2) = (fe.try_clone().unwrap(), be.try_clone().unwrap());
            let replies = std::thread::spawn(move || pump(&be2, &fe2, None));
            pump(&fe, &be, Some(&fixed));
            let _ = replies.join();
        });
        Relay { path, fixed_bases }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn fixed_bases(&self) -> u32 {
        self.fixed_bases.load(Ordering::Relaxed)
    }
}

/// Forwards vhost-user messages (12-byte header, body, fds) from `from` to `to` until
/// either side closes. With `fix`, a SET_VRING_BASE of 0 sent after RING_PACKED was acked
/// becomes [`PACKED_FRESH_BASE`] (counted in `fix`).
fn pump(from: &UnixStream, to: &UnixStream, fix: Option<&AtomicU32>) {
    let mut packed = false;
    loop {
        let mut hdr = [0u8; 12];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let n = match recvmsg(
            from,
            &mut [IoSliceMut::new(&mut hdr)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => m.bytes,
            Err(_) => 0,
        };
        if n == 0 {
            break;
        }
        let mut fds: Vec<OwnedFd> = Vec::new();
        for m in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(it) = m {
                fds.extend(it);
            }
        }
        let mut body_len = [0u8; 4];
        if (&*from).read_exact(&mut hdr[n..]).is_err() {
            break;
        }
        body_len.copy_from_slice(&hdr[8..12]);
        let mut body = vec![0u8; u32::from_le_bytes(body_len) as usize];
        if (&*from).read_exact(&mut body).is_err() {
            break;
        }
        let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        if let Some(count) = fix {
            if code == VHOST_USER_SET_FEATURES && body.len() == 8 {
                packed = u64::from_le_bytes(body[..8].try_into().unwrap()) & F_RING_PACKED != 0;
            }
            if code == VHOST_USER_SET_VRING_BASE
                && packed
                && body.len() == 8
                && body[4..8] == [0, 0, 0, 0]
            {
                body[4..8].copy_from_slice(&PACKED_FRESH_BASE.to_le_bytes());
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        let msg = [&hdr[..], &body[..]].concat();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        if !borrowed.is_empty() {
            assert!(anc.push(SendAncillaryMessage::ScmRights(&borrowed)));
        }
        let sent = match sendmsg(to, &[IoSlice::new(&msg)], &mut anc, SendFlags::NOSIGNAL) {
            Ok(n) => n,
            Err(_) => break,
        };
        if (&*to).write_all(&msg[sent..]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------------------
// A virtio-driver client: packed (or split) rings over vhost-user, data in a memfd.

/// A shared memfd mapping that holds the request buffers (virtio-driver's vhost-user
/// transport hands each mapped region to the device with guest address = process address).
struct Buffers {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

impl Buffers {
    fn new(len: usize) -> Self {
        // Sealed against shrinking, as QEMU's memory-backend-memfd does: the daemon then has
        // no reason to warn about the region (the test asserts a WARN-free log).
        let fd = rustix::fs::memfd_create(
            "vd-buffers",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .expect("memfd_create");
        rustix::fs::ftruncate(&fd, len as u64).expect("ftruncate");
        rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::SHRINK).expect("F_SEAL_SHRINK");
        // SAFETY: a fresh shared mapping of a memfd of `len` bytes; nothing else is mapped
        // at the address the kernel picks.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .expect("mmap the buffers") as *mut u8;
        Self { ptr, len, fd }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no request is in flight once the client is
        // dropped (the queues are dropped first and the tests wait for every completion).
        let _ = unsafe { rustix::mm::munmap(self.ptr as *mut _, self.len) };
    }
}

/// What a client negotiates: virtio-blk bits it needs, plus the ring bits of each test.
fn blk_features(ring: VirtioFeatureFlags) -> u64 {
    let blk = VirtioBlkFeatureFlags::FLUSH
        | VirtioBlkFeatureFlags::MQ
        | VirtioBlkFeatureFlags::DISCARD
        | VirtioBlkFeatureFlags::WRITE_ZEROES
        | VirtioBlkFeatureFlags::BLK_SIZE
        | VirtioBlkFeatureFlags::SEG_MAX
        | VirtioBlkFeatureFlags::SIZE_MAX;
    blk.bits() | (VirtioFeatureFlags::VERSION_1 | ring).bits()
}

/// A connected virtio-driver frontend with its queues started.
struct VdClient {
    // Declared (so dropped) before the transport whose queue memory they point into.
    queues: Vec<VirtioBlkQueue<'static, usize>>,
    kicks: Vec<Box<dyn QueueNotifier>>,
    calls: Vec<Arc<EventFd>>,
    transport: Box<VirtioBlkTransport>,
    bufs: Buffers,
}

impl VdClient {
    /// Connects to `path` accepting `features`, starts `num_queues` rings of `queue_size`
    /// and maps `buf_len` bytes of request buffers; with `used_notif`, asks for used-buffer
    /// notifications through the driver event suppression area (DESC with EVENT_IDX,
    /// ENABLE without), else leaves it at its initial ENABLE.
    fn connect(
        path: &str,
        features: u64,
        num_queues: usize,
        queue_size: u16,
        buf_len: usize,
    ) -> Self {
        let vu = VhostUser::<VirtioBlkConfig, VirtioBlkReqBuf>::new(path, features)
            .expect("virtio-driver: vhost-user connect");
        let mut transport: Box<VirtioBlkTransport> = Box::new(vu);
        let mut queues =
            VirtioBlkQueue::<usize>::setup_queues(&mut *transport, num_queues, queue_size)
                .expect("virtio-driver: set up queues");
        for q in &mut queues {
            q.set_used_notif_enabled(true);
        }
        let bufs = Buffers::new(buf_len);
        transport
            .map_mem_region(bufs.ptr as usize, bufs.len, bufs.fd.as_raw_fd(), 0)
            .expect("virtio-driver: map the buffer region");
        let kicks = (0..num_queues)
            .map(|i| transport.get_submission_notifier(i))
            .collect();
        let calls = (0..num_queues)
            .map(|i| transport.get_completion_fd(i))
            .collect();
        Self {
            queues,
            kicks,
            calls,
            transport,
            bufs,
        }
    }

    fn features(&self) -> u64 {
        self.transport.get_features()
    }

    /// One lane per queue, each with an equal, disjoint share of the buffers.
    fn lanes(&mut self) -> Vec<Lane<'_>> {
        let n = self.queues.len();
        let share = self.bufs.len / n;
        let base = self.bufs.ptr;
        self.queues
            .iter_mut()
            .zip(&self.kicks)
            .zip(&self.calls)
            .enumerate()
            .map(|(i, ((q, kick), call))| Lane {
                q,
                kick: &**kick,
                call,
                bufs: base.wrapping_add(i * share),
                bufs_len: share,
                stats: LaneStats::default(),
            })
            .collect()
    }
}

/// One request for [`Lane::run`].
#[derive(Debug, Clone, Copy)]
enum Req {
    /// Write `len` bytes of `pattern(seed, len)` at `off`.
    Write {
        off: u64,
        len: usize,
        seed: u64,
    },
    /// Read `len` bytes at `off`; expect `pattern(seed, len)`, or zeroes for `None`.
    Read {
        off: u64,
        len: usize,
        seed: Option<u64>,
    },
    Flush,
    Discard {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
    },
}

#[derive(Debug, Default, Clone, Copy)]
struct LaneStats {
    requests: u64,
    /// Kicks sent (the driver's view of the device event suppression area said so).
    kicks: u64,
    /// Times new requests were made available and the device did not want a kick.
    kicks_suppressed: u64,
    /// Used-buffer notifications waited for and received.
    notifications: u64,
    max_in_flight: usize,
}

/// One queue of a [`VdClient`] with its buffers.
struct Lane<'c> {
    q: &'c mut VirtioBlkQueue<'static, usize>,
    kick: &'c dyn QueueNotifier,
    call: &'c EventFd,
    bufs: *mut u8,
    bufs_len: usize,
    stats: LaneStats,
}

// SAFETY: a lane is moved to one thread and used only there; `bufs` points to its own
// part of a mapping that outlives the lane (the client it borrows from owns it).
unsafe impl Send for Lane<'_> {}

/// Waits up to `timeout` for `fd` to become readable.
fn readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let t = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    loop {
        match poll(&mut fds, Some(&t)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => panic!("poll on the completion eventfd: {e}"),
        }
    }
}

impl Lane<'_> {
    /// Runs `ops` with up to `depth` requests in flight (as many as the ring takes at
    /// most), making more available as completions come in, kicking only when the device
    /// asks for it and sleeping on the call eventfd between completions (a notification the
    /// device fails to send fails the test after [`NOTIFY_TIMEOUT`]). Panics on any failed
    /// request or on read data that differs from what `ops` expects.
    fn run(&mut self, what: &str, ops: &[Req], depth: usize, max_len: usize) {
        let slots = (self.bufs_len / max_len).min(depth).max(1);
        let mut free: Vec<usize> = (0..slots).rev().collect();
        let mut slot_of = vec![usize::MAX; ops.len()];
        let (mut next, mut done, mut in_flight) = (0, 0, 0);
        while done < ops.len() {
            let mut queued = 0;
            while next < ops.len() {
                let Some(&slot) = free.last() else {
                    break;
                };
                let buf = self.bufs.wrapping_add(slot * max_len);
                let r = match ops[next] {
                    Req::Write { off, len, seed } => {
                        assert!(len <= max_len);
                        let data = pattern(seed, len);
                        // SAFETY: the slot's `max_len` bytes are inside this lane's part
                        // of the mapping and no request in flight uses them.
                        unsafe {
                            std::ptr::copy_nonoverlapping(data.as_ptr(), buf, len);
                            self.q.write_raw(off, buf, len, next)
                        }
                    }
                    Req::Read { off, len, .. } => {
                        assert!(len <= max_len);
                        // SAFETY: as for the write; the device fills the slot.
                        unsafe {
                            std::ptr::write_bytes(buf, 0x5a, len);
                            self.q.read_raw(off, buf, len, next)
                        }
                    }
                    Req::Flush => self.q.flush(next),
                    Req::Discard { off, len } => self.q.discard(off, len, next),
                    Req::WriteZeroes { off, len } => self.q.write_zeroes(off, len, false, next),
                };
                // An error is "Not enough free descriptors": the ring is full.
                if r.is_err() {
                    break;
                }
                free.pop();
                slot_of[next] = slot;
                next += 1;
                in_flight += 1;
                queued += 1;
            }
            self.stats.max_in_flight = self.stats.max_in_flight.max(in_flight);
            if queued > 0 {
                if self.q.avail_notif_needed() {
                    self.kick.notify().expect("kick");
                    self.stats.kicks += 1;
                } else {
                    self.stats.kicks_suppressed += 1;
                }
            }
            let mut reaped = 0;
            loop {
                let mut batch = Vec::new();
                for c in self.q.completions() {
                    batch.push((c.context, c.ret));
                }
                if batch.is_empty() {
                    // virtio-driver stores its used-event position without a fence before
                    // it looks at the next used descriptor; order the two here (as Linux's
                    // virtqueue_enable_cb does) so a notification the device decided
                    // against is never waited for.
                    fence(Ordering::SeqCst);
                    if !self.q.completions().has_next() {
                        break;
                    }
                    continue;
                }
                for (i, ret) in batch {
                    assert_eq!(ret, 0, "{what}: request {i} ({:?}) failed", ops[i]);
                    if let Req::Read { off, len, seed } = ops[i] {
                        let buf = self.bufs.wrapping_add(slot_of[i] * max_len);
                        // SAFETY: the request completed (virtio-driver read its used
                        // descriptor with acquire ordering); nothing writes the slot now.
                        let got = unsafe { std::slice::from_raw_parts(buf, len) };
                        let ok = match seed {
                            Some(s) => got == &pattern(s, len)[..],
                            None => got.iter().all(|&b| b == 0),
                        };
                        assert!(
                            ok,
                            "{what}: read {i} of {len} bytes at {off:#x} differs from what \
                             was written (expected {})",
                            seed.map_or("zeroes".into(), |s| format!("pattern {s}"))
                        );
                    }
                    free.push(slot_of[i]);
                    done += 1;
                    in_flight -= 1;
                    reaped += 1;
                }
            }
            self.stats.requests += reaped;
            if reaped == 0 && (queued == 0 || next == ops.len()) && done < ops.len() {
                assert!(
                    readable(self.call, NOTIFY_TIMEOUT),
                    "{what}: no used-buffer notification within {NOTIFY_TIMEOUT:?} with \
                     {in_flight} requests in flight ({done} of {} done)",
                    ops.len()
                );
                let _ = self.call.read();
                self.stats.notifications += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Workloads.

/// `n` distinct `bs`-aligned offsets inside `[start, start + span)`, spread out.
fn offsets(seed: u64, n: usize, start: u64, span: u64, bs: u64) -> Vec<u64> {
    let slots = span / bs;
    let slice = slots / n as u64;
    assert!(slice >= 1, "span too small for {n} blocks of {bs}");
    pattern(seed, n * 8)
        .chunks(8)
        .enumerate()
        .map(|(i, c)| {
            let r = u64::from_le_bytes(c.try_into().unwrap());
            start + (i as u64 * slice + r % slice) * bs
        })
        .collect()
}

/// Lengths that vary per request (whole sectors, 512 B to `max`).
fn len_of(i: usize, max: usize) -> usize {
    const LENS: [usize; 7] = [4096, 512, 8192, 1536, 65536, 4096, 12288];
    LENS[i % LENS.len()].min(max)
}

/// Writes then reads back `n` blocks of varying length in `[start, start + span)`.
fn write_then_read(seed: u64, n: usize, start: u64, span: u64, max: usize) -> (Vec<Req>, Vec<Req>) {
    let offs = offsets(seed, n, start, span, max.next_power_of_two() as u64);
    let writes = offs
        .iter()
        .enumerate()
        .map(|(i, &off)| Req::Write {
            off,
            len: len_of(i, max),
            seed: seed * 1_000_003 + i as u64,
        })
        .collect();
    let reads = offs
        .iter()
        .enumerate()
        .map(|(i, &off)| Req::Read {
            off,
            len: len_of(i, max),
            seed: Some(seed * 1_000_003 + i as u64),
        })
        .collect();
    (writes, reads)
}

/// Writes a pattern over `[off, off + 2 * chunk)`, flushes, discards the first half and
/// write-zeroes the second (interleaved with flushes), then reads both back as zeroes.
fn zeroing(lane: &mut Lane<'_>, what: &str, off: u64, chunk: usize, depth: usize) {
    let c = chunk as u64;
    lane.run(
        what,
        &[
            Req::Write {
                off,
                len: chunk,
                seed: 77,
            },
            Req::Write {
                off: off + c,
                len: chunk,
                seed: 78,
            },
            Req::Flush,
        ],
        depth,
        chunk,
    );
    lane.run(
        what,
        &[
            Req::Read {
                off,
                len: chunk,
                seed: Some(77),
            },
            Req::Discard { off, len: c },
            Req::Flush,
            Req::WriteZeroes {
                off: off + c,
                len: c,
            },
            Req::Flush,
        ],
        1,
        chunk,
    );
    lane.run(
        what,
        &[
            Req::Read {
                off,
                len: chunk,
                seed: None,
            },
            Req::Read {
                off: off + c,
                len: chunk,
                seed: None,
            },
        ],
        depth,
        chunk,
    );
}

/// Negotiated feature names from `uvdpa -j dev show NAME` (the session must be live).
fn negotiated(d: &Daemon, name: &str) -> Vec<String> {
    let show = d.cli_json(&["dev", "show", name]);
    let dev = &show["dev"][0];
    assert_eq!(dev["state"], "live", "{show}");
    dev["features"]
        .as_array()
        .unwrap_or_else(|| panic!("no features in {show}"))
        .iter()
        .map(|f| f.as_str().unwrap_or_default().to_string())
        .collect()
}

/// Descriptor slots a list of ops takes in virtio-driver's ring (header, data, status;
/// discard/write-zeroes: header, segment, status; flush: header, status).
fn slots(ops: &[Req]) -> usize {
    ops.iter()
        .map(|op| match op {
            Req::Flush => 2,
            _ => 3,
        })
        .sum()
}

// ---------------------------------------------------------------------------------------
// virtio-driver over packed rings.

#[test]
fn virtio_driver_packed_ring_with_event_idx_qd1_and_full_ring() {
    let t0 = Instant::now();
    let d = Daemon::start(
        "vdp1",
        &blk_config("p1", "backend = \"ram\"\nsize = \"128M\""),
        &["p1"],
    );
    let relay = Relay::start(d.sock("p1"), &d.dir, "relay");
    let size: u16 = 64;
    let mut c = VdClient::connect(
        relay.path(),
        blk_features(VirtioFeatureFlags::RING_PACKED | VirtioFeatureFlags::RING_EVENT_IDX),
        1,
        size,
        8 * MIB as usize,
    );
    let f = VirtioFeatureFlags::from_bits_truncate(c.features());
    assert!(
        f.contains(VirtioFeatureFlags::RING_PACKED | VirtioFeatureFlags::RING_EVENT_IDX),
        "virtio-driver did not negotiate RING_PACKED | EVENT_IDX: {f:?}"
    );
    assert_eq!(relay.fixed_bases(), 1, "one vring base corrected");
    let names = negotiated(&d, "p1");
    for want in [
        "VIRTIO_F_RING_PACKED",
        "VIRTIO_RING_F_EVENT_IDX",
        "VIRTIO_F_VERSION_1",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    let mut lanes = c.lanes();
    let lane = &mut lanes[0];
    let (mut total, mut descs) = (0, 0);
    // Queue depth 1: each request alone on the ring; 3-descriptor chains on a 64-slot ring
    // straddle the ring end every few laps.
    let (w, r) = write_then_read(1, 150, 0, 16 * MIB, 65536);
    lane.run("qd1 writes", &w, 1, 65536);
    lane.run("qd1 reads", &r, 1, 65536);
    total += w.len() + r.len();
    descs += slots(&w) + slots(&r);
    assert_eq!(lane.stats.max_in_flight, 1);
    // As many in flight as the ring holds (64 / 3 = 21 chains), refilled as they complete:
    // 2000 requests, 6000 descriptor slots, about 94 laps.
    let (w, r) = write_then_read(2, 1000, 16 * MIB, 96 * MIB, 65536);
    let full_ring_writes = w.clone();
    lane.run("full-ring writes", &w, usize::MAX, 65536);
    lane.run("full-ring reads", &r, usize::MAX, 65536);
    total += w.len() + r.len();
    descs += slots(&w) + slots(&r);
    assert_eq!(
        lane.stats.max_in_flight,
        usize::from(size) / 3,
        "the ring was never full"
    );
    // Reads and writes of other blocks in flight together.
    let (w2, _) = write_then_read(3, 200, 0, 16 * MIB, 65536);
    let mixed: Vec<Req> = w2.iter().zip(&r).flat_map(|(a, b)| [*a, *b]).collect();
    lane.run("mixed", &mixed, usize::MAX, 65536);
    total += mixed.len();
    descs += slots(&mixed);
    zeroing(
        lane,
        "flush/discard/write-zeroes",
        120 * MIB,
        65536,
        usize::MAX,
    );
    total += 10;
    descs += 3 * 3 + 3 * 2 + 3 * 3 + 2 * 3;
    let laps = descs / usize::from(size);
    let stats = lane.stats;
    drop(lanes);

    assert!(laps > 100, "{laps} laps");
    let vs = d.vstats("p1", 0);
    assert_eq!(vs["requests"], total as u64, "{vs}");
    assert_eq!(vs["errors"], 0, "{vs}");
    let log = d.log_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
    eprintln!(
        "packed ring of {size}, EVENT_IDX: {total} requests, ~{laps} laps, driver {stats:?}, \
         device {vs}, {:?}",
        t0.elapsed()
    );
    drop(c);

    // The next frontend may use the other layout: libblkio (split rings) reads what went
    // over the packed ring and writes more; then a new packed session reads that back.
    wait_ready(&d, "p1");
    let mut b = BlkClient::connect(&d.sock_str("p1"), 1, 65536).unwrap();
    assert!(
        !negotiated(&d, "p1")
            .iter()
            .any(|n| n == "VIRTIO_F_RING_PACKED"),
        "libblkio negotiated a packed ring"
    );
    for op in &full_ring_writes[..8] {
        let Req::Write { off, len, seed } = *op else {
            unreachable!()
        };
        let read = common::Op::Read {
            offset: off,
            buf_off: 0,
            len,
        };
        assert_eq!(b.run(0, &[read]), vec![0]);
        assert!(
            b.buf()[..len] == pattern(seed, len)[..],
            "split ring read of {off:#x} written over the packed ring"
        );
    }
    b.buf()[..4096].copy_from_slice(&pattern(500, 4096));
    let write = common::Op::Write {
        offset: 124 * MIB,
        buf_off: 0,
        len: 4096,
    };
    assert_eq!(b.run(0, &[write]), vec![0]);
    drop(b);
    wait_ready(&d, "p1");
    let relay = Relay::start(d.sock("p1"), &d.dir, "relay2");
    let mut c = VdClient::connect(
        relay.path(),
        blk_features(VirtioFeatureFlags::RING_PACKED | VirtioFeatureFlags::RING_EVENT_IDX),
        1,
        size,
        MIB as usize,
    );
    assert!(negotiated(&d, "p1")
        .iter()
        .any(|n| n == "VIRTIO_F_RING_PACKED"));
    let back = [
        Req::Read {
            off: 124 * MIB,
            len: 4096,
            seed: Some(500),
        },
        full_ring_writes[9],
    ];
    let back = back.map(|op| match op {
        Req::Write { off, len, seed } => Req::Read {
            off,
            len,
            seed: Some(seed),
        },
        op => op,
    });
    c.lanes()[0].run(
        "packed again after a split session",
        &back,
        usize::MAX,
        65536,
    );
    drop(c);
    assert!(d.stop().success());
}

/// Waits (bounded) until device `name` has no frontend.
fn wait_ready(d: &Daemon, name: &str) {
    let t0 = Instant::now();
    loop {
        let show = d.cli_json(&["dev", "show", name]);
        if show["dev"][0]["state"] == "ready" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the frontend did not go: {show}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn virtio_driver_packed_rings_without_event_idx_two_queues_at_once() {
    let t0 = Instant::now();
    let d = Daemon::start(
        "vdp2",
        &blk_config(
            "p2",
            "backend = \"ram\"\nsize = \"128M\"\nqueues = 2\nqueue_size = 128",
        ),
        &["p2"],
    );
    let relay = Relay::start(d.sock("p2"), &d.dir, "relay");
    let mut c = VdClient::connect(
        relay.path(),
        blk_features(VirtioFeatureFlags::RING_PACKED),
        2,
        128,
        16 * MIB as usize,
    );
    let f = VirtioFeatureFlags::from_bits_truncate(c.features());
    assert!(f.contains(VirtioFeatureFlags::RING_PACKED));
    assert!(!f.contains(VirtioFeatureFlags::RING_EVENT_IDX));
    assert_eq!(relay.fixed_bases(), 2, "one vring base corrected per queue");
    let names = negotiated(&d, "p2");
    assert!(
        names.iter().any(|n| n == "VIRTIO_F_RING_PACKED"),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n == "VIRTIO_RING_F_EVENT_IDX"),
        "{names:?}"
    );

    // Each queue owns half of the disk; both run at the same time from two threads.
    let lanes = c.lanes();
    let stats: Vec<(usize, LaneStats)> = std::thread::scope(|s| {
        let threads: Vec<_> = lanes
            .into_iter()
            .enumerate()
            .map(|(qi, mut lane)| {
                s.spawn(move || {
                    let start = qi as u64 * 64 * MIB;
                    let what = format!("queue {qi}");
                    let mut n = 0;
                    let (w, r) = write_then_read(10 + qi as u64, 60, start, 8 * MIB, 65536);
                    lane.run(&format!("{what} qd1 writes"), &w, 1, 65536);
                    lane.run(&format!("{what} qd1 reads"), &r, 1, 65536);
                    n += w.len() + r.len();
                    let (w, r) =
                        write_then_read(20 + qi as u64, 800, start + 8 * MIB, 52 * MIB, 65536);
                    lane.run(&format!("{what} deep writes"), &w, usize::MAX, 65536);
                    lane.run(&format!("{what} deep reads"), &r, usize::MAX, 65536);
                    n += w.len() + r.len();
                    assert_eq!(lane.stats.max_in_flight, 128 / 3, "{what}: ring never full");
                    zeroing(&mut lane, &what, start + 62 * MIB, 65536, usize::MAX);
                    n += 10;
                    (n, lane.stats)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (qi, (n, st)) in stats.iter().enumerate() {
        let vs = d.vstats("p2", qi);
        assert_eq!(vs["requests"], *n as u64, "queue {qi}: {vs}");
        assert_eq!(vs["errors"], 0, "queue {qi}: {vs}");
        // Without EVENT_IDX the driver's ENABLE asks for a notification after every batch.
        assert_eq!(vs["calls_suppressed"], 0, "queue {qi}: {vs}");
        eprintln!("queue {qi}: {n} requests, driver {st:?}, device {vs}");
    }
    eprintln!("two packed queues without EVENT_IDX: {:?}", t0.elapsed());
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn virtio_driver_packed_ring_with_a_busy_polling_worker() {
    // The worker polls for 5 ms after its ring runs empty, with kicks disabled in the
    // device event suppression area, then re-arms it (DESC at its next avail position) and
    // sleeps. At queue depth 1 most requests must be found without a kick.
    let t0 = Instant::now();
    let d = Daemon::start(
        "vdp3",
        &blk_config("p3", "backend = \"ram\"\nsize = \"16M\"\npoll_us = 5000"),
        &["p3"],
    );
    let relay = Relay::start(d.sock("p3"), &d.dir, "relay");
    let mut c = VdClient::connect(
        relay.path(),
        blk_features(VirtioFeatureFlags::RING_PACKED | VirtioFeatureFlags::RING_EVENT_IDX),
        1,
        256,
        4 * MIB as usize,
    );
    assert_eq!(relay.fixed_bases(), 1);
    assert!(negotiated(&d, "p3")
        .iter()
        .any(|n| n == "VIRTIO_F_RING_PACKED"));
    let mut lanes = c.lanes();
    let lane = &mut lanes[0];
    let (w, r) = write_then_read(30, 300, 0, 16 * MIB, 4096);
    lane.run("polled qd1 writes", &w, 1, 4096);
    lane.run("polled qd1 reads", &r, 1, 4096);
    let (w, r) = write_then_read(31, 600, 0, 16 * MIB, 4096);
    lane.run("polled deep writes", &w, usize::MAX, 4096);
    lane.run("polled deep reads", &r, usize::MAX, 4096);
    let stats = lane.stats;
    drop(lanes);
    let vs = d.vstats("p3", 0);
    assert_eq!(vs["requests"], 1800, "{vs}");
    assert_eq!(vs["errors"], 0, "{vs}");
    assert!(
        stats.kicks_suppressed > 0 && stats.kicks < stats.requests,
        "the polling device never suppressed a kick: driver {stats:?}, device {vs}"
    );
    eprintln!(
        "polling worker: driver {stats:?}, device {vs}, {:?}",
        t0.elapsed()
    );
    drop(c);
    assert!(d.stop().success());
}

// ---------------------------------------------------------------------------------------
// A Linux guest with packed=on.

/// The guest's virtio feature bit string (sysfs `features`, bit 0 first) from its
/// `uvdpa-guest: disk ... features=...` line.
fn guest_feature_bit(line: &str, bit: usize) -> Option<bool> {
    let bits = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("features="))?;
    bits.as_bytes().get(bit).map(|&b| b == b'1')
}

#[test]
fn linux_guest_verifies_over_packed_rings() {
    use std::io::BufRead;
    let t0 = Instant::now();
    let d = Daemon::start(
        "gpk",
        &blk_config("gp", "backend = \"ram\"\nsize = \"128M\""),
        &["gp"],
    );
    build_initramfs();
    let mut child = Command::new("bash")
        .arg(guest_dir().join("run-guest.sh"))
        .args(["--vhost-user-blk", &d.sock_str("gp"), "--packed"])
        .args(["--mode", "verify", "--count", "100", "--timeout", "55"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run run-guest.sh");
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut console = String::new();
    let mut live_features: Option<Vec<String>> = None;
    let mut guest_packed = None;
    for line in lines.map_while(Result::ok) {
        console.push_str(&line);
        console.push('\n');
        if line.contains("uvdpa-guest: disk") && line.contains("features=") {
            // The guest driver is up and about to write: the session is live.
            guest_packed = guest_feature_bit(&line, 34);
            live_features = Some(negotiated(&d, "gp"));
        }
    }
    let status = child.wait().unwrap();
    let result = console
        .lines()
        .find(|l| l.contains("UVDPA-GUEST-RESULT:"))
        .unwrap_or("")
        .to_string();
    assert!(
        status.success() && result.contains("PASS"),
        "guest failed ({status}): {result}\n{console}\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(result.contains("offsets=100"), "{result}");
    assert_eq!(
        guest_packed,
        Some(true),
        "the guest driver did not negotiate VIRTIO_F_RING_PACKED (bit 34):\n{console}"
    );
    let names = live_features.expect("no disk line from the guest");
    assert!(
        names.iter().any(|n| n == "VIRTIO_F_RING_PACKED"),
        "dev show while the guest ran: {names:?}"
    );
    // 100 O_DIRECT writes and 100 reads, each at least one slot of the 128-slot ring
    // (Linux puts a multi-buffer request in one indirect descriptor): the ring wrapped.
    let requests = d.vstats("gp", 0)["requests"].as_u64().unwrap_or(0);
    assert!(
        requests >= 200,
        "the guest's I/O did not reach the device: {requests} requests"
    );
    eprintln!(
        "guest over packed rings: {result} ({requests} requests, {:?})",
        t0.elapsed()
    );
    assert!(d.stop().success());
}
