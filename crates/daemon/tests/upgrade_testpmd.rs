//! Live upgrade of a net device (issue 11): `dpdk-testpmd` (`net_virtio_user`) keeps frames
//! circulating through a uvdpa `loopback` device (`io` forwarding after `start tx_first`)
//! while `uvdpa daemon --takeover` replaces the daemon ten times. The stream never stops:
//! after every takeover more frames come back within a bounded time, testpmd's
//! virtio_user never reconnects (one session connect in the daemon's counters, no
//! reconnect line in testpmd's log), the device's counters continue, and every frame that
//! came back has its length. Split and packed rings.

mod common;

use std::time::Duration;

use common::testpmd::{Testpmd, TestpmdOpts};
use common::{pause_summary, unique_dir, Daemon};

/// Frames that must come back after each takeover.
const FRAMES_PER_ROUND: u64 = 20_000;
const FRAME: u16 = 64;
const TAKEOVERS: usize = 10;

fn stream_survives_takeovers(packed: bool) {
    let tag = if packed { "uptpmdp" } else { "uptpmd" };
    let cfg = "metrics = \"127.0.0.1:0\"\n[[device]]\nname = \"net0\"\nmgmtdev = \"net\"\n\
               backend = \"loopback\"\nqueue_size = 1024\n";
    let mut d = Daemon::start_in(unique_dir(tag), cfg, &["net0"]);
    let sock = d.dir.join("net0.sock");
    let mut pmd = Testpmd::spawn(TestpmdOpts {
        vdev: format!(
            "net_virtio_user0,path={},queues=1,packed_vq={},queue_size=256",
            sock.display(),
            packed as u8
        ),
        fwd_mode: "io",
        txpkts: Some(FRAME),
        ..TestpmdOpts::default()
    })
    .unwrap_or_else(|e| panic!("testpmd did not start: {e}"));
    pmd.start_tx_first(Some(4))
        .unwrap_or_else(|e| panic!("start tx_first: {e}"));
    let mut seen = pmd
        .wait_stats(Duration::from_secs(20), |s| {
            s.rx_packets >= FRAMES_PER_ROUND
        })
        .unwrap_or_else(|e| panic!("no stream before the takeovers: {e}"))
        .rx_packets;
    let mut lines = Vec::new();
    let mut dev_rx = d.vstat("net0", 0, "packets");
    for n in 1..=TAKEOVERS {
        let old_pid = d.pid();
        let (new, line) = d
            .takeover(&[])
            .unwrap_or_else(|e| panic!("takeover {n}: {e}\n{}", pmd.log_tail(20)));
        assert_eq!(line.from_pid, old_pid, "{}", line.line);
        let st = d.wait_exit(Duration::from_secs(20));
        assert!(
            st.is_some_and(|s| s.success()),
            "takeover {n}: old daemon exit {st:?}"
        );
        d = new;
        let s = pmd
            .wait_stats(Duration::from_secs(15), |s| {
                s.rx_packets >= seen + FRAMES_PER_ROUND
            })
            .unwrap_or_else(|e| {
                panic!(
                    "takeover {n}: the stream stopped: {e}\n--- daemon log:\n{}",
                    d.log_text()
                )
            });
        seen = s.rx_packets;
        let rx = d.vstat("net0", 0, "packets");
        assert!(
            rx >= dev_rx,
            "takeover {n}: device rx counter went back {dev_rx} -> {rx}"
        );
        dev_rx = rx;
        lines.push(line);
    }
    pmd.stop().unwrap();
    let s = pmd.stats().unwrap();
    let log = pmd.output();
    pmd.quit().unwrap();
    drop(pmd);
    assert_eq!(
        s.rx_bytes,
        s.rx_packets * u64::from(FRAME),
        "frames of the wrong length came back: {s:?}"
    );
    assert_eq!(
        d.session_connects("net0"),
        1,
        "testpmd reconnected during the takeovers"
    );
    for bad in ["reconnect", "disconnect", "Connection reset"] {
        assert!(!log.contains(bad), "testpmd's log mentions {bad:?}:\n{log}");
    }
    eprintln!(
        "net ({}): {}; testpmd rx={} tx={}",
        if packed { "packed" } else { "split" },
        pause_summary(&lines),
        s.rx_packets,
        s.tx_packets
    );
    assert!(d.stop().success());
}

#[test]
fn testpmd_stream_survives_ten_takeovers_split_ring() {
    stream_survives_takeovers(false);
}

#[test]
fn testpmd_stream_survives_ten_takeovers_packed_ring() {
    stream_survives_takeovers(true);
}
