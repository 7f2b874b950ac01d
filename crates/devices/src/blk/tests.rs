//! Device-level tests: requests built in real guest memory (`MemoryRegion::anonymous`),
//! handed to the device as descriptor chains, results read back from guest memory.
//!
//! The request tests run twice: with chains built directly from the buffers, and (module
//! [`packed_ring`]) with every request made available on a packed virtqueue and taken off
//! it by the device side of the ring, as the queue worker does.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use uvdpa_virtio::packed::testing::DriverQueue as PackedDriverQueue;
use uvdpa_virtio::split::testing::DriverQueue;
use uvdpa_virtio::worker::QueueHandler;
use uvdpa_virtio::{
    DescriptorChain, GuestMemory, MemoryRegion, Segment, SplitQueue, Virtqueue, VringConfig,
};

use super::*;

const KIB: usize = 1024;
/// Byte the device must not have written: writable buffers start filled with it.
const UNTOUCHED: u8 = 0xee;

// ---------------------------------------------------------------------------------------
// Test frontend: guest memory, request building, backing files.

/// Guest memory with a bump allocator for request buffers.
struct Guest {
    mem: Arc<GuestMemory>,
    next: u64,
    size: u64,
}

impl Guest {
    fn new() -> Self {
        Self::with_size(16 << 20)
    }

    fn with_size(size: u64) -> Self {
        let mem = GuestMemory::new(vec![MemoryRegion::anonymous(0, size).unwrap()]).unwrap();
        Self {
            mem: Arc::new(mem),
            // Leave the first pages to rings placed by DriverQueue.
            next: 0x10000,
            size,
        }
    }

    /// Allocates `len` bytes at an address congruent to `misalign` modulo 4096.
    fn alloc(&mut self, len: usize, misalign: u64) -> u64 {
        let at = ((self.next + 4095) & !4095) + misalign;
        self.next = at + len as u64;
        assert!(self.next <= self.size, "test guest memory exhausted");
        at
    }

    fn seg(&self, gpa: u64, len: usize) -> Segment {
        Segment {
            base: self.mem.translate(gpa, len as u64).unwrap(),
            len,
        }
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read(gpa, &mut b).unwrap();
        b
    }
}

/// A built request: its chain and where its writable buffers are.
struct Io {
    chain: DescriptorChain,
    readable: Vec<(u64, usize)>,
    writable: Vec<(u64, usize)>,
    /// The guest memory the buffers are in.
    mem: Arc<GuestMemory>,
}

impl Io {
    fn written(&self, g: &Guest) -> Vec<u8> {
        self.writable
            .iter()
            .flat_map(|&(gpa, len)| g.read(gpa, len))
            .collect()
    }

    fn status(&self, g: &Guest) -> u8 {
        *self.written(g).last().unwrap()
    }

    /// The writable bytes before the status byte.
    fn data(&self, g: &Guest) -> Vec<u8> {
        let mut w = self.written(g);
        w.pop();
        w
    }
}

/// Builds a chain from readable pieces (copied into guest memory) and writable buffer
/// lengths (filled with [`UNTOUCHED`]). `misalign` offsets every buffer from a page.
fn build_at(g: &mut Guest, readable: &[&[u8]], writable: &[usize], misalign: u64) -> Io {
    let mut r = vec![];
    let mut rs = vec![];
    for piece in readable {
        let gpa = g.alloc(piece.len(), misalign);
        g.mem.write(gpa, piece).unwrap();
        r.push((gpa, piece.len()));
        rs.push(g.seg(gpa, piece.len()));
    }
    let mut w = vec![];
    let mut ws = vec![];
    for &len in writable {
        let gpa = g.alloc(len, misalign);
        g.mem.write(gpa, &vec![UNTOUCHED; len]).unwrap();
        w.push((gpa, len));
        ws.push(g.seg(gpa, len));
    }
    Io {
        // SAFETY: the segments point into guest memory owned by this fixture.
        chain: unsafe { DescriptorChain::from_segments(0, rs, ws) },
        readable: r,
        writable: w,
        mem: g.mem.clone(),
    }
}

fn build(g: &mut Guest, readable: &[&[u8]], writable: &[usize]) -> Io {
    build_at(g, readable, writable, 0)
}

fn header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // reserved: ignored
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Splits `len` into `pieces` uneven, mostly non-sector-aligned lengths summing to `len`.
fn split(len: usize, pieces: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (1..pieces)
        .map(|k| (len * k / pieces + k * 37) % (len + 1))
        .collect();
    cuts.sort_unstable();
    let mut out = vec![];
    let mut prev = 0;
    for c in cuts.into_iter().chain([len]) {
        out.push(c - prev);
        prev = c;
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn discard_segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}

/// A backing file in the temp dir, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, len: u64) -> Self {
        // Unique per call: a test and its packed-ring twin may run at the same time.
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("uvdpa-blk-{}-{n}-{name}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn config(backend: BackendSpec) -> BlkConfig {
    BlkConfig {
        backend,
        read_only: false,
        num_queues: 2,
        queue_size: 256,
        serial: "uvdpa-test".into(),
        logical_block_size: 512,
    }
}

fn ram(size: u64) -> BlkDevice {
    BlkDevice::new(config(BackendSpec::Ram { size })).unwrap()
}

fn file(path: &Path, direct: bool) -> BlkDevice {
    BlkDevice::new(config(BackendSpec::File {
        path: path.to_path_buf(),
        direct,
        aio: Aio::Sync,
    }))
    .unwrap()
}

/// A device with one queue handler that negotiated every offered feature.
struct Disk {
    dev: BlkDevice,
    q: Box<dyn QueueHandler>,
    /// The packed ring requests go through, under [`over_packed_ring`] (made on first use,
    /// in the memory of the request's guest).
    ring: Option<PackedRing>,
}

thread_local! {
    /// Whether [`Disk::run`] passes requests through a packed ring (this thread's test).
    static OVER_PACKED_RING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `test` with every request of its [`Disk`]s going through a packed ring.
fn over_packed_ring(test: fn()) {
    OVER_PACKED_RING.with(|p| p.set(true));
    test();
}

/// Slots of the packed ring of [`Disk::run`]: not a power of two (packed rings need not
/// be), small so that rings wrap and chains straddle the ring end often, and enough for
/// the longest chain of the tests that use it.
const PACKED_RING_SIZE: u16 = 19;

/// A packed virtqueue in guest memory (ring at 0x1000, indirect tables at 0x2000, both in
/// the pages [`Guest`] leaves free), driver and device side. It starts two slots before the
/// ring end (a vring base of `0x8000 | 17`), so the first chain of three or more
/// descriptors already crosses the end, where the wrap counter toggles.
struct PackedRing {
    dq: PackedDriverQueue,
    q: Virtqueue,
    chain: DescriptorChain,
    requests: u64,
}

impl PackedRing {
    fn new(mem: Arc<GuestMemory>) -> Self {
        let mut dq = PackedDriverQueue::new(mem.clone(), 0x1000, PACKED_RING_SIZE);
        let start = PACKED_RING_SIZE - 2;
        (dq.next_avail, dq.next_used) = (start, start);
        let cfg = VringConfig {
            next_avail: dq.avail_base(),
            ..dq.config(true, true)
        };
        let q = Virtqueue::new(&cfg, mem, true).unwrap();
        Self {
            dq,
            q,
            chain: DescriptorChain::default(),
            requests: 0,
        }
    }

    /// Makes `io` available (every third request as an indirect table), has the device pop
    /// it and `h` handle it, publishes the used descriptor and checks what the driver sees.
    /// Returns the used length.
    fn run(&mut self, h: &mut dyn QueueHandler, io: &Io) -> u32 {
        let mut bufs: Vec<(u64, u32, bool)> = io
            .readable
            .iter()
            .map(|&(gpa, len)| (gpa, len as u32, false))
            .chain(
                io.writable
                    .iter()
                    .map(|&(gpa, len)| (gpa, len as u32, true)),
            )
            .collect();
        if bufs.is_empty() {
            // A ring chain has at least one descriptor: an empty readable one is the same
            // request (no header, no status byte).
            bufs.push((0x10000, 0, false));
        }
        assert!(
            bufs.len() <= usize::from(PACKED_RING_SIZE),
            "a chain of {} buffers does not fit the test's packed ring",
            bufs.len()
        );
        let id = if self.requests % 3 == 2 {
            self.dq.add_indirect(0x2000, &bufs)
        } else {
            self.dq.add_chain(&bufs)
        };
        self.requests += 1;
        assert!(self.q.has_available().unwrap());
        assert!(self.q.pop(&mut self.chain).unwrap(), "chain not available");
        assert_eq!(self.chain.head(), id, "buffer id");
        let sum = |v: &[(u64, usize)]| v.iter().map(|&(_, l)| l as u32).sum::<u32>();
        assert_eq!(self.chain.readable_len(), sum(&io.readable));
        assert_eq!(self.chain.writable_len(), sum(&io.writable));
        assert!(
            !self.q.pop(&mut self.chain).unwrap(),
            "one chain per request"
        );
        let len = h.handle(&self.chain).unwrap();
        h.end_batch().unwrap();
        self.q.add_used(&self.chain, len);
        self.q.publish_used();
        assert!(
            self.q.needs_notification(),
            "the driver asked for every one"
        );
        assert_eq!(self.dq.pop_used(), Some((id, len)), "used descriptor");
        assert_eq!(
            self.q.next_avail(),
            self.dq.avail_base(),
            "device and driver agree"
        );
        len
    }
}

impl Disk {
    fn new(dev: BlkDevice) -> Self {
        let q = dev.queue_handler(0, dev.features()).unwrap();
        Self { dev, q, ring: None }
    }

    fn run(&mut self, io: &Io) -> u32 {
        if !OVER_PACKED_RING.with(Cell::get) {
            return self.q.handle(&io.chain).unwrap();
        }
        let ring = match &mut self.ring {
            Some(r) if Arc::ptr_eq(&r.dq.mem, &io.mem) => r,
            slot => slot.insert(PackedRing::new(io.mem.clone())),
        };
        ring.run(&mut *self.q, io)
    }

    /// Writes `data` at `sector` from `pieces` guest buffers; returns (status, used len).
    fn write(&mut self, g: &mut Guest, sector: u64, data: &[u8], pieces: usize) -> (u8, u32) {
        let hdr = header(VIRTIO_BLK_T_OUT, sector);
        let mut readable: Vec<&[u8]> = vec![&hdr];
        let mut rest = data;
        for len in split(data.len(), pieces) {
            let (piece, tail) = rest.split_at(len);
            readable.push(piece);
            rest = tail;
        }
        let io = build(g, &readable, &[1]);
        let used = self.run(&io);
        (io.status(g), used)
    }

    /// Reads `len` bytes at `sector` into `pieces` guest buffers (the status byte shares
    /// the last one); returns (status, used len, data).
    fn read(
        &mut self,
        g: &mut Guest,
        sector: u64,
        len: usize,
        pieces: usize,
    ) -> (u8, u32, Vec<u8>) {
        let mut w = split(len, pieces);
        *w.last_mut().unwrap() += 1;
        let io = build(g, &[&header(VIRTIO_BLK_T_IN, sector)], &w);
        let used = self.run(&io);
        (io.status(g), used, io.data(g))
    }

    /// Runs a request with a bare header (and optional readable payload) and a 1-byte
    /// status buffer; returns (status, used len).
    fn command(&mut self, g: &mut Guest, ty: u32, payload: &[&[u8]]) -> (u8, u32) {
        let hdr = header(ty, 0);
        let mut readable: Vec<&[u8]> = vec![&hdr];
        readable.extend_from_slice(payload);
        let io = build(g, &readable, &[1]);
        let used = self.run(&io);
        (io.status(g), used)
    }
}

// ---------------------------------------------------------------------------------------
// Device identity: config space and features.

#[test]
fn config_space_reports_the_device() {
    let dev = BlkDevice::new(BlkConfig {
        num_queues: 4,
        logical_block_size: 4096,
        ..config(BackendSpec::Ram { size: 1 << 20 })
    })
    .unwrap();
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.num_queues(), 4);
    assert_eq!(dev.queue_size(), 256);
    assert_eq!(dev.capacity_bytes(), 1 << 20);
    let raw = dev.config();
    assert_eq!(raw.len(), 60);
    let c = VirtioBlkConfig::from_le_bytes(&raw).unwrap();
    assert_eq!(c, dev.config_space());
    assert_eq!({ c.capacity }, 2048);
    assert_eq!(&raw[..8], &2048u64.to_le_bytes());
    assert_eq!({ c.size_max }, SIZE_MAX);
    assert_eq!({ c.seg_max }, 254);
    assert_eq!({ c.blk_size }, 4096);
    assert_eq!(&raw[20..24], &4096u32.to_le_bytes());
    assert_eq!({ c.topology.min_io_size }, 1);
    assert_eq!(c.writeback, 1);
    assert_eq!({ c.num_queues }, 4);
    assert_eq!(&raw[34..36], &4u16.to_le_bytes());
    assert_eq!({ c.max_discard_sectors }, MAX_ZERO_SECTORS);
    assert_eq!({ c.max_discard_seg }, MAX_ZERO_SEGMENTS);
    assert_eq!({ c.discard_sector_alignment }, 8);
    assert_eq!({ c.max_write_zeroes_sectors }, MAX_ZERO_SECTORS);
    assert_eq!({ c.max_write_zeroes_seg }, MAX_ZERO_SEGMENTS);
    assert_eq!(c.write_zeroes_may_unmap, 1);
    // The config space is read-only.
    assert!(dev.write_config(32, &[0]).is_err());
}

#[test]
fn features_depend_on_read_only() {
    let blk = |f: VirtioFeatures| BlkFeatures::from_bits_truncate(f.bits());
    let common = VirtioFeatures::VIRTIO_F_VERSION_1
        | VirtioFeatures::VIRTIO_RING_F_INDIRECT_DESC
        | VirtioFeatures::VIRTIO_RING_F_EVENT_IDX
        | VirtioFeatures::VIRTIO_F_RING_PACKED
        | VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES;
    let base = BlkFeatures::VIRTIO_BLK_F_SIZE_MAX
        | BlkFeatures::VIRTIO_BLK_F_SEG_MAX
        | BlkFeatures::VIRTIO_BLK_F_BLK_SIZE
        | BlkFeatures::VIRTIO_BLK_F_FLUSH
        | BlkFeatures::VIRTIO_BLK_F_TOPOLOGY
        | BlkFeatures::VIRTIO_BLK_F_MQ;

    let rw = ram(1 << 20).features();
    assert!(rw.contains(common));
    assert_eq!(
        blk(rw),
        base | BlkFeatures::VIRTIO_BLK_F_DISCARD | BlkFeatures::VIRTIO_BLK_F_WRITE_ZEROES
    );
    assert_eq!(rw.bits() & !(common.bits() | blk(rw).bits()), 0);

    let ro = BlkDevice::new(BlkConfig {
        read_only: true,
        ..config(BackendSpec::Ram { size: 1 << 20 })
    })
    .unwrap()
    .features();
    assert!(ro.contains(common));
    assert_eq!(blk(ro), base | BlkFeatures::VIRTIO_BLK_F_RO);
    assert_eq!(
        VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES.bits(),
        1 << 30
    );
}

// ---------------------------------------------------------------------------------------
// Reads and writes.

#[test]
fn ram_write_then_read_back_across_segments() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(4 << 20));
    let data = random_bytes(64 * KIB, 1);
    assert_eq!(d.write(&mut g, 8, &data, 5), (VIRTIO_BLK_S_OK, 1));
    let (status, used, back) = d.read(&mut g, 8, data.len(), 7);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(used as usize, data.len() + 1);
    assert_eq!(back, data);
    // A read straddling the written range sees zeroes around it.
    let (status, _, back) = d.read(&mut g, 6, data.len() + 2048, 3);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(&back[..1024], &[0u8; 1024][..]);
    assert_eq!(&back[1024..1024 + data.len()], &data[..]);
    assert_eq!(&back[1024 + data.len()..], &[0u8; 1024][..]);
    // The last sector of the disk is reachable.
    let last = (4 << 20) / 512 - 1;
    assert_eq!(d.write(&mut g, last, &[7u8; 512], 1).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.read(&mut g, last, 512, 2).2, vec![7u8; 512]);
}

#[test]
fn zero_length_read_and_write_succeed() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    assert_eq!(d.write(&mut g, 0, &[], 1), (VIRTIO_BLK_S_OK, 1));
    let (status, used, data) = d.read(&mut g, 2048, 0, 1);
    assert_eq!((status, used, data.len()), (VIRTIO_BLK_S_OK, 1, 0));
}

#[test]
fn ram_data_survives_new_queue_handlers() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    let data = random_bytes(4096, 2);
    assert_eq!(d.write(&mut g, 100, &data, 2).0, VIRTIO_BLK_S_OK);
    // A frontend reconnect drops the handlers and asks for new ones.
    let dev = d.dev;
    let mut d = Disk::new(dev);
    assert_eq!(d.read(&mut g, 100, 4096, 3).2, data);
}

#[test]
fn file_write_then_read_back_and_reach_the_file() {
    let f = TempFile::new("rw", 1 << 20);
    let mut g = Guest::new();
    let mut d = Disk::new(file(f.path(), false));
    assert_eq!(d.dev.capacity_bytes(), 1 << 20);
    let data = random_bytes(96 * KIB, 3);
    assert_eq!(d.write(&mut g, 16, &data, 9), (VIRTIO_BLK_S_OK, 1));
    let (status, used, back) = d.read(&mut g, 16, data.len(), 4);
    assert_eq!((status, used as usize), (VIRTIO_BLK_S_OK, data.len() + 1));
    assert_eq!(back, data);
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_FLUSH, &[]),
        (VIRTIO_BLK_S_OK, 1)
    );
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[16 * 512..16 * 512 + data.len()], &data[..]);
}

#[test]
fn file_reads_and_writes_use_many_iovecs() {
    // More segments than one preadv/pwritev takes (IOV_MAX = 1024).
    let f = TempFile::new("iovmax", 4 << 20);
    let mut g = Guest::new();
    let mut d = Disk::new(file(f.path(), false));
    let data = random_bytes(1500 * 512, 4);
    assert_eq!(d.write(&mut g, 0, &data, 1500).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.read(&mut g, 0, data.len(), 1300).2, data);
}

#[test]
fn file_direct_io_with_aligned_and_unaligned_buffers() {
    let f = TempFile::new("direct", 8 << 20);
    let dev = match BlkDevice::new(BlkConfig {
        logical_block_size: 4096,
        ..config(BackendSpec::File {
            path: f.path().to_path_buf(),
            direct: true,
            aio: Aio::Sync,
        })
    }) {
        Ok(dev) => dev,
        Err(BlkError::OpenFile { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("skipped: the temp dir does not support O_DIRECT");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut g = Guest::new();
    let mut d = Disk::new(dev);

    // Page-aligned guest buffers go straight to the file.
    let aligned = random_bytes(64 * KIB, 5);
    let hdr = header(VIRTIO_BLK_T_OUT, 8);
    let io = build(
        &mut g,
        &[&hdr, &aligned[..32 * KIB], &aligned[32 * KIB..]],
        &[1],
    );
    assert_eq!(d.run(&io), 1);
    assert_eq!(io.status(&g), VIRTIO_BLK_S_OK);
    let io = build(
        &mut g,
        &[&header(VIRTIO_BLK_T_IN, 8)],
        &[16 * KIB, 48 * KIB, 1],
    );
    assert_eq!(d.run(&io) as usize, 64 * KIB + 1);
    assert_eq!(io.data(&g), aligned);

    // Unaligned buffers (odd addresses and lengths) go through the bounce buffer, in
    // several chunks for a request larger than it.
    let big = random_bytes(2 * 1024 * KIB + 4 * KIB, 6);
    let hdr = header(VIRTIO_BLK_T_OUT, 1024);
    let mut readable: Vec<&[u8]> = vec![&hdr];
    let mut rest = &big[..];
    for len in split(big.len(), 5) {
        let (piece, tail) = rest.split_at(len);
        readable.push(piece);
        rest = tail;
    }
    let io = build_at(&mut g, &readable, &[1], 3);
    assert_eq!(d.run(&io), 1);
    assert_eq!(io.status(&g), VIRTIO_BLK_S_OK);
    let mut w = split(big.len(), 6);
    *w.last_mut().unwrap() += 1;
    let io = build_at(&mut g, &[&header(VIRTIO_BLK_T_IN, 1024)], &w, 5);
    assert_eq!(d.run(&io) as usize, big.len() + 1);
    assert_eq!(io.status(&g), VIRTIO_BLK_S_OK);
    assert_eq!(io.data(&g), big);

    // What one path wrote, the other reads.
    let io = build_at(&mut g, &[&header(VIRTIO_BLK_T_IN, 8)], &[64 * KIB + 1], 1);
    d.run(&io);
    assert_eq!(io.data(&g), aligned);
    assert_eq!(d.read(&mut g, 1024, 4096, 1).2, big[..4096]);

    // Offsets or lengths O_DIRECT cannot take fail cleanly.
    assert_eq!(d.write(&mut g, 1, &[1u8; 4096], 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read(&mut g, 8, 512, 1).0, VIRTIO_BLK_S_IOERR);
}

#[test]
fn null_backend_reads_zeroes_and_swallows_writes() {
    let mut g = Guest::new();
    let mut d = Disk::new(BlkDevice::new(config(BackendSpec::Null { size: 1 << 30 })).unwrap());
    assert_eq!(d.dev.capacity_bytes(), 1 << 30);
    assert_eq!(d.write(&mut g, 0, &[9u8; 4096], 2), (VIRTIO_BLK_S_OK, 1));
    let (status, used, data) = d.read(&mut g, 0, 4096, 3);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK, 4097));
    assert_eq!(data, vec![0u8; 4096]);
    let seg = discard_segment(0, 8, 0);
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_DISCARD, &[&seg]).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_WRITE_ZEROES, &[&seg]).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_FLUSH, &[]).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn flush_succeeds_on_every_backend() {
    let f = TempFile::new("flush", 64 * 1024);
    let devices = [
        ram(1 << 20),
        BlkDevice::new(config(BackendSpec::Null { size: 4096 })).unwrap(),
        file(f.path(), false),
    ];
    for dev in devices {
        assert!(dev.flush().is_ok());
        let mut g = Guest::new();
        let mut d = Disk::new(dev);
        // The sector field and any payload of a flush are ignored.
        let io = build(&mut g, &[&header(VIRTIO_BLK_T_FLUSH, u64::MAX)], &[1]);
        assert_eq!(d.run(&io), 1);
        assert_eq!(io.status(&g), VIRTIO_BLK_S_OK);
    }
}

#[test]
fn get_id_returns_the_serial_nul_padded() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    let hdr = header(VIRTIO_BLK_T_GET_ID, 0);
    let io = build(&mut g, &[&hdr], &[20, 1]);
    assert_eq!(d.run(&io), 21);
    assert_eq!(io.status(&g), VIRTIO_BLK_S_OK);
    let mut want = b"uvdpa-test".to_vec();
    want.resize(20, 0);
    assert_eq!(io.data(&g), want);

    // A shorter buffer gets a prefix; status shares the buffer with the data.
    let io = build(&mut g, &[&hdr], &[9]);
    assert_eq!(d.run(&io), 9);
    assert_eq!(io.data(&g), b"uvdpa-te");
    assert_eq!(io.status(&g), VIRTIO_BLK_S_OK);

    // A longer buffer gets 20 bytes; the bytes after them are left alone.
    let io = build(&mut g, &[&hdr], &[32, 1]);
    assert_eq!(d.run(&io), 21);
    assert_eq!(&io.data(&g)[..20], &want[..]);
    assert_eq!(&io.data(&g)[20..], &[UNTOUCHED; 12][..]);

    // A serial of exactly 20 bytes has no NUL.
    let mut d = Disk::new(
        BlkDevice::new(BlkConfig {
            serial: "01234567890123456789".into(),
            ..config(BackendSpec::Ram { size: 4096 })
        })
        .unwrap(),
    );
    let io = build(&mut g, &[&hdr], &[20, 1]);
    assert_eq!(d.run(&io), 21);
    assert_eq!(io.data(&g), b"01234567890123456789");
}

// ---------------------------------------------------------------------------------------
// Discard and write zeroes.

/// Fills sectors 0..32 with 0xab, zeroes some ranges with `ty`, checks what reads back.
fn zeroing_reads_back_zeroes(dev: BlkDevice, ty: u32, flags: u32) {
    let mut g = Guest::new();
    let mut d = Disk::new(dev);
    assert_eq!(d.write(&mut g, 0, &[0xab; 32 * 512], 3).0, VIRTIO_BLK_S_OK);
    // Two ranges in one request, one spanning a 4 KiB page boundary, one a whole page.
    let segs = [discard_segment(5, 6, flags), discard_segment(16, 8, flags)];
    let (status, used) = d.command(&mut g, ty, &[&segs[0], &segs[1]]);
    assert_eq!(
        (status, used),
        (VIRTIO_BLK_S_OK, 1),
        "type {ty} flags {flags}"
    );
    let back = d.read(&mut g, 0, 32 * 512, 2).2;
    for (sector, chunk) in back.chunks(512).enumerate() {
        let zeroed = (5..11).contains(&sector) || (16..24).contains(&sector);
        let want = if zeroed { 0 } else { 0xab };
        assert!(
            chunk.iter().all(|&b| b == want),
            "sector {sector}, type {ty}"
        );
    }
}

#[test]
fn ram_discard_and_write_zeroes_read_back_zeroes() {
    zeroing_reads_back_zeroes(ram(1 << 20), VIRTIO_BLK_T_DISCARD, 0);
    zeroing_reads_back_zeroes(ram(1 << 20), VIRTIO_BLK_T_WRITE_ZEROES, 0);
    zeroing_reads_back_zeroes(ram(1 << 20), VIRTIO_BLK_T_WRITE_ZEROES, 1);
}

#[test]
fn file_discard_and_write_zeroes_read_back_zeroes() {
    let f = TempFile::new("zeroes", 1 << 20);
    zeroing_reads_back_zeroes(file(f.path(), false), VIRTIO_BLK_T_DISCARD, 0);
    zeroing_reads_back_zeroes(file(f.path(), false), VIRTIO_BLK_T_WRITE_ZEROES, 0);
    zeroing_reads_back_zeroes(file(f.path(), false), VIRTIO_BLK_T_WRITE_ZEROES, 1);
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(on_disk.len(), 1 << 20, "KEEP_SIZE: the file keeps its size");
}

#[test]
fn zeroing_flags_the_device_does_not_know_are_unsupported() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    // §5.2.6.2: unmap on a discard, or any unknown flag, is UNSUPP.
    let unmap = discard_segment(0, 1, 1);
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_DISCARD, &[&unmap]).0,
        VIRTIO_BLK_S_UNSUPP
    );
    let unknown = discard_segment(0, 1, 2);
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_WRITE_ZEROES, &[&unknown]).0,
        VIRTIO_BLK_S_UNSUPP
    );
}

#[test]
fn zeroing_requests_are_checked_whole_before_any_range_is_zeroed() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    assert_eq!(d.write(&mut g, 0, &[0xab; 1024], 1).0, VIRTIO_BLK_S_OK);
    let good = discard_segment(0, 2, 0);
    let past_end = discard_segment(2047, 2, 0);
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_WRITE_ZEROES, &[&good, &past_end]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(d.read(&mut g, 0, 1024, 1).2, vec![0xab; 1024]);

    let too_big = discard_segment(0, MAX_ZERO_SECTORS + 1, 0);
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_DISCARD, &[&too_big]).0,
        VIRTIO_BLK_S_IOERR
    );
    let overflow = discard_segment(u64::MAX / 512, 1, 0);
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_DISCARD, &[&overflow]).0,
        VIRTIO_BLK_S_IOERR
    );
    // An empty table, or one that is not a whole number of segments.
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_DISCARD, &[]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_DISCARD, &[&good[..8]]).0,
        VIRTIO_BLK_S_IOERR
    );
    // More segments than max_discard_seg.
    let many = vec![0u8; 16 * (MAX_ZERO_SEGMENTS as usize + 1)];
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_DISCARD, &[&many]).0,
        VIRTIO_BLK_S_IOERR
    );
    // A table split across buffers (and a segment straddling two) is fine.
    let two = [good, discard_segment(4, 1, 0)].concat();
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_DISCARD, &[&two[..10], &two[10..]])
            .0,
        VIRTIO_BLK_S_OK
    );
}

// ---------------------------------------------------------------------------------------
// Errors the guest can cause.

#[test]
fn read_only_device_refuses_writes() {
    let mut g = Guest::new();
    let mut d = Disk::new(
        BlkDevice::new(BlkConfig {
            read_only: true,
            ..config(BackendSpec::Ram { size: 1 << 20 })
        })
        .unwrap(),
    );
    assert_eq!(d.write(&mut g, 0, &[1u8; 512], 1), (VIRTIO_BLK_S_IOERR, 1));
    assert_eq!(d.read(&mut g, 0, 512, 1).2, vec![0u8; 512]);
    // Discard and write-zeroes are not offered, so not negotiated.
    let seg = discard_segment(0, 1, 0);
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_DISCARD, &[&seg]).0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_WRITE_ZEROES, &[&seg]).0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        d.command(&mut g, VIRTIO_BLK_T_FLUSH, &[]).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn read_only_file_is_opened_read_only() {
    let f = TempFile::new("ro", 64 * 1024);
    std::fs::write(f.path(), vec![5u8; 64 * 1024]).unwrap();
    let mut perms = std::fs::metadata(f.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    std::fs::set_permissions(f.path(), perms).unwrap();
    let mut g = Guest::new();
    let mut d = Disk::new(
        BlkDevice::new(BlkConfig {
            read_only: true,
            ..config(BackendSpec::File {
                path: f.path().to_path_buf(),
                direct: false,
                aio: Aio::Sync,
            })
        })
        .unwrap(),
    );
    assert_eq!(d.read(&mut g, 3, 1024, 2).2, vec![5u8; 1024]);
    assert_eq!(d.write(&mut g, 0, &[1u8; 512], 1).0, VIRTIO_BLK_S_IOERR);
    assert!(d.dev.flush().is_ok());
}

#[test]
fn sectors_past_the_end_are_ioerr() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    let sectors = (1u64 << 20) / 512;
    assert_eq!(d.read(&mut g, sectors, 512, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read(&mut g, sectors - 1, 1024, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        d.write(&mut g, sectors - 1, &[1u8; 1024], 1).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(d.read(&mut g, u64::MAX, 512, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        d.write(&mut g, u64::MAX / 512, &[1u8; 512], 1).0,
        VIRTIO_BLK_S_IOERR
    );
    // A failed read reports only the status byte as used.
    let (_, used, _) = d.read(&mut g, sectors, 512, 1);
    assert_eq!(used, 1);
}

#[test]
fn partial_sector_lengths_are_ioerr() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    assert_eq!(d.write(&mut g, 0, &[1u8; 100], 1), (VIRTIO_BLK_S_IOERR, 1));
    assert_eq!(d.write(&mut g, 0, &[1u8; 513], 2).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read(&mut g, 0, 511, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read(&mut g, 0, 1000, 1).0, VIRTIO_BLK_S_IOERR);
    // Nothing was written.
    assert_eq!(d.read(&mut g, 0, 1024, 1).2, vec![0u8; 1024]);
}

#[test]
fn short_header_is_ioerr_and_split_header_is_fine() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    let hdr = header(VIRTIO_BLK_T_GET_ID, 0);
    for len in [0, 1, 8, 15] {
        let io = build(&mut g, &[&hdr[..len]], &[20, 1]);
        assert_eq!(d.run(&io), 1, "header of {len} bytes");
        assert_eq!(io.status(&g), VIRTIO_BLK_S_IOERR);
        assert_eq!(io.data(&g), vec![UNTOUCHED; 20]);
    }
    // No readable part at all.
    let io = build(&mut g, &[], &[1]);
    assert_eq!(d.run(&io), 1);
    assert_eq!(io.status(&g), VIRTIO_BLK_S_IOERR);
    // A header split over three buffers, and data sharing a buffer with the header.
    let data = random_bytes(1024, 7);
    let whole = [&header(VIRTIO_BLK_T_OUT, 4)[..], &data[..]].concat();
    let io = build(&mut g, &[&whole[..3], &whole[3..10], &whole[10..]], &[1]);
    assert_eq!(d.run(&io), 1);
    assert_eq!(io.status(&g), VIRTIO_BLK_S_OK);
    assert_eq!(d.read(&mut g, 4, 1024, 1).2, data);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    // 2, 3: legacy SCSI/reserved; 10: GET_LIFETIME; 14: SECURE_ERASE; 24: zoned.
    for ty in [2, 3, 5, 10, 12, 14, 24, 0x8000_0000, u32::MAX] {
        let io = build(&mut g, &[&header(ty, 0), &[0u8; 512]], &[512, 1]);
        assert_eq!(d.run(&io), 1, "type {ty}");
        assert_eq!(io.status(&g), VIRTIO_BLK_S_UNSUPP, "type {ty}");
        assert_eq!(io.data(&g), vec![UNTOUCHED; 512]);
    }
}

#[test]
fn request_without_status_byte_is_dropped() {
    let mut g = Guest::new();
    let mut d = Disk::new(ram(1 << 20));
    let data = [3u8; 512];
    // A write without a writable part: not executed, nothing written anywhere.
    let io = build(&mut g, &[&header(VIRTIO_BLK_T_OUT, 0), &data], &[]);
    assert_eq!(d.run(&io), 0);
    assert_eq!(g.read(io.readable[1].0, 512), data);
    assert_eq!(d.read(&mut g, 0, 512, 1).2, vec![0u8; 512]);
    // Zero-length writable buffers hold no status byte either.
    let io = build(&mut g, &[&header(VIRTIO_BLK_T_IN, 0)], &[0, 0]);
    assert_eq!(d.run(&io), 0);
    let io = build(&mut g, &[&header(VIRTIO_BLK_T_GET_ID, 0)], &[]);
    assert_eq!(d.run(&io), 0);
    let io = build(&mut g, &[], &[]);
    assert_eq!(d.run(&io), 0);
}

// ---------------------------------------------------------------------------------------
// Creation.

#[test]
fn new_refuses_each_invalid_attribute() {
    let ok = config(BackendSpec::Ram { size: 1 << 20 });
    let err = |cfg: BlkConfig| BlkDevice::new(cfg).unwrap_err();

    for value in [0, 256, 511, 1000, 8192] {
        let e = err(BlkConfig {
            logical_block_size: value,
            ..ok.clone()
        });
        assert!(matches!(e, BlkError::InvalidLogicalBlockSize { value: v } if v == value));
        assert!(e.to_string().contains("logical_block_size"));
        assert!(e.to_string().contains("512..=4096"));
    }
    for value in [0, 65, u16::MAX] {
        let e = err(BlkConfig {
            num_queues: value,
            ..ok.clone()
        });
        assert!(matches!(e, BlkError::InvalidNumQueues { value: v } if v == value));
        assert!(e.to_string().contains("num_queues") && e.to_string().contains("1..=64"));
    }
    for value in [0, 3, 100, 65535] {
        let e = err(BlkConfig {
            queue_size: value,
            ..ok.clone()
        });
        assert!(matches!(e, BlkError::InvalidQueueSize { value: v } if v == value));
        assert!(e.to_string().contains("queue_size") && e.to_string().contains("32768"));
    }
    let e = err(BlkConfig {
        serial: "x".repeat(21),
        ..ok.clone()
    });
    assert!(matches!(e, BlkError::SerialTooLong { len: 21 }));
    assert!(e.to_string().contains("serial"));
    for backend in [
        BackendSpec::Ram { size: 0 },
        BackendSpec::Ram { size: 1000 },
        BackendSpec::Null { size: 0 },
        BackendSpec::Null { size: 4097 },
    ] {
        let e = err(BlkConfig {
            backend,
            ..ok.clone()
        });
        assert!(matches!(e, BlkError::InvalidSize { .. }));
        assert!(e.to_string().contains("size"));
    }
    // A RAM size that is a multiple of 512 but not of a 4 KiB logical block.
    let e = err(BlkConfig {
        logical_block_size: 4096,
        backend: BackendSpec::Ram { size: 4096 + 512 },
        ..ok.clone()
    });
    assert!(matches!(
        e,
        BlkError::InvalidSize {
            size: 4608,
            logical_block_size: 4096
        }
    ));
    // More memory than an address space holds.
    let e = err(BlkConfig {
        backend: BackendSpec::Ram { size: 1 << 62 },
        ..ok.clone()
    });
    assert!(matches!(e, BlkError::MapMemory { .. }));

    let missing = std::env::temp_dir().join(format!("uvdpa-blk-{}-missing", std::process::id()));
    let e = err(BlkConfig {
        backend: BackendSpec::File {
            path: missing.clone(),
            direct: false,
            aio: Aio::Sync,
        },
        ..ok.clone()
    });
    assert!(matches!(&e, BlkError::OpenFile { path, .. } if *path == missing));
    assert!(e.to_string().contains(&*missing.to_string_lossy()));

    let e = err(BlkConfig {
        backend: BackendSpec::File {
            path: std::env::temp_dir(),
            direct: false,
            aio: Aio::Sync,
        },
        read_only: true,
        ..ok.clone()
    });
    assert!(matches!(e, BlkError::NotAFileOrBlockDevice { .. }));

    for len in [0, 100, 511] {
        let f = TempFile::new("small", len);
        let e = err(BlkConfig {
            backend: BackendSpec::File {
                path: f.path().to_path_buf(),
                direct: false,
                aio: Aio::Sync,
            },
            ..ok.clone()
        });
        assert!(matches!(e, BlkError::FileTooSmall { size, .. } if size == len));
    }

    // The valid edges are accepted.
    for (lbs, nq, qs, serial) in [(512, 1, 1, ""), (4096, 64, 32768, "01234567890123456789")] {
        BlkDevice::new(BlkConfig {
            logical_block_size: lbs,
            num_queues: nq,
            queue_size: qs,
            serial: serial.into(),
            ..ok.clone()
        })
        .unwrap();
    }
}

#[test]
fn file_size_is_rounded_down_to_whole_blocks() {
    let f = TempFile::new("round", 3 * 4096 + 1000);
    assert_eq!(file(f.path(), false).capacity_bytes(), 3 * 4096 + 512);
    let dev = BlkDevice::new(BlkConfig {
        logical_block_size: 4096,
        ..config(BackendSpec::File {
            path: f.path().to_path_buf(),
            direct: false,
            aio: Aio::Sync,
        })
    })
    .unwrap();
    assert_eq!(dev.capacity_bytes(), 3 * 4096);
    assert_eq!({ dev.config_space().capacity }, 24);
}

#[test]
fn queue_handler_for_a_missing_queue_is_a_fault() {
    let dev = ram(4096);
    assert!(dev.queue_handler(1, dev.features()).is_ok());
    assert!(dev.queue_handler(2, dev.features()).is_err());
    assert!(dev.queue_handler(u16::MAX, dev.features()).is_err());
}

// ---------------------------------------------------------------------------------------
// Through a real split ring, and from several queues at once.

#[test]
fn requests_through_a_split_ring() {
    let mut g = Guest::new();
    let mut dq = DriverQueue::new(g.mem.clone(), 0x1000, 16);
    let mut q = SplitQueue::new(&dq.config(true, true), g.mem.clone()).unwrap();
    let dev = ram(1 << 20);
    let mut h = dev.queue_handler(0, dev.features()).unwrap();

    let data = random_bytes(8 * KIB, 8);
    let hdr_w = g.alloc(16, 0);
    g.mem.write(hdr_w, &header(VIRTIO_BLK_T_OUT, 32)).unwrap();
    let buf_w = g.alloc(data.len(), 0);
    g.mem.write(buf_w, &data).unwrap();
    let st_w = g.alloc(1, 0);
    let hdr_r = g.alloc(16, 0);
    g.mem.write(hdr_r, &header(VIRTIO_BLK_T_IN, 32)).unwrap();
    let buf_r = g.alloc(data.len(), 0);
    let st_r = g.alloc(1, 0);

    let w = dq.add_chain(&[(hdr_w, 16, false), (buf_w, 8192, false), (st_w, 1, true)]);
    let r = dq.add_chain(&[
        (hdr_r, 16, false),
        (buf_r, 4096, true),
        (buf_r + 4096, 4096, true),
        (st_r, 1, true),
    ]);
    dq.publish();

    let mut chain = DescriptorChain::default();
    while q.pop(&mut chain).unwrap() {
        let len = h.handle(&chain).unwrap();
        q.add_used(chain.head(), len);
    }
    h.end_batch().unwrap();
    q.publish_used();
    assert_eq!(dq.pop_used(), Some((u32::from(w), 1)));
    assert_eq!(dq.pop_used(), Some((u32::from(r), 8193)));
    assert_eq!(g.read(st_w, 1), [VIRTIO_BLK_S_OK]);
    assert_eq!(g.read(st_r, 1), [VIRTIO_BLK_S_OK]);
    assert_eq!(g.read(buf_r, data.len()), data);
}

#[test]
fn queues_write_the_same_ram_disk_concurrently() {
    let dev = ram(4 << 20);
    let mut g = Guest::new();
    let sector = |qi: u16, i: usize| (u64::from(qi) * 16 + i as u64) * 32;
    let seed = |qi: u16, i: usize| u64::from(qi) * 100 + i as u64;
    let mut jobs = vec![];
    for qi in 0..2u16 {
        let chains: Vec<Io> = (0..16)
            .map(|i| {
                let data = random_bytes(16 * KIB, seed(qi, i));
                let hdr = header(VIRTIO_BLK_T_OUT, sector(qi, i));
                build(&mut g, &[&hdr, &data], &[1])
            })
            .collect();
        jobs.push((qi, chains));
    }
    let done: Vec<(u16, Vec<Io>)> = std::thread::scope(|s| {
        let threads: Vec<_> = jobs
            .into_iter()
            .map(|(qi, chains)| {
                let dev = &dev;
                s.spawn(move || {
                    let mut h = dev.queue_handler(qi, dev.features()).unwrap();
                    for io in &chains {
                        assert_eq!(h.handle(&io.chain).unwrap(), 1);
                    }
                    (qi, chains)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut d = Disk::new(dev);
    for (qi, chains) in &done {
        for (i, io) in chains.iter().enumerate() {
            assert_eq!(io.status(&g), VIRTIO_BLK_S_OK);
            let want = random_bytes(16 * KIB, seed(*qi, i));
            assert_eq!(d.read(&mut g, sector(*qi, i), 16 * KIB, 2).2, want);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Arbitrary input never panics.

fn request_type() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(VIRTIO_BLK_T_IN),
        Just(VIRTIO_BLK_T_OUT),
        Just(VIRTIO_BLK_T_FLUSH),
        Just(VIRTIO_BLK_T_GET_ID),
        Just(VIRTIO_BLK_T_DISCARD),
        Just(VIRTIO_BLK_T_WRITE_ZEROES),
        any::<u32>(),
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Raw bytes, often a partial sector.
        proptest::collection::vec(any::<u8>(), 0..1600),
        // Whole sectors.
        (0usize..5).prop_map(|n| vec![0x5a; n * 512]),
        // Plausible discard/write-zeroes tables.
        proptest::collection::vec((0u64..300, 0u32..64, 0u32..4), 0..5).prop_map(|segs| segs
            .into_iter()
            .flat_map(|(s, n, f)| discard_segment(s, n, f))
            .collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_requests_complete_or_drop_without_panicking(
        ty in request_type(),
        sector in prop_oneof![0u64..300, any::<u64>()],
        header_len in 0usize..=16,
        header_pieces in 1usize..4,
        data in payload(),
        data_pieces in 1usize..5,
        writable in proptest::collection::vec(0usize..1200, 0..4),
        null_backend in any::<bool>(),
    ) {
        let mut g = Guest::with_size(1 << 20);
        let backend = if null_backend {
            BackendSpec::Null { size: 128 * 1024 }
        } else {
            BackendSpec::Ram { size: 128 * 1024 }
        };
        let mut d = Disk::new(BlkDevice::new(config(backend)).unwrap());
        let hdr = header(ty, sector);
        let hdr = &hdr[..header_len];
        let mut readable: Vec<&[u8]> = vec![];
        let mut at = 0;
        for len in split(hdr.len(), header_pieces) {
            readable.push(&hdr[at..at + len]);
            at += len;
        }
        // A payload only follows a whole header (a short header ends the readable part).
        if header_len == 16 {
            let mut at = 0;
            for len in split(data.len(), data_pieces) {
                readable.push(&data[at..at + len]);
                at += len;
            }
        }
        let io = build(&mut g, &readable, &writable);
        let used = d.run(&io);
        let total: usize = writable.iter().sum();
        if total == 0 {
            prop_assert_eq!(used, 0);
        } else {
            let status = io.status(&g);
            prop_assert!(status <= VIRTIO_BLK_S_UNSUPP, "status {}", status);
            prop_assert!(used >= 1 && used as usize <= total, "used {} of {}", used, total);
            if status != VIRTIO_BLK_S_OK {
                prop_assert_eq!(used, 1);
            }
        }
        // Readable buffers are never written.
        for (i, &(gpa, len)) in io.readable.iter().enumerate() {
            prop_assert_eq!(&g.read(gpa, len)[..], readable[i]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The request tests again, over a packed ring.

// ---------------------------------------------------------------------------------------
// Capacity changes (`BlkDevice::resize`, virtio 1.2 §5.2.4 `capacity`).

/// The capacity the config space reports, in sectors.
fn config_capacity(dev: &BlkDevice) -> u64 {
    let c = VirtioBlkConfig::from_le_bytes(&dev.config()).unwrap();
    assert_eq!(c, dev.config_space());
    c.capacity
}

/// Discard and write-zeroes of one segment at `sector`; returns their statuses.
fn zero_statuses(d: &mut Disk, g: &mut Guest, sector: u64, sectors: u32) -> (u8, u8) {
    let seg = discard_segment(sector, sectors, 0);
    (
        d.command(g, VIRTIO_BLK_T_DISCARD, &[&seg]).0,
        d.command(g, VIRTIO_BLK_T_WRITE_ZEROES, &[&seg]).0,
    )
}

#[test]
fn ram_shrink_refuses_requests_past_the_new_end_and_growth_keeps_the_data() {
    let mut g = Guest::with_size(32 << 20);
    // The queue handler is made before every resize: running queues see the change.
    let mut d = Disk::new(ram(1 << 20));
    let head = random_bytes(8 * KIB, 20);
    let tail = random_bytes(4 * KIB, 21);
    assert_eq!(d.write(&mut g, 0, &head, 3).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.write(&mut g, 1500, &tail, 2).0, VIRTIO_BLK_S_OK);

    // Shrink to 512 KiB (1024 sectors).
    assert_eq!(d.dev.resize(512 * 1024).unwrap(), 1 << 20);
    assert_eq!(d.dev.capacity_bytes(), 512 * 1024);
    assert_eq!(config_capacity(&d.dev), 1024);
    assert_eq!(d.read(&mut g, 1500, 4 * KIB, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.write(&mut g, 1500, &tail, 1).0, VIRTIO_BLK_S_IOERR);
    // Straddling the new end, and the last sector before and after it.
    assert_eq!(d.read(&mut g, 1020, 4 * KIB, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.write(&mut g, 1020, &tail, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.read(&mut g, 1023, 512, 1).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.read(&mut g, 1024, 512, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        zero_statuses(&mut d, &mut g, 1020, 8),
        (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR)
    );
    assert_eq!(
        zero_statuses(&mut d, &mut g, 1016, 8),
        (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK)
    );
    // Inside: the data is still there.
    let (status, _, back) = d.read(&mut g, 0, head.len(), 4);
    assert_eq!((status, back == head), (VIRTIO_BLK_S_OK, true));

    // Grow to 8 MiB: the old data is kept, the range the shrink cut off reads back as
    // zeroes, and the new end is served.
    assert_eq!(d.dev.resize(8 << 20).unwrap(), 512 * 1024);
    assert_eq!(config_capacity(&d.dev), 16384);
    let (status, _, back) = d.read(&mut g, 0, head.len(), 2);
    assert_eq!((status, back == head), (VIRTIO_BLK_S_OK, true));
    let (status, _, back) = d.read(&mut g, 1500, 4 * KIB, 1);
    assert_eq!((status, back), (VIRTIO_BLK_S_OK, vec![0u8; 4 * KIB]));
    let far = random_bytes(64 * KIB, 22);
    let last = 16384 - 128;
    assert_eq!(d.write(&mut g, last, &far, 5).0, VIRTIO_BLK_S_OK);
    let (status, _, back) = d.read(&mut g, last, far.len(), 3);
    assert_eq!((status, back == far), (VIRTIO_BLK_S_OK, true));
    assert_eq!(d.read(&mut g, 16384, 512, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        zero_statuses(&mut d, &mut g, last, 128),
        (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK)
    );

    // A handler made after the resize sees the same capacity.
    let dev = d.dev;
    let mut d = Disk::new(dev);
    assert_eq!(d.read(&mut g, last, 64 * KIB, 1).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.read(&mut g, last + 1, 64 * KIB, 1).0, VIRTIO_BLK_S_IOERR);
}

#[test]
fn ram_growth_past_the_reservation_and_bad_sizes_are_refused() {
    let dev = ram(1 << 20);
    let past = RAM_RESERVE + 4096;
    let e = dev.resize(past).unwrap_err();
    assert!(
        matches!(
            e,
            BlkError::Resize {
                source: ResizeError::PastReservation { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains(&RAM_RESERVE.to_string()), "{e}");
    for bad in [0, 1000, (1 << 20) + 100] {
        assert!(
            matches!(dev.resize(bad), Err(BlkError::InvalidSize { .. })),
            "{bad}"
        );
    }
    assert_eq!(dev.capacity_bytes(), 1 << 20);
    // Up to the reservation is fine (PROT_NONE until now, never touched: no memory).
    dev.resize(RAM_RESERVE).unwrap();
    assert_eq!(config_capacity(&dev), RAM_RESERVE / 512);
    dev.resize(4096).unwrap();
    assert_eq!(config_capacity(&dev), 8);

    // A 4 KiB-block device takes only whole blocks.
    let dev = BlkDevice::new(BlkConfig {
        logical_block_size: 4096,
        ..config(BackendSpec::Ram { size: 1 << 20 })
    })
    .unwrap();
    assert!(matches!(
        dev.resize((2 << 20) + 512),
        Err(BlkError::InvalidSize { .. })
    ));
    dev.resize((2 << 20) + 4096).unwrap();
}

#[test]
fn read_only_devices_refuse_resize() {
    let f = TempFile::new("ro-resize", 1 << 20);
    for backend in [
        BackendSpec::Ram { size: 1 << 20 },
        BackendSpec::File {
            path: f.path().to_path_buf(),
            direct: false,
            aio: Aio::Sync,
        },
    ] {
        let dev = BlkDevice::new(BlkConfig {
            read_only: true,
            ..config(backend)
        })
        .unwrap();
        let e = dev.resize(2 << 20).unwrap_err();
        assert!(matches!(e, BlkError::ResizeReadOnly), "{e}");
        assert!(e.to_string().contains("read-only"), "{e}");
        assert_eq!(dev.capacity_bytes(), 1 << 20);
    }
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 1 << 20);
}

#[test]
fn file_resize_resizes_the_image() {
    let f = TempFile::new("resize", 1 << 20);
    let mut g = Guest::new();
    let mut d = Disk::new(file(f.path(), false));
    let data = random_bytes(16 * KIB, 23);
    assert_eq!(d.write(&mut g, 8, &data, 2).0, VIRTIO_BLK_S_OK);

    // Grow: the file grows, the new end is served and reaches the file.
    d.dev.resize(3 << 20).unwrap();
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 3 << 20);
    assert_eq!(config_capacity(&d.dev), 6144);
    let far = random_bytes(8 * KIB, 24);
    assert_eq!(d.write(&mut g, 6144 - 16, &far, 3).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.read(&mut g, 6144 - 16, far.len(), 1).2, far);
    assert_eq!(d.read(&mut g, 6144, 512, 1).0, VIRTIO_BLK_S_IOERR);
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[(3 << 20) - far.len()..], &far[..]);

    // Shrink: the file is truncated (qemu's block_resize of a raw image does the same),
    // requests past the new end fail, the data before it stays.
    d.dev.resize(64 * 1024).unwrap();
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 64 * 1024);
    assert_eq!(config_capacity(&d.dev), 128);
    assert_eq!(d.read(&mut g, 8, data.len(), 3).2, data);
    assert_eq!(d.read(&mut g, 128, 512, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(d.write(&mut g, 120, &far, 1).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 64 * 1024);

    // A device opened on the file again sees the new size.
    assert_eq!(file(f.path(), false).capacity_bytes(), 64 * 1024);
}

#[test]
fn null_resize_changes_only_the_capacity() {
    let mut g = Guest::new();
    let mut d = Disk::new(BlkDevice::new(config(BackendSpec::Null { size: 4096 })).unwrap());
    assert_eq!(d.read(&mut g, 8, 512, 1).0, VIRTIO_BLK_S_IOERR);
    d.dev.resize(1 << 40).unwrap();
    assert_eq!(config_capacity(&d.dev), (1 << 40) / 512);
    assert_eq!(d.read(&mut g, (1 << 31) - 1, 512, 1).0, VIRTIO_BLK_S_OK);
    d.dev.resize(512).unwrap();
    assert_eq!(d.read(&mut g, 1, 512, 1).0, VIRTIO_BLK_S_IOERR);
}

#[test]
fn ram_resizes_while_another_queue_runs_keep_its_data() {
    // Queue 1 writes and reads back blocks below the smallest capacity on its own thread
    // while this thread shrinks and grows the disk: every request inside the capacity
    // succeeds with its data, whatever the resize in progress.
    let dev = Arc::new(ram(1 << 20));
    let mut q = dev.queue_handler(1, dev.features()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let worker = std::thread::spawn(move || {
        let mut rounds = 0u64;
        while !s.load(Ordering::Relaxed) || rounds < 50 {
            let mut g = Guest::new();
            for i in 0..32u64 {
                let data = random_bytes(4 * KIB, rounds * 64 + i);
                let sector = (i * 8) % 1024;
                let w = build(&mut g, &[&header(VIRTIO_BLK_T_OUT, sector), &data], &[1]);
                q.handle(&w.chain).unwrap();
                assert_eq!(w.status(&g), VIRTIO_BLK_S_OK, "write {rounds}/{i}");
                let r = build(&mut g, &[&header(VIRTIO_BLK_T_IN, sector)], &[4 * KIB, 1]);
                q.handle(&r.chain).unwrap();
                assert_eq!(r.status(&g), VIRTIO_BLK_S_OK, "read {rounds}/{i}");
                assert!(r.data(&g) == data, "data {rounds}/{i}");
            }
            rounds += 1;
        }
        rounds
    });
    for k in 0..200u64 {
        let size = if k % 2 == 0 { 64 << 20 } else { 512 * 1024 };
        dev.resize(size).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(worker.join().unwrap() >= 50);
    assert_eq!(dev.capacity_bytes(), 512 * 1024);
}

// ---------------------------------------------------------------------------------------
// RAM disks shared through their memfd (live upgrade: a new daemon adopts the fd).

/// A `size`-byte RAM device over (a dup of) the memfd of `dev`'s RAM disk.
fn adopt(dev: &BlkDevice, size: u64) -> Result<BlkDevice, BlkError> {
    let fd = dev.ram_fd().unwrap().try_clone_to_owned().unwrap();
    BlkDevice::with_ram_fd(config(BackendSpec::Ram { size }), fd)
}

#[test]
fn ram_fd_shares_the_disk_with_a_second_device_before_and_after_growth() {
    let mut g = Guest::with_size(32 << 20);
    let mut a = Disk::new(ram(1 << 20));
    let head = random_bytes(8 * KIB, 30);
    assert_eq!(a.write(&mut g, 0, &head, 3).0, VIRTIO_BLK_S_OK);

    // What the first device wrote, the second reads, and the other way round.
    let mut b = Disk::new(adopt(&a.dev, 1 << 20).unwrap());
    assert_eq!(b.dev.capacity_bytes(), 1 << 20);
    let (status, _, back) = b.read(&mut g, 0, head.len(), 2);
    assert_eq!((status, back == head), (VIRTIO_BLK_S_OK, true));
    let mid = random_bytes(4 * KIB, 31);
    assert_eq!(b.write(&mut g, 1000, &mid, 2).0, VIRTIO_BLK_S_OK);
    let (status, _, back) = a.read(&mut g, 1000, mid.len(), 3);
    assert_eq!((status, back == mid), (VIRTIO_BLK_S_OK, true));

    // Grow the first to 4 MiB and write past the old end; the second still shares the
    // first MiB.
    assert_eq!(a.dev.resize(4 << 20).unwrap(), 1 << 20);
    let far = random_bytes(16 * KIB, 32);
    assert_eq!(a.write(&mut g, 8192 - 32, &far, 4).0, VIRTIO_BLK_S_OK);
    let late = random_bytes(2 * KIB, 33);
    assert_eq!(a.write(&mut g, 16, &late, 1).0, VIRTIO_BLK_S_OK);
    assert_eq!(b.read(&mut g, 16, late.len(), 2).2, late);
    assert_eq!(b.read(&mut g, 8192 - 32, 512, 1).0, VIRTIO_BLK_S_IOERR);

    // A device adopting the grown disk sees all of it, and its writes past the old end
    // reach the first.
    let mut c = Disk::new(adopt(&a.dev, 4 << 20).unwrap());
    let (status, _, back) = c.read(&mut g, 8192 - 32, far.len(), 3);
    assert_eq!((status, back == far), (VIRTIO_BLK_S_OK, true));
    assert_eq!(c.read(&mut g, 1000, mid.len(), 1).2, mid);
    let tail = random_bytes(8 * KIB, 34);
    assert_eq!(c.write(&mut g, 4000, &tail, 2).0, VIRTIO_BLK_S_OK);
    let (status, _, back) = a.read(&mut g, 4000, tail.len(), 2);
    assert_eq!((status, back == tail), (VIRTIO_BLK_S_OK, true));

    // The disk outlives the device that made it while another holds its memfd.
    drop(a);
    drop(b);
    assert_eq!(c.read(&mut g, 0, 16 * KIB, 2).0, VIRTIO_BLK_S_OK);
    assert_eq!(c.read(&mut g, 16, late.len(), 1).2, late);
}

#[test]
fn ram_fd_after_a_shrink_reads_zeroes_in_the_released_range() {
    let mut g = Guest::with_size(32 << 20);
    let mut a = Disk::new(ram(1 << 20));
    let data = random_bytes(64 * KIB, 35);
    assert_eq!(a.write(&mut g, 1024, &data, 2).0, VIRTIO_BLK_S_OK);
    a.dev.resize(512 * 1024).unwrap();
    // The memfd keeps its length (a hole was punched, the file was not truncated), so a
    // device of the old size can adopt it; the released range reads back as zeroes.
    let mut b = Disk::new(adopt(&a.dev, 1 << 20).unwrap());
    let (status, _, back) = b.read(&mut g, 1024, data.len(), 1);
    assert_eq!((status, back), (VIRTIO_BLK_S_OK, vec![0u8; data.len()]));
}

#[test]
fn with_ram_fd_refuses_small_fds_and_other_backends() {
    let dev = ram(1 << 20);
    let e = adopt(&dev, 2 << 20).unwrap_err();
    assert!(
        matches!(
            e,
            BlkError::RamFdTooSmall {
                size: 0x20_0000,
                fd_size: 0x10_0000
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("1048576"), "{e}");
    // The config is checked as by `new`.
    let fd = dev.ram_fd().unwrap().try_clone_to_owned().unwrap();
    let e = BlkDevice::with_ram_fd(config(BackendSpec::Ram { size: 1000 }), fd).unwrap_err();
    assert!(matches!(e, BlkError::InvalidSize { .. }), "{e}");

    let f = TempFile::new("adopt", 1 << 20);
    for (backend, name) in [
        (BackendSpec::Null { size: 1 << 20 }, "null"),
        (
            BackendSpec::File {
                path: f.path().to_path_buf(),
                direct: false,
                aio: Aio::Sync,
            },
            "file",
        ),
    ] {
        let fd = dev.ram_fd().unwrap().try_clone_to_owned().unwrap();
        let e = BlkDevice::with_ram_fd(config(backend.clone()), fd).unwrap_err();
        assert!(
            matches!(e, BlkError::AdoptFdNotRam { backend } if backend == name),
            "{e}"
        );
        assert!(BlkDevice::new(config(backend)).unwrap().ram_fd().is_none());
    }
    // Any fd other than a sealable memfd is refused before it is mapped.
    let file = std::fs::File::open(f.path()).unwrap();
    let e =
        BlkDevice::with_ram_fd(config(BackendSpec::Ram { size: 4096 }), file.into()).unwrap_err();
    assert!(matches!(e, BlkError::AdoptRamFd { .. }), "{e}");
}

/// The request tests with every request made available on a packed virtqueue (virtio 1.2
/// §2.8) of [`PACKED_RING_SIZE`] slots, plain chains and indirect tables in turn, popped,
/// handled and completed by the ring's device side, the used descriptor checked from the
/// driver's side (see [`PackedRing::run`]). Left out: `file_reads_and_writes_use_many_iovecs`
/// (chains of 1500 buffers).
mod packed_ring {
    macro_rules! over_packed_ring {
        ($($test:ident),* $(,)?) => {
            $(
                #[test]
                fn $test() {
                    super::over_packed_ring(super::$test)
                }
            )*
        };
    }

    over_packed_ring!(
        ram_write_then_read_back_across_segments,
        zero_length_read_and_write_succeed,
        ram_data_survives_new_queue_handlers,
        file_write_then_read_back_and_reach_the_file,
        file_direct_io_with_aligned_and_unaligned_buffers,
        null_backend_reads_zeroes_and_swallows_writes,
        flush_succeeds_on_every_backend,
        get_id_returns_the_serial_nul_padded,
        ram_discard_and_write_zeroes_read_back_zeroes,
        file_discard_and_write_zeroes_read_back_zeroes,
        zeroing_flags_the_device_does_not_know_are_unsupported,
        zeroing_requests_are_checked_whole_before_any_range_is_zeroed,
        read_only_device_refuses_writes,
        read_only_file_is_opened_read_only,
        sectors_past_the_end_are_ioerr,
        partial_sector_lengths_are_ioerr,
        short_header_is_ioerr_and_split_header_is_fine,
        unknown_request_types_are_unsupported,
        request_without_status_byte_is_dropped,
        arbitrary_requests_complete_or_drop_without_panicking,
        ram_shrink_refuses_requests_past_the_new_end_and_growth_keeps_the_data,
        file_resize_resizes_the_image,
        null_resize_changes_only_the_capacity,
    );
}
