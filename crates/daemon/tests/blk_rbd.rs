//! The `rbd` backend end to end against a real single-node Ceph cluster (one monitor, one
//! BlueStore OSD on a file; `scripts/ceph.sh`), started by each test in its own directory.
//! Images are made and removed with the `rbd` tool; the client is libblkio. A cluster that
//! cannot start (Ceph not installed: scripts/install-deps.sh) fails the test with the
//! script's reason: nothing is skipped.

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use std::time::{Duration, Instant};

use ceph::{rbd_config, Ceph};
use common::*;

const MIB: u64 = 1 << 20;

/// Writes `n` blocks of `bs` bytes at spread, distinct offsets on queue `q`, `qd` at a
/// time, then reads them back `qd` at a time and compares; returns the write and read
/// IOPS.
fn write_verify(
    c: &mut BlkClient,
    q: usize,
    n: usize,
    qd: usize,
    bs: usize,
    seed: u64,
) -> (f64, f64) {
    let slots = c.capacity / bs as u64;
    let offs: Vec<u64> = (0..n as u64)
        .map(|i| (i * 7919 + seed * 31) % slots * bs as u64)
        .collect();
    let data = pattern(seed, n * bs);
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(qd) {
        for (k, &i) in chunk.iter().enumerate() {
            c.buf()[k * bs..][..bs].copy_from_slice(&data[i * bs..][..bs]);
        }
        let ops: Vec<Op> = chunk
            .iter()
            .enumerate()
            .map(|(k, &i)| Op::Write {
                offset: offs[i],
                buf_off: k * bs,
                len: bs,
            })
            .collect();
        let r = c.run(q, &ops);
        assert!(r.iter().all(|&r| r == 0), "writes failed: {r:?}");
    }
    let write_iops = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(qd) {
        c.buf()[..qd * bs].fill(0x5a);
        let ops: Vec<Op> = chunk
            .iter()
            .enumerate()
            .map(|(k, &i)| Op::Read {
                offset: offs[i],
                buf_off: k * bs,
                len: bs,
            })
            .collect();
        let r = c.run(q, &ops);
        assert!(r.iter().all(|&r| r == 0), "reads failed: {r:?}");
        for (k, &i) in chunk.iter().enumerate() {
            assert!(
                c.buf()[k * bs..][..bs] == data[i * bs..][..bs],
                "data mismatch at offset {} (qd {qd}, bs {bs})",
                offs[i]
            );
        }
    }
    let read_iops = n as f64 / t.elapsed().as_secs_f64();
    eprintln!("qd {qd} bs {bs}: {write_iops:.0} write IOPS, {read_iops:.0} read IOPS ({n} each)");
    (write_iops, read_iops)
}

fn dev_add(d: &Daemon, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["dev", "add"];
    all.extend_from_slice(args);
    d.cli(&all)
}

#[test]
fn rbd_image_qd1_qd32_flush_discard_zeroes_and_open_errors() {
    let ceph = Ceph::start("rbd");
    ceph.rbd(&["create", "--size", "64M", "rbd/disk0"]);
    let d = Daemon::start(
        "rbd",
        &rbd_config("r0", &ceph, "disk0", "queues = 2\n"),
        &["r0"],
    );
    let v = d.cli_json(&["dev", "show", "r0"])["dev"][0].clone();
    assert_eq!(v["backend"], "rbd", "{v}");
    assert_eq!(v["capacity"], 64 * MIB, "{v}");
    let mut c = BlkClient::connect(&d.sock_str("r0"), 2, 32 * 65536).unwrap();
    let features = d.cli_json(&["dev", "show", "r0"])["dev"][0]["features"].to_string();
    for f in [
        "VIRTIO_BLK_F_FLUSH",
        "VIRTIO_BLK_F_DISCARD",
        "VIRTIO_BLK_F_WRITE_ZEROES",
    ] {
        assert!(features.contains(f), "{f} not negotiated: {features}");
    }
    assert_eq!(c.capacity, 64 * MIB);
    write_verify(&mut c, 0, 32, 1, 4096, 1);
    write_verify(&mut c, 0, 1024, 32, 4096, 2);
    write_verify(&mut c, 1, 256, 32, 4096, 3);
    write_verify(&mut c, 1, 64, 32, 65536, 4);

    // Flush: what was written is in the cluster, as another client (`rbd export`) sees.
    let at = 48 * MIB;
    let data = pattern(9, 8 * MIB as usize);
    for k in 0..8u64 {
        c.buf()[..MIB as usize / 2]
            .copy_from_slice(&data[(k * MIB / 2) as usize..][..MIB as usize / 2]);
        let w = Op::Write {
            offset: at + k * MIB / 2,
            buf_off: 0,
            len: MIB as usize / 2,
        };
        assert_eq!(c.run(0, &[w]), vec![0]);
    }
    // Only half the data so far: buffers are 32 × 64 KiB, so write the rest in halves.
    for k in 8..16u64 {
        c.buf()[..MIB as usize / 2]
            .copy_from_slice(&data[(k * MIB / 2) as usize..][..MIB as usize / 2]);
        let w = Op::Write {
            offset: at + k * MIB / 2,
            buf_off: 0,
            len: MIB as usize / 2,
        };
        assert_eq!(c.run(1, &[w]), vec![0]);
    }
    assert_eq!(c.run(0, &[Op::Flush]), vec![0]);
    assert!(
        ceph.export("rbd/disk0", at, data.len()) == data,
        "flushed data not in the cluster"
    );
    let used = ceph.used("rbd/disk0");
    assert!(used >= 8 * MIB, "rbd du: {used} bytes used");

    // Discard of whole objects (4 MiB): `rbd du` shows them gone, reads return zeroes.
    let r = c.run(
        0,
        &[
            Op::Discard {
                offset: at,
                len: 4 * MIB,
            },
            Op::Flush,
        ],
    );
    assert_eq!(r, vec![0, 0]);
    let after = ceph.used("rbd/disk0");
    assert!(
        after + 4 * MIB <= used,
        "rbd du after discarding 4 MiB: {after} bytes used, {used} before"
    );
    // Write-zeroes of 8 KiB inside the second object (thick: no unmap flag).
    let z = Op::WriteZeroes {
        offset: at + 4 * MIB + 4096,
        len: 8192,
    };
    assert_eq!(c.run(0, &[z, Op::Flush]), vec![0, 0]);
    c.buf()[..65536].fill(0x11);
    let read = |offset| Op::Read {
        offset,
        buf_off: 0,
        len: 65536,
    };
    assert_eq!(c.run(0, &[read(at)]), vec![0]);
    assert!(c.buf()[..65536].iter().all(|&b| b == 0), "discarded data");
    assert_eq!(c.run(0, &[read(at + 4 * MIB)]), vec![0]);
    let got = c.buf()[..65536].to_vec();
    let want = &data[4 * MIB as usize..][..65536];
    assert!(got[..4096] == want[..4096]);
    assert!(got[4096..12288].iter().all(|&b| b == 0), "write-zeroes");
    assert!(got[12288..] == want[12288..]);
    let seen = ceph.export("rbd/disk0", at + 4 * MIB, 65536);
    assert!(seen == got, "rbd export disagrees after write-zeroes");

    // A request past the capacity fails (IOERR), and the queue goes on.
    let past = Op::Read {
        offset: 64 * MIB - 4096,
        buf_off: 0,
        len: 8192,
    };
    let r = c.run(0, &[past, read(0)]);
    assert!(r[0] < 0 && r[1] == 0, "{r:?}");
    drop(c);

    // Open errors name the image and the step, with the errno.
    let conf = ceph.conf().display().to_string();
    let base = ["mgmtdev", "blk", "backend", "rbd", "conf", conf.as_str()];
    let with = |extra: &[&'static str]| {
        let mut v: Vec<&str> = vec!["name", "bad"];
        v.extend_from_slice(&base);
        v.extend_from_slice(extra);
        v
    };
    let (ok, _, err) = dev_add(&d, &with(&["pool", "rbd", "image", "nope"]));
    assert!(!ok);
    assert!(
        err.contains(
            "Opening RBD image rbd/nope failed: rbd_open failed: No such file or directory"
        ),
        "{err}"
    );
    let (ok, _, err) = dev_add(&d, &with(&["pool", "nopool", "image", "disk0"]));
    assert!(!ok);
    assert!(
        err.contains("Opening pool nopool failed: No such file or directory"),
        "{err}"
    );
    let (ok, _, err) = dev_add(
        &d,
        &with(&["pool", "rbd", "image", "disk0", "id", "nobody"]),
    );
    assert!(!ok);
    assert!(err.contains("Connecting to the cluster"), "{err}");
    let mut v = vec!["name", "bad", "mgmtdev", "blk", "backend", "rbd"];
    v.extend_from_slice(&["pool", "rbd", "image", "disk0", "conf", "/nonexistent.conf"]);
    let (ok, _, err) = dev_add(&d, &v);
    assert!(!ok);
    assert!(err.contains("Reading /nonexistent.conf failed"), "{err}");
    // A cluster nobody answers for: `dev add` fails within the connect timeout.
    let dead = ceph.dir.join("dead.conf");
    let text = std::fs::read_to_string(ceph.conf()).unwrap();
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("mon host") {
                "mon host = v1:127.0.0.1:9".to_string()
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&dead, text).unwrap();
    let t = Instant::now();
    let dead_s = dead.display().to_string();
    let mut v = vec!["name", "bad", "mgmtdev", "blk", "backend", "rbd"];
    v.extend_from_slice(&["pool", "rbd", "image", "disk0", "conf", &dead_s]);
    let (ok, _, err) = dev_add(&d, &v);
    assert!(!ok);
    assert!(err.contains("Connecting to the cluster"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    eprintln!("dev add with a dead monitor failed after {:?}", t.elapsed());
    // A read-only device opens the image without its exclusive lock, beside the
    // read-write one: reads see its data, writes fail.
    let (ok, _, err) = dev_add(
        &d,
        &[
            "name", "ro0", "mgmtdev", "blk", "backend", "rbd", "pool", "rbd", "image", "disk0",
            "conf", &conf, "ro",
        ],
    );
    assert!(ok, "{err}");
    assert!(d.log_text().contains("read_only=true"));
    let mut c = BlkClient::connect_with(&d.sock_str("ro0"), 1, 65536, true).unwrap();
    assert_eq!(c.run(0, &[read(at + 4 * MIB)]), vec![0]);
    assert!(c.buf()[..65536] == got[..]);
    let w = Op::Write {
        offset: 0,
        buf_off: 0,
        len: 4096,
    };
    assert!(
        c.run(0, &[w])[0] < 0,
        "a write to a read-only device succeeded"
    );
    drop(c);
    // A bad attribute is refused before anything is opened.
    let (ok, _, err) = dev_add(&d, &with(&["pool", "rbd", "image", "disk0", "size", "1M"]));
    assert!(!ok && err.contains("size"), "{err}");

    assert!(d.stop().success());
    ceph.rbd(&["rm", "--no-progress", "rbd/disk0"]);
}

#[test]
fn osd_killed_and_restarted_mid_io_loses_no_acknowledged_write() {
    let ceph = Ceph::start("rbd-osd");
    ceph.rbd(&["create", "--size", "32M", "rbd/disk1"]);
    let d = Daemon::start(
        "rbd-osd",
        &rbd_config("k0", &ceph, "disk1", "timeout = 20\n"),
        &["k0"],
    );
    let bs = 4096usize;
    let qd = 32usize;
    let mut c = BlkClient::connect(&d.sock_str("k0"), 1, qd * bs).unwrap();
    let slots = 2048u64; // 8 MiB of 4 KiB blocks
                         // Per block: the round whose write was acknowledged last (None: never written, or a
                         // failed write left it undefined).
    let mut acked: Vec<Option<u64>> = vec![None; slots as usize];
    let mut undefined = vec![false; slots as usize];
    let block = |round: u64, i: u64| pattern(round * 100_000 + i, bs);
    let ceph_dir = ceph.dir.clone();
    let (tx, rx) = std::sync::mpsc::channel::<Duration>();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let c = Ceph { dir: ceph_dir };
        c.kill_osd();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        c.ctl("osd-start");
        tx.send(t.elapsed()).unwrap();
        std::mem::forget(c);
    });
    let t0 = Instant::now();
    let mut round = 0u64;
    let (mut ok, mut failed, mut slowest) = (0u64, 0u64, Duration::ZERO);
    while t0.elapsed() < Duration::from_secs(8) {
        round += 1;
        let idx: Vec<u64> = (0..qd as u64)
            .map(|k| (round * 37 + k * 61) % slots)
            .collect();
        for (k, &i) in idx.iter().enumerate() {
            c.buf()[k * bs..][..bs].copy_from_slice(&block(round, i));
        }
        let ops: Vec<Op> = idx
            .iter()
            .enumerate()
            .map(|(k, &i)| Op::Write {
                offset: i * bs as u64,
                buf_off: k * bs,
                len: bs,
            })
            .collect();
        let t = Instant::now();
        let r = c
            .try_run(0, &ops, Duration::from_secs(40))
            .expect("writes hung past the OSD timeout");
        slowest = slowest.max(t.elapsed());
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a batch took {:?}",
            t.elapsed()
        );
        for (k, &i) in idx.iter().enumerate() {
            if r[k] == 0 {
                acked[i as usize] = Some(round);
                undefined[i as usize] = false;
                ok += 1;
            } else {
                undefined[i as usize] = true;
                failed += 1;
            }
        }
    }
    let down = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    killer.join().unwrap();
    assert_eq!(c.run(0, &[Op::Flush]), vec![0]);
    eprintln!(
        "{round} rounds: {ok} writes acknowledged, {failed} failed; slowest batch {slowest:?}; \
         OSD down for {down:?}"
    );
    assert!(ok > 0);
    assert!(
        slowest >= Duration::from_secs(1),
        "no batch waited for the OSD: the kill missed the I/O"
    );
    // Every acknowledged write reads back, through the device and through `rbd export`.
    let all = ceph.rbd(&["export", "--no-progress", "rbd/disk1", "-"]);
    let mut checked = 0;
    for i in 0..slots {
        let (Some(round), false) = (acked[i as usize], undefined[i as usize]) else {
            continue;
        };
        let want = block(round, i);
        let r = Op::Read {
            offset: i * bs as u64,
            buf_off: 0,
            len: bs,
        };
        assert_eq!(c.run(0, &[r]), vec![0]);
        assert!(c.buf()[..bs] == want[..], "block {i} (round {round}) lost");
        assert!(
            all[(i * bs as u64) as usize..][..bs] == want[..],
            "block {i} (round {round}) not in the cluster"
        );
        checked += 1;
    }
    eprintln!("{checked} acknowledged blocks read back");

    // The OSD stays down under requests in flight: `dev del` is not held up by librbd
    // beyond the runtime's stop timeout and the reference wait, and once the OSD is back
    // a new device on the image serves it.
    ceph.ctl("osd-stop");
    // (librbd's writeback cache may take the writes; the flush needs the OSD.)
    let mut ops: Vec<Op> = (0..8u64)
        .map(|k| Op::Write {
            offset: k * bs as u64,
            buf_off: 0,
            len: bs,
        })
        .collect();
    ops.push(Op::Flush);
    let stuck = c.try_run(0, &ops, Duration::from_secs(2));
    assert!(
        stuck.is_err(),
        "a flush completed with the OSD down: {stuck:?}"
    );
    let t = Instant::now();
    let (ok, _, err) = d.cli(&["dev", "del", "k0"]);
    let del = t.elapsed();
    eprintln!("dev del with the OSD down and a flush in flight: {del:?} ({ok}, {err})");
    // The device is gone at once; the queue worker, still waiting for librbd (which may
    // yet write into guest memory), is named as the holder and finishes on its own.
    assert!(
        ok || err.contains("Device k0 removed") && err.contains("worker k0-q0"),
        "{err}"
    );
    assert!(del < Duration::from_secs(15), "{del:?}");
    drop(c);
    ceph.ctl("osd-start");
    let conf = ceph.conf().display().to_string();
    let (ok, _, err) = d.cli(&[
        "dev", "add", "name", "k1", "mgmtdev", "blk", "backend", "rbd", "pool", "rbd", "image",
        "disk1", "conf", &conf,
    ]);
    assert!(ok, "{err}");
    let mut c = BlkClient::connect(&d.sock_str("k1"), 1, bs).unwrap();
    let i = (0..slots)
        .find(|&i| acked[i as usize].is_some() && !undefined[i as usize] && i >= 8)
        .unwrap();
    let r = Op::Read {
        offset: i * bs as u64,
        buf_off: 0,
        len: bs,
    };
    assert_eq!(c.run(0, &[r]), vec![0]);
    assert!(c.buf()[..bs] == block(acked[i as usize].unwrap(), i)[..]);
    drop(c);
    assert!(d.stop().success());
    ceph.rbd(&["rm", "--no-progress", "rbd/disk1"]);
}
