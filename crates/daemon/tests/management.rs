//! The management plane end to end: the `uvdpa` CLI (a secondary) against a running
//! daemon (the primary) — golden JSON for every `show` of blk and net devices, error
//! messages, run-time device lifecycle under libblkio I/O, a frame through a loopback net
//! device counted per queue, and the resource tracker's accounting.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Config text for one net device.
fn net_config(name: &str, extra: &str) -> String {
    format!("[[device]]\nname = \"{name}\"\nmgmtdev = \"net\"\n{extra}\n")
}

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
    let log = d.log_text();
    assert!(d.stop().success());
    // stderr is a file here, not a terminal: no ANSI colour codes in it.
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in a redirected log:\n{log}"
    );
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
    fails(&["dev", "add", "name", "e1", "mgmtdev", "scsi"], "mgmtdev");
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
        c.verify_round(&name, (i % 2) as usize, 0, 4, i);
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

#[test]
fn net_device_from_the_config_file_and_at_run_time() {
    // A loopback net device with every default (its MAC generated from its name).
    let d = Daemon::start("net", &net_config("net0", ""), &["net0"]);
    let dir = d.dir.display().to_string();
    golden(
        "dev_show_net.json",
        &normalize(d.cli_json(&["dev", "show", "net0"]), &dir),
    );
    golden(
        "dev_config_show_net.json",
        &d.cli_json(&["dev", "config", "show", "net0"]),
    );
    golden(
        "dev_vstats_show_net.json",
        &d.cli_json(&["dev", "vstats", "show", "net0", "qidx", "0"]),
    );
    let qtype = |name: &str, q: &str| {
        d.cli_json(&["dev", "vstats", "show", name, "qidx", q])["vstats"]["queue_type"].clone()
    };
    assert_eq!(qtype("net0", "1"), "tx");
    assert_eq!(qtype("net0", "2"), "cq");
    let (ok, _, err) = d.cli(&["dev", "vstats", "show", "net0", "qidx", "3"]);
    assert!(!ok && err.contains("no queue 3"), "{err}");

    // Added at run time: two queue pairs, jumbo MTU, iproute2's `max_vqp`.
    let (ok, out, err) = d.cli(&[
        "dev",
        "add",
        "name",
        "net1",
        "mgmtdev",
        "net",
        "max_vqp",
        "2",
        "mtu",
        "9000",
        "mac",
        "02:00:00:00:00:01",
        "queue_size",
        "1000",
        "poll_us",
        "20",
    ]);
    assert!(ok, "dev add net1: {err}");
    assert!(
        out.contains("net1: mgmtdev net backend loopback state ready mac 02:00:00:00:00:01 mtu 9000 max_vqp 2"),
        "{out}"
    );
    let v = &d.cli_json(&["dev", "show", "net1"])["dev"][0];
    assert_eq!(v["queues"], 5);
    assert_eq!(v["queue_size"], 1000);
    let sock = d.sock_str("net1");
    assert_eq!(
        v["qemu"].as_str().unwrap(),
        format!(
            "qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \
             -numa node,memdev=mem -chardev socket,id=c0,path={sock} \
             -netdev vhost-user,id=n0,chardev=c0,queues=2 \
             -device virtio-net-pci,netdev=n0,mac=02:00:00:00:00:01,mq=on,host_mtu=9000,vectors=0 ..."
        )
    );
    assert_eq!(
        v["testpmd"].as_str().unwrap(),
        format!("net_virtio_user0,path={sock},queues=2")
    );
    assert!(
        v.get("capacity").is_none() && v.get("read_only").is_none(),
        "{v}"
    );
    let c = &d.cli_json(&["dev", "config", "show", "net1"])["config"];
    assert_eq!(
        (c["mtu"].clone(), c["max_vqp"].clone()),
        (9000.into(), 2.into())
    );
    assert_eq!(c["link"], "up");
    // Queues 0..4 are rx/tx of two pairs, 4 the control queue.
    assert_eq!(qtype("net1", "2"), "rx");
    assert_eq!(qtype("net1", "3"), "tx");
    assert_eq!(qtype("net1", "4"), "cq");
    // Text output of the same commands.
    let (ok, out, _) = d.cli(&["dev", "config", "show", "net1"]);
    assert!(
        ok && out.contains("mac") && out.contains("02:00:00:00:00:01"),
        "{out}"
    );
    assert!(!out.contains('"'), "strings are printed bare: {out}");
    let (ok, out, _) = d.cli(&["dev", "vstats", "show", "net1", "qidx", "4"]);
    assert!(ok && out.starts_with("net1 qidx 4 cq:"), "{out}");
    assert!(out.contains("drops"), "{out}");
    let (ok, out, _) = d.cli(&["dev", "show", "net1"]);
    assert!(
        ok && out.contains("testpmd") && out.contains("net_virtio_user0"),
        "{out}"
    );
    // The other backends come up too (no TAP: that needs CAP_NET_ADMIN).
    for (n, extra) in [
        ("sw-a", &["backend", "switch", "switch", "sw0"][..]),
        ("sw-b", &["backend", "switch", "switch", "sw0"][..]),
        ("sink0", &["backend", "sink"][..]),
        ("src0", &["backend", "source", "frame_len", "1514"][..]),
    ] {
        let mut args = vec!["dev", "add", "name", n, "mgmtdev", "net"];
        args.extend_from_slice(extra);
        let (ok, _, err) = d.cli(&args);
        assert!(ok, "dev add {n}: {err}");
    }
    let c = &d.cli_json(&["dev", "config", "show", "sw-b"])["config"];
    assert_eq!(
        (c["backend"].clone(), c["switch"].clone()),
        ("switch".into(), "sw0".into())
    );
    let c = &d.cli_json(&["dev", "config", "show", "src0"])["config"];
    assert_eq!(c["frame_len"], 1514);
    let all = d.cli_json(&["dev", "show"])["dev"].clone();
    let mgmtdevs: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["mgmtdev"].as_str().unwrap())
        .collect();
    assert_eq!(mgmtdevs, ["net", "net", "net", "net", "net", "net"]);
    for n in ["net1", "sw-a", "sw-b", "sink0", "src0"] {
        let (ok, _, err) = d.cli(&["dev", "del", n]);
        assert!(ok, "dev del {n}: {err}");
        assert!(!d.sock(n).exists());
    }
    let (ok, _, err) = d.cli(&["dev", "show", "net1"]);
    assert!(!ok && err.contains("No device named \"net1\""), "{err}");
    assert_eq!(d.cli_json(&["res", "show"])["counts"]["dev"], 1);
    assert!(d.stop().success());
}

#[test]
fn net_errors_name_the_attribute() {
    let d = Daemon::start("neterr", &net_config("n0", ""), &["n0"]);
    let fails = |extra: &[&str], needle: &str| {
        let mut args = vec!["dev", "add", "name", "n1", "mgmtdev", "net"];
        args.extend_from_slice(extra);
        let (ok, out, err) = d.cli(&args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(
            err.contains(needle),
            "{args:?}: stderr {err:?} lacks {needle:?}"
        );
    };
    fails(&["mac", "02:00:00:00:00"], "field `mac`");
    fails(&["mac", "01:00:5e:00:00:01"], "multicast");
    fails(
        &["mtu", "67"],
        "field `mtu`: Invalid mtu 67: must be in 68..=65535",
    );
    fails(&["mtu", "70000"], "field `mtu`");
    fails(&["max_vqp", "17"], "field `queue_pairs`");
    fails(&["queue_size", "0"], "field `queue_size`");
    fails(
        &["backend", "switch"],
        "field `switch`: required for backend switch",
    );
    fails(
        &["switch", "sw0"],
        "field `switch`: only valid with backend switch",
    );
    fails(
        &["backend", "source", "frame_len", "20"],
        "field `frame_len`",
    );
    fails(&["backend", "wire"], "field `backend`");
    fails(&["size", "1M"], "field `size`: only valid with mgmtdev blk");
    fails(&["ro"], "field `read_only`: only valid with mgmtdev blk");
    fails(&["queues", "2"], "field `queues`");
    fails(&["mandate", "VIRTIO_BLK_F_FLUSH"], "field `mandate`");
    // A net feature this device does not offer (one queue pair: no MQ).
    fails(
        &["mandate", "VIRTIO_NET_F_MQ"],
        "mandate: VIRTIO_NET_F_MQ not offered by this device",
    );
    fails(&["colour", "red"], "colour");
    // And net attributes on a blk device.
    let (ok, _, err) = d.cli(&[
        "dev",
        "add",
        "name",
        "b1",
        "mgmtdev",
        "blk",
        "size",
        "1M",
        "mac",
        "02:00:00:00:00:01",
    ]);
    assert!(
        !ok && err.contains("field `mac`: only valid with mgmtdev net"),
        "{err}"
    );
    assert_eq!(
        d.cli_json(&["dev", "show"])["dev"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(d.stop().success());
    // An invalid net device in the config file stops the daemon before anything is served.
    let out = std::process::Command::new(uvdpa_bin())
        .args(["daemon", "--run-dir"])
        .arg(unique_dir("netbad"))
        .arg("--config")
        .arg({
            let dir = unique_dir("netbadcfg");
            let p = dir.join("bad.toml");
            std::fs::write(&p, net_config("bad", "backend = \"switch\"")).unwrap();
            p
        })
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("device bad: field `switch`: required for backend switch"),
        "{err}"
    );
}

#[test]
fn net_loopback_frame_is_counted_on_tx_and_rx() {
    use common::vu::VuGuest;

    let d = Daemon::start("netio", &net_config("lo0", ""), &["lo0"]);
    let mut g = VuGuest::connect(&d.sock("lo0"), 3, 1 << 20, 0).unwrap();
    let mut rx = g.ring(0, 0x1_0000, 64).unwrap();
    let mut tx = g.ring(1, 0x2_0000, 64).unwrap();
    let (rx_buf, tx_buf) = (0x4_0000u64, 0x5_0000u64);
    // A receive buffer first: loopback drops a frame that finds none.
    let rx_head = rx.dq.add_chain(&[(rx_buf, 12 + 1514, true)]);
    rx.dq.publish();
    rx.kick();
    // A 60-byte broadcast frame after a zeroed 12-byte virtio_net_hdr.
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x88, 0xb5]);
    frame.extend((0..46).map(|i| i as u8));
    let mut pkt = vec![0u8; 12];
    pkt.extend_from_slice(&frame);
    tx.dq.mem.write(tx_buf, &pkt).unwrap();
    let tx_head = tx.dq.add_chain(&[(tx_buf, pkt.len() as u32, false)]);
    tx.dq.publish();
    tx.kick();
    let t = Duration::from_secs(10);
    assert_eq!(tx.wait_used(t).map(|u| u.0), Some(u32::from(tx_head)));
    assert_eq!(rx.wait_used(t), Some((u32::from(rx_head), 72)));
    let mut back = vec![0u8; frame.len()];
    rx.dq.mem.read(rx_buf + 12, &mut back).unwrap();
    assert_eq!(back, frame, "the frame came back as sent");

    let vstats =
        |q: &str| d.cli_json(&["dev", "vstats", "show", "lo0", "qidx", q])["vstats"].clone();
    // The counters are added just after the used entries are published: wait (bounded).
    let t0 = std::time::Instant::now();
    let (mut vrx, mut vtx) = (vstats("0"), vstats("1"));
    while (vrx["packets"] != 1 || vtx["packets"] != 1) && t0.elapsed() < t {
        std::thread::sleep(Duration::from_millis(20));
        (vrx, vtx) = (vstats("0"), vstats("1"));
    }
    // Frame bytes: the 12-byte virtio-net header is not counted.
    assert_eq!(
        (
            vrx["queue_type"].clone(),
            vrx["packets"].clone(),
            vrx["bytes"].clone()
        ),
        ("rx".into(), 1.into(), 60.into()),
        "{vrx}"
    );
    assert_eq!(
        (
            vtx["queue_type"].clone(),
            vtx["packets"].clone(),
            vtx["bytes"].clone()
        ),
        ("tx".into(), 1.into(), 60.into()),
        "{vtx}"
    );
    assert_eq!(
        (vrx["drops"].clone(), vtx["drops"].clone()),
        (0.into(), 0.into())
    );
    assert!(vtx["kicks"].as_u64().unwrap() >= 1, "{vtx}");
    let c = &d.cli_json(&["dev", "config", "show", "lo0"])["config"];
    assert!(
        c["negotiated_features"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "VIRTIO_F_VERSION_1"),
        "{c}"
    );
    let v = &d.cli_json(&["dev", "show", "lo0"])["dev"][0];
    assert_eq!(v["frontend_pid"], std::process::id());
    drop((rx, tx, g));
    assert!(d.stop().success());
}
