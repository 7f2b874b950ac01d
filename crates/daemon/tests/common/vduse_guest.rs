//! The VDUSE guest: Debian bookworm-backports' 6.12 kernel (it has VDUSE) under QEMU TCG,
//! the host's root read-only over virtio-9p, a shell script run inside it
//! (`tests/guest/vduse/run.sh`). The guest runs host binaries unchanged: `uvdpa` from
//! `target/`, `qemu-storage-daemon`, `fio`, `vdpa`.
//!
//! The script runs with the host's `sh` (dash) and gets `UVDPA_LIB` (source it for
//! `load_vduse_modules`, `wait_blockdev`, `deadline`, `vdpa_add`, `vdpa_del`, ... — see
//! `tests/guest/vduse/lib.sh`), `UVDPA_REPO`, `UVDPA_OUT` (`/out`, shared with
//! [`GuestRun::out`] on the host) and any [`VduseGuest::env`] variables. The guest's `/tmp`,
//! `/run` and `/dev/shm` are its own tmpfs: put host-made files (configs) in the out dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The result of one guest boot.
#[derive(Debug)]
pub struct GuestRun {
    /// The guest printed `UVDPA-GUEST-RESULT: PASS` (the script exited 0).
    pub passed: bool,
    /// The guest could not be run here (no 6.12 kernel); `skip_reason` says why.
    pub skipped: bool,
    pub skip_reason: Option<String>,
    /// QEMU was killed at the timeout (or printed no result line).
    pub timed_out: bool,
    /// run.sh's exit code (0 PASS, 1 FAIL, 2 timeout / no result, 3 usage).
    pub exit_code: Option<i32>,
    /// The console: the script's stdout and stderr, the guest's messages, run.sh's stderr.
    pub console: String,
    /// The directory the guest saw as `/out`.
    pub out: PathBuf,
    pub elapsed: Duration,
}

impl GuestRun {
    /// Panics (with the console) unless the guest passed; returns quietly if it was skipped.
    pub fn assert_passed(&self) {
        if self.skipped {
            return;
        }
        assert!(
            self.passed,
            "VDUSE guest did not pass (exit {:?}, timed out: {}, {:.1?}); console:\n{}",
            self.exit_code, self.timed_out, self.elapsed, self.console
        );
    }

    /// The lines of the console that start with `prefix`.
    pub fn lines_with(&self, prefix: &str) -> Vec<&str> {
        self.console
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }
}

/// `tests/guest/vduse/`.
pub fn vduse_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest/vduse")
}

/// Options of one boot; [`run_vduse_guest`] is the short form.
#[derive(Debug, Clone)]
pub struct VduseGuest {
    pub timeout: Duration,
    pub smp: u32,
    pub mem_mib: u32,
    pub append: Option<String>,
    pub env: Vec<(String, String)>,
    /// The host directory the guest mounts at `/out`; a fresh one if `None`.
    pub out: Option<PathBuf>,
}

impl VduseGuest {
    pub fn new(timeout: Duration) -> VduseGuest {
        VduseGuest {
            timeout,
            smp: 2,
            mem_mib: 2048,
            append: None,
            env: Vec::new(),
            out: None,
        }
    }

    /// Exports `NAME=VALUE` to the script.
    pub fn env(mut self, name: &str, value: impl Into<String>) -> VduseGuest {
        self.env.push((name.to_string(), value.into()));
        self
    }

    pub fn out(mut self, dir: impl Into<PathBuf>) -> VduseGuest {
        self.out = Some(dir.into());
        self
    }

    /// Boots the guest and runs `script` (shell text) in it.
    ///
    /// Skips (returns `skipped`, after printing why) only when the 6.12 kernel cannot be
    /// fetched and the `CI` environment variable is unset; in CI that is a failure.
    pub fn run(&self, script: &str) -> GuestRun {
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| super::unique_dir("vduse-out"));
        std::fs::create_dir_all(&out).unwrap();
        let start = Instant::now();
        if let Err(why) = kernel_available() {
            let reason = format!("the VDUSE guest kernel is not available: {why}");
            if std::env::var_os("CI").is_some() {
                panic!("{reason} (CI is set: scripts/install-deps.sh should have fetched it)");
            }
            eprintln!("SKIPPED: {reason}");
            return GuestRun {
                passed: false,
                skipped: true,
                skip_reason: Some(reason),
                timed_out: false,
                exit_code: None,
                console: String::new(),
                out,
                elapsed: start.elapsed(),
            };
        }
        let dir = super::unique_dir("vduse-script");
        let script_path = dir.join("script.sh");
        std::fs::write(&script_path, script).unwrap();

        let mut cmd = Command::new("bash");
        cmd.arg(vduse_dir().join("run.sh"))
            .arg("--script")
            .arg(&script_path)
            .arg("--out")
            .arg(&out)
            .arg("--timeout")
            .arg(self.timeout.as_secs().max(1).to_string())
            .arg("--smp")
            .arg(self.smp.to_string())
            .arg("--mem")
            .arg(self.mem_mib.to_string());
        if let Some(a) = &self.append {
            cmd.arg("--append").arg(a);
        }
        for (k, v) in &self.env {
            let v = guest_visible(v, &out);
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        // run.sh kills QEMU at the timeout itself; stdout and stderr are collected
        let output = cmd
            .stdin(Stdio::null())
            .output()
            .expect("run tests/guest/vduse/run.sh");
        let _ = std::fs::remove_dir_all(&dir);
        let mut console = String::from_utf8_lossy(&output.stdout).into_owned();
        console.push_str(&String::from_utf8_lossy(&output.stderr));
        let code = output.status.code();
        GuestRun {
            passed: code == Some(0),
            skipped: false,
            skip_reason: None,
            timed_out: code == Some(2),
            exit_code: code,
            console,
            out,
            elapsed: start.elapsed(),
        }
    }
}

/// `value` as the guest sees it: a file under /tmp, /run or /dev/shm (the guest's own
/// tmpfs, where a checkout or target dir under /tmp is invisible) is copied into the out
/// dir, which the guest mounts at /out, and named there; anything else is unchanged.
fn guest_visible(value: &str, out: &Path) -> String {
    let p = Path::new(value);
    let hidden = ["/tmp/", "/run/", "/dev/shm/"]
        .iter()
        .any(|d| value.starts_with(d));
    if !hidden || !p.is_file() {
        return value.to_string();
    }
    let bin = out.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let name = p.file_name().unwrap();
    std::fs::copy(p, bin.join(name)).unwrap();
    format!("/out/bin/{}", name.to_string_lossy())
}

/// Boots the VDUSE guest, runs `script` (shell text) in it, and returns the result.
/// See [`VduseGuest::run`] for skipping.
pub fn run_vduse_guest(script: &str, timeout: Duration) -> GuestRun {
    VduseGuest::new(timeout).run(script)
}

/// The uvdpa binary the guest runs (the same path inside the guest).
pub fn uvdpa_bin_for_guest() -> &'static Path {
    Path::new(super::uvdpa_bin())
}

/// Fetches (once, cached) the 6.12 kernel; Err(message) when that fails.
fn kernel_available() -> Result<(), String> {
    static RESULT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    RESULT
        .get_or_init(|| {
            let out = Command::new("bash")
                .arg(vduse_dir().join("fetch-kernel.sh"))
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("running fetch-kernel.sh: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
            }
        })
        .clone()
}
