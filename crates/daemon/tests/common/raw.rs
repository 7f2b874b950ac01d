//! A raw vhost-user frontend that writes whatever bytes and fds a test wants (hostile
//! frontends), and reads the backend's answers.

use std::io::{IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_KICK: u32 = 12;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_CONFIG: u32 = 24;
pub const NET_SET_MTU: u32 = 20;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;
/// Protocol feature bits.
pub const MTU: u64 = 1 << 4;
pub const REPLY_ACK: u64 = 1 << 3;
pub const CONFIG: u64 = 1 << 9;
pub const INFLIGHT_SHMFD: u64 = 1 << 12;
pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
/// Header flag: the frontend wants an ack.
pub const NEED_REPLY: u32 = 0x8;

/// A connected raw frontend.
pub struct Raw {
    pub s: UnixStream,
}

/// What the backend did with a request.
pub enum Answer {
    Reply(Vec<u8>),
    Closed,
}

impl Raw {
    pub fn connect(path: &str) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    pub fn send(&self, code: u32, flags: u32, body: &[u8], fds: &[BorrowedFd<'_>]) {
        self.send_sized(code, flags, body.len() as u32, body, fds)
    }

    pub fn send_sized(
        &self,
        code: u32,
        flags: u32,
        size: u32,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) {
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&code.to_le_bytes());
        hdr.extend_from_slice(&(1 | flags).to_le_bytes());
        hdr.extend_from_slice(&size.to_le_bytes());
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(32))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        // The peer may already have closed: ignore EPIPE, the answer says what happened.
        let _ = sendmsg(
            &self.s,
            &[IoSlice::new(&hdr), IoSlice::new(body)],
            &mut control,
            SendFlags::NOSIGNAL,
        );
    }

    pub fn answer(&mut self) -> Answer {
        let mut hdr = [0u8; 12];
        match self.s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Answer::Closed,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Answer::Closed,
            Err(e) => panic!("no answer from the backend: {e}"),
        }
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        assert_eq!(flags, 0x5, "reply flags must be version 1 | REPLY");
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size];
        self.s.read_exact(&mut body).unwrap();
        Answer::Reply(body)
    }

    pub fn u64_answer(&mut self) -> Option<u64> {
        match self.answer() {
            Answer::Reply(b) if b.len() == 8 => Some(u64::from_le_bytes(b.try_into().unwrap())),
            Answer::Reply(b) => panic!("unexpected reply of {} bytes", b.len()),
            Answer::Closed => None,
        }
    }

    /// Negotiates PROTOCOL_FEATURES + REPLY_ACK (+ CONFIG) so failures are answered.
    pub fn with_reply_ack(path: &str) -> Raw {
        let (r, offered) = Self::negotiate(path, CONFIG);
        assert!(offered & REPLY_ACK != 0 && offered & CONFIG != 0);
        r
    }

    /// Connects, acks VERSION_1 + PROTOCOL_FEATURES and negotiates `wanted` (with
    /// REPLY_ACK) out of what the device offers; returns the session and the offered
    /// protocol features.
    pub fn negotiate(path: &str, wanted: u64) -> (Raw, u64) {
        let mut r = Raw::connect(path);
        r.send(GET_FEATURES, 0, &[], &[]);
        let features = r.u64_answer().unwrap();
        assert!(
            features & (1 << 30) != 0,
            "VHOST_USER_F_PROTOCOL_FEATURES not offered"
        );
        assert!(features & (1 << 32) != 0, "VIRTIO_F_VERSION_1 not offered");
        r.send(
            SET_FEATURES,
            0,
            &((1u64 << 30) | (1 << 32)).to_le_bytes(),
            &[],
        );
        r.send(GET_PROTOCOL_FEATURES, 0, &[], &[]);
        let offered = r.u64_answer().unwrap();
        r.send(
            SET_PROTOCOL_FEATURES,
            NEED_REPLY,
            &((REPLY_ACK | wanted) & offered).to_le_bytes(),
            &[],
        );
        assert_eq!(r.u64_answer(), Some(0));
        (r, offered)
    }
}

/// A memfd of `size` bytes (sparse).
pub fn memfd(size: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    fd
}

/// A `VhostUserMemoryRegion` body: gpa, size, frontend address, mmap offset 0.
pub fn region(gpa: u64, size: u64, uaddr: u64) -> Vec<u8> {
    region_at(gpa, size, uaddr, 0)
}

/// A `VhostUserMemoryRegion` body with an mmap offset.
pub fn region_at(gpa: u64, size: u64, uaddr: u64, mmap_offset: u64) -> Vec<u8> {
    [gpa, size, uaddr, mmap_offset]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// A SET_MEM_TABLE body of `regions`.
pub fn mem_table(regions: &[Vec<u8>]) -> Vec<u8> {
    let mut b = (regions.len() as u32).to_le_bytes().to_vec();
    b.extend_from_slice(&[0; 4]);
    for r in regions {
        b.extend_from_slice(r);
    }
    b
}

/// An ADD_MEM_REG / REM_MEM_REG body (`VhostUserSingleMemoryRegion`: 8 bytes of padding,
/// then the region).
pub fn single_region(region: Vec<u8>) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    b.extend(region);
    b
}
