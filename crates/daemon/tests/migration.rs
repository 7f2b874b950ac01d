//! Live migration of a VM with a uvdpa vhost-user-blk disk (issue 11, part 1): two QEMU
//! processes (TCG) on this machine, the source and a destination started with
//! `-incoming`, each attached to its own uvdpa device on the same `file` image, migrated
//! through QMP while the guest (`uvdpa.mode=migrate` in tests/guest/init) writes and
//! reads back stamped blocks and checks that device writes into its RAM (page cache
//! filled by reads) are intact. The guest finishes its loop on the destination.
//!
//! The daemon's dirty-logging switch `UVDPA_DIRTY_LOG` (see the vhost-user crate) shows
//! the test is real: `off` makes QEMU refuse to migrate (migration blocker), `skip`
//! (offered but not done) lets the migration lose device writes.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A QMP connection (QEMU's JSON monitor).
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    /// Connects (waiting up to 60 s for QEMU to create the socket) and leaves
    /// capabilities negotiation mode.
    fn connect(path: &Path) -> Qmp {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(60) => {
                    panic!("QMP socket {} not up: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.cmd("qmp_capabilities", json!({})).unwrap();
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("QMP read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP reply {line:?}: {e}"))
    }

    /// Runs a command; its `return`, or the `error` description.
    fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({ "execute": execute, "arguments": arguments });
        writeln!(self.w, "{msg}").expect("QMP write");
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e["desc"].as_str().unwrap_or("?").to_string());
            }
            // An asynchronous event: skip.
        }
    }
}

/// One run-guest.sh (one QEMU) whose console is collected by a thread.
struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    pidfile: PathBuf,
}

impl Guest {
    fn spawn(dir: &Path, name: &str, sock: &str, extra_qemu: &str, args: &[&str]) -> Guest {
        let pidfile = dir.join(format!("{name}.qemu.pid"));
        let mut child = Command::new("bash")
            .arg(guest_dir().join("run-guest.sh"))
            .args(["--vhost-user-blk", sock, "--qemu-pidfile"])
            .arg(&pidfile)
            .args(args)
            .env("QEMU_EXTRA", extra_qemu)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run run-guest.sh");
        let console = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let c = console.clone();
        let reader = std::thread::spawn(move || {
            let c2 = c.clone();
            let e = std::thread::spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut s = c2.lock().unwrap();
                    s.push_str(&l);
                    s.push('\n');
                }
            });
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = c.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
            let _ = e.join();
        });
        Guest {
            child,
            console,
            reader: Some(reader),
            pidfile,
        }
    }

    fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Waits until the console shows `what` (panics after `secs`).
    fn wait_for(&self, what: &str, secs: u64) {
        let t = Instant::now();
        while !self.console().contains(what) {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "no {what:?} on the console within {secs} s:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for run-guest.sh to exit; its exit code and the whole console.
    fn finish(mut self) -> (i32, String) {
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        (code, self.console())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // A failed test must not leave QEMU running.
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid).unwrap(),
                    rustix::process::Signal::KILL,
                );
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn result_line(console: &str) -> String {
    console
        .lines()
        .find(|l| l.contains("UVDPA-GUEST-RESULT:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The guest CPU, overriding run-guest.sh's `-cpu max`: without 5-level paging. With
/// LA57 a TCG guest crashed on the destination once in about eight migrations (recursive
/// page faults in the kernel's page fault entry right after the switchover; QEMU 7.2);
/// none in the runs since it is off. The cause was not isolated further.
const CPU: &str = "-cpu max,la57=off";

/// What one migration run saw.
struct Outcome {
    /// run-guest.sh's exit code on the destination (0: the guest passed there).
    code: i32,
    /// The destination's console (everything the guest printed after the switchover).
    console: String,
    /// query-migrate's final answer on the source.
    info: Value,
    daemon_log: String,
}

/// Boots the source guest on device `src`, starts the destination QEMU (`-incoming`) on
/// device `dst` (the same image file), migrates once the guest runs its loop, and lets
/// the guest finish on the destination. `dirty_log` is the daemon's UVDPA_DIRTY_LOG.
fn migrate(tag: &str, packed: bool, dirty_log: &str) -> Outcome {
    build_initramfs();
    let dir = unique_dir(tag);
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dev = |name: &str| {
        blk_config(
            name,
            &format!("backend = \"file\"\npath = \"{}\"", img.display()),
        )
    };
    let cfg = dev("src") + &dev("dst");
    let d = Daemon::start_in_env(
        dir.clone(),
        &cfg,
        &["src", "dst"],
        &[("UVDPA_DIRTY_LOG", dirty_log)],
    );
    let mig = dir.join("mig.sock");
    let (qs, qd) = (dir.join("qmp-src.sock"), dir.join("qmp-dst.sock"));
    let mut args = vec![
        "--mode",
        "migrate",
        "--secs",
        "40",
        "--count",
        "4",
        "--bs",
        "65536",
        "--timeout",
        "240",
    ];
    if packed {
        args.push("--packed");
    }
    // Debian's kernel zeroes every page it allocates (init_on_alloc=1): a CPU write
    // right before the device fills a fresh page cache page, which QEMU's own dirty
    // tracking sees, and that hides most device writes the dirty log would have to
    // report. Off, the device's writes are the only ones into those pages.
    args.extend(["--append", "init_on_alloc=0"]);
    let dst = Guest::spawn(
        &dir,
        "dst",
        &d.sock_str("dst"),
        &format!(
            "{CPU} -incoming unix:{} -qmp unix:{},server=on,wait=off",
            mig.display(),
            qd.display()
        ),
        &args,
    );
    let mut qmp_dst = Qmp::connect(&qd);
    let src = Guest::spawn(
        &dir,
        "src",
        &d.sock_str("src"),
        &format!("{CPU} -qmp unix:{},server=on,wait=off", qs.display()),
        &args,
    );
    let mut qmp = Qmp::connect(&qs);
    src.wait_for("uvdpa-guest: round 1 ok", 180);
    // Timed so that the device writes into guest RAM while pages are copied, and the
    // guest checks that RAM on the destination: a low bandwidth and a downtime limit QEMU
    // cannot meet keep the migration iterating after its first pass; once that pass is
    // done and the guest has read its known region again (into page-cache pages already
    // copied once), the limit is raised and QEMU switches over, most likely before the
    // guest's second check of that region.
    qmp.cmd(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 32u64 << 20, "downtime-limit": 1 }),
    )
    .unwrap();
    let t = Instant::now();
    qmp.cmd(
        "migrate",
        json!({ "uri": format!("unix:{}", mig.display()) }),
    )
    .unwrap_or_else(|e| panic!("migrate refused: {e}"));
    let done = |info: &Value| {
        matches!(
            info["status"].as_str(),
            Some("completed") | Some("failed") | Some("cancelled")
        )
    };
    let mut released = false;
    let mut reads_at_pass = None;
    let info = loop {
        let info = qmp.cmd("query-migrate", json!({})).unwrap();
        if done(&info) {
            break info;
        }
        let reads = src.console().matches(": known region read").count();
        let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        if !released && syncs >= 2 {
            // The first pass is over: wait for the guest's next read of the region.
            let at = *reads_at_pass.get_or_insert(reads);
            if reads > at || t.elapsed() > Duration::from_secs(60) {
                qmp.cmd("migrate-set-parameters", json!({ "downtime-limit": 2000 }))
                    .unwrap();
                released = true;
                eprintln!(
                    "switchover allowed after {:.1} s ({syncs} dirty syncs)",
                    t.elapsed().as_secs_f64()
                );
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "migration did not end within 120 s: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "migration {} in {:.1} s: {info}",
        info["status"],
        t.elapsed().as_secs_f64()
    );
    let dst_status = qmp_dst.cmd("query-status", json!({})).unwrap();
    eprintln!("destination: {dst_status}");
    // The source is paused for good; QEMU would stay up until its timeout.
    let _ = qmp.cmd("quit", json!({}));
    let (_, src_console) = src.finish();
    eprintln!(
        "source console, last lines:\n{}",
        src_console
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (code, console) = dst.finish();
    let daemon_log = d.log_text();
    assert!(d.stop().success(), "daemon did not exit cleanly");
    let _ = std::fs::remove_dir_all(&dir);
    Outcome {
        code,
        console,
        info,
        daemon_log,
    }
}

/// Asserts a migration went through and the guest passed every check on the destination.
fn assert_migrated(o: &Outcome) {
    let line = result_line(&o.console);
    assert_eq!(
        o.info["status"], "completed",
        "migration: {}\ndaemon log:\n{}",
        o.info, o.daemon_log
    );
    assert!(
        o.code == 0 && line.contains("PASS"),
        "guest on the destination: {line}\n{}\ndaemon log:\n{}",
        o.console,
        o.daemon_log
    );
    let rounds_after = o.console.matches(" ok\n").count();
    assert!(
        rounds_after >= 1,
        "no round completed on the destination:\n{}",
        o.console
    );
    eprintln!("destination: {rounds_after} rounds after the switchover; {line}");
    assert!(
        o.daemon_log.contains("dirty log set")
            && o.daemon_log.contains("VHOST_F_LOG_ALL) switched"),
        "the migration did not go through dirty logging:\n{}",
        o.daemon_log
    );
}

#[test]
fn guest_migrates_between_two_qemus_with_its_data_intact() {
    let o = migrate("mig", false, "on");
    assert_migrated(&o);
}

#[test]
fn packed_ring_guest_migrates_with_its_data_intact() {
    let o = migrate("migp", true, "on");
    assert_migrated(&o);
    // Both devices ran packed rings (VIRTIO_F_RING_PACKED, bit 34, in what was acked).
    let packed = o
        .daemon_log
        .lines()
        .filter(|l| l.contains("features acked"))
        .filter_map(|l| l.split("features=0x").nth(1))
        .filter_map(|h| u64::from_str_radix(h.split_whitespace().next()?, 16).ok())
        .filter(|f| f & (1 << 34) != 0)
        .count();
    assert!(
        packed >= 2,
        "packed rings not negotiated:\n{}",
        o.daemon_log
    );
}

/// Without VHOST_F_LOG_ALL (UVDPA_DIRTY_LOG=off) QEMU refuses to migrate the VM.
#[test]
fn without_dirty_logging_qemu_refuses_to_migrate() {
    build_initramfs();
    let dir = unique_dir("migoff");
    let d = Daemon::start_in_env(
        dir.clone(),
        &blk_config("off", "backend = \"ram\"\nsize = \"64M\""),
        &["off"],
        &[("UVDPA_DIRTY_LOG", "off")],
    );
    let qs = dir.join("qmp.sock");
    let g = Guest::spawn(
        &dir,
        "off",
        &d.sock_str("off"),
        &format!("-qmp unix:{},server=on,wait=off", qs.display()),
        &["--mode", "loop", "--secs", "600", "--timeout", "120"],
    );
    let mut qmp = Qmp::connect(&qs);
    g.wait_for("uvdpa-guest: disk vda found", 120);
    let mig = dir.join("nowhere.sock");
    let err = qmp
        .cmd(
            "migrate",
            json!({ "uri": format!("unix:{}", mig.display()) }),
        )
        .expect_err("migration must be blocked");
    eprintln!("migrate refused: {err}");
    // QEMU names the first missing piece: LOG_SHMFD (vhost-user) or VHOST_F_LOG_ALL.
    assert!(
        err.contains("Migration disabled") && err.contains("LOG_"),
        "unexpected refusal: {err}"
    );
    let _ = qmp.cmd("quit", json!({}));
    drop(g);
    assert!(d.stop().success());
}

/// The proof that the migration test is real: with logging offered but not done
/// (UVDPA_DIRTY_LOG=skip) the guest's checks fail on the destination (or it hangs on a
/// stale used ring). Not in CI: it runs several migrations and is about the test, not
/// the product. Run with `--run-ignored only`.
#[test]
#[ignore]
fn without_dirty_logging_the_migration_test_fails() {
    let attempts: usize = std::env::var("MIGRATION_SKIP_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut failed = 0;
    for i in 0..attempts {
        let o = migrate(&format!("migskip{i}"), false, "skip");
        let line = result_line(&o.console);
        let fail_lines: Vec<&str> = o.console.lines().filter(|l| l.contains("FAIL")).collect();
        eprintln!(
            "attempt {i}: migration {}, guest exit {}, {line:?} {fail_lines:?}",
            o.info["status"], o.code
        );
        if o.code != 0 {
            failed += 1;
        }
    }
    eprintln!("{failed} of {attempts} migrations without dirty logging failed the guest's checks");
    assert!(
        failed > 0,
        "the test never caught the missing dirty logging"
    );
}
