//! Live upgrade under a real Linux guest (QEMU TCG, `tests/guest/`): while the guest
//! writes and verifies in a loop on a file-backed device, the host replaces the daemon
//! every ~1.5 s with `uvdpa daemon --takeover`. QEMU runs WITHOUT `reconnect`: a
//! disconnect would leave the guest's disk dead, so the guest passing with no I/O error
//! shows the frontend never noticed.

mod common;

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use common::*;

/// Takeovers to aim for, and the fewest that count as a run.
const AIM: usize = 20;
const AT_LEAST: usize = 10;
/// Time between the end of one takeover and the start of the next.
const INTERVAL: Duration = Duration::from_millis(1500);
/// A round takes 1.5-7 s under TCG: this long without one is a stalled disk.
const STALL: Duration = Duration::from_secs(60);
/// The guest's loop keeps its disk busy (the longest gap without a request is a round's
/// compare): this long after a takeover without a new request is a stalled queue.
const IO_STALL: Duration = Duration::from_secs(30);

/// `run-guest.sh` in its own process group (so QEMU under it can be killed with it).
struct Guest(Option<Child>);

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if let Some(pg) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
            }
            let _ = c.wait();
        }
    }
}

fn result_line(console: &str) -> String {
    console
        .lines()
        .find(|l| l.contains("UVDPA-GUEST-RESULT:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The number after `key=` in `line`.
fn field(line: &str, key: &str) -> Option<u32> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
}

/// QEMU lines that would betray a vhost-user disconnect or reconnect.
fn disconnect_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            [
                "vhost",
                "disconnect",
                "reconnect",
                "msg header",
                "connection",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect()
}

/// Boots the guest in loop mode on a file-backed device and takes the daemon over every
/// [`INTERVAL`] once round 1 passed, up to [`AIM`] times; checks the guest passed with no
/// I/O error, a round completed after the last takeover, QEMU said nothing about the
/// vhost-user connection, the device saw one connect, and each old daemon exited 0.
fn upgrades_under_guest_loop(packed: bool) {
    build_initramfs();
    let tag = if packed { "gupp" } else { "gup" };
    let dir = unique_dir(tag);
    let img = dir.join("up.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cfg = format!(
        "metrics = \"127.0.0.1:0\"\n{}",
        blk_config(
            "gu",
            &format!("backend = \"file\"\npath = \"{}\"", img.display())
        )
    );
    let mut d = Daemon::start_in(dir.clone(), &cfg, &["gu"]);
    let (reader, writer) = std::io::pipe().unwrap();
    let mut guest = Guest(Some(
        Command::new("bash")
            .arg(guest_dir().join("run-guest.sh"))
            .args(["--vhost-user-blk", &d.sock_str("gu")])
            .args(["--mode", "loop", "--secs", "60", "--count", "8"])
            .args(["--bs", "65536", "--timeout", "300"])
            .args(packed.then_some("--packed"))
            .stdin(Stdio::null())
            .stdout(writer.try_clone().unwrap())
            .stderr(writer)
            .process_group(0)
            .spawn()
            .expect("run run-guest.sh"),
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(reader)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });

    let mut console = String::new();
    let mut round = 0u32;
    let mut next: Option<Instant> = None;
    let mut takeovers: Vec<TakeoverLine> = Vec::new();
    // The last round seen completed when the last takeover was done.
    let mut round_at_last = 0u32;
    let mut finished = false;
    let mut last_round_at = Instant::now();
    // After a takeover: the request count it left and when it was done; cleared once the
    // new daemon served a request (the next takeover waits for that).
    let mut awaiting_io: Option<(u64, Instant)> = None;
    let mut io_resumed: Vec<Duration> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(330);
    loop {
        assert!(
            Instant::now() < deadline,
            "the guest ran past its timeout:\n{console}"
        );
        let wait = next
            .map_or(Duration::from_secs(1), |t| {
                t.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_millis(200));
        match rx.recv_timeout(wait) {
            Ok(l) => {
                if let Some(r) = l
                    .split("round ")
                    .nth(1)
                    .and_then(|r| r.strip_suffix(" ok"))
                    .and_then(|r| r.parse().ok())
                {
                    round = r;
                    last_round_at = Instant::now();
                    if next.is_none() {
                        next = Some(Instant::now());
                    }
                }
                finished |= l.contains("UVDPA-GUEST-RESULT:");
                console.push_str(&l);
                console.push('\n');
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if next.is_some() && !finished && last_round_at.elapsed() > STALL {
            panic!(
                "the guest's disk stalled: no round for {STALL:?} (last: round {round}, \
                 {} takeovers done)\n--- serving daemon (pid {}) log, debug lines but \
                 `vring started` left out:\n{}\n--- console:\n{console}",
                takeovers.len(),
                d.pid(),
                d.log_excerpt(40)
            );
        }
        if let Some((before, at)) = awaiting_io.filter(|_| !finished) {
            let now = d.vstat("gu", 0, "requests");
            assert!(
                now >= before,
                "vstats requests went backwards across takeover {}: {before} -> {now}",
                takeovers.len()
            );
            if now > before {
                io_resumed.push(at.elapsed());
                awaiting_io = None;
            } else if at.elapsed() > IO_STALL {
                panic!(
                    "no request served within {IO_STALL:?} of takeover {} (requests stay at \
                     {before}; last round {round})\n--- serving daemon (pid {}) log, debug \
                     lines but `vring started` left out:\n{}\n--- console:\n{console}",
                    takeovers.len(),
                    d.pid(),
                    d.log_excerpt(40)
                );
            }
        }
        if packed && takeovers.is_empty() && next.is_some() {
            let negotiated = d.cli_json(&["dev", "show", "gu"]).to_string();
            assert!(
                negotiated.contains("RING_PACKED"),
                "the guest did not negotiate packed rings: {negotiated}"
            );
        }
        if finished
            || takeovers.len() >= AIM
            || awaiting_io.is_some()
            || next.is_none_or(|t| Instant::now() < t)
        {
            continue;
        }
        let old_pid = d.pid();
        let before = d.vstat("gu", 0, "requests");
        let (new, line) = d.takeover(&[]).unwrap_or_else(|e| {
            panic!(
                "takeover {} failed: {e}\n--- old daemon log tail:\n{}\n--- console:\n{console}",
                takeovers.len() + 1,
                tail(&d.log_text(), 60)
            )
        });
        assert_eq!(line.from_pid, old_pid, "{}", line.line);
        assert_eq!(line.devices, 1, "{}", line.line);
        let st = d.wait_exit(Duration::from_secs(20));
        assert!(
            st.is_some_and(|s| s.success()),
            "old daemon {old_pid} after handing over: exit {st:?}; log tail:\n{}",
            tail(&d.log_text(), 60)
        );
        d = new;
        takeovers.push(line);
        round_at_last = round;
        // The counters carry over; what the new daemon serves adds to them.
        let after = d.vstat("gu", 0, "requests");
        assert!(
            after >= before,
            "vstats requests went backwards across takeover {}: {before} -> {after}",
            takeovers.len()
        );
        awaiting_io = Some((after, Instant::now()));
        next = Some(Instant::now() + INTERVAL);
    }
    let status = guest.0.take().unwrap().wait().unwrap();
    let line = result_line(&console);
    eprintln!(
        "{} ({}): {}",
        pause_summary(&takeovers),
        if packed { "packed" } else { "split" },
        line
    );
    if let Some(info) = console.lines().find(|l| l.contains("UVDPA-GUEST-INFO:")) {
        eprintln!("{info}");
    }
    let ms: Vec<f64> = io_resumed.iter().map(|t| t.as_secs_f64() * 1e3).collect();
    eprintln!(
        "first request served after a takeover (polled every 200 ms): p50 {:.0} ms, max {:.0} ms",
        percentile(&ms, 50.0),
        percentile(&ms, 100.0)
    );
    assert!(
        status.success() && line.contains("PASS") && line.contains("ioerrors=0"),
        "guest result: {line:?} (run-guest.sh {status})\n{console}\ndaemon log tail:\n{}",
        tail(&d.log_text(), 60)
    );
    assert!(
        takeovers.len() >= AT_LEAST,
        "only {} takeovers while the guest looped (want {AT_LEAST}): {line}",
        takeovers.len()
    );
    let rounds = field(&line, "rounds").unwrap_or(0);
    assert!(
        rounds > round_at_last,
        "no round completed after the last takeover (round {round_at_last} was the last \
         seen then): {line}"
    );
    let bad = disconnect_lines(&console);
    assert!(
        bad.is_empty(),
        "QEMU reported on the vhost-user connection:\n{}",
        bad.join("\n")
    );
    assert_eq!(
        d.session_connects("gu"),
        1,
        "the frontend connected more than once"
    );
    let st = d.stop();
    assert!(st.success(), "daemon did not stop cleanly: {st:?}");
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

#[test]
fn guest_loop_survives_repeated_takeovers_split_ring() {
    upgrades_under_guest_loop(false);
}

#[test]
fn guest_loop_survives_repeated_takeovers_packed_ring() {
    upgrades_under_guest_loop(true);
}
