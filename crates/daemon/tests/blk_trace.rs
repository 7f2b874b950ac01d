//! `uvdpa dev capture` on a blk device: the request trace. libblkio issues a known
//! sequence of requests (writes at given sectors, a read, a flush, a discard, a
//! write-zeroes, a read past the end) on two queues; the JSON lines hold exactly those, in
//! order, with their types, sectors, lengths and statuses. A trace of one queue holds only
//! that queue's; a trace SIGKILLed under I/O leaves nothing in `res show` and the device
//! takes a new one.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A running `uvdpa dev capture t0 ...`, started once the daemon attached it.
struct Trace {
    child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Trace {
    fn start(d: &Daemon, args: &[&str]) -> Trace {
        let mut child = Command::new(uvdpa_bin())
            .arg("--ctl")
            .arg(d.dir.join("uvdpa.ctl"))
            .args(["dev", "capture", "t0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let t = Trace { child, stderr: rx };
        let first = t.line(Duration::from_secs(10));
        assert!(first.contains("tracing requests of t0"), "{first}");
        t
    }

    fn line(&self, timeout: Duration) -> String {
        self.stderr
            .recv_timeout(timeout)
            .expect("a line from the capture CLI")
    }

    /// Waits (bounded) for the CLI to exit; returns its stdout and its summary line.
    fn finish(mut self, timeout: Duration) -> (Vec<Value>, String) {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "capture CLI did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let summary = self.line(Duration::from_secs(5));
        assert!(self.child.wait().unwrap().success(), "{summary}");
        let lines = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        (lines, summary)
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn captures(d: &Daemon) -> usize {
    d.cli_json(&["res", "show", "capture"])["entries"]
        .as_array()
        .map_or(0, Vec::len)
}

/// (queue, type, sector, len, status) of a trace line.
fn key(v: &Value) -> (u64, String, u64, u64, String) {
    (
        v["queue"].as_u64().unwrap(),
        v["type"].as_str().unwrap().into(),
        v["sector"].as_u64().unwrap(),
        v["len"].as_u64().unwrap(),
        v["status"].as_str().unwrap().into(),
    )
}

fn k(q: u64, ty: &str, sector: u64, len: u64, st: &str) -> (u64, String, u64, u64, String) {
    (q, ty.into(), sector, len, st.into())
}

fn daemon(tag: &str) -> Daemon {
    Daemon::start(
        tag,
        &blk_config("t0", "backend = \"ram\"\nsize = \"16M\"\nqueues = 2"),
        &["t0"],
    )
}

#[test]
fn the_trace_holds_exactly_the_requests_made() {
    let d = daemon("trace");
    let mut c = BlkClient::connect(&d.sock_str("t0"), 2, 64 << 10).unwrap();
    let cap = c.capacity;
    let t = Trace::start(&d, &["count", "8", "-w", "-"]);
    assert_eq!(captures(&d), 1, "listed in res show while it runs");

    let w = |offset, len| Op::Write {
        offset,
        buf_off: 0,
        len,
    };
    let seq0 = [
        w(8 * 512, 4096),
        w(100 * 512, 8192),
        Op::Read {
            offset: 8 * 512,
            buf_off: 0,
            len: 4096,
        },
        Op::Flush,
        Op::Discard {
            offset: MIB,
            len: 64 << 10,
        },
        Op::WriteZeroes {
            offset: 2 * MIB,
            len: 8192,
        },
    ];
    for op in seq0 {
        assert_eq!(c.run(0, &[op]), [0], "{op:?}");
    }
    // A read past the end fails with IOERR.
    let past = Op::Read {
        offset: cap,
        buf_off: 0,
        len: 4096,
    };
    assert_ne!(c.run(0, &[past]), [0], "a read past the end fails");
    assert_eq!(c.run(1, &[w(3 * 512, 512)]), [0]);

    let (lines, summary) = t.finish(Duration::from_secs(10));
    assert!(
        summary.contains("8 requests traced, 0 dropped"),
        "{summary}"
    );
    let got: Vec<_> = lines.iter().map(key).collect();
    assert_eq!(
        got,
        [
            k(0, "OUT", 8, 4096, "OK"),
            k(0, "OUT", 100, 8192, "OK"),
            k(0, "IN", 8, 4096, "OK"),
            k(0, "FLUSH", 0, 0, "OK"),
            k(0, "DISCARD", MIB / 512, 64 << 10, "OK"),
            k(0, "WRITE_ZEROES", 2 * MIB / 512, 8192, "OK"),
            k(0, "IN", cap / 512, 4096, "IOERR"),
            k(1, "OUT", 3, 512, "OK"),
        ]
    );
    for l in &lines {
        let lat = l["latency_us"].as_f64().unwrap();
        assert!(lat > 0.0 && lat < 10e6, "latency {lat} µs: {l}");
        let time = l["time"].as_str().unwrap();
        assert!(
            time.len() == 30 && time.ends_with('Z') && time.starts_with("20"),
            "{time}"
        );
    }
    // Gone from res show once the CLI exited.
    let deadline = Instant::now() + Duration::from_secs(5);
    while captures(&d) != 0 {
        assert!(Instant::now() < deadline, "capture still listed");
        std::thread::sleep(Duration::from_millis(50));
    }

    // One queue: only its requests, numbered as the device numbers them.
    let t = Trace::start(&d, &["qidx", "1", "count", "2", "-w", "-"]);
    assert_eq!(c.run(0, &[w(16 * 512, 4096)]), [0]);
    assert_eq!(c.run(1, &[w(24 * 512, 1024)]), [0]);
    assert_eq!(c.run(0, &[w(32 * 512, 4096)]), [0]);
    assert_eq!(c.run(1, &[Op::Flush]), [0]);
    let (lines, _) = t.finish(Duration::from_secs(10));
    let got: Vec<_> = lines.iter().map(key).collect();
    assert_eq!(
        got,
        [k(1, "OUT", 24, 1024, "OK"), k(1, "FLUSH", 0, 0, "OK")]
    );

    // Refusals: a queue the device does not have; a second trace of the device.
    let (ok, _, err) = d.cli(&["dev", "capture", "t0", "qidx", "2", "-w", "-"]);
    assert!(!ok && err.contains("queue"), "{err}");
    let t = Trace::start(&d, &["-w", "-"]);
    let (ok, _, err) = d.cli(&["dev", "capture", "t0", "-w", "-"]);
    assert!(!ok && err.contains("already attached"), "{err}");
    drop(t);
}

#[test]
fn a_killed_trace_leaves_no_residue() {
    let d = daemon("tracekill");
    let before = d.cli_json(&["res", "show"])["counts"].clone();
    let mut c = BlkClient::connect(&d.sock_str("t0"), 1, 64 << 10).unwrap();
    let file = d.dir.join("trace.jsonl");
    let mut t = Trace::start(&d, &["-w", file.to_str().unwrap()]);
    // Requests under way while it is killed.
    let ops: Vec<Op> = (0..16)
        .map(|i| Op::Write {
            offset: i * 4096,
            buf_off: (i as usize % 16) * 4096,
            len: 4096,
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&file).map_or(0, |m| m.len()) < 4096 {
        assert!(Instant::now() < deadline, "nothing traced");
        assert!(c.run(0, &ops).iter().all(|&r| r == 0));
    }
    t.child.kill().unwrap(); // SIGKILL
    t.child.wait().unwrap();
    for _ in 0..20 {
        assert!(c.run(0, &ops).iter().all(|&r| r == 0), "I/O goes on");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while captures(&d) != 0 {
        assert!(
            Instant::now() < deadline,
            "capture still listed after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every line written before the kill is a whole record.
    let text = std::fs::read_to_string(&file).unwrap();
    for l in text.lines().take(text.lines().count().saturating_sub(1)) {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["type"], "OUT");
    }
    // The device takes a new trace.
    let t = Trace::start(&d, &["count", "1", "-w", "-"]);
    assert_eq!(c.run(0, &[Op::Flush]), [0]);
    let (lines, _) = t.finish(Duration::from_secs(10));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["type"], "FLUSH");
    drop(c);
    // With the frontend gone too, the counts are those of before.
    d.wait_res_counts(&before, Duration::from_secs(5));
}

/// The io_uring file backend completes requests out of line (its own completion path):
/// a batch of 8 writes at QD 8 and a flush are traced, each once, with its sector.
#[test]
fn io_uring_requests_are_traced_when_they_complete() {
    let dir = disk_dir("trace-uring");
    let img = dir.join("t0.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let d = Daemon::start(
        "trace-uring",
        &blk_config(
            "t0",
            &format!(
                "backend = \"file\"\npath = \"{}\"\naio = \"io_uring\"",
                img.display()
            ),
        ),
        &["t0"],
    );
    assert_eq!(
        d.cli_json(&["dev", "show", "t0"])["dev"][0]["aio"],
        "io_uring"
    );
    let mut c = BlkClient::connect(&d.sock_str("t0"), 1, 64 << 10).unwrap();
    let t = Trace::start(&d, &["count", "9", "-w", "-"]);
    let ops: Vec<Op> = (0..8u64)
        .map(|i| Op::Write {
            offset: i * 8192,
            buf_off: i as usize * 4096,
            len: 4096,
        })
        .collect();
    assert!(c.run(0, &ops).iter().all(|&r| r == 0));
    assert_eq!(c.run(0, &[Op::Flush]), [0]);
    let (lines, summary) = t.finish(Duration::from_secs(10));
    assert!(summary.contains("9 requests traced"), "{summary}");
    let mut got: Vec<_> = lines.iter().map(key).collect();
    // The writes complete in any order; the flush comes after them.
    assert_eq!(got.pop(), Some(k(0, "FLUSH", 0, 0, "OK")));
    got.sort();
    let want: Vec<_> = (0..8u64).map(|i| k(0, "OUT", i * 16, 4096, "OK")).collect();
    assert_eq!(got, want);
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An `nbd` device with two queues on one connection: one worker answers both queues (NBD
/// replies), and each record names the queue its request came on.
#[test]
fn nbd_requests_are_traced_with_their_queue() {
    let dir = unique_dir("trace-nbd");
    let sock = dir.join("mem.nbd");
    let mut nbdkit = Command::new("nbdkit")
        .args(["--foreground", "--unix"])
        .arg(&sock)
        .args(["memory", "16M"])
        .stderr(Stdio::null())
        .spawn()
        .expect("run nbdkit (Debian package nbdkit: scripts/install-deps.sh)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let d = Daemon::start_in(
        dir.clone(),
        &blk_config(
            "t0",
            &format!(
                "backend = \"nbd\"\nuri = \"nbd+unix:///?socket={}\"\nqueues = 2\nconnections = 1",
                sock.display()
            ),
        ),
        &["t0"],
    );
    let mut c = BlkClient::connect(&d.sock_str("t0"), 2, 64 << 10).unwrap();
    let t = Trace::start(&d, &["count", "4", "-w", "-"]);
    let w = |sector: u64| Op::Write {
        offset: sector * 512,
        buf_off: 0,
        len: 4096,
    };
    assert_eq!(c.run(0, &[w(40)]), [0]);
    assert_eq!(c.run(1, &[w(80)]), [0]);
    assert_eq!(c.run(1, &[Op::Flush]), [0]);
    let read = Op::Read {
        offset: 40 * 512,
        buf_off: 0,
        len: 4096,
    };
    assert_eq!(c.run(0, &[read]), [0]);
    let (lines, _) = t.finish(Duration::from_secs(10));
    let got: Vec<_> = lines.iter().map(key).collect();
    assert_eq!(
        got,
        [
            k(0, "OUT", 40, 4096, "OK"),
            k(1, "OUT", 80, 4096, "OK"),
            k(1, "FLUSH", 0, 0, "OK"),
            k(0, "IN", 40, 4096, "OK"),
        ]
    );
    drop(c);
    drop(d);
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
}
