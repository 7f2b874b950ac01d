//! A hostile virtio driver: rust-vmm's vhost-user frontend drives device `victim` with
//! malformed rings (descriptor loops, indices and buffers out of range, length overflows,
//! bad indirect tables, avail index jumps, rings outside memory, readable after writable).
//! Each must fail only the victim's queue — its error eventfd fires, `dev show` says
//! `needs-reset`, no used entry claims the bad chain — while device `good` in the same
//! daemon keeps completing verified I/O, and the victim serves the next frontend again.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::vu::*;
use common::*;
use serde_json::Value;
use uvdpa_virtio::split::testing::DriverQueue;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// Guest memory of the ordinary cases.
const MEM: u64 = 4 << 20;
/// Guest memory of the total-length-overflow case: a sparse memfd big enough for two
/// in-bounds 3 GiB buffers.
const BIG_MEM: u64 = 4 << 30;
/// Ring layout: descriptor table at RING, queue size QSIZE.
const RING: u64 = 0x1000;
const QSIZE: u16 = 64;
/// Request headers (status byte at +0x80), indirect tables, data buffers.
const HDR: u64 = 0x20_0000;
const IND: u64 = 0x10_0000;
const DATA: u64 = 0x30_0000;

const WAIT: Duration = Duration::from_secs(10);

fn config() -> String {
    format!(
        "{}{}",
        blk_config("victim", "backend = \"ram\"\nsize = \"8M\"\nqueues = 1"),
        blk_config("good", "backend = \"ram\"\nsize = \"8M\"")
    )
}

/// Device `good`'s libblkio client: write + read-verify rounds until stopped.
struct Bystander {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Bystander {
    fn start(path: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let mut c = BlkClient::connect(&path, 1, 16 * 4096).expect("connect to `good`");
            let mut round = 0u64;
            while !s.load(Ordering::Relaxed) {
                c.verify_round("`good`", 0, (round % 64) * 65536, 16, round);
                round += 1;
                n.store(round, Ordering::Relaxed);
                // Continuous, but leaves the (shared, 2-core) machine some room.
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self {
            stop,
            rounds,
            thread,
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits (bounded; fails only on a hang) until two more verified rounds than `since`
    /// have completed.
    fn assert_progress(&self, since: u64, what: &str) {
        let t0 = Instant::now();
        while self.rounds() < since + 2 {
            assert!(
                !self.thread.is_finished(),
                "`good`'s I/O thread died during {what}"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "`good` completed no verified I/O for 30 s during {what} (rounds stuck at {})",
                self.rounds()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the client; every round verified (the thread did not panic).
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("`good`'s I/O failed verification (see its panic above)");
        self.rounds.load(Ordering::Relaxed)
    }
}

fn dev_state(d: &Daemon, name: &str) -> (String, Vec<String>) {
    let v = d.cli_json(&["dev", "show", name]);
    let dev = &v["dev"][0];
    let status = dev["status"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    (
        dev["state"].as_str().unwrap_or_default().to_string(),
        status,
    )
}

fn queue_errors(d: &Daemon) -> u64 {
    d.cli_json(&["dev", "vstats", "show", "victim", "qidx", "0"])["vstats"]["errors"]
        .as_u64()
        .expect("vstats errors counter")
}

/// Polls `dev show victim` (bounded) until it reports `needs-reset` with the
/// DEVICE_NEEDS_RESET status bit.
fn assert_needs_reset(d: &Daemon, what: &str) {
    let t0 = Instant::now();
    loop {
        let (state, status) = dev_state(d, "victim");
        if state == "needs-reset" && status.iter().any(|s| s == "DEVICE_NEEDS_RESET") {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: the queue failed (error eventfd fired) but `uvdpa dev show victim` \
             still reports state {state:?}, status {status:?} after 5 s \
             (expected \"needs-reset\" with DEVICE_NEEDS_RESET)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh frontend gets well-formed I/O through the victim, which is no longer flagged.
fn assert_victim_recovers(d: &Daemon, what: &str, seed: u64) {
    let mut g = VuGuest::connect(&d.sock("victim"), 1, MEM, 0)
        .unwrap_or_else(|e| panic!("after {what}: a new frontend cannot set up `victim`: {e}"));
    let mut r = g
        .ring(0, RING, QSIZE)
        .unwrap_or_else(|e| panic!("after {what}: vring setup on `victim` refused: {e}"));
    let data = pattern(seed, 4096);
    r.write_read_verify(
        &format!("`victim` after {what}"),
        seed % 64 * 8,
        &data,
        DATA,
        HDR,
    );
    assert!(
        !wait_event(&r.err, Duration::ZERO),
        "after {what}: the new session's error eventfd fired on well-formed requests"
    );
    let (state, status) = dev_state(d, "victim");
    assert_eq!(
        state, "live",
        "after {what}: a new frontend's `victim` is not live (status {status:?})"
    );
    assert!(
        !status.iter().any(|s| s == "DEVICE_NEEDS_RESET"),
        "after {what}: the new session inherited DEVICE_NEEDS_RESET"
    );
    drop(r);
    drop(g);
}

/// Writes a virtio-blk header of type `t` at `hdr` and presets its status byte (at
/// `hdr + 0x80`) to 0xff; returns the status byte's address.
fn header(dq: &DriverQueue, hdr: u64, t: u32) -> u64 {
    let mut h = t.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    dq.mem.write(hdr, &h).unwrap();
    dq.mem.write(hdr + 0x80, &[0xff]).unwrap();
    hdr + 0x80
}

fn desc(dq: &DriverQueue, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    dq.write_desc(dq.desc, i, addr, len, flags, next);
}

/// Writes entry `i` of an indirect table at `table`.
fn idesc(dq: &DriverQueue, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    dq.write_desc(table, i, addr, len, flags, next);
}

/// A hostile layout: writes its descriptors starting at descriptor `first`, makes them
/// available (publishing avail->idx itself) and returns the status bytes the device must
/// leave untouched.
type Build = fn(&mut DriverQueue, u64, u16) -> Vec<u64>;

/// An IN request header → `data` (writable) → status, with `data` replaced by the
/// caller's (addr, len) and the chain published.
fn in_chain(dq: &mut DriverQueue, first: u16, data: (u64, u32)) -> Vec<u64> {
    let st = header(dq, HDR, T_IN);
    desc(dq, first, HDR, 16, NEXT, first + 1);
    desc(dq, first + 1, data.0, data.1, WRITE | NEXT, first + 2);
    desc(dq, first + 2, st, 1, WRITE, 0);
    dq.push_avail(first);
    dq.publish();
    vec![st]
}

/// One hostile layout: its name, the reason the daemon must log for it, the guest memory
/// size it needs, and how to lay it out.
struct Case {
    what: &'static str,
    reason: &'static str,
    mem: u64,
    build: Build,
}

fn case(what: &'static str, reason: &'static str, mem: u64, build: Build) -> Case {
    Case {
        what,
        reason,
        mem,
        build,
    }
}

fn cases() -> Vec<Case> {
    vec![
        case("descriptor loop", "(a loop)", MEM, |dq, _, f| {
            // header → data → status → data → ...: every step on its own is valid.
            let st = header(dq, HDR, T_IN);
            desc(dq, f, HDR, 16, NEXT, f + 1);
            desc(dq, f + 1, DATA, 512, WRITE | NEXT, f + 2);
            desc(dq, f + 2, st, 1, WRITE | NEXT, f + 1);
            dq.push_avail(f);
            dq.publish();
            vec![st]
        }),
        case(
            "next index out of range",
            "Descriptor index 69 is outside its table of 64",
            MEM,
            |dq, _, f| {
                let st = header(dq, HDR, T_IN);
                desc(dq, f, HDR, 16, NEXT, QSIZE + 5);
                desc(dq, f + 1, st, 1, WRITE, 0);
                dq.push_avail(f);
                dq.publish();
                vec![st]
            },
        ),
        case(
            "head index out of range",
            "Descriptor index 71 is outside its table of 64",
            MEM,
            |dq, _, f| {
                let st = header(dq, HDR, T_IN);
                desc(dq, f, HDR, 16, NEXT, f + 1);
                desc(dq, f + 1, st, 1, WRITE, 0);
                dq.push_avail(QSIZE + 7);
                dq.publish();
                vec![st]
            },
        ),
        case(
            "buffer outside guest memory",
            "0x401000+0x200 is outside guest memory",
            MEM,
            |dq, mem, f| in_chain(dq, f, (mem + 0x1000, 512)),
        ),
        case(
            "buffer straddling the end of guest memory",
            "0x3fff00+0x200 is outside guest memory",
            MEM,
            |dq, mem, f| in_chain(dq, f, (mem - 256, 512)),
        ),
        case(
            "addr + len overflow",
            "0xfffffffffffffffb+0x10 is outside guest memory",
            MEM,
            |dq, _, f| in_chain(dq, f, (u64::MAX - 4, 16)),
        ),
        case(
            "total length overflow",
            "total length overflows 32 bits",
            BIG_MEM,
            |dq, _, f| {
                // Two writable 3 GiB buffers, each inside the 4 GiB of memory, 6 GiB
                // together.
                let st = header(dq, HDR, T_IN);
                desc(dq, f, HDR, 16, NEXT, f + 1);
                desc(dq, f + 1, 0x40_0000, 0xC000_0000, WRITE | NEXT, f + 2);
                desc(dq, f + 2, 0x40_0000, 0xC000_0000, WRITE | NEXT, f + 3);
                desc(dq, f + 3, st, 1, WRITE, 0);
                dq.push_avail(f);
                dq.publish();
                vec![st]
            },
        ),
        case(
            "nested indirect table",
            "Indirect descriptor inside an indirect table",
            MEM,
            |dq, _, f| {
                let st = header(dq, HDR, T_IN);
                idesc(dq, IND, 0, HDR, 16, NEXT, 1);
                idesc(dq, IND, 1, IND + 0x1000, 32, INDIRECT, 0);
                idesc(dq, IND + 0x1000, 0, st, 1, WRITE, 0);
                desc(dq, f, IND, 32, INDIRECT, 0);
                dq.push_avail(f);
                dq.publish();
                vec![st]
            },
        ),
        case(
            "indirect table length not a multiple of 16",
            "Indirect table length 24 is invalid",
            MEM,
            |dq, _, f| {
                let st = header(dq, HDR, T_IN);
                idesc(dq, IND, 0, HDR, 16, NEXT, 1);
                idesc(dq, IND, 1, st, 1, WRITE, 0);
                desc(dq, f, IND, 24, INDIRECT, 0);
                dq.push_avail(f);
                dq.publish();
                vec![st]
            },
        ),
        case(
            "indirect table of length 0",
            "Indirect table length 0 is invalid",
            MEM,
            |dq, _, f| {
                desc(dq, f, IND, 0, INDIRECT, 0);
                dq.push_avail(f);
                dq.publish();
                vec![]
            },
        ),
        case(
            "indirect table with more entries than 1024 (and the queue)",
            "Indirect table length 16400 is invalid (multiple of 16, 1..=1024 entries)",
            MEM,
            |dq, _, f| {
                let st = header(dq, HDR, T_IN);
                idesc(dq, IND, 0, HDR, 16, NEXT, 1);
                idesc(dq, IND, 1, st, 1, WRITE, 0);
                desc(dq, f, IND, 16 * 1025, INDIRECT, 0);
                dq.push_avail(f);
                dq.publish();
                vec![st]
            },
        ),
        case(
            "indirect table outside guest memory",
            "0x401000+0x20 is outside guest memory",
            MEM,
            |dq, mem, f| {
                desc(dq, f, mem + 0x1000, 32, INDIRECT, 0);
                dq.push_avail(f);
                dq.publish();
                vec![]
            },
        ),
        case(
            "indirect descriptor with NEXT",
            "Descriptor sets both INDIRECT and NEXT",
            MEM,
            |dq, _, f| {
                let st = header(dq, HDR, T_IN);
                idesc(dq, IND, 0, HDR, 16, NEXT, 1);
                idesc(dq, IND, 1, st, 1, WRITE, 0);
                desc(dq, f, IND, 32, INDIRECT | NEXT, f + 1);
                desc(dq, f + 1, DATA, 16, WRITE, 0);
                dq.push_avail(f);
                dq.publish();
                vec![st]
            },
        ),
        case(
            "avail index jumping past the queue size",
            "avail index jumped from 0 to 65, more than queue size 64",
            MEM,
            |dq, _, f| {
                let st = header(dq, HDR, T_IN);
                desc(dq, f, HDR, 16, NEXT, f + 1);
                desc(dq, f + 1, st, 1, WRITE, 0);
                for _ in 0..=QSIZE {
                    dq.push_avail(f);
                }
                dq.publish();
                vec![st]
            },
        ),
        case(
            "readable descriptor after a writable one",
            "Device-readable descriptor after a device-writable one",
            MEM,
            |dq, _, f| {
                let st = header(dq, HDR, T_IN);
                desc(dq, f, HDR, 16, NEXT, f + 1);
                desc(dq, f + 1, DATA, 512, WRITE | NEXT, f + 2);
                desc(dq, f + 2, DATA + 0x1000, 512, NEXT, f + 3);
                desc(dq, f + 3, st, 1, WRITE, 0);
                dq.push_avail(f);
                dq.publish();
                vec![st]
            },
        ),
    ]
}

/// One hostile layout on a fresh frontend; panics with what went wrong.
fn attack(d: &mut Daemon, c: &Case) {
    let Case {
        what,
        reason,
        mem,
        build,
    } = *c;
    let errors_before = queue_errors(d);
    let log_start = d.log_text().len();
    let mut g = VuGuest::connect(&d.sock("victim"), 1, mem, F_INDIRECT_DESC)
        .unwrap_or_else(|e| panic!("{what}: frontend setup failed: {e}"));
    let mut r = g
        .ring(0, RING, QSIZE)
        .unwrap_or_else(|e| panic!("{what}: vring setup failed: {e}"));
    let untouched = build(&mut r.dq, mem, 0);
    r.kick();
    assert!(
        wait_event(&r.err, WAIT),
        "{what}: the victim's vring error eventfd did not fire within {WAIT:?}"
    );
    assert_eq!(
        r.dq.pop_used(),
        None,
        "{what}: the device published a used entry for the bad chain"
    );
    assert_failure_logged(d, log_start, what, reason);
    for st in untouched {
        assert_eq!(
            r.byte(st),
            0xff,
            "{what}: the device wrote the bad chain's status byte"
        );
    }
    assert!(d.alive(), "{what}: the daemon died; log:\n{}", d.log_text());
    assert_eq!(
        queue_errors(d),
        errors_before + 1,
        "{what}: vstats `errors` of victim queue 0 did not count the failure"
    );
    if std::env::var_os("EXPERIMENT").is_some() {
        println!("EXP {what}: before request: {:?}", dev_state(d, "victim"));
        g.fe.get_features().unwrap();
        println!("EXP {what}: after request: {:?}", dev_state(d, "victim"));
    }
    assert_needs_reset(d, what);
    // The failed queue stays failed: a well-formed request is not served any more.
    let (_, st) = r.blk_request(T_IN, 0, Some((DATA, 512, true)), HDR + 0x400);
    r.dq.publish();
    r.kick();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        r.dq.pop_used(),
        None,
        "{what}: the failed queue went on serving requests"
    );
    assert_eq!(r.byte(st), 0xff, "{what}: the failed queue went on serving");
    drop(r);
    drop(g);
}

/// Waits (bounded) for the daemon to log the queue failure with `reason`, after byte
/// `start` of its log: proves the layout was refused for the reason under test.
fn assert_failure_logged(d: &Daemon, start: usize, what: &str, reason: &str) {
    let t0 = Instant::now();
    loop {
        let log = d.log_text();
        let new = log.get(start..).unwrap_or_default();
        if new
            .lines()
            .any(|l| l.contains("Virtqueue failed") && l.contains(reason))
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: no \"Virtqueue failed\" log line with {reason:?}; new log lines:\n{new}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

#[test]
fn hostile_rings_fail_only_the_victim_queue_and_it_recovers() {
    let mut d = Daemon::start("mal", &config(), &["victim", "good"]);
    let good = Bystander::start(d.sock_str("good"));
    good.assert_progress(0, "start-up");
    let mut failures = Vec::new();
    for (n, c) in cases().iter().enumerate() {
        let what = c.what;
        let since = good.rounds();
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| attack(&mut d, c))) {
            failures.push(panic_text(p));
        }
        // Between cases: disconnect (done), then a new frontend is served correctly.
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| {
            assert_victim_recovers(&d, what, n as u64)
        })) {
            failures.push(format!("recovery after {what}: {}", panic_text(p)));
        }
        good.assert_progress(since, what);
    }
    let since = good.rounds();
    good.assert_progress(since, "the time after the attacks");
    let rounds = good.finish();
    println!("`good` completed {rounds} verified write+read rounds during the attacks");
    assert!(d.alive(), "daemon died; log:\n{}", d.log_text());
    assert!(
        failures.is_empty(),
        "{} of {} hostile layouts misbehaved:\n  {}\nlog (warnings):\n{}",
        failures.len(),
        cases().len(),
        failures.join("\n  "),
        warnings(&d)
    );
    assert!(d.stop().success(), "daemon did not exit cleanly");
}

fn warnings(d: &Daemon) -> String {
    d.log_text()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn well_formed_request_before_a_hostile_one_completes() {
    let mut d = Daemon::start("malbefore", &config(), &["victim", "good"]);
    let good = Bystander::start(d.sock_str("good"));
    let since = good.rounds();
    let mut g = VuGuest::connect(&d.sock("victim"), 1, MEM, 0).expect("frontend setup");
    let mut r = g.ring(0, RING, QSIZE).expect("vring setup");
    // Same batch: a 4 KiB write at sector 40 (descriptors 0..3), then a descriptor loop
    // (descriptors 10 → 11 → 12 → 11 ...), published together with one kick.
    let data = pattern(77, 4096);
    r.dq.mem.write(DATA, &data).unwrap();
    let (h_good, st_good) = r.blk_request(T_OUT, 40, Some((DATA, 4096, false)), HDR);
    let log_start = d.log_text().len();
    let st_bad = header(&r.dq, HDR + 0x200, T_IN);
    desc(&r.dq, 10, HDR + 0x200, 16, NEXT, 11);
    desc(&r.dq, 11, st_bad, 1, WRITE | NEXT, 12);
    desc(&r.dq, 12, DATA + 0x2000, 512, WRITE | NEXT, 11);
    r.dq.push_avail(10);
    r.dq.publish();
    r.kick();
    assert!(
        wait_event(&r.err, WAIT),
        "the hostile chain did not fail the queue (no error eventfd within {WAIT:?})"
    );
    assert_failure_logged(&d, log_start, "good request, then a loop", "(a loop)");
    let used = r.wait_used(Duration::from_secs(5));
    assert_eq!(
        r.byte(st_bad),
        0xff,
        "the hostile chain's status byte was written"
    );
    assert_eq!(
        used,
        Some((u32::from(h_good), 1)),
        "the well-formed request ahead of the hostile one in the same batch was not \
         completed (status byte {:#x}; used->idx never moved past it); log:\n{}",
        r.byte(st_good),
        warnings(&d)
    );
    assert_eq!(r.byte(st_good), 0, "well-formed write: VIRTIO_BLK_S_OK");
    assert_eq!(
        r.dq.pop_used(),
        None,
        "a used entry was published for the hostile chain"
    );
    assert_needs_reset(&d, "descriptor loop after a good request");
    drop(r);
    drop(g);
    // The write reached the disk: a new frontend reads it back.
    let mut g = VuGuest::connect(&d.sock("victim"), 1, MEM, 0).expect("frontend setup");
    let mut r = g.ring(0, RING, QSIZE).expect("vring setup");
    let (h, st) = r.blk_request(T_IN, 40, Some((DATA + 0x1000, 4096, true)), HDR);
    r.dq.publish();
    r.kick();
    assert_eq!(r.wait_used(WAIT), Some((u32::from(h), 4097)));
    assert_eq!(r.byte(st), 0);
    let mut back = vec![0u8; 4096];
    r.dq.mem.read(DATA + 0x1000, &mut back).unwrap();
    assert!(back == data, "the completed write did not reach the disk");
    drop(r);
    drop(g);
    good.assert_progress(since, "the mixed batch");
    good.finish();
    assert!(d.alive());
    assert!(d.stop().success());
}

/// A vring whose used ring (or another ring) lies outside the memory table cannot start:
/// `SplitQueue::new` fails inside `update_vring`, which runs for whichever request makes
/// the ring complete (here SET_VRING_ADDR, sent last). With REPLY_ACK the frontend gets a
/// failure reply and the session goes on; without an ack requested, the session ends.
#[test]
fn ring_outside_memory_is_refused_at_setup() {
    let mut d = Daemon::start("malring", &config(), &["victim", "good"]);
    let good = Bystander::start(d.sock_str("good"));
    let since = good.rounds();
    let sock = d.sock("victim");

    let mut g = VuGuest::connect(&sock, 1, MEM, 0).expect("frontend setup");
    let dq = DriverQueue::new(g.mem.clone(), RING, QSIZE);
    let new_fd = |f| EventFd::new(f).unwrap();
    let (call, kick, err) = (new_fd(EFD_NONBLOCK), new_fd(0), new_fd(EFD_NONBLOCK));
    g.fe.set_vring_num(0, QSIZE).unwrap();
    g.fe.set_vring_base(0, 0).unwrap();
    g.fe.set_vring_call(0, &call).unwrap();
    g.fe.set_vring_err(0, &err).unwrap();
    g.fe.set_vring_kick(0, &kick).unwrap();
    g.fe.set_vring_enable(0, true).unwrap();
    let addr = |desc: u64, avail: u64, used: u64| VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: desc,
        avail_ring_addr: avail,
        used_ring_addr: used,
        log_addr: None,
    };
    let (d_ok, a_ok, u_ok) = (UADDR + dq.desc, UADDR + dq.avail, UADDR + dq.used);
    let bad = [
        (
            "used ring past the region",
            addr(d_ok, a_ok, UADDR + MEM + 0x1000),
        ),
        (
            "used ring straddling the region's end",
            addr(d_ok, a_ok, UADDR + MEM - 8),
        ),
        (
            "used ring below the region",
            addr(d_ok, a_ok, UADDR - 0x1000),
        ),
        ("avail ring past the region", addr(d_ok, UADDR + MEM, u_ok)),
        (
            "descriptor table past the region",
            addr(UADDR + MEM, a_ok, u_ok),
        ),
    ];
    for (what, cfg) in &bad {
        assert!(
            g.fe.set_vring_addr(0, cfg).is_err(),
            "{what}: SET_VRING_ADDR (with NEED_REPLY) was acked although the ring cannot start"
        );
        // The session goes on: it answers the next request.
        g.fe.get_features()
            .unwrap_or_else(|e| panic!("{what}: session ended after the failure reply: {e}"));
        assert!(
            !wait_event(&err, Duration::ZERO),
            "{what}: a setup failure signalled the vring error eventfd"
        );
        let (state, status) = dev_state(&d, "victim");
        assert_eq!(
            state, "connected",
            "{what}: `dev show victim` should show a connected device without running \
             vrings (status {status:?})"
        );
    }
    assert!(d.alive());
    // The same session then starts the ring with valid addresses and serves I/O.
    g.fe.set_vring_addr(0, &addr(d_ok, a_ok, u_ok))
        .expect("valid SET_VRING_ADDR after refused ones");
    let mut r = VuRing {
        index: 0,
        dq,
        call,
        kick,
        err,
    };
    r.write_read_verify(
        "`victim` after refused ring addresses",
        8,
        &pattern(9, 4096),
        DATA,
        HDR,
    );
    assert_eq!(dev_state(&d, "victim").0, "live");
    drop(r);
    drop(g);

    // Without an ack requested, a request that fails ends the session.
    let mut g = VuGuest::connect(&sock, 1, MEM, 0).expect("frontend setup");
    g.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
    let dq = DriverQueue::new(g.mem.clone(), RING, QSIZE);
    let kick = new_fd(0);
    g.fe.set_vring_num(0, QSIZE).unwrap();
    g.fe.set_vring_kick(0, &kick).unwrap();
    g.fe.set_vring_enable(0, true).unwrap();
    let _ = g.fe.set_vring_addr(
        0,
        &addr(UADDR + dq.desc, UADDR + dq.avail, UADDR + MEM + 0x1000),
    );
    assert!(
        g.fe.get_features().is_err(),
        "a failed SET_VRING_ADDR without NEED_REPLY did not end the session"
    );
    drop(g);
    let t0 = Instant::now();
    while !d.log_text().contains("Ending session") {
        assert!(
            t0.elapsed() < WAIT,
            "no \"Ending session\" log line for the failed SET_VRING_ADDR"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_victim_recovers(&d, "a session ended by a bad ring address", 3);

    good.assert_progress(since, "the ring-address attacks");
    good.finish();
    assert!(d.alive());
    assert!(d.stop().success());
}
