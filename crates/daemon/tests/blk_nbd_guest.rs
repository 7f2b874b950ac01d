//! A Linux guest (Debian's kernel under TCG, `tests/guest` matrix mode with the host's
//! fio, mkfs.ext4 and e2fsck over virtio-9p) on a uvdpa `nbd` disk whose export is an
//! nbdkit `file` plugin over an image on the real disk: O_DIRECT and buffered I/O read
//! back, discard and write-zeroes, fio with verify, ext4 (mkfs, files, fsck, remount, a
//! punched hole). Runs in the nextest `machine` group (one guest at a time).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// nbdkit on a Unix socket, killed when dropped.
struct Nbdkit(Child, PathBuf);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdkit_file(dir: &Path, img: &Path) -> Nbdkit {
    let bin = Path::new("/usr/bin/nbdkit");
    assert!(
        bin.exists(),
        "nbdkit is not installed: run scripts/install-deps.sh (Debian package nbdkit)"
    );
    let sock = dir.join("guest.nbd");
    let child = Command::new(bin)
        .args(["--foreground", "--unix"])
        .arg(&sock)
        .arg("file")
        .arg(format!("file={}", img.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("nbdkit.log")).unwrap())
        .spawn()
        .expect("spawn nbdkit");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "nbdkit did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nbdkit(child, sock)
}

#[test]
fn guest_filesystem_on_an_nbd_disk() {
    build_initramfs();
    let dir = disk_dir("nbd-guest");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let srv = nbdkit_file(&dir, &img);
    let uri = format!("nbd+unix:///?socket={}", srv.1.display());
    let d = Daemon::start(
        "nbd-guest",
        &blk_config(
            "mx",
            &format!("backend = \"nbd\"\nuri = \"{uri}\"\nqueues = 2\nreconnect_delay = 5\n"),
        ),
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
    assert!(
        out.status.success() && missing.is_empty() && failed.is_empty(),
        "guest on an nbd disk: failed {failed:?}, missing {missing:?}\n{console}\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(d.stop().success());
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}
