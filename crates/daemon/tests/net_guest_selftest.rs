//! Self-test of the guest kit's network side (`tests/guest/`), without uvdpa: the test
//! guest's `uvdpa.mode=ping` and `uvdpa.mode=responder` against QEMU's own virtio-net on a
//! TAP (`run-guest.sh --tap-net`), the TAP moved into a private network namespace with
//! `netns.sh`, and `run-guest.sh --vhost-user-net` against DPDK's vhost-user-net backend
//! (`dpdk-testpmd`, forwarding to a DPDK TAP in a namespace; skipped if testpmd is not
//! installed). This proves the kit that uvdpa's own virtio-net tests use with
//! `--vhost-user-net` on uvdpa's socket.
//!
//! Needs root (network namespaces, TAPs) and QEMU like `qemu_guest.rs`. The guests run one
//! at a time (the machine has few cores); every namespace, TAP, QEMU and testpmd is removed
//! again however a test ends.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The guest's address and the host side's, in the namespace.
const GUEST_IP: &str = "10.77.0.2";
const HOST_IP: &str = "10.77.0.1";

fn guest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest")
}

static BUILD: Once = Once::new();

/// Builds the initramfs once per test process.
fn build_initramfs() {
    BUILD.call_once(|| {
        let st = Command::new("bash")
            .arg(guest_dir().join("build-initramfs.sh"))
            .stdout(Stdio::null())
            .status()
            .expect("run build-initramfs.sh (needs linux-image-amd64, busybox-static)");
        assert!(st.success(), "building the guest initramfs failed");
    });
}

static ONE_GUEST: Mutex<()> = Mutex::new(());

/// Serializes the tests' guests (one QEMU at a time) and checks the prerequisites.
fn one_guest() -> MutexGuard<'static, ()> {
    let g = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests create network namespaces and TAPs: run them as root"
    );
    assert!(Path::new("/dev/net/tun").exists(), "no /dev/net/tun");
    build_initramfs();
    g
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, at most 15 bytes with `prefix` of 3 bytes
/// (the limit of an interface name).
fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 1_000_000)
}

fn run(cmd: &mut Command) -> (bool, String) {
    match cmd.output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => (false, format!("{cmd:?}: {e}")),
    }
}

/// A network namespace holding the host end (a TAP) of a guest's NIC. Dropping it
/// deletes the namespace (and so the TAP inside) and a TAP left outside.
struct NetNs {
    ns: String,
    tap: String,
}

impl NetNs {
    fn new(tap: &str) -> NetNs {
        NetNs {
            ns: format!("uvdpa-kit-{}", unique_name("")),
            tap: tap.to_string(),
        }
    }

    /// `netns.sh up`: waits for the TAP, moves it into the namespace, sets the address
    /// (and MTU) and brings it up.
    fn up(&self, addr: &str, mtu: Option<u32>) {
        let mut cmd = Command::new("bash");
        cmd.arg(guest_dir().join("netns.sh"))
            .args(["up", &self.ns, &self.tap, addr]);
        if let Some(m) = mtu {
            cmd.arg(m.to_string());
        }
        let (ok, out) = run(&mut cmd);
        assert!(ok, "netns.sh up {} {} failed: {out}", self.ns, self.tap);
    }

    /// Runs `args` inside the namespace.
    fn exec(&self, args: &[&str]) -> (bool, String) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args))
    }

    fn ns_exists(&self) -> bool {
        let (_, out) = run(Command::new("ip").args(["netns", "list"]));
        out.lines()
            .any(|l| l.split_whitespace().next() == Some(&self.ns))
    }

    fn tap_in_root_ns(&self) -> bool {
        Path::new("/sys/class/net").join(&self.tap).exists()
    }

    /// `netns.sh down`, and removes the TAP if it never made it into the namespace.
    fn cleanup(&self) -> Result<(), String> {
        let (ok, out) = run(Command::new("bash")
            .arg(guest_dir().join("netns.sh"))
            .args(["down", &self.ns]));
        if self.tap_in_root_ns() {
            let _ = run(Command::new("ip").args(["link", "del", &self.tap]));
        }
        if !ok || self.ns_exists() {
            return Err(format!("namespace {} not deleted: {out}", self.ns));
        }
        if self.tap_in_root_ns() {
            return Err(format!("TAP {} still exists", self.tap));
        }
        Ok(())
    }

    /// Cleans up now and checks that nothing is left.
    fn close(self) {
        let r = self.cleanup();
        std::mem::forget(self);
        r.unwrap();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Collects what `r` produces into `buf` on a thread.
fn collect(mut r: impl Read + Send + 'static, buf: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    })
}

/// A `run-guest.sh` run. Dropping it kills QEMU (by the pid in its pidfile) and the
/// script.
struct Guest {
    child: Child,
    pidfile: PathBuf,
    out: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Guest {
    fn spawn(args: &[&str]) -> Guest {
        let pidfile = std::env::temp_dir().join(format!("{}.qemu.pid", unique_name("uvk")));
        let mut child = Command::new("bash")
            .arg(guest_dir().join("run-guest.sh"))
            .args(args)
            .arg("--qemu-pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run run-guest.sh");
        let out = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), out.clone()),
            collect(child.stderr.take().unwrap(), out.clone()),
        ];
        Guest {
            child,
            pidfile,
            out,
            readers,
        }
    }

    /// Waits up to `limit` for the run to end: (exit code, console + messages); -1 if
    /// it had to be killed.
    fn finish(mut self, limit: Duration) -> (i32, String) {
        let t0 = Instant::now();
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code().unwrap_or(-1);
            }
            if t0.elapsed() > limit {
                self.kill();
                break -1;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = self.out.lock().unwrap().clone();
        (code, out)
    }

    fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = run(Command::new("kill").args(["-KILL", pid.trim()]));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

/// The `UVDPA-GUEST-RESULT:` line.
fn result_line(console: &str) -> String {
    console
        .lines()
        .find(|l| l.starts_with("UVDPA-GUEST-RESULT:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The `UVDPA-GUEST-INFO:` line.
fn info_line(console: &str) -> String {
    console
        .lines()
        .find(|l| l.starts_with("UVDPA-GUEST-INFO:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The value of `key=` in `line`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}= in: {line}"))
}

/// Runs one ping guest on QEMU's virtio-net over a TAP whose host end is `HOST_IP` in a
/// fresh namespace. Returns (exit code, console).
fn ping_over_tap(run_args: &[&str], append: &str, host_mtu: Option<u32>) -> (i32, String) {
    let tap = unique_name("uvk");
    let net = NetNs::new(&tap);
    let append = format!("uvdpa.ip={GUEST_IP}/24 uvdpa.peer={HOST_IP} {append}");
    let mut args = vec!["--tap-net", &tap, "--mode", "ping", "--timeout", "45"];
    args.extend_from_slice(run_args);
    args.extend_from_slice(&["--append", &append]);
    let guest = Guest::spawn(&args);
    // QEMU creates the TAP in this namespace; netns.sh waits for it and moves it. The
    // guest retries its first ping until the host side is there.
    net.up(&format!("{HOST_IP}/24"), host_mtu);
    let r = guest.finish(Duration::from_secs(55));
    net.close();
    r
}

#[test]
fn guest_pings_the_host_over_qemu_tap_in_a_netns() {
    let _g = one_guest();
    let t0 = Instant::now();
    let (code, console) = ping_over_tap(&[], "uvdpa.count=5", None);
    let line = result_line(&console);
    assert_eq!(code, 0, "guest failed: {line}\n{console}");
    assert!(line.starts_with("UVDPA-GUEST-RESULT: PASS"), "{line}");
    assert_eq!(num(&line, "received"), 5, "{line}");
    assert_eq!(num(&line, "transmitted"), 5, "{line}");
    assert_eq!(field(&line, "mtu"), Some("1500"), "{line}");
    let info = info_line(&console);
    assert!(num(&info, "rx_packets") >= 5, "{info}");
    assert!(num(&info, "tx_packets") >= 5, "{info}");
    assert_eq!(num(&info, "rx_errors"), 0, "{info}");
    // The first reply + 5 (+ late replies to first tries that gave up waiting).
    assert!(num(&info, "in_echoreps") >= 6, "{info}");
    eprintln!("tap ping: {line} ({:.1}s)", t0.elapsed().as_secs_f64());
}

/// Big frames: MTU 9000 on both ends and 8000-byte pings (one frame each way, received
/// into mergeable buffers), packed virtqueues, and a MAC set on the QEMU command line and
/// checked in the guest.
#[test]
fn guest_pings_with_jumbo_frames_packed_rings_and_a_set_mac() {
    let _g = one_guest();
    let t0 = Instant::now();
    let mac = "52:54:00:4b:49:54";
    let (code, console) = ping_over_tap(
        &["--packed", "--net-mac", mac],
        &format!("uvdpa.mtu=9000 uvdpa.size=8000 uvdpa.count=8 uvdpa.mac={mac}"),
        Some(9000),
    );
    let line = result_line(&console);
    assert_eq!(code, 0, "guest failed: {line}\n{console}");
    assert_eq!(num(&line, "received"), 8, "{line}");
    assert_eq!(field(&line, "mtu"), Some("9000"), "{line}");
    assert_eq!(field(&line, "size"), Some("8000"), "{line}");
    let info = info_line(&console);
    assert_eq!(field(&info, "mac"), Some(mac), "{info}");
    let features = field(&info, "features").unwrap_or("");
    assert!(
        features.split(',').any(|f| f == "packed") && features.split(',').any(|f| f == "mrg_rxbuf"),
        "packed and mrg_rxbuf not negotiated: {info}"
    );
    // 8 replies of 8028-byte IP packets (8042-byte frames), unfragmented.
    assert!(num(&info, "rx_bytes") >= 8 * 8042, "{info}");
    eprintln!("jumbo ping: {line} ({:.1}s)", t0.elapsed().as_secs_f64());
}

/// The FAIL path: nobody answers at the peer address, so the guest gives up after
/// `uvdpa.wait` seconds and reports FAIL (exit 1), not a timeout.
#[test]
fn guest_ping_fails_when_the_peer_does_not_answer() {
    let _g = one_guest();
    let t0 = Instant::now();
    let (code, console) = ping_over_tap(&[], "uvdpa.peer=10.77.0.9 uvdpa.wait=2", None);
    let line = result_line(&console);
    assert_eq!(code, 1, "expected FAIL: {line}\n{console}");
    assert!(
        line.starts_with("UVDPA-GUEST-RESULT: FAIL no reply from 10.77.0.9 within 2s"),
        "{line}"
    );
    eprintln!("fail path: {line} ({:.1}s)", t0.elapsed().as_secs_f64());
}

/// `uvdpa.mode=responder`: the guest stays up answering pings; a host process pings it
/// from the namespace.
#[test]
fn guest_responder_answers_pings_from_the_netns() {
    let _g = one_guest();
    let t0 = Instant::now();
    let tap = unique_name("uvk");
    let net = NetNs::new(&tap);
    // It stays up 4 s (guest time) after setting its address; the host's first
    // successful ping comes at most about 1 s after that.
    let append = format!("uvdpa.ip={GUEST_IP}/24 uvdpa.secs=4");
    let guest = Guest::spawn(&[
        "--tap-net",
        &tap,
        "--mode",
        "responder",
        "--timeout",
        "45",
        "--append",
        &append,
    ]);
    net.up(&format!("{HOST_IP}/24"), None);
    // Wait until the guest answers (it boots meanwhile), then 4 more pings. The host has
    // no ping binary of its own; busybox's does.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tries = 0;
    loop {
        tries += 1;
        let (ok, _) = net.exec(&["busybox", "ping", "-c", "1", "-W", "1", GUEST_IP]);
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guest never answered ({tries} tries)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, ping) = net.exec(&["busybox", "ping", "-c", "4", "-A", "-W", "2", GUEST_IP]);
    assert!(
        ok && ping.contains("4 packets transmitted, 4 packets received"),
        "host ping: {ping}"
    );
    let (code, console) = guest.finish(Duration::from_secs(40));
    net.close();
    let line = result_line(&console);
    assert_eq!(code, 0, "guest failed: {line}\n{console}");
    assert!(num(&line, "echo_requests") >= 5, "{line}");
    assert!(num(&line, "echo_replies") >= 5, "{line}");
    eprintln!(
        "responder: {line} after {tries} host tries ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
}

/// `dpdk-testpmd` forwarding between a vhost-user-net server port and a DPDK TAP.
/// Dropping it ends testpmd (EOF on its stdin, then SIGKILL).
struct TestPmd {
    child: Child,
    stdin: Option<ChildStdin>,
    log: Arc<Mutex<String>>,
    /// DPDK's (empty, with `--no-shconf`) runtime directory for our `--file-prefix`.
    run_dir: PathBuf,
}

impl Drop for TestPmd {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let d = std::env::temp_dir().join(unique_name("uvdpa-kit-"));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|f| f.is_file())
    })
}

/// `run-guest.sh --vhost-user-net` (the option uvdpa's tests use) against a vhost-user-net
/// backend nobody here wrote: DPDK's, in testpmd, with 2 queue pairs and packed rings.
#[test]
fn guest_pings_through_dpdk_vhost_user_net() {
    let Some(testpmd) = find_in_path("dpdk-testpmd") else {
        eprintln!("SKIP: no dpdk-testpmd in PATH (Debian package dpdk)");
        return;
    };
    let _g = one_guest();
    let t0 = Instant::now();
    let tap = unique_name("uvk");
    let net = NetNs::new(&tap);
    let dir = TempDir::new();
    let sock = dir.0.join("vhost-net.sock");
    let prefix = unique_name("uvdpa-kit-");
    // --no-huge: no hugepages needed (the vhost PMD maps the guest's memfd);
    // --no-shconf: no shared config files (only an empty /var/run/dpdk/PREFIX).
    let mut child = Command::new(testpmd)
        .args(["-l", "0,1", "--no-huge", "-m", "256", "--no-pci"])
        .args(["--no-shconf", "--file-prefix", &prefix])
        .arg("--vdev")
        .arg(format!("net_vhost0,iface={},queues=2", sock.display()))
        .arg("--vdev")
        .arg(format!("net_tap0,iface={tap}"))
        .args([
            "--",
            "--forward-mode=io",
            "--auto-start",
            "--stats-period",
            "0",
        ])
        .args(["--total-num-mbufs=8192", "--rxq=2", "--txq=2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dpdk-testpmd");
    let log = Arc::new(Mutex::new(String::new()));
    collect(child.stdout.take().unwrap(), log.clone());
    collect(child.stderr.take().unwrap(), log.clone());
    let stdin = child.stdin.take();
    let mut pmd = TestPmd {
        child,
        stdin,
        log,
        run_dir: Path::new("/var/run/dpdk").join(&prefix),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(sock.exists() && Path::new("/sys/class/net").join(&tap).exists()) {
        let exited = pmd.child.try_wait().ok().flatten();
        assert!(
            Instant::now() < deadline && exited.is_none(),
            "testpmd did not come up (exit: {exited:?}):\n{}",
            pmd.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    net.up(&format!("{HOST_IP}/24"), None);
    let append =
        format!("uvdpa.ip={GUEST_IP}/24 uvdpa.peer={HOST_IP} uvdpa.count=10 uvdpa.size=1400");
    let sock_s = sock.to_str().unwrap();
    let guest = Guest::spawn(&[
        "--vhost-user-net",
        sock_s,
        "--net-queues",
        "2",
        "--smp",
        "2",
        "--packed",
        "--mode",
        "ping",
        "--timeout",
        "45",
        "--append",
        &append,
    ]);
    let (code, console) = guest.finish(Duration::from_secs(55));
    pmd_log_on_failure(code, pmd);
    net.close();
    let line = result_line(&console);
    assert_eq!(code, 0, "guest failed: {line}\n{console}");
    assert_eq!(num(&line, "received"), 10, "{line}");
    assert_eq!(num(&line, "queues"), 2, "{line}");
    let info = info_line(&console);
    let features = field(&info, "features").unwrap_or("");
    assert!(
        ["mq", "packed", "mrg_rxbuf"]
            .iter()
            .all(|f| features.split(',').any(|x| x == *f)),
        "mq/packed/mrg_rxbuf not negotiated: {info}"
    );
    eprintln!(
        "dpdk vhost-user-net: {line} ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
}

/// Ends testpmd; on a guest failure prints its log (the guest's assert comes later).
fn pmd_log_on_failure(code: i32, pmd: TestPmd) {
    let log = pmd.log.clone();
    drop(pmd);
    if code != 0 {
        eprintln!("dpdk-testpmd log:\n{}", log.lock().unwrap());
    }
}
