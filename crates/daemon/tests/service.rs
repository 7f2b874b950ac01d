//! Service integration: `--check-config`, systemd's readiness protocol (READY=1 on a
//! fake `$NOTIFY_SOCKET` once every configured device is served), SIGHUP reloading the
//! config file (devices added and removed, an unchanged one untouched while a libblkio
//! client keeps using it), and the README's libvirt domain XML through libvirt's own
//! validator (`virt-xml-validate`).

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn run_check(file: &Path) -> (bool, String, String) {
    let out = Command::new(uvdpa_bin())
        .args(["daemon", "--check-config"])
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_validates_and_serves_nothing() {
    let dir = unique_dir("check");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        format!(
            "metrics = \"127.0.0.1:9464\"\n{}{}",
            blk_config("a0", "size = \"1M\""),
            blk_config("a1", "backend = \"null\"\nsize = \"1G\"")
        ),
    )
    .unwrap();
    let (ok, out, err) = run_check(&good);
    assert!(ok, "{err}");
    assert!(out.contains("valid: 2 device(s): a0, a1"), "{out}");
    assert!(out.contains("127.0.0.1:9464"), "{out}");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, blk_config("x0", "size = \"1M\"\nqueue_size = 100")).unwrap();
    let (ok, _, err) = run_check(&bad);
    assert!(!ok);
    assert!(
        err.contains("device x0: field `queue_size`: 100: a power of two"),
        "{err}"
    );

    let bad_metrics = dir.join("bad-metrics.toml");
    std::fs::write(&bad_metrics, "metrics = \"localhost\"\n").unwrap();
    let (ok, _, err) = run_check(&bad_metrics);
    assert!(!ok);
    assert!(err.contains("metrics") && err.contains("IP:PORT"), "{err}");

    // A missing file: the message carries the OS error too.
    let (ok, _, err) = run_check(&dir.join("missing.toml"));
    assert!(!ok);
    assert!(
        err.contains("Cannot read config file") && err.contains("No such file"),
        "{err}"
    );
    // Nothing was served: no socket, no control socket anywhere in the directory.
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 3, "{entries:?}");
}

/// A daemon started the way systemd starts it: with `$NOTIFY_SOCKET`.
struct Notified {
    child: Child,
    dir: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
    notify: UnixDatagram,
}

impl Notified {
    fn start(tag: &str, config: &str) -> Notified {
        let dir = unique_dir(tag);
        let cfg = dir.join("uvdpa.toml");
        std::fs::write(&cfg, config).unwrap();
        let sock = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&sock).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let log = dir.join("daemon.log");
        let child = Command::new(uvdpa_bin())
            .args(["daemon", "--run-dir"])
            .arg(&dir)
            .arg("--config")
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &sock)
            .env("UVDPA_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Notified {
            child,
            dir,
            cfg,
            log,
            notify,
        }
    }

    /// The next notification, waiting up to 20 s.
    fn next(&self) -> String {
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match self.notify.recv(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(_) => assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "no sd_notify message; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    /// Waits for a notification carrying `line` (skipping others).
    fn wait_for(&self, line: &str) -> String {
        loop {
            let m = self.next();
            if m.lines().any(|l| l == line) {
                return m;
            }
        }
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn devices(&self) -> Vec<String> {
        let (ok, out, err) = Daemon::cli_at(&self.dir.join("uvdpa.ctl"), &["-j", "dev", "show"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let list = v["dev"].as_array().cloned().unwrap_or_else(|| {
            v.as_object()
                .and_then(|o| o.values().find_map(|x| x.as_array().cloned()))
                .unwrap_or_default()
        });
        let mut names: Vec<String> = list
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ram(name: &str) -> String {
    blk_config(name, "backend = \"ram\"\nsize = \"4M\"")
}

/// One 4 KiB write and its read-back through `c`.
fn write_read(c: &mut BlkClient, seed: u64) {
    let data = pattern(seed, 4096);
    c.buf()[..4096].copy_from_slice(&data);
    let w = [Op::Write {
        offset: 8192,
        buf_off: 0,
        len: 4096,
    }];
    assert_eq!(c.run(0, &w), vec![0]);
    c.buf()[..4096].fill(0);
    let r = [Op::Read {
        offset: 8192,
        buf_off: 0,
        len: 4096,
    }];
    assert_eq!(c.run(0, &r), vec![0]);
    assert!(c.buf()[..4096] == data[..], "read-back mismatch");
}

#[test]
fn ready_once_served_and_sighup_adds_and_removes_devices() {
    let d = Notified::start("notify", &format!("{}{}", ram("keep"), ram("gone")));
    let ready = d.wait_for("READY=1");
    // READY=1 comes only once every configured device is served.
    assert!(d.sock("keep").exists() && d.sock("gone").exists());
    assert!(ready.contains("STATUS=serving 2 device(s)"), "{ready}");

    let mut c = BlkClient::connect(d.sock("keep").to_str().unwrap(), 1, 4096).unwrap();
    write_read(&mut c, 1);
    let inode = std::fs::metadata(d.sock("keep")).unwrap().ino();
    // A device added at run time is not the config file's: a reload leaves it alone.
    let (ok, _, err) = Daemon::cli_at(
        &d.dir.join("uvdpa.ctl"),
        &[
            "dev", "add", "name", "adhoc", "mgmtdev", "blk", "size", "1M",
        ],
    );
    assert!(ok, "{err}");

    // Edit: `gone` removed, `fresh` added, `keep` unchanged.
    std::fs::write(&d.cfg, format!("{}{}", ram("keep"), ram("fresh"))).unwrap();
    d.signal("HUP");
    let reloading = d.wait_for("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let ready = d.wait_for("READY=1");
    assert!(ready.contains("STATUS=serving 3 device(s)"), "{ready}");
    assert_eq!(d.devices(), ["adhoc", "fresh", "keep"]);
    assert!(!d.sock("gone").exists());
    assert!(d.sock("fresh").exists());
    // `keep` was not touched: same socket file, and the connected client goes on.
    assert_eq!(std::fs::metadata(d.sock("keep")).unwrap().ino(), inode);
    write_read(&mut c, 2);
    let mut f = BlkClient::connect(d.sock("fresh").to_str().unwrap(), 1, 4096).unwrap();
    write_read(&mut f, 3);
    drop(f);

    // A changed table re-creates that device; an invalid file changes nothing.
    std::fs::write(
        &d.cfg,
        format!(
            "{}{}",
            ram("keep"),
            blk_config("fresh", "backend = \"null\"\nsize = \"8M\"")
        ),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_for("READY=1");
    let (ok, out, _) = Daemon::cli_at(&d.dir.join("uvdpa.ctl"), &["-j", "dev", "show", "fresh"]);
    assert!(ok && out.contains("\"null\""), "{out}");
    std::fs::write(&d.cfg, "[[device]]\nname = \"bad\"\nmgmtdev = \"tape\"\n").unwrap();
    d.signal("HUP");
    d.wait_for("READY=1");
    assert_eq!(d.devices(), ["adhoc", "fresh", "keep"]);
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(log.contains("config not reloaded"), "{log}");
    write_read(&mut c, 4);
    drop(c);

    d.signal("TERM");
    d.wait_for("STOPPING=1");
    let mut d = d;
    let t0 = Instant::now();
    while d.child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.child.wait().unwrap().success());
}

/// The ```xml blocks of the README.
fn readme_xml() -> Vec<String> {
    let readme = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(readme).unwrap();
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for l in text.lines() {
        match (&mut cur, l.trim_start()) {
            (None, "```xml") => cur = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                cur = None;
            }
            (Some(b), _) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

fn validate(xml: &Path) -> (bool, String) {
    let out = Command::new("virt-xml-validate")
        .arg(xml)
        .arg("domain")
        .output()
        .expect("run virt-xml-validate (Debian libvirt-clients and libxml2-utils: scripts/install-deps.sh)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn libvirt_examples_validate_against_libvirts_schema() {
    let contrib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contrib/libvirt");
    let files = ["vhostuser-disk.xml", "vhostuser-net.xml"];
    let readme = readme_xml();
    for f in files {
        let path = contrib.join(f);
        let text = std::fs::read_to_string(&path).unwrap();
        // The README shows these very files.
        assert!(
            readme.iter().any(|b| b == &text),
            "README.md has no ```xml block equal to contrib/libvirt/{f}"
        );
        let (ok, out) = validate(&path);
        assert!(ok, "{f}: {out}");
    }
    // The validator is not vacuous: a misspelt disk type fails.
    let dir = unique_dir("libvirt");
    let bad = dir.join("bad.xml");
    let text = std::fs::read_to_string(contrib.join(files[0])).unwrap();
    std::fs::write(&bad, text.replace("type='vhostuser'", "type='vhostusr'")).unwrap();
    let (ok, out) = validate(&bad);
    assert!(!ok, "a bad disk type validated: {out}");
}
