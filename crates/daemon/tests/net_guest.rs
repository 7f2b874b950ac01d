//! A Linux guest (QEMU, TCG) on uvdpa virtio-net devices, through the guest kit in
//! `tests/guest/` (`run-guest.sh --vhost-user-net`, `uvdpa.mode=ping`):
//! - a `tap` device whose TAP is moved into a private network namespace: the guest pings
//!   the host side of the TAP (split rings; and packed rings with jumbo frames);
//! - a `switch`: the guest and `dpdk-testpmd` (`net_virtio_user`, `icmpecho` forwarding,
//!   which answers ARP and ICMP echo) on two devices of one in-daemon switch.
//!
//! Needs root (network namespaces, TAPs) and QEMU like `qemu_guest.rs`. The guests run one
//! at a time (the machine has few cores); every namespace, TAP, QEMU and testpmd is removed
//! again however a test ends.

mod common;

use common::testpmd::{Testpmd, TestpmdOpts};
use common::{build_initramfs, guest_dir, Daemon};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The guest's address and the host side's, in the namespace.
const GUEST_IP: &str = "10.77.0.2";
const HOST_IP: &str = "10.77.0.1";

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

/// A daemon serving one net device `name` with `attrs` (TOML lines).
fn net_daemon(tag: &str, devices: &[(&str, &str)]) -> Daemon {
    let mut cfg = String::new();
    for (name, attrs) in devices {
        cfg.push_str(&format!(
            "[[device]]\nname = \"{name}\"\nmgmtdev = \"net\"\n{attrs}\n"
        ));
    }
    let names: Vec<&str> = devices.iter().map(|(n, _)| *n).collect();
    Daemon::start(tag, &cfg, &names)
}

/// A guest on uvdpa `tap` device pings the TAP's host side, which sits in a fresh
/// namespace. Returns (exit code, console, daemon) with the daemon still running.
fn ping_over_uvdpa_tap(
    device_attrs: &str,
    run_args: &[&str],
    append: &str,
    host_mtu: Option<u32>,
) -> (i32, String, Daemon, NetNs) {
    let tap = unique_name("uvt");
    let d = net_daemon(
        "ntap",
        &[(
            "n0",
            &format!("backend = \"tap\"\ntap = \"{tap}\"\n{device_attrs}"),
        )],
    );
    let net = NetNs::new(&tap);
    net.up(&format!("{HOST_IP}/24"), host_mtu);
    let sock = d.dir.join("n0.sock");
    let sock = sock.to_str().unwrap();
    let append = format!("uvdpa.ip={GUEST_IP}/24 uvdpa.peer={HOST_IP} {append}");
    let mut args = vec![
        "--vhost-user-net",
        sock,
        "--mode",
        "ping",
        "--timeout",
        "45",
    ];
    args.extend_from_slice(run_args);
    args.extend_from_slice(&["--append", &append]);
    let guest = Guest::spawn(&args);
    let (code, console) = guest.finish(Duration::from_secs(55));
    (code, console, d, net)
}

/// Ends the daemon (closing its TAP), then deletes the namespace.
fn teardown(d: Daemon, net: NetNs) {
    drop(d);
    net.close();
}

#[test]
fn guest_pings_the_host_through_a_uvdpa_tap_device() {
    let _g = one_guest();
    let t0 = Instant::now();
    let (code, console, d, net) = ping_over_uvdpa_tap("", &[], "uvdpa.count=5", None);
    let line = result_line(&console);
    let rx = d.vstat("n0", 0, "packets");
    let tx = d.vstat("n0", 1, "packets");
    teardown(d, net);
    assert_eq!(code, 0, "guest failed: {line}\n{console}");
    assert!(line.starts_with("UVDPA-GUEST-RESULT: PASS"), "{line}");
    assert_eq!(num(&line, "received"), 5, "{line}");
    assert_eq!(num(&line, "transmitted"), 5, "{line}");
    let info = info_line(&console);
    assert_eq!(num(&info, "rx_errors"), 0, "{info}");
    // The device saw at least the echo requests and replies (plus ARP).
    assert!(tx >= 5 && rx >= 5, "device counters rx={rx} tx={tx}");
    eprintln!(
        "uvdpa tap ping: {line} ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
}

/// Two queue pairs: a multi-queue TAP (one fd per pair), VIRTIO_NET_F_MQ negotiated by the
/// guest's driver, which with 2 vCPUs brings both pairs up.
#[test]
fn guest_pings_over_two_queue_pairs_on_a_multiqueue_uvdpa_tap() {
    let _g = one_guest();
    let t0 = Instant::now();
    let (code, console, d, net) = ping_over_uvdpa_tap(
        "queue_pairs = 2",
        &["--net-queues", "2", "--smp", "2"],
        "uvdpa.count=5",
        None,
    );
    let line = result_line(&console);
    let tx: u64 = [1, 3].iter().map(|&q| d.vstat("n0", q, "packets")).sum();
    let log = d.log_text();
    teardown(d, net);
    // QEMU sends the memory regions once per queue pair (ADD_MEM_REG): the repeats are
    // references to the same regions, not overlaps that refuse the table.
    assert!(
        !log.contains("overlap") && !log.contains("Request failed"),
        "memory table refused:\n{log}"
    );
    assert_eq!(code, 0, "guest failed: {line}\n{console}");
    assert_eq!(num(&line, "received"), 5, "{line}");
    assert_eq!(num(&line, "queues"), 2, "{line}");
    let info = info_line(&console);
    let features = field(&info, "features").unwrap_or("");
    assert!(
        features.split(',').any(|f| f == "mq"),
        "mq not negotiated: {info}"
    );
    assert!(tx >= 5, "device transmit counters {tx}");
    eprintln!(
        "uvdpa 2-pair tap ping: {line} ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
}

/// Big frames over packed rings: MTU 9000 on the device, the guest and the host side,
/// 8000-byte pings (each frame spread over mergeable receive buffers), a MAC set on the
/// device and checked in the guest.
#[test]
fn guest_pings_with_jumbo_frames_over_packed_rings_on_a_uvdpa_tap() {
    let _g = one_guest();
    let t0 = Instant::now();
    let mac = "02:75:76:64:70:61";
    let (code, console, d, net) = ping_over_uvdpa_tap(
        &format!("mtu = 9000\nmac = \"{mac}\""),
        &["--packed", "--net-mac", mac],
        &format!("uvdpa.mtu=9000 uvdpa.size=8000 uvdpa.count=8 uvdpa.mac={mac}"),
        Some(9000),
    );
    let line = result_line(&console);
    teardown(d, net);
    assert_eq!(code, 0, "guest failed: {line}\n{console}");
    assert_eq!(num(&line, "received"), 8, "{line}");
    assert_eq!(field(&line, "mtu"), Some("9000"), "{line}");
    let info = info_line(&console);
    assert_eq!(field(&info, "mac"), Some(mac), "{info}");
    let features = field(&info, "features").unwrap_or("");
    assert!(
        features.split(',').any(|f| f == "packed") && features.split(',').any(|f| f == "mrg_rxbuf"),
        "packed and mrg_rxbuf not negotiated: {info}"
    );
    assert!(num(&info, "rx_bytes") >= 8 * 8042, "{info}");
    eprintln!(
        "uvdpa jumbo ping: {line} ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
}

/// QEMU's `host_mtu=9000` on a device with the default MTU 1500: the guest takes MTU 9000
/// from QEMU's config space (VIRTIO_NET_F_MTU), QEMU hands it to uvdpa with
/// VHOST_USER_NET_SET_MTU, and 8000-byte pings go through instead of being dropped as
/// oversized (issue #9, failure 4).
#[test]
fn guest_with_qemu_host_mtu_9000_on_a_default_mtu_device_sends_jumbo_frames() {
    let _g = one_guest();
    let (code, console, d, net) = ping_over_uvdpa_tap(
        "",
        &["--net-host-mtu", "9000"],
        "uvdpa.size=8000 uvdpa.count=5",
        Some(9000),
    );
    let line = result_line(&console);
    let tx_drops = d.vstat("n0", 1, "drops");
    let log = d.log_text();
    teardown(d, net);
    assert_eq!(
        code, 0,
        "guest failed: {line}\n{console}\ndaemon log:\n{log}"
    );
    assert_eq!(num(&line, "received"), 5, "{line}");
    assert_eq!(field(&line, "mtu"), Some("9000"), "{line}");
    assert_eq!(tx_drops, 0, "frames dropped as oversized");
    assert!(log.contains("frontend MTU set"), "no NET_SET_MTU: {log}");
}

/// The FAIL path with a uvdpa device: nobody answers at the peer address, so the guest
/// gives up after `uvdpa.wait` seconds and reports FAIL (exit 1), not a timeout.
#[test]
fn guest_ping_fails_when_the_peer_does_not_answer() {
    let _g = one_guest();
    let (code, console, d, net) =
        ping_over_uvdpa_tap("", &[], "uvdpa.peer=10.77.0.9 uvdpa.wait=2", None);
    teardown(d, net);
    let line = result_line(&console);
    assert_eq!(code, 1, "expected FAIL: {line}\n{console}");
    assert!(
        line.starts_with("UVDPA-GUEST-RESULT: FAIL no reply from 10.77.0.9 within 2s"),
        "{line}"
    );
}

/// The guest and `dpdk-testpmd` on two net devices of one uvdpa `switch`: testpmd's
/// `icmpecho` forwarding answers the guest's ARP and ICMP echo requests, so every ping
/// crosses the switch both ways. No host networking is involved.
#[test]
fn guest_and_testpmd_exchange_frames_through_a_uvdpa_switch() {
    let _g = one_guest();
    let t0 = Instant::now();
    let d = net_daemon(
        "nsw",
        &[
            ("g0", "backend = \"switch\"\nswitch = \"sw0\""),
            ("p0", "backend = \"switch\"\nswitch = \"sw0\""),
        ],
    );
    let mut pmd = Testpmd::spawn(TestpmdOpts {
        vdev: format!(
            "net_virtio_user0,path={},queues=1",
            d.dir.join("p0.sock").display()
        ),
        core: 0,
        fwd_mode: "icmpecho",
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("testpmd did not start: {e}"));
    pmd.start().unwrap();
    let append = format!("uvdpa.ip={GUEST_IP}/24 uvdpa.peer={HOST_IP} uvdpa.count=10");
    let sock = d.dir.join("g0.sock");
    let guest = Guest::spawn(&[
        "--vhost-user-net",
        sock.to_str().unwrap(),
        "--mode",
        "ping",
        "--timeout",
        "45",
        "--append",
        &append,
    ]);
    let (code, console) = guest.finish(Duration::from_secs(55));
    // p0's receive queue (qidx 0) carried the guest's requests to testpmd, its transmit
    // queue (qidx 1) testpmd's replies.
    let p0_rx = d.vstat("p0", 0, "packets");
    let p0_tx = d.vstat("p0", 1, "packets");
    if code != 0 {
        eprintln!("dpdk-testpmd log:\n{}", pmd.log_tail(60));
    }
    drop(pmd);
    drop(d);
    let line = result_line(&console);
    assert_eq!(code, 0, "guest failed: {line}\n{console}");
    assert_eq!(num(&line, "received"), 10, "{line}");
    assert!(
        p0_rx >= 10 && p0_tx >= 10,
        "testpmd device counters rx={p0_rx} tx={p0_tx}"
    );
    eprintln!(
        "uvdpa switch ping: {line} ({:.1}s)",
        t0.elapsed().as_secs_f64()
    );
}
