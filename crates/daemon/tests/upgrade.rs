//! Live upgrade with libblkio frontends: `uvdpa daemon --takeover` replaces the running
//! daemon (its devices, connected frontends, memory, rings and counters) while clients
//! write and verify at queue depth > 1, without a frontend ever reconnecting.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
/// Block size of the stamped blocks.
const BS: usize = 4096;
/// Blocks each client writes and verifies, spread over its disk.
const NBLK: usize = 256;
/// Writes per batch (queue depth of a write batch).
const WQD: usize = 8;
/// Reads per batch: the blocks just written and as many written earlier.
const RQD: usize = 2 * WQD;
/// Bound on one batch: a request that takes longer is a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Magic of a stamped block's header.
const MAGIC: u64 = 0x7576_6470_6155_5047;

/// The content of block `blk` at generation `gen` of client `id`: a 32-byte header (magic,
/// client, block, generation) and a pattern derived from all three.
fn stamped(id: u64, blk: usize, gen: u64) -> Vec<u8> {
    let mut b = pattern(
        (id << 48) ^ ((blk as u64) << 24) ^ gen.wrapping_mul(0x9E37_79B9),
        BS,
    );
    for (i, w) in [MAGIC, id, blk as u64, gen].iter().enumerate() {
        b[i * 8..][..8].copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// What a stamped block's header says (magic, client, block, generation), for messages.
fn header(b: &[u8]) -> [u64; 4] {
    let w = |i: usize| u64::from_le_bytes(b[i * 8..][..8].try_into().unwrap());
    [w(0), w(1), w(2), w(3)]
}

/// What a client thread did.
#[derive(Debug, Default)]
struct Report {
    /// Requests completed (whatever their status).
    requests: u64,
    /// Blocks read back and compared.
    verified: u64,
    /// Requests that completed with an error, or batches that timed out.
    io_errors: u64,
    /// Blocks that read back differently from what was last written there.
    mismatches: u64,
    /// The first few problems, for the assertion message.
    problems: Vec<String>,
    /// Longest batch: every request of a batch is submitted at once, so this is the
    /// longest single request's latency (submission to completion).
    max_latency: Duration,
}

impl Report {
    fn problem(&mut self, p: String) {
        if self.problems.len() < 10 {
            self.problems.push(p);
        }
    }
}

/// A libblkio client in its own thread writing stamped blocks and reading them back.
struct Load {
    name: String,
    stop: Arc<AtomicBool>,
    /// Batches completed so far (progress).
    batches: Arc<AtomicU64>,
    handle: JoinHandle<Report>,
}

impl Load {
    /// Connects to `sock` (in the thread: a client is not `Send`) and loops until stopped:
    /// each batch writes `WQD` blocks with a new generation, then reads back those and
    /// `WQD` blocks written earlier, all at once, and compares each with its last write.
    /// The first pass writes every block, so every read has something to compare with.
    /// Returns once the client is connected and the first pass is done.
    fn start(id: u64, name: &str, sock: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let batches = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, b) = (stop.clone(), batches.clone());
        let handle = std::thread::spawn(move || {
            let mut c = BlkClient::connect(&sock, 1, (WQD + RQD) * BS)
                .unwrap_or_else(|e| panic!("libblkio connect to {sock}: {e}"));
            let stride = c.capacity / NBLK as u64 / BS as u64 * BS as u64;
            assert!(stride >= BS as u64, "disk too small");
            let off = |blk: usize| blk as u64 * stride;
            let mut gens: Vec<Option<u64>> = vec![None; NBLK];
            let mut r = Report::default();
            let run = |c: &mut BlkClient, ops: &[Op], r: &mut Report| {
                let t0 = Instant::now();
                let res = c.try_run(0, ops, IO_TIMEOUT);
                r.max_latency = r.max_latency.max(t0.elapsed());
                res
            };
            let mut gen = 0u64;
            let mut cursor = 0usize;
            let mut first_pass = true;
            loop {
                if !first_pass && s.load(Ordering::Relaxed) {
                    break;
                }
                gen += 1;
                let wblk: Vec<usize> = (0..WQD).map(|i| (cursor + i) % NBLK).collect();
                cursor = (cursor + WQD) % NBLK;
                for (slot, &blk) in wblk.iter().enumerate() {
                    c.buf()[slot * BS..][..BS].copy_from_slice(&stamped(id, blk, gen));
                }
                let ops: Vec<Op> = wblk
                    .iter()
                    .enumerate()
                    .map(|(slot, &blk)| Op::Write {
                        offset: off(blk),
                        buf_off: slot * BS,
                        len: BS,
                    })
                    .collect();
                let rets = match run(&mut c, &ops, &mut r) {
                    Ok(rets) => rets,
                    Err(e) => {
                        r.io_errors += 1;
                        r.problem(format!("write batch of gen {gen}: {e}"));
                        break;
                    }
                };
                r.requests += ops.len() as u64;
                for (&blk, &ret) in wblk.iter().zip(&rets) {
                    if ret == 0 {
                        gens[blk] = Some(gen);
                    } else {
                        // The block's content is unknown now: do not compare it again.
                        gens[blk] = None;
                        r.io_errors += 1;
                        r.problem(format!("write of block {blk} gen {gen}: ret {ret}"));
                    }
                }
                if first_pass {
                    if cursor == 0 {
                        first_pass = false;
                        let _ = ready_tx.send(());
                    }
                    continue;
                }
                // Read back the blocks just written and WQD written before (half a disk
                // pass ago), all at once.
                let older = (cursor + NBLK / 2) % NBLK;
                let rblk: Vec<usize> = wblk
                    .iter()
                    .copied()
                    .chain((0..WQD).map(|i| (older + i) % NBLK))
                    .collect();
                c.buf()[WQD * BS..].fill(0x5a);
                let ops: Vec<Op> = rblk
                    .iter()
                    .enumerate()
                    .map(|(slot, &blk)| Op::Read {
                        offset: off(blk),
                        buf_off: (WQD + slot) * BS,
                        len: BS,
                    })
                    .collect();
                let rets = match run(&mut c, &ops, &mut r) {
                    Ok(rets) => rets,
                    Err(e) => {
                        r.io_errors += 1;
                        r.problem(format!("read batch after gen {gen}: {e}"));
                        break;
                    }
                };
                r.requests += ops.len() as u64;
                for (slot, (&blk, &ret)) in rblk.iter().zip(&rets).enumerate() {
                    if ret != 0 {
                        r.io_errors += 1;
                        r.problem(format!("read of block {blk}: ret {ret}"));
                        continue;
                    }
                    let Some(g) = gens[blk] else { continue };
                    let got = &c.buf()[(WQD + slot) * BS..][..BS];
                    if got == stamped(id, blk, g).as_slice() {
                        r.verified += 1;
                    } else {
                        r.mismatches += 1;
                        let h = header(got);
                        r.problem(format!(
                            "block {blk}: expected gen {g}, read header \
                             [magic {:#x}, client {}, block {}, gen {}]",
                            h[0], h[1], h[2], h[3]
                        ));
                    }
                }
                b.fetch_add(1, Ordering::Relaxed);
            }
            r
        });
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let r = handle.join();
            panic!("client {name} did not complete its first pass: {r:?}");
        }
        Load {
            name: name.to_string(),
            stop,
            batches,
            handle,
        }
    }

    fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until the client has completed `n` more batches than `from`;
    /// returns how long that took, or `None` (and the count reached) on timeout.
    fn wait_progress(&self, from: u64, n: u64, timeout: Duration) -> Result<Duration, u64> {
        let t0 = Instant::now();
        loop {
            let now = self.batches();
            if now >= from + n {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout || self.handle.is_finished() {
                return Err(now);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .unwrap_or_else(|_| panic!("client {} panicked", self.name))
    }
}

/// The devices of the rigs: a RAM disk and a file-backed disk.
const DEVS: [&str; 2] = ["r0", "f0"];

/// A daemon (metrics on, for the session counters) with a `ram` device `r0` and a `file`
/// device `f0` on a file in its run dir.
fn start_daemon(tag: &str) -> Daemon {
    let dir = unique_dir(tag);
    let img = dir.join("f0.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let cfg = format!(
        "metrics = \"127.0.0.1:0\"\n{}{}",
        blk_config("r0", "backend = \"ram\"\nsize = \"64M\""),
        blk_config(
            "f0",
            &format!("backend = \"file\"\npath = \"{}\"", img.display())
        )
    );
    let d = Daemon::start_in(dir, &cfg, &DEVS);
    wait_ctl(&d);
    d
}

/// Waits (bounded) until the daemon answers on its control socket.
fn wait_ctl(d: &Daemon) {
    let t0 = Instant::now();
    while !d.cli(&["dev", "show"]).0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no control socket; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `requests` counter of queue 0 of every device in [`DEVS`].
fn requests(d: &Daemon) -> Vec<u64> {
    DEVS.iter().map(|n| d.vstat(n, 0, "requests")).collect()
}

/// Takes `old` over and checks the handover: the new daemon serves both devices, `old`
/// exits with status 0 saying it handed over to the new pid, and the request counters
/// did not go backwards. Returns the new daemon and its `takeover:` line.
fn upgrade(mut old: Daemon, env: &[(&str, &str)]) -> (Daemon, TakeoverLine) {
    let before = requests(&old);
    let old_pid = old.pid();
    let (new, line) = old.takeover(env).unwrap_or_else(|e| {
        panic!(
            "{e}\n--- old daemon (pid {old_pid}) log tail:\n{}",
            tail(&old.log_text(), 60)
        )
    });
    assert_eq!(line.from_pid, old_pid, "{}", line.line);
    assert_eq!(line.devices, DEVS.len(), "{}", line.line);
    let st = old.wait_exit(Duration::from_secs(20));
    assert!(
        st.is_some_and(|s| s.success()),
        "old daemon {old_pid} after handing over: exit {st:?}; log tail:\n{}",
        tail(&old.log_text(), 60)
    );
    let handed = format!("handed over to pid {}", new.pid());
    assert!(
        old.log_text().contains(&handed),
        "old daemon's log lacks `{handed}`:\n{}",
        tail(&old.log_text(), 30)
    );
    let after = requests(&new);
    for ((dev, b), a) in DEVS.iter().zip(&before).zip(&after) {
        assert!(
            a >= b,
            "{dev}: vstats requests went backwards across the takeover: {b} -> {a}"
        );
    }
    (new, line)
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Checks a finished client: no I/O error, no mismatch, and blocks were verified.
fn check_report(name: &str, r: &Report, log: &str) {
    assert!(
        r.io_errors == 0 && r.mismatches == 0,
        "client {name}: {} I/O errors, {} mismatches: {:#?}\ndaemon log tail:\n{}",
        r.io_errors,
        r.mismatches,
        r.problems,
        tail(log, 40)
    );
    assert!(r.verified > 0, "client {name} verified nothing: {r:?}");
}

/// Each client completes `n` more batches within 10 s (after `what`); on a stall, the
/// message shows the serving daemon's log (without its debug lines, but with its vrings
/// started) for the reason.
fn assert_progress(loads: &[Load], n: u64, what: &str, d: &Daemon) -> Duration {
    let mut slowest = Duration::ZERO;
    for l in loads {
        let from = l.batches();
        match l.wait_progress(from, n, Duration::from_secs(10)) {
            Ok(t) => slowest = slowest.max(t),
            Err(at) => panic!(
                "client {} made no progress after {what}: {from} -> {at} batches in 10 s\n\
                 --- serving daemon (pid {}) log, debug lines but `vring started` left out:\n{}",
                l.name,
                d.pid(),
                d.log_excerpt(40)
            ),
        }
    }
    slowest
}

/// 20 successive takeovers while a client per device writes and verifies at queue depth
/// 8/16: no I/O error, every block reads back as last written, the clients keep going
/// after each upgrade, the request counters never go backwards (and at the end count at
/// least every request the clients completed), each frontend connected exactly once, and
/// each old daemon exits 0.
#[test]
fn twenty_takeovers_under_load_lose_no_io() {
    const UPGRADES: usize = 20;
    let mut d = start_daemon("up20");
    let loads: Vec<Load> = DEVS
        .iter()
        .enumerate()
        .map(|(i, n)| Load::start(i as u64 + 1, n, d.sock_str(n)))
        .collect();
    assert_progress(&loads, 20, "the start", &d);
    let mut lines = Vec::new();
    for _ in 0..UPGRADES {
        let (new, line) = upgrade(d, &[]);
        d = new;
        lines.push(line);
        assert_progress(&loads, 20, &format!("takeover {}", lines.len()), &d);
    }
    // Progress after the last upgrade, measured once more over a longer stretch.
    assert_progress(&loads, 200, "the last takeover", &d);
    let reports: Vec<(String, Report)> = loads
        .into_iter()
        .map(|l| (l.name.clone(), l.finish()))
        .collect();
    let log = d.log_text();
    for (name, r) in &reports {
        check_report(name, r, &log);
    }
    let after = requests(&d);
    for ((dev, r), n) in DEVS.iter().zip(&reports).zip(&after) {
        assert!(
            *n >= r.1.requests,
            "{dev}: vstats counts {n} requests, fewer than the {} the client completed \
             (counters were reset by a takeover)",
            r.1.requests
        );
        eprintln!(
            "{dev}: client completed {} requests, vstats {n}",
            r.1.requests
        );
    }
    for dev in DEVS {
        assert_eq!(
            d.session_connects(dev),
            1,
            "{dev}: the frontend connected more than once (it never reconnected)"
        );
    }
    eprintln!("{}", pause_summary(&lines));
    for (name, r) in &reports {
        eprintln!(
            "client {name}: {} requests, {} blocks verified, max single-I/O latency {:.3} ms",
            r.requests,
            r.verified,
            r.max_latency.as_secs_f64() * 1e3
        );
    }
    let st = d.stop();
    assert!(st.success(), "final daemon did not stop cleanly: {st:?}");
}

/// `UVDPA_TAKEOVER_ABORT=quiesced`: the new daemon dies after the old one stopped its
/// queues and handed its state over; the old one resumes serving (I/O continues and
/// verifies, the control socket answers), and a normal takeover afterwards succeeds.
#[test]
fn takeover_aborted_after_quiesce_rolls_back_and_a_later_one_succeeds() {
    let mut d = start_daemon("upabort");
    let loads: Vec<Load> = DEVS
        .iter()
        .enumerate()
        .map(|(i, n)| Load::start(i as u64 + 11, n, d.sock_str(n)))
        .collect();
    assert_progress(&loads, 20, "the start", &d);
    let before = requests(&d);
    let old_pid = d.pid();
    let err = match d.takeover(&[("UVDPA_TAKEOVER_ABORT", "quiesced")]) {
        Ok((_, line)) => panic!("the aborting takeover succeeded: {}", line.line),
        Err(e) => e,
    };
    // It died of its abort(), not of a refusal.
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            err.status.and_then(|s| s.signal()),
            Some(rustix::process::Signal::ABORT.as_raw()),
            "the new daemon did not abort(): {err}"
        );
    }
    assert!(
        d.alive(),
        "old daemon {old_pid} died with the aborted takeover; log tail:\n{}",
        tail(&d.log_text(), 40)
    );
    let resumed = assert_progress(&loads, 20, "the aborted takeover", &d);
    eprintln!(
        "I/O resumed within {:.3} ms of the new daemon's death",
        resumed.as_secs_f64() * 1e3
    );
    let show = d.cli_json(&["dev", "show"]);
    for dev in DEVS {
        let v = show["dev"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["name"] == dev))
            .unwrap_or_else(|| panic!("dev show lacks {dev}: {show}"));
        assert_eq!(v["state"], "live", "{dev} after the rollback: {v}");
    }
    let after = requests(&d);
    for ((dev, b), a) in DEVS.iter().zip(&before).zip(&after) {
        assert!(a > b, "{dev}: requests {b} -> {a} across the rollback");
    }
    assert_eq!(d.pid(), old_pid);

    let (mut d, line) = upgrade(d, &[]);
    eprintln!("after the rollback: {}", line.line);
    assert_progress(&loads, 50, "the takeover after the rollback", &d);
    let reports: Vec<(String, Report)> = loads
        .into_iter()
        .map(|l| (l.name.clone(), l.finish()))
        .collect();
    let log = d.log_text();
    for (name, r) in &reports {
        check_report(name, r, &log);
    }
    for dev in DEVS {
        assert_eq!(d.session_connects(dev), 1, "{dev}: session connects");
    }
    assert!(d.alive());
    let st = d.stop();
    assert!(st.success(), "daemon did not stop cleanly: {st:?}");
}

/// A takeover with no daemon on the run dir fails cleanly (non-zero exit, not a crash),
/// with `Takeover failed` and the control socket's path in the message.
#[test]
fn takeover_without_a_running_daemon_names_the_control_socket() {
    let dir = unique_dir("upnone");
    let ctl = dir.join("uvdpa.ctl");
    let err = match PendingTakeover::spawn(&dir, &[], &[]).wait(Duration::from_secs(30)) {
        Ok((_, line)) => panic!("a takeover from nothing succeeded: {}", line.line),
        Err(e) => e,
    };
    assert!(
        err.status.and_then(|s| s.code()).is_some_and(|c| c != 0),
        "expected a non-zero exit code: {err}"
    );
    assert!(
        err.stderr.contains("Takeover failed") && err.stderr.contains(ctl.to_str().unwrap()),
        "the message does not say `Takeover failed` naming {}: {err}",
        ctl.display()
    );
    assert!(
        !err.stdout.contains("control socket:"),
        "it served anyway: {err}"
    );
}

/// Whether process `pid` has a socket open (the takeover process has connected).
fn has_socket(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|r| {
            r.filter_map(Result::ok).any(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
        })
        .unwrap_or(false)
}

/// A second takeover while one runs is refused. Made deterministic by stopping the old
/// daemon (SIGSTOP) while two new processes connect to its control socket (the kernel
/// queues the connections and their requests), then continuing it: both requests are
/// pending at once, so whichever it handles first takes over and the other must be
/// refused (non-zero exit, `Takeover failed`, not a crash). The winner serves both
/// devices; the old daemon exits 0.
#[test]
fn a_second_concurrent_takeover_is_refused() {
    let mut d = start_daemon("uptwo");
    let old_pid = d.pid();
    d.signal(rustix::process::Signal::STOP);
    let wait_connected = |p: &PendingTakeover| {
        let t0 = Instant::now();
        while !has_socket(p.pid()) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "takeover process never opened a socket"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Time to send its request after connecting.
        std::thread::sleep(Duration::from_millis(500));
    };
    let a = d.spawn_takeover(&[]);
    wait_connected(&a);
    let b = d.spawn_takeover(&[]);
    wait_connected(&b);
    let pids = [a.pid(), b.pid()];
    d.signal(rustix::process::Signal::CONT);
    let results = [
        a.wait(Duration::from_secs(60)),
        b.wait(Duration::from_secs(60)),
    ];
    let (won, lost): (Vec<_>, Vec<_>) = results.into_iter().zip(pids).partition(|r| r.0.is_ok());
    assert!(
        won.len() == 1,
        "expected exactly one of the two takeovers ({pids:?}) to succeed: {}\n\
         --- old daemon log tail:\n{}",
        won.iter()
            .chain(&lost)
            .map(|(r, pid)| match r {
                Ok((_, l)) => format!("{pid}: {}", l.line),
                Err(e) => format!("{pid}: {e}"),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        tail(&d.log_text(), 40)
    );
    let (Ok((mut new, line)), _) = won.into_iter().next().unwrap() else {
        unreachable!()
    };
    let (Err(e), lost_pid) = lost.into_iter().next().unwrap() else {
        unreachable!()
    };
    assert_eq!(line.from_pid, old_pid, "{}", line.line);
    assert!(
        e.status.and_then(|s| s.code()).is_some_and(|c| c != 0)
            && e.stderr.contains("Takeover failed"),
        "the second takeover (pid {lost_pid}) was not refused cleanly: {e}"
    );
    eprintln!(
        "refused: {}",
        e.stderr
            .lines()
            .find(|l| l.contains("Takeover failed"))
            .unwrap_or("")
    );
    let st = d.wait_exit(Duration::from_secs(20));
    assert!(
        st.is_some_and(|s| s.success()),
        "old daemon: exit {st:?}; log tail:\n{}",
        tail(&d.log_text(), 40)
    );
    assert!(new.alive(), "the winning takeover's daemon died");
    let show = new.cli_json(&["dev", "show"]);
    assert_eq!(
        show["dev"].as_array().map(Vec::len),
        Some(DEVS.len()),
        "{show}"
    );
    let st = new.stop();
    assert!(st.success(), "daemon did not stop cleanly: {st:?}");
}

/// A RAM disk's contents survive takeovers: a pattern written before reads back through
/// the same libblkio connection after each of two takeovers, and writes after them stick.
#[test]
fn ram_disk_contents_survive_takeovers() {
    const N: usize = 64;
    const QD: usize = 16;
    let cbs = 65536usize;
    let d = start_daemon("upram");
    let mut c = BlkClient::connect(&d.sock_str("r0"), 1, QD * cbs).unwrap();
    let stride = c.capacity / N as u64 / cbs as u64 * cbs as u64;
    let write = |c: &mut BlkClient, seed: u64| {
        for chunk in (0..N).collect::<Vec<_>>().chunks(QD) {
            let ops: Vec<Op> = chunk
                .iter()
                .enumerate()
                .map(|(slot, &i)| {
                    c.buf()[slot * cbs..][..cbs].copy_from_slice(&pattern(seed + i as u64, cbs));
                    Op::Write {
                        offset: i as u64 * stride,
                        buf_off: slot * cbs,
                        len: cbs,
                    }
                })
                .collect();
            assert!(c.run(0, &ops).iter().all(|&r| r == 0), "writes failed");
        }
    };
    let verify = |c: &mut BlkClient, seed: u64, what: &str, d: &Daemon| {
        for chunk in (0..N).collect::<Vec<_>>().chunks(QD) {
            c.buf().fill(0x5a);
            let ops: Vec<Op> = chunk
                .iter()
                .enumerate()
                .map(|(slot, &i)| Op::Read {
                    offset: i as u64 * stride,
                    buf_off: slot * cbs,
                    len: cbs,
                })
                .collect();
            let rets = c.try_run(0, &ops, IO_TIMEOUT).unwrap_or_else(|e| {
                panic!(
                    "{what}: reads did not complete: {e}\n--- serving daemon (pid {}) log, \
                         debug lines but `vring started` left out:\n{}",
                    d.pid(),
                    d.log_excerpt(40)
                )
            });
            assert!(
                rets.iter().all(|&r| r == 0),
                "{what}: reads failed: {rets:?}"
            );
            for (slot, &i) in chunk.iter().enumerate() {
                assert!(
                    c.buf()[slot * cbs..][..cbs] == pattern(seed + i as u64, cbs)[..],
                    "{what}: block at {} differs from what was written",
                    i as u64 * stride
                );
            }
        }
    };
    write(&mut c, 1000);
    verify(&mut c, 1000, "before any takeover", &d);
    let (d1, _) = upgrade(d, &[]);
    verify(&mut c, 1000, "after the first takeover", &d1);
    write(&mut c, 2000);
    let (d2, _) = upgrade(d1, &[]);
    verify(&mut c, 2000, "after the second takeover", &d2);
    drop(c);
    let st = d2.stop();
    assert!(st.success(), "daemon did not stop cleanly: {st:?}");
}
