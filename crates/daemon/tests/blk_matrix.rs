//! Issue #9, a real-workload matrix: a stock Linux guest (Debian's kernel under QEMU/TCG,
//! the busybox initramfs of `tests/guest/`, the host's root shared read-only over virtio-9p
//! for mkfs.ext4, e2fsck, blkdiscard, fallocate and fio) boots with `uvdpa.mode=matrix`
//! and, in one boot, after fragmenting its memory so that every page of an I/O buffer is a
//! segment of its own: O_DIRECT and buffered I/O at 4 KiB, 64 KiB, 512 KiB, 1 MiB and
//! 4 MiB requests; discard and write-zeroes read back as zeroes; one pinned writer per
//! vCPU (so per queue); fio at iodepth 16 with verify; the driver unbound and bound again
//! (a device reset) with everything written before still there; a read-only disk that
//! refuses writes; ext4 (mkfs, files of many sizes, fsck clean, remount and checksums,
//! a punched hole, fstrim). See `tests/guest/README.md` for each case.
//!
//! Each boot varies what QEMU's `vhost-user-blk-pci` asks of the device (queue-size 64,
//! 128 = QEMU's default, 256, 1024; num-queues 1, 2, 4 with as many vCPUs; packed rings;
//! indirect_desc=off; event_idx=off) and uvdpa's backend (ram, file, file with O_DIRECT;
//! images on the real disk), with uvdpa's default configuration otherwise, since that is
//! what users run. The same cases run against qemu-storage-daemon in three boots: they must
//! pass there, so a case that fails only on uvdpa is uvdpa's bug, not the harness's.
//!
//! `UVDPA_MATRIX_APPEND` adds guest kernel parameters to every boot, for showing by hand
//! that the harness catches a failure: `UVDPA_MATRIX_APPEND=uvdpa.selftest=corrupt` makes
//! every case that checks data FAIL.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use common::*;

/// The cases of `uvdpa.mode=matrix`, in the order the guest runs them (`matrix_cases` in
/// `tests/guest/init`); `ro` runs only in boots with a read-only disk.
const CASES: &[&str] = &[
    "direct-4k",
    "direct-64k",
    "direct-512k",
    "direct-1m",
    "direct-4m",
    "buffered-4k",
    "buffered-64k",
    "buffered-512k",
    "buffered-1m",
    "buffered-4m",
    "discard",
    "write-zeroes",
    "parallel",
    "fio",
    "rebind",
    "ro",
    "ext4",
    "ext4-punch",
];

/// MiB of data each raw I/O case writes and reads back (`uvdpa.mib`).
const MIB_PER_CASE: u32 = 4;
/// Size of the disk under test.
const DISK_MIB: u64 = 256;
/// Size of the read-only disk, filled with a pattern the guest checks.
const RO_BYTES: usize = 16 << 20;
/// Guest RAM: the fragmented 64 MiB, the test files in its tmpfs and the page cache.
const GUEST_MIB: u32 = 512;
/// Per-case bound in the guest (`uvdpa.case_timeout`): the slowest case (ext4) takes
/// about 12 s on an idle 2-CPU host.
const CASE_TIMEOUT_S: u32 = 90;
/// Bound on the whole boot (run-guest.sh kills QEMU): a hung case costs CASE_TIMEOUT_S,
/// the cases after it are reported "not run" at once.
const BOOT_TIMEOUT_S: u32 = 270;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    /// uvdpa `backend = "ram"`.
    Ram,
    /// uvdpa `backend = "file"`.
    File,
    /// uvdpa `backend = "file"`, `direct = true`.
    FileDirect,
    /// qemu-storage-daemon on a raw image (`cache.direct` from `qsd_direct`).
    Qsd { direct: bool },
}

/// One boot of the matrix.
#[derive(Clone, Copy, Debug)]
struct Boot {
    backend: Backend,
    /// QEMU's `queue-size` (None: no property, QEMU's default 128).
    queue_size: Option<u32>,
    /// `num-queues` of the disks and as many vCPUs.
    queues: u32,
    /// `packed=on` (qemu-storage-daemon 7.2 does not offer it: the guest gets split rings).
    packed: bool,
    /// `indirect_desc` (QEMU's default on).
    indirect: bool,
    /// `event_idx` (QEMU's default on).
    event_idx: bool,
    /// A second disk, read-only (uvdpa `read_only = true`, qsd `writable=off`).
    ro: bool,
}

const DEFAULTS: Boot = Boot {
    backend: Backend::Ram,
    queue_size: None,
    queues: 1,
    packed: false,
    indirect: true,
    event_idx: true,
    ro: false,
};

/// QEMU boots one at a time also under plain `cargo test` (nextest runs this binary in
/// its `machine` group): two TCG guests on 2 CPUs starve each other past their timeouts.
static SERIAL: Mutex<()> = Mutex::new(());

/// Removes the image directory when the boot ends, pass or fail.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The backend of a boot.
enum Server {
    Uvdpa(Daemon),
    Qsd(Qsd),
}

impl Server {
    fn sock(&self, name: &str) -> String {
        match self {
            Server::Uvdpa(d) => d.sock_str(name),
            Server::Qsd(q) => q.sock_str(name),
        }
    }

    /// The backend's log, cut to what helps when it is long (uvdpa logs at debug level).
    fn log_excerpt(&self) -> String {
        let (what, text) = match self {
            Server::Uvdpa(d) => ("uvdpa daemon log", d.log_text()),
            Server::Qsd(q) => ("qemu-storage-daemon log", q.log_text()),
        };
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() <= 400 {
            return format!("--- {what} ---\n{text}");
        }
        let notable: Vec<&str> = lines
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(150)
            .copied()
            .collect();
        format!(
            "--- {what} ({} lines): first 40 ---\n{}\n--- WARN/ERROR lines (at most 150) ---\n{}\n--- last 200 ---\n{}",
            lines.len(),
            lines[..40].join("\n"),
            notable.join("\n"),
            lines[lines.len() - 200..].join("\n")
        )
    }
}

/// md5 of a file, by `md5sum` (what the guest compares with).
fn md5(path: &Path) -> String {
    let out = Command::new("md5sum")
        .arg(path)
        .output()
        .expect("run md5sum");
    assert!(out.status.success(), "md5sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Bit `bit` of the guest's virtio feature string (sysfs `features`, bit 0 first) from its
/// `uvdpa-guest: disk vda found ... features=...` line.
fn feature_bit(console: &str, bit: usize) -> Option<bool> {
    let line = console
        .lines()
        .find(|l| l.contains("uvdpa-guest: disk") && l.contains("features="))?;
    let bits = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("features="))?;
    bits.as_bytes().get(bit).map(|&b| b == b'1')
}

fn run_boot(name: &str, b: Boot) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    build_initramfs();
    let t0 = Instant::now();
    let images = disk_dir(name);
    let _cleanup = RemoveOnDrop(images.clone());
    let rw_img = images.join("rw.img");
    std::fs::File::create(&rw_img)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    let ro_img = images.join("ro.img");
    let ro_md5 = if b.ro {
        std::fs::write(&ro_img, pattern(0x5eed_0009, RO_BYTES)).unwrap();
        Some(md5(&ro_img))
    } else {
        None
    };

    let server = match b.backend {
        Backend::Qsd { direct } => {
            let mut exports = vec![QsdExport {
                name: "mx",
                image: &rw_img,
                writable: true,
                num_queues: b.queues,
                direct,
            }];
            if b.ro {
                exports.push(QsdExport {
                    name: "mxro",
                    image: &ro_img,
                    writable: false,
                    num_queues: b.queues,
                    direct,
                });
            }
            Server::Qsd(Qsd::start(name, &exports))
        }
        backend => {
            // uvdpa's defaults: only what the frontend needs (its queue count) and the
            // backend under test are set.
            let rw = match backend {
                Backend::Ram => format!("backend = \"ram\"\nsize = \"{DISK_MIB}M\""),
                Backend::File => format!("backend = \"file\"\npath = \"{}\"", rw_img.display()),
                Backend::FileDirect => format!(
                    "backend = \"file\"\npath = \"{}\"\ndirect = true",
                    rw_img.display()
                ),
                Backend::Qsd { .. } => unreachable!(),
            };
            let mut config = blk_config("mx", &format!("{rw}\nqueues = {}", b.queues));
            let mut names = vec!["mx"];
            if b.ro {
                config += &blk_config(
                    "mxro",
                    &format!(
                        "backend = \"file\"\npath = \"{}\"\nread_only = true\nqueues = {}",
                        ro_img.display(),
                        b.queues
                    ),
                );
                names.push("mxro");
            }
            Server::Uvdpa(Daemon::start(name, &config, &names))
        }
    };

    let mut args: Vec<String> = vec!["--vhost-user-blk".into(), server.sock("mx")];
    let mut append = format!("uvdpa.mib={MIB_PER_CASE} uvdpa.case_timeout={CASE_TIMEOUT_S}");
    if let Some(md5) = &ro_md5 {
        args.extend(["--vhost-user-blk".into(), server.sock("mxro")]);
        append += &format!(" uvdpa.rodev=vdb uvdpa.romd5={md5}");
    }
    if let Ok(extra) = std::env::var("UVDPA_MATRIX_APPEND") {
        append += &format!(" {extra}");
    }
    let n = b.queues.to_string();
    args.extend(["--queues".into(), n.clone(), "--smp".into(), n]);
    if let Some(qs) = b.queue_size {
        args.extend(["--queue-size".into(), qs.to_string()]);
    }
    for (on, flag) in [
        (b.packed, "--packed"),
        (!b.indirect, "--no-indirect"),
        (!b.event_idx, "--no-event-idx"),
    ] {
        if on {
            args.push(flag.into());
        }
    }
    args.extend(
        [
            "--host-root",
            "--mem",
            &GUEST_MIB.to_string(),
            "--mode",
            "matrix",
            "--timeout",
            &BOOT_TIMEOUT_S.to_string(),
            "--append",
            &append,
        ]
        .map(String::from),
    );
    let out = Command::new("bash")
        .arg(guest_dir().join("run-guest.sh"))
        .args(&args)
        .output()
        .expect("run run-guest.sh");
    let console =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let secs = t0.elapsed().as_secs_f64();

    // One line per case: "UVDPA-CASE: <name> PASS|FAIL <details> (<secs>s)".
    let results: Vec<(&str, bool, &str)> = console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("UVDPA-CASE: ")? + "UVDPA-CASE: ".len()..];
            let (case, verdict) = rest.split_once(' ')?;
            Some((case, verdict.starts_with("PASS"), rest))
        })
        .collect();
    let expected: Vec<&str> = CASES
        .iter()
        .copied()
        .filter(|c| b.ro || *c != "ro")
        .collect();
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|c| !results.iter().any(|r| r.0 == *c))
        .collect();
    let failed: Vec<&str> = results.iter().filter(|r| !r.1).map(|r| r.0).collect();
    let result = console
        .lines()
        .find(|l| l.contains("UVDPA-GUEST-RESULT:"))
        .unwrap_or("(no result line)")
        .trim();
    let table: String = results.iter().map(|r| format!("  {}\n", r.2)).collect();
    eprintln!(
        "matrix boot {name} ({b:?}): {} cases, {} failed, {} missing, {secs:.1}s\n{table}",
        results.len(),
        failed.len(),
        missing.len()
    );

    // What the guest negotiated must be what the boot claims to test.
    let packed = matches!(
        b.backend,
        Backend::Ram | Backend::File | Backend::FileDirect
    ) && b.packed;
    let negotiated = [
        ("VIRTIO_RING_F_INDIRECT_DESC (28)", 28, b.indirect),
        ("VIRTIO_RING_F_EVENT_IDX (29)", 29, b.event_idx),
        ("VIRTIO_F_RING_PACKED (34)", 34, packed),
    ];
    let wrong_features: Vec<String> = negotiated
        .iter()
        .filter(|(_, bit, want)| feature_bit(&console, *bit) != Some(*want))
        .map(|(what, bit, want)| {
            format!(
                "{what}: guest has {:?}, wanted {want}",
                feature_bit(&console, *bit)
            )
        })
        .collect();

    let ok = out.status.success()
        && result.contains("UVDPA-GUEST-RESULT: PASS")
        && failed.is_empty()
        && missing.is_empty()
        && wrong_features.is_empty();
    assert!(
        ok,
        "matrix boot {name} failed ({}, {secs:.1}s): {result}\nfailed cases: {failed:?}\n\
         cases missing from the console: {missing:?}\nfeatures: {wrong_features:?}\n\
         {table}\n--- guest console ---\n{console}\n{}",
        out.status,
        server.log_excerpt()
    );
    if let Server::Uvdpa(d) = server {
        assert!(d.stop().success(), "uvdpa did not exit cleanly");
    }
}

// --- uvdpa: every QEMU property the issue names, each backend -----------------------------

/// QEMU's defaults (queue-size 128, one queue, split rings, indirect descriptors,
/// EVENT_IDX), the ram backend, and a read-only disk.
#[test]
fn uvdpa_qemu_defaults_ram_and_read_only_disk() {
    run_boot(
        "mx-defaults",
        Boot {
            ro: true,
            ..DEFAULTS
        },
    );
}

/// queue-size 64 on 2 queues, file backend through the host page cache.
#[test]
fn uvdpa_queue_size_64_two_queues_file() {
    run_boot(
        "mx-qs64",
        Boot {
            backend: Backend::File,
            queue_size: Some(64),
            queues: 2,
            ..DEFAULTS
        },
    );
}

/// queue-size 256, packed rings, file backend with O_DIRECT.
#[test]
fn uvdpa_queue_size_256_packed_file_direct() {
    run_boot(
        "mx-qs256p",
        Boot {
            backend: Backend::FileDirect,
            queue_size: Some(256),
            packed: true,
            ..DEFAULTS
        },
    );
}

/// queue-size 1024 (the largest QEMU allows) on 2 queues, ram backend.
#[test]
fn uvdpa_queue_size_1024_two_queues_ram() {
    run_boot(
        "mx-qs1024",
        Boot {
            queue_size: Some(1024),
            queues: 2,
            ..DEFAULTS
        },
    );
}

/// queue-size 1024 with packed rings, file backend, and a read-only disk.
#[test]
fn uvdpa_queue_size_1024_packed_file_and_read_only_disk() {
    run_boot(
        "mx-qs1024p",
        Boot {
            backend: Backend::File,
            queue_size: Some(1024),
            packed: true,
            ro: true,
            ..DEFAULTS
        },
    );
}

/// indirect_desc=off at QEMU's default queue-size 128: every segment takes a ring slot.
#[test]
fn uvdpa_no_indirect_queue_size_128_two_queues_file_direct() {
    run_boot(
        "mx-noind",
        Boot {
            backend: Backend::FileDirect,
            queues: 2,
            indirect: false,
            ..DEFAULTS
        },
    );
}

/// event_idx=off (notifications by flags only) on 4 queues with 4 vCPUs, ram backend.
#[test]
fn uvdpa_no_event_idx_four_queues_ram() {
    run_boot(
        "mx-noevt",
        Boot {
            queues: 4,
            event_idx: false,
            ..DEFAULTS
        },
    );
}

/// Packed rings without indirect descriptors or EVENT_IDX, queue-size 256, 2 queues.
#[test]
fn uvdpa_packed_no_indirect_no_event_idx_two_queues_file() {
    run_boot(
        "mx-pnoind",
        Boot {
            backend: Backend::File,
            queue_size: Some(256),
            queues: 2,
            packed: true,
            indirect: false,
            event_idx: false,
            ..DEFAULTS
        },
    );
}

// --- qemu-storage-daemon: the same cases must pass (the harness's self-check) -------------

/// QEMU's defaults against qsd, with a read-only disk.
#[test]
fn qsd_qemu_defaults_and_read_only_disk() {
    run_boot(
        "mxq-defaults",
        Boot {
            backend: Backend::Qsd { direct: true },
            ro: true,
            ..DEFAULTS
        },
    );
}

/// queue-size 1024 and packed=on (qsd offers no packed rings: split) on 2 queues.
#[test]
fn qsd_queue_size_1024_packed_two_queues() {
    run_boot(
        "mxq-qs1024",
        Boot {
            backend: Backend::Qsd { direct: false },
            queue_size: Some(1024),
            queues: 2,
            packed: true,
            ..DEFAULTS
        },
    );
}

/// indirect_desc=off and event_idx=off on 4 queues with 4 vCPUs against qsd.
#[test]
fn qsd_no_indirect_no_event_idx_four_queues() {
    run_boot(
        "mxq-noind",
        Boot {
            backend: Backend::Qsd { direct: true },
            queues: 4,
            indirect: false,
            event_idx: false,
            ..DEFAULTS
        },
    );
}
