//! Helpers shared by the integration tests: temporary socket paths and a raw SEQPACKET
//! client that speaks (or breaks) the wire format by hand.

#![allow(dead_code)]

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde_json::Value;
use uvdpa_ipc::wire::{self, Header, Kind, HEADER_SIZE, MAX_MESSAGE, WELCOME_ACTION};

/// Generous bound for anything that should happen "promptly": tests assert completion,
/// this only keeps a broken build from hanging.
pub const LONG: Duration = Duration::from_secs(10);

/// A temporary directory, removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "uvdpa-ipc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn sock(&self) -> PathBuf {
        self.0.join("ipc.sock")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a raw client read.
#[derive(Debug)]
pub enum Got {
    Msg { bytes: Vec<u8>, fds: Vec<OwnedFd> },
    Eof,
}

/// A decoded message, for assertions.
#[derive(Debug)]
pub struct Decoded {
    pub header: Header,
    pub payload: Value,
}

impl Decoded {
    pub fn error(&self) -> &str {
        self.payload["error"].as_str().unwrap_or("")
    }
}

pub fn decode(bytes: &[u8]) -> Decoded {
    let header = Header::parse(bytes[..HEADER_SIZE].try_into().unwrap());
    let body = &bytes[HEADER_SIZE..];
    assert_eq!(header.payload_len as usize, body.len());
    let payload = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).unwrap()
    };
    Decoded { header, payload }
}

/// A raw SEQPACKET client.
pub struct Raw {
    pub fd: OwnedFd,
}

impl Raw {
    /// Connects without reading anything.
    pub fn connect_only(path: &Path) -> Self {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::net::connect(&fd, &SocketAddrUnix::new(path).unwrap()).unwrap();
        Self { fd }
    }

    /// Connects and reads the welcome; returns the client id.
    pub fn connect(path: &Path) -> (Self, u64) {
        let raw = Self::connect_only(path);
        let w = raw.recv_msg();
        assert_eq!(w.header.kind, Kind::Notification as u8);
        assert_eq!(w.header.action_name(), Some(WELCOME_ACTION));
        let id = w.payload["client_id"].as_u64().unwrap();
        (raw, id)
    }

    pub fn send(&self, bytes: &[u8]) {
        self.send_fds(bytes, &[]);
    }

    pub fn send_fds(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(64))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let n = sendmsg(
            &self.fd,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .unwrap();
        assert_eq!(n, bytes.len());
    }

    /// Sends a well-formed request.
    pub fn request(&self, req_id: u64, action: &str, payload: &Value) {
        self.send(&wire::encode(Kind::Request, 0, req_id, action, payload).unwrap());
    }

    /// Reads one record, waiting at most [`LONG`].
    pub fn recv(&self) -> Got {
        let deadline = Instant::now() + LONG;
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = poll(&mut fds, Some(&Timespec::try_from(left).unwrap())).unwrap();
        assert!(n > 0, "nothing received within {LONG:?}");
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(16))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = recvmsg(
            &self.fd,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .unwrap();
        let mut got_fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = m {
                got_fds.extend(r);
            }
        }
        if msg.bytes == 0 {
            return Got::Eof;
        }
        buf.truncate(msg.bytes);
        Got::Msg {
            bytes: buf,
            fds: got_fds,
        }
    }

    /// Reads one message and decodes it.
    pub fn recv_msg(&self) -> Decoded {
        match self.recv() {
            Got::Msg { bytes, .. } => decode(&bytes),
            Got::Eof => panic!("connection closed"),
        }
    }

    /// Reads one message that must be an error reply; returns (req_id, status, message).
    pub fn recv_error(&self) -> (u64, i32, String) {
        let d = self.recv_msg();
        assert_eq!(d.header.kind, Kind::Reply as u8);
        assert!(d.header.status < 0, "{d:?}");
        (d.header.req_id, d.header.status, d.error().to_owned())
    }

    /// Asserts the primary closed the connection (after any messages it sent).
    pub fn expect_eof(&self) {
        match self.recv() {
            Got::Eof => {}
            Got::Msg { bytes, .. } => panic!("expected EOF, got {:?}", decode(&bytes)),
        }
    }

    pub fn borrow(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
