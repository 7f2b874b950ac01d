//! Tests of the io_uring file backend ([`super::aio`]): a real queue worker over split and
//! packed rings in test guest memory, a backing file on the real disk (under `/var/tmp`,
//! not tmpfs, so O_DIRECT and the block layer are really in the path).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};
use uvdpa_virtio::inflight::InflightMap;
use uvdpa_virtio::packed::testing::DriverQueue as PackedDriverQueue;
use uvdpa_virtio::split::testing::DriverQueue;
use uvdpa_virtio::stats::{QueueStatsRef, StatsTable};
use uvdpa_virtio::worker::{GroupHandler, QueueWorker, WorkerCtl, WorkerParams, WorkerQueue};
use uvdpa_virtio::{GuestMemory, MemoryRegion, VirtioDevice, Virtqueue};

use super::*;

const KIB: usize = 1024;
const MIB: usize = 1 << 20;

/// A backing file on the real disk, removed when dropped.
struct DiskFile(PathBuf);

impl DiskFile {
    fn new(len: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/var/tmp/uvdpa-aio-test-{}-{n}.img",
            std::process::id()
        ));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Fills the file with `data` and makes it durable, so O_DIRECT reads go to the disk
    /// instead of waiting for the page cache to be written back first.
    fn fill(&self, data: &[u8]) {
        use std::io::Write;
        let mut f = std::fs::File::create(&self.0).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
}

impl Drop for DiskFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn file_dev(f: &DiskFile, direct: bool, aio: Aio, queue_size: u16) -> BlkDevice {
    let path = f.path().to_path_buf();
    dev(BackendSpec::File { path, direct, aio }, queue_size)
}

fn dev(backend: BackendSpec, queue_size: u16) -> BlkDevice {
    BlkDevice::new(BlkConfig {
        backend,
        read_only: false,
        num_queues: 1,
        queue_size,
        serial: "aio-test".into(),
        logical_block_size: 512,
    })
    .unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Either ring's driver side.
enum Driver {
    Split(DriverQueue),
    Packed(PackedDriverQueue),
}

/// One request as the test driver built it.
struct Req {
    hdr: u64,
    data: u64,
    len: usize,
    status: u64,
}

/// Guest memory, a ring, a device and (while running) its queue worker.
struct Rig {
    mem: Arc<GuestMemory>,
    driver: Driver,
    dev: BlkDevice,
    kick: Arc<OwnedFd>,
    next: u64,
    reqs: std::collections::HashMap<u16, Req>,
}

impl Rig {
    fn new(dev: BlkDevice, packed: bool, size: u16, mem_size: u64) -> Self {
        let mem = Arc::new(
            GuestMemory::new(vec![MemoryRegion::anonymous(0, mem_size).unwrap()]).unwrap(),
        );
        let driver = if packed {
            Driver::Packed(PackedDriverQueue::new(mem.clone(), 0x1000, size))
        } else {
            Driver::Split(DriverQueue::new(mem.clone(), 0x1000, size))
        };
        Self {
            mem,
            driver,
            dev,
            kick: Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()),
            next: 1 << 20,
            reqs: Default::default(),
        }
    }

    /// The device side of the ring, as a worker gets it.
    fn worker_queue(&self, inflight: Option<&Arc<InflightMap>>) -> WorkerQueue {
        let (cfg, packed) = match &self.driver {
            Driver::Split(d) => (d.config(true, true), false),
            Driver::Packed(d) => (d.config(true, true), true),
        };
        let mut queue = Virtqueue::new(&cfg, self.mem.clone(), packed).unwrap();
        if let Some(m) = inflight {
            assert!(queue.set_inflight(m.queue(0, cfg.size).unwrap()));
        }
        WorkerQueue {
            index: 0,
            queue,
            kick: self.kick.clone(),
            call: None,
            err: None,
            stats: QueueStatsRef::new(StatsTable::new("aio", 1).unwrap(), 0).unwrap(),
        }
    }

    fn handler(&self) -> Box<dyn GroupHandler> {
        self.dev.group_handler(0, self.dev.features()).unwrap()
    }

    fn spawn(&self, inflight: Option<&Arc<InflightMap>>) -> QueueWorker {
        QueueWorker::spawn(WorkerParams {
            name: "aio-test".into(),
            queues: vec![self.worker_queue(inflight)],
            handler: self.handler(),
            on_error: Arc::new(|e| panic!("queue failed: {e}")),
            poll: Duration::ZERO,
            hold: None,
        })
        .unwrap()
    }

    /// Guest memory for `len` bytes at an address `misalign` past a 4 KiB boundary.
    fn alloc(&mut self, len: usize, misalign: u64) -> u64 {
        let at = self.next.next_multiple_of(4096) + misalign;
        self.next = at + len as u64;
        assert!(self.next <= self.mem.total_size(), "test memory exhausted");
        at
    }

    /// Makes a request of type `ty` at `sector` available: its data is `data_segs` buffers
    /// (written by the device for IN/GET_ID) of the given lengths.
    fn request(&mut self, ty: u32, sector: u64, data_segs: &[usize], misalign: u64) -> u16 {
        self.request_with(ty, sector, data_segs, misalign, None)
    }

    /// As [`Rig::request`], with the data buffers filled with `fill` (or 0xee) before the
    /// chain is made available (a packed ring publishes it at once).
    fn request_with(
        &mut self,
        ty: u32,
        sector: u64,
        data_segs: &[usize],
        misalign: u64,
        fill: Option<&[u8]>,
    ) -> u16 {
        let hdr = self.alloc(16, 0);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(hdr, &h).unwrap();
        let len: usize = data_segs.iter().sum();
        let data = self.alloc(len, misalign);
        match fill {
            Some(bytes) => self.mem.write(data, bytes).unwrap(),
            None => self.mem.write(data, &vec![0xee; len]).unwrap(),
        }
        let status = self.alloc(1, 0);
        self.mem.write(status, &[0xff]).unwrap();
        let device_writes = ty == VIRTIO_BLK_T_IN || ty == VIRTIO_BLK_T_GET_ID;
        let mut bufs = vec![(hdr, 16u32, false)];
        let mut at = data;
        for &l in data_segs {
            bufs.push((at, l as u32, device_writes));
            at += l as u64;
        }
        bufs.push((status, 1, true));
        let head = match &mut self.driver {
            Driver::Split(d) => d.add_chain(&bufs),
            Driver::Packed(d) => d.add_chain(&bufs),
        };
        self.reqs.insert(
            head,
            Req {
                hdr,
                data,
                len,
                status,
            },
        );
        head
    }

    fn write(&mut self, sector: u64, bytes: &[u8], segs: &[usize], misalign: u64) -> u16 {
        self.request_with(VIRTIO_BLK_T_OUT, sector, segs, misalign, Some(bytes))
    }

    /// Publishes the split ring's avail index (a packed ring publishes each chain).
    fn publish(&self) {
        if let Driver::Split(d) = &self.driver {
            d.publish();
        }
    }

    fn publish_and_kick(&mut self) {
        self.publish();
        rustix::io::write(&*self.kick, &1u64.to_ne_bytes()).unwrap();
    }

    fn pop_used(&mut self) -> Option<(u16, u32)> {
        match &mut self.driver {
            Driver::Split(d) => d.pop_used().map(|(id, len)| (id as u16, len)),
            Driver::Packed(d) => d.pop_used(),
        }
    }

    /// Waits for `n` used entries; returns them in the order the device published them.
    fn wait_used(&mut self, n: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        while got.len() < n {
            match self.pop_used() {
                Some(u) => got.push(u),
                None if Instant::now() > deadline => panic!("{} of {n} completed", got.len()),
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        got
    }

    fn status(&self, head: u16) -> u8 {
        let mut b = [0u8; 1];
        self.mem.read(self.reqs[&head].status, &mut b).unwrap();
        b[0]
    }

    fn data(&self, head: u16) -> Vec<u8> {
        let r = &self.reqs[&head];
        let mut b = vec![0u8; r.len];
        self.mem.read(r.data, &mut b).unwrap();
        b
    }
}

#[test]
fn aio_attribute_parses_and_the_device_reports_its_mode() {
    assert_eq!("io_uring".parse::<Aio>(), Ok(Aio::IoUring));
    assert_eq!("sync".parse::<Aio>(), Ok(Aio::Sync));
    assert!("native".parse::<Aio>().is_err());
    assert_eq!(Aio::default(), Aio::IoUring);
    let f = DiskFile::new(MIB as u64);
    assert_eq!(file_dev(&f, false, Aio::Sync, 64).aio(), Some(Aio::Sync));
    // This host has io_uring (the tests below need it): no fallback.
    let uring = file_dev(&f, true, Aio::IoUring, 64);
    assert_eq!(uring.aio(), Some(Aio::IoUring));
    assert_eq!(dev(BackendSpec::Ram { size: MIB as u64 }, 64).aio(), None);
    // Completions go out of order: the device must never offer IN_ORDER.
    let in_order = uvdpa_virtio::VirtioFeatures::VIRTIO_F_IN_ORDER;
    assert!(!uring.features().contains(in_order));
}

/// Writes 64 blocks at once, reads them back at once, and checks that a request that
/// completes at once (GET_ID) overtakes a large read still at the disk.
fn many_in_flight_out_of_order(packed: bool) {
    let f = DiskFile::new(256 * MIB as u64);
    let mut rig = Rig::new(file_dev(&f, true, Aio::IoUring, 256), packed, 256, 96 << 20);
    let w = rig.spawn(None);
    let blocks: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|i| ((i * 7919 % 60_000) * 8, pattern(4 * KIB, i)))
        .collect();
    let writes: Vec<u16> = blocks
        .iter()
        .map(|(sector, b)| rig.write(*sector, b, &[4 * KIB], 0))
        .collect();
    rig.publish_and_kick();
    let used = rig.wait_used(writes.len());
    for (head, len) in &used {
        assert_eq!((rig.status(*head), *len), (VIRTIO_BLK_S_OK, 1));
    }
    // Reads: a 4 MiB one first, then GET_ID, then the 64 blocks.
    let big = rig.request(VIRTIO_BLK_T_IN, 1 << 16, &[4 * MIB], 0);
    let id = rig.request(VIRTIO_BLK_T_GET_ID, 0, &[20], 0);
    let reads: Vec<u16> = blocks
        .iter()
        .map(|(sector, _)| rig.request(VIRTIO_BLK_T_IN, *sector, &[4 * KIB], 0))
        .collect();
    rig.publish_and_kick();
    let used = rig.wait_used(reads.len() + 2);
    let pos = |h: u16| used.iter().position(|(u, _)| *u == h).unwrap();
    assert!(
        pos(id) < pos(big),
        "GET_ID did not overtake the read in flight: {used:?}"
    );
    assert_eq!(&rig.data(id)[..8], b"aio-test");
    for (i, head) in reads.iter().enumerate() {
        let len = used[pos(*head)].1;
        assert_eq!(
            (rig.status(*head), len),
            (VIRTIO_BLK_S_OK, 4 * KIB as u32 + 1)
        );
        assert!(rig.data(*head) == blocks[i].1, "block {i} read back wrong");
    }
    let exit = w.stop().unwrap();
    assert!(exit.error.is_none());
}

#[test]
fn many_requests_in_flight_complete_out_of_order_split() {
    many_in_flight_out_of_order(false);
}

#[test]
fn many_requests_in_flight_complete_out_of_order_packed() {
    many_in_flight_out_of_order(true);
}

#[test]
fn an_io_error_fails_only_its_own_request() {
    let f = DiskFile::new(8 * MIB as u64);
    let mut rig = Rig::new(file_dev(&f, true, Aio::IoUring, 64), false, 64, 16 << 20);
    // The file shrinks under the device: reads past the new end get 0 bytes (EOF).
    std::fs::OpenOptions::new()
        .write(true)
        .open(f.path())
        .unwrap()
        .set_len(4 * MIB as u64)
        .unwrap();
    let w = rig.spawn(None);
    let ok1 = rig.request(VIRTIO_BLK_T_IN, 0, &[64 * KIB], 0);
    let bad = rig.request(VIRTIO_BLK_T_IN, (6 * MIB / 512) as u64, &[64 * KIB], 0);
    let ok2 = rig.request(VIRTIO_BLK_T_IN, 8, &[4 * KIB], 0);
    rig.publish_and_kick();
    let used = rig.wait_used(3);
    for (head, len) in used {
        let want = if head == bad {
            (VIRTIO_BLK_S_IOERR, 1)
        } else {
            (VIRTIO_BLK_S_OK, rig.reqs[&head].len as u32 + 1)
        };
        assert_eq!((rig.status(head), len), want, "head {head}");
    }
    assert!(rig.data(ok1).iter().all(|&b| b == 0));
    assert_eq!(rig.status(ok2), VIRTIO_BLK_S_OK);
    assert!(w.stop().unwrap().error.is_none());
}

#[test]
fn flush_discard_and_write_zeroes_go_through_the_ring() {
    let f = DiskFile::new(16 * MIB as u64);
    let mut rig = Rig::new(file_dev(&f, false, Aio::IoUring, 64), false, 64, 16 << 20);
    let w = rig.spawn(None);
    let data = pattern(MIB, 7);
    rig.write(0, &data, &[MIB], 0);
    rig.publish_and_kick();
    rig.wait_used(1);
    let flush = rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    // Discard sectors 0..64 (unmap), write-zeroes 512..1024 without unmap and 1536..1600
    // with it, in one table each.
    let table = |segs: &[(u64, u32, u32)]| -> Vec<u8> {
        segs.iter()
            .flat_map(|(s, n, fl)| {
                let mut e = s.to_le_bytes().to_vec();
                e.extend(n.to_le_bytes());
                e.extend(fl.to_le_bytes());
                e
            })
            .collect()
    };
    let d = table(&[(0, 64, 0)]);
    let z = table(&[(512, 512, 0), (1536, 64, 1)]);
    // Built as writes (the table is the readable data), then retyped.
    let discard = rig.write(0, &d, &[d.len()], 0);
    let hdr = rig.reqs[&discard].hdr;
    rig.mem
        .write(hdr, &VIRTIO_BLK_T_DISCARD.to_le_bytes())
        .unwrap();
    let zeroes = rig.write(0, &z, &[z.len()], 0);
    let hdr = rig.reqs[&zeroes].hdr;
    rig.mem
        .write(hdr, &VIRTIO_BLK_T_WRITE_ZEROES.to_le_bytes())
        .unwrap();
    rig.publish_and_kick();
    let used = rig.wait_used(3);
    for (head, _) in &used {
        assert_eq!(rig.status(*head), VIRTIO_BLK_S_OK, "head {head}");
    }
    assert!(used.iter().any(|(h, _)| *h == flush));
    let back = rig.request(VIRTIO_BLK_T_IN, 0, &[MIB], 0);
    rig.publish_and_kick();
    rig.wait_used(1);
    let got = rig.data(back);
    for (i, (g, d)) in got.iter().zip(&data).enumerate() {
        let sector = i / 512;
        let zeroed = sector < 64 || (512..1024).contains(&sector) || (1536..1600).contains(&sector);
        assert_eq!(*g, if zeroed { 0 } else { *d }, "byte {i}");
    }
    assert!(w.stop().unwrap().error.is_none());
}

#[test]
fn chains_longer_than_iov_max_are_resumed() {
    let f = DiskFile::new(8 * MIB as u64);
    let mut rig = Rig::new(
        file_dev(&f, true, Aio::IoUring, 2048),
        false,
        2048,
        16 << 20,
    );
    let w = rig.spawn(None);
    let segs = vec![512usize; 1100];
    let data = pattern(1100 * 512, 3);
    rig.write(4096, &data, &segs, 0);
    rig.publish_and_kick();
    let (h, _) = rig.wait_used(1)[0];
    assert_eq!(rig.status(h), VIRTIO_BLK_S_OK);
    let back = rig.request(VIRTIO_BLK_T_IN, 4096, &segs, 0);
    rig.publish_and_kick();
    let (h, len) = rig.wait_used(1)[0];
    assert_eq!(
        (h, rig.status(h), len),
        (back, VIRTIO_BLK_S_OK, 1100 * 512 + 1)
    );
    assert!(rig.data(back) == data);
    assert!(w.stop().unwrap().error.is_none());
}

#[test]
fn unaligned_guest_buffers_with_o_direct_still_work() {
    let f = DiskFile::new(8 * MIB as u64);
    let mut rig = Rig::new(file_dev(&f, true, Aio::IoUring, 64), false, 64, 16 << 20);
    let w = rig.spawn(None);
    let data = pattern(64 * KIB, 11);
    // Misaligned address, and segment lengths that are not block multiples.
    rig.write(2048, &data, &[1000, 64 * KIB - 1000], 8);
    rig.publish_and_kick();
    let (h, _) = rig.wait_used(1)[0];
    assert_eq!(rig.status(h), VIRTIO_BLK_S_OK);
    let aligned = rig.request(VIRTIO_BLK_T_IN, 2048, &[64 * KIB], 0);
    let unaligned = rig.request(VIRTIO_BLK_T_IN, 2048, &[333, 64 * KIB - 333], 24);
    rig.publish_and_kick();
    rig.wait_used(2);
    assert!(rig.data(aligned) == data);
    assert!(rig.data(unaligned) == data);
    assert!(w.stop().unwrap().error.is_none());
}

/// 40 reads of 1 MiB with O_DIRECT (3 descriptors each: they fit a ring of 128), and a
/// stop as soon as the first completes.
fn stop_in_flight(packed: bool) {
    let f = DiskFile::new(64 * MIB as u64);
    // Real data on the disk, so the reads really go to it.
    f.fill(&pattern(64 * MIB, 5));
    let file_data = std::fs::read(f.path()).unwrap();
    let mut rig = Rig::new(file_dev(&f, true, Aio::IoUring, 128), packed, 128, 64 << 20);
    let inflight = (!packed).then(|| InflightMap::create(1, 128).unwrap());
    let base = Arc::strong_count(&rig.mem);
    let w = rig.spawn(inflight.as_ref());
    let heads: Vec<u16> = (0..40u64)
        .map(|i| rig.request(VIRTIO_BLK_T_IN, i * 2048, &[MIB], 0))
        .collect();
    rig.publish_and_kick();
    // The first completion: the worker is running the others.
    let mut done = rig.wait_used(1);
    let exit = w.stop().unwrap();
    assert!(exit.error.is_none());
    // Everything the worker took was completed and published before it handed the ring
    // back: the vring base and the used entries agree, and the data is all there.
    let taken = match &rig.driver {
        Driver::Split(_) => usize::from(exit.queues[0].queue.next_avail()),
        Driver::Packed(_) => {
            // One slot per chain (3 descriptors each), from 0x8000 = slot 0, wrap 1.
            usize::from(exit.queues[0].queue.next_avail() & 0x7fff) / 3
        }
    };
    assert!(taken > 0, "the worker took nothing before the stop");
    while let Some(u) = rig.pop_used() {
        done.push(u);
    }
    assert_eq!(done.len(), taken, "used entries vs vring base");
    for (head, len) in &done {
        let i = heads.iter().position(|h| h == head).unwrap();
        assert_eq!((rig.status(*head), *len), (VIRTIO_BLK_S_OK, MIB as u32 + 1));
        assert!(rig.data(*head) == file_data[i * MIB..][..MIB], "read {i}");
    }
    // The handler holds no guest memory once stopped (the ring's queue does).
    assert_eq!(Arc::strong_count(&rig.mem), base + 1);
    // Inflight marks were cleared as their entries were published.
    if let (Some(m), Virtqueue::Split(q)) = (&inflight, &exit.queues[0].queue) {
        let fd = m.fd().try_clone_to_owned().unwrap();
        let m2 = InflightMap::open(fd, 0, m.len() as u64, 1, 128).unwrap();
        assert!(m2.queue(0, 128).unwrap().recover(q.next_used()).is_empty());
    }
    drop(exit);
    assert_eq!(Arc::strong_count(&rig.mem), base);
}

#[test]
fn stop_with_requests_in_flight_completes_them_first_split() {
    stop_in_flight(false);
}

#[test]
fn stop_with_requests_in_flight_completes_them_first_packed() {
    stop_in_flight(true);
}

#[test]
fn dropping_the_handler_with_requests_in_flight_waits_for_the_kernel() {
    let f = DiskFile::new(32 * MIB as u64);
    f.fill(&pattern(32 * MIB, 9));
    let file_data = std::fs::read(f.path()).unwrap();
    let mut rig = Rig::new(file_dev(&f, true, Aio::IoUring, 128), false, 128, 48 << 20);
    let heads: Vec<u16> = (0..32u64)
        .map(|i| rig.request(VIRTIO_BLK_T_IN, i * 2048, &[MIB], 0))
        .collect();
    rig.publish();
    let mut queues = vec![rig.worker_queue(None)];
    let mut h = rig.handler();
    // One pass submits every read and returns without waiting for the disk.
    h.process(&mut queues, &WorkerCtl::default()).unwrap();
    let base = Arc::strong_count(&rig.mem);
    drop(h);
    // Dropped without `stopped` (what a panic does): the drop cancels what it can and
    // waits for the rest, so each read either landed whole or never started, and
    // nothing is written into guest memory after the drop returned.
    let after: Vec<Vec<u8>> = heads.iter().map(|h| rig.data(*h)).collect();
    let mut landed = 0;
    for (i, got) in after.iter().enumerate() {
        if *got == file_data[i * MIB..][..MIB] {
            landed += 1;
        } else {
            assert!(got.iter().all(|&b| b == 0xee), "read {i} is partial");
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for (i, h) in heads.iter().enumerate() {
        assert!(rig.data(*h) == after[i], "read {i} changed after the drop");
    }
    eprintln!(
        "{landed} of {} reads landed before the drop returned",
        heads.len()
    );
    assert!(Arc::strong_count(&rig.mem) <= base);
}

#[test]
fn stop_drained_completes_chains_that_were_never_kicked() {
    let f = DiskFile::new(8 * MIB as u64);
    let mut rig = Rig::new(file_dev(&f, false, Aio::IoUring, 64), false, 64, 16 << 20);
    let w = rig.spawn(None);
    let data = pattern(4 * KIB, 1);
    let heads: Vec<u16> = (0..20u64)
        .map(|i| rig.write(i * 8, &data, &[4 * KIB], 0))
        .collect();
    rig.publish();
    let exit = w.stop_drained().unwrap();
    assert_eq!(exit.queues[0].queue.next_avail(), 20);
    let mut n = 0;
    while let Some((h, _)) = rig.pop_used() {
        assert!(heads.contains(&h));
        assert_eq!(rig.status(h), VIRTIO_BLK_S_OK);
        n += 1;
    }
    assert_eq!(n, 20);
}

/// A resize while a queue worker runs: io_uring file (O_DIRECT) or RAM (synchronous).
fn resize_under_a_running_worker(dev: BlkDevice, file: Option<&DiskFile>) {
    let mut rig = Rig::new(dev, false, 64, 32 << 20);
    let w = rig.spawn(None);
    let data = pattern(64 * KIB, 30);
    let at_end = (4 * MIB / 512) as u64 - 128;
    rig.write(0, &data, &[64 * KIB], 0);
    rig.write(at_end, &data, &[32 * KIB, 32 * KIB], 0);
    rig.publish_and_kick();
    for (head, _) in rig.wait_used(2) {
        assert_eq!(rig.status(head), VIRTIO_BLK_S_OK);
    }

    // Shrink to 2 MiB: the block at the old end fails, the first one reads back.
    rig.dev.resize(2 * MIB as u64).unwrap();
    if let Some(f) = file {
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 2 * MIB as u64);
    }
    let past_r = rig.request(VIRTIO_BLK_T_IN, at_end, &[64 * KIB], 0);
    let past_w = rig.write(at_end, &data, &[64 * KIB], 0);
    let inside = rig.request(VIRTIO_BLK_T_IN, 0, &[64 * KIB], 0);
    rig.publish_and_kick();
    rig.wait_used(3);
    assert_eq!(rig.status(past_r), VIRTIO_BLK_S_IOERR);
    assert_eq!(rig.status(past_w), VIRTIO_BLK_S_IOERR);
    assert_eq!(rig.status(inside), VIRTIO_BLK_S_OK);
    assert!(rig.data(inside) == data);

    // Grow to 8 MiB: the old end reads zeroes (the shrink dropped it), the new end works.
    rig.dev.resize(8 * MIB as u64).unwrap();
    let old_end = rig.request(VIRTIO_BLK_T_IN, at_end, &[64 * KIB], 0);
    let new_end = (8 * MIB / 512) as u64 - 128;
    let wr = rig.write(new_end, &data, &[64 * KIB], 0);
    rig.publish_and_kick();
    rig.wait_used(2);
    assert_eq!(rig.status(old_end), VIRTIO_BLK_S_OK);
    assert!(rig.data(old_end).iter().all(|&b| b == 0));
    assert_eq!(rig.status(wr), VIRTIO_BLK_S_OK);
    let back = rig.request(VIRTIO_BLK_T_IN, new_end, &[64 * KIB], 0);
    let first = rig.request(VIRTIO_BLK_T_IN, 0, &[64 * KIB], 0);
    let past = rig.request(VIRTIO_BLK_T_IN, new_end + 128, &[4 * KIB], 0);
    rig.publish_and_kick();
    rig.wait_used(3);
    assert_eq!(
        (rig.status(back), rig.status(first), rig.status(past)),
        (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR)
    );
    assert!(rig.data(back) == data && rig.data(first) == data);
    assert!(w.stop().unwrap().error.is_none());
}

#[test]
fn file_resize_under_a_running_io_uring_worker() {
    let f = DiskFile::new(4 * MIB as u64);
    resize_under_a_running_worker(file_dev(&f, true, Aio::IoUring, 64), Some(&f));
}

#[test]
fn ram_resize_under_a_running_worker() {
    let ram = dev(
        BackendSpec::Ram {
            size: 4 * MIB as u64,
        },
        64,
    );
    resize_under_a_running_worker(ram, None);
}
