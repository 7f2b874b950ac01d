//! `uvdpa dev set NAME capacity SIZE` under the guest's own virtio_blk (VDUSE, Debian's
//! 6.12 kernel under TCG, `tests/guest/vduse/uvdpa-resize.sh`): the capacity changes, the
//! config interrupt is injected, the kernel re-reads the config space and the disk grows
//! (then shrinks) with its data in place.

mod common;

use std::time::Duration;

use common::vduse_guest::{uvdpa_bin_for_guest, VduseGuest};

#[test]
fn guest_sees_the_new_capacity_and_keeps_its_data() {
    let out = common::unique_dir("vduse-resize");
    let script = include_str!("../../../tests/guest/vduse/uvdpa-resize.sh");
    let run = VduseGuest::new(Duration::from_secs(120))
        .env("UVDPA_BIN", uvdpa_bin_for_guest().display().to_string())
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
        "vda is 64 MiB (131072 sectors)",
        "vda grew to 128 MiB (262144 sectors)",
        "the pattern written before the resize reads back",
        "a write at 100 MiB succeeds and reads back",
        "dev show and dev config show report 128 MiB",
        "vda shrank to 96 MiB and the pattern still reads back",
        "resize test passed",
    ] {
        assert!(
            run.console.contains(needle),
            "no {needle:?}:\n{}",
            run.console
        );
    }
    assert!(
        log.contains("capacity changed"),
        "the daemon did not log the resize:\n{log}"
    );
    eprintln!("VDUSE guest run: {:.1?}", run.elapsed);
}
