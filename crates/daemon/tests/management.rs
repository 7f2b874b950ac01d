//! The management plane end to end: the `uvdpa` CLI (a secondary) against a running
//! daemon (the primary) — golden JSON for every `show`, error messages, run-time device
//! lifecycle under libblkio I/O, and the resource tracker's accounting.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compares with a committed golden file (`UVDPA_BLESS=1` rewrites it).
fn golden(name: &str, v: &Value) {
    let text = serde_json::to_string_pretty(v).unwrap() + "\n";
    let p = golden_path(name);
    if std::env::var_os("UVDPA_BLESS").is_some() {
        std::fs::write(&p, &text).unwrap();
    }
    let want = std::fs::read_to_string(&p)
        .unwrap_or_else(|_| panic!("missing golden file {}", p.display()));
    assert_eq!(text, want, "output differs from {}", p.display());
}

/// Replaces run-specific values (paths, pids, times) with placeholders.
fn normalize(mut v: Value, dir: &str) -> Value {
    fn walk(v: &mut Value, dir: &str) {
        match v {
            Value::String(s) => *s = s.replace(dir, "RUNDIR"),
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, dir)),
            Value::Object(o) => {
                for (k, x) in o.iter_mut() {
                    match k.as_str() {
                        "owner_pid" | "created_unix_ms" | "frontend_pid" if !x.is_null() => {
                            *x = Value::from(0)
                        }
                        "owner_comm" => *x = Value::from("COMM"),
                        _ => walk(x, dir),
                    }
                }
            }
            _ => {}
        }
    }
    walk(&mut v, dir);
    v
}

#[test]
fn golden_json_for_every_show_command() {
    let d = Daemon::start(
        "gold",
        &blk_config(
            "g0",
            "backend = \"ram\"\nsize = \"8M\"\nqueues = 2\nserial = \"gold\"",
        ),
        &["g0"],
    );
    let dir = d.dir.display().to_string();
    golden("mgmtdev_show.json", &d.cli_json(&["mgmtdev", "show"]));
    golden(
        "dev_show.json",
        &normalize(d.cli_json(&["dev", "show", "g0"]), &dir),
    );
    golden(
        "dev_config_show.json",
        &d.cli_json(&["dev", "config", "show", "g0"]),
    );
    golden(
        "dev_vstats_show.json",
        &d.cli_json(&["dev", "vstats", "show", "g0", "qidx", "1"]),
    );
    golden(
        "res_show.json",
        &normalize(d.cli_json(&["res", "show"]), &dir),
    );
    golden(
        "res_show_dev.json",
        &normalize(d.cli_json(&["res", "show", "dev"]), &dir),
    );
    // A connected frontend shows up in dev show and res show.
    let mut c = BlkClient::connect(&d.sock_str("g0"), 2, 4096).unwrap();
    assert_eq!(
        c.run(
            0,
            &[Op::Read {
                offset: 0,
                buf_off: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    let show = d.cli_json(&["dev", "show", "g0"]);
    let dev = &show["dev"][0];
    assert_eq!(dev["state"], "live");
    assert_eq!(dev["frontend_pid"], std::process::id());
    assert!(dev["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "VIRTIO_F_VERSION_1"));
    let counts = &d.cli_json(&["res", "show"])["counts"];
    assert_eq!(counts["session"], 1);
    assert_eq!(counts["vq"], 2);
    assert_eq!(counts["worker"], 2);
    assert!(counts["mr"].as_u64().unwrap() >= 1);
    let vs = d.cli_json(&["dev", "vstats", "show", "g0", "qidx", "0"]);
    assert_eq!(vs["vstats"]["requests"], 1);
    assert_eq!(vs["vstats"]["bytes_written"], 4097);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn cli_errors_name_the_problem() {
    let d = Daemon::start(
        "errs",
        &blk_config("e0", "backend = \"null\"\nsize = \"1M\""),
        &["e0"],
    );
    let fails = |args: &[&str], needle: &str| {
        let (ok, out, err) = d.cli(args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(
            err.contains(needle),
            "{args:?}: stderr {err:?} lacks {needle:?}"
        );
    };
    fails(&["dev", "show", "nope"], "No device named \"nope\"");
    fails(&["dev", "del", "nope"], "No device named \"nope\"");
    fails(&["dev", "config", "show", "nope"], "nope");
    fails(&["dev", "vstats", "show", "e0", "qidx", "7"], "no queue 7");
    fails(
        &["dev", "add", "name", "e0", "mgmtdev", "blk", "size", "1M"],
        "already exists",
    );
    fails(
        &[
            "dev",
            "add",
            "name",
            "e1",
            "mgmtdev",
            "blk",
            "size",
            "1M",
            "queue_size",
            "100",
        ],
        "queue_size",
    );
    fails(
        &[
            "dev", "add", "name", "e1", "mgmtdev", "blk", "size", "1M", "queues", "99",
        ],
        "1..=64",
    );
    fails(&["dev", "add", "name", "e1", "mgmtdev", "net"], "mgmtdev");
    fails(
        &[
            "dev",
            "add",
            "name",
            "e1",
            "mgmtdev",
            "blk",
            "backend",
            "file",
            "path",
            "/nonexistent/x",
        ],
        "/nonexistent/x",
    );
    fails(
        &[
            "dev", "add", "name", "e1", "mgmtdev", "blk", "colour", "red",
        ],
        "colour",
    );
    fails(&["res", "show", "colour"], "colour");
    fails(&["dev", "frobnicate"], "frobnicate");
    let (ok, _, err) = Daemon::cli_at(&d.dir.join("missing.ctl"), &["dev", "show"]);
    assert!(!ok && err.contains("Cannot reach the daemon"), "{err}");
    // Nothing was created by the failed adds.
    assert_eq!(
        d.cli_json(&["dev", "show"])["dev"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(d.stop().success());
}

#[test]
fn add_del_cycles_under_io_return_everything_to_baseline() {
    let mut d = Daemon::start(
        "cycles",
        &blk_config("keep", "backend = \"null\"\nsize = \"1M\""),
        &["keep"],
    );
    let base_counts = d.cli_json(&["res", "show"])["counts"].clone();
    let (base_fds, base_threads) = d.fds_and_threads();
    for i in 0..100 {
        let name = format!("c{i}");
        let (ok, _, err) = d.cli(&[
            "dev", "add", "name", &name, "mgmtdev", "blk", "backend", "ram", "size", "4M",
            "queues", "2",
        ]);
        assert!(ok, "dev add {name}: {err}");
        let mut c = BlkClient::connect(&d.sock_str(&name), 2, 4 * 4096).unwrap();
        let data = pattern(i, 4 * 4096);
        c.buf().copy_from_slice(&data);
        let w: Vec<Op> = (0..4)
            .map(|k| Op::Write {
                offset: k * 4096,
                buf_off: k as usize * 4096,
                len: 4096,
            })
            .collect();
        assert!(c.run((i % 2) as usize, &w).iter().all(|&r| r == 0));
        c.buf().fill(0);
        let r: Vec<Op> = (0..4)
            .map(|k| Op::Read {
                offset: k * 4096,
                buf_off: k as usize * 4096,
                len: 4096,
            })
            .collect();
        assert!(c.run((i % 2) as usize, &r).iter().all(|&r| r == 0));
        assert!(c.buf() == &data[..]);
        // Delete while the frontend is still connected.
        let (ok, _, err) = d.cli(&["dev", "del", &name]);
        assert!(ok, "dev del {name}: {err}");
        assert!(!d.sock(&name).exists());
        drop(c);
    }
    // The CLI's own IPC client has gone by the time the next one asks.
    let mut counts = Value::Null;
    for _ in 0..100 {
        counts = d.cli_json(&["res", "show"])["counts"].clone();
        if counts == base_counts {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        counts, base_counts,
        "resource counts did not return to baseline"
    );
    // The last CLI client's thread may still be exiting: let it settle (bounded).
    let mut now = d.fds_and_threads();
    for _ in 0..100 {
        if now.0 <= base_fds + 2 && now.1 <= base_threads {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        now = d.fds_and_threads();
    }
    let (fds, threads) = now;
    println!("baseline fds {base_fds} threads {base_threads}; after 100 cycles fds {fds} threads {threads}");
    assert!(fds <= base_fds + 2, "fd leak: {base_fds} -> {fds}");
    assert!(
        threads <= base_threads,
        "thread leak: {base_threads} -> {threads}"
    );
    assert!(d.alive());
    assert!(d.stop().success());
}

#[test]
fn dev_del_during_io_completes_or_fails_but_never_hangs() {
    let d = Daemon::start(
        "delio",
        &blk_config("keep", "backend = \"null\"\nsize = \"1M\""),
        &["keep"],
    );
    let (ok, _, err) = d.cli(&[
        "dev", "add", "name", "busy", "mgmtdev", "blk", "backend", "ram", "size", "16M",
    ]);
    assert!(ok, "{err}");
    let sock = d.sock_str("busy");
    let running = Arc::new(AtomicBool::new(true));
    let r = running.clone();
    let io = std::thread::spawn(move || {
        let mut c = BlkClient::connect(&sock, 1, 32 * 4096).unwrap();
        let (mut ok_batches, mut failed) = (0u64, false);
        while r.load(Ordering::Relaxed) {
            let ops: Vec<Op> = (0..32)
                .map(|k| Op::Write {
                    offset: k * 4096,
                    buf_off: k as usize * 4096,
                    len: 4096,
                })
                .collect();
            match c.try_run(0, &ops, Duration::from_secs(3)) {
                Ok(res) if res.iter().all(|&x| x == 0) => ok_batches += 1,
                // Once the device is gone, requests fail or time out: both end the loop.
                _ => {
                    failed = true;
                    break;
                }
            }
        }
        (ok_batches, failed)
    });
    std::thread::sleep(Duration::from_millis(300));
    let (ok, _, err) = d.cli(&["dev", "del", "busy"]);
    assert!(ok, "dev del under I/O: {err}");
    running.store(false, Ordering::Relaxed);
    let (batches, _failed) = io.join().expect("I/O thread panicked");
    assert!(batches > 0, "no I/O completed before the delete");
    // The other device still serves.
    let mut c = BlkClient::connect(&d.sock_str("keep"), 1, 4096).unwrap();
    assert_eq!(
        c.run(
            0,
            &[Op::Read {
                offset: 0,
                buf_off: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn vstats_watch_reads_live_counters_from_shared_memory() {
    let d = Daemon::start(
        "watch",
        &blk_config("w0", "backend = \"null\"\nsize = \"16M\""),
        &["w0"],
    );
    let sock = d.sock_str("w0");
    let running = Arc::new(AtomicBool::new(true));
    let r = running.clone();
    let io = std::thread::spawn(move || {
        let mut c = BlkClient::connect(&sock, 1, 8 * 4096).unwrap();
        while r.load(Ordering::Relaxed) {
            let ops: Vec<Op> = (0..8)
                .map(|k| Op::Read {
                    offset: k * 4096,
                    buf_off: k as usize * 4096,
                    len: 4096,
                })
                .collect();
            assert!(c.run(0, &ops).iter().all(|&x| x == 0));
        }
    });
    let (ok, out, err) = d.cli(&[
        "-j", "dev", "vstats", "show", "w0", "qidx", "0", "-w", "count", "2",
    ]);
    running.store(false, Ordering::Relaxed);
    io.join().unwrap();
    assert!(ok, "{err}");
    let samples: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 2, "{out}");
    let total = |v: &Value| v["requests"].as_u64().unwrap();
    assert!(
        total(&samples[1]) > total(&samples[0]),
        "counters did not move: {out}"
    );
    assert!(samples[1]["requests_per_sec"].as_f64().unwrap() > 0.0);
    assert!(d.stop().success());
}

#[test]
fn irq_table_shows_triggers_fires_by_hand_and_coalesces() {
    let d = Daemon::start(
        "irq",
        &blk_config("i0", "backend = \"null\"\nsize = \"1M\"\nqueues = 2"),
        &["i0"],
    );
    golden(
        "dev_irq_show.json",
        &d.cli_json(&["dev", "irq", "show", "i0"]),
    );
    let mut c = BlkClient::connect(&d.sock_str("i0"), 2, 4096).unwrap();
    assert_eq!(
        c.run(
            0,
            &[Op::Read {
                offset: 0,
                buf_off: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    let v = d.cli_json(&["dev", "irq", "show", "i0"]);
    assert_eq!(
        v["vectors"][0]["trigger"], true,
        "the call eventfd is vector 0's trigger: {v}"
    );
    assert!(v["vectors"][0]["signals"].as_u64().unwrap() >= 1);
    // Fired by hand (DATA_NONE for one vector), and out of range.
    let t = d.cli_json(&["dev", "irq", "trigger", "i0", "vec", "0"]);
    assert_eq!(t["sent"], true);
    let (ok, _, err) = d.cli(&["dev", "irq", "trigger", "i0", "vec", "9"]);
    assert!(!ok && err.contains("9"), "{err}");
    // Coalesce queue 1: at most one signal per 4 completion batches. Every request still
    // completes (a held signal is flushed when the queue goes idle).
    let (ok, _, err) = d.cli(&[
        "dev", "set", "i0", "qidx", "1", "coalesce", "usecs", "0", "frames", "4",
    ]);
    assert!(ok, "{err}");
    for _ in 0..40 {
        assert_eq!(
            c.run(
                1,
                &[Op::Read {
                    offset: 0,
                    buf_off: 0,
                    len: 4096
                }]
            ),
            vec![0]
        );
    }
    let v = d.cli_json(&["dev", "irq", "show", "i0"]);
    let q1 = &v["vectors"][1];
    assert_eq!(q1["coalesce_frames"], 4);
    assert!(
        q1["suppressed_coalesced"].as_u64().unwrap() > 0,
        "nothing was coalesced: {q1}"
    );
    drop(c);
    // Coalescing can also be set when the device is created.
    let (ok, _, err) = d.cli(&[
        "dev",
        "add",
        "name",
        "i1",
        "mgmtdev",
        "blk",
        "size",
        "1M",
        "queues",
        "2",
        "coalesce_usecs",
        "50",
        "coalesce_frames",
        "8",
    ]);
    assert!(ok, "{err}");
    let v1 = d.cli_json(&["dev", "irq", "show", "i1"]);
    for q in 0..2 {
        assert_eq!(v1["vectors"][q]["coalesce_frames"], 8, "{v1}");
        assert_eq!(v1["vectors"][q]["coalesce_usecs"], 50, "{v1}");
    }
    // The frontend's eventfds are released when it goes.
    std::thread::sleep(Duration::from_millis(100));
    let v = d.cli_json(&["dev", "irq", "show", "i0"]);
    assert_eq!(v["vectors"][0]["trigger"], false, "{v}");
    assert!(d.stop().success());
}
