//! The per-request state machine of [`super::AioGroup`]: what a request submits first,
//! and what it does when an operation completes (resume a short transfer, retry after
//! -EAGAIN/-EINTR, move to the next discard/write-zeroes segment, or finish).

use std::io;

use io_uring::{opcode, types};
use rustix::io::Errno;
use uvdpa_virtio::worker::{QueueHandler, WorkerError};
use uvdpa_virtio::Segment;

use super::super::backend::{buffers_aligned, punch_hole, unsupported, zero_modes, IOV_MAX};
use super::super::queue::select;
use super::super::request::{
    parse, status, zero_segment, Request, RequestError, ZeroRange, HEADER_LEN, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};
use super::{AioGroup, Op, Step, MAX_RETRIES};

/// Drops the first `n` transferred bytes of `iov[*pos..]`.
pub(super) fn consume(iov: &mut [Segment], pos: &mut usize, mut n: usize) {
    while n > 0 {
        let Some(s) = iov.get_mut(*pos) else { break };
        if n < s.len {
            s.base = s.base.wrapping_add(n);
            s.len -= n;
            return;
        }
        n -= s.len;
        *pos += 1;
    }
}

impl AioGroup {
    /// Pushes the next operation of slot `i` (its `op`, at its `pos`/`offset`).
    pub(super) fn push(&mut self, i: usize) -> io::Result<()> {
        let fd = types::Fd(self.fd);
        let slot = self
            .slots
            .get(i)
            .ok_or_else(|| io::Error::other("no such slot"))?;
        let tag = i as u64;
        let entry = match slot.op {
            Op::Read | Op::Write => {
                let rest = slot.iov.get(slot.pos..).unwrap_or_default();
                let n = u32::try_from(rest.len().min(IOV_MAX)).unwrap_or(1);
                let iov = rest.as_ptr().cast::<libc::iovec>();
                if matches!(slot.op, Op::Read) {
                    opcode::Readv::new(fd, iov, n).offset(slot.offset).build()
                } else {
                    opcode::Writev::new(fd, iov, n).offset(slot.offset).build()
                }
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Zero {
                write_zeroes,
                mode,
                range,
                ..
            } => {
                let flags = if write_zeroes {
                    zero_modes(range.unmap)
                        .get(mode)
                        .copied()
                        .unwrap_or_else(punch_hole)
                } else {
                    punch_hole()
                };
                let mode = i32::try_from(flags.bits()).unwrap_or(0);
                opcode::Fallocate::new(fd, range.len)
                    .offset(range.offset)
                    .mode(mode)
                    .build()
            }
            Op::Idle => return Err(io::Error::other("idle slot submitted")),
        };
        // SAFETY: `Segment` is layout-identical to `iovec` (asserted in `backend`). The
        // iovec array is the slot's `iov`, which is neither touched nor moved until this
        // operation's completion is reaped (`slots` never shrinks, and a Vec's buffer
        // does not move when the Vec holding it moves). The buffers it describes are
        // guest memory validated by the queue and kept mapped by `self.mem` (set by every
        // caller before the entry reaches the kernel) until the request completes; guest
        // memory is never a Rust object. Flush and fallocate point to no memory.
        unsafe { self.ring.push(&entry.user_data(tag)) }
    }

    /// Starts the request just popped into slot `i`: submits its first operation, or
    /// executes it at once. Returns `Some(used length)` when it is already complete.
    pub(super) fn start(&mut self, i: usize) -> Result<Option<u32>, WorkerError> {
        let Some(slot) = self.slots.get_mut(i) else {
            return Ok(Some(0));
        };
        let chain = &slot.chain;
        let direct = self.blk.limits().direct_align;
        let req = match chain.writable_len() {
            0 => None,
            _ => parse(chain, &self.blk.limits()).ok(),
        };
        slot.pos = 0;
        slot.retries = 0;
        slot.len = 0;
        slot.op = match req {
            Some(Request::In { offset, len }) => {
                select(&mut slot.iov, chain.writable(), 0, len);
                slot.offset = offset;
                slot.len = len;
                Op::Read
            }
            Some(Request::Out { offset, len }) => {
                select(&mut slot.iov, chain.readable(), HEADER_LEN, len);
                slot.offset = offset;
                Op::Write
            }
            Some(Request::Flush) => Op::Flush,
            Some(Request::Discard { count } | Request::WriteZeroes { count }) => Op::Zero {
                write_zeroes: matches!(req, Some(Request::WriteZeroes { .. })),
                seg: 0,
                count,
                mode: 0,
                range: ZeroRange {
                    offset: 0,
                    len: 0,
                    unmap: false,
                },
            },
            Some(Request::GetId { .. }) | None => Op::Idle,
        };
        let bounce = matches!(slot.op, Op::Read | Op::Write)
            && (slot.iov.is_empty()
                || direct.is_some_and(|align| !buffers_aligned(&slot.iov, align)));
        if matches!(slot.op, Op::Idle) || bounce {
            // GET_ID, a request that fails parsing (the sync path writes its status),
            // an empty transfer, or O_DIRECT with unaligned guest buffers (bounce buffer).
            slot.op = Op::Idle;
            return Ok(Some(self.blk.handle(&slot.chain)?));
        }
        let step = if let Op::Zero { .. } = slot.op {
            self.next_zero(i, true)
        } else {
            match self.push(i) {
                Ok(()) => Step::Pending,
                Err(e) => self.failed(i, RequestError::Io(e)),
            }
        };
        Ok(match step {
            Step::Pending => None,
            Step::Done(st, written) => Some(self.finish(i, st, written)),
        })
    }

    /// Moves a discard/write-zeroes request to its next non-empty segment (`first`: its
    /// first one) and submits it.
    pub(super) fn next_zero(&mut self, i: usize, first: bool) -> Step {
        let limits = self.blk.limits();
        let Some(slot) = self.slots.get_mut(i) else {
            return Step::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        let Op::Zero {
            write_zeroes,
            mut seg,
            count,
            ..
        } = slot.op
        else {
            return Step::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        if !first {
            seg += 1;
        }
        loop {
            if seg >= count {
                return Step::Done(VIRTIO_BLK_S_OK, 0);
            }
            // Re-read and re-checked: the driver may have changed the table meanwhile.
            match zero_segment(&slot.chain, seg, write_zeroes, &limits) {
                Ok(range) if range.len == 0 => seg += 1,
                Ok(range) => {
                    slot.op = Op::Zero {
                        write_zeroes,
                        seg,
                        count,
                        mode: 0,
                        range,
                    };
                    break;
                }
                Err(e) => return self.failed(i, e),
            }
        }
        match self.push(i) {
            Ok(()) => Step::Pending,
            Err(e) => self.failed(i, RequestError::Io(e)),
        }
    }

    /// Logs a failed request and returns its status.
    pub(super) fn failed(&self, i: usize, e: RequestError) -> Step {
        let head = self.slots.get(i).map_or(0, |s| s.chain.head());
        self.blk.log_failure(head, &e);
        Step::Done(status(&e), 0)
    }

    /// Resubmits slot `i`'s operation after -EAGAIN/-EINTR, a bounded number of times.
    pub(super) fn retry(&mut self, i: usize, errno: i32) -> Step {
        let retries = self.slots.get_mut(i).map_or(u32::MAX, |s| {
            s.retries += 1;
            s.retries
        });
        if retries > MAX_RETRIES {
            return self.failed(i, RequestError::Io(io::Error::from_raw_os_error(errno)));
        }
        match self.push(i) {
            Ok(()) => Step::Pending,
            Err(e) => self.failed(i, RequestError::Io(e)),
        }
    }

    /// What slot `i` does after its operation completed with `result`.
    pub(super) fn advance(&mut self, i: usize, result: i32) -> Step {
        let Some(slot) = self.slots.get_mut(i) else {
            return Step::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        let errno = result.checked_neg().filter(|&e| e > 0);
        if let Some(e @ (libc::EAGAIN | libc::EINTR)) = errno {
            return self.retry(i, e);
        }
        match slot.op {
            Op::Read | Op::Write => {
                let write = matches!(slot.op, Op::Write);
                let n = match usize::try_from(result) {
                    Ok(0) if write => io::Error::from(io::ErrorKind::WriteZero),
                    Ok(0) => io::Error::from(io::ErrorKind::UnexpectedEof),
                    Ok(n) => {
                        consume(&mut slot.iov, &mut slot.pos, n);
                        slot.offset = slot.offset.saturating_add(n as u64);
                        slot.retries = 0;
                        if slot.pos >= slot.iov.len() {
                            let len = if write { 0 } else { slot.len };
                            return Step::Done(VIRTIO_BLK_S_OK, len);
                        }
                        // A short transfer (or more than IOV_MAX segments): go on where
                        // the kernel stopped.
                        return match self.push(i) {
                            Ok(()) => Step::Pending,
                            Err(e) => self.failed(i, RequestError::Io(e)),
                        };
                    }
                    Err(_) => io::Error::from_raw_os_error(errno.unwrap_or(libc::EIO)),
                };
                self.failed(i, RequestError::Io(n))
            }
            Op::Flush => match errno {
                None => Step::Done(VIRTIO_BLK_S_OK, 0),
                Some(e) => self.failed(i, RequestError::Io(io::Error::from_raw_os_error(e))),
            },
            Op::Zero {
                write_zeroes,
                seg,
                count,
                mode,
                range,
            } => match errno {
                None => self.next_zero(i, false),
                Some(e) if unsupported(Errno::from_raw_os_error(e)) => {
                    if write_zeroes && mode + 1 < zero_modes(range.unmap).len() {
                        slot.op = Op::Zero {
                            write_zeroes,
                            seg,
                            count,
                            mode: mode + 1,
                            range,
                        };
                        return match self.push(i) {
                            Ok(()) => Step::Pending,
                            Err(e) => self.failed(i, RequestError::Io(e)),
                        };
                    }
                    if write_zeroes {
                        // Neither mode: write the zeroes (synchronously, see the module docs).
                        let file = self.blk.shared().backend.file();
                        let r = file.map(|f| f.fill_zeroes(range.offset, range.len));
                        if let Some(Err(e)) = r {
                            return self.failed(i, RequestError::Io(e));
                        }
                    }
                    // A discard the file cannot do is a no-op (it is a hint).
                    self.next_zero(i, false)
                }
                Some(e) => self.failed(i, RequestError::Io(io::Error::from_raw_os_error(e))),
            },
            Op::Idle => Step::Done(VIRTIO_BLK_S_IOERR, 0),
        }
    }
}
