//! A real Linux guest (Debian's kernel under `qemu-system-x86_64 -accel tcg`, busybox
//! initramfs from `tests/guest/`) drives uvdpa's virtio-blk over vhost-user with its own
//! virtio_blk driver: O_DIRECT writes at offsets over the whole disk, read back and compared
//! inside the guest.

mod common;

use std::process::Command;

use common::*;

/// Boots the guest against `sock`; returns (exit code, console output).
fn run_guest(sock: &str, queues: u32, smp: u32, extra: &[&str]) -> (i32, String) {
    build_initramfs();
    let out = Command::new("bash")
        .arg(guest_dir().join("run-guest.sh"))
        .args([
            "--vhost-user-blk",
            sock,
            "--queues",
            &queues.to_string(),
            "--smp",
            &smp.to_string(),
        ])
        .args(["--timeout", "240"])
        .args(extra)
        .output()
        .expect("run run-guest.sh");
    let console =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), console)
}

fn result_line(console: &str) -> String {
    console
        .lines()
        .find(|l| l.contains("UVDPA-GUEST-RESULT:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

#[test]
fn guest_verifies_ram_disk_one_queue() {
    let d = Daemon::start(
        "g1",
        &blk_config("g1", "backend = \"ram\"\nsize = \"256M\""),
        &["g1"],
    );
    let (code, console) = run_guest(
        &d.sock_str("g1"),
        1,
        1,
        &["--mode", "verify", "--count", "16"],
    );
    let line = result_line(&console);
    assert_eq!(
        code,
        0,
        "guest failed: {line}\n{console}\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(line.contains("PASS") && line.contains("queues=1"), "{line}");
    assert!(d.stop().success());
}

#[test]
fn guest_verifies_two_queues_with_two_vcpus() {
    let d = Daemon::start(
        "g2",
        &blk_config("g2", "backend = \"ram\"\nsize = \"128M\"\nqueues = 2"),
        &["g2"],
    );
    let (code, console) = run_guest(
        &d.sock_str("g2"),
        2,
        2,
        &["--mode", "verify", "--count", "24"],
    );
    let line = result_line(&console);
    assert_eq!(
        code,
        0,
        "guest failed: {line}\n{console}\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(line.contains("PASS") && line.contains("queues=2"), "{line}");
    assert!(d.stop().success());
}

#[test]
fn guest_writes_land_in_the_backing_file() {
    let dir = unique_dir("gfile");
    let img = dir.join("guest.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let cfg = blk_config(
        "gf",
        &format!("backend = \"file\"\npath = \"{}\"", img.display()),
    );
    let d = Daemon::start_in(dir, &cfg, &["gf"]);
    let (code, console) = run_guest(
        &d.sock_str("gf"),
        1,
        1,
        &[
            "--mode", "write", "--seed", "42", "--count", "8", "--bs", "65536",
        ],
    );
    let line = result_line(&console);
    assert_eq!(
        code,
        0,
        "guest failed: {line}\n{console}\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(d.stop().success(), "daemon did not exit cleanly");
    // After the daemon has exited, the file must hold exactly what the guest wrote.
    let st = Command::new("bash")
        .arg(guest_dir().join("check-image.sh"))
        .arg(&img)
        .arg(&line)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "backing file does not hold the guest's data ({line})"
    );
}

#[test]
fn guest_verifies_a_device_created_at_run_time_with_dev_add() {
    let d = Daemon::start("gadd", "", &[]);
    // The control socket comes up with the daemon; wait for it.
    for _ in 0..500 {
        if d.dir.join("uvdpa.ctl").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (ok, _, err) = d.cli(&[
        "dev", "add", "name", "qa", "mgmtdev", "blk", "backend", "ram", "size", "128M",
    ]);
    assert!(ok, "dev add: {err}");
    let (code, console) = run_guest(
        &d.sock_str("qa"),
        1,
        1,
        &["--mode", "verify", "--count", "16"],
    );
    let line = result_line(&console);
    assert_eq!(
        code,
        0,
        "guest failed: {line}\n{console}\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(line.contains("PASS"), "{line}");
    let (ok, _, err) = d.cli(&["dev", "del", "qa"]);
    assert!(ok, "dev del: {err}");
    assert!(d.stop().success());
}

/// Seed 004 / issue 5: the daemon is killed with SIGKILL while the guest writes and
/// verifies in a loop; a new daemon on the same config comes up, QEMU reconnects
/// (`reconnect=1`), the in-flight requests recorded in the inflight buffer
/// (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) are resubmitted, and the guest sees no I/O error
/// and reads back every write it was told completed.
#[test]
fn daemon_killed_mid_write_is_restarted_and_the_guest_sees_no_error() {
    daemon_killed_mid_write(false);
}

/// Issue 11: the same over packed virtqueues (`packed=on`): the inflight buffer has the
/// packed layout, and the new daemon resumes the ring from it (QEMU hands back the vring
/// base the dead daemon started from), resubmitting the chains in flight from their saved
/// copies. The file backend completes out of order (io_uring), so the used position is
/// not the avail position when the daemon dies.
#[test]
fn daemon_killed_mid_write_packed_ring_is_restarted_and_the_guest_sees_no_error() {
    let log = daemon_killed_mid_write(true);
    assert!(
        !log.contains("inflight region not usable")
            && !log.contains("has no region for this vring"),
        "inflight tracking not used on the packed ring:\n{log}"
    );
    for l in log.lines().filter(|l| l.contains("resubmitting inflight")) {
        eprintln!("restarted daemon: {l}");
    }
}

/// Boots a guest writing and verifying in a loop against a file-backed device, kills the
/// daemon after round 3 and starts a new one; checks the guest passed. Returns the
/// restarted daemon's log.
fn daemon_killed_mid_write(packed: bool) -> String {
    use std::io::BufRead;
    build_initramfs();
    let tag = if packed { "gkillp" } else { "gkill" };
    let dir = unique_dir(tag);
    let img = dir.join("kill.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cfg = blk_config(
        "gk",
        &format!("backend = \"file\"\npath = \"{}\"", img.display()),
    );
    let d = Daemon::start_in(dir.clone(), &cfg, &["gk"]);
    let sock = d.sock_str("gk");
    let mut child = Command::new("bash")
        .arg(guest_dir().join("run-guest.sh"))
        .args([
            "--vhost-user-blk",
            &sock,
            "--reconnect",
            "1",
            "--mode",
            "loop",
            "--secs",
            "45",
        ])
        .args(["--count", "8", "--bs", "65536", "--timeout", "300"])
        .args(packed.then_some("--packed"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut console = String::new();
    let mut daemon = Some(d);
    let mut restarted = None;
    for line in lines.map_while(Result::ok) {
        console.push_str(&line);
        console.push('\n');
        if line.contains("round 3 ok") {
            if let Some(d) = daemon.take() {
                if packed {
                    let negotiated = d.cli_json(&["dev", "show", "gk"]).to_string();
                    assert!(
                        negotiated.contains("RING_PACKED"),
                        "the guest did not negotiate packed rings: {negotiated}"
                    );
                }
                // Crash the backend mid-loop, then bring a new one up on the same files.
                d.kill();
                std::thread::sleep(std::time::Duration::from_millis(500));
                restarted = Some(Daemon::start_in(dir.clone(), &cfg, &["gk"]));
            }
        }
    }
    let status = child.wait().unwrap();
    let line = result_line(&console);
    let d2 = restarted.expect("the guest never reached round 3");
    assert!(
        status.success() && line.contains("PASS") && line.contains("ioerrors=0"),
        "guest result: {line}\n{console}\nrestarted daemon log:\n{}",
        d2.log_text()
    );
    let rounds: u32 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rounds="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        rounds > 3,
        "the loop did not continue after the restart: {line}"
    );
    let log = d2.log_text();
    assert!(d2.stop().success());
    log
}

/// Issue 5: the frontend (QEMU) is killed with SIGKILL in the middle of a guest's
/// write/verify loop; the device returns to `ready`, every resource of the session is
/// released (restrack counts back to baseline), and a new frontend works.
#[test]
fn frontend_killed_mid_io_releases_everything_and_a_new_frontend_works() {
    use std::io::BufRead;
    build_initramfs();
    let d = Daemon::start(
        "gfk",
        &blk_config("fk", "backend = \"ram\"\nsize = \"64M\"\nqueues = 2"),
        &["fk"],
    );
    for _ in 0..500 {
        if d.dir.join("uvdpa.ctl").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let base = d.cli_json(&["res", "show"])["counts"].clone();
    let pidfile = d.dir.join("qemu.pid");
    let mut child = Command::new("bash")
        .arg(guest_dir().join("run-guest.sh"))
        .args([
            "--vhost-user-blk",
            &d.sock_str("fk"),
            "--queues",
            "2",
            "--smp",
            "2",
        ])
        .args(["--mode", "loop", "--secs", "120", "--timeout", "200"])
        .arg("--qemu-pidfile")
        .arg(&pidfile)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut killed = false;
    for line in lines.map_while(Result::ok) {
        if line.contains("round 2 ok") {
            let pid = std::fs::read_to_string(&pidfile)
                .unwrap()
                .trim()
                .to_string();
            let st = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
            assert!(st.success(), "could not kill QEMU {pid}");
            killed = true;
            break;
        }
    }
    assert!(killed, "the guest never reached round 2");
    let _ = child.wait();
    // The session ends, its vrings stop, and every resource it held is released.
    let mut last = (String::new(), serde_json::Value::Null);
    for _ in 0..500 {
        let state = d.cli_json(&["dev", "show", "fk"])["dev"][0]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let counts = d.cli_json(&["res", "show"])["counts"].clone();
        if state == "ready" && counts == base {
            last = (state, counts);
            break;
        }
        last = (state, counts);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(last.0, "ready", "device did not return to ready");
    assert_eq!(
        last.1, base,
        "resources not released after the frontend died"
    );
    // A new frontend works.
    let mut c = BlkClient::connect(&d.sock_str("fk"), 2, 4096).unwrap();
    c.buf().fill(0x6b);
    assert_eq!(
        c.run(
            1,
            &[Op::Write {
                offset: 8192,
                buf_off: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    c.buf().fill(0);
    assert_eq!(
        c.run(
            0,
            &[Op::Read {
                offset: 8192,
                buf_off: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    assert!(c.buf().iter().all(|&b| b == 0x6b));
    drop(c);
    assert!(d.stop().success());
}
