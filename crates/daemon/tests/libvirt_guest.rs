//! A guest started through libvirt (`virsh create`) on a uvdpa disk: the README's
//! `<disk type='vhostuser'>` element and `memoryBacking` (taken from
//! `contrib/libvirt/vhostuser-disk.xml`, only the socket path changed) in a transient
//! TCG domain (`type='qemu'`) that boots the test guest's kernel and initramfs directly;
//! the guest's own virtio_blk driver writes and reads back the disk (tests/guest/init's
//! verify mode) and uvdpa counts the requests.
//!
//! libvirtd runs privately for the test: a session-mode instance (`qemu:///session`)
//! as `nobody`, its config, run, cache and log directories in the test's directory, so
//! nothing of the machine's own libvirt (if any) is used or touched, and QEMU runs as
//! `nobody`, as libvirt's `qemu` user would: the device's socket is served with
//! `socket_user = "nobody"`. Needs root (to start libvirtd as `nobody`), libvirtd and its
//! QEMU driver (Debian `libvirt-daemon`, `libvirt-daemon-driver-qemu`) and virsh
//! (`libvirt-clients`).

mod common;

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;

/// A private session-mode libvirtd running as `nobody`.
struct Libvirtd {
    child: Option<Child>,
    dir: PathBuf,
    /// Domains to `virsh destroy` on drop (a test that failed half-way).
    domains: Vec<String>,
}

impl Libvirtd {
    fn start(dir: &Path) -> Libvirtd {
        for d in ["home", "config/libvirt", "run", "cache"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        // QEMU's stdout/stderr to a plain file: no virtlogd spawned behind our back.
        std::fs::write(
            dir.join("config/libvirt/qemu.conf"),
            "stdio_handler = \"file\"\n",
        )
        .unwrap();
        chown_tree(dir);
        let log = std::fs::File::create(dir.join("libvirtd.log")).unwrap();
        chown(dir.join("libvirtd.log"), Some(NOBODY), Some(NOBODY)).unwrap();
        let child = Command::new("setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "libvirtd",
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.join("home"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_RUNTIME_DIR", dir.join("run"))
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn setpriv libvirtd (needs libvirt-daemon, libvirt-daemon-driver-qemu: scripts/install-deps.sh)");
        let mut l = Libvirtd {
            child: Some(child),
            dir: dir.to_path_buf(),
            domains: Vec::new(),
        };
        let t0 = Instant::now();
        loop {
            if l.sock().exists() {
                let (ok, _, _) = l.virsh(&["version"]);
                if ok {
                    break;
                }
            }
            if let Ok(Some(st)) = l.child.as_mut().unwrap().try_wait() {
                panic!("libvirtd exited ({st}):\n{}", l.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "libvirtd did not answer within 30 s:\n{}",
                l.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        l
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("run/libvirt/libvirt-sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default()
    }

    /// QEMU's log for domain `name` (the command line libvirt built, QEMU's stderr).
    fn qemu_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("cache/libvirt/qemu/log/{name}.log")))
            .unwrap_or_default()
    }

    /// Runs virsh (as root) against this instance's socket: (ok, stdout, stderr).
    fn virsh(&self, args: &[&str]) -> (bool, String, String) {
        let uri = format!("qemu+unix:///session?socket={}", self.sock().display());
        let out = Command::new("timeout")
            .args(["60", "virsh", "-q", "-c", &uri])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run virsh (libvirt-clients)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The pid of QEMU for domain `name`, while libvirt has it running.
    fn qemu_pid(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.join(format!("run/libvirt/qemu/run/{name}.pid")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for name in std::mem::take(&mut self.domains) {
            let pid = self.qemu_pid(&name);
            let _ = self.virsh(&["destroy", &name]);
            // Never leave a QEMU behind, even if libvirtd no longer answers.
            if let Some(pid) = pid {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            // SIGTERM to libvirtd itself (setpriv exec'd it: same pid).
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn chown_tree(p: &Path) {
    chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chown_tree(&e.unwrap().path());
        }
    }
}

/// The text of `<tag ...>...</tag>` (the first one) in `xml`.
fn element<'a>(xml: &'a str, tag: &str) -> &'a str {
    let start = xml
        .find(&format!("<{tag}"))
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"));
    let close = format!("</{tag}>");
    let end = xml[start..].find(&close).unwrap() + start + close.len();
    &xml[start..end]
}

/// The guest's result line in the console text.
fn result_line(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| l.starts_with("UVDPA-GUEST-RESULT:"))
        .map(|l| l.trim().to_string())
}

#[test]
fn guest_started_by_virsh_verifies_a_uvdpa_disk() {
    let t_test = Instant::now();
    build_initramfs();
    let dir = unique_dir("libvirt");
    let lv_dir = dir.join("libvirt");
    let vm_dir = dir.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();

    // The uvdpa device, its socket owned by the user QEMU runs as.
    std::fs::create_dir_all(dir.join("uvdpa")).unwrap();
    let d = Daemon::start_in(
        dir.join("uvdpa"),
        &blk_config(
            "blk0",
            "backend = \"ram\"\nsize = \"128M\"\nsocket_user = \"nobody\"",
        ),
        &["blk0"],
    );

    // Kernel and initramfs copied where `nobody` can read them (the checkout may not be).
    let out = guest_dir().join("out");
    std::fs::copy(out.join("kernel"), vm_dir.join("kernel")).unwrap();
    std::fs::copy(
        out.join("initramfs.cpio.gz"),
        vm_dir.join("initramfs.cpio.gz"),
    )
    .unwrap();
    chown_tree(&vm_dir);

    let t_lv = Instant::now();
    let mut lv = Libvirtd::start(&lv_dir);
    let lv_start = t_lv.elapsed();

    // The README's elements, with this test's socket.
    let example = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contrib/libvirt/vhostuser-disk.xml"),
    )
    .unwrap();
    let disk = element(&example, "disk").replace("/run/uvdpa/blk0.sock", &d.sock_str("blk0"));
    assert!(disk.contains(&d.sock_str("blk0")), "{disk}");
    let memory_backing = element(&example, "memoryBacking");

    let name = format!("uvdpa-test-{}", std::process::id());
    let console = vm_dir.join("console.log");
    let vm = vm_dir.display();
    let xml = format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  {memory_backing}
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{vm}/kernel</kernel>
    <initrd>{vm}/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet uvdpa.mode=verify uvdpa.count=16</cmdline>
  </os>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {disk}
    <serial type='file'>
      <source path='{}'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
",
        console.display()
    );
    let xml_path = vm_dir.join("domain.xml");
    std::fs::write(&xml_path, &xml).unwrap();

    // libvirt's own schema accepts it (as the README's examples, in service.rs).
    let v = Command::new("virt-xml-validate")
        .arg(&xml_path)
        .arg("domain")
        .output()
        .expect("run virt-xml-validate");
    assert!(
        v.status.success(),
        "{xml}\n{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    let t_boot = Instant::now();
    lv.domains.push(name.clone());
    let (ok, _, err) = lv.virsh(&["create", xml_path.to_str().unwrap()]);
    assert!(
        ok,
        "virsh create failed: {err}\n{xml}\nQEMU log:\n{}\nlibvirtd log:\n{}",
        lv.qemu_log(&name),
        lv.log()
    );

    // The guest prints its result and powers off; the transient domain then goes away.
    let mut line = None;
    let mut gone = false;
    let mut qemu_pid = None;
    while t_boot.elapsed() < Duration::from_secs(120) {
        if qemu_pid.is_none() {
            qemu_pid = lv.qemu_pid(&name);
        }
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if line.is_none() {
            line = result_line(&text);
        }
        if line.is_some() {
            let (ok, out, _) = lv.virsh(&["list", "--name"]);
            if ok && !out.lines().any(|l| l.trim() == name) {
                gone = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let boot = t_boot.elapsed();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let line = line.unwrap_or_else(|| {
        panic!(
            "no result line from the guest within 120 s\nconsole:\n{text}\nQEMU log:\n{}\ndaemon log:\n{}",
            lv.qemu_log(&name),
            d.log_text()
        )
    });
    assert!(
        line.starts_with("UVDPA-GUEST-RESULT: PASS") && line.contains("offsets=16"),
        "{line}\nconsole:\n{text}\ndaemon log:\n{}",
        d.log_text()
    );
    assert!(
        gone,
        "the domain is still listed after the guest powered off"
    );
    lv.domains.clear();

    // libvirt built the command line QEMU ran: a vhost-user-blk device on our socket.
    let qlog = lv.qemu_log(&name);
    assert!(
        qlog.contains("vhost-user-blk-pci") && qlog.contains(&d.sock_str("blk0")),
        "QEMU log:\n{qlog}"
    );

    // uvdpa served the guest's I/O: 16 O_DIRECT 4 KiB writes and reads at least.
    let vs = d.vstats("blk0", 0);
    let n = |k: &str| vs[k].as_u64().unwrap_or_else(|| panic!("no {k} in {vs}"));
    assert!(n("requests") >= 32, "{vs}");
    assert!(n("bytes_written") >= 16 * 4096, "{vs}");
    assert!(n("bytes_read") >= 16 * 4096, "{vs}");
    // ... from libvirt's QEMU (the daemon logs the frontend's pid).
    let qemu_pid = qemu_pid.expect("libvirt wrote no QEMU pid file");
    let connected = format!("frontend connected device=\"blk0\" frontend_pid={qemu_pid}");
    assert!(
        d.log_text().contains(&connected),
        "no '{connected}' in the daemon log:\n{}",
        d.log_text()
    );
    eprintln!(
        "libvirt guest: libvirtd up in {:.1} s, virsh create to powered off in {:.1} s, \
         test {:.1} s; {line}; vstats {vs}",
        lv_start.as_secs_f64(),
        boot.as_secs_f64(),
        t_test.elapsed().as_secs_f64()
    );
    drop(lv);
    assert!(d.stop().success(), "daemon did not exit cleanly");
}
