//! Hostile vhost-user frontends: malformed messages get a failure reply or end their
//! session with a log line; the device then serves the next frontend, and a second device
//! in the same daemon keeps completing verified I/O throughout.

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw::*;
use common::*;

fn vring_addr(index: u32, flags: u32) -> Vec<u8> {
    let mut b = index.to_le_bytes().to_vec();
    b.extend_from_slice(&flags.to_le_bytes());
    for v in [0x1000u64, 0x2000, 0x3000, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// A libblkio client doing write/verify rounds on `path` until `stop`; returns rounds done.
fn bystander(path: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut c = BlkClient::connect(&path, 1, 16 * 4096).unwrap();
        let mut rounds = 0u64;
        while !stop.load(Ordering::Relaxed) || rounds < 3 {
            c.verify_round("bystander", 0, (rounds % 64) * 65536, 16, rounds);
            rounds += 1;
        }
        rounds
    })
}

#[test]
fn malformed_messages_fail_the_session_not_the_daemon() {
    let cfg = format!(
        "{}{}",
        blk_config("victim", "backend = \"ram\"\nsize = \"8M\"\nqueues = 2"),
        blk_config("other", "backend = \"ram\"\nsize = \"8M\"")
    );
    let mut d = Daemon::start("bad", &cfg, &["victim", "other"]);
    let stop = Arc::new(AtomicBool::new(false));
    let other = bystander(d.sock_str("other"), stop.clone());
    let victim = d.sock_str("victim");

    // Framing errors end the session: the backend closes the connection.
    type Sender = Box<dyn Fn(&Raw)>;
    let closing: Vec<(&str, Sender)> = vec![
        (
            "unknown request",
            Box::new(|r: &Raw| r.send(999, 0, &[], &[])),
        ),
        (
            "bad version",
            Box::new(|r: &Raw| {
                let mut hdr = GET_FEATURES.to_le_bytes().to_vec();
                hdr.extend_from_slice(&2u32.to_le_bytes());
                hdr.extend_from_slice(&0u32.to_le_bytes());
                std::io::Write::write_all(&mut &r.s, &hdr).unwrap();
            }),
        ),
        (
            "oversized body",
            Box::new(|r: &Raw| r.send_sized(SET_FEATURES, 0, 1 << 20, &[0; 64], &[])),
        ),
        (
            "wrong size without ack",
            Box::new(|r: &Raw| r.send(SET_FEATURES, 0, &[1, 2, 3, 4], &[])),
        ),
        (
            "too many fds",
            Box::new(|r: &Raw| {
                let fds: Vec<OwnedFd> = (0..12).map(|_| memfd(4096)).collect();
                let b: Vec<BorrowedFd> = fds.iter().map(|f| f.as_fd()).collect();
                r.send(SET_FEATURES, 0, &(1u64 << 32).to_le_bytes(), &b);
            }),
        ),
    ];
    for (what, send) in &closing {
        let mut r = Raw::connect(&victim);
        send(&r);
        assert!(
            matches!(r.answer(), Answer::Closed),
            "{what}: session not ended"
        );
    }

    // With REPLY_ACK negotiated, bad parameters get a failure reply and the session goes on.
    let mut r = Raw::with_reply_ack(&victim);
    let m1 = memfd(1 << 20);
    let m2 = memfd(1 << 20);
    let cases: Vec<(&str, u32, Vec<u8>, Vec<BorrowedFd>)> = vec![
        ("wrong body size", SET_VRING_NUM, vec![0; 4], vec![]),
        (
            "vring index out of range",
            SET_VRING_NUM,
            [5u32, 256].iter().flat_map(|v| v.to_le_bytes()).collect(),
            vec![],
        ),
        (
            "vring size not a power of two",
            SET_VRING_NUM,
            [0u32, 100].iter().flat_map(|v| v.to_le_bytes()).collect(),
            vec![],
        ),
        (
            "extra fd",
            SET_VRING_NUM,
            [0u32, 256].iter().flat_map(|v| v.to_le_bytes()).collect(),
            vec![m1.as_fd()],
        ),
        (
            "missing fd",
            SET_MEM_TABLE,
            mem_table(&[region(0, 1 << 20, 0x7000_0000)]),
            vec![],
        ),
        (
            "kick without fd",
            SET_VRING_KICK,
            0u64.to_le_bytes().to_vec(),
            vec![],
        ),
        (
            "kick for vring 200",
            SET_VRING_KICK,
            200u64.to_le_bytes().to_vec(),
            vec![m1.as_fd()],
        ),
        (
            "overlapping regions",
            SET_MEM_TABLE,
            mem_table(&[
                region(0, 1 << 20, 0x7000_0000),
                region(0x8_0000, 1 << 20, 0x8000_0000),
            ]),
            vec![m1.as_fd(), m2.as_fd()],
        ),
        (
            "absurd region",
            SET_MEM_TABLE,
            mem_table(&[region(0, 1 << 60, 0x7000_0000)]),
            vec![m1.as_fd()],
        ),
        ("zero regions", SET_MEM_TABLE, mem_table(&[]), vec![]),
        (
            "unoffered feature",
            SET_FEATURES,
            (1u64 << 32 | 1 << 30 | 1 << 3).to_le_bytes().to_vec(),
            vec![],
        ),
        (
            "vring addr with an unknown flag",
            SET_VRING_ADDR,
            vring_addr(0, 2),
            vec![],
        ),
        (
            "vring addr for vring 9",
            SET_VRING_ADDR,
            vring_addr(9, 0),
            vec![],
        ),
    ];
    for (what, code, body, fds) in &cases {
        r.send(*code, NEED_REPLY, body, fds);
        match r.u64_answer() {
            Some(v) => assert_ne!(v, 0, "{what}: accepted"),
            None => panic!("{what}: session ended instead of a failure reply"),
        }
    }
    // The same session still answers well-formed requests.
    r.send(
        GET_CONFIG,
        0,
        &[0u32, 8, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .chain([0u8; 8])
            .collect::<Vec<u8>>(),
        &[],
    );
    match r.answer() {
        Answer::Reply(b) => {
            assert_eq!(b.len(), 20);
            let capacity = u64::from_le_bytes(b[12..20].try_into().unwrap());
            assert_eq!(capacity, (8 << 20) / 512, "capacity in 512-byte sectors");
        }
        Answer::Closed => panic!("GET_CONFIG after failures: session ended"),
    }
    drop(r);

    // The victim serves a well-behaved frontend afterwards.
    let mut c = None;
    for _ in 0..100 {
        if let Ok(x) = BlkClient::connect(&victim, 2, 4096) {
            c = Some(x);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = c.expect("victim device did not recover");
    c.buf().fill(0x3c);
    assert_eq!(
        c.run(
            1,
            &[Op::Write {
                offset: 0,
                buf_off: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    drop(c);

    stop.store(true, Ordering::Relaxed);
    let rounds = other.join().expect("bystander failed");
    assert!(rounds >= 3);
    assert!(d.alive(), "daemon died");
    let log = d.log_text();
    assert!(
        log.contains("Ending session"),
        "no log line for ended sessions"
    );
    assert!(d.stop().success());
}

fn inflight_body(num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut b = [0u64, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>();
    b.extend_from_slice(&num_queues.to_le_bytes());
    b.extend_from_slice(&queue_size.to_le_bytes());
    b.extend_from_slice(&[0; 4]); // struct padding, as in QEMU's VhostUserInflight
    b
}

/// Frontend choices the device cannot serve get an answer the frontend understands, and
/// the ones it can serve are served (issue #9): an inflight buffer for any ring size, a
/// refused inflight geometry answered with an empty buffer (QEMU then runs without one
/// instead of failing the device start), an ADD_MEM_REG of a region that is already
/// mapped (QEMU sends a multi-queue device's regions once per vhost device) taken as one
/// more reference, and the MTU protocol feature offered to network devices only.
#[test]
fn frontend_choices_are_answered_not_dropped() {
    let cfg = format!(
        "{}[[device]]\nname = \"n\"\nmgmtdev = \"net\"\n",
        blk_config("b", "backend = \"ram\"\nsize = \"8M\"")
    );
    let mut d = Daemon::start("choices", &cfg, &["b", "n"]);

    let (mut r, offered) =
        Raw::negotiate(&d.sock_str("b"), INFLIGHT_SHMFD | CONFIGURE_MEM_SLOTS | MTU);
    assert_eq!(offered & MTU, 0, "NET_MTU offered by a block device");
    // A 1024-entry ring on a device whose queue size is 128.
    r.send(GET_INFLIGHT_FD, 0, &inflight_body(1, 1024), &[]);
    match r.answer() {
        Answer::Reply(b) => {
            assert_eq!(b.len(), 24);
            let size = u64::from_le_bytes(b[0..8].try_into().unwrap());
            assert!(size >= 1024 * 16, "inflight buffer of {size} bytes");
        }
        Answer::Closed => panic!("GET_INFLIGHT_FD for 1024 descriptors ended the session"),
    }
    // More queues than the device has, and a zero queue size: an empty buffer.
    for (nq, qs) in [(5u16, 128u16), (1, 0)] {
        r.send(GET_INFLIGHT_FD, 0, &inflight_body(nq, qs), &[]);
        match r.answer() {
            Answer::Reply(b) => {
                assert_eq!(b.len(), 24);
                assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 0);
            }
            Answer::Closed => panic!("GET_INFLIGHT_FD {nq}x{qs} ended the session"),
        }
    }
    // The same region twice is two references: two removals succeed, a third fails.
    let m = memfd(1 << 20);
    let single = |gpa| {
        let mut b = vec![0u8; 8];
        b.extend(region(gpa, 1 << 20, 0x7000_0000 + gpa));
        b
    };
    for what in ["first", "identical"] {
        r.send(ADD_MEM_REG, NEED_REPLY, &single(0), &[m.as_fd()]);
        assert_eq!(r.u64_answer(), Some(0), "{what} ADD_MEM_REG refused");
    }
    // A different region overlapping it is still refused.
    r.send(ADD_MEM_REG, NEED_REPLY, &single(0x8_0000), &[m.as_fd()]);
    assert_ne!(r.u64_answer(), Some(0), "overlapping region accepted");
    for n in 0..2 {
        r.send(REM_MEM_REG, NEED_REPLY, &single(0), &[]);
        assert_eq!(r.u64_answer(), Some(0), "REM_MEM_REG {n} refused");
    }
    r.send(REM_MEM_REG, NEED_REPLY, &single(0), &[]);
    assert_ne!(r.u64_answer(), Some(0), "removed a region that is gone");
    // A refused ADD_MEM_REG or REM_MEM_REG keeps the table it was refused against: the
    // region at 4 MiB still refuses an overlapping one afterwards.
    r.send(ADD_MEM_REG, NEED_REPLY, &single(4 << 20), &[m.as_fd()]);
    assert_eq!(r.u64_answer(), Some(0), "ADD_MEM_REG at 4 MiB refused");
    r.send(REM_MEM_REG, NEED_REPLY, &single(0), &[]);
    assert_ne!(r.u64_answer(), Some(0), "removed a region that is gone");
    r.send(
        ADD_MEM_REG,
        NEED_REPLY,
        &single((4 << 20) + 0x8_0000),
        &[m.as_fd()],
    );
    assert_ne!(
        r.u64_answer(),
        Some(0),
        "the table was lost with a refused REM_MEM_REG"
    );
    // NET_SET_MTU is refused by a block device (the feature was not negotiated).
    r.send(NET_SET_MTU, NEED_REPLY, &9000u64.to_le_bytes(), &[]);
    assert_ne!(r.u64_answer(), Some(0));
    drop(r);

    let (mut r, offered) = Raw::negotiate(&d.sock_str("n"), MTU);
    assert_ne!(offered & MTU, 0, "NET_MTU not offered by a net device");
    for (mtu, ok) in [(9000u64, true), (67, false), (70_000, false), (1500, true)] {
        r.send(NET_SET_MTU, NEED_REPLY, &mtu.to_le_bytes(), &[]);
        let answer = r.u64_answer().expect("NET_SET_MTU ended the session");
        assert_eq!(answer == 0, ok, "NET_SET_MTU {mtu}");
    }
    drop(r);
    assert!(d.alive());
    assert!(d.log_text().contains("frontend MTU set"));
    assert!(d.stop().success());
}
