//! The receiving side of [`NbdGroup`]: reading replies (NBD protocol, "Simple reply
//! message", "Structured reply chunk message", "Structured reply types") and matching
//! them to the parts in flight. Every header is read exactly, checked against the part
//! its cookie names, and only then is its payload read: into the guest buffers (read
//! data), zeroed in them (holes), into a bounded buffer (error messages) or skipped.

use std::io;
use std::os::fd::AsRawFd;

use uvdpa_virtio::worker::WorkerQueue;

use super::super::super::backend::IOV_MAX;
use super::super::super::request::{RequestError, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use super::super::proto::{
    be_u16_at, be_u32, be_u64, decode_reply_start, error_name, Cmd, ReplyStart, CHUNK_HEADER_LEN,
    ESHUTDOWN, MAX_MESSAGE, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_LEN,
};
use super::{
    append_range, Done, Lost, NbdGroup, Part, PartState, Rx, Target, BACKOFF_START,
    INTERNAL_COOKIE, MAX_ERROR_CHUNK, REPLIES_PER_PASS,
};

impl NbdGroup {
    /// Reads and handles replies; returns after [`REPLIES_PER_PASS`] or when the socket
    /// is drained.
    pub(super) fn receive(
        &mut self,
        queues: &mut [WorkerQueue],
        done: &mut Done,
    ) -> Result<(), Lost> {
        let mut replies = 0;
        while replies < REPLIES_PER_PASS {
            let Some(conn) = self.conn.as_ref() else {
                return Ok(());
            };
            let fd = conn.fd.as_raw_fd();
            match self.rx {
                Rx::Header { have, need } => {
                    let Some(buf) = self.rx_buf.get_mut(have..need) else {
                        return Err(Lost("internal: bad header state".into()));
                    };
                    match recv(fd, buf)? {
                        None => return Ok(()),
                        Some(n) => {
                            let have = have + n;
                            self.rx = Rx::Header { have, need };
                            if have == need {
                                replies += 1;
                                self.on_header(need, queues, done)?;
                            }
                        }
                    }
                }
                Rx::Data {
                    slot,
                    part,
                    at,
                    left,
                    done: last,
                } => {
                    let Some(s) = self.slots.get(slot) else {
                        return Err(Lost("internal: no slot".into()));
                    };
                    self.iov.clear();
                    append_range(&mut self.iov, &s.iov, at, left);
                    let n = self.iov.len().min(IOV_MAX);
                    // SAFETY: the iovecs are a sub-range of the device-writable guest
                    // buffers of the read request in `slot` (validated by the queue,
                    // mapped while the worker owns the queue); guest memory is never a
                    // Rust object.
                    let r = unsafe {
                        libc::readv(fd, self.iov.as_ptr().cast::<libc::iovec>(), n as i32)
                    };
                    let Some(got) = io_result(r)? else {
                        return Ok(());
                    };
                    let left = left - got.min(left);
                    if left == 0 {
                        self.rx = Rx::Header {
                            have: 0,
                            need: SIMPLE_REPLY_LEN,
                        };
                        if last {
                            self.finish_part(Target::Part { slot, part }, None, queues, done);
                        }
                    } else {
                        self.rx = Rx::Data {
                            slot,
                            part,
                            at: at + got,
                            left,
                            done: last,
                        };
                    }
                }
                Rx::Message {
                    target,
                    left_msg,
                    left_after,
                    error,
                    done: last,
                } => {
                    let (want, keep) = if left_msg > 0 {
                        let room = MAX_MESSAGE - self.msg_len.min(MAX_MESSAGE);
                        if room > 0 {
                            (left_msg.min(room), true)
                        } else {
                            (left_msg.min(MAX_MESSAGE), false)
                        }
                    } else {
                        (left_after.min(MAX_MESSAGE), false)
                    };
                    if want == 0 {
                        self.rx = Rx::Header {
                            have: 0,
                            need: SIMPLE_REPLY_LEN,
                        };
                        let msg = String::from_utf8_lossy(
                            self.scratch.get(..self.msg_len).unwrap_or_default(),
                        )
                        .into_owned();
                        self.fail_part(target, error, &msg);
                        if last {
                            self.finish_part(target, None, queues, done);
                        }
                        continue;
                    }
                    let buf = if keep {
                        self.scratch.get_mut(self.msg_len..self.msg_len + want)
                    } else {
                        // Past the kept message: read over its tail, which is dropped.
                        self.scratch.get_mut(..want)
                    };
                    let Some(buf) = buf else {
                        return Err(Lost("internal: bad message state".into()));
                    };
                    let Some(n) = recv(fd, buf)? else {
                        return Ok(());
                    };
                    if keep {
                        self.msg_len += n;
                    }
                    self.rx = if left_msg > 0 {
                        Rx::Message {
                            target,
                            left_msg: left_msg - n,
                            left_after,
                            error,
                            done: last,
                        }
                    } else {
                        Rx::Message {
                            target,
                            left_msg,
                            left_after: left_after - n,
                            error,
                            done: last,
                        }
                    };
                }
            }
        }
        Ok(())
    }

    /// Finds the part `cookie` names; it must be fully sent and unanswered.
    pub(super) fn target(&self, cookie: u64) -> Result<Target, Lost> {
        if cookie == INTERNAL_COOKIE && self.internal == Some(None) && self.internal_sent {
            return Ok(Target::Internal);
        }
        let gen = (cookie >> 48) as u16;
        let slot = ((cookie >> 32) & 0xffff) as usize;
        let part = (cookie & 0xffff_ffff) as usize;
        let ok = self.slots.get(slot).is_some_and(|s| {
            s.cmd.is_some()
                && s.gen == gen
                && s.parts
                    .get(part)
                    .is_some_and(|p| p.state == PartState::Sent)
        });
        if ok {
            Ok(Target::Part { slot, part })
        } else {
            Err(Lost(format!(
                "reply for cookie {cookie:#x}, which is not in flight"
            )))
        }
    }

    pub(super) fn cmd_of(&self, t: Target) -> Option<Cmd> {
        match t {
            Target::Internal => Some(Cmd::Flush),
            Target::Part { slot, .. } => self.slots.get(slot).and_then(|s| s.cmd),
        }
    }

    pub(super) fn part_mut(&mut self, t: Target) -> Option<&mut Part> {
        match t {
            Target::Internal => None,
            Target::Part { slot, part } => {
                self.slots.get_mut(slot).and_then(|s| s.parts.get_mut(part))
            }
        }
    }

    /// Handles a complete header of `len` bytes in `rx_buf`.
    pub(super) fn on_header(
        &mut self,
        len: usize,
        queues: &mut [WorkerQueue],
        done: &mut Done,
    ) -> Result<(), Lost> {
        let structured = self.conn.as_ref().is_some_and(|c| c.info.structured);
        let mut start = [0u8; SIMPLE_REPLY_LEN];
        start.copy_from_slice(&self.rx_buf[..SIMPLE_REPLY_LEN]);
        let next = Rx::Header {
            have: 0,
            need: SIMPLE_REPLY_LEN,
        };
        match decode_reply_start(&start) {
            ReplyStart::BadMagic(m) => Err(Lost(format!("reply magic {m:#x}"))),
            ReplyStart::Simple { error, cookie } => {
                let t = self.target(cookie)?;
                let cmd = self.cmd_of(t);
                self.rx = next;
                if cmd == Some(Cmd::Read) && structured {
                    return Err(Lost(
                        "a simple reply to a read after structured replies were negotiated".into(),
                    ));
                }
                if error == ESHUTDOWN {
                    return Err(Lost("the server is shutting down (NBD_ESHUTDOWN)".into()));
                }
                if error != 0 {
                    self.fail_part(t, error, "");
                    self.finish_part(t, None, queues, done);
                    return Ok(());
                }
                if let (Some(Cmd::Read), Target::Part { slot, part }) = (cmd, t) {
                    let (at, left) = self
                        .slots
                        .get(slot)
                        .and_then(|s| {
                            s.parts
                                .get(part)
                                .map(|p| ((p.offset - s.data_offset) as usize, p.len as usize))
                        })
                        .unwrap_or((0, 0));
                    if let Some(p) = self.part_mut(t) {
                        p.received = left as u32;
                    }
                    self.rx = Rx::Data {
                        slot,
                        part,
                        at,
                        left,
                        done: true,
                    };
                    return Ok(());
                }
                self.finish_part(t, None, queues, done);
                Ok(())
            }
            ReplyStart::Chunk {
                flags,
                kind,
                cookie,
            } => {
                if !structured {
                    return Err(Lost("a structured reply that was not negotiated".into()));
                }
                if len == SIMPLE_REPLY_LEN {
                    self.rx = Rx::Header {
                        have: SIMPLE_REPLY_LEN,
                        need: CHUNK_HEADER_LEN,
                    };
                    return Ok(());
                }
                let t = self.target(cookie)?;
                let cmd = self.cmd_of(t);
                let length = be_u32(&self.rx_buf, 16);
                let last = flags & REPLY_FLAG_DONE != 0;
                let (part_off, part_len) = match t {
                    Target::Part { slot, part } => self
                        .slots
                        .get(slot)
                        .and_then(|s| s.parts.get(part).map(|p| (p.offset, p.len)))
                        .unwrap_or((0, 0)),
                    Target::Internal => (0, 0),
                };
                match kind {
                    REPLY_TYPE_NONE => {
                        if length != 0 || !last {
                            return Err(Lost(format!(
                                "NBD_REPLY_TYPE_NONE of {length} bytes, flags {flags:#x}"
                            )));
                        }
                        self.rx = next;
                        self.finish_part(t, None, queues, done);
                        Ok(())
                    }
                    REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE if cmd != Some(Cmd::Read) => {
                        Err(Lost(format!("a content chunk in reply to {cmd:?}")))
                    }
                    REPLY_TYPE_OFFSET_DATA => {
                        if length < 9 || length - 8 > part_len {
                            return Err(Lost(format!("NBD_REPLY_TYPE_OFFSET_DATA of {length} bytes for a {part_len}-byte read")));
                        }
                        if len == CHUNK_HEADER_LEN {
                            self.rx = Rx::Header {
                                have: CHUNK_HEADER_LEN,
                                need: CHUNK_HEADER_LEN + 8,
                            };
                            return Ok(());
                        }
                        let offset = be_u64(&self.rx_buf, 20);
                        let n = length - 8;
                        let Target::Part { slot, part } = t else {
                            return Err(Lost("data for a flush".into()));
                        };
                        let inside = offset >= part_off
                            && offset
                                .checked_add(u64::from(n))
                                .is_some_and(|e| e <= part_off + u64::from(part_len));
                        let received = self.part_mut(t).map_or(0, |p| p.received);
                        if !inside || received.checked_add(n).map_or(true, |r| r > part_len) {
                            return Err(Lost(format!(
                                "data chunk at {offset} of {n} bytes outside its read ({part_off}, {part_len} bytes) or repeated"
                            )));
                        }
                        if let Some(p) = self.part_mut(t) {
                            p.received += n;
                        }
                        let data_offset = self.slots.get(slot).map_or(0, |s| s.data_offset);
                        self.rx = Rx::Data {
                            slot,
                            part,
                            at: (offset - data_offset) as usize,
                            left: n as usize,
                            done: last,
                        };
                        Ok(())
                    }
                    REPLY_TYPE_OFFSET_HOLE => {
                        if length != 12 {
                            return Err(Lost(format!(
                                "NBD_REPLY_TYPE_OFFSET_HOLE of {length} bytes"
                            )));
                        }
                        if len == CHUNK_HEADER_LEN {
                            self.rx = Rx::Header {
                                have: CHUNK_HEADER_LEN,
                                need: CHUNK_HEADER_LEN + 12,
                            };
                            return Ok(());
                        }
                        let offset = be_u64(&self.rx_buf, 20);
                        let size = be_u32(&self.rx_buf, 28);
                        let inside = size > 0
                            && offset >= part_off
                            && offset
                                .checked_add(u64::from(size))
                                .is_some_and(|e| e <= part_off + u64::from(part_len));
                        let received = self.part_mut(t).map_or(0, |p| p.received);
                        if !inside || received.checked_add(size).map_or(true, |r| r > part_len) {
                            return Err(Lost(format!(
                                "hole at {offset} of {size} bytes outside its read"
                            )));
                        }
                        if let Some(p) = self.part_mut(t) {
                            p.received += size;
                        }
                        if let Target::Part { slot, .. } = t {
                            if let Some(s) = self.slots.get(slot) {
                                self.iov.clear();
                                append_range(
                                    &mut self.iov,
                                    &s.iov,
                                    (offset - s.data_offset) as usize,
                                    size as usize,
                                );
                                for seg in &self.iov {
                                    // SAFETY: a sub-range of the device-writable guest
                                    // buffers of this read (validated, mapped while the
                                    // worker owns the queue); never a Rust object.
                                    unsafe { std::ptr::write_bytes(seg.base, 0, seg.len) };
                                }
                            }
                        }
                        self.rx = next;
                        if last {
                            self.finish_part(t, None, queues, done);
                        }
                        Ok(())
                    }
                    k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                        if !(6..=MAX_ERROR_CHUNK).contains(&length) {
                            return Err(Lost(format!("error chunk of {length} bytes")));
                        }
                        if len == CHUNK_HEADER_LEN {
                            self.rx = Rx::Header {
                                have: CHUNK_HEADER_LEN,
                                need: CHUNK_HEADER_LEN + 6,
                            };
                            return Ok(());
                        }
                        let error = be_u32(&self.rx_buf, 20);
                        let msg = u32::from(be_u16_at(&self.rx_buf, 24));
                        if msg > length - 6 {
                            return Err(Lost(format!(
                                "error message of {msg} bytes in a {length}-byte chunk"
                            )));
                        }
                        if error == ESHUTDOWN {
                            return Err(Lost("the server is shutting down (NBD_ESHUTDOWN)".into()));
                        }
                        self.msg_len = 0;
                        self.rx = Rx::Message {
                            target: t,
                            left_msg: msg as usize,
                            left_after: (length - 6 - msg) as usize,
                            // A zero error breaks the protocol; it still is an error.
                            error: if error == 0 { 5 } else { error },
                            done: last,
                        };
                        Ok(())
                    }
                    other => Err(Lost(format!("unexpected reply chunk type {other}"))),
                }
            }
        }
    }

    /// Marks the part `t` failed with NBD error `error` (logged, rate-limited).
    pub(super) fn fail_part(&mut self, t: Target, error: u32, msg: &str) {
        let head = match t {
            Target::Part { slot, .. } => self.slots.get(slot).map_or(0, |s| s.chain.head()),
            Target::Internal => u16::MAX,
        };
        self.blk.log_failure(
            head,
            &RequestError::Io(io::Error::other(format!(
                "NBD server: {} ({error}){}{}",
                error_name(error),
                if msg.is_empty() { "" } else { ": " },
                msg.trim()
            ))),
        );
        match t {
            Target::Internal => self.internal = Some(Some(false)),
            Target::Part { .. } => {
                if let Some(p) = self.part_mut(t) {
                    p.failed = true;
                }
            }
        }
    }

    /// The reply to part `t` is complete: counts it, and completes its request when it
    /// was the last.
    pub(super) fn finish_part(
        &mut self,
        t: Target,
        _unused: Option<()>,
        queues: &mut [WorkerQueue],
        done: &mut Done,
    ) {
        let Target::Part { slot, part } = t else {
            if self.internal == Some(None) {
                self.internal = Some(Some(true));
            }
            return;
        };
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        let read = s.cmd == Some(Cmd::Read);
        let Some(p) = s.parts.get_mut(part) else {
            return;
        };
        if p.state == PartState::Done {
            return;
        }
        p.state = PartState::Done;
        if read && !p.failed && p.received != p.len {
            // Success without the whole range: the server broke its promise.
            p.failed = true;
        }
        s.pending = s.pending.saturating_sub(1);
        if s.pending > 0 {
            return;
        }
        let failed = s.parts.iter().any(|p| p.failed);
        if !failed && matches!(s.cmd, Some(Cmd::Write | Cmd::WriteZeroes | Cmd::Trim)) {
            self.dirty = true;
        }
        if !failed && s.cmd == Some(Cmd::Flush) {
            self.dirty = false;
        }
        let status = if failed {
            VIRTIO_BLK_S_IOERR
        } else {
            VIRTIO_BLK_S_OK
        };
        if !failed {
            if let Some(c) = self.conn.as_mut() {
                if !c.healthy {
                    c.healthy = true;
                    self.backoff = BACKOFF_START;
                }
            }
        }
        self.complete(slot, status, Some(queues), done);
    }
}

/// `recv` without blocking: `Ok(None)` when nothing is there.
fn recv(fd: i32, buf: &mut [u8]) -> Result<Option<usize>, Lost> {
    // SAFETY: `buf` is a live, writable byte slice of the given length.
    let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    io_result(r)
}

/// The result of a non-blocking read: bytes, `None` for EAGAIN/EINTR, `Lost` for EOF or
/// an error.
fn io_result(r: isize) -> Result<Option<usize>, Lost> {
    match r {
        0 => Err(Lost("the server closed the connection".into())),
        n if n > 0 => Ok(Some(n as usize)),
        _ => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(None),
                _ => Err(Lost(format!("receiving failed: {e}"))),
            }
        }
    }
}
