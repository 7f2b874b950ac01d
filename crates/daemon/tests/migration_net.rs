//! Live migration of a VM with a uvdpa virtio-net device (issue 11, part 1, "net"): a
//! guest keeps receiving a counted stream across the migration, with bounded loss and no
//! corrupted frame; split and packed rings.
//!
//! Topology: one daemon with two `tap` devices, `src` and `dst`, whose TAPs sit in a
//! private network namespace, enslaved to one Linux bridge that carries the host's
//! address. The source QEMU (TCG) runs the guest on `src`; the destination QEMU
//! (`-incoming`) is attached to `dst`; both give the NIC the same MAC. The guest
//! (`uvdpa.mode=responder` in tests/guest/init) only answers pings.
//!
//! The stream: this test sends ICMP echo requests from a raw socket in the namespace at
//! a fixed rate, each with a sequence number and a payload derived from it, and checks
//! every reply: same payload, valid ICMP checksum. An echo request the guest received
//! corrupted either fails its checksum in the guest (counted in `icmp_in_csum_errors`,
//! asserted zero) or comes back with the corruption (a payload mismatch here, asserted
//! zero). The guest's receive path is what dirty logging has to carry over: every
//! request lands in a receive buffer the device wrote into guest RAM.
//!
//! The switchover: after it, the bridge's forwarding entry for the guest's MAC still
//! names the source TAP until a frame from the guest arrives through the destination
//! TAP. QEMU announces a migrated vhost-user NIC only through the backend
//! (`VHOST_USER_PROTOCOL_F_RARP`) or the guest (`VIRTIO_NET_F_GUEST_ANNOUNCE`); uvdpa
//! offers neither, so the guest announces itself (`uvdpa.announce_ms`: a gratuitous ARP
//! every 500 ms, what `GUEST_ANNOUNCE` would make its driver send once). The loss bound
//! below covers QEMU's measured downtime plus that period.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::qemu::{Guest, Qmp, CPU};
use common::*;
use serde_json::json;

/// The guest's address and the bridge's (the host side), in the namespace.
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const HOST_CIDR: &str = "10.77.0.1/24";
/// The guest NIC's MAC, the same on both QEMUs (and both devices).
const GUEST_MAC: &str = "02:00:00:77:00:02";
/// Echo requests per second.
const RATE: u64 = 100;
/// ICMP payload bytes after the 8-byte sequence stamp.
const PAYLOAD: usize = 248;
/// How often the guest announces itself (gratuitous ARP), in milliseconds.
const ANNOUNCE_MS: u64 = 500;
/// The loss budget beyond QEMU's reported downtime: one announce period (the bridge
/// learns the new port from the next announcement) plus 1.5 s of TCG scheduling slack
/// (two QEMUs and the daemon on two shared CPUs around the switchover).
const SLACK_MS: u64 = ANNOUNCE_MS + 1500;
/// Seconds the stream runs on the source before the migration starts, and on the
/// destination after it completed.
const BEFORE_S: u64 = 8;
const AFTER_S: u64 = 20;

fn run(cmd: &mut Command) -> (bool, String) {
    match cmd.output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => (false, format!("{cmd:?}: {e}")),
    }
}

/// A network namespace with a bridge holding both devices' TAPs. Dropping it deletes the
/// namespace (and what is inside) and TAPs left outside it.
struct Lan {
    ns: String,
    taps: [String; 2],
}

impl Lan {
    /// Waits for the daemon's TAPs, moves them into a fresh namespace, bridges them and
    /// gives the bridge the host's address.
    fn up(ns: &str, taps: [String; 2]) -> Lan {
        let lan = Lan {
            ns: ns.to_string(),
            taps,
        };
        let t = Instant::now();
        for tap in &lan.taps {
            while !Path::new("/sys/class/net").join(tap).exists() {
                assert!(t.elapsed() < Duration::from_secs(10), "no TAP {tap}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let ip = |args: &[&str]| {
            let (ok, out) = run(Command::new("ip").args(args));
            assert!(ok, "ip {}: {out}", args.join(" "));
        };
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        // STP off (the default): ports forward at once; learning on (the default).
        ip(&["-n", ns, "link", "add", "br0", "type", "bridge"]);
        for tap in &lan.taps {
            ip(&["link", "set", tap, "netns", ns]);
            ip(&["-n", ns, "link", "set", tap, "master", "br0"]);
            ip(&["-n", ns, "link", "set", tap, "up"]);
        }
        ip(&["-n", ns, "addr", "add", HOST_CIDR, "dev", "br0"]);
        ip(&["-n", ns, "link", "set", "br0", "up"]);
        lan
    }

    /// The bridge's forwarding entries for the guest's MAC (`bridge fdb`).
    fn fdb(&self) -> String {
        let (_, out) = run(Command::new("ip").args(["netns", "exec", &self.ns, "bridge", "fdb"]));
        out.lines()
            .filter(|l| l.starts_with(GUEST_MAC))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// A raw ICMP socket opened inside the namespace (by a thread that joined it).
    fn icmp_socket(&self) -> OwnedFd {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            rustix::thread::move_into_link_name_space(
                f.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns into the test namespace");
            rustix::net::socket(
                rustix::net::AddressFamily::INET,
                rustix::net::SocketType::RAW,
                Some(rustix::net::ipproto::ICMP),
            )
            .expect("raw ICMP socket (needs root)")
        })
        .join()
        .unwrap()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.ns]));
        for tap in &self.taps {
            if Path::new("/sys/class/net").join(tap).exists() {
                let _ = run(Command::new("ip").args(["link", "del", tap]));
            }
        }
    }
}

/// The Internet checksum (RFC 1071).
fn inet_csum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The payload of echo request `seq`: the sequence number, then bytes derived from it.
fn payload(seq: u64) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for _ in 0..PAYLOAD {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.push(x as u8);
    }
    p
}

fn echo_request(id: u16, seq: u64) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&(seq as u16).to_be_bytes());
    m.extend_from_slice(&payload(seq));
    let c = inet_csum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// What the receiver saw.
#[derive(Default)]
struct Received {
    /// Sequence number → when its reply arrived (first one).
    at: BTreeMap<u64, Instant>,
    duplicates: u64,
    /// Replies with a wrong payload or checksum (what was wrong).
    corrupt: Vec<String>,
}

/// The stream: a sender at RATE and a receiver checking every echo reply.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Instant>>>,
    received: Arc<Mutex<Received>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(sock: OwnedFd) -> Stream {
        let sock = Arc::new(sock);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(Received::default()));
        let id = (std::process::id() & 0xffff) as u16;
        rustix::net::sockopt::set_socket_timeout(
            &*sock,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_millis(200)),
        )
        .unwrap();
        let tx = {
            let (sock, stop, sent) = (sock.clone(), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let dst = SocketAddrV4::new(GUEST_IP, 0);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let due = t0 + Duration::from_micros(seq * 1_000_000 / RATE);
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                    // Counted before it goes out (the reply may beat the bookkeeping).
                    // A send refused (no neighbour yet: ARP in progress) still counts as
                    // sent: the stream does not wait for the guest.
                    sent.lock().unwrap().push(Instant::now());
                    let _ = rustix::net::sendto(
                        &*sock,
                        &echo_request(id, seq),
                        rustix::net::SendFlags::empty(),
                        &dst,
                    );
                    seq += 1;
                }
            })
        };
        let rx = {
            let (sock, stop, sent, received) =
                (sock.clone(), stop.clone(), sent.clone(), received.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 2048];
                let mut quiet_since: Option<Instant> = None;
                loop {
                    if stop.load(Ordering::Relaxed) {
                        // Replies still in flight get 2 s after the last request.
                        let q = *quiet_since.get_or_insert_with(Instant::now);
                        if q.elapsed() > Duration::from_secs(2) {
                            break;
                        }
                    }
                    let n = match rustix::net::recv(
                        &*sock,
                        &mut buf,
                        rustix::net::RecvFlags::empty(),
                    ) {
                        Ok((n, _)) => n,
                        Err(_) => continue,
                    };
                    let pkt = &buf[..n];
                    let ihl = usize::from(pkt.first().map_or(0, |b| b & 0xf)) * 4;
                    let Some(icmp) = pkt.get(ihl..) else { continue };
                    if icmp.len() < 8 || icmp[0] != 0 || icmp[4..6] != id.to_be_bytes() {
                        continue; // not an echo reply of ours
                    }
                    let mut r = received.lock().unwrap();
                    let stamp = icmp
                        .get(8..16)
                        .map(|s| u64::from_be_bytes(s.try_into().unwrap()));
                    let Some(seq) = stamp else {
                        r.corrupt.push(format!("reply of {} bytes", icmp.len()));
                        continue;
                    };
                    let nsent = sent.lock().unwrap().len() as u64;
                    if inet_csum(icmp) != 0 {
                        r.corrupt.push(format!("seq {seq}: ICMP checksum wrong"));
                    } else if seq >= nsent
                        || icmp[6..8] != (seq as u16).to_be_bytes()
                        || icmp[8..] != payload(seq)[..]
                    {
                        r.corrupt.push(format!(
                            "seq {seq}: payload differs from what was sent ({} bytes)",
                            icmp.len()
                        ));
                    } else if r.at.insert(seq, Instant::now()).is_some() {
                        r.duplicates += 1;
                    }
                }
            })
        };
        Stream {
            stop,
            sent,
            received,
            threads: vec![tx, rx],
        }
    }

    fn replies(&self) -> usize {
        self.received.lock().unwrap().at.len()
    }

    fn finish(mut self) -> (Vec<Instant>, Received) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let sent = std::mem::take(&mut *self.sent.lock().unwrap());
        let received = std::mem::take(&mut *self.received.lock().unwrap());
        (sent, received)
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn migrate_under_stream(tag: &str, packed: bool) {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test creates a network namespace, a bridge and a raw socket: run it as root"
    );
    build_initramfs();
    let dir = unique_dir(tag);
    let n = std::process::id() % 100_000;
    let taps = [format!("ums{n}{tag}"), format!("umd{n}{tag}")];
    for t in &taps {
        assert!(t.len() <= 15, "TAP name {t} too long");
    }
    let dev = |name: &str, tap: &str| {
        format!(
            "[[device]]\nname = \"{name}\"\nmgmtdev = \"net\"\nbackend = \"tap\"\n\
             tap = \"{tap}\"\nmac = \"{GUEST_MAC}\"\n"
        )
    };
    let cfg = dev("src", &taps[0]) + &dev("dst", &taps[1]);
    let d = Daemon::start_in_env(
        dir.clone(),
        &cfg,
        &["src", "dst"],
        &[("UVDPA_DIRTY_LOG", "on")],
    );
    let lan = Lan::up(&format!("uvdpa-mign-{n}-{tag}"), taps.clone());

    let mig = dir.join("mig.sock");
    let (qs, qd) = (dir.join("qmp-src.sock"), dir.join("qmp-dst.sock"));
    let secs = (BEFORE_S + AFTER_S + 60).to_string();
    let announce_ms: u64 = std::env::var("MIGRATION_NET_ANNOUNCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ANNOUNCE_MS);
    let append = format!("uvdpa.ip={GUEST_IP}/24 uvdpa.announce_ms={announce_ms}");
    let args = |sock: String| {
        let mut a = vec![
            "--vhost-user-net".to_string(),
            sock,
            "--net-mac".into(),
            GUEST_MAC.into(),
            "--mode".into(),
            "responder".into(),
            "--secs".into(),
            secs.clone(),
            "--timeout".into(),
            "240".into(),
            "--append".into(),
            append.clone(),
        ];
        if packed {
            a.push("--packed".into());
        }
        a
    };
    let a_dst = args(d.sock_str("dst"));
    let a_dst: Vec<&str> = a_dst.iter().map(String::as_str).collect();
    let dst = Guest::spawn(
        &dir,
        "dst",
        &format!(
            "{CPU} -incoming unix:{} -qmp unix:{},server=on,wait=off",
            mig.display(),
            qd.display()
        ),
        &a_dst,
    );
    let mut qmp_dst = Qmp::connect(&qd);
    let a_src = args(d.sock_str("src"));
    let a_src: Vec<&str> = a_src.iter().map(String::as_str).collect();
    let src = Guest::spawn(
        &dir,
        "src",
        &format!("{CPU} -qmp unix:{},server=on,wait=off", qs.display()),
        &a_src,
    );
    let mut qmp = Qmp::connect(&qs);
    src.wait_for("uvdpa-guest: responder up", 180);

    let stream = Stream::start(lan.icmp_socket());
    let t = Instant::now();
    while stream.replies() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no echo reply from the guest on the source within 30 s:\n{}",
            src.console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(BEFORE_S));
    let before = stream.replies();
    eprintln!("{before} replies on the source; bridge: {}", lan.fdb());

    // 32 MiB/s: about three seconds of pre-copy (RAM is mostly zero pages), so the
    // device writes a few hundred receive buffers while pages are being copied.
    qmp.cmd(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 32u64 << 20 }),
    )
    .unwrap();
    let t_mig = Instant::now();
    qmp.cmd(
        "migrate",
        json!({ "uri": format!("unix:{}", mig.display()) }),
    )
    .unwrap_or_else(|e| panic!("migrate refused: {e}"));
    let info = loop {
        let info = qmp.cmd("query-migrate", json!({})).unwrap();
        if matches!(
            info["status"].as_str(),
            Some("completed") | Some("failed") | Some("cancelled")
        ) {
            break info;
        }
        assert!(
            t_mig.elapsed() < Duration::from_secs(120),
            "migration did not end within 120 s: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let t_done = Instant::now();
    let downtime_ms = info["downtime"].as_u64().unwrap_or(0);
    eprintln!(
        "migration {} in {:.1} s, downtime {downtime_ms} ms: {info}",
        info["status"],
        t_mig.elapsed().as_secs_f64()
    );
    assert_eq!(
        info["status"],
        "completed",
        "migration failed: {info}\ndaemon log:\n{}",
        d.log_text()
    );
    let dst_status = qmp_dst.cmd("query-status", json!({})).unwrap();
    assert_eq!(
        dst_status["status"], "running",
        "destination not running: {dst_status}"
    );
    // The source is paused for good.
    let _ = qmp.cmd("quit", json!({}));
    let (_, src_console) = src.finish();

    std::thread::sleep(Duration::from_secs(AFTER_S));
    let fdb_after = lan.fdb();
    let (sent, rcv) = stream.finish();
    let (code, console) = dst.finish();
    let daemon_log = d.log_text();
    drop(lan);
    assert!(d.stop().success(), "daemon did not exit cleanly");

    // The stream, from the first answered request on (earlier ones met ARP resolution
    // and the guest's boot).
    let first = *rcv.at.keys().next().expect("no reply at all");
    let total = sent.len() as u64 - first;
    let got = rcv.at.range(first..).count() as u64;
    let lost = total - got;
    // The longest run of unanswered requests, and when it began.
    let (mut gap, mut gap_at, mut run_len) = (0u64, first, 0u64);
    for s in first..sent.len() as u64 {
        if rcv.at.contains_key(&s) {
            run_len = 0;
        } else {
            run_len += 1;
            if run_len > gap {
                gap = run_len;
                gap_at = s + 1 - run_len;
            }
        }
    }
    let after: u64 = rcv.at.values().filter(|&&at| at > t_done).count() as u64;
    let sent_after = sent.iter().filter(|&&at| at > t_done).count() as u64;
    let bound = RATE * (downtime_ms + SLACK_MS) / 1000;
    let result = console
        .lines()
        .find(|l| l.contains("UVDPA-GUEST-RESULT:"))
        .unwrap_or("")
        .to_string();
    let info_line = console
        .lines()
        .find(|l| l.contains("UVDPA-GUEST-INFO:"))
        .unwrap_or("")
        .to_string();
    eprintln!(
        "stream ({}): sent {total} from seq {first}, answered {got}, lost {lost} (bound \
         {bound}), longest gap {gap} from seq {gap_at} ({:.2} s after the migration \
         started), {sent_after} sent and {after} answered after the switchover, \
         {} duplicates, {} corrupt; bridge after: {fdb_after}\nguest: {info_line}\n{result}",
        if packed { "packed" } else { "split" },
        sent.get(gap_at as usize)
            .map(|&s| s.saturating_duration_since(t_mig).as_secs_f64())
            .unwrap_or(-1.0),
        rcv.duplicates,
        rcv.corrupt.len(),
    );
    let ctx = || {
        format!(
            "\nsource console tail:\n{}\ndestination console:\n{console}\ndaemon log:\n{daemon_log}",
            src_console
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    };

    assert!(
        rcv.corrupt.is_empty(),
        "corrupted replies: {:?}{}",
        &rcv.corrupt[..rcv.corrupt.len().min(10)],
        ctx()
    );
    assert!(
        code == 0 && result.contains("PASS"),
        "guest on the destination: {result}{}",
        ctx()
    );
    for key in ["icmp_in_csum_errors", "icmp_in_errors", "rx_errors"] {
        assert_eq!(
            field(&info_line, key),
            Some("0"),
            "guest {key} (a frame the device delivered was damaged): {info_line}{}",
            ctx()
        );
    }
    // The guest answered (kernel counter, in guest RAM across the migration) at least
    // every request we saw answered.
    let echos: u64 = field(&result, "echo_requests")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no echo_requests= in {result:?}"));
    assert!(
        echos >= got,
        "the guest counted {echos} echo requests, but {got} replies arrived"
    );
    assert!(
        after >= sent_after * 8 / 10,
        "the stream did not keep flowing on the destination: {after} of {sent_after} \
         requests answered after the switchover{}",
        ctx()
    );
    assert!(
        lost <= bound,
        "lost {lost} of {total} requests (longest gap {gap}), more than the bound {bound} \
         ({RATE}/s for the {downtime_ms} ms downtime + {SLACK_MS} ms){}",
        ctx()
    );
    assert!(
        daemon_log.contains("dirty log set") && daemon_log.contains("VHOST_F_LOG_ALL) switched"),
        "the migration did not go through dirty logging:\n{daemon_log}"
    );
    if packed {
        let packed_devs = daemon_log
            .lines()
            .filter(|l| l.contains("features acked"))
            .filter_map(|l| l.split("features=0x").nth(1))
            .filter_map(|h| u64::from_str_radix(h.split_whitespace().next()?, 16).ok())
            .filter(|f| f & (1 << 34) != 0)
            .count();
        assert!(
            packed_devs >= 2,
            "packed rings not negotiated:\n{daemon_log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guest_keeps_receiving_a_counted_stream_across_migration() {
    migrate_under_stream("s", false);
}

#[test]
fn packed_ring_guest_keeps_receiving_a_counted_stream_across_migration() {
    migrate_under_stream("p", true);
}
