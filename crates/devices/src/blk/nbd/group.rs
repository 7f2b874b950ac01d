//! [`NbdGroup`]: the [`GroupHandler`] of a worker serving virtio-blk queues from one NBD
//! connection, many requests in flight, completed in whatever order the server answers.
//!
//! # Requests
//! Each chain popped from an avail ring is taken into a *slot* (at most [`MAX_DEPTH`] per
//! queue and the ring size; the rest wait in the ring). A request becomes one or more NBD
//! commands, its *parts*: a read or write is split at the export's maximum payload, a
//! discard or write-zeroes has one part per segment of its table (read and checked once,
//! when the request is taken). Every part has a cookie naming its slot, the slot's
//! generation and the part, so a reply is matched to exactly one part in flight; a reply
//! naming anything else breaks the protocol and drops the connection.
//!
//! # Data path
//! - Sending: the queued commands go out in order with `sendmsg` (MSG_DONTWAIT) of an
//!   iovec list made of each command's 28-byte header and, for writes, the guest buffers
//!   themselves. A full socket keeps the rest queued and asks the inner epoll for
//!   EPOLLOUT; the worker sleeps meanwhile.
//! - Receiving: headers are read into a 32-byte buffer exactly (16 bytes, then the rest
//!   of a structured chunk's header, so no byte of a following payload is consumed), and
//!   read data goes from the socket into the guest buffers with `readv`; an
//!   `OFFSET_HOLE` zeroes them. Error messages are read into a bounded buffer, anything
//!   else a server may send is skipped through a fixed scratch buffer: nothing the server
//!   says makes the client allocate.
//! - Every length is checked against the part it belongs to: a data chunk outside its
//!   part's range, more data than asked for, a chunk type not valid for the command, a bad
//!   magic or an unknown cookie is a protocol violation (the connection is dropped and
//!   re-established); a reply that claims success without the whole range fails its
//!   request with IOERR.
//!
//! # Waking
//! The group's [`GroupHandler::wake_fd`] is an epoll instance of its own (registered
//! edge-triggered in the worker's) holding the socket (EPOLLIN, and EPOLLOUT while output
//! is pending) and a timerfd armed at the next deadline (a request's timeout, a reconnect
//! attempt, the end of the reconnect window). Its registrations are level-triggered, so
//! [`GroupHandler::has_work`] and [`GroupHandler::arm`] can ask it with a zero timeout.
//!
//! # Failures
//! - A lost connection (EOF, a socket error, a protocol violation, `NBD_ESHUTDOWN`)
//!   puts every unanswered part back in the queue and starts reconnecting while requests
//!   are waiting: at once when the connection had answered a request, otherwise (a
//!   server that fails right after its handshake) after a backoff doubling from 100 ms to
//!   5 s, so a broken server cannot make the worker spin. Each attempt
//!   blocks the worker at most [`super::RECONNECT_HANDSHAKE_TIMEOUT`]. When a connection
//!   is back, the queued parts are sent again (reads, writes, trims, write-zeroes and
//!   flushes can all be repeated). Requests still waiting `reconnect_delay` after the
//!   loss fail with IOERR, and so does every new request until a connection is back.
//! - A request not answered `timeout` after it was taken fails with IOERR, and the
//!   connection is dropped and re-established (a stalled server would otherwise answer
//!   it later into a chain the driver already reused).
//! - An error reply fails only its request (IOERR).
//! - Stopping ([`GroupHandler::stopped`]) waits at most [`STOP_BUDGET`] for the requests
//!   in flight, fails the rest with IOERR, and flushes the export if the group wrote since
//!   its last flush, so the worker never outlives the runtime's stop timeout. The
//!   connection stays open for the next start of the queues.
//!
//! Guest memory is only touched by this thread, inside [`GroupHandler::process`] and
//! [`GroupHandler::stopped`], while the worker owns the queues whose chains point into it;
//! nothing else (no kernel asynchronous I/O) holds a guest pointer between calls, and no
//! slot survives `stopped`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags, Timespec};
use uvdpa_virtio::worker::{GroupHandler, WorkerCtl, WorkerError, WorkerQueue};
use uvdpa_virtio::{DescriptorChain, Segment};

use super::super::queue::BlkQueue;
use super::super::request::VIRTIO_BLK_S_IOERR;
use super::handshake::{self, ExportInfo};
use super::proto::{Cmd, MAX_MESSAGE, REQUEST_LEN, SIMPLE_REPLY_LEN};
use super::{NbdSpec, RECONNECT_HANDSHAKE_TIMEOUT};

mod conn;
mod requests;
mod rx;
mod tx;

/// The longest [`GroupHandler::stopped`] waits for requests in flight (and a final
/// flush): below the runtime's 5 s stop timeout.
pub const STOP_BUDGET: Duration = Duration::from_secs(3);
/// Most requests one queue has at the server at once.
pub(crate) const MAX_DEPTH: usize = 128;
/// Most NBD commands (parts) one read or write may become: the guest chooses a request's
/// length (up to 4 GiB in one chain) and the export its maximum payload, and each part is
/// kept in the request's slot, so this bounds what a queue holds to [`MAX_DEPTH`] ×
/// `MAX_PARTS` parts (about 29 MiB) whatever the guest sends. A longer request fails with
/// IOERR; with the usual 32 MiB payload every request fits, with a 64 KiB one up to
/// 256 MiB (Linux's largest request is `seg_max` × `size_max`, at most 1022 MiB here).
pub(crate) const MAX_PARTS: u64 = 4096;
/// First reconnect backoff; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest reconnect backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Replies handled in one pass before the worker looks at its rings again.
const REPLIES_PER_PASS: usize = 1024;
/// Bytes handed to one `sendmsg`, at most (the socket takes what fits).
const SEND_BATCH: usize = 8 << 20;
/// Cookie of the flush a stopping group sends on its own.
const INTERNAL_COOKIE: u64 = u64::MAX;
/// Longest error chunk accepted: error, message length, message, offset.
const MAX_ERROR_CHUNK: u32 = 6 + MAX_MESSAGE as u32 + 8;
/// Epoll data of the socket and of the timer in the inner epoll.
const EV_SOCKET: u64 = 1;
const EV_TIMER: u64 = 2;

/// Where a part stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum PartState {
    /// Waiting to be sent (in the send queue, or for a connection).
    #[default]
    Queued,
    /// Fully sent; its reply is awaited.
    Sent,
    /// Answered (successfully or not).
    Done,
}

/// One NBD command of a request.
#[derive(Debug, Clone, Copy, Default)]
struct Part {
    /// The encoded request header (kept here: `sendmsg` reads it from this array).
    hdr: [u8; REQUEST_LEN],
    /// Export byte offset.
    offset: u64,
    /// Payload (read, write) or effect (trim, write-zeroes) length in bytes.
    len: u32,
    /// Command flags.
    flags: u16,
    state: PartState,
    /// Read data bytes received (structured replies).
    received: u32,
    /// The server answered with an error.
    failed: bool,
}

/// One request in flight.
#[derive(Debug, Default)]
struct Slot {
    chain: DescriptorChain,
    /// `WorkerQueue::index` of the queue the chain came from.
    queue: u16,
    /// The data buffers (read, write).
    iov: Vec<Segment>,
    /// Holds a request.
    in_use: bool,
    /// The command of every part (`None` until the request has parts).
    cmd: Option<Cmd>,
    /// Export offset of the first data byte (read, write).
    data_offset: u64,
    parts: Vec<Part>,
    /// Parts not yet answered.
    pending: usize,
    /// Bytes of data a successful read returns.
    read_len: usize,
    /// Bumped at every reuse: part of each cookie.
    gen: u16,
    started: Option<Instant>,
}

/// What the receiver is reading.
#[derive(Debug, Clone, Copy)]
enum Rx {
    /// Header bytes into `rx_buf[have..need]`.
    Header { have: usize, need: usize },
    /// Read data into slot `slot`'s buffers at data byte `at`.
    Data {
        slot: usize,
        part: usize,
        at: usize,
        left: usize,
        done: bool,
    },
    /// An error chunk's message (`left_msg` bytes, kept up to [`MAX_MESSAGE`]), then
    /// `left_after` bytes to skip.
    Message {
        target: Target,
        left_msg: usize,
        left_after: usize,
        error: u32,
        done: bool,
    },
}

/// What a reply is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Part { slot: usize, part: usize },
    Internal,
}

/// What [`NbdGroup::start`] made of a request.
enum Started {
    /// Its parts wait for the connection.
    InFlight,
    /// Complete at once with this status.
    Done(u8),
    /// Answered by the synchronous path (status written), with this used length.
    Sync(u32),
}

/// Why a connection was dropped.
#[derive(Debug)]
struct Lost(String);

/// The live connection.
#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    info: ExportInfo,
    /// EPOLLOUT is registered.
    want_out: bool,
    /// A request was answered successfully on it: a connection lost after that is
    /// re-established at once; one that never answered (a server that breaks the protocol
    /// right away) only after the backoff, so it cannot make the worker spin.
    healthy: bool,
}

/// Requests completed in one pass, per queue index.
#[derive(Default)]
struct Done {
    per_queue: Vec<(u16, u64, u64, u64)>,
}

impl Done {
    fn add(&mut self, queue: u16, read: u64, written: u64) {
        if let Some(e) = self.per_queue.iter_mut().find(|e| e.0 == queue) {
            e.1 += 1;
            e.2 += read;
            e.3 += written;
        } else {
            self.per_queue.push((queue, 1, read, written));
        }
    }

    fn publish(&mut self, queues: &mut [WorkerQueue]) {
        for (index, n, read, written) in self.per_queue.drain(..) {
            if let Some(q) = queues.iter_mut().find(|q| q.index == index) {
                q.finish_batch(n, read, written);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.per_queue.is_empty()
    }
}

/// The [`GroupHandler`] of the queues sharing one NBD connection (see the module docs).
pub(crate) struct NbdGroup {
    blk: BlkQueue,
    spec: NbdSpec,
    /// The export as last seen (the probe at open, then each connection).
    info: ExportInfo,
    conn: Option<Conn>,
    ep: OwnedFd,
    timer: OwnedFd,
    slots: Vec<Slot>,
    free: Vec<usize>,
    busy: usize,
    /// Requests in flight per queue index.
    busy_q: Vec<(u16, usize)>,
    /// Parts to send, in order; the first has `tx_off` bytes sent already.
    tx: VecDeque<(usize, usize)>,
    tx_off: usize,
    rx: Rx,
    rx_buf: [u8; 32],
    /// Scratch iovecs for `sendmsg`/`readv`.
    iov: Vec<Segment>,
    /// Scratch for skipped bytes and error messages.
    scratch: Box<[u8; MAX_MESSAGE]>,
    msg_len: usize,
    /// The connection was lost (or never made) at this time.
    down_since: Option<Instant>,
    next_attempt: Instant,
    backoff: Duration,
    /// Failed attempts in this outage (the first is logged at warn level, then every
    /// tenth).
    attempts: u32,
    /// Writes completed since the last flush.
    dirty: bool,
    /// The stop's own flush: `None` not sent, `Some(None)` in flight, `Some(Some(ok))`.
    internal: Option<Option<bool>>,
    internal_sent: bool,
    /// A connection was made before (later ones are reconnections).
    connected_once: bool,
}

impl std::fmt::Debug for NbdGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdGroup")
            .field("uri", &self.spec.uri.to_string())
            .field("connected", &self.conn.is_some())
            .field("busy", &self.busy)
            .finish()
    }
}

/// Appends to `out` the pieces of `segs` covering bytes `[skip, skip + len)`.
fn append_range(out: &mut Vec<Segment>, segs: &[Segment], mut skip: usize, mut len: usize) {
    for s in segs {
        if len == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(len);
        out.push(Segment {
            base: s.base.wrapping_add(skip),
            len: n,
        });
        len -= n;
        skip = 0;
    }
}

fn timespec(d: Duration) -> Timespec {
    Timespec {
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(d.subsec_nanos()),
    }
}

impl NbdGroup {
    /// A group over `blk`'s NBD backend; it connects on its first pass.
    ///
    /// # Errors
    /// The backend is not NBD, or the epoll instance or timerfd could not be made.
    pub(crate) fn new(blk: BlkQueue) -> io::Result<Self> {
        let disk = blk
            .shared()
            .backend
            .nbd()
            .ok_or_else(|| io::Error::other("NbdGroup serves only nbd backends"))?;
        let spec = disk.spec.clone();
        let info = disk.info;
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )?;
        epoll::add(
            &ep,
            &timer,
            epoll::EventData::new_u64(EV_TIMER),
            epoll::EventFlags::IN,
        )?;
        let now = Instant::now();
        Ok(Self {
            blk,
            spec,
            info,
            conn: None,
            ep,
            timer,
            slots: Vec::new(),
            free: Vec::new(),
            busy: 0,
            busy_q: Vec::new(),
            tx: VecDeque::new(),
            tx_off: 0,
            rx: Rx::Header {
                have: 0,
                need: SIMPLE_REPLY_LEN,
            },
            rx_buf: [0; 32],
            iov: Vec::new(),
            scratch: Box::new([0; MAX_MESSAGE]),
            msg_len: 0,
            down_since: Some(now),
            next_attempt: now,
            backoff: BACKOFF_START,
            attempts: 0,
            dirty: false,
            internal: None,
            internal_sent: false,
            connected_once: false,
        })
    }

    /// Slots holding a request that has server commands (parts), in slot order.
    fn waiting_slots(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.cmd.is_some())
            .map(|(i, _)| i)
            .collect()
    }

    fn busy_of(&self, queue: u16) -> usize {
        self.busy_q.iter().find(|e| e.0 == queue).map_or(0, |e| e.1)
    }

    fn add_busy(&mut self, queue: u16, delta: isize) {
        match self.busy_q.iter_mut().find(|e| e.0 == queue) {
            Some(e) => e.1 = e.1.saturating_add_signed(delta),
            None => self.busy_q.push((queue, delta.max(0) as usize)),
        }
    }

    fn depth(q: &WorkerQueue) -> usize {
        usize::from(q.queue.size()).clamp(1, MAX_DEPTH)
    }

    /// Whether the inner epoll has something (socket readable, writable when asked,
    /// timer expired), without consuming it.
    fn ep_ready(&self) -> bool {
        let mut ev = [epoll::Event {
            flags: epoll::EventFlags::empty(),
            data: epoll::EventData::new_u64(0),
        }; 2];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(epoll::wait(&self.ep, &mut ev[..], Some(&zero)), Ok(n) if n > 0)
    }

    /// Sleeps on the inner epoll for at most `d`.
    fn ep_wait(&self, d: Duration) {
        let mut ev = [epoll::Event {
            flags: epoll::EventFlags::empty(),
            data: epoll::EventData::new_u64(0),
        }; 2];
        let _ = epoll::wait(&self.ep, &mut ev[..], Some(&timespec(d)));
    }

    /// One pass: replies, deadlines, new requests (unless `pop` is off), sending.
    fn pass(
        &mut self,
        queues: &mut [WorkerQueue],
        ctl: &WorkerCtl,
        pop: bool,
        limit: Duration,
    ) -> Result<usize, WorkerError> {
        let mut done = Done::default();
        if self.conn.is_some() {
            if let Err(Lost(why)) = self.receive(queues, &mut done) {
                self.lose(&why);
            }
        }
        self.maintain(queues, &mut done, limit);
        let mut popped = 0;
        let mut result = Ok(());
        if pop {
            if self.conn.is_none() && self.busy == 0 && Instant::now() >= self.next_attempt {
                // Idle and down: try once before taking new requests.
                self.reconnect(limit);
            }
            match self.fill(queues, ctl, &mut done) {
                Ok(n) => popped = n,
                Err(e) => result = Err(e),
            }
            // New requests while down past the window fail at once.
            if popped > 0 && self.conn.is_none() {
                self.maintain(queues, &mut done, limit);
            }
        }
        if self.conn.is_some() {
            if let Err(Lost(why)) = self.send() {
                self.lose(&why);
            }
        }
        if matches!(result, Err(WorkerError::Abandoned)) {
            return result.map(|()| 0);
        }
        let progress = popped + usize::from(!done.is_empty());
        done.publish(queues);
        self.arm_timer();
        result.map(|()| progress)
    }
}

impl GroupHandler for NbdGroup {
    fn process(&mut self, queues: &mut [WorkerQueue], ctl: &WorkerCtl) -> Result<(), WorkerError> {
        for q in queues.iter_mut() {
            q.queue.set_notification(false)?;
        }
        // A bounded number of passes: the worker comes back when there is more.
        for _ in 0..64 {
            if ctl.abandoned() {
                return Err(WorkerError::Abandoned);
            }
            self.blk.trace_refresh();
            let progress = self.pass(queues, ctl, true, RECONNECT_HANDSHAKE_TIMEOUT)?;
            if progress == 0 {
                break;
            }
        }
        Ok(())
    }

    fn has_work(&mut self, queues: &mut [WorkerQueue]) -> Result<bool, WorkerError> {
        if self.ep_ready() {
            return Ok(true);
        }
        for q in queues.iter() {
            if self.busy_of(q.index) < Self::depth(q) && q.queue.has_available()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Kicks are enabled only for queues with a free slot: a full queue waits for a
    /// reply (the socket wakes the worker).
    fn arm(&mut self, queues: &mut [WorkerQueue]) -> Result<bool, WorkerError> {
        let mut work = false;
        for q in queues.iter_mut() {
            if self.busy_of(q.index) < Self::depth(q) {
                work |= q.queue.set_notification(true)?;
            }
        }
        Ok(work || self.ep_ready())
    }

    fn sandbox_needs(&self) -> uvdpa_virtio::sandbox::Needs {
        // Reconnecting happens on the worker (socket, connect, name resolution).
        uvdpa_virtio::sandbox::Needs::CONNECT
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.ep.as_fd())
    }

    fn stopped(&mut self, queues: &mut [WorkerQueue], ctl: &WorkerCtl) {
        let end = Instant::now() + STOP_BUDGET;
        while self.busy > 0 && !ctl.abandoned() {
            let now = Instant::now();
            if now >= end {
                break;
            }
            self.ep_wait((end - now).min(Duration::from_millis(50)));
            let left = end.saturating_duration_since(Instant::now());
            if self.pass(queues, ctl, false, left).is_err() {
                break;
            }
        }
        if ctl.abandoned() {
            // The owner took the rings back: forget the requests without touching them.
            for slot in &mut self.slots {
                slot.in_use = false;
                slot.cmd = None;
                slot.started = None;
            }
            self.busy = 0;
            self.busy_q.clear();
            self.free = (0..self.slots.len()).collect();
            self.tx.clear();
            return;
        }
        if self.busy > 0 {
            let mut done = Done::default();
            let waiting = self.waiting_slots();
            tracing::warn!(
                uri = %self.spec.uri,
                requests = waiting.len(),
                "NBD requests still in flight at queue stop fail with IOERR"
            );
            for i in waiting {
                self.complete(i, VIRTIO_BLK_S_IOERR, Some(queues), &mut done);
            }
            done.publish(queues);
            // Their replies may still come: start the next run on a fresh connection.
            if self.conn.is_some() {
                self.lose("requests abandoned at queue stop");
            }
        }
        self.final_flush(queues, ctl, end);
        self.arm_timer();
    }
}

impl Drop for NbdGroup {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            handshake::disconnect(&c.fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_per_queue_are_bounded() {
        let bytes = std::mem::size_of::<Part>() as u64 * MAX_PARTS * MAX_DEPTH as u64;
        assert!(bytes <= 32 << 20, "{bytes} bytes of parts per queue");
    }

    #[test]
    fn append_range_takes_a_byte_range() {
        let mut buf = [0u8; 64];
        let p = buf.as_mut_ptr();
        let segs = [
            Segment { base: p, len: 10 },
            Segment {
                base: p.wrapping_add(10),
                len: 20,
            },
        ];
        let mut out = vec![Segment { base: p, len: 1 }];
        append_range(&mut out, &segs, 5, 10);
        let got: Vec<_> = out
            .iter()
            .map(|s| (s.base as usize - p as usize, s.len))
            .collect();
        assert_eq!(got, vec![(0, 1), (5, 5), (10, 5)]);
    }
}
