//! Peer credentials: the uid rule as a pure function, SO_PEERCRED as the primary reads it,
//! and (when the tests run as root) a real client of another uid being refused.

mod common;

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::{Raw, TestDir};
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use uvdpa_ipc::{check_peer_uid, code, IpcError, Primary, Secondary};

#[test]
fn uid_rule() {
    assert!(check_peer_uid(1000, 1000).is_ok());
    assert!(check_peer_uid(0, 1000).is_ok());
    assert!(matches!(
        check_peer_uid(1001, 1000),
        Err(IpcError::PeerRefused(1001))
    ));
    assert!(matches!(
        check_peer_uid(65534, 0),
        Err(IpcError::PeerRefused(65534))
    ));
}

#[test]
fn peercred_is_our_own() {
    let dir = TestDir::new();
    let p = Primary::bind(dir.sock()).unwrap();
    let s = Secondary::connect(dir.sock()).unwrap();
    let peers = p.clients();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].client_id, s.client_id());
    assert_eq!(peers[0].uid, rustix::process::getuid().as_raw());
    assert_eq!(peers[0].pid, rustix::process::getpid().as_raw_pid());
    assert!(check_peer_uid(peers[0].uid, rustix::process::getuid().as_raw()).is_ok());
}

/// A client that connects as uid 65534 (nobody) is sent EPERM "uid 65534 not allowed" and
/// closed. The connection is made by a child process after it dropped to that uid; it
/// hands the connected socket back to us over a socketpair, so we can read the refusal.
#[test]
fn foreign_uid_is_refused() {
    const NOBODY: u32 = 65534;
    if !rustix::process::getuid().is_root() {
        eprintln!("skipped: needs root to connect as another uid");
        return;
    }
    let dir = TestDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = Primary::bind(dir.sock()).unwrap();
    // Let nobody reach the socket, so that the uid check (not the file mode) refuses it.
    std::fs::set_permissions(dir.sock(), std::fs::Permissions::from_mode(0o666)).unwrap();

    let (ours, theirs) = UnixStream::pair().unwrap();
    let addr = SocketAddrUnix::new(dir.sock()).unwrap();
    let mut cmd = Command::new("/bin/true");
    cmd.uid(NOBODY).gid(NOBODY);
    // SAFETY: the closure runs in the forked child before exec; it only makes system calls
    // (socket, connect, sendmsg) on stack buffers and values prepared before the fork: no
    // allocation, no lock.
    unsafe {
        cmd.pre_exec(move || {
            let sock = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )?;
            rustix::net::connect(&sock, &addr)?;
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [sock.as_fd()];
            control.push(SendAncillaryMessage::ScmRights(&fds));
            sendmsg(
                &theirs,
                &[IoSlice::new(b"x")],
                &mut control,
                SendFlags::empty(),
            )?;
            Ok(())
        });
    }
    let status = cmd.status().unwrap();
    assert!(status.success(), "{status:?}");
    drop(cmd);

    // The child's connection, handed back to us.
    let mut buf = [0u8; 1];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    recvmsg(
        &ours,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .unwrap();
    let mut received: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            received.extend(r);
        }
    }
    let fd = received.pop().expect("the child sent its socket");
    let raw = Raw { fd };
    let (req_id, status, message) = raw.recv_error();
    assert_eq!(req_id, 0);
    assert_eq!(status, code::EPERM);
    assert_eq!(message, format!("uid {NOBODY} not allowed"));
    raw.expect_eof();
    assert!(p.clients().is_empty());
}
