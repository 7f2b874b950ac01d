//! Primary and secondary over a real socket: round trips, fds, deadlines, async callbacks,
//! notifications, limits, hooks and shutdown.

mod common;

use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::{Raw, TestDir, LONG};
use serde_json::{json, Value};
use uvdpa_ipc::wire::{self, Kind, MAX_MESSAGE};
use uvdpa_ipc::{
    code, IpcError, Notification, Primary, Reply, Secondary, MAX_CLIENTS, MAX_FDS, MAX_PAYLOAD,
    MAX_PENDING,
};

/// A primary with an `echo` action (replies with the payload and the peer), a `slow`
/// action (sleeps `ms` milliseconds) and a `fail` action (rejects with ENOENT).
fn primary(dir: &TestDir) -> Primary {
    let p = Primary::bind(dir.sock()).unwrap();
    p.register("echo", |req, peer| {
        Ok(Reply::new(json!({
            "payload": req.payload,
            "req_id": req.req_id,
            "pid": peer.pid,
            "uid": peer.uid,
            "client_id": peer.client_id,
        })))
    })
    .unwrap();
    p.register("slow", |req, _| {
        let ms = req.payload["ms"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(Reply::new(json!({"slept": ms})))
    })
    .unwrap();
    p.register("fail", |req, _| {
        Err(IpcError::rejected(
            code::ENOENT,
            format!("no device {}", req.payload["name"].as_str().unwrap_or("?")),
        ))
    })
    .unwrap();
    p
}

fn sync(s: &Secondary, action: &str, payload: Value) -> Result<Reply, IpcError> {
    s.request_sync(action, &payload, &[], LONG)
}

#[test]
fn request_reply_round_trip() {
    let dir = TestDir::new();
    let p = primary(&dir);
    let s = Secondary::connect(dir.sock()).unwrap();
    let r = sync(&s, "echo", json!({"name": "blk0", "n": [1, 2, 3]})).unwrap();
    assert_eq!(
        r.payload["payload"],
        json!({"name": "blk0", "n": [1, 2, 3]})
    );
    assert!(r.fds.is_empty());
    // The primary knows us by SO_PEERCRED: our pid and uid.
    assert_eq!(r.payload["pid"], json!(std::process::id()));
    assert_eq!(r.payload["uid"], json!(rustix::process::getuid().as_raw()));
    assert_eq!(r.payload["client_id"], json!(s.client_id()));
    let peers = p.clients();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].client_id, s.client_id());
    assert_eq!(peers[0].pid as u32, std::process::id());
    assert_eq!(peers[0].uid, rustix::process::getuid().as_raw());
    // Request ids differ from one request to the next.
    let r2 = sync(&s, "echo", Value::Null).unwrap();
    assert_ne!(r.payload["req_id"], r2.payload["req_id"]);
    assert_eq!(r2.payload["payload"], Value::Null);
    assert_eq!(s.pending(), 0);
}

#[test]
fn handler_error_becomes_remote_error() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let s = Secondary::connect(dir.sock()).unwrap();
    match sync(&s, "fail", json!({"name": "blk9"})) {
        Err(IpcError::Remote { code: c, message }) => {
            assert_eq!(c, code::ENOENT);
            assert_eq!(message, "no device blk9");
        }
        other => panic!("{other:?}"),
    }
    match sync(&s, "nope", Value::Null) {
        Err(IpcError::Remote { code: c, message }) => {
            assert_eq!(c, code::ENOENT);
            assert_eq!(message, "unknown action nope");
        }
        other => panic!("{other:?}"),
    }
    // The connection is still good.
    assert!(sync(&s, "echo", json!(1)).is_ok());
}

#[test]
fn fd_in_request_is_usable_by_the_handler() {
    let dir = TestDir::new();
    let p = primary(&dir);
    p.register("write.hello", |req, _| {
        for fd in &req.fds {
            let mut end = UnixStream::from(fd.try_clone().map_err(IpcError::Io)?);
            end.write_all(b"hello from the primary")
                .map_err(IpcError::Io)?;
        }
        Ok(Reply::new(json!({"written": req.fds.len()})))
    })
    .unwrap();
    let s = Secondary::connect(dir.sock()).unwrap();
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let r = s
        .request_sync("write.hello", &Value::Null, &[theirs.as_fd()], LONG)
        .unwrap();
    assert_eq!(r.payload["written"], 1);
    drop(theirs);
    ours.set_read_timeout(Some(LONG)).unwrap();
    let mut got = String::new();
    ours.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from the primary");
}

#[test]
fn fds_in_reply_are_usable_by_the_secondary() {
    let dir = TestDir::new();
    let p = primary(&dir);
    p.register("memfd", |req, _| {
        let n = req.payload["n"].as_u64().unwrap_or(1) as usize;
        let mut fds = Vec::new();
        for i in 0..n {
            let fd = rustix::fs::memfd_create("uvdpa-ipc-test", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| IpcError::Io(e.into()))?;
            let mut f = std::fs::File::from(fd);
            write!(f, "memfd {i}").map_err(IpcError::Io)?;
            f.rewind().map_err(IpcError::Io)?;
            fds.push(OwnedFd::from(f));
        }
        Ok(Reply::with_fds(json!({"n": n}), fds))
    })
    .unwrap();
    let s = Secondary::connect(dir.sock()).unwrap();
    let r = sync(&s, "memfd", json!({"n": MAX_FDS})).unwrap();
    assert_eq!(r.fds.len(), MAX_FDS);
    for (i, fd) in r.fds.into_iter().enumerate() {
        let f = std::fs::File::from(fd);
        let mut buf = [0u8; 16];
        let n = f.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], format!("memfd {i}").as_bytes());
        // Close-on-exec, as every received fd.
        let flags = rustix::io::fcntl_getfd(&f).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }
    // A handler that returns too many fds gets an error reply instead.
    match sync(&s, "memfd", json!({"n": MAX_FDS + 1})) {
        Err(IpcError::Remote { code: c, .. }) => assert_eq!(c, code::E2BIG),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sync_timeout_and_late_reply_discarded() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let s = Secondary::connect(dir.sock()).unwrap();
    let r = s.request_sync("slow", &json!({"ms": 300}), &[], Duration::from_millis(30));
    assert!(matches!(r, Err(IpcError::Timeout)), "{r:?}");
    assert_eq!(s.pending(), 0);
    // The late reply to `slow` arrives first and is dropped; this gets its own reply.
    let r = sync(&s, "echo", json!("after")).unwrap();
    assert_eq!(r.payload["payload"], "after");
}

#[test]
fn async_callbacks_ok_error_timeout() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let s = Secondary::connect(dir.sock()).unwrap();
    let (tx, rx) = mpsc::channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let cb = |tag: &'static str| {
        let tx = tx.clone();
        let calls = Arc::clone(&calls);
        move |r: Result<Reply, IpcError>| {
            calls.fetch_add(1, Ordering::SeqCst);
            tx.send((tag, r)).unwrap();
        }
    };
    s.request_async("echo", &json!("a"), &[], LONG, cb("ok"));
    s.request_async("fail", &json!({"name": "x"}), &[], LONG, cb("error"));
    s.request_async("nope", &Value::Null, &[], LONG, cb("unknown"));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(rx.recv_timeout(LONG).unwrap());
    }
    seen.sort_by_key(|(tag, _)| *tag);
    let [(_, err), (_, ok), (_, unknown)] = <[_; 3]>::try_from(seen).unwrap();
    assert_eq!(ok.unwrap().payload["payload"], "a");
    assert!(matches!(
        err,
        Err(IpcError::Remote {
            code: code::ENOENT,
            ..
        })
    ));
    assert!(
        matches!(unknown, Err(IpcError::Remote { code: code::ENOENT, ref message }) if message == "unknown action nope")
    );

    // Timeout: the handler sleeps longer than the deadline.
    s.request_async(
        "slow",
        &json!({"ms": 300}),
        &[],
        Duration::from_millis(30),
        cb("timeout"),
    );
    let (tag, r) = rx.recv_timeout(LONG).unwrap();
    assert_eq!(tag, "timeout");
    assert!(matches!(r, Err(IpcError::Timeout)), "{r:?}");
    // The late reply is discarded: the next request gets its own, and no callback runs twice.
    assert_eq!(sync(&s, "echo", json!(2)).unwrap().payload["payload"], 2);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(rx.try_recv().is_err());

    // Errors found before sending reach the callback too, on this thread.
    s.request_async("Bad Name", &Value::Null, &[], LONG, cb("invalid"));
    let (_, r) = rx.try_recv().unwrap();
    assert!(matches!(r, Err(IpcError::InvalidAction(_))));
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[test]
fn request_limits_checked_before_sending() {
    let dir = TestDir::new();
    let _p = primary(&dir);
    let s = Secondary::connect(dir.sock()).unwrap();
    let big = Value::String("x".repeat(MAX_PAYLOAD));
    assert!(matches!(
        sync(&s, "echo", big),
        Err(IpcError::PayloadTooLarge { .. })
    ));
    let (a, _b) = UnixStream::pair().unwrap();
    let many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
    assert!(matches!(
        s.request_sync("echo", &Value::Null, &many, LONG),
        Err(IpcError::TooManyFds { .. })
    ));
    assert!(matches!(
        sync(&s, "Echo", Value::Null),
        Err(IpcError::InvalidAction(_))
    ));
    // A payload just under the limit goes through.
    let fits = Value::String("y".repeat(MAX_PAYLOAD / 2));
    let r = sync(&s, "echo", fits.clone()).unwrap();
    assert_eq!(r.payload["payload"], fits);
    // A reply that would be too large becomes an error reply.
    match sync(&s, "echo", Value::String("z".repeat(MAX_PAYLOAD - 16))) {
        Err(IpcError::Remote { code: c, .. }) => assert_eq!(c, code::EMSGSIZE),
        other => panic!("{other:?}"),
    }
}

#[test]
fn handler_panic_is_an_eio_reply() {
    let dir = TestDir::new();
    let p = primary(&dir);
    p.register("boom", |_, _| panic!("handler bug")).unwrap();
    let s = Secondary::connect(dir.sock()).unwrap();
    match sync(&s, "boom", Value::Null) {
        Err(IpcError::Remote { code: c, message }) => {
            assert_eq!(c, code::EIO);
            assert_eq!(message, "handler for boom panicked");
        }
        other => panic!("{other:?}"),
    }
    // The primary and this very connection still work.
    assert!(sync(&s, "echo", json!(1)).is_ok());
    let s2 = Secondary::connect(dir.sock()).unwrap();
    assert!(sync(&s2, "echo", json!(2)).is_ok());
}

#[test]
fn notify_one_client() {
    let dir = TestDir::new();
    let p = primary(&dir);
    let a = Secondary::connect(dir.sock()).unwrap();
    let b = Secondary::connect(dir.sock()).unwrap();
    let (tx, rx) = mpsc::channel::<(&'static str, Value)>();
    for (s, tag) in [(&a, "a"), (&b, "b")] {
        let tx = tx.clone();
        s.on_notification("dev.removed", move |n: &Notification| {
            assert_eq!(n.action, "dev.removed");
            tx.send((tag, n.payload.clone())).unwrap();
        })
        .unwrap();
    }
    p.notify(a.client_id(), "dev.removed", &json!({"name": "blk0"}))
        .unwrap();
    assert_eq!(
        rx.recv_timeout(LONG).unwrap(),
        ("a", json!({"name": "blk0"}))
    );
    // b got nothing: a notification would have been read before this reply.
    sync(&b, "echo", Value::Null).unwrap();
    assert!(rx.try_recv().is_err());
    assert!(matches!(
        p.notify(9999, "dev.removed", &Value::Null),
        Err(IpcError::UnknownClient(9999))
    ));
    assert!(matches!(
        p.notify(a.client_id(), "Bad", &Value::Null),
        Err(IpcError::InvalidAction(_))
    ));
}

#[test]
fn notify_all_clients() {
    let dir = TestDir::new();
    let p = primary(&dir);
    let (tx, rx) = mpsc::channel();
    let clients: Vec<Secondary> = (0..3)
        .map(|_| {
            let s = Secondary::connect(dir.sock()).unwrap();
            let tx = tx.clone();
            let id = s.client_id();
            s.on_notification("dev.added", move |n| {
                tx.send((id, n.payload["name"].clone())).unwrap();
            })
            .unwrap();
            s
        })
        .collect();
    assert_eq!(
        p.notify_all("dev.added", &json!({"name": "net0"})).unwrap(),
        3
    );
    let mut ids: Vec<u64> = (0..3)
        .map(|_| {
            let (id, name) = rx.recv_timeout(LONG).unwrap();
            assert_eq!(name, "net0");
            id
        })
        .collect();
    ids.sort_unstable();
    let mut expected: Vec<u64> = clients.iter().map(Secondary::client_id).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);
}

#[test]
fn client_that_never_reads_does_not_stall_the_primary() {
    let dir = TestDir::new();
    let p = primary(&dir);
    // Reads its welcome, then nothing ever again.
    let (stuck, stuck_id) = Raw::connect(&dir.sock());
    let s = Secondary::connect(dir.sock()).unwrap();
    let blob = json!({"data": "n".repeat(4096)});
    let mut delivered_to_stuck_stopped = false;
    for _ in 0..2000 {
        if let Err(IpcError::ClientBusy(id)) = p.notify(stuck_id, "tick", &blob) {
            assert_eq!(id, stuck_id);
            delivered_to_stuck_stopped = true;
        }
        p.notify_all("tick", &blob).unwrap();
    }
    assert!(
        delivered_to_stuck_stopped,
        "the stuck client's socket never filled"
    );
    assert!(p.dropped_notifications(stuck_id).unwrap() > 0);
    // Another client is answered.
    let r = s
        .request_sync("echo", &json!("still here"), &[], LONG)
        .unwrap();
    assert_eq!(r.payload["payload"], "still here");
    drop(stuck);
}

#[test]
fn secondary_refused_when_the_primary_is_full() {
    let dir = TestDir::new();
    let p = primary(&dir);
    let raws: Vec<Raw> = (0..MAX_CLIENTS)
        .map(|_| Raw::connect(&dir.sock()).0)
        .collect();
    assert_eq!(p.clients().len(), MAX_CLIENTS);
    match Secondary::connect(dir.sock()) {
        Err(IpcError::Remote { code: c, message }) => {
            assert_eq!(c, code::EBUSY);
            assert!(message.contains("Too many clients"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The raw view: one error with req_id 0, then the connection is closed.
    let extra = Raw::connect_only(&dir.sock());
    let (req_id, status, _) = extra.recv_error();
    assert_eq!((req_id, status), (0, code::EBUSY));
    extra.expect_eof();
    // Room again once the primary has seen a client leave.
    drop(raws);
    let until = std::time::Instant::now() + LONG;
    while p.clients().len() >= MAX_CLIENTS && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = Secondary::connect(dir.sock()).unwrap();
    assert!(sync(&s, "echo", Value::Null).is_ok());
}

#[test]
fn too_many_pending_requests() {
    // A fake primary that welcomes, then reads every request and never answers.
    let dir = TestDir::new();
    let listener = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let addr = rustix::net::SocketAddrUnix::new(dir.sock()).unwrap();
    rustix::net::bind(&listener, &addr).unwrap();
    rustix::net::listen(&listener, 4).unwrap();
    let fake = std::thread::spawn(move || {
        let conn = rustix::net::accept(&listener).unwrap();
        let welcome = wire::encode(
            Kind::Notification,
            0,
            0,
            wire::WELCOME_ACTION,
            &json!({"client_id": 7, "version": 1}),
        )
        .unwrap();
        rustix::net::send(&conn, &welcome, rustix::net::SendFlags::empty()).unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut n = 0usize;
        loop {
            match rustix::net::recv(&conn, &mut buf, rustix::net::RecvFlags::empty()) {
                Ok((0, _)) | Err(_) => return n,
                Ok(_) => n += 1,
            }
        }
    });
    let s = Secondary::connect(dir.sock()).unwrap();
    assert_eq!(s.client_id(), 7);
    let (tx, rx) = mpsc::channel();
    for i in 0..=MAX_PENDING {
        let tx = tx.clone();
        s.request_async("echo", &json!(i), &[], LONG * 6, move |r| {
            tx.send(r).unwrap();
        });
    }
    // Only the one over the limit completed, at once.
    match rx.try_recv() {
        Ok(Err(IpcError::TooManyPending)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(s.pending(), MAX_PENDING);
    assert!(matches!(
        s.request_sync("echo", &Value::Null, &[], LONG),
        Err(IpcError::TooManyPending)
    ));
    // Closing the connection fails every pending request, each callback exactly once.
    drop(s);
    let mut closed = 0;
    while let Ok(r) = rx.try_recv() {
        assert!(matches!(r, Err(IpcError::Closed)), "{r:?}");
        closed += 1;
    }
    assert_eq!(closed, MAX_PENDING);
    assert_eq!(fake.join().unwrap(), MAX_PENDING);
}

#[test]
fn hooks_and_client_list() {
    let dir = TestDir::new();
    let p = primary(&dir);
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    p.on_connect(move |peer| tx.send(("connect", *peer)).unwrap());
    p.on_disconnect(move |peer| tx2.send(("disconnect", *peer)).unwrap());
    let s = Secondary::connect(dir.sock()).unwrap();
    let (what, peer) = rx.recv_timeout(LONG).unwrap();
    assert_eq!(what, "connect");
    assert_eq!(peer.client_id, s.client_id());
    assert_eq!(peer.pid as u32, std::process::id());
    assert_eq!(p.clients(), vec![peer]);
    drop(s);
    let (what, gone) = rx.recv_timeout(LONG).unwrap();
    assert_eq!((what, gone), ("disconnect", peer));
    assert!(p.clients().is_empty());
}

#[test]
fn register_validates_names() {
    let dir = TestDir::new();
    let p = primary(&dir);
    assert!(matches!(
        p.register("echo", |_, _| Ok(Reply::default())),
        Err(IpcError::AlreadyRegistered(_))
    ));
    for bad in ["", "Echo", "dev add", "ipc.welcome", &"x".repeat(65)] {
        assert!(
            matches!(
                p.register(bad, |_, _| Ok(Reply::default())),
                Err(IpcError::InvalidAction(_))
            ),
            "{bad:?}"
        );
    }
    assert!(p.unregister("echo"));
    assert!(!p.unregister("echo"));
    let s = Secondary::connect(dir.sock()).unwrap();
    assert!(matches!(
        sync(&s, "echo", Value::Null),
        Err(IpcError::Remote {
            code: code::ENOENT,
            ..
        })
    ));
    assert!(matches!(
        s.on_notification("Bad", |_| {}),
        Err(IpcError::InvalidAction(_))
    ));
}

#[test]
fn socket_file_mode_and_stale_file() {
    let dir = TestDir::new();
    let path = dir.sock();
    // A stale socket: bound, then its listener gone.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let p = Primary::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A live primary is not replaced.
    assert!(matches!(
        Primary::bind(&path),
        Err(IpcError::AddressInUse { .. })
    ));
    assert!(Secondary::connect(&path).is_ok());
    drop(p);
    assert!(!path.exists(), "shutdown removes the socket file");
    // Something that is not a socket is left alone.
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        Primary::bind(&path),
        Err(IpcError::AddressInUse { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    // An unusable path is a bind error.
    let long = dir.path().join("x".repeat(200));
    assert!(matches!(Primary::bind(long), Err(IpcError::Bind { .. })));
}

#[test]
fn shutdown_closes_secondaries() {
    let dir = TestDir::new();
    let p = primary(&dir);
    let s = Secondary::connect(dir.sock()).unwrap();
    assert!(sync(&s, "echo", Value::Null).is_ok());
    p.shutdown();
    p.shutdown();
    assert!(p.clients().is_empty());
    assert!(!dir.sock().exists());
    assert!(matches!(
        sync(&s, "echo", Value::Null),
        Err(IpcError::Closed)
    ));
    assert!(s.is_closed());
    let (tx, rx) = mpsc::channel();
    s.request_async("echo", &Value::Null, &[], LONG, move |r| {
        tx.send(r).unwrap();
    });
    assert!(matches!(
        rx.recv_timeout(LONG).unwrap(),
        Err(IpcError::Closed)
    ));
    assert!(matches!(
        Secondary::connect(dir.sock()),
        Err(IpcError::Connect { .. })
    ));
}

#[test]
fn slow_handler_delays_only_its_own_client() {
    let dir = TestDir::new();
    let p = primary(&dir);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    p.register("block", move |_, _| {
        let _ = release_rx.lock().unwrap().recv_timeout(LONG);
        Ok(Reply::default())
    })
    .unwrap();
    let blocked = Secondary::connect(dir.sock()).unwrap();
    let (tx, rx) = mpsc::channel();
    blocked.request_async("block", &Value::Null, &[], LONG, move |r| {
        tx.send(r.is_ok()).unwrap();
    });
    // While `block` runs, another client is served.
    let other = Secondary::connect(dir.sock()).unwrap();
    assert!(sync(&other, "echo", json!(1)).is_ok());
    assert!(rx.try_recv().is_err(), "block was released early");
    release_tx.send(()).unwrap();
    assert!(rx.recv_timeout(LONG).unwrap());
}
