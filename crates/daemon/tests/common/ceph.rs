//! A throwaway single-node Ceph cluster for the `rbd` tests: `scripts/ceph.sh` in a
//! directory of its own on the real disk, stopped and removed when dropped. Included with
//! `#[path]` by the test binaries that need it (next to `mod common;`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{blk_config, disk_dir};

/// A cluster started by scripts/ceph.sh in its own directory, stopped when dropped.
pub struct Ceph {
    pub dir: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph.sh")
}

impl Ceph {
    pub fn start(tag: &str) -> Ceph {
        let dir = disk_dir(tag).join("ceph");
        let t = Instant::now();
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run scripts/ceph.sh");
        let c = Ceph { dir };
        assert!(
            out.status.success(),
            "the Ceph cluster did not start (scripts/install-deps.sh installs ceph-mon, ceph-osd, \
             ceph-common): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("cluster up in {:?}", t.elapsed());
        c
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// Runs `rbd -c CONF ARGS`, asserting success; its stdout.
    pub fn rbd(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("run rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `ceph.sh CMD` (osd-stop, osd-start).
    pub fn ctl(&self, cmd: &str) {
        let out = Command::new(script())
            .arg(cmd)
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ceph.sh {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILLs the OSD (a crash: no clean shutdown).
    pub fn kill_osd(&self) {
        let pid = std::fs::read_to_string(self.dir.join("run/osd.0.pid")).unwrap();
        let pid: i32 = pid.trim().parse().unwrap();
        let pid = rustix::process::Pid::from_raw(pid).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        let proc_dir = PathBuf::from(format!("/proc/{}", pid.as_raw_nonzero()));
        let t = Instant::now();
        while proc_dir.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `rbd du`: bytes used by `image`.
    pub fn used(&self, image: &str) -> u64 {
        let out = self.rbd(&["du", "--format", "json", image]);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        v["images"][0]["used_size"].as_u64().unwrap()
    }

    /// `len` bytes at `offset` of `image`, read with `rbd export`.
    pub fn export(&self, image: &str, offset: u64, len: usize) -> Vec<u8> {
        let all = self.rbd(&["export", "--no-progress", image, "-"]);
        all[offset as usize..][..len].to_vec()
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// A device table for `rbd/IMAGE`.
pub fn rbd_config(name: &str, ceph: &Ceph, image: &str, extra: &str) -> String {
    blk_config(
        name,
        &format!(
            "backend = \"rbd\"\npool = \"rbd\"\nimage = \"{image}\"\nconf = \"{}\"\n{extra}",
            ceph.conf().display()
        ),
    )
}
