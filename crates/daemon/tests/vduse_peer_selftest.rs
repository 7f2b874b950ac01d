//! The VDUSE tooling and its peer: qemu-storage-daemon's vduse-blk export in Debian's 6.12
//! kernel under TCG (`tests/guest/vduse/`). Two exports (null-co, and a file image in the
//! guest's tmpfs) are bound to virtio_vdpa with `vdpa dev add`; O_DIRECT writes are read back
//! and compared (and fio's crc32c verify runs), then `vdpa dev del` and qsd quits.
//! If this fails, the uvdpa VDUSE tests cannot be trusted either.

mod common;

use std::time::Duration;

use common::vduse_guest::run_vduse_guest;

#[test]
fn qsd_vduse_blk_in_the_612_guest() {
    let script = include_str!("../../../tests/guest/vduse/qsd-selftest.sh");
    let run = run_vduse_guest(script, Duration::from_secs(240));
    if run.skipped {
        return;
    }
    run.assert_passed();
    for needle in [
        "vda (null-co) and vdb (tmpfs image) are up",
        "O_DIRECT write + read-back verified on vdb",
        "qemu-storage-daemon quit; self-test passed",
    ] {
        assert!(
            run.console.contains(needle),
            "no {needle:?} on the console:\n{}",
            run.console
        );
    }
    assert!(
        run.out.join("qsd.log").exists(),
        "the guest did not write /out/qsd.log"
    );
}
