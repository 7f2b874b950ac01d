//! Shared helpers for end-to-end tests: a daemon process with a config, and a libblkio
//! client (driver `virtio-blk-vhost-user`), the frontend nobody here wrote.

#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir.
pub fn unique_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("uvdpa-t-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The guest kit: `tests/guest/` (initramfs builder, QEMU runner, netns helper).
pub fn guest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest")
}

static BUILD_INITRAMFS: std::sync::Once = std::sync::Once::new();

/// Builds the guest initramfs, once per test process (tests run in parallel threads).
pub fn build_initramfs() {
    BUILD_INITRAMFS.call_once(|| {
        let st = Command::new("bash")
            .arg(guest_dir().join("build-initramfs.sh"))
            .stdout(Stdio::null())
            .status()
            .expect("run build-initramfs.sh (needs linux-image-amd64, busybox-static: scripts/install-deps.sh)");
        assert!(st.success(), "building the guest initramfs failed");
    });
}

/// The path of the built `uvdpa` binary.
pub fn uvdpa_bin() -> &'static str {
    env!("CARGO_BIN_EXE_uvdpa")
}

/// A running `uvdpa daemon`.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `config` (TOML) and waits until every `[[device]]` socket
    /// named in `names` exists.
    pub fn start(tag: &str, config: &str, names: &[&str]) -> Daemon {
        let dir = unique_dir(tag);
        Self::start_in(dir, config, names)
    }

    /// As [`Daemon::start`] in an existing directory (to restart over the same files).
    pub fn start_in(dir: PathBuf, config: &str, names: &[&str]) -> Daemon {
        Self::start_in_env(dir, config, names, &[])
    }

    /// As [`Daemon::start_in`], with extra environment variables for the daemon.
    pub fn start_in_env(
        dir: PathBuf,
        config: &str,
        names: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let cfg = dir.join("uvdpa.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join(format!(
            "daemon-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let child = Command::new(uvdpa_bin())
            .args(["daemon", "--run-dir"])
            .arg(&dir)
            .arg("--config")
            .arg(&cfg)
            .env("UVDPA_LOG", "debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn uvdpa daemon");
        Self::adopt(child, dir, log, names)
    }

    /// Wraps a daemon the test spawned itself (extra arguments, fds), logging to `log`
    /// in `dir`, and waits for the sockets of `names`.
    pub fn adopt(child: Child, dir: PathBuf, log: PathBuf, names: &[&str]) -> Daemon {
        let d = Daemon {
            child: Some(child),
            dir,
            log,
        };
        for n in names {
            d.wait_socket(n);
        }
        d
    }

    /// Runs the CLI against this daemon's control socket: (exit ok, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        Self::cli_at(&self.dir.join("uvdpa.ctl"), args)
    }

    /// Runs the CLI against the control socket `ctl`.
    pub fn cli_at(ctl: &Path, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(uvdpa_bin())
            .arg("--ctl")
            .arg(ctl)
            .args(args)
            .output()
            .expect("run uvdpa CLI");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs the CLI with `-j` and parses its JSON; panics with stderr on failure.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-j"];
        a.extend_from_slice(args);
        let (ok, out, err) = self.cli(&a);
        assert!(ok, "uvdpa {args:?} failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {out}"))
    }

    /// The counters of queue `qidx` of device `dev` (`uvdpa -j dev vstats show`: the
    /// object under `vstats`).
    pub fn vstats(&self, dev: &str, qidx: usize) -> serde_json::Value {
        self.cli_json(&["dev", "vstats", "show", dev, "qidx", &qidx.to_string()])["vstats"].clone()
    }

    /// Counter `key` of queue `qidx` of device `dev`; panics (showing the counters) if it
    /// is missing.
    pub fn vstat(&self, dev: &str, qidx: usize, key: &str) -> u64 {
        let v = self.vstats(dev, qidx);
        v[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in vstats of {dev} qidx {qidx}: {v}"))
    }

    /// Open fds and threads of the daemon process.
    pub fn fds_and_threads(&self) -> (usize, usize) {
        let pid = self.pid();
        let n = |d: String| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
        (n(format!("/proc/{pid}/fd")), n(format!("/proc/{pid}/task")))
    }

    pub fn sock(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    pub fn sock_str(&self, name: &str) -> String {
        self.sock(name).to_str().unwrap().to_string()
    }

    fn wait_socket(&self, name: &str) {
        let p = self.sock(name);
        let t0 = Instant::now();
        while !p.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "socket {} did not appear; log:\n{}",
                p.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    /// Kills the daemon with SIGKILL (a crash) and reaps it.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!(
                    "daemon did not exit within 30 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Every test runs the queue workers under the default seccomp filter (trap): a
        // call outside its allow-list fails the device with this line, and the test.
        if !std::thread::panicking() {
            let log = self.log_text();
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("made a forbidden system call"))
            {
                panic!("a queue worker was stopped by its seccomp filter: {line}");
            }
        }
    }
}

/// The line a daemon started with `--takeover` prints once it has taken the devices over:
/// `takeover: {N} devices from pid {PID}, pause {MS} ms`.
#[derive(Debug, Clone)]
pub struct TakeoverLine {
    /// Devices taken over.
    pub devices: usize,
    /// The daemon they came from.
    pub from_pid: u32,
    /// How long the devices' queues were stopped (the guest-visible pause), in ms.
    pub pause_ms: f64,
    /// The line as printed.
    pub line: String,
}

impl TakeoverLine {
    /// Parses `line`; `None` unless it has exactly the documented shape (the pause with
    /// three decimals).
    pub fn parse(line: &str) -> Option<TakeoverLine> {
        let rest = line.trim_end().strip_prefix("takeover: ")?;
        let (devices, rest) = rest.split_once(" devices from pid ")?;
        let (pid, rest) = rest.split_once(", pause ")?;
        let ms = rest.strip_suffix(" ms")?;
        let (int, frac) = ms.split_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(int) || frac.len() != 3 || !digits(frac) {
            return None;
        }
        Some(TakeoverLine {
            devices: devices.parse().ok()?,
            from_pid: pid.parse().ok()?,
            pause_ms: ms.parse().ok()?,
            line: line.trim_end().to_string(),
        })
    }
}

/// A takeover that did not produce a running daemon.
#[derive(Debug)]
pub struct TakeoverFailed {
    /// What went wrong, as seen from the test.
    pub reason: String,
    /// The new process's exit status (`None` if it had to be killed).
    pub status: Option<ExitStatus>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr (the log file).
    pub stderr: String,
}

impl std::fmt::Display for TakeoverFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "takeover failed: {} (status {:?})\n--- stdout:\n{}\n--- stderr:\n{}",
            self.reason, self.status, self.stdout, self.stderr
        )
    }
}

/// A `uvdpa daemon --takeover` process started but not yet waited for.
pub struct PendingTakeover {
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    dir: PathBuf,
    log: PathBuf,
}

impl PendingTakeover {
    /// Starts `uvdpa daemon --takeover --run-dir DIR ARGS` with `env` (and `UVDPA_LOG=debug`),
    /// its stderr to a new log file in `dir`, its stdout read by a thread for as long as
    /// the process lives (so the daemon never writes to a closed pipe).
    pub fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> PendingTakeover {
        use std::io::BufRead;
        let log = dir.join(format!(
            "daemon-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = Command::new(uvdpa_bin())
            .args(["daemon", "--takeover", "--run-dir"])
            .arg(dir)
            .args(args)
            // A core dump of a takeover that aborts lands in the run dir.
            .current_dir(dir)
            .env("UVDPA_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn uvdpa daemon --takeover");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        PendingTakeover {
            child: Some(child),
            lines,
            dir: dir.to_path_buf(),
            log,
        }
    }

    /// The new process's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits (bounded by `timeout`) until the new daemon has printed its `takeover:` line
    /// and its `control socket:` line (it serves), or until it exits.
    pub fn wait(mut self, timeout: Duration) -> Result<(Daemon, TakeoverLine), TakeoverFailed> {
        use std::sync::mpsc::RecvTimeoutError;
        let deadline = Instant::now() + timeout;
        let mut stdout = Vec::new();
        let mut takeover = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if takeover.is_none() && l.starts_with("takeover:") {
                        takeover = Some(TakeoverLine::parse(&l));
                    }
                    let serving = l.starts_with("control socket:");
                    stdout.push(l);
                    if serving {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Stdout closed: the process exited (or is exiting).
                    let status = self.reap(Duration::from_secs(10));
                    return Err(self.failure("exited before serving", status, &stdout));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let mut c = self.child.take().unwrap();
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(self.failure(
                        &format!("no `control socket:` line within {timeout:?}; killed"),
                        None,
                        &stdout,
                    ));
                }
            }
        }
        let line = match takeover {
            Some(Some(t)) => t,
            Some(None) => {
                return Err(self.failure("malformed `takeover:` line", None, &stdout));
            }
            None => {
                return Err(self.failure(
                    "serving without a `takeover:` line first",
                    None,
                    &stdout,
                ));
            }
        };
        let d = Daemon {
            child: self.child.take(),
            dir: self.dir.clone(),
            log: self.log.clone(),
        };
        Ok((d, line))
    }

    /// Reaps the child (bounded); kills it if it does not exit in time.
    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    fn failure(
        &self,
        reason: &str,
        status: Option<ExitStatus>,
        stdout: &[String],
    ) -> TakeoverFailed {
        TakeoverFailed {
            reason: reason.to_string(),
            status,
            stdout: stdout.join("\n"),
            stderr: std::fs::read_to_string(&self.log).unwrap_or_default(),
        }
    }
}

impl Drop for PendingTakeover {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Daemon {
    /// Starts a new daemon that takes this one's devices over (`uvdpa daemon --takeover`
    /// on the same run dir, with `--config` naming this one's config file if it has one)
    /// and waits (60 s at most) until it serves. `self` stays the old process: wait for its
    /// exit with [`Daemon::wait_exit`] before dropping it (dropping a live one kills it).
    pub fn takeover(&self, env: &[(&str, &str)]) -> Result<(Daemon, TakeoverLine), TakeoverFailed> {
        self.spawn_takeover(env).wait(Duration::from_secs(60))
    }

    /// Starts the takeover process of [`Daemon::takeover`] without waiting for it.
    pub fn spawn_takeover(&self, env: &[(&str, &str)]) -> PendingTakeover {
        let cfg = self.dir.join("uvdpa.toml");
        let cfg = cfg.to_str().unwrap();
        let args: &[&str] = if Path::new(cfg).exists() {
            &["--config", cfg]
        } else {
            &[]
        };
        PendingTakeover::spawn(&self.dir, args, env)
    }

    /// Waits (bounded) for the process to exit on its own; `None` if it still runs after
    /// `timeout` (it is then killed when the handle is dropped).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last `n` lines of the log without its debug lines, except `vring started` (what
    /// a stalled queue after a takeover needs to be read).
    pub fn log_excerpt(&self, n: usize) -> String {
        let log = self.log_text();
        let v: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains(" DEBUG ") || l.contains("vring started"))
            .collect();
        v[v.len().saturating_sub(n)..].join("\n")
    }

    /// Sends `sig` to the daemon process.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, sig).expect("signal the daemon");
    }

    /// Sessions the vhost-user device `dev` has accepted (its frontends' connects), from
    /// the daemon's metrics endpoint (`uvdpa_session_connects_total`): the config must
    /// have a `metrics` address.
    pub fn session_connects(&self, dev: &str) -> u64 {
        self.metric(&format!("uvdpa_session_connects_total{{device=\"{dev}\"}}"))
    }

    /// Waits (bounded by `timeout`) until `uvdpa res show` counts are `before` again;
    /// panics naming both when they are not.
    pub fn wait_res_counts(&self, before: &serde_json::Value, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let after = self.cli_json(&["res", "show"])["counts"].clone();
            if after == *before {
                return;
            }
            assert!(Instant::now() < deadline, "res show {after} != {before}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of the sample `series` (metric name and labels exactly as the endpoint
    /// prints them) from the metrics address this process logged; panics if there is none.
    pub fn metric(&self, series: &str) -> u64 {
        use std::io::{Read, Write};
        let log = self.log_text();
        let marker = "serving metrics at http://";
        let addr = log
            .find(marker)
            .map(|i| &log[i + marker.len()..])
            .and_then(|r| r.find("/metrics").map(|j| r[..j].to_string()))
            .unwrap_or_else(|| panic!("the daemon logged no metrics address:\n{log}"));
        let mut s = std::net::TcpStream::connect(&addr)
            .unwrap_or_else(|e| panic!("connect to metrics at {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        let prefix = format!("{series} ");
        let v = body
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no sample {series} in the metrics:\n{body}"));
        let v: f64 = v
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series}: not a number: {v}"));
        v as u64
    }
}

/// Nearest-rank percentile `p` (0..=100) of `v` (sorted here); `NaN` when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// `min/p50/p99/max` of the takeovers' pauses, for the test output.
pub fn pause_summary(lines: &[TakeoverLine]) -> String {
    let v: Vec<f64> = lines.iter().map(|t| t.pause_ms).collect();
    format!(
        "{} takeovers, pause ms: min {:.3} p50 {:.3} p99 {:.3} max {:.3}",
        v.len(),
        percentile(&v, 0.0),
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        percentile(&v, 100.0)
    )
}

/// Outcome of one request: 0 on success, a negative errno on failure.
pub type Ret = i32;

/// A libblkio `virtio-blk-vhost-user` client with one shared buffer region.
pub struct BlkClient {
    pub queues: Vec<Blkioq>,
    blkio: Blkio,
    buf: *mut u8,
    buf_len: usize,
    pub capacity: u64,
}

/// One request in a batch.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Read {
        offset: u64,
        buf_off: usize,
        len: usize,
    },
    Write {
        offset: u64,
        buf_off: usize,
        len: usize,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
}

impl BlkClient {
    /// Connects and starts `num_queues` interrupt-driven queues with a `buf_len` buffer.
    pub fn connect(path: &str, num_queues: i32, buf_len: usize) -> Result<Self, blkio::Error> {
        Self::connect_with(path, num_queues, buf_len, false)
    }

    /// As [`BlkClient::connect`], setting libblkio's `read-only` property.
    pub fn connect_with(
        path: &str,
        num_queues: i32,
        buf_len: usize,
        read_only: bool,
    ) -> Result<Self, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", path)?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let capacity = blkio.get_u64("capacity")?;
        let mut out = blkio.start()?;
        let region = blkio.alloc_mem_region(buf_len)?;
        blkio.map_mem_region(&region)?;
        Ok(Self {
            queues: std::mem::take(&mut out.queues),
            buf: region.addr as *mut u8,
            buf_len: region.len,
            blkio,
            capacity,
        })
    }

    /// The client's buffer region.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region was allocated and mapped by libblkio with `buf_len` bytes and
        // stays mapped while `self.blkio` lives; requests are only in flight inside `run`,
        // which holds `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.buf_len) }
    }

    /// Submits every op on queue `q` at once (queue depth = ops.len()) and waits for all;
    /// returns each op's result in order.
    pub fn run(&mut self, q: usize, ops: &[Op]) -> Vec<Ret> {
        self.try_run(q, ops, Duration::from_secs(30))
            .expect("do_io (a timeout means the device hung)")
    }

    /// As [`BlkClient::run`], with a bound on the wait: `Err` with libblkio's error when no
    /// completion arrives within `timeout` (libblkio does not notice a closed socket).
    pub fn try_run(
        &mut self,
        q: usize,
        ops: &[Op],
        timeout: Duration,
    ) -> Result<Vec<Ret>, blkio::Error> {
        let base = self.buf;
        let queue = &mut self.queues[q];
        for (i, op) in ops.iter().enumerate() {
            match *op {
                // SAFETY (pointer arithmetic only): offsets are inside the region; the
                // tests keep buf_off + len <= buf_len.
                Op::Read {
                    offset,
                    buf_off,
                    len,
                } => queue.read(
                    offset,
                    base.wrapping_add(buf_off),
                    len,
                    i,
                    ReqFlags::empty(),
                ),
                Op::Write {
                    offset,
                    buf_off,
                    len,
                } => queue.write(
                    offset,
                    base.wrapping_add(buf_off),
                    len,
                    i,
                    ReqFlags::empty(),
                ),
                Op::Flush => queue.flush(i, ReqFlags::empty()),
                Op::Discard { offset, len } => queue.discard(offset, len, i, ReqFlags::empty()),
                Op::WriteZeroes { offset, len } => {
                    queue.write_zeroes(offset, len, i, ReqFlags::empty())
                }
            }
        }
        let mut results = vec![i32::MIN; ops.len()];
        let mut done = 0;
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..ops.len()).map(|_| MaybeUninit::uninit()).collect();
        while done < ops.len() {
            let mut t = timeout;
            let n = queue.do_io(&mut completions, 1, Some(&mut t), None)?;
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_ref() };
                results[c.user_data] = c.ret;
                done += 1;
            }
        }
        Ok(results)
    }
}

impl BlkClient {
    /// One verified round on queue `q`: writes `blocks` 4 KiB blocks of `pattern(seed)` from
    /// the start of the buffer to `offset` in one batch, zeroes the buffer, reads them back
    /// in one batch and compares. Returns how long the write and the read batch took.
    /// Panics (naming `who` and the seed) on a failed request or a mismatch.
    pub fn verify_round(
        &mut self,
        who: &str,
        q: usize,
        offset: u64,
        blocks: usize,
        seed: u64,
    ) -> (Duration, Duration) {
        const BS: usize = 4096;
        let data = pattern(seed, blocks * BS);
        self.buf()[..data.len()].copy_from_slice(&data);
        let ops = |read: bool| -> Vec<Op> {
            (0..blocks)
                .map(|i| {
                    let (offset, buf_off, len) = (offset + (i * BS) as u64, i * BS, BS);
                    if read {
                        Op::Read {
                            offset,
                            buf_off,
                            len,
                        }
                    } else {
                        Op::Write {
                            offset,
                            buf_off,
                            len,
                        }
                    }
                })
                .collect()
        };
        let t = Instant::now();
        let w = self.run(q, &ops(false));
        let tw = t.elapsed();
        assert!(
            w.iter().all(|&r| r == 0),
            "{who} write {seed} failed: {w:?}"
        );
        self.buf()[..data.len()].fill(0);
        let t = Instant::now();
        let r = self.run(q, &ops(true));
        let tr = t.elapsed();
        assert!(r.iter().all(|&r| r == 0), "{who} read {seed} failed: {r:?}");
        assert!(
            self.buf()[..data.len()] == data[..],
            "{who} data corrupted in round {seed}"
        );
        (tw, tr)
    }
}

/// A deterministic pseudo-random pattern (SplitMix64) for write/verify.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Config text for one blk device.
pub fn blk_config(name: &str, extra: &str) -> String {
    format!("[[device]]\nname = \"{name}\"\nmgmtdev = \"blk\"\n{extra}\n")
}

/// Whether `path` is a file that exists.
pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// A fresh directory under `/var/tmp` (a real disk, never a tmpfs) for disk images that a
/// backend must really do file I/O on (O_DIRECT, hole punching); the caller removes it.
pub fn disk_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let d = PathBuf::from("/var/tmp").join(format!("uvdpa-t-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One `--export type=vhost-user-blk` of a [`Qsd`], on a raw image file.
pub struct QsdExport<'a> {
    /// The socket is `DIR/NAME.sock`.
    pub name: &'a str,
    pub image: &'a Path,
    /// `writable=on`; otherwise the node is also opened `read-only=on`.
    pub writable: bool,
    pub num_queues: u32,
    /// `cache.direct=on` (O_DIRECT on the image).
    pub direct: bool,
}

/// A running `qemu-storage-daemon` serving vhost-user-blk exports: the reference backend
/// that shows a guest test itself is right (the same guest cases must pass against it).
/// Discards punch holes in the image (`discard=unmap`), so discarded ranges read back as
/// zeroes, as they do on uvdpa's backends.
pub struct Qsd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Qsd {
    /// Starts qemu-storage-daemon with `exports` and waits (bounded) for their sockets.
    pub fn start(tag: &str, exports: &[QsdExport]) -> Qsd {
        let dir = unique_dir(tag);
        let log = dir.join("qsd.log");
        let esc = |p: &Path| p.to_str().unwrap().replace(',', ",,");
        let mut cmd = Command::new("qemu-storage-daemon");
        for (i, e) in exports.iter().enumerate() {
            let onoff = |b: bool| if b { "on" } else { "off" };
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=f{i},filename={},cache.direct={},discard=unmap,read-only={}",
                esc(e.image),
                onoff(e.direct),
                onoff(!e.writable)
            ));
            cmd.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e{i},node-name=f{i},addr.type=unix,addr.path={},writable={},num-queues={}",
                esc(&dir.join(format!("{}.sock", e.name))),
                onoff(e.writable),
                e.num_queues
            ));
        }
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn qemu-storage-daemon (scripts/install-deps.sh installs it)");
        let mut q = Qsd {
            child: Some(child),
            dir,
            log,
        };
        let t0 = Instant::now();
        for e in exports {
            while !q.sock(e.name).exists() {
                let exited = q.child.as_mut().unwrap().try_wait().unwrap();
                assert!(
                    exited.is_none() && t0.elapsed() < Duration::from_secs(20),
                    "qemu-storage-daemon: no socket {} ({exited:?}); log:\n{}",
                    q.sock(e.name).display(),
                    q.log_text()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        q
    }

    pub fn sock(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    pub fn sock_str(&self, name: &str) -> String {
        self.sock(name).to_str().unwrap().to_string()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// rust-vmm's vhost-user frontend (`vhost` crate) with the test acting as the virtio driver
/// on a memfd it shares with the device: guest physical addresses start at 0 and the
/// frontend's "virtual" addresses at [`vu::UADDR`] (only the device translates those).
pub mod qemu;
pub mod raw;
pub mod testpmd;
pub mod vduse_guest;

pub mod vu {
    use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use uvdpa_virtio::split::testing::DriverQueue;
    use uvdpa_virtio::{GuestMemory, MemoryRegion};
    use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures as P};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Frontend virtual address of guest physical address 0.
    pub const UADDR: u64 = 0x7f00_0000_0000;
    /// VIRTIO_F_VERSION_1.
    pub const F_VERSION_1: u64 = 1 << 32;
    /// VHOST_USER_F_PROTOCOL_FEATURES.
    pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub const F_INDIRECT_DESC: u64 = 1 << 28;
    /// virtio-blk request types.
    pub const T_IN: u32 = 0;
    /// virtio-blk OUT (write).
    pub const T_OUT: u32 = 1;

    /// A connected frontend with its memory table set.
    pub struct VuGuest {
        pub fe: Frontend,
        pub mem: Arc<GuestMemory>,
        pub mem_size: u64,
        _fd: OwnedFd,
    }

    /// One started vring and the driver's view of it.
    pub struct VuRing {
        pub index: usize,
        pub dq: DriverQueue,
        pub call: EventFd,
        pub kick: EventFd,
        pub err: EventFd,
    }

    impl VuGuest {
        /// Connects, negotiates VERSION_1 | PROTOCOL_FEATURES | `extra_features` and the
        /// MQ, REPLY_ACK and CONFIG protocol features, asks an ack for every request from
        /// then on, and sets a one-region memory table of `mem_size` bytes (a sparse memfd).
        pub fn connect(
            sock: &Path,
            queues: u64,
            mem_size: u64,
            extra_features: u64,
        ) -> Result<Self, vhost::Error> {
            let mut fe = Frontend::connect(sock, queues)?;
            fe.set_owner()?;
            let offered = fe.get_features()?;
            let want = F_VERSION_1 | F_PROTOCOL_FEATURES | extra_features;
            assert_eq!(offered & want, want, "features {want:#x} not all offered");
            fe.set_features(want)?;
            let pf = fe.get_protocol_features()?;
            let proto = P::MQ | P::REPLY_ACK | P::CONFIG;
            assert!(
                pf.contains(proto),
                "protocol features {proto:?} not offered"
            );
            fe.set_protocol_features(proto)?;
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC)
                .expect("memfd_create");
            rustix::fs::ftruncate(&fd, mem_size).expect("ftruncate guest memfd");
            let mem = Arc::new(
                GuestMemory::new(vec![MemoryRegion::map(&fd, 0, mem_size, UADDR, 0)
                    .expect("map guest memory in the test")])
                .expect("guest memory"),
            );
            fe.set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: mem_size,
                userspace_addr: UADDR,
                mmap_offset: 0,
                mmap_handle: fd.as_raw_fd(),
            }])?;
            Ok(Self {
                fe,
                mem,
                mem_size,
                _fd: fd,
            })
        }

        /// The memfd behind the guest memory (shared with the device), for tests that
        /// misbehave with it (truncate it under the device).
        pub fn memfd(&self) -> BorrowedFd<'_> {
            use std::os::fd::AsFd;
            self._fd.as_fd()
        }

        /// Lays out a ring of `size` at guest address `base` and starts vring `index` on
        /// it (num, addr, base 0, call, err, kick, enable), with an error eventfd.
        pub fn ring(&mut self, index: usize, base: u64, size: u16) -> Result<VuRing, vhost::Error> {
            let dq = DriverQueue::new(self.mem.clone(), base, size);
            let new_fd = |flags| EventFd::new(flags).expect("eventfd");
            let (call, kick, err) = (new_fd(EFD_NONBLOCK), new_fd(0), new_fd(EFD_NONBLOCK));
            self.fe.set_vring_num(index, size)?;
            self.fe.set_vring_addr(
                index,
                &VringConfigData {
                    queue_max_size: size,
                    queue_size: size,
                    flags: 0,
                    desc_table_addr: UADDR + dq.desc,
                    used_ring_addr: UADDR + dq.used,
                    avail_ring_addr: UADDR + dq.avail,
                    log_addr: None,
                },
            )?;
            self.fe.set_vring_base(index, 0)?;
            self.fe.set_vring_call(index, &call)?;
            self.fe.set_vring_err(index, &err)?;
            self.fe.set_vring_kick(index, &kick)?;
            self.fe.set_vring_enable(index, true)?;
            Ok(VuRing {
                index,
                dq,
                call,
                kick,
                err,
            })
        }
    }

    /// Waits up to `timeout` for `fd` to become readable; reads (resets) it if so.
    pub fn wait_event(fd: &EventFd, timeout: Duration) -> bool {
        // SAFETY: the EventFd outlives this borrow of its fd.
        let b = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        let mut fds = [PollFd::new(&b, PollFlags::IN)];
        let t = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        loop {
            match poll(&mut fds, Some(&t)) {
                Ok(0) => return false,
                Ok(_) => {
                    let _ = fd.read();
                    return true;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => panic!("poll on an eventfd: {e}"),
            }
        }
    }

    impl VuRing {
        /// Notifies the device.
        pub fn kick(&self) {
            self.kick.write(1).expect("kick");
        }

        /// Puts a virtio-blk request on the ring (header at `hdr`, status byte at
        /// `hdr + 0x80` preset to 0xff, optional data buffer) without publishing it;
        /// returns (head, status address).
        pub fn blk_request(
            &mut self,
            t: u32,
            sector: u64,
            data: Option<(u64, u32, bool)>,
            hdr: u64,
        ) -> (u16, u64) {
            let status = hdr + 0x80;
            let mut h = t.to_le_bytes().to_vec();
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&sector.to_le_bytes());
            self.dq.mem.write(hdr, &h).unwrap();
            self.dq.mem.write(status, &[0xff]).unwrap();
            let mut bufs = vec![(hdr, 16, false)];
            bufs.extend(data);
            bufs.push((status, 1, true));
            (self.dq.add_chain(&bufs), status)
        }

        /// The byte at guest address `at`.
        pub fn byte(&self, at: u64) -> u8 {
            let mut b = [0u8];
            self.dq.mem.read(at, &mut b).unwrap();
            b[0]
        }

        /// Waits (bounded) for the next used entry.
        pub fn wait_used(&mut self, timeout: Duration) -> Option<(u32, u32)> {
            let t0 = Instant::now();
            loop {
                if let Some(u) = self.dq.pop_used() {
                    return Some(u);
                }
                let left = timeout.saturating_sub(t0.elapsed());
                if left.is_zero() {
                    return None;
                }
                wait_event(&self.call, left.min(Duration::from_millis(100)));
            }
        }

        /// Writes `data` at `sector` and reads it back through this ring (buffers at guest
        /// addresses `buf` and `buf + data.len()`, headers at `hdr`); panics naming `what`
        /// unless both complete with VIRTIO_BLK_S_OK and the data matches.
        pub fn write_read_verify(
            &mut self,
            what: &str,
            sector: u64,
            data: &[u8],
            buf: u64,
            hdr: u64,
        ) {
            let len = data.len() as u32;
            self.dq.mem.write(buf, data).unwrap();
            let (h, st) = self.blk_request(T_OUT, sector, Some((buf, len, false)), hdr);
            self.dq.publish();
            self.kick();
            let used = self.wait_used(Duration::from_secs(10));
            assert_eq!(used, Some((u32::from(h), 1)), "{what}: write not completed");
            assert_eq!(self.byte(st), 0, "{what}: write status");
            let back_at = buf + u64::from(len);
            self.dq.mem.write(back_at, &vec![0u8; data.len()]).unwrap();
            let (h, st) = self.blk_request(T_IN, sector, Some((back_at, len, true)), hdr + 0x100);
            self.dq.publish();
            self.kick();
            let used = self.wait_used(Duration::from_secs(10));
            assert_eq!(
                used,
                Some((u32::from(h), len + 1)),
                "{what}: read not completed"
            );
            assert_eq!(self.byte(st), 0, "{what}: read status");
            let mut back = vec![0u8; data.len()];
            self.dq.mem.read(back_at, &mut back).unwrap();
            assert!(
                back == data,
                "{what}: data read back differs from data written"
            );
        }
    }
}
