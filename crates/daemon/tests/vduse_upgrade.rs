//! Live upgrade on VDUSE (issue 11): `uvdpa daemon --takeover` replaces the daemon serving
//! a VDUSE blk device ten times while the guest kernel's virtio_blk driver writes and fio
//! verifies; the driver never notices (no failed write, no reset, the vDPA device stays on
//! the bus) and every acknowledged write reads back. Runs in Debian's 6.12 kernel under TCG
//! (`tests/guest/vduse/uvdpa-upgrade.sh`), split and packed virtqueues.

mod common;

use std::time::Duration;

use common::vduse_guest::{uvdpa_bin_for_guest, VduseGuest};

fn upgrade_in_guest(tag: &str, packed: bool) {
    let out = std::env::temp_dir().join(format!("uvdpa-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let script = include_str!("../../../tests/guest/vduse/uvdpa-upgrade.sh");
    let run = VduseGuest::new(Duration::from_secs(420))
        .env("UVDPA_BIN", uvdpa_bin_for_guest().display().to_string())
        .env("PACKED", if packed { "1" } else { "0" })
        .out(&out)
        .run(script);
    if run.skipped {
        return;
    }
    let log = std::fs::read_to_string(out.join("daemon.log")).unwrap_or_default();
    assert!(
        run.passed,
        "guest failed:\n{}\n--- daemon log ---\n{log}",
        run.console
    );
    for needle in [
        "upgrade 10 done",
        "all 240 writes acknowledged across 10 upgrades",
        "every acknowledged block reads back",
        "upgrade test passed",
    ] {
        assert!(
            run.console.contains(needle),
            "no {needle:?}:\n{}",
            run.console
        );
    }
    let mut pauses: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split(", pause ").nth(1))
        .filter_map(|p| p.trim_end_matches(" ms").parse().ok())
        .collect();
    assert_eq!(pauses.len(), 10, "takeover lines in the log:\n{log}");
    assert!(
        !log.contains("reattached to the VDUSE device"),
        "a takeover fell back to the reconnect log:\n{log}"
    );
    pauses.sort_by(f64::total_cmp);
    eprintln!(
        "VDUSE takeover pause ({}): min {:.3} ms, median {:.3} ms, max {:.3} ms",
        if packed { "packed" } else { "split" },
        pauses[0],
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
}

#[test]
fn ten_takeovers_under_guest_writes_split_ring() {
    upgrade_in_guest("vduse-upgrade", false);
}

#[test]
fn ten_takeovers_under_guest_writes_packed_ring() {
    upgrade_in_guest("vduse-upgrade-packed", true);
}
