//! A vhost-user backend session (`Session::handle_one`) fed a hostile frontend's byte stream.
//!
//! The input becomes a sequence of vhost-user messages (12-byte header and body, with sizes
//! and flags that may lie), some carrying fds as SCM_RIGHTS: memfds of chosen sizes whose
//! contents the input also writes (so a memory table can hold real rings and requests), and
//! eventfds (kick/call/err). Everything is written into one end of a `UnixStream` pair, whose
//! write side is then shut down; a `Session` serving a 1 MiB RAM virtio-blk device reads the
//! other end until it fails or the stream ends. Queue workers that the stream starts run
//! real requests from the memfds. Checked:
//! - no panic or crash, in the session or in a queue worker thread (libFuzzer's panic hook
//!   aborts on a panic in any thread); no hang (EOF ends the stream, a read timeout backs it);
//! - every reply is a well-formed reply header (version 1 | REPLY) with a body that fits;
//! - no fd is leaked once the session is dropped;
//! - the queue workers run under their seccomp filter (`uvdpa_virtio::sandbox`, trap mode,
//!   the daemon's default) and none makes a system call outside its allow-list.
//!
//! Input layout: `device u8`, then per message (at most 64):
//! `op u8, request (u8, or u32 if op&0x40), [flags u32 if op&0x10], body_len u16, body,
//!  [size u32 if op&0x08], then per memfd attached: size_sel u8, writes (off u32, len u16, data)`.
//! `op & 7` picks the fds: 0 none, 1 memfd, 2 eventfd, 3 two memfds, 4 `n u8 % 10` fds
//! alternating memfd/eventfd, 5 two eventfds, 6-7 none.

#![no_main]

use std::io::{IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{memfd_create, MemfdFlags};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use uvdpa_devices::blk::{BackendSpec, BlkConfig, BlkDevice};
use uvdpa_fuzz::{open_fds, Input};
use uvdpa_vhost_user::connection::{Connection, Header, HEADER_SIZE, MAX_BODY};
use uvdpa_vhost_user::{Session, SessionParams, SessionState};
use uvdpa_virtio::interrupts::VectorTable;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::VirtioFeatures;

const MAX_MESSAGES: usize = 64;
const MAX_REQUESTS: usize = 128;
const MEMFD_SIZES: [u64; 4] = [0x1000, 0x1_0000, 0x10_0000, 0];

struct Msg {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// With `UVDPA_FUZZ_HIDE_KNOWN` set, the input is bent so that two known bugs cannot fire,
/// to look for others while they are open:
/// - every memfd is 2^47 bytes long (sparse), the largest mapping `MemoryRegion::map`
///   accepts, so no region extends past the end of its fd (SIGBUS on first access);
/// - memory regions get 16-byte aligned `user_addr` and `mmap_offset`, so an aligned ring
///   address cannot become a misaligned host pointer (misaligned `AtomicU16`).
fn hide_known() -> bool {
    static HIDE: OnceLock<bool> = OnceLock::new();
    *HIDE.get_or_init(|| std::env::var_os("UVDPA_FUZZ_HIDE_KNOWN").is_some())
}

/// Clears the low 4 bits of the u64 at `at` in `body`, if it is there.
fn align_u64(body: &mut [u8], at: usize) {
    if let Some(b) = body.get_mut(at) {
        *b &= !0xf;
    }
}

fn memfd(input: &mut Input<'_>) -> OwnedFd {
    let fd = memfd_create("fuzz-guest", MemfdFlags::CLOEXEC).unwrap();
    let sel = input.u8();
    let size = MEMFD_SIZES[usize::from(sel & 3)];
    let len = if hide_known() { 1 << 47 } else { size };
    rustix::fs::ftruncate(&fd, len).unwrap();
    let file = std::fs::File::from(fd);
    for _ in 0..(sel >> 2) % 4 {
        let off = u64::from(input.u32()) % size.max(1);
        let len = usize::from(input.u16()) % 1024;
        let data = input.bytes(len);
        let fit = (size.saturating_sub(off) as usize).min(data.len());
        file.write_all_at(&data[..fit], off).unwrap();
    }
    file.into()
}

fn event() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
}

fn message(input: &mut Input<'_>) -> Msg {
    let op = input.u8();
    let request = if op & 0x40 != 0 {
        input.u32()
    } else {
        u32::from(input.u8() % 48)
    };
    let flags = if op & 0x10 != 0 {
        input.u32()
    } else {
        1 | if op & 0x20 != 0 { 0x8 } else { 0 }
    };
    let body_len = usize::from(input.u16()) % (MAX_BODY + 64);
    let mut body = input.bytes(body_len).to_vec();
    if hide_known() {
        // Region layouts: SET_MEM_TABLE `{u32 n, u32 pad, [gpa, size, uaddr, offset]...}`,
        // ADD_MEM_REG `{u64 pad, gpa, size, uaddr, offset}` (all u64).
        let regions = match request {
            5 => 8..body.len(),
            37 => 8..body.len().min(40),
            _ => 0..0,
        };
        for r in regions.step_by(32) {
            align_u64(&mut body, r + 16);
            align_u64(&mut body, r + 24);
        }
    }
    let size = if op & 0x08 != 0 {
        input.u32()
    } else {
        body.len() as u32
    };
    let mut bytes = Header {
        request,
        flags,
        size,
    }
    .to_bytes()
    .to_vec();
    bytes.extend_from_slice(&body);
    let fds = match op & 7 {
        1 => vec![memfd(input)],
        2 => vec![event()],
        3 => vec![memfd(input), memfd(input)],
        4 => (0..input.u8() % 10)
            .map(|k| if k % 2 == 0 { memfd(input) } else { event() })
            .collect(),
        5 => vec![event(), event()],
        _ => Vec::new(),
    };
    Msg { bytes, fds }
}

/// Sends one message; returns false when the socket is full (the rest is dropped).
fn send(sock: &UnixStream, m: &Msg) -> bool {
    let fds: Vec<BorrowedFd<'_>> = m.fds.iter().map(AsFd::as_fd).collect();
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut none: [MaybeUninit<u8>; 0] = [];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    }
    let mut sent = 0;
    while sent < m.bytes.len() {
        let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
        match sendmsg(sock, &[IoSlice::new(&m.bytes[sent..])], &mut control, flags) {
            Ok(n) => {
                sent += n;
                // The fds went with the first part.
                control = SendAncillaryBuffer::new(&mut none);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
    true
}

fn stats() -> Arc<StatsTable> {
    static T: OnceLock<Arc<StatsTable>> = OnceLock::new();
    T.get_or_init(|| StatsTable::new("fuzz", 2).unwrap())
        .clone()
}

/// Reads every reply the session wrote and checks its header.
fn check_replies(mut sock: &UnixStream) {
    sock.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match sock.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let mut rest = &out[..];
    while !rest.is_empty() {
        let raw: &[u8; HEADER_SIZE] = rest
            .first_chunk()
            .unwrap_or_else(|| panic!("truncated reply header: {rest:?}"));
        let h = Header::parse(raw);
        assert_eq!(h.flags, 0x5, "reply flags of {h:?}");
        let size = h.size as usize;
        assert!(size <= MAX_BODY, "reply body of {size} bytes");
        assert!(
            rest.len() >= HEADER_SIZE + size,
            "truncated reply body of {h:?}"
        );
        if std::env::var_os("UVDPA_FUZZ_DEBUG").is_some() {
            eprintln!(
                "reply {h:?} {:02x?}",
                &rest[HEADER_SIZE..HEADER_SIZE + size.min(16)]
            );
        }
        rest = &rest[HEADER_SIZE + size..];
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = stats();
    let fds_before = open_fds();
    {
        let mut input = Input::new(data);
        let dev_cfg = input.u8();
        let mut msgs = Vec::new();
        while !input.is_empty() && msgs.len() < MAX_MESSAGES {
            msgs.push(message(&mut input));
        }
        let num_queues = 1 + u16::from(dev_cfg & 1);
        let device = BlkDevice::new(BlkConfig {
            backend: BackendSpec::Ram { size: 1 << 20 },
            read_only: dev_cfg & 2 != 0,
            num_queues,
            queue_size: 256,
            serial: "fuzz".into(),
            logical_block_size: 512,
        })
        .unwrap();
        let (frontend, backend) = UnixStream::pair().unwrap();
        for m in &msgs {
            if !send(&frontend, m) {
                break;
            }
        }
        drop(msgs);
        frontend.shutdown(std::net::Shutdown::Write).unwrap();
        // EOF ends the stream; the timeouts only keep a bug from hanging the fuzzer.
        backend
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        backend
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut session = Session::new(
            "fuzz",
            Connection::new(backend),
            SessionParams {
                device: Arc::new(device),
                stats: stats(),
                state: Arc::new(Mutex::new(SessionState::default())),
                res: None,
                frontend_pid: None,
                poll: Duration::ZERO,
                mandated: VirtioFeatures::empty(),
                unoffered: VirtioFeatures::empty(),
                vectors: Arc::new(VectorTable::new(num_queues)),
                max_memory: uvdpa_vhost_user::session::DEFAULT_MAX_MEMORY,
                log_limits: Arc::default(),
            },
        );
        let debug = std::env::var_os("UVDPA_FUZZ_DEBUG").is_some();
        for _ in 0..MAX_REQUESTS {
            if let Err(e) = session.handle_one() {
                if debug {
                    eprintln!("session ended: {e}");
                }
                break;
            }
        }
        if debug {
            eprintln!("device status {:?}", session.device_status());
        }
        drop(session);
        if debug {
            let q = stats();
            let q = q.queue(0).unwrap();
            eprintln!(
                "queue 0: requests {} errors {} (cumulative)",
                q.requests.load(std::sync::atomic::Ordering::Relaxed),
                q.errors.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        check_replies(&frontend);
    }
    assert_eq!(open_fds(), fds_before, "fds leaked");
    let (trapped, last) = uvdpa_virtio::sandbox::trapped();
    assert_eq!(
        trapped,
        0,
        "a queue worker made a forbidden system call: {last} ({})",
        uvdpa_virtio::sandbox::syscall_name(last)
    );
});
