//! Drives `dpdk-testpmd` (DPDK 22.11, Debian package `dpdk`) as a vhost-user peer: its
//! `net_virtio_user` vdev is a virtio-net driver (the "guest"), its `net_vhost` vdev a
//! reference vhost-user backend.
//!
//! testpmd runs in interactive mode (`-i`) with commands written to its stdin; its stdout
//! and stderr share one pipe (line-buffered through `stdbuf`) read by a thread into memory
//! and into a log file. A command is complete when the next `testpmd> ` prompt appears.
//! Every wait is bounded, and errors carry the tail of the log. The process runs under
//! `timeout` (a hard lifetime, [`max_lifetime_secs`]) in its own process group, which
//! [`Drop`] kills; the group also gets SIGTERM if the thread that spawned it dies, so a
//! killed test run leaves no busy-polling testpmd behind.
//!
//! Fixed EAL options (no hugepages on the test machines): `--no-pci --no-huge --no-shconf
//! --no-telemetry -m 512 --file-prefix <unique>`, main lcore and forwarding lcore both on
//! [`TestpmdOpts::core`] (`--lcores 0@C,1@C`: testpmd needs a forwarding lcore besides the
//! main one, which only reads commands); the process's affinity is that one CPU too, so
//! EAL's control threads stay there. App options: `-i --forward-mode=M
//! --total-num-mbufs=16384 --rxq=N --txq=N --nb-cores=1 [--txpkts=L]`.

#![allow(dead_code)]

use std::cell::Cell;
use std::fs::File;
use std::io::{PipeReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// testpmd's interactive prompt; printed when it is ready for the next command.
pub const PROMPT: &str = "testpmd> ";
/// Bound on start-up (EAL init, driver plugins, port start) until the first prompt.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on one command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on `quit` until the process has exited.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Lines of log quoted in errors.
const LOG_TAIL_LINES: usize = 60;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The testpmd binary: `$UVDPA_TESTPMD`, else `dpdk-testpmd` from `PATH`.
pub fn testpmd_bin() -> String {
    std::env::var("UVDPA_TESTPMD").unwrap_or_else(|_| "dpdk-testpmd".to_string())
}

/// Whether [`testpmd_bin`] can be run.
pub fn available() -> bool {
    let bin = testpmd_bin();
    if bin.contains('/') {
        return Path::new(&bin).is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(&bin).is_file()))
        .unwrap_or(false)
}

/// Hard lifetime of a testpmd process in seconds (`timeout` kills it after this):
/// `$UVDPA_TESTPMD_MAX_SECS`, default 600.
pub fn max_lifetime_secs() -> u64 {
    std::env::var("UVDPA_TESTPMD_MAX_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

/// How to start one testpmd.
#[derive(Clone, Debug)]
pub struct TestpmdOpts<'a> {
    /// The whole `--vdev` value, e.g. `net_vhost0,iface=/tmp/x.sock,queues=1` or
    /// `net_virtio_user0,path=/tmp/x.sock,queues=1,packed_vq=1,mrg_rxbuf=0`.
    pub vdev: String,
    /// The CPU both of testpmd's lcores (main and forwarding) are pinned to.
    pub core: u32,
    /// `--forward-mode`: io, txonly, rxonly, mac, macswap, flowgen, ...
    pub fwd_mode: &'a str,
    /// `--txpkts`: frame length (without FCS) for txonly/flowgen and `start tx_first`.
    pub txpkts: Option<u16>,
    /// `--rxq` and `--txq` (match `queues=` of the vdev).
    pub nb_queues: u16,
    /// More EAL options (before `--`), e.g. `--log-level=lib.vhost.config:debug`.
    pub extra_eal: Vec<String>,
    /// More testpmd options (after `--`), e.g. `--rxd=1024`.
    pub extra_app: Vec<String>,
}

impl Default for TestpmdOpts<'_> {
    fn default() -> Self {
        TestpmdOpts {
            vdev: String::new(),
            core: 0,
            fwd_mode: "io",
            txpkts: None,
            nb_queues: 1,
            extra_eal: Vec::new(),
            extra_app: Vec::new(),
        }
    }
}

/// One port's counters from `show port stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PortStats {
    /// Port id.
    pub port: u16,
    /// `RX-packets`
    pub rx_packets: u64,
    /// `RX-missed` (imissed)
    pub rx_missed: u64,
    /// `RX-bytes`
    pub rx_bytes: u64,
    /// `RX-errors` (ierrors)
    pub rx_errors: u64,
    /// `RX-nombuf`
    pub rx_nombuf: u64,
    /// `TX-packets`
    pub tx_packets: u64,
    /// `TX-errors` (oerrors)
    pub tx_errors: u64,
    /// `TX-bytes`
    pub tx_bytes: u64,
    /// `Rx-pps`: testpmd's own rate since the previous `show port stats` of this port
    /// (0 on the first).
    pub rx_pps: u64,
    /// `Tx-pps`, likewise.
    pub tx_pps: u64,
}

impl PortStats {
    /// Counter differences `self - earlier` (the rate fields are kept from `self`).
    pub fn since(&self, earlier: &PortStats) -> PortStats {
        PortStats {
            port: self.port,
            rx_packets: self.rx_packets.wrapping_sub(earlier.rx_packets),
            rx_missed: self.rx_missed.wrapping_sub(earlier.rx_missed),
            rx_bytes: self.rx_bytes.wrapping_sub(earlier.rx_bytes),
            rx_errors: self.rx_errors.wrapping_sub(earlier.rx_errors),
            rx_nombuf: self.rx_nombuf.wrapping_sub(earlier.rx_nombuf),
            tx_packets: self.tx_packets.wrapping_sub(earlier.tx_packets),
            tx_errors: self.tx_errors.wrapping_sub(earlier.tx_errors),
            tx_bytes: self.tx_bytes.wrapping_sub(earlier.tx_bytes),
            rx_pps: self.rx_pps,
            tx_pps: self.tx_pps,
        }
    }
}

/// One port's forwarding counters, from the output of `stop` / `show fwd stats all`.
/// `tx_dropped` counts frames the forwarding engine could not place in the TX ring (ring
/// full), which `show port stats` does not show for virtio/vhost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdStats {
    /// Port id.
    pub port: u16,
    /// `RX-packets`
    pub rx_packets: u64,
    /// `RX-dropped`
    pub rx_dropped: u64,
    /// `TX-packets`
    pub tx_packets: u64,
    /// `TX-dropped`
    pub tx_dropped: u64,
}

/// Rates over a measured window, from two [`PortStats`] samples.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    /// Length of the window (between the two samples).
    pub secs: f64,
    /// Counter differences over the window.
    pub delta: PortStats,
    /// Received frames per second.
    pub rx_pps: f64,
    /// Sent frames per second.
    pub tx_pps: f64,
}

/// `Key: value` pairs of a testpmd statistics block (keys keep their dashes).
fn key_values(text: &str) -> Vec<(&str, u64)> {
    let toks: Vec<&str> = text.split_whitespace().collect();
    let mut kv = Vec::new();
    for w in toks.windows(2) {
        if let Some(k) = w[0].strip_suffix(':') {
            if let Ok(v) = w[1].parse::<u64>() {
                kv.push((k, v));
            }
        }
    }
    kv
}

/// Splits `text` at every `marker` followed by a port number: (port, block) pairs.
fn port_blocks<'t>(text: &'t str, marker: &str) -> Vec<(u16, &'t str)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(marker) {
        let after = &rest[i + marker.len()..];
        let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
        let end = after[digits.len()..]
            .find(marker)
            .map_or(after.len(), |j| j + digits.len());
        if let Ok(port) = digits.parse() {
            out.push((port, &after[digits.len()..end]));
        }
        rest = &after[end..];
    }
    out
}

/// Parses the output of `show port stats all` (or `show port stats N`).
pub fn parse_port_stats(text: &str) -> Vec<PortStats> {
    port_blocks(text, "NIC statistics for port ")
        .into_iter()
        .map(|(port, block)| {
            let mut s = PortStats {
                port,
                ..Default::default()
            };
            for (k, v) in key_values(block) {
                match k {
                    "RX-packets" => s.rx_packets = v,
                    "RX-missed" => s.rx_missed = v,
                    "RX-bytes" => s.rx_bytes = v,
                    "RX-errors" => s.rx_errors = v,
                    "RX-nombuf" => s.rx_nombuf = v,
                    "TX-packets" => s.tx_packets = v,
                    "TX-errors" => s.tx_errors = v,
                    "TX-bytes" => s.tx_bytes = v,
                    "Rx-pps" => s.rx_pps = v,
                    "Tx-pps" => s.tx_pps = v,
                    _ => {}
                }
            }
            s
        })
        .collect()
}

/// Parses the per-port blocks of `stop` / `show fwd stats all` output (the accumulated
/// all-ports block is left out).
pub fn parse_fwd_stats(text: &str) -> Vec<FwdStats> {
    port_blocks(text, "Forward statistics for port ")
        .into_iter()
        .map(|(port, block)| {
            let block = block.split("Accumulated").next().unwrap_or(block);
            let mut s = FwdStats {
                port,
                ..Default::default()
            };
            for (k, v) in key_values(block) {
                match k {
                    "RX-packets" => s.rx_packets = v,
                    "RX-dropped" => s.rx_dropped = v,
                    "TX-packets" => s.tx_packets = v,
                    "TX-dropped" => s.tx_dropped = v,
                    _ => {}
                }
            }
            s
        })
        .collect()
}

/// Everything testpmd printed so far, and whether its output pipe is closed.
#[derive(Default)]
struct Output {
    buf: Vec<u8>,
    eof: bool,
}

#[derive(Default)]
struct Shared {
    out: Mutex<Output>,
    cv: Condvar,
}

/// Why a bounded wait ended without its condition.
enum WaitEnd {
    Timeout,
    Eof,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A running testpmd; killed (its whole process group) on drop.
pub struct Testpmd {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    /// Name used in messages: the vdev driver instance and the forward mode.
    pub name: String,
    dir: PathBuf,
    log: PathBuf,
    prefix: String,
    /// End of the last prompt consumed (where the next command's output starts).
    mark: usize,
    /// Set once an error quoted the log: drop keeps the log file then.
    keep_log: Cell<bool>,
}

impl Testpmd {
    /// Starts testpmd and waits (at most [`STARTUP_TIMEOUT`]) for its first prompt; fails
    /// if it exits first or found no port. Forwarding is not started: call
    /// [`Testpmd::start`] or [`Testpmd::start_tx_first`]. A `net_virtio_user` client
    /// connects once, at start-up: its backend must already listen. A `net_vhost`
    /// backend listens on its socket by the time this returns.
    pub fn spawn(opts: TestpmdOpts<'_>) -> Result<Testpmd, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let driver = opts.vdev.split(',').next().unwrap_or("vdev");
        let name = format!("testpmd[{driver} {}]", opts.fwd_mode);
        let bin = testpmd_bin();
        if !available() {
            return Err(format!(
                "{name}: {bin} not found (install DPDK: scripts/install-deps.sh)"
            ));
        }
        let prefix = format!("uvdpa-tp-{pid}-{n}");
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{name}: mkdir {dir:?}: {e}"))?;
        let log = dir.join("testpmd.log");
        let mut eal: Vec<String> = vec![
            "--no-pci".into(),
            "--no-huge".into(),
            "--no-shconf".into(),
            "--no-telemetry".into(),
            "-m".into(),
            "512".into(),
            "--file-prefix".into(),
            prefix.clone(),
            "--lcores".into(),
            format!("0@{c},1@{c}", c = opts.core),
            "--vdev".into(),
            opts.vdev.clone(),
        ];
        eal.extend(opts.extra_eal.iter().cloned());
        let mut app: Vec<String> = vec![
            "-i".into(),
            format!("--forward-mode={}", opts.fwd_mode),
            "--total-num-mbufs=16384".into(),
            format!("--rxq={}", opts.nb_queues),
            format!("--txq={}", opts.nb_queues),
            "--nb-cores=1".into(),
        ];
        if let Some(len) = opts.txpkts {
            app.push(format!("--txpkts={len}"));
        }
        app.extend(opts.extra_app.iter().cloned());

        let mut logf = File::create(&log).map_err(|e| format!("{name}: create {log:?}: {e}"))?;
        let (reader, writer) = std::io::pipe().map_err(|e| format!("{name}: pipe: {e}"))?;
        let writer2 = writer
            .try_clone()
            .map_err(|e| format!("{name}: pipe: {e}"))?;
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "2", &max_lifetime_secs().to_string()])
            .args(["stdbuf", "-oL", "-eL", &bin])
            .args(&eal)
            .arg("--")
            .args(&app)
            .stdin(Stdio::piped())
            .stdout(writer)
            .stderr(writer2)
            .process_group(0);
        // The whole process (EAL's control threads too, e.g. the vhost-user message
        // thread) runs on `core`: left alone, EAL puts them on the CPUs its lcores do not
        // use, i.e. on the peer's busy-polled CPU.
        let mut cpus = rustix::thread::CpuSet::new();
        cpus.set(opts.core as usize);
        // SAFETY: the closure runs in the forked child before exec; it only makes two
        // async-signal-safe system calls (sched_setaffinity, prctl) on a CpuSet that was
        // built before the fork, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                rustix::thread::sched_setaffinity(None, &cpus)?;
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::TERM,
                ))?;
                Ok(())
            });
        }
        let cmdline = format!(
            "timeout -k 2 {} stdbuf -oL -eL {bin} {} -- {}",
            max_lifetime_secs(),
            eal.join(" "),
            app.join(" ")
        );
        let header = format!("# {cmdline}\n");
        let _ = logf.write_all(header.as_bytes());
        let shared = Arc::new(Shared::default());
        shared
            .out
            .lock()
            .unwrap()
            .buf
            .extend_from_slice(header.as_bytes());
        let spawned = cmd.spawn();
        // The parent's copies of the pipe's write end live in `cmd`: close them so the
        // reader sees EOF when testpmd exits.
        drop(cmd);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!("{name}: spawn {cmdline}: {e}"));
            }
        };
        let stdin = child.stdin.take();
        let reader = spawn_reader(reader, logf, shared.clone());
        let mut t = Testpmd {
            child: Some(child),
            stdin,
            shared,
            reader: Some(reader),
            name,
            dir,
            log,
            prefix,
            mark: 0,
            keep_log: Cell::new(false),
        };
        // The first prompt ends start-up.
        let started = t.wait(STARTUP_TIMEOUT, |buf| {
            find(buf, PROMPT.as_bytes()).map(|i| i + PROMPT.len())
        });
        match started {
            Ok(end) => t.mark = end,
            Err(WaitEnd::Eof) => return Err(t.failure("exited during start-up")),
            Err(WaitEnd::Timeout) => {
                return Err(t.failure(&format!("no prompt within {STARTUP_TIMEOUT:?}")))
            }
        }
        let text = t.output();
        if text.contains("No probed ethernet devices") || text.contains("failed to initialize") {
            return Err(t.failure("its vdev did not probe (is the backend listening?)"));
        }
        Ok(t)
    }

    /// Waits until `cond` finds what it looks for in the output, the output ends, or
    /// `timeout` passes.
    fn wait<T>(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&[u8]) -> Option<T>,
    ) -> Result<T, WaitEnd> {
        let deadline = Instant::now() + timeout;
        let mut out = self.shared.out.lock().unwrap();
        loop {
            if let Some(v) = cond(&out.buf) {
                return Ok(v);
            }
            if out.eof {
                return Err(WaitEnd::Eof);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitEnd::Timeout);
            }
            out = self.shared.cv.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// An error message: `what`, the log's path and its last lines. The log file is kept
    /// (not removed on drop) from then on; [`log_path_in`] finds it in the message.
    pub fn failure(&self, what: &str) -> String {
        self.keep_log.set(true);
        format!(
            "{} {what}; log {} (last {LOG_TAIL_LINES} lines):\n{}",
            self.name,
            self.log.display(),
            self.log_tail(LOG_TAIL_LINES)
        )
    }

    /// Everything testpmd printed so far (stdout and stderr interleaved), starting with
    /// the command line.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.shared.out.lock().unwrap().buf).into_owned()
    }

    /// The last `n` lines of [`Testpmd::output`].
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.output();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The log file (removed on drop unless an error quoted it or the thread panics).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Process id of the process group leader (`timeout`, whose child is testpmd).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits (at most `timeout`) until `needle` appears anywhere in the output.
    pub fn wait_for_text(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        match self.wait(timeout, |buf| find(buf, needle.as_bytes())) {
            Ok(_) => Ok(()),
            Err(WaitEnd::Eof) => Err(self.failure(&format!("exited before printing {needle:?}"))),
            Err(WaitEnd::Timeout) => {
                Err(self.failure(&format!("did not print {needle:?} within {timeout:?}")))
            }
        }
    }

    /// Runs one interactive command and returns its output (without the echoed command
    /// line), waiting at most `timeout` for the next prompt.
    pub fn cmd_timeout(&mut self, line: &str, timeout: Duration) -> Result<String, String> {
        let start = self.mark;
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(self.failure(&format!("cannot run {line:?}: stdin closed")));
        };
        if let Err(e) = stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
        {
            return Err(self.failure(&format!("writing {line:?}: {e}")));
        }
        let res = self.wait(timeout, |buf| {
            let s = buf.get(start..)?;
            let p = find(s, PROMPT.as_bytes())?;
            Some((start + p, start + p + PROMPT.len()))
        });
        match res {
            Ok((end, next)) => {
                self.mark = next;
                let out = self.shared.out.lock().unwrap();
                let text = String::from_utf8_lossy(&out.buf[start..end]).into_owned();
                drop(out);
                // The first line is testpmd's echo of the command.
                let text = match text.split_once('\n') {
                    Some((first, rest)) if first.trim() == line.trim() => rest.to_string(),
                    _ => text,
                };
                Ok(text)
            }
            Err(WaitEnd::Eof) => Err(self.failure(&format!("exited during {line:?}"))),
            Err(WaitEnd::Timeout) => Err(self.failure(&format!(
                "no prompt after {line:?} within {timeout:?} (wedged?)"
            ))),
        }
    }

    /// [`Testpmd::cmd_timeout`] with [`CMD_TIMEOUT`].
    pub fn cmd(&mut self, line: &str) -> Result<String, String> {
        self.cmd_timeout(line, CMD_TIMEOUT)
    }

    /// `start`: starts forwarding.
    pub fn start(&mut self) -> Result<(), String> {
        self.cmd("start").map(|_| ())
    }

    /// `start tx_first [bursts]`: sends `bursts` (default 1) bursts of 32 frames of
    /// `txpkts` bytes first, then forwards (for `io` round trips).
    pub fn start_tx_first(&mut self, bursts: Option<u32>) -> Result<(), String> {
        match bursts {
            Some(b) => self.cmd(&format!("start tx_first {b}")),
            None => self.cmd("start tx_first"),
        }
        .map(|_| ())
    }

    /// `stop`: stops forwarding; returns the per-port forwarding counters it prints.
    pub fn stop(&mut self) -> Result<Vec<FwdStats>, String> {
        let text = self.cmd("stop")?;
        Ok(parse_fwd_stats(&text))
    }

    /// `show fwd stats all`: per-port forwarding counters since `start`.
    pub fn fwd_stats(&mut self) -> Result<Vec<FwdStats>, String> {
        let text = self.cmd("show fwd stats all")?;
        Ok(parse_fwd_stats(&text))
    }

    /// `show port stats all`: every port's counters.
    pub fn stats_all(&mut self) -> Result<Vec<PortStats>, String> {
        let text = self.cmd("show port stats all")?;
        let v = parse_port_stats(&text);
        if v.is_empty() {
            return Err(self.failure(&format!("no port statistics in:\n{text}")));
        }
        Ok(v)
    }

    /// Port 0's counters (`show port stats all`).
    pub fn stats(&mut self) -> Result<PortStats, String> {
        Ok(self.stats_all()?[0])
    }

    /// Rates of port 0 over `window`: two [`Testpmd::stats`] samples, timed here.
    pub fn measure(&mut self, window: Duration) -> Result<Rate, String> {
        let a = self.stats()?;
        let t0 = Instant::now();
        std::thread::sleep(window);
        let b = self.stats()?;
        let secs = t0.elapsed().as_secs_f64();
        let delta = b.since(&a);
        Ok(Rate {
            secs,
            delta,
            rx_pps: delta.rx_packets as f64 / secs,
            tx_pps: delta.tx_packets as f64 / secs,
        })
    }

    /// Polls port 0's counters (every 50 ms) until `pred` holds; fails with the last
    /// counters and the log after `timeout`.
    pub fn wait_stats(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&PortStats) -> bool,
    ) -> Result<PortStats, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats()?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!(
                    "counters did not reach the expected values within {timeout:?}: {s:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `stop`, then `quit`, and waits (bounded) for the process to exit; returns the
    /// forwarding counters `stop` printed.
    pub fn stop_and_quit(mut self) -> Result<Vec<FwdStats>, String> {
        let stats = self.stop()?;
        self.quit()?;
        Ok(stats)
    }

    /// `quit`, and waits at most [`QUIT_TIMEOUT`] for the process to exit (killed then).
    pub fn quit(&mut self) -> Result<(), String> {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(b"quit\n").and_then(|_| stdin.flush());
        }
        self.stdin = None;
        let deadline = Instant::now() + QUIT_TIMEOUT;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Ok(());
            };
            match child.try_wait() {
                Ok(Some(st)) => {
                    self.child = None;
                    // testpmd reports its own failures and exits 0 after `quit`.
                    return if st.success() {
                        Ok(())
                    } else {
                        Err(self.failure(&format!("exited with {st} after quit")))
                    };
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let msg = self.failure(&format!("still running {QUIT_TIMEOUT:?} after quit"));
                    self.kill();
                    return Err(msg);
                }
                Err(e) => return Err(self.failure(&format!("wait: {e}"))),
            }
        }
    }

    /// Kills the process group with SIGKILL and reaps the leader (bounded).
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pgid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        let _ = child.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{}: pid {} survived SIGKILL for 5 s", self.name, child.id());
    }
}

/// The log file named in an error from [`Testpmd::failure`] (to remove it after an
/// expected failure).
pub fn log_path_in(err: &str) -> Option<PathBuf> {
    let rest = &err[err.find("; log ")? + "; log ".len()..];
    Some(PathBuf::from(&rest[..rest.find(" (last ")?]))
}

fn spawn_reader(mut pipe: PipeReader, mut log: File, shared: Arc<Shared>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 16384];
        loop {
            let n = match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let _ = log.write_all(&chunk[..n]);
            shared
                .out
                .lock()
                .unwrap()
                .buf
                .extend_from_slice(&chunk[..n]);
            shared.cv.notify_all();
        }
        shared.out.lock().unwrap().eof = true;
        shared.cv.notify_all();
    })
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill();
        // Every writer of the pipe is dead now; the reader ends at EOF (bounded anyway,
        // in case something outside the group inherited the pipe).
        if self.wait(Duration::from_secs(5), |_| None::<()>).is_err() {
            let done = self.shared.out.lock().unwrap().eof;
            if let (true, Some(r)) = (done, self.reader.take()) {
                let _ = r.join();
            }
        }
        // EAL's runtime directory (empty with --no-shconf, but created).
        let rt = if rustix::process::geteuid().is_root() {
            PathBuf::from("/var/run/dpdk")
        } else {
            std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp"))
                .join("dpdk")
        };
        let _ = std::fs::remove_dir_all(rt.join(&self.prefix));
        if std::thread::panicking() && !self.keep_log.get() {
            eprintln!(
                "{} log kept at {} (last {LOG_TAIL_LINES} lines):\n{}",
                self.name,
                self.log.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        } else if !self.keep_log.get() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
