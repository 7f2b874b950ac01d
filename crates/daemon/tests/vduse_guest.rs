//! uvdpa over VDUSE, driven by the guest kernel's own virtio drivers: Debian's 6.12 kernel
//! under TCG (`tests/guest/vduse/`) runs `uvdpa daemon` with `transport = "vduse"` devices;
//! each binds itself to the vDPA bus, virtio_vdpa hands it to virtio_blk / virtio_net.
//!
//! Three boots, several checks each (`tests/guest/vduse/uvdpa-blk.sh`, `uvdpa-net.sh`
//! describe every case; each prints `UVDPA-CASE: NAME PASS|FAIL`):
//! - blk, ram backend with packed rings offered (`unoffer = []`): O_DIRECT at 4 KiB, 64 KiB
//!   and 1 MiB, fio crc32c verify, discard and write-zeroes, ext4 + e2fsck + remount, dev
//!   show and vstats; a read-only file device; `dev add` / `dev del` at run time;
//! - blk, file backend with 2 queues; a ram device with `unoffer = ["VIRTIO_F_RING_PACKED"]`
//!   (split rings);
//! - net, loopback backend: the netdev, its MAC, link up, ARP and 40 raw frames reflected
//!   unchanged, the netdev's and uvdpa's counters.
//!
//! Every boot ends with SIGTERM: the daemon exits 0 and leaves no disk, netdev or
//! `/dev/vduse` node behind. The daemon runs with `UVDPA_LOG=debug`; its log (in the boot's
//! out directory) is printed when a case fails.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::vduse_guest::{uvdpa_bin_for_guest, GuestRun, VduseGuest};
use serde_json::Value;

/// Upper bound of one boot (they take about 30-100 s on a 2-CPU TCG host).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Boots the guest with `script`; `None` if the guest kernel is unavailable (skipped).
fn boot(tag: &str, script: &str, env: &[(&str, &str)]) -> Option<GuestRun> {
    let out = common::unique_dir(tag);
    let mut g = VduseGuest::new(BOOT_TIMEOUT)
        .env("UVDPA_BIN", uvdpa_bin_for_guest().display().to_string())
        .out(&out);
    for (k, v) in env {
        g = g.env(k, *v);
    }
    let run = g.run(script);
    if run.skipped {
        return None;
    }
    eprintln!(
        "{tag}: guest {} in {:.1?}",
        if run.passed { "passed" } else { "FAILED" },
        run.elapsed
    );
    for l in run.lines_with("UVDPA-CASE: ") {
        eprintln!("  {l}");
    }
    Some(run)
}

/// The last `n` lines of the daemon log `name` in the boot's out directory.
fn log_tail(run: &GuestRun, name: &str, n: usize) -> String {
    match std::fs::read_to_string(run.out.join(name)) {
        Ok(t) => {
            let lines: Vec<&str> = t.lines().collect();
            let from = lines.len().saturating_sub(n);
            format!(
                "--- {name} (last {} of {} lines; whole file: {}) ---\n{}",
                lines.len() - from,
                lines.len(),
                run.out.join(name).display(),
                lines[from..].join("\n")
            )
        }
        Err(e) => format!("--- {name}: {e} ---"),
    }
}

/// Panics unless the guest passed and printed `UVDPA-CASE: c PASS` for every case in
/// `cases`: names the failed ones, with the console and the daemon log.
fn assert_cases(run: &GuestRun, cases: &[&str], log: &str) {
    let lines = run.lines_with("UVDPA-CASE: ");
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let prefix = format!("UVDPA-CASE: {c} ");
            match lines.iter().find(|l| l.starts_with(&prefix)) {
                Some(l) if l[prefix.len()..].starts_with("PASS") => None,
                Some(l) => Some(l.to_string()),
                None => Some(format!("{c}: no result line")),
            }
        })
        .collect();
    if failed.is_empty() && run.passed {
        return;
    }
    panic!(
        "VDUSE guest: {} (exit {:?}, timed out: {}, {:.1?})\nfailed cases:\n  {}\n\
         --- console ---\n{}\n{}",
        if run.passed { "passed" } else { "failed" },
        run.exit_code,
        run.timed_out,
        run.elapsed,
        failed.join("\n  "),
        run.console,
        log_tail(run, log, 400)
    );
}

/// A JSON file the guest saved in the out directory.
fn json(out: &Path, name: &str) -> Value {
    let p: PathBuf = out.join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", p.display()))
}

fn features(show: &Value) -> Vec<&str> {
    show["dev"][0]["features"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn blk_ram_packed_read_only_and_runtime_add_del() {
    let cases = ["ram_packed", "read_only", "runtime_add_del", "shutdown"];
    let Some(run) = boot(
        "vduse-blk-a",
        include_str!("../../../tests/guest/vduse/uvdpa-blk.sh"),
        &[("UVDPA_CASES", "ram_packed read_only runtime_add_del")],
    ) else {
        return;
    };
    assert_cases(&run, &cases, "uvdpa-blk-daemon.log");

    // what the guest saw, checked again here from the files it saved
    let show = json(&run.out, "show-uv0.json");
    let d = &show["dev"][0];
    assert_eq!(d["transport"], "vduse", "{show}");
    assert_eq!(d["vdpa"], "uv0", "{show}");
    assert!(
        d["kernel_dev"]
            .as_str()
            .is_some_and(|k| k.starts_with("vd")),
        "{show}"
    );
    assert!(features(&show).contains(&"VIRTIO_F_RING_PACKED"), "{show}");
    let vs = json(&run.out, "vstats-uv0-0.json");
    for k in ["requests", "bytes_read", "bytes_written", "kicks", "calls"] {
        assert!(vs["vstats"][k].as_u64().unwrap_or(0) > 0, "{k}: {vs}");
    }
    assert_eq!(vs["vstats"]["errors"], 0, "{vs}");
    let ro = json(&run.out, "show-uvro.json");
    assert_eq!(ro["dev"][0]["read_only"], true, "{ro}");
    for needle in [
        "O_DIRECT write + read-back verified at 4 KiB, 64 KiB, 1 MiB",
        "fio randwrite + crc32c verify passed (1 jobs, iodepth 16)",
        "discard of 1 MiB reads back as zeros",
        "e2fsck -fn clean, checksums match after remount",
        "the others still read",
    ] {
        assert!(
            run.console.contains(needle),
            "no {needle:?} on the console:\n{}",
            run.console
        );
    }
}

#[test]
fn blk_file_two_queues_and_split_ring() {
    let cases = ["file_2q", "split_ring", "shutdown"];
    let Some(run) = boot(
        "vduse-blk-b",
        include_str!("../../../tests/guest/vduse/uvdpa-blk.sh"),
        &[("UVDPA_CASES", "file_2q split_ring")],
    ) else {
        return;
    };
    assert_cases(&run, &cases, "uvdpa-blk-daemon.log");

    let f = json(&run.out, "show-uvf.json");
    assert_eq!(f["dev"][0]["queues"], 2, "{f}");
    for q in 0..2 {
        let vs = json(&run.out, &format!("vstats-uvf-{q}.json"));
        assert!(
            vs["vstats"]["requests"].as_u64().unwrap_or(0) > 0,
            "queue {q} unused: {vs}"
        );
    }
    let s = json(&run.out, "show-uvs.json");
    let fs = features(&s);
    assert!(fs.contains(&"VIRTIO_F_VERSION_1"), "{s}");
    assert!(!fs.contains(&"VIRTIO_F_RING_PACKED"), "{s}");
    assert!(
        run.console
            .contains("fio randwrite + crc32c verify passed (2 jobs, iodepth 16)"),
        "{}",
        run.console
    );
}

#[test]
fn net_loopback_reflects_frames() {
    let cases = ["net_netdev", "net_frames", "shutdown"];
    let Some(run) = boot(
        "vduse-net",
        include_str!("../../../tests/guest/vduse/uvdpa-net.sh"),
        &[],
    ) else {
        return;
    };
    assert_cases(&run, &cases, "uvdpa-net-daemon.log");

    let show = json(&run.out, "show-uvn.json");
    let d = &show["dev"][0];
    assert_eq!(d["transport"], "vduse", "{show}");
    assert_eq!(d["mac"], "02:00:00:00:00:42", "{show}");
    assert!(d["kernel_dev"].is_string(), "{show}");
    for (q, role) in [(0, "rx"), (1, "tx")] {
        let vs = json(&run.out, &format!("uvn-vstats-{q}-after.json"));
        assert_eq!(vs["vstats"]["queue_type"], role, "{vs}");
        assert!(
            vs["vstats"]["packets"].as_u64().unwrap_or(0) >= 43,
            "{role}: {vs}"
        );
    }
    assert!(
        run.console.contains("every frame came back unchanged"),
        "{}",
        run.console
    );
}
