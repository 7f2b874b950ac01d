//! Queue-pair data path tests: frames through split rings (and packed rings) driven by the
//! test drivers of `uvdpa_virtio`, with every drop path counted.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustix::event::{eventfd, EventfdFlags};
use uvdpa_virtio::split::testing::DriverQueue;
use uvdpa_virtio::stats::{QueueStatsRef, StatsTable};
use uvdpa_virtio::worker::{GroupHandler, WorkerCtl, WorkerQueue};
use uvdpa_virtio::{GuestMemory, MemoryRegion, SplitQueue, VirtioFeatures, Virtqueue};

use super::*;
use crate::net::capture::{CaptureRing, RingCounters};

const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x20_0000;

struct Rig {
    mem: Arc<GuestMemory>,
    rx: DriverQueue,
    tx: DriverQueue,
    queues: Vec<WorkerQueue>,
    table: Arc<StatsTable>,
    h: PairHandler,
}

fn rig(backend: PairBackend, features: VirtioFeatures) -> Rig {
    let mem =
        Arc::new(GuestMemory::new(vec![MemoryRegion::anonymous(0, 4 << 20).unwrap()]).unwrap());
    let rx = DriverQueue::new(mem.clone(), 0x1000, 16);
    let tx = DriverQueue::new(mem.clone(), 0x4000, 16);
    let table = StatsTable::new("net-test", 3).unwrap();
    let mk = |index: u16, d: &DriverQueue| WorkerQueue {
        index,
        queue: Virtqueue::Split(SplitQueue::new(&d.config(false, false), mem.clone()).unwrap()),
        kick: Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()),
        call: None,
        err: None,
        stats: QueueStatsRef::new(table.clone(), usize::from(index)).unwrap(),
    };
    let queues = vec![mk(0, &rx), mk(1, &tx)];
    Rig {
        h: PairHandler::new(backend, features, 1500),
        mem,
        rx,
        tx,
        queues,
        table,
    }
}

impl Rig {
    fn process(&mut self) {
        self.h
            .process(&mut self.queues, &WorkerCtl::default())
            .unwrap();
    }

    /// Transmits `hdr` + `frame` as one readable descriptor at TX_BUF + `slot`·64 KiB.
    fn send(&mut self, hdr: [u8; 12], frame: &[u8]) {
        let at = TX_BUF + 0x1_0000 * u64::from(self.tx.avail_idx % 16);
        let mut b = hdr.to_vec();
        b.extend_from_slice(frame);
        self.mem.write(at, &b).unwrap();
        self.tx.add_chain(&[(at, b.len() as u32, false)]);
        self.tx.publish();
    }

    /// Offers receive buffers of `len` bytes each.
    fn offer_rx(&mut self, count: usize, len: u32) {
        for _ in 0..count {
            let at = RX_BUF + 0x1_0000 * u64::from(self.rx.avail_idx % 16);
            self.rx.add_chain(&[(at, len, true)]);
        }
        self.rx.publish();
    }

    fn read_rx(&self, id: u32, len: u32) -> Vec<u8> {
        // Buffers are placed by avail position; ids equal descriptor heads, one per chain.
        let mut b = vec![0u8; len as usize];
        self.mem
            .read(RX_BUF + 0x1_0000 * u64::from(id), &mut b)
            .unwrap();
        b
    }

    fn stat(&self, q: usize) -> (u64, u64, u64) {
        let s = self.table.queue(q).unwrap();
        (
            s.requests.load(Ordering::Relaxed),
            s.drops.load(Ordering::Relaxed),
            s.bytes_read.load(Ordering::Relaxed) + s.bytes_written.load(Ordering::Relaxed),
        )
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f
}

fn num_buffers(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[10], b[11]])
}

#[test]
fn loopback_returns_each_frame_on_the_pair_receive_queue() {
    let mut r = rig(PairBackend::Loopback, VirtioFeatures::VIRTIO_F_VERSION_1);
    r.offer_rx(4, 2048);
    let f1 = frame(60, 1);
    let f2 = frame(1514, 2);
    r.send([0; 12], &f1);
    r.send([0; 12], &f2);
    r.process();
    let (id, len) = r.rx.pop_used().expect("first frame back");
    assert_eq!(len as usize, 12 + f1.len());
    let got = r.read_rx(id, len);
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(&got[12..], &f1[..]);
    let (id, len) = r.rx.pop_used().expect("second frame back");
    assert_eq!(&r.read_rx(id, len)[12..], &f2[..]);
    assert_eq!(r.tx.pop_used(), Some((0, 0)));
    assert_eq!(r.tx.pop_used(), Some((1, 0)));
    assert_eq!(
        r.stat(1),
        (2, 0, (60 + 1514) as u64),
        "tx packets, drops, bytes"
    );
    assert_eq!(
        r.stat(0),
        (2, 0, (60 + 1514) as u64),
        "rx packets, drops, bytes"
    );
}

#[test]
fn mergeable_buffers_spread_a_frame_and_count_them_in_num_buffers() {
    let mut r = rig(
        PairBackend::Loopback,
        VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_NET_F_MRG_RXBUF,
    );
    r.offer_rx(4, 64);
    let f = frame(150, 3);
    r.send([0; 12], &f);
    r.process();
    let mut got = Vec::new();
    let mut lens = Vec::new();
    while let Some((id, len)) = r.rx.pop_used() {
        got.extend(r.read_rx(id, len));
        lens.push(len);
    }
    assert_eq!(lens, vec![64, 64, 34]);
    assert_eq!(num_buffers(&got), 3);
    assert_eq!(&got[12..], &f[..]);
}

#[test]
fn too_few_mergeable_buffers_drop_the_frame_and_leave_the_buffers_for_the_next() {
    let mut r = rig(
        PairBackend::Loopback,
        VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_NET_F_MRG_RXBUF,
    );
    r.offer_rx(2, 64);
    r.send([0; 12], &frame(500, 4));
    r.process();
    assert_eq!(
        r.rx.pop_used(),
        None,
        "buffers of a dropped frame were used"
    );
    assert_eq!(r.stat(0).1, 1, "rx drop counted");
    let small = frame(60, 5);
    r.send([0; 12], &small);
    r.process();
    let (id, len) =
        r.rx.pop_used()
            .expect("the next frame uses the same buffers");
    assert_eq!((id, len), (0, 64));
    let (id2, len2) = r.rx.pop_used().unwrap();
    assert_eq!((id2, len2), (1, 8));
}

#[test]
fn without_mergeable_buffers_a_small_buffer_drops_the_frame() {
    let mut r = rig(PairBackend::Loopback, VirtioFeatures::VIRTIO_F_VERSION_1);
    r.offer_rx(1, 100);
    r.send([0; 12], &frame(200, 6));
    r.process();
    assert_eq!(r.rx.pop_used(), Some((0, 0)), "buffer returned empty");
    assert_eq!(r.stat(0).1, 1);
    assert_eq!(r.stat(1).0, 1, "the frame was transmitted");
}

#[test]
fn no_receive_buffer_drops_and_the_transmit_ring_keeps_going() {
    let mut r = rig(PairBackend::Loopback, VirtioFeatures::VIRTIO_F_VERSION_1);
    for i in 0..3 {
        r.send([0; 12], &frame(60, i));
    }
    r.process();
    assert_eq!(r.stat(0).1, 3);
    for _ in 0..3 {
        assert!(r.tx.pop_used().is_some());
    }
}

#[test]
fn short_oversized_and_malformed_transmits_are_dropped_and_counted() {
    // The MTU binds the driver once VIRTIO_NET_F_MTU is negotiated.
    let mut r = rig(
        PairBackend::Loopback,
        VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_NET_F_MTU,
    );
    r.offer_rx(4, 2048);
    // Shorter than the header.
    let at = TX_BUF;
    r.tx.add_chain(&[(at, 8, false)]);
    r.tx.publish();
    // A frame shorter than an Ethernet header.
    r.send([0; 12], &[0u8; 10]);
    // Over the MTU without GSO.
    r.send([0; 12], &frame(1500 + 14 + 4 + 1, 7));
    // GSO without the feature.
    let mut gso = [0u8; 12];
    gso[1] = 1;
    gso[4] = 100;
    r.send(gso, &frame(200, 8));
    // Then a good one.
    let good = frame(64, 9);
    r.send([0; 12], &good);
    r.process();
    assert_eq!(r.stat(1).1, 4, "tx drops");
    assert_eq!(r.stat(1).0, 1, "tx packets");
    let (id, len) = r.rx.pop_used().expect("the good frame");
    assert_eq!(&r.read_rx(id, len)[12..], &good[..]);
    for _ in 0..5 {
        assert!(r.tx.pop_used().is_some(), "every transmit chain completed");
    }
}

/// An IPv4/UDP frame with a partial checksum as a driver offloading it leaves it.
fn udp_needing_csum() -> ([u8; 12], Vec<u8>, u16) {
    let payload = b"uvdpa checksum test!";
    let mut f = frame(14 + 20 + 8 + payload.len(), 0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip.fill(0);
    ip[0] = 0x45;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let udp_len = (8 + payload.len()) as u16;
    f[34..36].copy_from_slice(&1234u16.to_be_bytes());
    f[36..38].copy_from_slice(&5678u16.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    f[42..].copy_from_slice(payload);
    // Pseudo-header sum (not inverted) in the checksum field.
    let mut sum: u32 = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 17 + u32::from(udp_len);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[40..42].copy_from_slice(&(sum as u16).to_be_bytes());
    // Full checksum of the finished datagram, computed independently.
    let mut full = f.clone();
    full[40..42].fill(0);
    let mut s: u32 = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 17 + u32::from(udp_len);
    for c in full[34..].chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    let mut hdr = [0u8; 12];
    hdr[0] = super::super::hdr::VIRTIO_NET_HDR_F_NEEDS_CSUM;
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&6u16.to_le_bytes());
    (hdr, f, !(s as u16))
}

#[test]
fn a_partial_checksum_is_completed_for_a_receiver_without_guest_csum() {
    let mut r = rig(
        PairBackend::Loopback,
        VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_NET_F_CSUM,
    );
    r.offer_rx(1, 2048);
    let (hdr, f, want) = udp_needing_csum();
    r.send(hdr, &f);
    r.process();
    let (id, len) = r.rx.pop_used().unwrap();
    let got = r.read_rx(id, len);
    assert_eq!(got[0] & super::super::hdr::VIRTIO_NET_HDR_F_NEEDS_CSUM, 0);
    assert_eq!(u16::from_be_bytes([got[12 + 40], got[12 + 41]]), want);
}

#[test]
fn a_partial_checksum_passes_through_to_a_receiver_with_guest_csum() {
    let mut r = rig(
        PairBackend::Loopback,
        VirtioFeatures::VIRTIO_F_VERSION_1
            | VirtioFeatures::VIRTIO_NET_F_CSUM
            | VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM,
    );
    r.offer_rx(1, 2048);
    let (hdr, f, _) = udp_needing_csum();
    r.send(hdr, &f);
    r.process();
    let (id, len) = r.rx.pop_used().unwrap();
    let got = r.read_rx(id, len);
    assert_eq!(&got[..10], &hdr[..10], "header passed through");
    assert_eq!(&got[12..], &f[..], "frame untouched");
}

#[test]
fn a_source_fills_every_receive_buffer_and_a_sink_discards() {
    let mut r = rig(
        PairBackend::Source(frame(64, 1)),
        VirtioFeatures::VIRTIO_F_VERSION_1,
    );
    r.offer_rx(10, 2048);
    r.process();
    let mut n = 0;
    while let Some((id, len)) = r.rx.pop_used() {
        assert_eq!(len, 12 + 64);
        assert_eq!(&r.read_rx(id, len)[12..], &frame(64, 1)[..]);
        n += 1;
    }
    assert_eq!(n, 10);
    let mut s = rig(PairBackend::Sink, VirtioFeatures::VIRTIO_F_VERSION_1);
    s.offer_rx(2, 2048);
    s.send([0; 12], &frame(60, 1));
    s.process();
    assert!(s.tx.pop_used().is_some());
    assert_eq!(s.rx.pop_used(), None);
    assert_eq!(s.stat(1).0, 1);
}

#[test]
fn a_pair_with_only_one_queue_ready_runs_without_panicking() {
    let mut r = rig(PairBackend::Loopback, VirtioFeatures::VIRTIO_F_VERSION_1);
    r.send([0; 12], &frame(60, 1));
    let rxq = r.queues.remove(0);
    r.process();
    assert!(r.tx.pop_used().is_some());
    assert_eq!(r.stat(0).1, 0, "no receive queue: nothing counted on it");
    r.queues = vec![rxq];
    r.process();
}

fn captured(ring: &CaptureRing, sub: u32) -> Vec<(u16, u32, Vec<u8>)> {
    let mut v = Vec::new();
    ring.drain(sub, |i, b| v.push((i.qidx, i.orig_len, b.to_vec())));
    v
}

#[test]
fn a_capture_mirrors_transmitted_and_delivered_frames_of_its_pair() {
    let mut r = rig(
        PairBackend::Loopback,
        VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_NET_F_CSUM,
    );
    let point = Arc::new(CapturePoint::default());
    r.h = PairHandler::new(
        PairBackend::Loopback,
        VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_NET_F_CSUM,
        1500,
    )
    .with_capture(point.clone(), 0);
    // Nothing attached: nothing recorded, frames still flow.
    r.offer_rx(1, 2048);
    r.send([0; 12], &frame(60, 9));
    r.process();
    assert!(r.rx.pop_used().is_some());
    let ring = Arc::new(CaptureRing::new("t", 1, 64 << 10, 1000).unwrap());
    point.attach(ring.clone(), None).unwrap();
    // A frame out and back; one with a checksum completed on the way (captured on
    // transmit as sent, on receive as delivered); one with no receive buffer (transmit
    // only); one malformed (dropped by the device: not captured).
    r.offer_rx(2, 2048);
    let f = frame(1514, 3);
    r.send([0; 12], &f);
    let (hdr, udp, want) = udp_needing_csum();
    r.send(hdr, &udp);
    r.send([0; 12], &frame(60, 4));
    r.send([0xff; 12], &frame(60, 5));
    r.process();
    let got = captured(&ring, 0);
    let summary: Vec<(u16, u32)> = got.iter().map(|g| (g.0, g.1)).collect();
    let ul = udp.len() as u32;
    assert_eq!(summary, [(1, 1514), (0, 1514), (1, ul), (0, ul), (1, 60)]);
    assert_eq!(got[0].2, f[..1000], "cut at snaplen");
    assert_eq!(got[2].2, udp, "transmitted as the driver sent it");
    assert_eq!(u16::from_be_bytes([got[3].2[40], got[3].2[41]]), want);
    assert_eq!(
        ring.counters(0),
        RingCounters {
            frames: 5,
            drops: 0
        }
    );
    // Detached: the next batch records nothing.
    assert!(point.detach());
    r.offer_rx(1, 2048);
    r.send([0; 12], &frame(60, 6));
    r.process();
    assert!(captured(&ring, 0).is_empty());
}

/// What a capture costs the data path, in this process: loopback batches of 16 64-byte
/// frames with no capture attached, with one drained after every batch, and with one
/// whose ring stays full (every frame a counted drop). Prints ns per frame (the best of 5
/// interleaved runs of each); run with
/// `cargo test -p uvdpa-devices --release -- --ignored --nocapture capture_cost`.
#[test]
#[ignore = "a measurement, not a test"]
fn capture_cost() {
    const BATCHES: u32 = 50_000;
    let features = VirtioFeatures::VIRTIO_F_VERSION_1;
    let run = |mode: &str| -> f64 {
        let mut r = rig(PairBackend::Loopback, features);
        let point = Arc::new(CapturePoint::default());
        r.h =
            PairHandler::new(PairBackend::Loopback, features, 1500).with_capture(point.clone(), 0);
        let ring = Arc::new(CaptureRing::new("t", 1, 64 << 10, 262_144).unwrap());
        if mode != "off" {
            point.attach(ring.clone(), None).unwrap();
        }
        let f = frame(64, 1);
        let mut spent = std::time::Duration::ZERO;
        for _ in 0..BATCHES {
            r.offer_rx(16, 2048);
            for _ in 0..16 {
                r.send([0; 12], &f);
            }
            let t = std::time::Instant::now();
            r.process();
            spent += t.elapsed();
            while r.rx.pop_used().is_some() {}
            while r.tx.pop_used().is_some() {}
            if mode == "on" {
                ring.drain(0, |_, _| {});
            }
        }
        let c = ring.counters(0);
        let ns = spent.as_nanos() as f64 / f64::from(BATCHES * 16);
        eprintln!(
            "capture {mode:8}: {ns:6.1} ns/frame (records {}, drops {})",
            c.frames, c.drops
        );
        ns
    };
    // The fastest of 5 interleaved runs per mode: on a busy machine the others measure
    // the neighbours.
    let mut best = [f64::MAX; 3];
    for _ in 0..5 {
        for (b, mode) in best.iter_mut().zip(["off", "on", "full"]) {
            *b = b.min(run(mode));
        }
    }
    let [off, on, full] = best;
    eprintln!(
        "best: off {off:.1} ns/frame, on {on:.1} ({:+.1} %), full {full:.1} ({:+.1} %)",
        (on / off - 1.0) * 100.0,
        (full / off - 1.0) * 100.0
    );
}
