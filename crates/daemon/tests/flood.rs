//! Per-device resource limits (issue 12): a frontend that floods its device cannot starve
//! another device of the same daemon, and the limits hold.
//!
//! - `memory_tables_past_max_memory_are_refused`: SET_MEM_TABLE and ADD_MEM_REG are
//!   counted against `max_memory` (each region's `mmap_offset + size`) before anything is
//!   mapped; a QEMU-shaped 2 TiB table fits the 4 TiB default; past it, a failure reply
//!   (or the session ends without REPLY_ACK) and a log line naming the device, the total
//!   and the limit; absurd ring sizes are refused.
//! - `floods_leave_a_bystander_serving`: a bystander device does libblkio QD1 4 KiB
//!   write/read-verify throughout while a hostile frontend floods another device with
//!   connect churn, memory-table churn (1 TiB tables), kicks (empty ring, then a broken
//!   one), ring breaks with reconnects (a NEEDS_RESET storm), and absurd ring sizes. Each
//!   flood: the bystander keeps verifying, the flooding device accepts at most the
//!   accept budget of sessions, and the flooding device's log lines stay within the per
//!   kind limit with a `suppressed=` count. The bystander's p50/p99 latency in each phase
//!   and the ratio to the quiet p99 are printed (`FLOOD` lines, read by `benches/flood.sh`),
//!   never asserted: timing on a shared machine is measured in benches, not tested.
//!
//! `UVDPA_FLOOD_SECS` sets each phase's length (default 3 s).

mod common;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::*;
use common::vu::*;
use common::*;

const TIB: u64 = 1 << 40;
const GIB: u64 = 1 << 30;

/// The accept budget of a device's socket (`uvdpa_vhost_user::server`).
const ACCEPT_BURST: u64 = 20;
const ACCEPT_PER_SEC: u64 = 20;
/// Lines per second and kind a device logs about its frontends
/// (`uvdpa_virtio::loglimit::DEVICE_LOG_LINES_PER_SEC`), and the kinds.
const LOG_LINES_PER_SEC: u64 = 20;
const LOG_KINDS: u64 = 3;

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Whether the daemon log line is about device `dev` (tracing prints `device=NAME` or
/// `device="NAME"`) at INFO or above.
fn is_device_line(line: &str, dev: &str) -> bool {
    (line.contains(&format!("device={dev} ")) || line.contains(&format!("device=\"{dev}\"")))
        || line.ends_with(&format!("device={dev}"))
}

/// The largest `suppressed=N` on the lines about `dev`.
fn max_suppressed(lines: &[&str]) -> u64 {
    lines
        .iter()
        .filter_map(|l| {
            let i = l.find("suppressed=")?;
            l[i + "suppressed=".len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// utime + stime (clock ticks) of the threads of `pid` whose name starts with `prefix`
/// (a device's session and queue worker threads are named after it).
fn device_cpu_ticks(pid: u32, prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let (open, close) = (stat.find('(')?, stat.rfind(')')?);
            if !stat[open + 1..close].starts_with(prefix) {
                return None;
            }
            let f: Vec<&str> = stat[close + 2..].split(' ').collect();
            // After the name: state is field 3, utime 14 and stime 15 (proc(5)).
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).unwrap_or(100)
}

#[test]
fn memory_tables_past_max_memory_are_refused() {
    let cfg = format!(
        "{}{}",
        blk_config("big", "backend = \"ram\"\nsize = \"1M\""),
        blk_config(
            "small",
            "backend = \"ram\"\nsize = \"1M\"\nmax_memory = \"64M\""
        )
    );
    let mut d = Daemon::start_in_env(
        unique_dir("maxmem"),
        &cfg,
        &["big", "small"],
        &[("UVDPA_LOG", "info")],
    );
    // `dev show` reports each device's limit, the default and the configured one.
    for (dev, limit) in [("big", 4 * TIB), ("small", 64 << 20)] {
        let shown = &d.cli_json(&["dev", "show", dev])["dev"][0];
        assert_eq!(shown["max_memory"], limit, "dev show {dev}: {shown}");
    }
    let (ok, text, _) = d.cli(&["dev", "show", "small"]);
    assert!(
        ok && text.contains("max_memory") && text.contains("67108864"),
        "{text}"
    );

    // A QEMU-shaped 2 TiB guest on one memfd: low RAM below the VGA hole, RAM up to the
    // PCI hole, the rest above 4 GiB, each region mapped from offset 0 of the fd (about
    // 2 TiB + 3 GiB of address space): the 4 TiB default takes it.
    let guest = 2 * TIB;
    let fd = memfd(guest);
    let ua = 0x1000_0000_0000u64;
    let qemu = mem_table(&[
        region_at(0, 0xa_0000, ua, 0),
        region_at(0xc_0000, 3 * GIB - 0xc_0000, ua + 0xc_0000, 0xc_0000),
        region_at(4 * GIB, guest - 3 * GIB, ua + 4 * GIB, 3 * GIB),
    ]);
    let (mut r, _) = Raw::negotiate(&d.sock_str("big"), CONFIGURE_MEM_SLOTS);
    let fds = [fd.as_fd(), fd.as_fd(), fd.as_fd()];
    r.send(SET_MEM_TABLE, NEED_REPLY, &qemu, &fds);
    assert_eq!(r.u64_answer(), Some(0), "a 2 TiB QEMU guest refused");

    // One byte-page past 4 TiB: refused, before mapping, and the session goes on.
    let huge = memfd(4 * TIB + 4096);
    r.send(
        SET_MEM_TABLE,
        NEED_REPLY,
        &mem_table(&[region(0, 4 * TIB + 4096, ua)]),
        &[huge.as_fd()],
    );
    assert_ne!(r.u64_answer(), Some(0), "a 4 TiB + 4 KiB table accepted");
    // ADD_MEM_REG counts the table it joins: 3 TiB, then 1.5 TiB more is refused, 1 TiB
    // more (4 TiB in all) is taken.
    let reset = mem_table(&[region(0, 3 * TIB, ua)]);
    r.send(SET_MEM_TABLE, NEED_REPLY, &reset, &[huge.as_fd()]);
    assert_eq!(r.u64_answer(), Some(0), "a 3 TiB table refused");
    let add = |gpa: u64, size: u64| single_region(region(gpa, size, ua + gpa));
    r.send(
        ADD_MEM_REG,
        NEED_REPLY,
        &add(4 * TIB, TIB + TIB / 2),
        &[huge.as_fd()],
    );
    assert_ne!(r.u64_answer(), Some(0), "ADD_MEM_REG past 4 TiB accepted");
    r.send(ADD_MEM_REG, NEED_REPLY, &add(4 * TIB, TIB), &[huge.as_fd()]);
    assert_eq!(r.u64_answer(), Some(0), "ADD_MEM_REG up to 4 TiB refused");
    // Absurd ring sizes are refused; the session still answers.
    for num in [0u32, 100, 32769, 65536, 1 << 31, u32::MAX] {
        r.send(SET_VRING_NUM, NEED_REPLY, &u32s(&[0, num]), &[]);
        assert_ne!(r.u64_answer(), Some(0), "SET_VRING_NUM {num} accepted");
    }
    r.send(SET_VRING_NUM, NEED_REPLY, &u32s(&[0, 32768]), &[]);
    assert_eq!(r.u64_answer(), Some(0), "SET_VRING_NUM 32768 refused");
    drop(r);

    // A 64 MiB device: 64 MiB fits; 64 MiB + 4 KiB does not, and neither does a 32 MiB
    // region 48 MiB into its fd (it maps 80 MiB).
    let m = memfd(128 << 20);
    let (mut r, _) = Raw::negotiate(&d.sock_str("small"), 0);
    for (what, body, ok) in [
        ("64 MiB", mem_table(&[region(0, 64 << 20, ua)]), true),
        (
            "64 MiB + 4 KiB",
            mem_table(&[
                region(0, 32 << 20, ua),
                region(32 << 20, (32 << 20) + 4096, ua + GIB),
            ]),
            false,
        ),
        (
            "32 MiB at offset 48 MiB",
            mem_table(&[region_at(0, 32 << 20, ua, 48 << 20)]),
            false,
        ),
    ] {
        let regions = usize::from(body[0]);
        let fds: Vec<_> = (0..regions).map(|_| m.as_fd()).collect();
        r.send(SET_MEM_TABLE, NEED_REPLY, &body, &fds);
        assert_eq!(r.u64_answer() == Some(0), ok, "{what}");
    }
    drop(r);
    // Without REPLY_ACK a refused table ends the session.
    let mut r = Raw::connect(&d.sock_str("small"));
    r.send(
        SET_MEM_TABLE,
        0,
        &mem_table(&[region(0, 128 << 20, ua)]),
        &[m.as_fd()],
    );
    r.send(GET_FEATURES, 0, &[], &[]);
    assert!(
        matches!(r.answer(), Answer::Closed),
        "a table past max_memory without REPLY_ACK did not end the session"
    );
    drop(r);

    assert!(d.alive());
    let log = d.log_text();
    let want = format!(
        "maps {} bytes, more than the device's max_memory of {} bytes",
        4 * TIB + 4096,
        4 * TIB
    );
    let line = log
        .lines()
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("no log line with {want:?}:\n{log}"));
    assert!(
        is_device_line(line, "big"),
        "the line names no device: {line}"
    );
    let small = log
        .lines()
        .find(|l| l.contains("Ending session") && l.contains("max_memory of 67108864 bytes"))
        .unwrap_or_else(|| panic!("no session-ending line for `small`:\n{log}"));
    assert!(is_device_line(small, "small"), "{small}");
    assert!(d.stop().success());
}

/// One phase of the flood test: what the hostile frontend does to device `fl` meanwhile.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Quiet,
    ConnectChurn,
    MemTableChurn,
    KickFlood,
    RingBreakStorm,
    AbsurdRingSizes,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Quiet => "quiet",
            Phase::ConnectChurn => "connect-churn",
            Phase::MemTableChurn => "mem-table-churn",
            Phase::KickFlood => "kick-flood",
            Phase::RingBreakStorm => "ring-break-storm",
            Phase::AbsurdRingSizes => "absurd-ring-sizes",
        }
    }
}

const PHASES: [Phase; 6] = [
    Phase::Quiet,
    Phase::ConnectChurn,
    Phase::MemTableChurn,
    Phase::KickFlood,
    Phase::RingBreakStorm,
    Phase::AbsurdRingSizes,
];

/// Marks the bystander's samples: `WARMUP` before the first phase, `DONE` to stop.
const WARMUP: usize = usize::MAX - 1;
const DONE: usize = usize::MAX;

/// libblkio QD1 4 KiB: write a fresh pattern, read it back, compare; every request's
/// latency in µs goes to the phase that was current when it started. Returns the samples
/// of each phase and the number of verified round trips.
fn bystander(
    path: String,
    phase: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<(Vec<Vec<f64>>, u64)> {
    std::thread::spawn(move || {
        let mut c = BlkClient::connect(&path, 1, 4096).expect("bystander connect");
        let mut lat = vec![Vec::new(); PHASES.len()];
        let mut verified = 0u64;
        loop {
            let p = phase.load(Ordering::Acquire);
            if p == DONE {
                break;
            }
            let (tw, tr) = c.verify_round("bystander", 0, (verified % 1024) * 4096, 1, verified);
            verified += 1;
            if let Some(v) = lat.get_mut(p) {
                v.push(tw.as_secs_f64() * 1e6);
                v.push(tr.as_secs_f64() * 1e6);
            }
        }
        (lat, verified)
    })
}

/// What a flood did.
#[derive(Default, Debug)]
struct FloodCount {
    /// Cycles of the flood's loop (connects, tables, kicks, ring breaks).
    cycles: u64,
    /// Rings the device failed (their error eventfd fired).
    failed_rings: u64,
    /// Connections that failed (the listen backlog was full).
    refused: u64,
}

/// Runs `kind` against the socket `sock` until `stop`; `phase` is how long that will be.
fn flood(
    kind: Phase,
    sock: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    phase: Duration,
) -> FloodCount {
    let path = sock.to_str().unwrap().to_string();
    let mut n = FloodCount::default();
    let ua = 0x1000_0000_0000u64;
    match kind {
        Phase::Quiet => {}
        Phase::ConnectChurn => {
            while !stop.load(Ordering::Relaxed) {
                match std::os::unix::net::UnixStream::connect(&path) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let mut r = Raw { s };
                        r.send(GET_FEATURES, 0, &[], &[]);
                        let _ = r.answer();
                    }
                    Err(e) => {
                        if n.refused == 0 {
                            println!("connect churn: connect failed: {e}");
                        }
                        n.refused += 1;
                    }
                }
                n.cycles += 1;
            }
        }
        Phase::MemTableChurn => {
            let fd = memfd(TIB);
            while !stop.load(Ordering::Relaxed) {
                let (mut r, _) = Raw::negotiate(&path, 0);
                r.send(
                    SET_MEM_TABLE,
                    NEED_REPLY,
                    &mem_table(&[region(0, TIB, ua)]),
                    &[fd.as_fd()],
                );
                assert_eq!(r.u64_answer(), Some(0), "a 1 TiB table refused");
                n.cycles += 1;
            }
        }
        Phase::KickFlood => {
            let mut g = VuGuest::connect(&sock, 1, 1 << 20, 0).expect("kick flood: connect");
            let ring = g.ring(0, 0x1000, 256).expect("kick flood: ring");
            let t0 = Instant::now();
            let mut broken = false;
            while !stop.load(Ordering::Relaxed) {
                // First half: an empty ring kicked without end; then an avail index
                // that jumps past the ring size, and more kicks into the failed ring.
                if !broken && t0.elapsed() > phase / 2 {
                    g.mem
                        .write(ring.dq.avail + 2, &300u16.to_le_bytes())
                        .unwrap();
                    broken = true;
                }
                for _ in 0..64 {
                    ring.kick();
                }
                n.cycles += 64;
            }
            n.failed_rings += u64::from(wait_event(&ring.err, Duration::from_secs(5)));
            assert!(broken, "the kick flood ended before it broke its ring");
        }
        Phase::RingBreakStorm => {
            while !stop.load(Ordering::Relaxed) {
                let mut g = VuGuest::connect(&sock, 1, 1 << 20, 0).expect("ring breaker: connect");
                let ring = g.ring(0, 0x1000, 64).expect("ring breaker: ring");
                g.mem
                    .write(ring.dq.avail + 2, &65u16.to_le_bytes())
                    .unwrap();
                ring.kick();
                n.failed_rings += u64::from(wait_event(&ring.err, Duration::from_secs(10)));
                n.cycles += 1;
            }
        }
        Phase::AbsurdRingSizes => {
            while !stop.load(Ordering::Relaxed) {
                let (mut r, _) = Raw::negotiate(&path, 0);
                for num in [0u32, 65536, 1 << 31, 100, 32769] {
                    r.send(SET_VRING_NUM, NEED_REPLY, &u32s(&[0, num]), &[]);
                    assert_ne!(r.u64_answer(), Some(0), "SET_VRING_NUM {num} accepted");
                }
                n.cycles += 1;
            }
        }
    }
    n
}

#[test]
fn floods_leave_a_bystander_serving() {
    let secs: f64 = std::env::var("UVDPA_FLOOD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let phase_len = Duration::from_secs_f64(secs);
    let cfg = format!(
        "metrics = \"127.0.0.1:0\"\n{}{}",
        blk_config("by", "backend = \"ram\"\nsize = \"64M\""),
        blk_config("fl", "backend = \"ram\"\nsize = \"8M\"")
    );
    // INFO: what users run; the log-line bounds are about it.
    let mut d = Daemon::start_in_env(
        unique_dir("flood"),
        &cfg,
        &["by", "fl"],
        &[("UVDPA_LOG", "info")],
    );
    let phase = Arc::new(AtomicUsize::new(WARMUP));
    let by = bystander(d.sock_str("by"), phase.clone());
    std::thread::sleep(Duration::from_millis(500));

    let mut report = Vec::new();
    for (i, &kind) in PHASES.iter().enumerate() {
        // The flood device's log so far, to count what this phase adds.
        let lines_before = d.log_text().lines().count();
        let connects_before = d.session_connects("fl");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, sock) = (stop.clone(), d.sock("fl"));
        let flooder = std::thread::spawn(move || flood(kind, sock, s, phase_len));
        let t0 = Instant::now();
        phase.store(i, Ordering::Release);
        // CPU time of the flooded device's threads over the phase (those alive at its end;
        // a kick flood has one session throughout).
        std::thread::sleep(Duration::from_millis(200));
        let cpu0 = device_cpu_ticks(d.pid(), "fl-");
        let tc = Instant::now();
        std::thread::sleep(phase_len.saturating_sub(Duration::from_millis(200)));
        let cpu = device_cpu_ticks(d.pid(), "fl-").saturating_sub(cpu0) as f64
            / clock_ticks() as f64
            / tc.elapsed().as_secs_f64();
        phase.store(WARMUP, Ordering::Release);
        stop.store(true, Ordering::Relaxed);
        let count = flooder.join().expect("flooder failed");
        let elapsed = t0.elapsed().as_secs_f64();
        // Let the last session end before counting.
        std::thread::sleep(Duration::from_millis(300));
        let connects = d.session_connects("fl") - connects_before;
        let log = d.log_text();
        let lines: Vec<&str> = log
            .lines()
            .skip(lines_before)
            .filter(|l| is_device_line(l, "fl"))
            .collect();
        let suppressed = max_suppressed(&lines);
        println!(
            "phase {}: {:?}, {connects} sessions, {} log lines about fl (max suppressed={suppressed}) in {elapsed:.1} s, fl threads {:.0}% of a CPU",
            kind.name(),
            count,
            lines.len(),
            cpu * 100.0
        );
        assert!(d.alive(), "{}: the daemon died", kind.name());
        // At most the accept budget of sessions: a burst, then ACCEPT_PER_SEC.
        let budget = ACCEPT_BURST + (ACCEPT_PER_SEC as f64 * (elapsed + 1.0)).ceil() as u64;
        assert!(
            connects <= budget,
            "{}: {connects} sessions in {elapsed:.1} s, more than the accept budget {budget}",
            kind.name()
        );
        // Bounded log: every kind of line at most LOG_LINES_PER_SEC a second.
        let bound = LOG_KINDS * LOG_LINES_PER_SEC * (elapsed + 2.0).ceil() as u64;
        assert!(
            lines.len() as u64 <= bound,
            "{}: {} log lines about fl in {elapsed:.1} s (bound {bound}):\n{}",
            kind.name(),
            lines.len(),
            lines.join("\n")
        );
        match kind {
            Phase::Quiet => assert_eq!(connects, 0),
            Phase::ConnectChurn | Phase::MemTableChurn | Phase::RingBreakStorm => {
                assert!(
                    count.cycles >= 10,
                    "{}: only {} cycles, not a flood",
                    kind.name(),
                    count.cycles
                );
                // Each session would log two lines (connected, disconnected): when that
                // is more than the limit let through, some were dropped and counted (a
                // slow machine that churns less need not reach the limit).
                let windows = elapsed.ceil() as u64 + 1;
                if 2 * connects > LOG_LINES_PER_SEC * windows {
                    assert!(
                        suppressed > 0,
                        "{}: {connects} sessions and no `suppressed=` count in the log:\n{}",
                        kind.name(),
                        lines.join("\n")
                    );
                }
            }
            Phase::KickFlood => {
                assert_eq!(count.failed_rings, 1, "the broken ring did not fail");
                assert_eq!(connects, 1);
            }
            Phase::AbsurdRingSizes => {}
        }
        if kind == Phase::RingBreakStorm {
            assert_eq!(
                count.failed_rings, count.cycles,
                "a broken ring did not fail its device"
            );
            let failed = lines
                .iter()
                .filter(|l| l.contains("Virtqueue failed"))
                .count();
            assert!(failed >= 1, "no ring failure logged");
        }
        report.push((kind, elapsed));
    }
    phase.store(DONE, Ordering::Release);
    let (lat, verified) = by.join().expect("bystander failed");
    assert!(d.alive());
    // The flooded device still serves a well-behaved frontend.
    let mut c = BlkClient::connect(&d.sock_str("fl"), 1, 4096).expect("fl after the floods");
    c.buf().fill(0x5a);
    assert_eq!(
        c.run(
            0,
            &[Op::Write {
                offset: 0,
                buf_off: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    drop(c);

    let quiet_p99 = percentile(&lat[0], 99.0);
    println!("FLOOD phase secs={secs} verified_round_trips={verified}");
    for (i, (kind, elapsed)) in report.iter().enumerate() {
        let v = &lat[i];
        assert!(
            !v.is_empty(),
            "{}: the bystander completed no I/O during the flood",
            kind.name()
        );
        let p99 = percentile(v, 99.0);
        println!(
            "FLOOD {:<18} ops={:<7} secs={elapsed:.1} p50_us={:.1} p99_us={:.1} p99_ratio={:.2}",
            kind.name(),
            v.len(),
            percentile(v, 50.0),
            p99,
            p99 / quiet_p99
        );
    }
    assert!(d.stop().success());
}
