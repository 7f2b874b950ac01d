//! `uvdpa monitor` end to end: libblkio drives a known number of 4 KiB writes and reads
//! on one device while `uvdpa monitor -i 1 -n 3` runs with its output in a pipe; the
//! printed blocks are parsed and their rates checked against that traffic (and against an
//! idle device next to it).

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::testpmd::{Testpmd, TestpmdOpts};
use common::*;

const BS: usize = 4096;

/// One row of a monitor block, by column name (`None`: `-`, the column does not apply).
#[derive(Debug)]
struct Row {
    device: String,
    qidx: u32,
    kind: String,
    req: Option<f64>,
    read_mb: Option<f64>,
    write_mb: Option<f64>,
    frames: Option<f64>,
    net_mb: Option<f64>,
    kicks: f64,
    calls: f64,
    errors: u64,
}

/// One block: the interval it covers (seconds) and its rows.
#[derive(Debug)]
struct Block {
    interval: f64,
    rows: Vec<Row>,
}

fn parse_blocks(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        if l.trim().is_empty() {
            continue;
        }
        // "uvdpa monitor: sample N, interval S s, Q queues"
        assert!(
            l.starts_with("uvdpa monitor: sample "),
            "unexpected line {l:?}"
        );
        let interval: f64 = l
            .split("interval ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no interval in {l:?}"));
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "DEVICE",
                "QIDX",
                "TYPE",
                "REQ/s",
                "READ_MB/s",
                "WRITE_MB/s",
                "FRAMES/s",
                "NET_MB/s",
                "DROPS/s",
                "KICKS/s",
                "CALLS/s",
                "ERRORS"
            ]
        );
        let mut rows = Vec::new();
        while let Some(l) = lines.next_if(|l| !l.trim().is_empty()) {
            let c: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(c.len(), 12, "row {l:?}");
            let f = |i: usize| -> f64 { c[i].parse().unwrap_or_else(|_| panic!("{l:?}")) };
            let o = |i: usize| (c[i] != "-").then(|| f(i));
            // blk rows have only the blk columns, net rows only the net ones.
            let blk = c[2] == "blk";
            for (i, is_blk) in [
                (3, true),
                (4, true),
                (5, true),
                (6, false),
                (7, false),
                (8, false),
            ] {
                assert_eq!(o(i).is_some(), blk == is_blk, "row {l:?}");
            }
            rows.push(Row {
                device: c[0].into(),
                qidx: c[1].parse().unwrap(),
                kind: c[2].into(),
                req: o(3),
                read_mb: o(4),
                write_mb: o(5),
                frames: o(6),
                net_mb: o(7),
                kicks: f(9),
                calls: f(10),
                errors: c[11].parse().unwrap(),
            });
        }
        blocks.push(Block { interval, rows });
    }
    blocks
}

#[test]
fn monitor_rates_match_the_generated_traffic() {
    let cfg = format!(
        "{}{}",
        blk_config("busy", "backend = \"ram\"\nsize = \"64M\"\nqueues = 2"),
        blk_config("idle", "backend = \"ram\"\nsize = \"16M\"")
    );
    let d = Daemon::start("monitor", &cfg, &["busy", "idle"]);
    let mut c = BlkClient::connect(&d.sock_str("busy"), 2, BS).unwrap();
    c.buf().fill(0x5a);
    let before = d.vstat("busy", 1, "requests");

    // Pairs of one 4 KiB write and one 4 KiB read on queue 1, paced at about 200 requests
    // per second, from before the monitor starts until after it exits.
    let run_pair = |c: &mut BlkClient, i: u64| {
        let offset = (i % 1000) * BS as u64;
        let r = c.run(
            1,
            &[Op::Write {
                offset,
                buf_off: 0,
                len: BS,
            }],
        );
        assert_eq!(r, [0]);
        let r = c.run(
            1,
            &[Op::Read {
                offset,
                buf_off: 0,
                len: BS,
            }],
        );
        assert_eq!(r, [0]);
    };
    let mut pairs = 0u64;
    for _ in 0..20 {
        run_pair(&mut c, pairs);
        pairs += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut mon = Command::new(uvdpa_bin())
        .arg("--ctl")
        .arg(d.dir.join("uvdpa.ctl"))
        .args(["monitor", "-i", "1", "-n", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = mon.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "monitor did not end"
        );
        run_pair(&mut c, pairs);
        pairs += 1;
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    mon.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let mut err = String::new();
    mon.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "monitor failed: {err}");
    assert!(
        !out.contains('\x1b'),
        "no terminal escapes into a pipe: {out:?}"
    );
    let total = d.vstat("busy", 1, "requests") - before;
    assert_eq!(total, 2 * pairs, "every request counted");

    let blocks = parse_blocks(&out);
    assert_eq!(blocks.len(), 3, "one block per interval, -n 3:\n{out}");
    let mut seen = 0.0;
    for b in &blocks {
        assert!(
            (0.9..5.0).contains(&b.interval),
            "interval {} s:\n{out}",
            b.interval
        );
        // busy: 2 queues, idle: 1, in name order.
        let names: Vec<(&str, u32, &str)> = b
            .rows
            .iter()
            .map(|r| (r.device.as_str(), r.qidx, r.kind.as_str()))
            .collect();
        assert_eq!(
            names,
            [("busy", 0, "blk"), ("busy", 1, "blk"), ("idle", 0, "blk")]
        );
        let q1 = &b.rows[1];
        let req = q1.req.unwrap();
        assert!(req > 0.0, "the busy queue shows requests:\n{out}");
        // Every request moved 4096 data bytes, half of them each way: the MB/s columns
        // are REQ/s × 4096 / 2 / 10^6 (up to the printed rounding).
        let per_dir = req * BS as f64 / 2.0 / 1e6;
        for (what, mb) in [("read", q1.read_mb), ("written", q1.write_mb)] {
            let mb = mb.unwrap();
            assert!(
                (mb - per_dir).abs() <= 0.006 + 0.5 * BS as f64 / 1e6,
                "{what} {mb} MB/s for {req} req/s:\n{out}"
            );
        }
        assert!(q1.kicks > 0.0 && q1.calls > 0.0, "kicks and calls:\n{out}");
        assert_eq!(q1.errors, 0);
        seen += req * b.interval;
        for idle in [&b.rows[0], &b.rows[2]] {
            assert_eq!(
                (
                    idle.req,
                    idle.read_mb,
                    idle.write_mb,
                    idle.kicks,
                    idle.calls
                ),
                (Some(0.0), Some(0.0), Some(0.0), 0.0, 0.0),
                "an idle queue shows no traffic:\n{out}"
            );
        }
    }
    // The blocks cover consecutive intervals inside the traffic: together they cannot
    // count more requests than were made (allowing the printed rounding).
    assert!(
        seen <= total as f64 + 3.0 * 0.5 * 5.0,
        "{seen} requests in the blocks, {total} made"
    );
    assert!(seen >= 3.0, "{seen} requests in the blocks");

    // JSON: one object per block with the same fields.
    let (ok, out, err) = d.cli(&["-j", "monitor", "-i", "0.2", "-n", "2"]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["sample"], 2);
    let q = &lines[0]["queues"][2];
    assert_eq!((&q["name"], &q["type"]), (&"idle".into(), &"blk".into()));
    assert_eq!(q["requests_per_sec"], 0.0);

    // Bad arguments fail with the reason.
    let (ok, _, err) = d.cli(&["monitor", "-i", "0"]);
    assert!(!ok && err.contains("interval"), "{err}");
}

/// A `loopback` net device forwarding testpmd's frames (`io`, `start tx_first`): its
/// receive and transmit queues show frames/s, and NET_MB/s is frames/s × the frame length;
/// the control queue shows none.
#[test]
fn monitor_shows_net_frame_rates() {
    const FRAME: u16 = 64;
    let d = Daemon::start(
        "monitor-net",
        "[[device]]\nname = \"net0\"\nmgmtdev = \"net\"\nbackend = \"loopback\"\n\
         queue_pairs = 1\nqueue_size = 1024\n",
        &["net0"],
    );
    let mut pmd = Testpmd::spawn(TestpmdOpts {
        vdev: format!(
            "net_virtio_user0,path={},queues=1,queue_size=256",
            d.sock("net0").display()
        ),
        core: 0,
        fwd_mode: "io",
        txpkts: Some(FRAME),
        nb_queues: 1,
        extra_eal: vec![],
        extra_app: vec![],
    })
    .unwrap_or_else(|e| panic!("testpmd did not start: {e}"));
    pmd.start_tx_first(Some(4)).unwrap();
    let (ok, out, err) = d.cli(&["monitor", "-i", "1", "-n", "2"]);
    pmd.stop().unwrap();
    assert!(ok, "{err}");
    let frames_total = d.vstat("net0", 0, "packets");
    let blocks = parse_blocks(&out);
    assert_eq!(blocks.len(), 2, "{out}");
    let mut seen = 0.0;
    for b in &blocks {
        let kinds: Vec<(u32, &str)> = b.rows.iter().map(|r| (r.qidx, r.kind.as_str())).collect();
        assert_eq!(kinds, [(0, "rx"), (1, "tx"), (2, "cq")], "{out}");
        for r in &b.rows[..2] {
            let fps = r.frames.unwrap();
            assert!(fps > 0.0, "frames on {}:\n{out}", r.kind);
            let mb = r.net_mb.unwrap();
            let want = fps * f64::from(FRAME) / 1e6;
            assert!(
                (mb - want).abs() <= 0.006 + 0.5 * f64::from(FRAME) / 1e6,
                "{mb} MB/s for {fps} frames/s of {FRAME} bytes:\n{out}"
            );
            assert_eq!(r.errors, 0);
        }
        seen += b.rows[0].frames.unwrap() * b.interval;
        let cq = &b.rows[2];
        assert_eq!((cq.frames, cq.net_mb), (Some(0.0), Some(0.0)), "{out}");
    }
    assert!(
        seen <= frames_total as f64 + 2.0 * 0.5 * 5.0,
        "{seen} frames in the blocks, {frames_total} received"
    );
    pmd.quit().unwrap();
}
