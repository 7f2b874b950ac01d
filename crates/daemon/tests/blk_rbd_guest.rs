//! A Linux guest (Debian's kernel under TCG, `tests/guest` matrix mode with the host's
//! fio, mkfs.ext4 and e2fsck over virtio-9p) on a uvdpa `rbd` disk, an image in a
//! single-node Ceph cluster started by the test (`scripts/ceph.sh`): O_DIRECT and buffered
//! read-back, discard and write-zeroes, writers on both queues, fio with verify, ext4 (mkfs,
//! files, fsck, remount, a punched hole).
//! Afterwards `rbd export` of the image is checked by the host's e2fsck. Runs in the
//! nextest `machine` group (one guest at a time).

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use std::process::Command;

use ceph::{rbd_config, Ceph};
use common::*;

/// The cases of `tests/guest/init`'s matrix mode this boot runs.
const CASES: &[&str] = &[
    "direct-4k",
    "direct-1m",
    "buffered-64k",
    "discard",
    "write-zeroes",
    "parallel",
    "fio",
    "ext4",
    "ext4-punch",
];

#[test]
fn guest_filesystem_on_an_rbd_disk() {
    build_initramfs();
    let ceph = Ceph::start("rbd-guest");
    ceph.rbd(&["create", "--size", "256M", "rbd/guest"]);
    let d = Daemon::start(
        "rbd-guest",
        &rbd_config("mx", &ceph, "guest", "queues = 2\n"),
        &["mx"],
    );
    let append = format!(
        "uvdpa.mib=4 uvdpa.case_timeout=90 uvdpa.cases={}",
        CASES.join(",")
    );
    let out = Command::new("bash")
        .arg(guest_dir().join("run-guest.sh"))
        .args(["--vhost-user-blk", &d.sock_str("mx")])
        .args(["--queues", "2", "--smp", "2", "--host-root", "--mem", "512"])
        .args(["--mode", "matrix", "--timeout", "270", "--append", &append])
        .output()
        .expect("run run-guest.sh");
    let console =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let results: Vec<(&str, bool)> = console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("UVDPA-CASE: ")? + "UVDPA-CASE: ".len()..];
            let (case, verdict) = rest.split_once(' ')?;
            Some((case, verdict.starts_with("PASS")))
        })
        .collect();
    let missing: Vec<&&str> = CASES
        .iter()
        .filter(|c| !results.iter().any(|r| r.0 == **c))
        .collect();
    let failed: Vec<&str> = results.iter().filter(|r| !r.1).map(|r| r.0).collect();
    for l in console.lines().filter(|l| l.contains("UVDPA-CASE: ")) {
        eprintln!("{l}");
    }
    assert!(
        out.status.success() && missing.is_empty() && failed.is_empty(),
        "guest on an rbd disk: failed {failed:?}, missing {missing:?}\n{console}\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(d.stop().success());
    // What the guest left is in the cluster: the image, exported, holds a clean ext4.
    let img = ceph.dir.join("guest.img");
    ceph.rbd(&[
        "export",
        "--no-progress",
        "rbd/guest",
        &img.display().to_string(),
    ]);
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&img)
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck of the exported image: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let _ = std::fs::remove_file(&img);
    ceph.rbd(&["rm", "--no-progress", "rbd/guest"]);
}
