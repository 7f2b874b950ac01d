//! The daemon's sandbox, end to end: queue workers run under their seccomp filter by
//! default (trap) while libblkio does verified I/O on ram and io_uring file devices, and
//! the control threads do not; `--seccomp off` leaves workers unfiltered; `--user nobody`
//! drops root after start-up, keeps serving, and refuses a VDUSE or tap device added later
//! with a clear error; an fd inherited from the parent is closed.
//!
//! That a forbidden call is stopped is shown where it can be provoked: the
//! `uvdpa-virtio` unit tests `sandbox::tests` (EPERM, the call recorded) and
//! `worker::tests::a_forbidden_system_call_fails_the_group_and_names_the_call` (the
//! device fails with the call named). Every daemon test checks, when its daemon goes
//! away, that no worker was stopped (`common::Daemon`'s drop).

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const MIB: u64 = 1 << 20;

/// Writes 64 blocks of 4 KiB, 32 at a time, and reads each batch back.
fn verified_io(sock: &Path, seed: u64) {
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, 32 * 4096).unwrap();
    for round in 0..2u64 {
        c.verify_round("sandbox", 0, round * 32 * 4096, 32, seed + round);
    }
}

/// One 4 KiB read: the queue's worker runs once it returns.
fn one_read(c: &mut BlkClient) {
    let r = c.run(
        0,
        &[Op::Read {
            offset: 0,
            buf_off: 0,
            len: 4096,
        }],
    );
    assert_eq!(r, vec![0]);
}

/// `Seccomp:` of each thread of `pid`, by thread name (0 none, 2 filter).
fn seccomp_by_thread(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(u32::MAX);
        out.push((comm.trim().to_string(), mode));
    }
    out
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap()
}

/// A file image on the real disk (io_uring), removed when dropped.
struct Image(std::path::PathBuf);

impl Image {
    fn new(tag: &str) -> Self {
        let p = std::path::PathBuf::from(format!(
            "/var/tmp/uvdpa-sandbox-{tag}-{}.img",
            std::process::id()
        ));
        std::fs::File::create(&p)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        Self(p)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn two_disks(img: &Image) -> String {
    format!(
        "{}{}",
        blk_config("ram0", "backend = \"ram\"\nsize = \"16M\""),
        blk_config(
            "file0",
            &format!("backend = \"file\"\npath = \"{}\"", img.0.display())
        )
    )
}

/// Spawns `uvdpa daemon --run-dir DIR --config DIR/uvdpa.toml ARGS`, with `pre_exec`.
fn spawn(tag: &str, config: &str, args: &[&str], names: &[&str], fd50: bool) -> Daemon {
    let dir = unique_dir(tag);
    let cfg = dir.join("uvdpa.toml");
    std::fs::write(&cfg, config).unwrap();
    let log = dir.join("daemon.log");
    let mut cmd = Command::new(uvdpa_bin());
    cmd.args(["daemon", "--run-dir"])
        .arg(&dir)
        .arg("--config")
        .arg(&cfg)
        .args(args)
        .env("UVDPA_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if fd50 {
        let f = std::fs::File::open("/etc/hostname").unwrap();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&f);
        // SAFETY: between fork and exec only dup2 (async-signal-safe) runs; `f` stays
        // open in the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 50) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn uvdpa daemon");
        drop(f);
        return Daemon::adopt(child, dir, log, names);
    }
    let child = cmd.spawn().expect("spawn uvdpa daemon");
    Daemon::adopt(child, dir, log, names)
}

#[test]
fn workers_run_filtered_by_default_and_serve_verified_io() {
    let img = Image::new("trap");
    let d = Daemon::start("sandbox-trap", &two_disks(&img), &["ram0", "file0"]);
    assert!(
        d.log_text().contains("mode=trap"),
        "no seccomp mode line: {}",
        d.log_excerpt(20)
    );
    for (n, name) in ["ram0", "file0"].iter().enumerate() {
        let sock = d.sock(name);
        let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, 4096).unwrap();
        one_read(&mut c);
        // While a frontend is attached its queue's worker exists: filtered (mode 2),
        // every other thread not.
        let threads = seccomp_by_thread(d.pid());
        let worker = format!("{name}-q0");
        assert!(
            threads.iter().any(|(t, m)| *t == worker && *m == 2),
            "{worker} is not filtered: {threads:?}"
        );
        assert!(
            threads
                .iter()
                .filter(|(t, _)| !t.contains("-q"))
                .all(|(_, m)| *m == 0),
            "a control thread is filtered: {threads:?}"
        );
        drop(c);
        verified_io(&sock, n as u64 + 1);
    }
    let log = d.log_text();
    assert!(!log.contains("forbidden system call"), "{log}");
}

#[test]
fn seccomp_off_leaves_workers_unfiltered() {
    let d = spawn(
        "sandbox-off",
        &blk_config("ram0", "backend = \"ram\"\nsize = \"16M\""),
        &["--seccomp", "off"],
        &["ram0"],
        false,
    );
    let sock = d.sock("ram0");
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, 4096).unwrap();
    one_read(&mut c);
    let threads = seccomp_by_thread(d.pid());
    assert!(threads.iter().any(|(t, _)| t == "ram0-q0"), "{threads:?}");
    assert!(threads.iter().all(|(_, m)| *m == 0), "{threads:?}");
}

#[test]
fn an_unknown_seccomp_mode_is_refused() {
    let out = Command::new(uvdpa_bin())
        .args(["daemon", "--seccomp", "strict"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("strict"));
    let dir = unique_dir("sandbox-badmode");
    let cfg = dir.join("uvdpa.toml");
    std::fs::write(&cfg, "seccomp = \"strict\"\n").unwrap();
    let out = Command::new(uvdpa_bin())
        .args(["daemon", "--check-config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seccomp") && err.contains("strict"), "{err}");
}

#[test]
fn user_nobody_drops_root_keeps_serving_and_refuses_vduse_later() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let img = Image::new("user");
    let d = spawn(
        "sandbox-user",
        &two_disks(&img),
        &["--user", "nobody"],
        &["ram0", "file0"],
        false,
    );
    // The drop happens after the sockets exist: wait for its log line.
    let t0 = std::time::Instant::now();
    while !d.log_text().contains("dropped root") {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "{}",
            d.log_excerpt(30)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let nobody = uzers_uid("nobody");
    let uids = status_field(d.pid(), "Uid:");
    assert!(
        uids.split_whitespace().all(|u| u == nobody.to_string()),
        "Uid: {uids}"
    );
    let gids = status_field(d.pid(), "Groups:");
    assert!(!gids.split_whitespace().any(|g| g == "0"), "Groups: {gids}");
    assert_eq!(status_field(d.pid(), "NoNewPrivs:"), "1");
    verified_io(&d.sock("ram0"), 7);
    verified_io(&d.sock("file0"), 8);
    // A vhost-user device added now works (the run directory is the daemon's).
    let (ok, _, err) = d.cli(&[
        "dev", "add", "name", "late", "mgmtdev", "blk", "backend", "ram", "size", "1M",
    ]);
    assert!(ok, "{err}");
    verified_io(&d.sock("late"), 9);
    // A VDUSE device needs root: a clear refusal, and the daemon goes on.
    let (ok, _, err) = d.cli(&[
        "dev",
        "add",
        "name",
        "vd",
        "mgmtdev",
        "blk",
        "backend",
        "ram",
        "size",
        "1M",
        "transport",
        "vduse",
    ]);
    assert!(!ok);
    assert!(
        err.contains("A VDUSE device needs root") && err.contains("--user"),
        "{err}"
    );
    // So does a tap device (CAP_NET_ADMIN).
    let (ok, _, err) = d.cli(&[
        "dev", "add", "name", "t0", "mgmtdev", "net", "backend", "tap",
    ]);
    assert!(!ok);
    assert!(err.contains("A tap device needs root"), "{err}");
    let (ok, _, err) = d.cli(&["dev", "del", "late"]);
    assert!(ok, "{err}");
    verified_io(&d.sock("ram0"), 10);
}

fn uzers_uid(name: &str) -> u32 {
    let out = Command::new("id").args(["-u", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn an_inherited_fd_is_closed_at_start() {
    let d = spawn(
        "sandbox-fd",
        &blk_config("ram0", "backend = \"ram\"\nsize = \"16M\""),
        &[],
        &["ram0"],
        true,
    );
    let fd50 = Path::new("/proc").join(d.pid().to_string()).join("fd/50");
    assert!(
        std::fs::symlink_metadata(&fd50).is_err(),
        "fd 50 is still open: {:?}",
        std::fs::read_link(&fd50)
    );
    // Every fd it holds is one of its own: nothing points at the file we passed.
    for fd in std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert_ne!(target, Path::new("/etc/hostname"), "{:?}", fd.path());
    }
    verified_io(&d.sock("ram0"), 3);
}
