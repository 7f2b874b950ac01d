//! Live request trace of a virtio-blk device (`uvdpa dev capture` on a blk device): one
//! fixed-size record per completed request, written by the queue's worker into the same
//! shared-memory ring a net capture uses ([`crate::net::capture::CaptureRing`]), attached
//! through the same [`CapturePoint`].
//!
//! Each record is a ring record whose `qidx` is the request's virtqueue, whose timestamp
//! is the completion time (CLOCK_REALTIME nanoseconds) and whose [`RECORD_LEN`] bytes of
//! "frame" are a [`TraceRecord`] (native endianness: both ends run on one host):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | request type (`VIRTIO_BLK_T_*`, as the driver wrote it) |
//! | 4 | 1 | status byte written (`VIRTIO_BLK_S_*`) |
//! | 8 | 8 | sector (512-byte units): the header's, or a discard/write-zeroes request's first range's |
//! | 16 | 8 | length in bytes: data read or written, the ID string's buffer, or the ranges' total |
//! | 24 | 8 | latency in nanoseconds, from the worker taking the chain to its status byte |
//!
//! Sub-ring `q` takes queue `q`'s records when every queue is traced, sub-ring 0 when one
//! queue is: a queue belongs to one worker, so every sub-ring keeps a single producer.
//! While nothing is attached a worker pays one relaxed load per batch
//! ([`CapturePoint::changed`]); while a trace is attached, a request costs a read of its
//! header and a record copy; a full ring drops the record and counts it, never waits.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use uvdpa_virtio::DescriptorChain;

use super::request::{
    HEADER_LEN, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, ZERO_SEGMENT_LEN,
};
use super::{MAX_ZERO_SEGMENTS, SECTOR_SIZE};
use crate::net::capture::{CapturePoint, CaptureRing, FrameSrc};

/// Bytes of one encoded [`TraceRecord`] (the `snaplen` of a trace ring).
pub const RECORD_LEN: usize = 32;

/// One completed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    /// `VIRTIO_BLK_T_*` as the driver wrote it.
    pub ty: u32,
    /// `VIRTIO_BLK_S_*` written.
    pub status: u8,
    /// First sector (512-byte units).
    pub sector: u64,
    /// Bytes moved (see the module docs).
    pub len: u64,
    /// Latency in nanoseconds.
    pub latency_ns: u64,
}

impl TraceRecord {
    /// The record's bytes.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..4].copy_from_slice(&self.ty.to_ne_bytes());
        b[4] = self.status;
        b[8..16].copy_from_slice(&self.sector.to_ne_bytes());
        b[16..24].copy_from_slice(&self.len.to_ne_bytes());
        b[24..32].copy_from_slice(&self.latency_ns.to_ne_bytes());
        b
    }

    /// Reads a record back; `None` when `b` is shorter than [`RECORD_LEN`].
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; RECORD_LEN] = b.get(..RECORD_LEN)?.try_into().ok()?;
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_ne_bytes(x)
        };
        Some(Self {
            ty: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            status: b[4],
            sector: u64_at(8),
            len: u64_at(16),
            latency_ns: u64_at(24),
        })
    }
}

/// The name of a request type: `IN`, `OUT`, `FLUSH`, `GET_ID`, `DISCARD`,
/// `WRITE_ZEROES`, or `T_<n>` for another value.
pub fn type_name(ty: u32) -> String {
    match ty {
        VIRTIO_BLK_T_IN => "IN".into(),
        VIRTIO_BLK_T_OUT => "OUT".into(),
        VIRTIO_BLK_T_FLUSH => "FLUSH".into(),
        VIRTIO_BLK_T_GET_ID => "GET_ID".into(),
        VIRTIO_BLK_T_DISCARD => "DISCARD".into(),
        VIRTIO_BLK_T_WRITE_ZEROES => "WRITE_ZEROES".into(),
        other => format!("T_{other}"),
    }
}

/// The name of a status byte: `OK`, `IOERR`, `UNSUPP`, or `S_<n>`.
pub fn status_name(st: u8) -> String {
    match st {
        0 => "OK".into(),
        1 => "IOERR".into(),
        2 => "UNSUPP".into(),
        other => format!("S_{other}"),
    }
}

/// Type, sector and length of the request in `chain`, read from its header (and, for
/// discard and write-zeroes, its range table); a chain too short for a header gives
/// type `u32::MAX`.
fn describe(chain: &DescriptorChain) -> (u32, u64, u64) {
    let mut hdr = [0u8; HEADER_LEN];
    if chain.read_at(0, &mut hdr) < HEADER_LEN {
        return (u32::MAX, 0, 0);
    }
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(s);
    let data_in = u64::from(chain.writable_len().saturating_sub(1));
    match ty {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => (ty, sector, data_in),
        VIRTIO_BLK_T_OUT => (
            ty,
            sector,
            u64::from(chain.readable_len()).saturating_sub(HEADER_LEN as u64),
        ),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let table = (chain.readable_len() as usize).saturating_sub(HEADER_LEN);
            let count = (table / ZERO_SEGMENT_LEN).min(MAX_ZERO_SEGMENTS as usize);
            let (mut first, mut bytes) = (0, 0u64);
            for i in 0..count {
                let mut seg = [0u8; ZERO_SEGMENT_LEN];
                if chain.read_at(HEADER_LEN + i * ZERO_SEGMENT_LEN, &mut seg) < seg.len() {
                    break;
                }
                let mut s = [0u8; 8];
                s.copy_from_slice(&seg[0..8]);
                if i == 0 {
                    first = u64::from_le_bytes(s);
                }
                let n = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                bytes = bytes.saturating_add(u64::from(n) * SECTOR_SIZE);
            }
            (ty, first, bytes)
        }
        _ => (ty, sector, 0),
    }
}

/// A queue worker's view of its device's [`CapturePoint`] for request traces (a worker
/// serving several queues, as an NBD connection's, has one for all of them).
#[derive(Debug)]
pub(crate) struct TraceTap {
    point: Arc<CapturePoint>,
    seen: u64,
    ring: Option<Arc<CaptureRing>>,
    /// Only this queue is traced (into sub-ring 0), or every queue (queue `q` into
    /// sub-ring `q`).
    only: Option<u16>,
}

impl TraceTap {
    /// A tap on `point`; it picks up an attached trace at its first
    /// [`TraceTap::refresh`].
    pub(crate) fn new(point: Arc<CapturePoint>) -> Self {
        Self {
            point,
            seen: 0,
            ring: None,
            only: None,
        }
    }

    /// Once per batch: one relaxed load, plus a lock when a trace was attached or
    /// detached since the last call.
    #[inline]
    pub(crate) fn refresh(&mut self) {
        let Some(cur) = self.point.changed(&mut self.seen) else {
            return;
        };
        (self.ring, self.only) = match cur {
            Some(a) => (Some(a.ring), a.qidx),
            None => (None, None),
        };
    }

    /// Records the request in `chain` of queue `queue`, started at `started`, completed
    /// now with `status` (nothing while no trace of that queue is attached).
    #[inline]
    pub(crate) fn record(&self, queue: u16, chain: &DescriptorChain, started: Instant, status: u8) {
        let Some(ring) = &self.ring else {
            return;
        };
        let sub = match self.only {
            None => u32::from(queue),
            Some(q) if q == queue => 0,
            Some(_) => return,
        };
        let latency_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let (ty, sector, len) = describe(chain);
        let rec = TraceRecord {
            ty,
            status,
            sector,
            len,
            latency_ns,
        }
        .encode();
        ring.push(sub, queue, ts, RECORD_LEN, FrameSrc::Bytes(&rec));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::capture::MIN_RING_SIZE;

    #[test]
    fn records_round_trip_and_names_are_the_spec_names() {
        let r = TraceRecord {
            ty: VIRTIO_BLK_T_WRITE_ZEROES,
            status: 2,
            sector: 1 << 40,
            len: 3 << 30,
            latency_ns: 12_345,
        };
        assert_eq!(TraceRecord::decode(&r.encode()), Some(r));
        assert_eq!(TraceRecord::decode(&[0; RECORD_LEN - 1]), None);
        assert_eq!(type_name(r.ty), "WRITE_ZEROES");
        assert_eq!(type_name(VIRTIO_BLK_T_GET_ID), "GET_ID");
        assert_eq!(type_name(99), "T_99");
        assert_eq!(
            [
                status_name(0),
                status_name(1),
                status_name(2),
                status_name(7)
            ],
            ["OK", "IOERR", "UNSUPP", "S_7"]
        );
    }

    #[test]
    fn taps_trace_their_queues_only_while_attached() {
        let point = Arc::new(CapturePoint::default());
        let mut t = TraceTap::new(point.clone());
        t.refresh();
        assert!(t.ring.is_none());
        let ring = Arc::new(CaptureRing::new("t", 1, MIN_RING_SIZE, RECORD_LEN as u32).unwrap());
        point.attach(ring.clone(), Some(1)).unwrap();
        t.refresh();
        assert_eq!((t.ring.is_some(), t.only), (true, Some(1)));
        assert!(point.detach());
        t.refresh();
        assert!(t.ring.is_none());
        let ring = Arc::new(CaptureRing::new("t", 2, MIN_RING_SIZE, RECORD_LEN as u32).unwrap());
        point.attach(ring, None).unwrap();
        t.refresh();
        assert_eq!((t.ring.is_some(), t.only), (true, None));
    }
}
