//! The data path of one virtio-net queue pair (virtio 1.2 §5.1.6): receive queue `2k` and
//! transmit queue `2k+1` run in one worker, so a frame moves from a transmit chain to its
//! destination with one copy and no hand-off between threads.
//!
//! Transmit: each chain is `virtio_net_hdr` (12 bytes) + frame. The header is checked
//! ([`VirtioNetHdr::validate_tx`]); a short, oversized or malformed frame is dropped and
//! counted (`drops` of the transmit queue) and its chain completed, so the ring keeps
//! going. Receive: a frame is written after a 12-byte header into one chain, or with
//! VIRTIO_NET_F_MRG_RXBUF into as many chains as it needs (`num_buffers` in the first
//! header). A frame that finds no (or too little) receive buffer space is dropped and
//! counted (`drops` of the receive queue) — except from a TAP or switch, where it waits
//! for the driver to add buffers (the backend queues it).
//!
//! Nothing here allocates per frame once warm: chains and the bounce buffer are reused.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use uvdpa_virtio::worker::{GroupHandler, WorkerCtl, WorkerError, WorkerQueue};
use uvdpa_virtio::{DescriptorChain, Segment, VirtioFeatures};

use super::capture::{CapturePoint, CaptureTap, FrameSrc};
use super::hdr::{VirtioNetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_LEN};
use super::switch::SwitchPort;
use super::tap::Tap;
use crate::ratelimit::{guest_debug, RateLimiter};

/// Largest frame a backend hands over, header excluded: 64 KiB of GSO payload plus the
/// Ethernet and VLAN headers.
pub const MAX_FRAME: usize = 65536 + 14 + 4;

/// Where the frames of a queue pair go and come from.
pub enum PairBackend {
    /// Every frame transmitted on the pair comes back on its receive queue.
    Loopback,
    /// Transmitted frames are counted and discarded (a benchmark target: guest TX).
    Sink,
    /// The device sends this frame (bytes, no header) whenever the driver gives a receive
    /// buffer (a benchmark source: guest RX); transmitted frames are discarded.
    Source(Vec<u8>),
    /// A TAP interface's queue `pair`.
    Tap(Arc<Tap>, u16),
    /// A port of an in-daemon L2 switch.
    Switch(Arc<SwitchPort>),
}

/// The [`GroupHandler`] of one queue pair.
pub struct PairHandler {
    backend: PairBackend,
    mrg_rxbuf: bool,
    features: VirtioFeatures,
    mtu: u16,
    tx_chain: DescriptorChain,
    rx_chains: Vec<DescriptorChain>,
    /// A frame read from the TAP/switch (or built for a checksum fix-up): header + frame.
    bounce: Vec<u8>,
    /// Transmit-side copy (checksum completion, switch), separate from a pending frame.
    scratch: Vec<u8>,
    /// `bounce[..pending]` holds a received frame waiting for receive buffers.
    pending: usize,
    log: RateLimiter,
    /// Live capture: checked once per batch, frames mirrored while one is attached.
    cap: CaptureTap,
}

/// Where a frame to deliver comes from.
enum Frame<'a> {
    /// Host bytes (header already in place at the start).
    Bytes(&'a [u8]),
    /// A transmit chain's readable segments: header at the start, then the frame.
    Chain(&'a [Segment]),
}

/// Outcome of delivering one frame.
enum Delivered {
    /// Written; chains used.
    Done,
    /// No receive buffer (or too little space): nothing consumed.
    NoSpace,
    /// The frame cannot fit even an empty ring's worth of buffers, or a buffer was too
    /// small for the header: dropped.
    Dropped,
}

impl PairHandler {
    /// A handler for a queue pair with `features` negotiated.
    pub fn new(backend: PairBackend, features: VirtioFeatures, mtu: u16) -> Self {
        Self {
            backend,
            mrg_rxbuf: features.contains(VirtioFeatures::VIRTIO_NET_F_MRG_RXBUF),
            features,
            mtu,
            tx_chain: DescriptorChain::default(),
            rx_chains: Vec::new(),
            bounce: vec![0; VIRTIO_NET_HDR_LEN + MAX_FRAME],
            scratch: vec![0; VIRTIO_NET_HDR_LEN + MAX_FRAME],
            pending: 0,
            log: RateLimiter::new(10),
            cap: CaptureTap::new(Arc::default(), 0),
        }
    }

    /// Mirrors this handler's frames, as queue pair `pair`, to captures attached at
    /// `point`.
    pub fn with_capture(mut self, point: Arc<CapturePoint>, pair: u16) -> Self {
        self.cap = CaptureTap::new(point, pair);
        self
    }

    /// Whether the backend can have frames for the receive queue without a transmit.
    fn has_inbound(&self) -> bool {
        matches!(
            self.backend,
            PairBackend::Source(_) | PairBackend::Tap(..) | PairBackend::Switch(_)
        )
    }

    /// Reads the next inbound frame into `bounce` (if none is pending); returns whether one
    /// is there.
    fn fill_inbound(&mut self) -> bool {
        if self.pending > 0 {
            return true;
        }
        let n = match &self.backend {
            PairBackend::Source(f) => {
                let n = VIRTIO_NET_HDR_LEN + f.len();
                self.bounce[..VIRTIO_NET_HDR_LEN].fill(0);
                self.bounce[VIRTIO_NET_HDR_LEN..n].copy_from_slice(f);
                n
            }
            PairBackend::Tap(tap, pair) => match tap.recv(*pair, &mut self.bounce) {
                Ok(Some(n)) if n >= VIRTIO_NET_HDR_LEN => n,
                Ok(_) => 0,
                Err(e) => {
                    guest_debug!(self.log, "tap receive failed: {e}");
                    0
                }
            },
            PairBackend::Switch(port) => {
                self.bounce[..VIRTIO_NET_HDR_LEN].fill(0);
                port.recv(&mut self.bounce[VIRTIO_NET_HDR_LEN..])
                    .map_or(0, |n| n + VIRTIO_NET_HDR_LEN)
            }
            PairBackend::Loopback | PairBackend::Sink => 0,
        };
        self.pending = n;
        n > 0
    }

    /// Delivers one frame into the receive queue. The header's num_buffers is set here.
    fn deliver(
        rx: &mut WorkerQueue,
        chains: &mut Vec<DescriptorChain>,
        mrg: bool,
        hdr: &[u8; VIRTIO_NET_HDR_LEN],
        frame: Frame<'_>,
        frame_len: usize,
    ) -> Result<Delivered, WorkerError> {
        let total = VIRTIO_NET_HDR_LEN + frame_len;
        let start = rx.queue.next_avail();
        let mut used = 0usize;
        let mut space = 0usize;
        // Ring slots (descriptors of the main table) the popped chains occupy: when they
        // fill the ring, no buffer the driver could add would make room.
        let mut slots = 0u32;
        while space < total {
            if used == chains.len() {
                chains.push(DescriptorChain::default());
            }
            if !rx.queue.pop(&mut chains[used])? {
                rx.queue.rewind(start);
                return Ok(if slots >= u32::from(rx.queue.size()) {
                    Delivered::Dropped
                } else {
                    Delivered::NoSpace
                });
            }
            slots += u32::from(chains[used].desc_count().max(1));
            let w = chains[used].writable_len() as usize;
            used += 1;
            if w < VIRTIO_NET_HDR_LEN || (!mrg && w < total) {
                // A buffer too small for the header (or, without mergeable buffers, for the
                // frame) cannot take it: complete what was taken, empty, and drop.
                for c in chains.iter().take(used) {
                    rx.queue.add_used(c, 0);
                }
                return Ok(Delivered::Dropped);
            }
            space += w;
            if !mrg {
                break;
            }
        }
        // Copy header then frame across the chains, filling each before the next.
        let mut h = *hdr;
        h[10..12].copy_from_slice(&(used as u16).to_le_bytes());
        let mut src = SrcCursor::new(&h, frame);
        for c in chains.iter().take(used) {
            let mut written = 0usize;
            for seg in c.writable() {
                let n = src.copy_into(seg.base, seg.len);
                written += n;
                if n < seg.len {
                    break;
                }
            }
            rx.queue.add_used(c, written as u32);
        }
        Ok(Delivered::Done)
    }

    /// Completes a checksum the driver left to the device (VIRTIO_NET_HDR_F_NEEDS_CSUM) in
    /// `buf` = header + frame, for a receiver that did not negotiate
    /// VIRTIO_NET_F_GUEST_CSUM (RFC 1071 ones' complement sum from csum_start to the end).
    fn complete_csum(buf: &mut [u8], h: &VirtioNetHdr) {
        let frame = &mut buf[VIRTIO_NET_HDR_LEN..];
        let start = usize::from(h.csum_start);
        let at = start + usize::from(h.csum_offset);
        if at + 2 > frame.len() || start > frame.len() {
            return;
        }
        let mut sum: u32 = 0;
        for chunk in frame[start..].chunks(2) {
            let w = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(w);
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        frame[at..at + 2].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        buf[0] &= !VIRTIO_NET_HDR_F_NEEDS_CSUM;
    }

    /// Transmit side: pops up to `budget` chains; returns (frames, bytes, chains popped).
    fn transmit(
        &mut self,
        tx: &mut WorkerQueue,
        mut rx: Option<&mut WorkerQueue>,
        budget: usize,
        counts: &mut Counts,
    ) -> Result<usize, WorkerError> {
        let mut popped = 0;
        while popped < budget && tx.queue.pop(&mut self.tx_chain)? {
            popped += 1;
            let len = self.tx_chain.readable_len() as usize;
            let mut raw = [0u8; VIRTIO_NET_HDR_LEN];
            let hdr = if self.tx_chain.read_at(0, &mut raw) == VIRTIO_NET_HDR_LEN {
                let h = VirtioNetHdr::parse(&raw);
                h.validate_tx(len - VIRTIO_NET_HDR_LEN, self.features, self.mtu)
                    .map(|()| h)
                    .map_err(|e| e.to_string())
            } else {
                Err(format!("{len}-byte chain is shorter than the header"))
            };
            let h = match hdr {
                Ok(h) => h,
                Err(e) => {
                    guest_debug!(self.log, "tx frame dropped: {e}");
                    counts.tx_drops += 1;
                    tx.queue.add_used(&self.tx_chain, 0);
                    continue;
                }
            };
            let frame_len = len - VIRTIO_NET_HDR_LEN;
            counts.tx += 1;
            counts.tx_bytes += frame_len as u64;
            if self.cap.wants(false) {
                let src = FrameSrc::Segments(self.tx_chain.readable(), VIRTIO_NET_HDR_LEN);
                self.cap.record(false, frame_len, src);
            }
            match &self.backend {
                PairBackend::Loopback => {
                    if let Some(rx) = rx.as_deref_mut() {
                        let needs_fix = h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
                            && !self
                                .features
                                .contains(VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM);
                        let r = if needs_fix {
                            self.tx_chain.read_at(0, &mut self.scratch[..len]);
                            Self::complete_csum(&mut self.scratch[..len], &h);
                            let mut fixed = [0u8; VIRTIO_NET_HDR_LEN];
                            fixed.copy_from_slice(&self.scratch[..VIRTIO_NET_HDR_LEN]);
                            Self::deliver(
                                rx,
                                &mut self.rx_chains,
                                self.mrg_rxbuf,
                                &fixed,
                                Frame::Bytes(&self.scratch[VIRTIO_NET_HDR_LEN..len]),
                                frame_len,
                            )?
                        } else {
                            Self::deliver(
                                rx,
                                &mut self.rx_chains,
                                self.mrg_rxbuf,
                                &raw,
                                Frame::Chain(self.tx_chain.readable()),
                                frame_len,
                            )?
                        };
                        match r {
                            Delivered::Done => {
                                counts.rx += 1;
                                counts.rx_bytes += frame_len as u64;
                                if self.cap.wants(true) {
                                    let src = if needs_fix {
                                        FrameSrc::Bytes(&self.scratch[VIRTIO_NET_HDR_LEN..len])
                                    } else {
                                        FrameSrc::Segments(
                                            self.tx_chain.readable(),
                                            VIRTIO_NET_HDR_LEN,
                                        )
                                    };
                                    self.cap.record(true, frame_len, src);
                                }
                            }
                            Delivered::NoSpace | Delivered::Dropped => counts.rx_drops += 1,
                        }
                    } else {
                        counts.rx_drops += 1;
                    }
                }
                PairBackend::Sink | PairBackend::Source(_) => {}
                PairBackend::Tap(tap, pair) => {
                    if let Err(e) = tap.send(*pair, self.tx_chain.readable()) {
                        guest_debug!(self.log, "tap send failed: {e}");
                        counts.tx_drops += 1;
                    }
                }
                PairBackend::Switch(port) => {
                    // The switch carries plain frames with complete checksums.
                    self.tx_chain.read_at(0, &mut self.scratch[..len]);
                    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                        Self::complete_csum(&mut self.scratch[..len], &h);
                    }
                    port.send(&self.scratch[VIRTIO_NET_HDR_LEN..len]);
                }
            }
            tx.queue.add_used(&self.tx_chain, 0);
        }
        Ok(popped)
    }

    /// Receive side for backends with their own inbound frames.
    fn receive(
        &mut self,
        rx: &mut WorkerQueue,
        budget: usize,
        counts: &mut Counts,
    ) -> Result<usize, WorkerError> {
        let mut n = 0;
        while n < budget && self.fill_inbound() {
            let len = self.pending;
            let mut hdr = [0u8; VIRTIO_NET_HDR_LEN];
            hdr.copy_from_slice(&self.bounce[..VIRTIO_NET_HDR_LEN]);
            let before = rx.queue.next_avail();
            let r = Self::deliver(
                rx,
                &mut self.rx_chains,
                self.mrg_rxbuf,
                &hdr,
                Frame::Bytes(&self.bounce[VIRTIO_NET_HDR_LEN..len]),
                len - VIRTIO_NET_HDR_LEN,
            )?;
            match r {
                Delivered::Done => {
                    counts.rx += 1;
                    counts.rx_bytes += (len - VIRTIO_NET_HDR_LEN) as u64;
                    if self.cap.wants(true) {
                        let frame = &self.bounce[VIRTIO_NET_HDR_LEN..len];
                        self.cap.record(true, frame.len(), FrameSrc::Bytes(frame));
                    }
                }
                Delivered::Dropped => {
                    counts.rx_drops += 1;
                    if matches!(self.backend, PairBackend::Source(_))
                        && rx.queue.next_avail() == before
                    {
                        // A ring's worth of buffers that cannot hold a source's frame,
                        // none taken: the same frame would be dropped again forever.
                        break;
                    }
                }
                // Keep it for when the driver adds buffers.
                Delivered::NoSpace => break,
            }
            if !matches!(self.backend, PairBackend::Source(_)) {
                // A source sends the same frame again: it stays in place.
                self.pending = 0;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Whether an inbound frame waits and the receive buffers available now let `receive`
    /// take it (or drop it): not while mergeable buffers fall short of it, so a frame
    /// starved of buffers is no work that keeps the worker from sleeping (the driver
    /// kicks when it adds buffers). Pops and rewinds: the ring is left as it was.
    fn inbound_ready(&mut self, rx: &mut WorkerQueue) -> Result<bool, WorkerError> {
        if !self.fill_inbound() {
            return Ok(false);
        }
        if self.rx_chains.is_empty() {
            self.rx_chains.push(DescriptorChain::default());
        }
        let start = rx.queue.next_avail();
        let (mut space, mut slots, mut ready) = (0usize, 0u32, false);
        while rx.queue.pop(&mut self.rx_chains[0])? {
            slots += u32::from(self.rx_chains[0].desc_count().max(1));
            let w = self.rx_chains[0].writable_len() as usize;
            space += w;
            if !self.mrg_rxbuf || w < VIRTIO_NET_HDR_LEN || space >= self.pending {
                ready = true;
                break;
            }
        }
        rx.queue.rewind(start);
        // A whole ring too small: `deliver` drops the frame, for good unless from a source.
        let full = slots >= u32::from(rx.queue.size());
        Ok(ready || (full && !matches!(self.backend, PairBackend::Source(_))))
    }
}

/// Counters of one pass.
#[derive(Default)]
struct Counts {
    tx: u64,
    tx_bytes: u64,
    tx_drops: u64,
    rx: u64,
    rx_bytes: u64,
    rx_drops: u64,
}

/// Reads a header then a frame sequentially, copying into destination segments.
struct SrcCursor<'a> {
    hdr: &'a [u8],
    hdr_off: usize,
    frame: Frame<'a>,
    /// Frame position: segment index and offset (chains), or byte offset (bytes).
    seg: usize,
    off: usize,
}

impl<'a> SrcCursor<'a> {
    fn new(hdr: &'a [u8], frame: Frame<'a>) -> Self {
        let mut c = Self {
            hdr,
            hdr_off: 0,
            frame,
            seg: 0,
            off: 0,
        };
        if matches!(c.frame, Frame::Chain(_)) {
            // The chain starts with the transmit header: skip it.
            c.skip_chain(VIRTIO_NET_HDR_LEN);
        }
        c
    }

    fn skip_chain(&mut self, mut n: usize) {
        if let Frame::Chain(segs) = self.frame {
            while n > 0 && self.seg < segs.len() {
                let left = segs[self.seg].len - self.off;
                if n < left {
                    self.off += n;
                    return;
                }
                n -= left;
                self.seg += 1;
                self.off = 0;
            }
        }
    }

    /// Copies up to `len` bytes to `dst`; returns how many (less only at the end).
    fn copy_into(&mut self, dst: *mut u8, len: usize) -> usize {
        let mut done = 0;
        if self.hdr_off < self.hdr.len() {
            let n = (self.hdr.len() - self.hdr_off).min(len);
            // SAFETY: `dst..dst+len` is a validated writable segment of mapped guest
            // memory; `ptr::copy` tolerates overlap with the source.
            unsafe { std::ptr::copy(self.hdr.as_ptr().add(self.hdr_off), dst, n) };
            self.hdr_off += n;
            done = n;
        }
        match self.frame {
            Frame::Bytes(b) => {
                let n = (b.len() - self.off).min(len - done);
                // SAFETY: as above; `b[off..off+n]` is in bounds.
                unsafe { std::ptr::copy(b.as_ptr().add(self.off), dst.add(done), n) };
                self.off += n;
                done += n;
            }
            Frame::Chain(segs) => {
                while done < len && self.seg < segs.len() {
                    let s = segs[self.seg];
                    let n = (s.len - self.off).min(len - done);
                    // SAFETY: both ranges are validated segments of mapped guest memory
                    // (source readable, destination writable); a hostile driver may make
                    // them overlap, which `ptr::copy` allows.
                    unsafe { std::ptr::copy(s.base.add(self.off), dst.add(done), n) };
                    done += n;
                    self.off += n;
                    if self.off == s.len {
                        self.seg += 1;
                        self.off = 0;
                    }
                }
            }
        }
        done
    }
}

/// Positions of the receive and transmit queue in the worker's queue slice.
fn split_queues(
    queues: &mut [WorkerQueue],
) -> (Option<&mut WorkerQueue>, Option<&mut WorkerQueue>) {
    let mut rx = None;
    let mut tx = None;
    for q in queues.iter_mut() {
        if q.index % 2 == 0 {
            rx = Some(q);
        } else {
            tx = Some(q);
        }
    }
    (rx, tx)
}

impl GroupHandler for PairHandler {
    fn process(&mut self, queues: &mut [WorkerQueue], ctl: &WorkerCtl) -> Result<(), WorkerError> {
        let inbound = self.has_inbound();
        loop {
            if ctl.abandoned() {
                return Err(WorkerError::Abandoned);
            }
            // One relaxed load while no capture is attached or detached.
            self.cap.refresh();
            let (mut rx, mut tx) = split_queues(queues);
            let mut counts = Counts::default();
            let mut busy = false;
            if let Some(t) = tx.as_deref_mut() {
                t.queue.set_notification(false)?;
            }
            if let Some(r) = rx.as_deref_mut() {
                r.queue.set_notification(false)?;
                if inbound {
                    let budget = usize::from(r.queue.size());
                    busy |= self.receive(r, budget, &mut counts)? == budget;
                }
            }
            if let Some(t) = tx {
                let budget = usize::from(t.queue.size());
                busy |= self.transmit(t, rx.as_deref_mut(), budget, &mut counts)? == budget;
                if counts.tx + counts.tx_drops > 0 {
                    if counts.tx_drops > 0 {
                        t.stats.drops.fetch_add(counts.tx_drops, Ordering::Relaxed);
                    }
                    t.finish_batch(counts.tx, counts.tx_bytes, 0);
                }
            }
            if let Some(r) = rx {
                if counts.rx + counts.rx_drops > 0 {
                    if counts.rx_drops > 0 {
                        r.stats.drops.fetch_add(counts.rx_drops, Ordering::Relaxed);
                    }
                    r.finish_batch(counts.rx, 0, counts.rx_bytes);
                }
            }
            if !busy {
                return Ok(());
            }
        }
    }

    /// Before sleeping: transmit chains always wake the worker; receive buffers only
    /// matter while an inbound frame (TAP, switch, source) waits for them, so receive
    /// kicks stay off otherwise (a loopback's driver refilling its ring does not kick).
    fn arm(&mut self, queues: &mut [WorkerQueue]) -> Result<bool, WorkerError> {
        let inbound = self.has_inbound();
        let (rx, tx) = split_queues(queues);
        let mut more = false;
        if let Some(t) = tx {
            more |= t.queue.set_notification(true)?;
        }
        if let Some(r) = rx {
            if inbound {
                let room = r.queue.set_notification(true)?;
                more |= room && self.inbound_ready(r)?;
            }
        }
        Ok(more)
    }

    fn has_work(&mut self, queues: &mut [WorkerQueue]) -> Result<bool, WorkerError> {
        let inbound = self.has_inbound();
        let (rx, tx) = split_queues(queues);
        if let Some(t) = tx {
            if t.queue.has_available()? {
                return Ok(true);
            }
        }
        if let Some(r) = rx {
            if inbound && r.queue.has_available()? && self.inbound_ready(r)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.backend {
            PairBackend::Tap(tap, pair) => tap.fd(*pair),
            PairBackend::Switch(port) => Some(port.eventfd().as_fd()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
