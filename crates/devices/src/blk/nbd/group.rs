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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use uvdpa_virtio::worker::{GroupHandler, WorkerCtl, WorkerError, WorkerQueue};
use uvdpa_virtio::{DescriptorChain, Segment};

use super::super::backend::IOV_MAX;
use super::super::queue::BlkQueue;
use super::super::request::{
    parse, zero_segment, Request, HEADER_LEN, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use super::handshake::{self, ExportInfo};
use super::proto::{
    encode_request, Cmd, TransmissionFlags, CMD_FLAG_DF, CMD_FLAG_NO_HOLE, MAX_MESSAGE,
    REQUEST_LEN, SIMPLE_REPLY_LEN,
};
use super::{NbdSpec, RECONNECT_HANDSHAKE_TIMEOUT};

mod rx;

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

fn cookie(gen: u16, slot: usize, part: usize) -> u64 {
    (u64::from(gen) << 48) | ((slot as u64 & 0xffff) << 32) | (part as u64 & 0xffff_ffff)
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

    // ---- requests ----

    /// Takes a free slot for a request of queue `queue`, if the queue has room.
    fn take_slot(&mut self, q: &WorkerQueue) -> Option<usize> {
        if self.busy_of(q.index) >= Self::depth(q)
            || self.slots.len() >= u16::MAX as usize && self.free.is_empty()
        {
            return None;
        }
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        self.slots.push(Slot::default());
        Some(self.slots.len() - 1)
    }

    /// Writes slot `i`'s status byte, adds its used entry to `done`, frees it.
    fn complete(
        &mut self,
        i: usize,
        status: u8,
        queues: Option<&mut [WorkerQueue]>,
        done: &mut Done,
    ) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        if !slot.in_use {
            return;
        }
        slot.in_use = false;
        slot.cmd = None;
        let queue = slot.queue;
        let started = slot.started.take();
        let written = if status == VIRTIO_BLK_S_OK {
            slot.read_len
        } else {
            0
        };
        let used = match slot.chain.writable_len().checked_sub(1) {
            Some(status_at) => {
                slot.chain.write_at(status_at as usize, &[status]);
                if let Some(t) = started {
                    self.blk.traced(queue, &slot.chain, t, status);
                }
                u32::try_from(written).unwrap_or(status_at).min(status_at) + 1
            }
            None => 0,
        };
        slot.parts.clear();
        slot.pending = 0;
        if let Some(queues) = queues {
            if let Some(q) = queues.iter_mut().find(|q| q.index == queue) {
                q.queue.add_used(&slot.chain, used);
                done.add(queue, u64::from(slot.chain.readable_len()), u64::from(used));
            }
            if let Some(t) = started {
                self.blk.record_latency(t);
            }
        }
        self.busy = self.busy.saturating_sub(1);
        self.add_busy(queue, -1);
        self.free.push(i);
    }

    /// Sets up the parts of the request just popped into slot `i`; returns its status when
    /// it is already complete (GET_ID, a request that fails parsing, an empty transfer, a
    /// flush or discard the export does not need).
    fn start(&mut self, i: usize) -> Result<Started, WorkerError> {
        let limits = self.blk.limits();
        let info = self.conn.as_ref().map_or(self.info, |c| c.info);
        let Some(slot) = self.slots.get_mut(i) else {
            return Ok(Started::Done(VIRTIO_BLK_S_IOERR));
        };
        slot.gen = slot.gen.wrapping_add(1);
        slot.parts.clear();
        slot.read_len = 0;
        slot.started = Some(Instant::now());
        let req = match slot.chain.writable_len() {
            0 => None,
            _ => parse(&slot.chain, &limits).ok(),
        };
        let min = u64::from(info.min_block.max(1));
        let aligned = |o: u64, l: u64| o % min == 0 && l % min == 0;
        let cmd = match req {
            Some(Request::In { offset, len } | Request::Out { offset, len }) => {
                if len == 0 {
                    return Ok(Started::Done(VIRTIO_BLK_S_OK));
                }
                if !aligned(offset, len as u64) {
                    self.blk.log_failure(
                        slot.chain.head(),
                        &super::super::request::RequestError::Io(io::Error::other(format!(
                            "offset {offset} or length {len} is not a multiple of the export's minimum block size {min}"
                        ))),
                    );
                    return Ok(Started::Done(VIRTIO_BLK_S_IOERR));
                }
                let read = matches!(req, Some(Request::In { .. }));
                slot.iov.clear();
                if read {
                    append_range(&mut slot.iov, slot.chain.writable(), 0, len);
                    slot.read_len = len;
                } else {
                    append_range(&mut slot.iov, slot.chain.readable(), HEADER_LEN, len);
                }
                slot.data_offset = offset;
                let step = u64::from(info.max_payload.max(1));
                if (len as u64).div_ceil(step) > MAX_PARTS {
                    self.blk.log_failure(
                        slot.chain.head(),
                        &super::super::request::RequestError::Io(io::Error::other(format!(
                            "length {len} needs more than {MAX_PARTS} commands of the export's maximum payload {step}"
                        ))),
                    );
                    return Ok(Started::Done(VIRTIO_BLK_S_IOERR));
                }
                let mut at = 0u64;
                while at < len as u64 {
                    let n = step.min(len as u64 - at);
                    slot.parts.push(Part {
                        offset: offset + at,
                        len: n as u32,
                        flags: if read && info.flags.contains(TransmissionFlags::SEND_DF) {
                            CMD_FLAG_DF
                        } else {
                            0
                        },
                        ..Part::default()
                    });
                    at += n;
                }
                if read {
                    Cmd::Read
                } else {
                    Cmd::Write
                }
            }
            Some(Request::Flush) => {
                if !info.flags.contains(TransmissionFlags::SEND_FLUSH) {
                    // No cache at the server: nothing to flush.
                    return Ok(Started::Done(VIRTIO_BLK_S_OK));
                }
                slot.parts.push(Part::default());
                Cmd::Flush
            }
            Some(Request::Discard { count } | Request::WriteZeroes { count }) => {
                let write_zeroes = matches!(req, Some(Request::WriteZeroes { .. }));
                let needed = if write_zeroes {
                    TransmissionFlags::SEND_WRITE_ZEROES
                } else {
                    TransmissionFlags::SEND_TRIM
                };
                if !info.flags.contains(needed) {
                    // A discard is a hint; write-zeroes must not silently do nothing.
                    return Ok(Started::Done(if write_zeroes {
                        VIRTIO_BLK_S_IOERR
                    } else {
                        VIRTIO_BLK_S_OK
                    }));
                }
                for seg in 0..count {
                    let r = match zero_segment(&slot.chain, seg, write_zeroes, &limits) {
                        Ok(r) => r,
                        Err(e) => {
                            self.blk.log_failure(slot.chain.head(), &e);
                            return Ok(Started::Done(super::super::request::status(&e)));
                        }
                    };
                    let (offset, len) = if write_zeroes {
                        if !aligned(r.offset, r.len) {
                            return Ok(Started::Done(VIRTIO_BLK_S_IOERR));
                        }
                        (r.offset, r.len)
                    } else {
                        // A trim may shrink to the blocks it covers entirely.
                        let start = r.offset.div_ceil(min) * min;
                        let end = (r.offset + r.len) / min * min;
                        (start, end.saturating_sub(start))
                    };
                    if len == 0 {
                        continue;
                    }
                    slot.parts.push(Part {
                        offset,
                        len: u32::try_from(len).unwrap_or(u32::MAX),
                        flags: if write_zeroes && !r.unmap {
                            CMD_FLAG_NO_HOLE
                        } else {
                            0
                        },
                        ..Part::default()
                    });
                }
                if slot.parts.is_empty() {
                    return Ok(Started::Done(VIRTIO_BLK_S_OK));
                }
                if write_zeroes {
                    Cmd::WriteZeroes
                } else {
                    Cmd::Trim
                }
            }
            Some(Request::GetId { .. }) | None => {
                // GET_ID, or a request that fails parsing: the synchronous path answers
                // (it writes the status byte itself).
                let used = self.blk.handle_on(slot.queue, &slot.chain);
                return Ok(Started::Sync(used));
            }
        };
        slot.cmd = Some(cmd);
        slot.pending = slot.parts.len();
        let gen = slot.gen;
        for (k, p) in slot.parts.iter_mut().enumerate() {
            encode_request(&mut p.hdr, p.flags, cmd, cookie(gen, i, k), p.offset, p.len);
        }
        if self.conn.is_some() {
            for k in 0..self.slots.get(i).map_or(0, |s| s.parts.len()) {
                self.tx.push_back((i, k));
            }
        }
        Ok(Started::InFlight)
    }

    /// Pops chains into free slots and starts them; returns how many were popped.
    fn fill(
        &mut self,
        queues: &mut [WorkerQueue],
        ctl: &WorkerCtl,
        done: &mut Done,
    ) -> Result<usize, WorkerError> {
        let mut popped = 0;
        for qi in 0..queues.len() {
            while let Some(q) = queues.get_mut(qi) {
                let Some(i) = self.take_slot(q) else { break };
                let got = match self.slots.get_mut(i) {
                    Some(slot) => q.queue.pop(&mut slot.chain),
                    None => Ok(false),
                };
                match got {
                    Ok(true) => {}
                    Ok(false) => {
                        self.free.push(i);
                        break;
                    }
                    Err(e) => {
                        self.free.push(i);
                        return Err(e.into());
                    }
                }
                popped += 1;
                let index = q.index;
                if let Some(slot) = self.slots.get_mut(i) {
                    slot.queue = index;
                    slot.in_use = true;
                    slot.cmd = None;
                }
                self.busy += 1;
                self.add_busy(index, 1);
                match self.start(i)? {
                    Started::InFlight => {}
                    Started::Sync(used) => {
                        if ctl.abandoned() {
                            return Err(WorkerError::Abandoned);
                        }
                        self.finish_sync(i, used, queues, done);
                    }
                    Started::Done(status) => {
                        if status != VIRTIO_BLK_S_OK {
                            if let Some(slot) = self.slots.get_mut(i) {
                                slot.read_len = 0;
                            }
                        }
                        self.complete(i, status, Some(queues), done);
                    }
                }
            }
        }
        Ok(popped)
    }

    /// Completes slot `i`, answered by [`BlkQueue::handle`] (status written; `used` is
    /// the used length it returned, its latency counted).
    fn finish_sync(&mut self, i: usize, used: u32, queues: &mut [WorkerQueue], done: &mut Done) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.in_use = false;
        slot.started = None;
        let queue = slot.queue;
        if let Some(q) = queues.iter_mut().find(|q| q.index == queue) {
            q.queue.add_used(&slot.chain, used);
            done.add(queue, u64::from(slot.chain.readable_len()), u64::from(used));
        }
        self.busy = self.busy.saturating_sub(1);
        self.add_busy(queue, -1);
        self.free.push(i);
    }

    // ---- the connection ----

    /// Drops the connection: every unanswered part goes back to waiting.
    fn lose(&mut self, why: &str) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let _ = epoll::delete(&self.ep, &conn.fd);
        let healthy = conn.healthy;
        drop(conn);
        self.tx.clear();
        self.tx_off = 0;
        self.rx = Rx::Header {
            have: 0,
            need: SIMPLE_REPLY_LEN,
        };
        for slot in &mut self.slots {
            if slot.cmd.is_none() {
                continue;
            }
            for p in &mut slot.parts {
                if p.state != PartState::Done {
                    p.state = PartState::Queued;
                    p.received = 0;
                }
            }
        }
        if self.internal == Some(None) {
            self.internal = None;
        }
        let now = Instant::now();
        self.down_since = Some(now);
        if healthy {
            self.next_attempt = now;
            self.backoff = BACKOFF_START;
        } else {
            self.next_attempt = now + self.backoff;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
        self.attempts = 0;
        tracing::warn!(
            uri = %self.spec.uri,
            in_flight = self.busy,
            reconnect_delay = ?self.spec.reconnect_delay,
            "NBD connection lost: {why}; reconnecting"
        );
    }

    /// Tries to connect (blocking at most `limit`); on success queues every unanswered
    /// part again, oldest request first.
    fn reconnect(&mut self, limit: Duration) {
        let now = Instant::now();
        let timeout = RECONNECT_HANDSHAKE_TIMEOUT
            .min(self.spec.timeout)
            .min(limit);
        if timeout.is_zero() {
            return;
        }
        match handshake::connect(&self.spec.uri, timeout) {
            Ok((fd, info)) => {
                if let Err(e) = epoll::add(
                    &self.ep,
                    &fd,
                    epoll::EventData::new_u64(EV_SOCKET),
                    epoll::EventFlags::IN,
                ) {
                    tracing::warn!(uri = %self.spec.uri, "Watching the NBD socket failed: {e}");
                    self.next_attempt = now + self.backoff;
                    return;
                }
                let capacity = self.blk.limits().capacity;
                if info.size < capacity {
                    tracing::warn!(
                        uri = %self.spec.uri,
                        size = info.size,
                        capacity,
                        "the NBD export shrank: requests past its end will fail"
                    );
                }
                if self.connected_once {
                    tracing::info!(uri = %self.spec.uri, requeued = self.busy, "NBD connection re-established");
                } else {
                    tracing::debug!(uri = %self.spec.uri, "NBD connection established");
                }
                self.connected_once = true;
                self.info = info;
                self.conn = Some(Conn {
                    fd,
                    info,
                    want_out: false,
                    healthy: false,
                });
                self.down_since = None;
                self.attempts = 0;
                let mut order: Vec<(Instant, usize)> = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.cmd.is_some())
                    .map(|(i, s)| (s.started.unwrap_or(now), i))
                    .collect();
                order.sort_unstable();
                for (_, i) in order {
                    let n = self.slots.get(i).map_or(0, |s| s.parts.len());
                    for k in 0..n {
                        if self
                            .slots
                            .get(i)
                            .and_then(|s| s.parts.get(k))
                            .is_some_and(|p| p.state == PartState::Queued)
                        {
                            self.tx.push_back((i, k));
                        }
                    }
                }
            }
            Err(e) => {
                self.attempts += 1;
                tracing::debug!(uri = %self.spec.uri, attempts = self.attempts, "NBD reconnect failed: {}", error_chain(&e));
                if self.attempts == 1 || self.attempts % 10 == 0 {
                    tracing::warn!(
                        uri = %self.spec.uri,
                        attempts = self.attempts,
                        "NBD reconnect failed: {}",
                        error_chain(&e)
                    );
                }
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Sends queued parts until the socket is full.
    fn send(&mut self) -> Result<(), Lost> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let fd = conn.fd.as_raw_fd();
        while !self.tx.is_empty() {
            self.iov.clear();
            let mut off = self.tx_off;
            let mut bytes = 0usize;
            for &(s, p) in self.tx.iter() {
                if self.iov.len() >= IOV_MAX - 1 || bytes >= SEND_BATCH {
                    break;
                }
                let Some(slot) = self.slots.get(s) else {
                    continue;
                };
                let Some(part) = slot.parts.get(p) else {
                    continue;
                };
                if off < REQUEST_LEN {
                    self.iov.push(Segment {
                        base: part.hdr.as_ptr().wrapping_add(off).cast_mut(),
                        len: REQUEST_LEN - off,
                    });
                    bytes += REQUEST_LEN - off;
                }
                if slot.cmd == Some(Cmd::Write) {
                    let skip = off.saturating_sub(REQUEST_LEN);
                    let start = (part.offset - slot.data_offset) as usize + skip;
                    let len = (part.len as usize).saturating_sub(skip);
                    append_range(&mut self.iov, &slot.iov, start, len);
                    bytes += len;
                }
                off = 0;
            }
            let n = self.iov.len().min(IOV_MAX);
            // SAFETY: a msghdr of `n` iovecs from `self.iov`, which is layout-identical to
            // `iovec` (asserted in `backend`). They point at part headers in `self.slots`
            // (not touched during the call) and at the device-readable guest buffers of
            // write requests, validated by the queue against guest memory that stays
            // mapped while the worker owns the queue; guest memory is never a Rust object.
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = self.iov.as_mut_ptr().cast::<libc::iovec>();
                msg.msg_iovlen = n as _;
                libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            };
            if sent < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        return self.want_out(true);
                    }
                    _ => return Err(Lost(format!("sending failed: {e}"))),
                }
            }
            let mut left = sent as usize;
            while left > 0 {
                let Some(&(s, p)) = self.tx.front() else {
                    break;
                };
                let total = REQUEST_LEN
                    + match self.slots.get(s) {
                        Some(slot) if slot.cmd == Some(Cmd::Write) => {
                            slot.parts.get(p).map_or(0, |x| x.len as usize)
                        }
                        _ => 0,
                    };
                let rest = total - self.tx_off;
                if left >= rest {
                    left -= rest;
                    self.tx_off = 0;
                    self.tx.pop_front();
                    if let Some(part) = self.slots.get_mut(s).and_then(|x| x.parts.get_mut(p)) {
                        part.state = PartState::Sent;
                    }
                } else {
                    self.tx_off += left;
                    left = 0;
                }
            }
        }
        self.want_out(false)
    }

    /// Registers or drops EPOLLOUT interest.
    fn want_out(&mut self, on: bool) -> Result<(), Lost> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if conn.want_out == on {
            return Ok(());
        }
        let flags = if on {
            epoll::EventFlags::IN | epoll::EventFlags::OUT
        } else {
            epoll::EventFlags::IN
        };
        epoll::modify(
            &self.ep,
            &conn.fd,
            epoll::EventData::new_u64(EV_SOCKET),
            flags,
        )
        .map_err(|e| Lost(format!("epoll_ctl failed: {e}")))?;
        conn.want_out = on;
        Ok(())
    }

    /// Timeouts, the reconnect window, reconnect attempts. `limit` bounds the blocking
    /// time of a reconnect attempt.
    fn maintain(&mut self, queues: &mut [WorkerQueue], done: &mut Done, limit: Duration) {
        let now = Instant::now();
        let timeout = self.spec.timeout;
        let expired: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.cmd.is_some() && s.started.is_some_and(|t| now.duration_since(t) >= timeout)
            })
            .map(|(i, _)| i)
            .collect();
        if !expired.is_empty() {
            for &i in &expired {
                let head = self.slots.get(i).map_or(0, |s| s.chain.head());
                self.blk.log_failure(
                    head,
                    &super::super::request::RequestError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no NBD reply within {timeout:?}"),
                    )),
                );
                self.complete(i, VIRTIO_BLK_S_IOERR, Some(queues), done);
            }
            if self.conn.is_some() {
                self.lose(&format!(
                    "{} request(s) timed out after {timeout:?}",
                    expired.len()
                ));
            }
        }
        if self.conn.is_none() && self.busy > 0 {
            if Instant::now() >= self.next_attempt {
                self.reconnect(limit);
            }
            if self.conn.is_none() {
                let over = self
                    .down_since
                    .map_or(true, |t| Instant::now() >= t + self.spec.reconnect_delay);
                if over {
                    let waiting: Vec<usize> = self
                        .slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.cmd.is_some())
                        .map(|(i, _)| i)
                        .collect();
                    for i in waiting {
                        self.complete(i, VIRTIO_BLK_S_IOERR, Some(queues), done);
                    }
                }
            }
        }
    }

    /// Arms the timer at the next deadline (or disarms it).
    fn arm_timer(&self) {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for s in &self.slots {
            if let (Some(_), Some(t)) = (s.cmd, s.started) {
                at(t + self.spec.timeout);
            }
        }
        if self.conn.is_none() && self.busy > 0 {
            at(self.next_attempt);
            if let Some(t) = self.down_since {
                at(t + self.spec.reconnect_delay);
            }
        }
        let value = match next {
            None => Duration::ZERO,
            Some(t) => t
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        };
        let spec = Itimerspec {
            it_interval: timespec(Duration::ZERO),
            it_value: timespec(value),
        };
        let _ = timerfd_settime(&self.timer, TimerfdTimerFlags::empty(), &spec);
        // Reading clears an expiry that happened before the new setting.
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.timer, &mut b);
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

    /// At stop: the group's own flush, if it wrote since the last one.
    fn final_flush(&mut self, queues: &mut [WorkerQueue], ctl: &WorkerCtl, end: Instant) {
        let flushes = self
            .conn
            .as_ref()
            .is_some_and(|c| c.info.flags.contains(TransmissionFlags::SEND_FLUSH));
        if !self.dirty || !flushes {
            return;
        }
        let mut hdr = [0u8; REQUEST_LEN];
        encode_request(&mut hdr, 0, Cmd::Flush, INTERNAL_COOKIE, 0, 0);
        self.internal = Some(None);
        self.internal_sent = false;
        let fd = match self.conn.as_ref() {
            Some(c) => c.fd.as_raw_fd(),
            None => return,
        };
        // Blocking is fine here: a 28-byte write to a socket whose queue was drained.
        let mut off = 0;
        while off < REQUEST_LEN && Instant::now() < end {
            let Some(rest) = hdr.get(off..) else { break };
            // SAFETY: `rest` is a live byte slice.
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                off += n as usize;
            } else if io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                self.ep_wait(Duration::from_millis(10));
            } else {
                break;
            }
        }
        self.internal_sent = off == REQUEST_LEN;
        while self.internal == Some(None)
            && self.internal_sent
            && Instant::now() < end
            && !ctl.abandoned()
        {
            self.ep_wait(
                end.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
            );
            let mut done = Done::default();
            if let Err(Lost(why)) = self.receive(queues, &mut done) {
                self.lose(&why);
            }
        }
        match self.internal {
            Some(Some(true)) => self.dirty = false,
            _ => {
                tracing::warn!(uri = %self.spec.uri, "Flushing the NBD export at queue stop failed or timed out")
            }
        }
        self.internal = None;
        self.internal_sent = false;
    }
}

/// `e` and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
            let waiting: Vec<usize> = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.cmd.is_some())
                .map(|(i, _)| i)
                .collect();
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
    fn cookies_name_generation_slot_and_part() {
        let c = cookie(0xbeef, 513, 7);
        assert_eq!(c >> 48, 0xbeef);
        assert_eq!((c >> 32) & 0xffff, 513);
        assert_eq!(c & 0xffff_ffff, 7);
        assert_ne!(cookie(u16::MAX, 0xffff, 0xffff_ffff), 0);
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
