//! A QEMU guest run by tests/guest/run-guest.sh, with its console collected, and a QMP
//! connection to it (tests that drive QEMU itself: migration).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::guest_dir;

/// The guest CPU for migration tests, overriding run-guest.sh's `-cpu max`: without
/// 5-level paging. With LA57 a TCG guest crashed on the destination once in about eight
/// migrations (recursive page faults in the kernel's page fault entry right after the
/// switchover; QEMU 7.2); none in the runs since it is off.
pub const CPU: &str = "-cpu max,la57=off";

/// A QMP connection (QEMU's JSON monitor).
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
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
        let mut line = String::new();
        q.r.read_line(&mut line).expect("QMP greeting");
        assert!(line.contains("\"QMP\""), "QMP greeting: {line}");
        q.cmd("qmp_capabilities", json!({})).unwrap();
        q
    }

    /// Runs a command (asynchronous events in between are skipped); its `return`, or the
    /// `error` description.
    ///
    /// # Panics
    /// QEMU's answer is not JSON, or the socket fails while reading (60 s timeout).
    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({ "execute": execute, "arguments": arguments });
        // A QEMU that exited is an error, not a panic (a test may be asking a dead one to quit).
        writeln!(self.w, "{msg}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).expect("QMP read");
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP reply {line:?}: {e}"));
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e["desc"].as_str().unwrap_or("?").to_string());
            }
        }
    }
}

/// One run-guest.sh (one QEMU) whose console is collected by a thread.
pub struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    pidfile: PathBuf,
}

impl Guest {
    /// Starts run-guest.sh with `args` (its options: devices, mode, ...), `extra_qemu` as
    /// QEMU_EXTRA, and a pidfile `DIR/NAME.qemu.pid` (so a failed test kills QEMU).
    pub fn spawn(dir: &Path, name: &str, extra_qemu: &str, args: &[&str]) -> Guest {
        let pidfile = dir.join(format!("{name}.qemu.pid"));
        let mut child = Command::new("bash")
            .arg(guest_dir().join("run-guest.sh"))
            .arg("--qemu-pidfile")
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

    /// Everything the guest printed so far (stdout and stderr).
    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Waits until the console shows `what` (panics after `secs`).
    pub fn wait_for(&self, what: &str, secs: u64) {
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
    pub fn finish(mut self) -> (i32, String) {
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
