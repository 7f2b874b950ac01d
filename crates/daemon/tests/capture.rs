//! `uvdpa dev capture` (live capture, pdump-like, from a secondary) of a `loopback` net
//! device driven by `dpdk-testpmd` (`net_virtio_user`): the pcapng it writes is read back
//! by `tcpdump -r` (Debian `tcpdump`) and by the `pcap-file` crate, and must hold exactly
//! the frames testpmd sent and uvdpa counted; a capture CLI killed with SIGKILL leaves
//! nothing in `res show` and the device keeps forwarding.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::testpmd::{Testpmd, TestpmdOpts};
use common::{uvdpa_bin, Daemon};
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
use pcap_file::pcapng::{Block, PcapNgReader};

const FRAME: u16 = 64;

fn loopback_daemon(tag: &str) -> Daemon {
    Daemon::start(
        tag,
        "[[device]]\nname = \"net0\"\nmgmtdev = \"net\"\nbackend = \"loopback\"\n\
         queue_pairs = 1\nqueue_size = 1024\n",
        &["net0"],
    )
}

fn testpmd(d: &Daemon, mode: &str) -> Testpmd {
    Testpmd::spawn(TestpmdOpts {
        vdev: format!(
            "net_virtio_user0,path={},queues=1,queue_size=256",
            d.sock("net0").display()
        ),
        core: 0,
        fwd_mode: mode,
        txpkts: Some(FRAME),
        nb_queues: 1,
        extra_eal: vec![],
        extra_app: vec![],
    })
    .unwrap_or_else(|e| panic!("testpmd did not start: {e}"))
}

/// A running `uvdpa dev capture`, and its stderr lines.
struct CaptureCli {
    child: Child,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl CaptureCli {
    fn spawn(d: &Daemon, args: &[&str], stdout: Stdio) -> CaptureCli {
        let mut child = Command::new(uvdpa_bin())
            .arg("--ctl")
            .arg(d.dir.join("uvdpa.ctl"))
            .args(["dev", "capture", "net0"])
            .args(args)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn uvdpa dev capture");
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut c = CaptureCli {
            child,
            stderr: rx,
            seen: Vec::new(),
        };
        c.wait_line("capturing on", Duration::from_secs(10));
        c
    }

    fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "capture CLI printed no {needle:?} within {timeout:?}; stderr: {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits (bounded) for the CLI to exit by itself; returns its summary line.
    fn wait_exit(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let summary = self.wait_line("frames captured", Duration::from_secs(5));
                assert!(
                    st.success(),
                    "capture CLI failed: {st}; stderr: {:?}",
                    self.seen
                );
                return summary;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "capture CLI still running after {timeout:?}; stderr: {:?}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CaptureCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tcpdump -r FILE -n -e`: one line per frame; returns the frame lengths it printed.
fn tcpdump_lengths(text: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            // With -e the first "length N" is the frame's.
            let at = l
                .find("length ")
                .unwrap_or_else(|| panic!("no length in {l:?}"));
            let n: String = l[at + 7..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            n.parse().unwrap_or_else(|_| panic!("bad length in {l:?}"))
        })
        .collect()
}

fn tcpdump_file(path: &Path) -> Vec<u64> {
    let out = Command::new("tcpdump")
        .args(["-r"])
        .arg(path)
        .args(["-n", "-e"])
        .output()
        .expect("run tcpdump (Debian package tcpdump: scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "tcpdump -r failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tcpdump_lengths(&String::from_utf8_lossy(&out.stdout))
}

/// Frames per interface id and their direction flags, read with the pcap-file crate.
fn pcapng_by_interface(path: &Path) -> (Vec<String>, Vec<(u32, u32, usize)>) {
    let bytes = std::fs::read(path).unwrap();
    let mut r = PcapNgReader::new(&bytes[..]).expect("a pcapng section header");
    let mut names = Vec::new();
    let mut frames = Vec::new();
    while let Some(b) = r.next_block() {
        match b.expect("a valid pcapng block") {
            Block::InterfaceDescription(i) => {
                for o in &i.options {
                    if let pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption::IfName(n) = o {
                        names.push(n.to_string());
                    }
                }
            }
            Block::EnhancedPacket(e) => {
                let flags = e
                    .options
                    .iter()
                    .find_map(|o| match o {
                        EnhancedPacketOption::Flags(f) => Some(*f),
                        _ => None,
                    })
                    .unwrap_or(0);
                frames.push((e.interface_id, flags, e.data.len()));
            }
            _ => {}
        }
    }
    (names, frames)
}

fn captures(d: &Daemon) -> Vec<serde_json::Value> {
    d.cli_json(&["res", "show", "capture"])["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_no_capture(d: &Daemon, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let c = captures(d);
        if c.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "capture still listed in res show after {timeout:?}: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// testpmd `rxonly` after `start tx_first 4`: exactly 128 frames go out on the transmit
/// queue and come back on the receive queue; a capture of every queue with `count 256`
/// holds each of them twice (outbound on `net0-tx0`, inbound on `net0-rx0`), as the
/// device's counters say. Then a one-queue capture to `-w -` piped into `tcpdump -r -`.
#[test]
fn capture_holds_exactly_the_frames_sent_and_counted() {
    let d = loopback_daemon("cap");
    let mut pmd = testpmd(&d, "rxonly");
    let file = d.dir.join("all.pcapng");
    let file_s = file.to_str().unwrap().to_string();
    let mut cli = CaptureCli::spawn(&d, &["count", "256", "-w", &file_s], Stdio::null());
    let listed = captures(&d);
    assert_eq!(
        listed.len(),
        1,
        "res show capture while attached: {listed:?}"
    );
    assert_eq!(listed[0]["name"], "net0");
    assert_eq!(listed[0]["owner_pid"], cli.child.id());

    pmd.start_tx_first(Some(4)).unwrap();
    let summary = cli.wait_exit(Duration::from_secs(30));
    assert!(
        summary.contains("256 frames captured, 0 dropped"),
        "{summary}"
    );
    pmd.stop().unwrap();
    let s = pmd.stats().unwrap();
    assert_eq!((s.tx_packets, s.rx_packets), (128, 128), "testpmd: {s:?}");

    let (tx, rx) = (d.vstats("net0", 1), d.vstats("net0", 0));
    assert_eq!((&tx["packets"], &rx["packets"]), (&128.into(), &128.into()));
    let lens = tcpdump_file(&file);
    assert_eq!(lens.len(), 256, "tcpdump -r read {} frames", lens.len());
    assert!(lens.iter().all(|&l| l == u64::from(FRAME)), "{lens:?}");
    let device_bytes = tx["bytes"].as_u64().unwrap() + rx["bytes"].as_u64().unwrap();
    assert_eq!(lens.iter().sum::<u64>(), device_bytes);

    let (names, frames) = pcapng_by_interface(&file);
    assert_eq!(names, ["net0-rx0", "net0-tx0"]);
    let on = |iface: u32, flags: u32| {
        frames
            .iter()
            .filter(|f| f.0 == iface && f.1 == flags)
            .count() as u64
    };
    assert_eq!(on(0, 1), rx["packets"].as_u64().unwrap(), "inbound on rx0");
    assert_eq!(on(1, 2), tx["packets"].as_u64().unwrap(), "outbound on tx0");
    drop(cli);
    wait_no_capture(&d, Duration::from_secs(5));

    // One queue, written to a pipe read by tcpdump.
    let mut tcpdump = Command::new("tcpdump")
        .args(["-r", "-", "-n", "-e"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tcpdump");
    let pipe = Stdio::from(tcpdump.stdin.take().unwrap());
    let mut cli = CaptureCli::spawn(
        &d,
        &["qidx", "1", "count", "32", "snaplen", "40", "-w", "-"],
        pipe,
    );
    pmd.start_tx_first(Some(1)).unwrap();
    let summary = cli.wait_exit(Duration::from_secs(30));
    assert!(summary.contains("32 frames captured"), "{summary}");
    let out = tcpdump.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lens = tcpdump_lengths(&text);
    // snaplen cuts what is stored, not the frame length the file records.
    assert_eq!(lens, vec![u64::from(FRAME); 32], "{text}");
    pmd.stop().unwrap();
    pmd.quit().unwrap();
    drop(cli);
    wait_no_capture(&d, Duration::from_secs(5));
}

/// A capture of a device forwarding at full rate (testpmd `io`), killed with SIGKILL:
/// the daemon sees its socket close, detaches the ring and drops the resource entry; the
/// device keeps forwarding, and a new capture can attach.
#[test]
fn a_killed_capture_leaves_no_residue_and_forwarding_goes_on() {
    let d = loopback_daemon("capkill");
    let mut pmd = testpmd(&d, "io");
    pmd.start_tx_first(Some(4)).unwrap();
    pmd.wait_stats(Duration::from_secs(20), |s| s.rx_packets >= 10_000)
        .unwrap_or_else(|e| panic!("no forwarding: {e}"));
    let before = d.cli_json(&["res", "show"])["counts"].clone();

    let file = d.dir.join("killed.pcapng");
    let mut cli = CaptureCli::spawn(&d, &["-w", file.to_str().unwrap()], Stdio::null());
    assert_eq!(captures(&d).len(), 1);
    // A second capture of the same device is refused while this one runs.
    let (ok, _, err) = d.cli(&["dev", "capture", "net0", "count", "1", "-w", "/dev/null"]);
    assert!(!ok && err.contains("already attached"), "{err}");
    // Frames reach the file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&file).map_or(0, |m| m.len()) < 64 << 10 {
        assert!(Instant::now() < deadline, "nothing captured");
        std::thread::sleep(Duration::from_millis(20));
    }
    cli.child.kill().unwrap(); // SIGKILL
    cli.child.wait().unwrap();
    wait_no_capture(&d, Duration::from_secs(5));
    // Nothing else left behind either: the same counts as before the capture.
    d.wait_res_counts(&before, Duration::from_secs(5));
    // Still forwarding.
    let a = d.vstat("net0", 0, "packets");
    std::thread::sleep(Duration::from_millis(500));
    let b = d.vstat("net0", 0, "packets");
    assert!(b > a + 1000, "device stopped forwarding: {a} -> {b}");
    // The device takes a new capture.
    let file2 = d.dir.join("again.pcapng");
    let mut cli = CaptureCli::spawn(
        &d,
        &["count", "1000", "-w", file2.to_str().unwrap()],
        Stdio::null(),
    );
    let summary = cli.wait_exit(Duration::from_secs(30));
    assert!(summary.contains("1000 frames captured"), "{summary}");
    assert_eq!(tcpdump_file(&file2).len(), 1000);
    pmd.stop().unwrap();
    pmd.quit().unwrap();
    drop(cli);
    wait_no_capture(&d, Duration::from_secs(5));

    // Deleting the device ends a capture: the CLI says so and fails.
    let mut cli = CaptureCli::spawn(&d, &["-w", "/dev/null"], Stdio::null());
    let (ok, _, err) = d.cli(&["dev", "del", "net0"]);
    assert!(ok, "dev del: {err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = cli.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "capture CLI outlived its device");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!st.success());
    cli.wait_line("ended the capture of net0", Duration::from_secs(5));
    assert!(captures(&d).is_empty());
}

/// Two queue pairs, every queue captured: one sub-ring per pair, four interfaces
/// (`net0-rx0 net0-tx0 net0-rx1 net0-tx1`), each holding what `vstats` counted on its
/// virtqueue; Ctrl-C (SIGINT) ends the capture with a complete file.
#[test]
fn every_queue_of_two_pairs_is_its_own_interface() {
    let d = Daemon::start(
        "cap2",
        "[[device]]\nname = \"net0\"\nmgmtdev = \"net\"\nbackend = \"loopback\"\n\
         queue_pairs = 2\nqueue_size = 1024\n",
        &["net0"],
    );
    let mut pmd = Testpmd::spawn(TestpmdOpts {
        vdev: format!(
            "net_virtio_user0,path={},queues=2,queue_size=256",
            d.sock("net0").display()
        ),
        core: 0,
        fwd_mode: "rxonly",
        txpkts: Some(FRAME),
        nb_queues: 2,
        extra_eal: vec![],
        extra_app: vec![],
    })
    .unwrap_or_else(|e| panic!("testpmd did not start: {e}"));
    let file = d.dir.join("two.pcapng");
    let mut cli = CaptureCli::spawn(&d, &["-w", file.to_str().unwrap()], Stdio::null());
    pmd.start_tx_first(Some(2)).unwrap();
    let s = pmd
        .wait_stats(Duration::from_secs(20), |s| {
            s.tx_packets > 0 && s.rx_packets == s.tx_packets
        })
        .unwrap_or_else(|e| panic!("frames did not come back: {e}"));
    pmd.stop().unwrap();
    // The device counted them; let the CLI drain, then stop it as Ctrl-C would.
    let per_queue: Vec<u64> = (0..4).map(|q| d.vstat("net0", q, "packets")).collect();
    assert_eq!(
        per_queue.iter().sum::<u64>(),
        2 * s.tx_packets,
        "{per_queue:?} {s:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(cli.child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let summary = cli.wait_exit(Duration::from_secs(10));
    assert!(
        summary.contains(&format!("{} frames captured, 0 dropped", 2 * s.tx_packets)),
        "{summary}"
    );
    let (names, frames) = pcapng_by_interface(&file);
    assert_eq!(names, ["net0-rx0", "net0-tx0", "net0-rx1", "net0-tx1"]);
    for (q, &n) in per_queue.iter().enumerate() {
        let dir = if q % 2 == 0 { 1 } else { 2 };
        let got = frames
            .iter()
            .filter(|f| f.0 == q as u32 && f.1 == dir)
            .count() as u64;
        assert_eq!(got, n, "interface {} vs vstats qidx {q}", names[q]);
    }
    assert!(
        per_queue[2] > 0 && per_queue[3] > 0,
        "pair 1 idle: {per_queue:?}"
    );
    assert_eq!(tcpdump_file(&file).len() as u64, 2 * s.tx_packets);
    pmd.quit().unwrap();
    drop(cli);
    wait_no_capture(&d, Duration::from_secs(5));
}
