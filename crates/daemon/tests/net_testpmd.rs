//! `dpdk-testpmd` (`net_virtio_user`, DPDK 22.11) as the frontend of uvdpa `loopback` net
//! devices: frames the driver transmits come back on the same queue pair. testpmd runs
//! `io` forwarding started with `start tx_first`, so the first bursts circulate between
//! its transmit and receive queues through uvdpa for as long as it runs; the test asserts
//! that a large number of frames came back, for split and packed rings, 1 and 2 queue
//! pairs, with and without mergeable receive buffers, and that uvdpa counted them.

mod common;

use std::time::Duration;

use common::testpmd::{Testpmd, TestpmdOpts};
use common::Daemon;

/// Frames that must come back before a configuration passes.
const MIN_FRAMES: u64 = 50_000;

fn loopback_daemon(tag: &str, pairs: u16, extra: &str) -> Daemon {
    let cfg = format!(
        "[[device]]\nname = \"net0\"\nmgmtdev = \"net\"\nbackend = \"loopback\"\n\
         queue_pairs = {pairs}\nqueue_size = 1024\n{extra}\n"
    );
    Daemon::start(tag, &cfg, &["net0"])
}

/// Runs one configuration; returns a summary line.
fn loopback_case(pairs: u16, packed: bool, mrg: bool, in_order: bool, frame: u16) -> String {
    let d = loopback_daemon("ntpmd", pairs, "");
    let sock = d.dir.join("net0.sock");
    let mut pmd = Testpmd::spawn(TestpmdOpts {
        vdev: format!(
            "net_virtio_user0,path={},queues={pairs},packed_vq={},mrg_rxbuf={},in_order={},queue_size=256",
            sock.display(),
            packed as u8,
            mrg as u8,
            in_order as u8,
        ),
        core: 0,
        fwd_mode: "io",
        txpkts: Some(frame),
        nb_queues: pairs,
        extra_eal: vec![],
        extra_app: vec![],
    })
    .unwrap_or_else(|e| panic!("testpmd did not start: {e}"));
    pmd.start_tx_first(Some(4))
        .unwrap_or_else(|e| panic!("start tx_first: {e}"));
    let waited = pmd.wait_stats(Duration::from_secs(20), |s| {
        s.rx_packets >= MIN_FRAMES && s.tx_packets >= MIN_FRAMES
    });
    if let Err(e) = waited {
        panic!(
            "frames did not come back (pairs={pairs} packed={packed} mrg={mrg}): {e}\n{}",
            pmd.log_tail(40)
        );
    }
    pmd.stop().unwrap();
    let s = pmd.stats().unwrap();
    pmd.quit().unwrap();
    drop(pmd);
    // Every frame came back with its length (testpmd counts bytes without the header).
    assert_eq!(
        s.rx_bytes,
        s.rx_packets * u64::from(frame),
        "received frames of the wrong length: {s:?}"
    );
    // uvdpa saw them on every queue pair's transmit queue and put them on its receive
    // queue; with 2 pairs testpmd's `io` forwarding uses both.
    let mut rx = 0;
    let mut tx = 0;
    for p in 0..usize::from(pairs) {
        let prx = d.vstat("net0", 2 * p, "packets");
        let ptx = d.vstat("net0", 2 * p + 1, "packets");
        assert!(prx > 0 && ptx > 0, "queue pair {p} idle: rx={prx} tx={ptx}");
        rx += prx;
        tx += ptx;
    }
    assert!(
        rx >= s.rx_packets && tx >= rx,
        "device counters rx={rx} tx={tx} below testpmd's {s:?}"
    );
    format!(
        "pairs={pairs} packed={packed} mrg={mrg} in_order={in_order} frame={frame}: \
         testpmd rx={} tx={}, uvdpa rx={rx} tx={tx} drops(rx q0)={}",
        s.rx_packets,
        s.tx_packets,
        d.vstat("net0", 0, "drops")
    )
}

#[test]
fn testpmd_frames_come_back_through_loopback_split_rings() {
    eprintln!("{}", loopback_case(1, false, false, false, 64));
    eprintln!("{}", loopback_case(1, false, true, false, 1518));
    eprintln!("{}", loopback_case(2, false, true, true, 64));
}

#[test]
fn testpmd_frames_come_back_through_loopback_packed_rings() {
    eprintln!("{}", loopback_case(1, true, false, false, 64));
    eprintln!("{}", loopback_case(1, true, true, true, 1518));
    eprintln!("{}", loopback_case(2, true, false, false, 64));
    eprintln!("{}", loopback_case(2, true, true, false, 1518));
}

/// testpmd in `txonly` mode never reads its receive queue: uvdpa's loopback finds no
/// receive buffers after the first ring's worth, drops what it cannot deliver, counts it,
/// and keeps consuming the transmit ring (the driver is never stalled).
#[test]
fn testpmd_txonly_into_a_full_receive_queue_is_dropped_and_counted() {
    let d = loopback_daemon("ntxonly", 1, "");
    let sock = d.dir.join("net0.sock");
    let mut pmd = Testpmd::spawn(TestpmdOpts {
        vdev: format!("net_virtio_user0,path={},queues=1", sock.display()),
        core: 0,
        fwd_mode: "txonly",
        txpkts: Some(64),
        nb_queues: 1,
        extra_eal: vec![],
        extra_app: vec![],
    })
    .unwrap_or_else(|e| panic!("testpmd did not start: {e}"));
    pmd.start().unwrap();
    pmd.wait_stats(Duration::from_secs(20), |s| s.tx_packets >= MIN_FRAMES)
        .unwrap_or_else(|e| panic!("txonly did not transmit: {e}\n{}", pmd.log_tail(40)));
    pmd.stop().unwrap();
    let s = pmd.stats().unwrap();
    pmd.quit().unwrap();
    let tx = d.vstat("net0", 1, "packets");
    let drops = d.vstat("net0", 0, "drops");
    let rx = d.vstat("net0", 0, "packets");
    assert!(tx >= s.tx_packets, "uvdpa tx {tx} < testpmd tx {s:?}");
    assert!(
        rx <= 1024,
        "more delivered ({rx}) than receive buffers given"
    );
    assert_eq!(
        rx + drops,
        tx,
        "every transmitted frame is delivered or dropped"
    );
}
