//! The vhost-user socket: reading one request (header, bounded body, bounded fds) and
//! writing replies, with the wire structs of the rust-vmm `vhost` crate.
//!
//! vhost-user messages are a 12-byte header (`request u32, flags u32, size u32`) followed
//! by `size` bytes of body; fds ride with the message as SCM_RIGHTS ancillary data.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag};

use crate::error::Error;

/// Largest request body accepted, in bytes (the vhost crate's MAX_MSG_SIZE, 4 KiB): a
/// SET_MEM_TABLE with 8 regions is 264 bytes, a GET_CONFIG at most 12 + 256.
pub const MAX_BODY: usize = vhost::vhost_user::message::MAX_MSG_SIZE;
/// Most fds accepted with one request (SET_MEM_TABLE carries one per region, at most 8).
pub const MAX_FDS: usize = 8;
/// Size of the message header in bytes.
pub const HEADER_SIZE: usize = 12;

/// A vhost-user message header: `request`, `flags` (bits 0-1 version, bit 2 REPLY,
/// bit 3 NEED_REPLY) and body `size` in bytes, little-endian on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Flags.
    pub flags: u32,
    /// Body size in bytes.
    pub size: u32,
}

impl Header {
    /// Decodes the 12 wire bytes.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// Encodes the 12 wire bytes.
    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// The request code, if it is one the protocol defines.
    pub fn code(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    /// Whether the frontend asked for an ack (NEED_REPLY, bit 3).
    pub fn need_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }
}

/// A request read from the frontend.
#[derive(Debug)]
pub struct Request {
    /// The header as received.
    pub hdr: Header,
    /// The body (`hdr.get_size()` bytes).
    pub body: Vec<u8>,
    /// The fds that came with it.
    pub fds: Vec<OwnedFd>,
}

/// One end of a vhost-user connection, backend side.
#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
}

impl Connection {
    /// Wraps a connected stream.
    pub fn new(sock: UnixStream) -> Self {
        Self { sock }
    }

    /// The underlying socket (for polling and peer credentials).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Reads exactly `buf.len()` bytes, collecting any fds that arrive on the way.
    fn recv_exact(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), Error> {
        let mut got = 0;
        while got < buf.len() {
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let rest = buf.get_mut(got..).ok_or(Error::Disconnected)?;
            let msg = match recvmsg(
                &self.sock,
                &mut [IoSliceMut::new(rest)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::Socket(e)),
            };
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = m {
                    fds.extend(received);
                }
            }
            if msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_FDS {
                return Err(Error::TooManyFds { max: MAX_FDS });
            }
            if msg.bytes == 0 {
                return Err(Error::Disconnected);
            }
            got += msg.bytes;
        }
        Ok(())
    }

    /// Reads one request: header, then a body of at most [`MAX_BODY`] bytes, with at most
    /// [`MAX_FDS`] fds.
    ///
    /// # Errors
    /// [`Error::Disconnected`] at EOF, [`Error::BadHeader`] for a wrong version or reply
    /// flag, [`Error::OversizedBody`], [`Error::TooManyFds`], [`Error::Socket`].
    pub fn recv_request(&self) -> Result<Request, Error> {
        let mut fds = Vec::new();
        let mut raw = [0u8; HEADER_SIZE];
        self.recv_exact(&mut raw, &mut fds)?;
        let hdr = Header::parse(&raw);
        let flags = hdr.flags;
        let reserved = VhostUserHeaderFlag::RESERVED_BITS | VhostUserHeaderFlag::REPLY;
        if flags & VhostUserHeaderFlag::VERSION.bits() != 1 || flags & reserved.bits() != 0 {
            return Err(Error::BadHeader { flags });
        }
        let size = hdr.size as usize;
        if size > MAX_BODY {
            return Err(Error::OversizedBody {
                size,
                max: MAX_BODY,
            });
        }
        let mut body = vec![0u8; size];
        self.recv_exact(&mut body, &mut fds)?;
        Ok(Request { hdr, body, fds })
    }

    /// Sends a reply to `req` with `body` (a header with version 1 | REPLY, the same
    /// request code and `body.len()` as size).
    ///
    /// # Errors
    /// [`Error::Socket`] if the write fails.
    pub fn send_reply(&self, req: &Header, body: &[u8]) -> Result<(), Error> {
        self.send_reply_with_fds(req, body, &[])
    }

    /// As [`Connection::send_reply`], attaching `fds`.
    ///
    /// # Errors
    /// [`Error::Socket`] if the write fails.
    pub fn send_reply_with_fds(
        &self,
        req: &Header,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        let size = u32::try_from(body.len()).map_err(|_| Error::OversizedBody {
            size: body.len(),
            max: MAX_BODY,
        })?;
        let flags = 0x1 | VhostUserHeaderFlag::REPLY.bits();
        let hdr = Header {
            request: req.request,
            flags,
            size,
        }
        .to_bytes();
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(Error::TooManyFds { max: MAX_FDS });
        }
        let bufs = [IoSlice::new(&hdr), IoSlice::new(body)];
        let total = HEADER_SIZE + body.len();
        let sent = loop {
            match sendmsg(&self.sock, &bufs, &mut control, SendFlags::NOSIGNAL) {
                Ok(n) => break n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::Socket(e)),
            }
        };
        if sent < total {
            // A short write on a stream socket: send the rest (fds went with the first part).
            let mut rest = hdr.to_vec();
            rest.extend_from_slice(body);
            let mut w = &self.sock;
            std::io::Write::write_all(&mut w, rest.get(sent..).unwrap_or(&[])).map_err(|e| {
                Error::Socket(rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))
            })?;
        }
        Ok(())
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
