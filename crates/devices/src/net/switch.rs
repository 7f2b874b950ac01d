//! An L2 learning switch inside the daemon, connecting virtio-net devices without a host
//! interface.
//!
//! A [`SwitchRegistry`] holds the switches by name; a switch is created when its first
//! port joins ([`SwitchRegistry::join`]) and disappears when its last [`SwitchPort`] is
//! dropped. A net device has one port, served by its queue pair 0: a multiqueue device
//! attaches only pair 0 to the switch (its other pairs carry no switch traffic).
//!
//! Forwarding ([`SwitchPort::send`], frames *without* the virtio-net header, checksums
//! complete): the source MAC is learned on the sending port (unicast sources only); a
//! unicast destination learned on another port goes to that port only; broadcast,
//! multicast and unknown destinations are flooded to every other port; nothing is ever
//! sent back to the sending port (a frame whose destination was learned on the sender is
//! filtered). Learned entries age out after [`FDB_AGING_SECS`] seconds; the table holds at
//! most [`MAX_FDB_ENTRIES`] (past that, new addresses are not learned and their frames are
//! flooded). Learning trusts source addresses, as any learning switch: a device can claim
//! another's MAC.
//!
//! Each port has a bounded receive queue: a byte ring of [`PORT_QUEUE_BYTES`] (allocated
//! at the first frame) holding at most [`PORT_QUEUE_FRAMES`] frames. A frame that does not
//! fit is dropped and counted (`rx_dropped` of the receiving port). Nothing is allocated
//! per frame. The port's eventfd ([`SwitchPort::eventfd`]) is readable exactly while its
//! queue holds a frame, for epoll.
//!
//! Locking: ports are used from their device's worker threads. A frame takes the
//! forwarding table's mutex (learn + look up), then the port list's read lock while it is
//! copied into each receiving port's queue under that queue's mutex; a receive takes its
//! own queue's mutex for one copy. Joining and leaving take the port list's write lock.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::Instant;

use rustix::event::{eventfd, EventfdFlags};

use super::config::MacAddr;
use super::hdr::{ETH_HLEN, MAX_FRAME_LEN};

/// Bytes of each port's receive ring (frames plus 4 bytes each): 4 MiB, several hundred
/// MTU-sized frames or 63 of 64 KiB.
pub const PORT_QUEUE_BYTES: usize = 4 << 20;
/// Most frames queued per port.
pub const PORT_QUEUE_FRAMES: usize = 1024;
/// Most addresses a switch learns.
pub const MAX_FDB_ENTRIES: usize = 4096;
/// Seconds after which a learned address is forgotten unless seen again.
pub const FDB_AGING_SECS: u32 = 300;

/// Bytes of the length in front of each queued frame.
const REC_HDR: usize = 4;
/// A length that marks "continue at the start of the ring".
const WRAP: u32 = u32::MAX;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn mac_key(m: &[u8]) -> u64 {
    m.iter().take(6).fold(0, |k, b| k << 8 | u64::from(*b))
}

type Switches = Mutex<HashMap<String, Weak<Switch>>>;

/// The daemon's switches by name. Cloning gives another handle on the same registry.
#[derive(Debug, Clone, Default)]
pub struct SwitchRegistry {
    switches: Arc<Switches>,
}

impl SwitchRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new port on the switch `name`, creating the switch if it has no port yet; its
    /// receive queue holds [`PORT_QUEUE_BYTES`].
    ///
    /// # Errors
    /// Creating the port's eventfd failed (descriptor limit).
    pub fn join(&self, name: &str) -> io::Result<Arc<SwitchPort>> {
        self.join_with_capacity(name, PORT_QUEUE_BYTES)
    }

    /// As [`SwitchRegistry::join`] with a receive queue of `queue_bytes` bytes (raised to
    /// hold at least one minimum frame; tests use small ones).
    ///
    /// # Errors
    /// Creating the port's eventfd failed (descriptor limit).
    pub fn join_with_capacity(
        &self,
        name: &str,
        queue_bytes: usize,
    ) -> io::Result<Arc<SwitchPort>> {
        let switch = {
            let mut m = lock(&self.switches);
            match m.get(name).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    let s = Arc::new(Switch {
                        name: name.to_string(),
                        registry: Arc::downgrade(&self.switches),
                        ports: RwLock::new(Vec::new()),
                        fdb: Mutex::new(Fdb::new()),
                        next_id: AtomicU64::new(1),
                        epoch: Instant::now(),
                    });
                    m.insert(name.to_string(), Arc::downgrade(&s));
                    s
                }
            }
        };
        let port = Arc::new(Port {
            id: switch.next_id.fetch_add(1, Ordering::Relaxed),
            queue: Mutex::new(Ring::new(queue_bytes.max(REC_HDR + ETH_HLEN))),
            eventfd: eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?,
            stats: AtomicStats::default(),
        });
        switch
            .ports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(port.clone());
        Ok(Arc::new(SwitchPort { port, switch }))
    }

    /// The switch `name`, if it has ports.
    pub fn get(&self, name: &str) -> Option<Arc<Switch>> {
        lock(&self.switches).get(name).and_then(Weak::upgrade)
    }

    /// Names of the switches that have ports, sorted.
    pub fn names(&self) -> Vec<String> {
        // Only counts are looked at under the lock: upgrading could drop the last
        // reference here, and a switch's drop takes this lock.
        let mut v: Vec<String> = lock(&self.switches)
            .iter()
            .filter(|(_, w)| w.strong_count() > 0)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }
}

/// One L2 switch: its ports and forwarding table.
#[derive(Debug)]
pub struct Switch {
    name: String,
    registry: Weak<Switches>,
    ports: RwLock<Vec<Arc<Port>>>,
    fdb: Mutex<Fdb>,
    next_id: AtomicU64,
    epoch: Instant,
}

impl Switch {
    /// The switch's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ports attached.
    pub fn port_count(&self) -> usize {
        self.ports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Addresses currently learned (aged-out entries may still be counted until swept).
    pub fn fdb_len(&self) -> usize {
        lock(&self.fdb).map.len()
    }

    /// The port id `mac` was learned on, if it is known and fresh.
    pub fn lookup(&self, mac: &MacAddr) -> Option<u64> {
        lock(&self.fdb).lookup(mac_key(mac), self.now())
    }

    fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        if let Some(reg) = self.registry.upgrade() {
            let mut m = lock(&reg);
            // A new switch of the same name may have been made since the last port went.
            if m.get(&self.name).is_some_and(|w| w.strong_count() == 0) {
                m.remove(&self.name);
            }
        }
    }
}

/// An address learned on a port.
#[derive(Debug, Clone, Copy)]
struct FdbEntry {
    port: u64,
    seen: u32,
}

/// The forwarding table: MAC (low 48 bits) → port, with aging.
#[derive(Debug)]
struct Fdb {
    map: HashMap<u64, FdbEntry>,
    /// When stale entries were last swept (seconds since the switch's epoch).
    swept: u32,
}

impl Fdb {
    fn new() -> Self {
        Self {
            // Never grows: no allocation per frame.
            map: HashMap::with_capacity(MAX_FDB_ENTRIES),
            swept: 0,
        }
    }

    fn fresh(e: &FdbEntry, now: u32) -> bool {
        now.saturating_sub(e.seen) < FDB_AGING_SECS
    }

    fn learn(&mut self, mac: u64, port: u64, now: u32) {
        if let Some(e) = self.map.get_mut(&mac) {
            *e = FdbEntry { port, seen: now };
            return;
        }
        if self.map.len() >= MAX_FDB_ENTRIES && now != self.swept {
            self.swept = now;
            self.map.retain(|_, e| Self::fresh(e, now));
        }
        if self.map.len() < MAX_FDB_ENTRIES {
            self.map.insert(mac, FdbEntry { port, seen: now });
        }
    }

    fn lookup(&self, mac: u64, now: u32) -> Option<u64> {
        self.map
            .get(&mac)
            .filter(|e| Self::fresh(e, now))
            .map(|e| e.port)
    }

    fn forget_port(&mut self, port: u64) {
        self.map.retain(|_, e| e.port != port);
    }
}

/// Per-port counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames this port took from its queue ([`SwitchPort::recv`]).
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames for this port dropped because its queue was full.
    pub rx_dropped: u64,
    /// Frames handed to a [`SwitchPort::recv`] buffer shorter than them (cut short).
    pub rx_truncated: u64,
    /// Frames this port sent into the switch.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames this port sent that were refused: shorter than an Ethernet header or longer
    /// than [`MAX_FRAME_LEN`].
    pub tx_dropped: u64,
}

#[derive(Debug, Default)]
struct AtomicStats {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    rx_truncated: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The switch's side of a port: its queue, eventfd and counters.
#[derive(Debug)]
struct Port {
    id: u64,
    queue: Mutex<Ring>,
    eventfd: OwnedFd,
    stats: AtomicStats,
}

impl Port {
    /// Queues `frame`; false (and counted) if the queue is full.
    fn deliver(&self, frame: &[u8]) -> bool {
        let mut q = lock(&self.queue);
        let was_empty = q.is_empty();
        if !q.push(frame) {
            drop(q);
            add(&self.stats.rx_dropped, 1);
            return false;
        }
        if was_empty {
            // Under the queue lock, so readiness always matches "queue not empty". A full
            // eventfd counter (impossible: it is reset at every drain) would only fail this
            // write, never block it.
            let _ = rustix::io::write(&self.eventfd, &1u64.to_ne_bytes());
        }
        true
    }
}

/// A device's port on a switch. Dropping it leaves the switch (forgetting the addresses
/// learned on it); the last port to leave removes the switch from its registry.
///
/// `Send + Sync`: the receive and transmit sides may run on different threads.
#[derive(Debug)]
pub struct SwitchPort {
    port: Arc<Port>,
    switch: Arc<Switch>,
}

impl SwitchPort {
    /// The port's id on its switch (what [`Switch::lookup`] returns).
    pub fn id(&self) -> u64 {
        self.port.id
    }

    /// The switch this port is on.
    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Sends one Ethernet frame (no virtio-net header) into the switch: learns its source,
    /// forwards or floods it (see the module documentation). Returns how many ports queued
    /// it (0 when filtered, when no other port exists, or when every receiver was full).
    /// A frame shorter than [`ETH_HLEN`] or longer than [`MAX_FRAME_LEN`] is dropped and
    /// counted (`tx_dropped`).
    pub fn send(&self, frame: &[u8]) -> usize {
        let me = &self.port;
        if frame.len() < ETH_HLEN || frame.len() > MAX_FRAME_LEN {
            add(&me.stats.tx_dropped, 1);
            return 0;
        }
        add(&me.stats.tx_frames, 1);
        add(&me.stats.tx_bytes, frame.len() as u64);
        let (dst, src) = (&frame[0..6], &frame[6..12]);
        let group = dst[0] & 1 != 0;
        let now = self.switch.now();
        let target = {
            let mut fdb = lock(&self.switch.fdb);
            if src[0] & 1 == 0 {
                fdb.learn(mac_key(src), me.id, now);
            }
            if group {
                None
            } else {
                fdb.lookup(mac_key(dst), now)
            }
        };
        if target == Some(me.id) {
            return 0;
        }
        let ports = self
            .switch
            .ports
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        // A known destination whose port is gone (it is leaving) floods instead.
        if let Some(p) = target.and_then(|t| ports.iter().find(|p| p.id == t)) {
            return usize::from(p.deliver(frame));
        }
        ports
            .iter()
            .filter(|p| p.id != me.id)
            .map(|p| usize::from(p.deliver(frame)))
            .sum()
    }

    /// Takes the oldest queued frame into `buf`; returns the bytes copied, or `None` when
    /// the queue is empty. A frame longer than `buf` is cut short (counted
    /// `rx_truncated`); a buffer of [`MAX_FRAME_LEN`] bytes takes any frame.
    pub fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        self.recv_with(|frame| {
            let n = frame.len().min(buf.len());
            buf[..n].copy_from_slice(&frame[..n]);
            if n < frame.len() {
                add(&self.port.stats.rx_truncated, 1);
            }
            n
        })
    }

    /// Takes the oldest queued frame and hands it to `f` in place (no copy into a bounce
    /// buffer); returns what `f` returns, or `None` when the queue is empty. The port's
    /// queue stays locked while `f` runs, which delays senders to this port: keep `f`
    /// short (a copy into guest buffers), and do not send into the switch from it (two
    /// ports doing so towards each other would deadlock).
    pub fn recv_with<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let me = &self.port;
        let mut q = lock(&me.queue);
        let (r, len) = q.pop(|frame| (f(frame), frame.len()))?;
        if q.is_empty() {
            // Reset readiness: an empty queue is an unreadable eventfd.
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&me.eventfd, &mut b);
        }
        drop(q);
        add(&me.stats.rx_frames, 1);
        add(&me.stats.rx_bytes, len as u64);
        Some(r)
    }

    /// Length of the oldest queued frame, if any.
    pub fn peek_len(&self) -> Option<usize> {
        lock(&self.port.queue).peek_len()
    }

    /// Frames waiting in the queue.
    pub fn queued(&self) -> usize {
        lock(&self.port.queue).frames
    }

    /// The eventfd that is readable exactly while the queue holds a frame (level
    /// semantics: receiving the last frame resets it; a waiter that stops receiving while
    /// frames remain should wait edge-triggered or stop waiting on it).
    pub fn eventfd(&self) -> &OwnedFd {
        &self.port.eventfd
    }

    /// The counters.
    pub fn stats(&self) -> PortStats {
        let s = &self.port.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PortStats {
            rx_frames: l(&s.rx_frames),
            rx_bytes: l(&s.rx_bytes),
            rx_dropped: l(&s.rx_dropped),
            rx_truncated: l(&s.rx_truncated),
            tx_frames: l(&s.tx_frames),
            tx_bytes: l(&s.tx_bytes),
            tx_dropped: l(&s.tx_dropped),
        }
    }
}

impl Drop for SwitchPort {
    fn drop(&mut self) {
        let id = self.port.id;
        self.switch
            .ports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|p| p.id != id);
        lock(&self.switch.fdb).forget_port(id);
        // `self.switch` drops after this; the last port's drop removes the switch.
    }
}

/// A byte ring of frames, each stored contiguously as `[le32 len][len bytes]`. When a
/// frame does not fit before the end, the rest of the ring is skipped (a `WRAP` length
/// marks it, or fewer than 4 bytes are left) and the frame goes at the start.
#[derive(Debug)]
struct Ring {
    /// Allocated (zeroed, so pages are touched only when used) at the first push.
    buf: Vec<u8>,
    cap: usize,
    /// Offset of the oldest record.
    head: usize,
    /// Offset where the next record goes.
    tail: usize,
    /// The writer has wrapped to the start and the reader has not: records occupy
    /// `head..` (up to the wrap mark) and `..tail`; otherwise `head..tail`.
    wrapped: bool,
    frames: usize,
}

impl Ring {
    fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
            head: 0,
            tail: 0,
            wrapped: false,
            frames: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.frames == 0
    }

    fn put(&mut self, at: usize, data: &[u8]) {
        let len = data.len() as u32;
        self.buf[at..at + REC_HDR].copy_from_slice(&len.to_le_bytes());
        self.buf[at + REC_HDR..at + REC_HDR + data.len()].copy_from_slice(data);
    }

    fn len_at(&self, at: usize) -> u32 {
        match self.buf.get(at..at + REC_HDR) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => WRAP,
        }
    }

    /// Appends `data`; false if it does not fit (the ring is unchanged).
    fn push(&mut self, data: &[u8]) -> bool {
        let need = REC_HDR + data.len();
        if self.frames >= PORT_QUEUE_FRAMES || need > self.cap || data.len() >= WRAP as usize {
            return false;
        }
        if self.buf.is_empty() {
            self.buf = vec![0; self.cap];
        }
        let at = if self.wrapped {
            if self.tail + need > self.head {
                return false;
            }
            self.tail
        } else if self.tail + need <= self.cap {
            self.tail
        } else if need <= self.head {
            if self.cap - self.tail >= REC_HDR {
                self.buf[self.tail..self.tail + REC_HDR].copy_from_slice(&WRAP.to_le_bytes());
            }
            self.wrapped = true;
            0
        } else {
            return false;
        };
        self.put(at, data);
        self.tail = at + need;
        self.frames += 1;
        true
    }

    /// Where the oldest record starts (following a wrap), if there is one.
    fn oldest(&mut self) -> Option<usize> {
        if self.frames == 0 {
            return None;
        }
        if self.wrapped && self.len_at(self.head) == WRAP {
            self.head = 0;
            self.wrapped = false;
        }
        Some(self.head)
    }

    fn peek_len(&mut self) -> Option<usize> {
        let at = self.oldest()?;
        Some(self.len_at(at) as usize)
    }

    /// Removes the oldest record, handing its bytes to `f`.
    fn pop<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let at = self.oldest()?;
        let len = self.len_at(at) as usize;
        let start = at + REC_HDR;
        let r = f(self.buf.get(start..start + len)?);
        self.frames -= 1;
        if self.frames == 0 {
            // Start over at the beginning: the whole ring is contiguous again.
            self.head = 0;
            self.tail = 0;
            self.wrapped = false;
        } else {
            self.head = start + len;
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::os::fd::{AsFd, BorrowedFd};
    use std::time::Duration;

    use proptest::prelude::*;
    use rustix::event::{poll, PollFd, PollFlags};

    use super::*;

    fn mac(n: u8) -> MacAddr {
        [0x02, 0, 0, 0, 0, n]
    }

    const BCAST: MacAddr = [0xff; 6];

    /// A frame from `src` to `dst` whose payload starts with `tag`.
    fn frame(dst: MacAddr, src: MacAddr, tag: u32, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len.max(18)];
        f[0..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f[14..18].copy_from_slice(&tag.to_be_bytes());
        f
    }

    fn tags(p: &SwitchPort) -> Vec<u32> {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let mut v = Vec::new();
        while let Some(n) = p.recv(&mut buf) {
            assert!(n >= 18);
            v.push(u32::from_be_bytes([buf[14], buf[15], buf[16], buf[17]]));
        }
        v
    }

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        poll(
            &mut fds,
            Some(&rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            }),
        )
        .unwrap()
            == 1
    }

    #[test]
    fn unknown_destinations_flood_then_learned_ones_go_to_one_port() {
        let reg = SwitchRegistry::new();
        let (a, b, c) = (
            reg.join("sw").unwrap(),
            reg.join("sw").unwrap(),
            reg.join("sw").unwrap(),
        );
        // Unknown destination: everyone but the sender.
        assert_eq!(a.send(&frame(mac(2), mac(1), 1, 60)), 2);
        assert_eq!((tags(&a), tags(&b), tags(&c)), (vec![], vec![1], vec![1]));
        assert_eq!(a.switch().lookup(&mac(1)), Some(a.id()));
        // b answers a: a's address was learned, so only a gets it; b is learned too.
        assert_eq!(b.send(&frame(mac(1), mac(2), 2, 60)), 1);
        assert_eq!((tags(&a), tags(&b), tags(&c)), (vec![2], vec![], vec![]));
        assert_eq!(a.switch().lookup(&mac(2)), Some(b.id()));
        assert_eq!(a.send(&frame(mac(2), mac(1), 3, 60)), 1);
        assert_eq!((tags(&a), tags(&b), tags(&c)), (vec![], vec![3], vec![]));
        // An address that moves is learned on its new port.
        assert_eq!(c.send(&frame(mac(3), mac(2), 4, 60)), 2);
        assert_eq!(a.switch().lookup(&mac(2)), Some(c.id()));
        assert_eq!(a.send(&frame(mac(2), mac(1), 5, 60)), 1);
        assert_eq!((tags(&a), tags(&b), tags(&c)), (vec![4], vec![4], vec![5]));
        assert_eq!(a.stats().tx_frames, 3);
        assert_eq!(c.stats().rx_frames, 2);
        assert_eq!(b.stats().rx_bytes, 3 * 60);
    }

    #[test]
    fn broadcast_and_multicast_flood_and_group_sources_are_not_learned() {
        let reg = SwitchRegistry::new();
        let ports: Vec<_> = (0..4).map(|_| reg.join("sw").unwrap()).collect();
        // Learn every port's address first.
        for (i, p) in ports.iter().enumerate() {
            p.send(&frame(BCAST, mac(i as u8), 0, 60));
        }
        for p in &ports {
            assert_eq!(tags(p), vec![0; 3]);
        }
        assert_eq!(ports[0].send(&frame(BCAST, mac(0), 1, 60)), 3);
        assert_eq!(
            ports[0].send(&frame([0x01, 0, 0x5e, 0, 0, 1], mac(0), 2, 60)),
            3
        );
        assert_eq!(tags(&ports[0]), Vec::<u32>::new());
        for p in &ports[1..] {
            assert_eq!(tags(p), vec![1, 2]);
        }
        // A multicast source address is not learned.
        let sw = ports[0].switch().clone();
        let n = sw.fdb_len();
        ports[1].send(&frame(mac(0), [0x01, 1, 1, 1, 1, 1], 3, 60));
        assert_eq!(sw.fdb_len(), n);
        assert_eq!(sw.lookup(&[0x01, 1, 1, 1, 1, 1]), None);
        assert_eq!(tags(&ports[0]), vec![3]);
    }

    #[test]
    fn nothing_goes_back_to_the_sender() {
        let reg = SwitchRegistry::new();
        let (a, b) = (reg.join("sw").unwrap(), reg.join("sw").unwrap());
        a.send(&frame(BCAST, mac(1), 0, 60));
        b.send(&frame(BCAST, mac(2), 0, 60));
        tags(&a);
        tags(&b);
        // Destination learned on the sender itself: filtered.
        assert_eq!(a.send(&frame(mac(1), mac(1), 1, 60)), 0);
        // Another address on a's side, learned there.
        a.send(&frame(mac(9), mac(7), 2, 60));
        assert_eq!(a.send(&frame(mac(7), mac(1), 3, 60)), 0);
        assert_eq!(tags(&a), Vec::<u32>::new());
        assert_eq!(tags(&b), vec![2]);
        // A lone port floods to nobody.
        let lone = reg.join("alone").unwrap();
        assert_eq!(lone.send(&frame(BCAST, mac(5), 1, 60)), 0);
        assert_eq!(tags(&lone), Vec::<u32>::new());
    }

    #[test]
    fn short_and_oversized_frames_are_refused_and_counted() {
        let reg = SwitchRegistry::new();
        let (a, b) = (reg.join("sw").unwrap(), reg.join("sw").unwrap());
        assert_eq!(a.send(&[0u8; 13]), 0);
        assert_eq!(a.send(&[]), 0);
        assert_eq!(a.send(&vec![0xffu8; MAX_FRAME_LEN + 1]), 0);
        assert_eq!(a.stats().tx_dropped, 3);
        assert_eq!(a.stats().tx_frames, 0);
        assert_eq!(b.queued(), 0);
        // The extremes that are allowed.
        assert_eq!(a.send(&[0xffu8; 14]), 1);
        assert_eq!(a.send(&vec![0xffu8; MAX_FRAME_LEN]), 1);
        assert_eq!(b.peek_len(), Some(14));
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        assert_eq!(b.recv(&mut buf), Some(14));
        assert_eq!(b.recv(&mut buf), Some(MAX_FRAME_LEN));
        // A short buffer gets the start of the frame.
        a.send(&[0xffu8; 100]);
        assert_eq!(b.recv(&mut buf[..10]), Some(10));
        assert_eq!(b.stats().rx_truncated, 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let reg = SwitchRegistry::new();
        let a = reg.join("sw").unwrap();
        // Room for exactly three 100-byte frames (4 + 100 each).
        let b = reg.join_with_capacity("sw", 3 * 104 + 50).unwrap();
        for i in 0..10 {
            a.send(&frame(BCAST, mac(1), i, 100));
        }
        assert_eq!(b.stats().rx_dropped, 7);
        assert_eq!(b.queued(), 3);
        assert_eq!(tags(&b), vec![0, 1, 2]);
        // Room again once drained.
        a.send(&frame(BCAST, mac(1), 10, 100));
        assert_eq!(tags(&b), vec![10]);
        // The frame-count bound holds as well.
        let c = reg.join_with_capacity("many", 1 << 20).unwrap();
        let d = reg.join("many").unwrap();
        for i in 0..PORT_QUEUE_FRAMES as u32 + 5 {
            d.send(&frame(BCAST, mac(4), i, 20));
        }
        assert_eq!(c.queued(), PORT_QUEUE_FRAMES);
        assert_eq!(c.stats().rx_dropped, 5);
    }

    #[test]
    fn the_eventfd_is_readable_exactly_while_frames_wait() {
        let reg = SwitchRegistry::new();
        let (a, b) = (reg.join("sw").unwrap(), reg.join("sw").unwrap());
        assert!(!readable(b.eventfd().as_fd()));
        a.send(&frame(BCAST, mac(1), 1, 60));
        assert!(readable(b.eventfd().as_fd()));
        a.send(&frame(BCAST, mac(1), 2, 60));
        assert!(readable(b.eventfd().as_fd()));
        let mut buf = [0u8; 100];
        assert!(b.recv(&mut buf).is_some());
        assert!(readable(b.eventfd().as_fd()), "one frame left");
        assert_eq!(b.recv_with(|f| f.len()), Some(60));
        assert!(!readable(b.eventfd().as_fd()));
        assert_eq!(b.recv(&mut buf), None);
        assert!(!readable(a.eventfd().as_fd()));
    }

    #[test]
    fn a_leaving_port_is_forgotten() {
        let reg = SwitchRegistry::new();
        let (a, b, c) = (
            reg.join("sw").unwrap(),
            reg.join("sw").unwrap(),
            reg.join("sw").unwrap(),
        );
        let sw = a.switch().clone();
        b.send(&frame(BCAST, mac(2), 0, 60));
        assert_eq!(sw.lookup(&mac(2)), Some(b.id()));
        assert_eq!(sw.port_count(), 3);
        drop(b);
        assert_eq!(sw.port_count(), 2);
        assert_eq!(sw.lookup(&mac(2)), None);
        tags(&c);
        // Its address is unknown again: flooded to the remaining ports.
        assert_eq!(a.send(&frame(mac(2), mac(1), 1, 60)), 1);
        assert_eq!(tags(&c), vec![1]);
    }

    #[test]
    fn switches_live_as_long_as_their_ports() {
        let reg = SwitchRegistry::new();
        assert!(reg.names().is_empty());
        let a = reg.join("left").unwrap();
        let b = reg.join("left").unwrap();
        let c = reg.join("right").unwrap();
        assert!(Arc::ptr_eq(a.switch(), b.switch()));
        assert!(!Arc::ptr_eq(a.switch(), c.switch()));
        assert_eq!(reg.names(), ["left", "right"]);
        assert_eq!(reg.get("left").unwrap().name(), "left");
        // Separate switches do not exchange frames.
        assert_eq!(c.send(&frame(BCAST, mac(3), 1, 60)), 0);
        assert_eq!(b.queued(), 0);
        drop(a);
        assert_eq!(reg.names(), ["left", "right"]);
        drop(b);
        assert_eq!(reg.names(), ["right"]);
        assert!(reg.get("left").is_none());
        assert_eq!(lock(&reg.switches).len(), 1, "the entry itself is removed");
        // A new port makes a new, empty switch.
        let d = reg.join("left").unwrap();
        assert_eq!(d.switch().port_count(), 1);
        assert_eq!(d.switch().fdb_len(), 0);
        drop((c, d));
        assert!(reg.names().is_empty());
        assert!(lock(&reg.switches).is_empty());
        // A registry handle dropped before its ports does not keep them from leaving.
        let e = SwitchRegistry::new().join("x").unwrap();
        drop(e);
    }

    #[test]
    fn learned_addresses_age_out_and_the_table_is_bounded() {
        let mut fdb = Fdb::new();
        fdb.learn(1, 10, 0);
        assert_eq!(fdb.lookup(1, FDB_AGING_SECS - 1), Some(10));
        assert_eq!(fdb.lookup(1, FDB_AGING_SECS), None);
        fdb.learn(1, 11, FDB_AGING_SECS);
        assert_eq!(fdb.lookup(1, FDB_AGING_SECS + 1), Some(11));
        // Full: fresh entries are kept, new addresses are not learned...
        for k in 2..=MAX_FDB_ENTRIES as u64 {
            fdb.learn(k, 12, 400);
        }
        assert_eq!(fdb.map.len(), MAX_FDB_ENTRIES);
        fdb.learn(0xfff_fff, 13, 401);
        assert_eq!(fdb.lookup(0xfff_fff, 401), None);
        assert_eq!(fdb.map.len(), MAX_FDB_ENTRIES);
        // ...until entries go stale and are swept.
        let later = 400 + FDB_AGING_SECS;
        fdb.learn(0xfff_fff, 13, later);
        assert_eq!(fdb.lookup(0xfff_fff, later), Some(13));
        assert!(fdb.map.len() < 10);
        fdb.forget_port(13);
        assert_eq!(fdb.lookup(0xfff_fff, later), None);
    }

    #[test]
    fn ports_on_many_threads_neither_panic_nor_lose_count() {
        const PORTS: usize = 4;
        const FRAMES: u32 = 20_000;
        let reg = SwitchRegistry::new();
        let ports: Vec<Arc<SwitchPort>> = (0..PORTS)
            .map(|_| reg.join_with_capacity("stress", 64 << 10).unwrap())
            .collect();
        let threads: Vec<_> = (0..PORTS)
            .map(|i| {
                let ports = ports.clone();
                std::thread::spawn(move || {
                    let me = &ports[i];
                    let mut buf = vec![0u8; MAX_FRAME_LEN];
                    let mut queued = 0usize;
                    let mut received = 0usize;
                    let mut seed = i as u32 * 7919 + 1;
                    for n in 0..FRAMES {
                        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        let dst = match seed >> 28 {
                            0 => BCAST,
                            1 => [0x01, 0, 0x5e, 0, 0, 1],
                            r => mac((r % PORTS as u32) as u8),
                        };
                        let len = 14 + (seed >> 16) as usize % 1500;
                        let f = frame(dst, mac(i as u8), n, len);
                        queued += me.send(&f);
                        while let Some(len) = me.recv(&mut buf) {
                            assert_eq!(&buf[6..12], &mac(buf[11])[..], "a whole frame");
                            assert_ne!(buf[11] as usize, i, "never its own frame");
                            assert!(len >= 14);
                            received += 1;
                        }
                    }
                    (queued, received)
                })
            })
            .collect();
        let results: Vec<(usize, usize)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let queued: usize = results.iter().map(|r| r.0).sum();
        let mut received: usize = results.iter().map(|r| r.1).sum();
        for p in &ports {
            received += tags(p).len();
        }
        assert_eq!(queued, received, "every queued frame is received once");
        let rx: u64 = ports.iter().map(|p| p.stats().rx_frames).sum();
        assert_eq!(rx as usize, received);
        for p in &ports {
            assert_eq!(p.stats().tx_frames, u64::from(FRAMES));
            assert!(!readable(p.eventfd().as_fd()));
        }
        // Ports leaving while others send.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let p = ports[0].clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    p.send(&frame(mac(1), mac(0), 0, 60));
                    p.send(&frame(BCAST, mac(0), 0, 60));
                }
            })
        };
        for _ in 0..200 {
            let q = reg.join("stress").unwrap();
            q.send(&frame(mac(0), mac(1), 0, 60));
        }
        std::thread::sleep(Duration::from_millis(10));
        stop.store(true, Ordering::Relaxed);
        sender.join().unwrap();
        assert_eq!(reg.get("stress").unwrap().port_count(), PORTS);
        drop(ports);
        assert!(reg.names().is_empty());
    }

    #[test]
    fn ring_wraps_without_losing_or_reordering() {
        let mut r = Ring::new(100);
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        // Frames of 20..40 bytes push the writer around the end many times.
        for i in 0..500u32 {
            let f = vec![i as u8; 20 + (i as usize * 7) % 21];
            if r.push(&f) {
                model.push_back(f);
            } else {
                assert!(!model.is_empty(), "an empty ring takes any frame that fits");
            }
            if i % 3 != 0 {
                let got = r.pop(|b| b.to_vec());
                assert_eq!(got, model.pop_front());
            }
        }
        while let Some(f) = model.pop_front() {
            assert_eq!(r.pop(|b| b.to_vec()), Some(f));
        }
        assert_eq!(r.pop(|b| b.len()), None);
        assert!(!r.push(&[0; 97]), "larger than the ring");
        assert!(r.push(&[0; 96]));
    }

    proptest! {
        #[test]
        fn ring_behaves_as_a_bounded_fifo(
            cap in 8usize..300,
            ops in proptest::collection::vec((any::<bool>(), 0usize..120), 1..300),
        ) {
            let mut r = Ring::new(cap);
            let mut model: VecDeque<Vec<u8>> = VecDeque::new();
            let mut used = 0usize;
            for (k, (push, len)) in ops.into_iter().enumerate() {
                if push {
                    let f = vec![k as u8; len];
                    let ok = r.push(&f);
                    if ok {
                        used += REC_HDR + len;
                        model.push_back(f);
                    }
                    // Never more bytes than the ring holds; an empty ring takes any frame
                    // that fits it.
                    prop_assert!(used <= cap);
                    if model.len() == usize::from(ok) {
                        prop_assert_eq!(ok, REC_HDR + len <= cap);
                    }
                } else {
                    let got = r.pop(|b| b.to_vec());
                    let want = model.pop_front();
                    if let Some(w) = &want {
                        used -= REC_HDR + w.len();
                    }
                    prop_assert_eq!(got, want);
                }
                prop_assert_eq!(r.frames, model.len());
                prop_assert_eq!(r.peek_len(), model.front().map(Vec::len));
            }
        }
    }
}
