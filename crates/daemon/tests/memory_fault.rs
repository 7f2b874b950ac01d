//! A frontend that shrinks its guest memory under the daemon (issue 12, part 1).
//!
//! Device `victim`'s frontend hands over an unsealed memfd, runs I/O, then truncates the
//! memfd to 0 with requests queued and kicks: the daemon's next access to that memory
//! raises SIGBUS. The daemon must survive (the fault is contained in `victim`'s mapping),
//! say which region was unsealed and which faulted, fail `victim` (error eventfd,
//! DEVICE_NEEDS_RESET, the session ended) and serve the next frontend; device `good`, in the same daemon, completes verified I/O
//! before, during and after. A SIGBUS sent to the daemon by a process still kills it.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::vu::*;
use common::*;
use serde_json::Value;
use vhost::VhostBackend;

const MEM: u64 = 4 << 20;
const RING: u64 = 0x1000;
const QSIZE: u16 = 64;
const HDR: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;

fn config() -> String {
    format!(
        "{}{}",
        blk_config("victim", "backend = \"ram\"\nsize = \"8M\"\nqueues = 1"),
        blk_config("good", "backend = \"ram\"\nsize = \"8M\"\nqueues = 1")
    )
}

/// Device `good`'s frontend: stamped write + read-verify rounds until stopped.
struct Bystander {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Bystander {
    fn start(d: &Daemon) -> Self {
        let sock = d.sock("good");
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let mut g = VuGuest::connect(&sock, 1, MEM, 0).expect("connect to `good`");
            let mut r = g.ring(0, RING, QSIZE).expect("vring of `good`");
            let mut round = 0u64;
            while !s.load(Ordering::Relaxed) {
                let data = pattern(round, 4096);
                r.write_read_verify(
                    &format!("`good` round {round}"),
                    round % 64 * 8,
                    &data,
                    DATA,
                    HDR,
                );
                round += 1;
                n.store(round, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(r);
            drop(g);
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

    /// Waits (bounded) for two more verified rounds than `since`.
    fn assert_progress(&self, since: u64, what: &str) {
        let t0 = Instant::now();
        while self.rounds() < since + 2 {
            assert!(
                !self.thread.is_finished(),
                "`good`'s I/O thread died {what}"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "`good` completed no verified I/O for 30 s {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

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

/// Polls the daemon log (bounded) for a line holding every one of `parts`.
fn wait_log_line(d: &Daemon, parts: &[&str], what: &str) -> String {
    let t0 = Instant::now();
    loop {
        let log = d.log_text();
        if let Some(l) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return l.to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: no log line with {parts:?}; log:\n{}",
            d.log_excerpt(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_truncated_memfd_fails_only_its_device() {
    let mut d = Daemon::start("memfault", &config(), &["victim", "good"]);
    let good = Bystander::start(&d);
    good.assert_progress(0, "before the victim connected");

    // The hostile frontend: an unsealed memfd (memfd_create without ALLOW_SEALING).
    let mut g = VuGuest::connect(&d.sock("victim"), 1, MEM, 0).expect("connect to `victim`");
    let mut r = g.ring(0, RING, QSIZE).expect("vring of `victim`");
    let unsealed = wait_log_line(
        &d,
        &["victim", "not sealed", "fd=\"memfd\"", "size=0x400000"],
        "SET_MEM_TABLE with an unsealed memfd",
    );
    r.write_read_verify("`victim` before the fault", 0, &pattern(7, 4096), DATA, HDR);
    let before = good.rounds();

    // Mid-I/O: a batch of writes is made available and kicked, the memfd shrinks to 0
    // while the device works on it, and the driver kicks again.
    for i in 0..16u64 {
        r.blk_request(
            T_OUT,
            i * 8,
            Some((DATA + i * 4096, 4096, false)),
            HDR + 0x1000 + i * 0x100,
        );
    }
    r.dq.publish();
    r.kick();
    rustix::fs::ftruncate(g.memfd(), 0).expect("truncate the guest memfd");
    r.kick();

    // What the frontend sees: the queue's error eventfd, then its session ends (the
    // faulted table is unmapped; a frontend must come back with a new one).
    assert!(
        wait_event(&r.err, Duration::from_secs(10)),
        "`victim`'s error eventfd did not fire after its memory shrank; log:\n{}",
        d.log_excerpt(40)
    );
    let fault = wait_log_line(
        &d,
        &[
            "victim",
            "Guest memory fault contained",
            "gpa=0x0",
            "size=0x400000",
        ],
        "the contained SIGBUS",
    );
    wait_log_line(
        &d,
        &["victim", "Ending the session: its guest memory faulted"],
        "the session of the faulted memory",
    );
    let t0 = Instant::now();
    loop {
        let (state, _) = dev_state(&d, "victim");
        if state == "ready" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "`victim` is {state:?}, not \"ready\" (session ended), after its memory faulted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        g.fe.get_features().is_err(),
        "the hostile frontend's session is still answered after its memory faulted"
    );
    assert!(d.alive(), "the daemon died of the SIGBUS");
    good.assert_progress(before, "after `victim`'s memory faulted");
    let (state, _) = dev_state(&d, "good");
    assert_eq!(state, "live", "`good` was hit by `victim`'s fault");

    // The hostile frontend goes; a new one gets verified I/O through `victim`.
    drop(r);
    drop(g);
    let mut g = VuGuest::connect(&d.sock("victim"), 1, MEM, 0).expect("reconnect to `victim`");
    let mut r = g
        .ring(0, RING, QSIZE)
        .expect("vring of `victim` after the fault");
    for i in 0..8u64 {
        r.write_read_verify(
            "`victim` after the fault",
            i * 8,
            &pattern(100 + i, 4096),
            DATA,
            HDR,
        );
    }
    assert!(
        !wait_event(&r.err, Duration::ZERO),
        "the new session's error eventfd fired on well-formed requests"
    );
    let (state, status) = dev_state(&d, "victim");
    assert_eq!(state, "live", "`victim` after reconnect: {status:?}");
    drop(r);
    drop(g);

    let since = good.rounds();
    good.assert_progress(since, "after `victim` recovered");
    let rounds = good.finish();
    assert!(d.alive(), "the daemon died");
    eprintln!("unsealed: {unsealed}\nfault: {fault}\n`good` verified rounds: {rounds}");

    // A SIGBUS that is no fault in guest memory (here: sent by a process) keeps its
    // default action: the handler does not swallow it.
    d.signal(rustix::process::Signal::BUS);
    let st = d
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon ignored a SIGBUS sent to it");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        st.signal(),
        Some(rustix::process::Signal::BUS.as_raw()),
        "the daemon did not die of the SIGBUS sent to it: {st:?}"
    );
}
