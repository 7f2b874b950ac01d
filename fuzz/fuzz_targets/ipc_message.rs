//! The IPC primary (`uvdpa_ipc::Primary`) fed hostile SEQPACKET records, end to end.
//!
//! `wire::decode` is crate-private, so the target goes through the socket, as a hostile
//! secondary would: that also covers fd reception, MSG_TRUNC / MSG_CTRUNC handling, the
//! handler dispatch and the reply path. One primary per process, with one action, `echo`
//! (replies with the request's payload and duplicates of its fds). Each input is a few
//! records (raw bytes, or a header built field by field with a raw or JSON payload), each
//! with 0-3 or 9 (more than `MAX_FDS`) fds, sent on a fresh connection and followed by a
//! well-formed `echo`. Checked, from the crate's documented rules:
//! - every record gets exactly one reply carrying its `req_id`, in order, until a record the
//!   primary must close on (empty, oversized, shorter than the header or wrong magic: an
//!   error with `req_id` 0 for the last two), after which the connection ends;
//! - every reply is a well-formed reply (magic, version, kind, `payload_len`, JSON);
//! - the final `echo` is answered correctly (on a new connection if this one was closed);
//! - once the connection is gone, no fd is left open in the primary.

#![no_main]

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags,
    SocketType,
};
use serde_json::{json, Value};
use uvdpa_fuzz::{open_fds, Input};
use uvdpa_ipc::wire::{self, Header, Kind, ACTION_LEN, HEADER_SIZE, MAGIC, MAX_MESSAGE, VERSION};
use uvdpa_ipc::{Primary, Reply, MAX_FDS};

const ACTIONS: [&str; 4] = ["echo", "nope", "ipc.welcome", "ipc.error"];
const WAIT: Duration = Duration::from_secs(10);
const ALIVE_ID: u64 = 0x0a11_7e00_0a11_7e00;

fn primary() -> &'static Primary {
    static P: OnceLock<(Primary, PathBuf)> = OnceLock::new();
    &P.get_or_init(|| {
        let tmp = std::env::temp_dir();
        // Directories left by earlier fuzzing processes that are gone.
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix("uvdpa-fuzz-ipc-"));
            if pid.is_some_and(|p| !std::path::Path::new("/proc").join(p).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = tmp.join(format!("uvdpa-fuzz-ipc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = Primary::bind(dir.join("ipc.sock")).unwrap();
        p.register("echo", |req, _| {
            let fds = req.fds.iter().filter_map(|f| f.try_clone().ok()).collect();
            Ok(Reply::with_fds(req.payload.clone(), fds))
        })
        .unwrap();
        (p, dir)
    })
    .0
}

struct Client(OwnedFd);

enum Got {
    Msg(Vec<u8>, Vec<OwnedFd>),
    Eof,
}

impl Client {
    fn connect() -> Self {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let addr = SocketAddrUnix::new(primary().path()).unwrap();
        loop {
            match rustix::net::connect(&fd, &addr) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r.unwrap(),
            }
        }
        let c = Self(fd);
        match c.recv() {
            Got::Msg(b, _) => {
                let h = Header::parse(b.first_chunk().expect("welcome header"));
                assert_eq!(h.action_name(), Some(wire::WELCOME_ACTION), "{h:?}");
            }
            Got::Eof => panic!("no welcome"),
        }
        c
    }

    /// Sends one record; false if the socket is full (nothing sent).
    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(16))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
        loop {
            match sendmsg(&self.0, &[IoSlice::new(bytes)], &mut control, flags) {
                Ok(n) => {
                    assert_eq!(n, bytes.len());
                    return true;
                }
                Err(rustix::io::Errno::INTR) => continue,
                // Full, or too large for the socket (EMSGSIZE): not sent.
                Err(_) => return false,
            }
        }
    }

    fn recv(&self) -> Got {
        // libFuzzer's timers interrupt system calls: retry on EINTR.
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = [PollFd::new(&self.0, PollFlags::IN)];
            match poll(&mut pfd, Some(&Timespec::try_from(left).unwrap())) {
                Ok(0) => panic!("the primary did not answer within {WAIT:?}"),
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => panic!("poll: {e}"),
            }
        }
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(16))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = loop {
            match recvmsg(
                &self.0,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::CONNRESET) => return Got::Eof,
                Err(e) => panic!("recv: {e}"),
            }
        };
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = m {
                fds.extend(r);
            }
        }
        assert!(
            !msg.flags.contains(ReturnFlags::TRUNC),
            "reply longer than MAX_MESSAGE"
        );
        assert!(
            !msg.flags.contains(ReturnFlags::CTRUNC),
            "reply with more than 16 fds"
        );
        if msg.bytes == 0 {
            return Got::Eof;
        }
        buf.truncate(msg.bytes);
        Got::Msg(buf, fds)
    }

    /// Receives one reply and checks it is well formed; returns its header and payload.
    fn reply(&self) -> Option<(Header, Value, usize)> {
        let Got::Msg(b, fds) = self.recv() else {
            return None;
        };
        let h = Header::parse(b.first_chunk().expect("reply shorter than a header"));
        assert_eq!(h.magic, MAGIC);
        assert_eq!(h.version, VERSION);
        assert_eq!(h.kind, Kind::Reply as u8, "{h:?}");
        assert_eq!(h.reserved, 0);
        assert!(h.action_name().is_some(), "{h:?}");
        let body = &b[HEADER_SIZE..];
        assert_eq!(h.payload_len as usize, body.len());
        let payload = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body).expect("reply payload is JSON")
        };
        if h.status != 0 {
            assert!(h.status < 0, "{h:?}");
            assert!(payload["error"].is_string(), "{payload}");
            assert!(fds.is_empty());
        }
        assert!(fds.len() <= MAX_FDS);
        Some((h, payload, fds.len()))
    }
}

/// A JSON value from the input (small grammar; may nest deeply).
fn json_value(input: &mut Input<'_>, depth: u32) -> Value {
    match input.u8() % 8 {
        0 => Value::Null,
        1 => json!(input.u64()),
        2 => json!(f64::from_bits(input.u64())),
        3 => Value::String(String::from_utf8_lossy(input.bytes_u8()).into()),
        4 if depth < 8 => {
            let n = input.u8() % 4;
            Value::Array((0..n).map(|_| json_value(input, depth + 1)).collect())
        }
        5 if depth < 8 => {
            let n = input.u8() % 4;
            Value::Object(
                (0..n)
                    .map(|_| {
                        let n = usize::from(input.u8() % 8);
                        let k = String::from_utf8_lossy(input.bytes(n)).into();
                        (k, json_value(input, depth + 1))
                    })
                    .collect(),
            )
        }
        _ => json!(input.bool()),
    }
}

/// One record built from the input.
fn record(input: &mut Input<'_>) -> Vec<u8> {
    let mode = input.u8();
    match (mode >> 3) % 4 {
        // Raw bytes.
        0 => input.bytes_u16().to_vec(),
        // Oversized.
        1 => vec![b' '; MAX_MESSAGE + 1 + usize::from(input.u8())],
        // A header field by field, then a payload.
        _ => {
            let mut action = [0u8; ACTION_LEN];
            let a = input.u8();
            match ACTIONS.get(usize::from(a % 8)) {
                Some(name) => action[..name.len()].copy_from_slice(name.as_bytes()),
                None => {
                    let raw = input.bytes(ACTION_LEN);
                    action[..raw.len()].copy_from_slice(raw);
                }
            }
            let f = input.u8();
            let payload: Vec<u8> = if (mode >> 3) % 4 == 2 {
                serde_json::to_vec(&json_value(input, 0)).unwrap()
            } else if f & 0x80 != 0 {
                // Deep nesting: serde_json must refuse it, not overflow the stack.
                let n = usize::from(input.u16());
                let mut v = vec![b'['; n];
                v.extend(std::iter::repeat_n(b']', n));
                v
            } else {
                input.bytes_u16().to_vec()
            };
            let h = Header {
                magic: if f & 1 == 0 { MAGIC } else { input.u32() },
                version: if f & 2 == 0 { VERSION } else { input.u16() },
                kind: if f & 4 == 0 {
                    Kind::Request as u8
                } else {
                    input.u8()
                },
                reserved: if f & 8 == 0 { 0 } else { input.u8() },
                status: if f & 16 == 0 { 0 } else { input.u32() as i32 },
                req_id: input.u64(),
                action,
                payload_len: if f & 32 == 0 {
                    payload.len() as u32
                } else {
                    input.u32()
                },
            };
            let mut b = h.to_bytes().to_vec();
            b.extend_from_slice(&payload);
            if f & 64 != 0 {
                let n = usize::from(input.u16());
                b.truncate(n);
            }
            b
        }
    }
}

/// What the primary must do with a record: `Some(req_id)` reply and go on, `None` close
/// (after an error with req_id 0 if `closes_with_error`).
fn expected(b: &[u8]) -> (Option<u64>, bool) {
    if b.is_empty() || b.len() > MAX_MESSAGE {
        return (None, false);
    }
    match b.first_chunk::<HEADER_SIZE>() {
        Some(raw) if Header::parse(raw).magic == MAGIC => (Some(Header::parse(raw).req_id), false),
        _ => (None, true),
    }
}

fn alive(c: &Client) {
    let ok = wire::encode(Kind::Request, 0, ALIVE_ID, "echo", &json!("alive")).unwrap();
    assert!(c.send(&ok, &[]));
    let (h, payload, _) = c.reply().expect("the primary answers a good request");
    assert_eq!((h.req_id, h.status), (ALIVE_ID, 0));
    assert_eq!(payload, "alive");
}

fn wait_no_clients(p: &Primary, fds_before: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        if p.clients().is_empty() && open_fds() == fds_before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "clients {:?}, fds {} (before {fds_before})",
            p.clients(),
            open_fds()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fuzz_target!(|data: &[u8]| {
    let p = primary();
    let fds_before = open_fds();
    {
        let mut input = Input::new(data);
        let c = Client::connect();
        let mut sent: Vec<Vec<u8>> = Vec::new();
        for _ in 0..8 {
            if input.is_empty() {
                break;
            }
            let nfds = input.u8();
            let b = record(&mut input);
            let n = if nfds & 4 != 0 {
                MAX_FDS + 1
            } else {
                usize::from(nfds & 3)
            };
            let owned: Vec<OwnedFd> = (0..n)
                .map(|_| eventfd(0, EventfdFlags::CLOEXEC).unwrap())
                .collect();
            let fds: Vec<BorrowedFd<'_>> = owned.iter().map(AsFd::as_fd).collect();
            if !c.send(&b, &fds) {
                continue;
            }
            let stop = expected(&b).0.is_none();
            sent.push(b);
            if stop {
                break;
            }
        }
        let mut closed = false;
        for b in &sent {
            match expected(b) {
                (Some(id), _) => {
                    let (h, _, _) = c.reply().expect("a reply to every readable record");
                    assert_eq!(h.req_id, id, "{h:?}");
                }
                (None, with_error) => {
                    if with_error {
                        let (h, _, _) = c.reply().expect("an error before closing");
                        assert_eq!(h.req_id, 0);
                        assert!(h.status < 0);
                    }
                    assert!(matches!(c.recv(), Got::Eof), "connection not closed");
                    closed = true;
                }
            }
        }
        if closed {
            alive(&Client::connect());
        } else {
            alive(&c);
        }
    }
    wait_no_clients(p, fds_before);
});
