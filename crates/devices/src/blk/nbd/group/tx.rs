//! The sending side of [`NbdGroup`]: the queued parts go out with `sendmsg` (their
//! headers and, for writes, the guest buffers), and EPOLLOUT is asked for while the
//! socket is full.

use std::io;
use std::os::fd::AsRawFd;

use rustix::event::epoll;
use uvdpa_virtio::Segment;

use super::super::super::backend::IOV_MAX;
use super::super::proto::{Cmd, REQUEST_LEN};
use super::{append_range, Lost, NbdGroup, PartState, EV_SOCKET, SEND_BATCH};

impl NbdGroup {
    /// Sends queued parts until the socket is full.
    pub(super) fn send(&mut self) -> Result<(), Lost> {
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
}
