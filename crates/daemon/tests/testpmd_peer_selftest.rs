//! Proves the testpmd helper (`common/testpmd.rs`) against DPDK's own vhost-user backend:
//! a `net_vhost` testpmd in `io` mode (loopback) and a `net_virtio_user` testpmd in `io`
//! mode started with `start tx_first`, so frames go guest-TX -> backend -> guest-RX, for
//! split and packed rings, with and without mergeable RX buffers, at 64 and 1518 bytes.

#[path = "common/testpmd.rs"]
mod testpmd;

use std::path::Path;
use std::time::{Duration, Instant};

use testpmd::{Testpmd, TestpmdOpts};

/// Frames each side must have seen before a configuration counts as passing.
const MIN_FRAMES: u64 = 100_000;
const FLOW_TIMEOUT: Duration = Duration::from_secs(15);

/// (client CPU, backend CPU): different CPUs when there are two.
fn cpus() -> (u32, u32) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n >= 2 {
        (0, 1)
    } else {
        (0, 0)
    }
}

fn run_case(dir: &Path, packed: bool, mrg: bool, frame: u16) -> Result<String, String> {
    let (client_cpu, backend_cpu) = cpus();
    let sock = dir.join(format!("vh-{}-{}-{frame}.sock", packed as u8, mrg as u8));
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let mut backend = Testpmd::spawn(TestpmdOpts {
        vdev: format!("net_vhost0,iface={},queues=1", sock.display()),
        core: backend_cpu,
        fwd_mode: "io",
        txpkts: None,
        nb_queues: 1,
        extra_eal: vec![],
        extra_app: vec![],
    })?;
    if !sock.exists() {
        return Err(backend.failure(&format!("{} missing after start-up", sock.display())));
    }
    backend.start()?;
    let mut client = Testpmd::spawn(TestpmdOpts {
        vdev: format!(
            "net_virtio_user0,path={},queues=1,packed_vq={},mrg_rxbuf={},queue_size=256",
            sock.display(),
            packed as u8,
            mrg as u8
        ),
        core: client_cpu,
        fwd_mode: "io",
        txpkts: Some(frame),
        nb_queues: 1,
        extra_eal: vec![],
        extra_app: vec![],
    })?;
    // The backend sees the device once the client set DRIVER_OK.
    backend.wait_for_text("virtio is now ready", Duration::from_secs(10))?;
    let started = Instant::now();
    client.start_tx_first(Some(4))?;
    client.wait_stats(FLOW_TIMEOUT, |s| {
        s.rx_packets >= MIN_FRAMES && s.tx_packets >= MIN_FRAMES
    })?;
    let flowed = started.elapsed();
    let rate = client.measure(Duration::from_millis(300))?;
    // Counters are read while the forwarding lcore updates them (bytes and frames are
    // not one atomic pair): compare them only once both sides stopped.
    let cf = client.stop()?;
    let bf = backend.stop()?;
    let c = client.stats()?;
    let b = backend.stats()?;
    client.quit()?;
    backend.quit()?;
    if b.rx_packets < MIN_FRAMES || b.tx_packets < MIN_FRAMES {
        return Err(format!("backend counters too low: {b:?}"));
    }
    // Every frame the backend received has the client's length (no FCS in the count).
    if b.rx_bytes != b.rx_packets * u64::from(frame) {
        return Err(format!(
            "backend received {} bytes in {} frames, expected {frame} per frame",
            b.rx_bytes, b.rx_packets
        ));
    }
    if c.rx_bytes != c.rx_packets * u64::from(frame) {
        return Err(format!(
            "client received {} bytes in {} frames, expected {frame} per frame",
            c.rx_bytes, c.rx_packets
        ));
    }
    if c.rx_errors != 0 || b.rx_errors != 0 || c.rx_missed != 0 {
        return Err(format!("errors: client {c:?} backend {b:?}"));
    }
    let (cf, bf) = (cf[0], bf[0]);
    if cf.rx_packets < MIN_FRAMES || bf.rx_packets < MIN_FRAMES {
        return Err(format!(
            "forward stats too low: client {cf:?} backend {bf:?}"
        ));
    }
    Ok(format!(
        "packed={} mrg_rxbuf={} frame={frame}: {MIN_FRAMES} frames round trip after {:.0} ms, \
         {:.2} Mpps round trip; client {cf:?}; backend {bf:?}; total {:.1} s",
        packed as u8,
        mrg as u8,
        flowed.as_secs_f64() * 1e3,
        rate.rx_pps / 1e6,
        t0.elapsed().as_secs_f64()
    ))
}

#[test]
fn dpdk_vhost_peer_passes_frames() {
    assert!(
        testpmd::available(),
        "{} not found: install the Debian package dpdk (scripts/install-deps.sh)",
        testpmd::testpmd_bin()
    );
    let dir = std::env::temp_dir().join(format!("uvdpa-t-{}-tpself", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (packed, mrg, frame) in [
        (false, false, 64),
        (false, true, 1518),
        (true, false, 1518),
        (true, true, 64),
    ] {
        match run_case(&dir, packed, mrg, frame) {
            Ok(msg) => eprintln!("{msg}"),
            Err(e) => panic!("packed={packed} mrg_rxbuf={mrg} frame={frame}: {e}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Processes of process group `pgid` that are not zombies.
fn live_in_group(pgid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // Fields after the comm: state ppid pgrp ...
            let f: Vec<&str> = stat
                .rsplit_once(") ")
                .map_or("", |x| x.1)
                .split(' ')
                .collect();
            f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string()
        })
        .count()
}

#[test]
fn unreachable_or_wedged_testpmd_fails_fast_with_its_log() {
    assert!(testpmd::available(), "dpdk-testpmd not found");
    let (client_cpu, backend_cpu) = cpus();
    let dir = std::env::temp_dir().join(format!("uvdpa-t-{}-tpwedge", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // A client whose backend does not listen: spawn fails and quotes testpmd's log.
    let err = Testpmd::spawn(TestpmdOpts {
        vdev: format!(
            "net_virtio_user0,path={}/nobody.sock,queues=1",
            dir.display()
        ),
        core: client_cpu,
        fwd_mode: "io",
        ..Default::default()
    })
    .err()
    .expect("a client without a backend must not start");
    assert!(err.contains("connect error"), "{err}");
    let log = testpmd::log_path_in(&err).expect("the error names the log");
    assert!(log.is_file(), "{log:?} kept");
    let _ = std::fs::remove_dir_all(log.parent().unwrap());

    // A testpmd that stops answering (SIGSTOP): the command fails after its timeout,
    // with the log, and drop kills the whole process group.
    let mut b = Testpmd::spawn(TestpmdOpts {
        vdev: format!("net_vhost0,iface={}/w.sock,queues=1", dir.display()),
        core: backend_cpu,
        fwd_mode: "io",
        ..Default::default()
    })
    .unwrap();
    let pgid = b.pid().unwrap();
    let pg = rustix::process::Pid::from_raw(pgid as i32).unwrap();
    rustix::process::kill_process_group(pg, rustix::process::Signal::STOP).unwrap();
    let t = Instant::now();
    let err = b
        .cmd_timeout("show port stats all", Duration::from_millis(500))
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        err.contains("wedged") && err.contains("net_vhost0"),
        "{err}"
    );
    drop(b);
    let _ = std::fs::remove_dir_all(testpmd::log_path_in(&err).unwrap().parent().unwrap());
    let t = Instant::now();
    while live_in_group(pgid) > 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(live_in_group(pgid), 0, "testpmd survived its drop");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn parses_port_and_fwd_stats() {
    let port = "
  ######################## NIC statistics for port 0  ########################
  RX-packets: 15725192   RX-missed: 3          RX-bytes:  1006412288
  RX-errors: 1
  RX-nombuf:  2
  TX-packets: 15725224   TX-errors: 4          TX-bytes:  1006414336

  Throughput (since last show)
  Rx-pps:         1234          Rx-bps:            0
  Tx-pps:         5678          Tx-bps:            0
  ############################################################################
  ######################## NIC statistics for port 1  ########################
  RX-packets: 7   RX-missed: 0          RX-bytes:  448
";
    let v = testpmd::parse_port_stats(port);
    assert_eq!(v.len(), 2);
    assert_eq!(
        v[0],
        testpmd::PortStats {
            port: 0,
            rx_packets: 15725192,
            rx_missed: 3,
            rx_bytes: 1006412288,
            rx_errors: 1,
            rx_nombuf: 2,
            tx_packets: 15725224,
            tx_errors: 4,
            tx_bytes: 1006414336,
            rx_pps: 1234,
            tx_pps: 5678,
        }
    );
    assert_eq!((v[1].port, v[1].rx_packets, v[1].rx_bytes), (1, 7, 448));
    let fwd = "
  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 21686836       RX-dropped: 0             RX-total: 21686836
  TX-packets: 21686868       TX-dropped: 5             TX-total: 21686873
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 99              RX-dropped: 0             RX-total: 0
  TX-packets: 99       TX-dropped: 99             TX-total: 99
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
";
    assert_eq!(
        testpmd::parse_fwd_stats(fwd),
        vec![testpmd::FwdStats {
            port: 0,
            rx_packets: 21686836,
            rx_dropped: 0,
            tx_packets: 21686868,
            tx_dropped: 5,
        }]
    );
}
