//! Issue 12, socket access: a device's vhost-user socket is created 0600 (or with the
//! `socket_mode`/`socket_user`/`socket_group` attributes, as libvirt's qemu user needs),
//! and a frontend of another uid that the file mode lets in is refused by the daemon
//! (SO_PEERCRED) with a log line, while the device keeps serving its own frontend.
//! Needs root (the test connects as `nobody`).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::*;

const NOBODY: u32 = 65534;

/// Connects to `sock` as `uid`/`gid` and waits up to 2 s for the daemon to close the
/// connection. Returns "refused-by-kernel", "closed" (the daemon hung up) or "open".
fn connect_as(sock: &std::path::Path, uid: u32, gid: u32) -> String {
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_UNIX)\n\
        try:\n    s.connect(sys.argv[1])\n\
        except OSError:\n    print('refused-by-kernel'); sys.exit(0)\n\
        s.settimeout(2)\n\
        try:\n    d=s.recv(1)\n    print('closed' if d==b'' else 'data')\n\
        except socket.timeout:\n    print('open')\n";
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(sock)
        .uid(uid)
        .gid(gid)
        .output()
        .expect("/usr/bin/python3 (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn sockets_are_private_by_default_and_foreign_uids_are_refused() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (it connects as uid {NOBODY}); CI runs it as root"
    );
    let cfg = format!(
        "{}{}{}",
        blk_config("priv", "backend = \"ram\"\nsize = \"1M\""),
        blk_config(
            "open",
            "backend = \"ram\"\nsize = \"1M\"\nsocket_mode = \"0666\""
        ),
        blk_config(
            "shared",
            &format!("backend = \"ram\"\nsize = \"1M\"\nsocket_mode = \"0660\"\nsocket_group = \"{NOBODY}\"")
        ),
    );
    let d = Daemon::start("sockacc", &cfg, &["priv", "open", "shared"]);
    let mode = |n: &str| std::fs::metadata(d.sock(n)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("priv"), 0o600, "default socket mode");
    assert_eq!(mode("open"), 0o666);
    assert_eq!(mode("shared"), 0o660);
    assert_eq!(std::fs::metadata(d.sock("shared")).unwrap().gid(), NOBODY);

    // The file mode keeps nobody out of the private socket; the open one lets the
    // connection through and the daemon hangs up on it; the group's member is served.
    assert_eq!(
        connect_as(&d.sock("priv"), NOBODY, NOBODY),
        "refused-by-kernel"
    );
    assert_eq!(connect_as(&d.sock("open"), NOBODY, NOBODY), "closed");
    assert_eq!(connect_as(&d.sock("shared"), NOBODY, NOBODY), "open");
    // Root (here: the daemon's own uid) is always served.
    assert_eq!(connect_as(&d.sock("open"), 0, 0), "open");
    std::thread::sleep(Duration::from_millis(200));
    let log = d.log_text();
    assert!(
        log.contains(&format!("Refusing a frontend of uid {NOBODY}")),
        "no refusal logged:\n{log}"
    );
    // The refused connection did not disturb the device: a real frontend works.
    let mut c = BlkClient::connect(&d.sock_str("open"), 1, 8192).unwrap();
    let data = pattern(3, 4096);
    c.buf()[..4096].copy_from_slice(&data);
    let w = Op::Write {
        offset: 0,
        buf_off: 0,
        len: 4096,
    };
    let r = Op::Read {
        offset: 0,
        buf_off: 4096,
        len: 4096,
    };
    assert_eq!(c.run(0, &[w]), vec![0]);
    assert_eq!(c.run(0, &[r]), vec![0]);
    assert!(c.buf()[4096..8192] == data[..], "read back differs");
    drop(c);

    // Bad values are refused at `dev add`, naming the attribute.
    for (attr, value, want) in [
        ("socket_mode", "0888", "socket_mode"),
        ("socket_group", "no-such-group-uvdpa", "no such group"),
        ("socket_user", "no-such-user-uvdpa", "no such user"),
    ] {
        let (ok, _, err) = d.cli(&[
            "dev", "add", "name", "bad", "mgmtdev", "blk", "backend", "ram", "size", "1M", attr,
            value,
        ]);
        assert!(!ok && err.contains(want), "{attr} {value}: {err}");
    }
    assert!(d.stop().success());
}
