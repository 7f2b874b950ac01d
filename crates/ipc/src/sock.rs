//! SEQPACKET socket plumbing: one record per message, fds as SCM_RIGHTS, sends that never
//! wait longer than asked.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags,
    SocketType,
};

use crate::wire::MAX_FDS;

/// A new close-on-exec `AF_UNIX` `SOCK_SEQPACKET` socket.
pub(crate) fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// The socket address of `path`.
pub(crate) fn unix_addr(path: &Path) -> io::Result<SocketAddrUnix> {
    Ok(SocketAddrUnix::new(path)?)
}

/// A SEQPACKET socket connected to `path`.
pub(crate) fn connect(path: &Path) -> io::Result<OwnedFd> {
    let sock = seqpacket()?;
    let addr = unix_addr(path)?;
    loop {
        match rustix::net::connect(&sock, &addr) {
            Ok(()) => return Ok(sock),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One received record.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes stored in the buffer (0 with `!truncated` means end of stream).
    pub len: usize,
    /// The record was longer than the buffer (MSG_TRUNC): the rest is lost.
    pub truncated: bool,
    /// More fds were attached than the buffer holds (MSG_CTRUNC); those that did not fit
    /// were closed by the kernel.
    pub fds_truncated: bool,
    /// The fds that arrived (close-on-exec).
    pub fds: Vec<OwnedFd>,
}

/// Receives one record into `buf`. With `nonblocking`, returns `WouldBlock` when nothing
/// is queued.
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], nonblocking: bool) -> io::Result<Received> {
    let mut flags = RecvFlags::CMSG_CLOEXEC;
    if nonblocking {
        flags |= RecvFlags::DONTWAIT;
    }
    loop {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = match recvmsg(fd, &mut [IoSliceMut::new(buf)], &mut control, flags) {
            Ok(m) => m,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        let fds_truncated = msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_FDS;
        return Ok(Received {
            len: msg.bytes.min(buf.len()),
            truncated: msg.flags.contains(ReturnFlags::TRUNC),
            fds_truncated,
            fds,
        });
    }
}

/// How long a send may wait for room in the socket.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Not at all: a full socket is `WouldBlock`.
    No,
    /// Until this instant: then `TimedOut`.
    Until(Instant),
}

/// Sends `msg` as one record with `fds` attached (at most [`MAX_FDS`]).
pub(crate) fn send(
    fd: BorrowedFd<'_>,
    msg: &[u8],
    fds: &[BorrowedFd<'_>],
    wait: Wait,
) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let bufs = [IoSlice::new(msg)];
    loop {
        match sendmsg(
            fd,
            &bufs,
            &mut control,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        ) {
            // A SEQPACKET record is sent whole or not at all.
            Ok(n) if n == msg.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "short send of {n} bytes out of {}",
                    msg.len()
                )))
            }
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => match wait {
                Wait::No => return Err(io::Error::from(io::ErrorKind::WouldBlock)),
                Wait::Until(deadline) => {
                    if !wait_ready(fd, PollFlags::OUT, Some(deadline))? {
                        return Err(io::Error::from(io::ErrorKind::TimedOut));
                    }
                }
            },
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until `fd` reports one of `events` (or an error or hang-up), or until `deadline`.
/// Returns whether it is ready.
pub(crate) fn wait_ready(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Option<Instant>,
) -> io::Result<bool> {
    let mut fds = [PollFd::new(&fd, events)];
    let n = poll_until(&mut fds, deadline)?;
    Ok(n > 0)
}

/// `poll(2)` until `deadline` (forever if `None`), retrying on EINTR.
pub(crate) fn poll_until(fds: &mut [PollFd<'_>], deadline: Option<Instant>) -> io::Result<usize> {
    loop {
        let timeout = deadline.map(|d| to_timespec(d.saturating_duration_since(Instant::now())));
        match poll(fds, timeout.as_ref()) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn to_timespec(d: Duration) -> Timespec {
    Timespec::try_from(d).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    })
}

/// Wakes a thread blocked in [`poll_until`] on an eventfd.
pub(crate) fn wake(eventfd: &OwnedFd) {
    // An eventfd counter only fails to grow when it is about to overflow, in which case
    // it is already readable: nothing to do on error.
    let _ = rustix::io::write(eventfd, &1u64.to_ne_bytes());
}

/// Resets a non-blocking eventfd after it woke a poller.
pub(crate) fn drain_wake(eventfd: &OwnedFd) {
    let mut b = [0u8; 8];
    let _ = rustix::io::read(eventfd, &mut b);
}

/// A non-blocking close-on-exec eventfd.
pub(crate) fn new_wake() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )?)
}

/// Shuts a socket down in both directions, waking any thread blocked on it.
pub(crate) fn shutdown(fd: impl AsFd) {
    // ENOTCONN when the peer is already gone: nothing left to wake.
    let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
}
