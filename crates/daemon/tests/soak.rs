//! Soak: 1000 connect/disconnect cycles against one device, alternating libblkio and
//! rust-vmm's vhost-user frontend, with I/O along the way. Afterwards the daemon's open
//! fds, threads and resource-tracker counts are back at their baseline and its RSS has
//! not grown by more than a bound.

mod common;

use std::time::{Duration, Instant};

use common::vu::*;
use common::*;
use serde_json::Value;

const CYCLES: u64 = 1000;
/// Allowed RSS growth over the whole soak. What legitimately moves RSS: the ram disk
/// (8 MiB, transparent huge pages: I/O stays in its first 64 KiB, faulted in during the
/// warm-up), glibc malloc arenas and freed-but-cached thread stacks of the short-lived
/// session and worker threads (bounded by the number of threads alive at once, not by the
/// number of cycles), and the log writer's buffers. None of these scale with the cycle
/// count; a leak of 16 KiB per cycle (one page in each of four allocations) would exceed
/// this bound.
const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;
/// Guest memory of the rust-vmm frontend.
const VU_MEM: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    fds: usize,
    threads: usize,
    rss_kib: u64,
    counts: Value,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn snapshot(d: &Daemon) -> Snapshot {
    let counts = d.cli_json(&["res", "show"])["counts"].clone();
    let (fds, threads) = d.fds_and_threads();
    Snapshot {
        fds,
        threads,
        rss_kib: rss_kib(d.pid()),
        counts,
    }
}

/// Waits (bounded) until no frontend is connected to `s0`.
fn wait_disconnected(d: &Daemon, what: &str) {
    let t0 = Instant::now();
    loop {
        let v = d.cli_json(&["dev", "show", "s0"]);
        if v["dev"][0]["state"] == "ready" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: `s0` still has a frontend 10 s after it disconnected: {}",
            v["dev"][0]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// libblkio: connect (2 queues), one 4 KiB write + read-verify, disconnect.
fn blkio_cycle(d: &Daemon, i: u64) {
    let mut c = BlkClient::connect(&d.sock_str("s0"), 2, 2 * 4096)
        .unwrap_or_else(|e| panic!("cycle {i}: libblkio cannot connect: {e:?}"));
    let q = (i / 2 % 2) as usize;
    let offset = (i % 16) * 4096;
    let data = pattern(i, 4096);
    c.buf()[..4096].copy_from_slice(&data);
    let res = c.run(
        q,
        &[Op::Write {
            offset,
            buf_off: 0,
            len: 4096,
        }],
    );
    assert_eq!(res, vec![0], "cycle {i}: libblkio write on queue {q}");
    let res = c.run(
        q,
        &[Op::Read {
            offset,
            buf_off: 4096,
            len: 4096,
        }],
    );
    assert_eq!(res, vec![0], "cycle {i}: libblkio read on queue {q}");
    assert!(
        c.buf()[4096..] == data[..],
        "cycle {i}: data read back differs"
    );
}

/// rust-vmm frontend: connect, memory table, both vrings started; with `io`, one 4 KiB
/// write + read-verify; disconnect.
fn vu_cycle(d: &Daemon, i: u64, io: bool) {
    let mut g = VuGuest::connect(&d.sock("s0"), 2, VU_MEM, 0)
        .unwrap_or_else(|e| panic!("cycle {i}: rust-vmm frontend setup failed: {e}"));
    let mut rings = [
        g.ring(0, 0x1000, 64)
            .unwrap_or_else(|e| panic!("cycle {i}: vring 0 setup failed: {e}")),
        g.ring(1, 0x4000, 64)
            .unwrap_or_else(|e| panic!("cycle {i}: vring 1 setup failed: {e}")),
    ];
    if io {
        let q = (i / 10 % 2) as usize;
        rings[q].write_read_verify(
            &format!("cycle {i}, rust-vmm queue {q}"),
            (i % 16) * 8,
            &pattern(i, 4096),
            0x8_0000,
            0x7_0000,
        );
    }
}

fn cycle(d: &Daemon, i: u64) {
    if i.is_multiple_of(2) {
        blkio_cycle(d, i);
    } else {
        vu_cycle(d, i, i % 10 == 1);
    }
}

#[test]
fn thousand_connect_disconnect_cycles_return_to_baseline() {
    let mut d = Daemon::start(
        "soak",
        &format!(
            "metrics = \"127.0.0.1:0\"\n{}",
            blk_config("s0", "backend = \"ram\"\nsize = \"8M\"\nqueues = 2")
        ),
        &["s0"],
    );
    // Warm-up: one cycle of each frontend kind.
    blkio_cycle(&d, 0);
    vu_cycle(&d, 1, true);
    wait_disconnected(&d, "warm-up");
    let base = snapshot(&d);

    let t0 = Instant::now();
    for i in 0..CYCLES {
        cycle(&d, i);
        if i % 100 == 99 {
            assert!(
                d.alive(),
                "daemon died at cycle {i}; log:\n{}",
                d.log_text()
            );
        }
    }
    let loop_time = t0.elapsed();

    // Settle (bounded): the last session ends, its threads exit, entries are released.
    wait_disconnected(&d, "after the soak");
    let t1 = Instant::now();
    let mut after = snapshot(&d);
    while (after.fds, after.threads, &after.counts) != (base.fds, base.threads, &base.counts)
        && t1.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
        after = snapshot(&d);
    }

    println!(
        "soak: {CYCLES} cycles in {:.1} s ({:.1} ms/cycle; libblkio every other cycle with \
         4 KiB write+verify, rust-vmm with 2 vrings, I/O every 10th cycle)",
        loop_time.as_secs_f64(),
        loop_time.as_secs_f64() * 1000.0 / CYCLES as f64
    );
    println!("{:<12} {:>12} {:>12}", "", "baseline", "after");
    println!("{:<12} {:>12} {:>12}", "fds", base.fds, after.fds);
    println!(
        "{:<12} {:>12} {:>12}",
        "threads", base.threads, after.threads
    );
    println!(
        "{:<12} {:>12} {:>12}",
        "rss KiB", base.rss_kib, after.rss_kib
    );
    if let (Some(b), Some(a)) = (base.counts.as_object(), after.counts.as_object()) {
        for (k, v) in b {
            println!(
                "{:<12} {:>12} {:>12}",
                format!("res {k}"),
                v.to_string(),
                a.get(k).map(Value::to_string).unwrap_or_default()
            );
        }
    }

    assert!(d.alive(), "daemon died; log:\n{}", d.log_text());
    assert_eq!(
        after.fds, base.fds,
        "open fds of the daemon did not return to baseline ({} -> {})",
        base.fds, after.fds
    );
    assert_eq!(
        after.threads, base.threads,
        "threads of the daemon did not return to baseline ({} -> {})",
        base.threads, after.threads
    );
    assert_eq!(
        after.counts, base.counts,
        "`uvdpa res show` counts did not return to baseline"
    );
    let growth = after.rss_kib.saturating_sub(base.rss_kib);
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "daemon RSS grew by {growth} KiB over {CYCLES} cycles ({} -> {} KiB), limit \
         {RSS_GROWTH_LIMIT_KIB} KiB",
        base.rss_kib,
        after.rss_kib
    );
    let log = d.log_text();
    assert!(
        !log.contains("Refusing a second frontend"),
        "a cycle's frontend was refused as a second frontend"
    );
    assert_eq!(
        d.metric("uvdpa_session_refused_total{device=\"s0\"}"),
        0,
        "frontends refused (the log lines about it are rate-limited)"
    );
    // Every cycle really was a session of its own (plus the two warm-up ones): counted by
    // the daemon (its log lines about sessions are rate-limited)...
    let sessions = d.session_connects("s0");
    assert_eq!(sessions, CYCLES + 2, "sessions seen by the daemon");
    // ...and every request of the loop was served: libblkio 2 per cycle on even cycles,
    // rust-vmm 2 on every 10th cycle, the warm-up 2 + 2.
    let served: u64 = (0..2)
        .map(|q| {
            d.cli_json(&["dev", "vstats", "show", "s0", "qidx", &q.to_string()])["vstats"]
                ["requests"]
                .as_u64()
                .unwrap()
        })
        .sum();
    let expected = 2 * (CYCLES / 2) + 2 * (CYCLES / 10) + 4;
    assert_eq!(served, expected, "requests completed by `s0` (both queues)");
    assert!(d.stop().success(), "daemon did not exit cleanly");
}
