//! The `nbd` backend end to end against real NBD servers, started by the tests: nbdkit
//! (`memory` and `file` plugins; its `error`, `delay` and `blocksize-policy` filters) and
//! qemu-nbd on a raw image. The client is libblkio. A missing server binary fails the test
//! (scripts/install-deps.sh installs nbdkit and qemu-utils): nothing is skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// The path of `bin`, or a panic saying how to get it.
fn need(bin: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("{bin} is not installed: run scripts/install-deps.sh (Debian package {package})");
}

/// An NBD server process on a Unix socket, killed when dropped.
struct Server {
    child: Option<Child>,
    sock: PathBuf,
    cmd: Vec<String>,
    log: PathBuf,
}

impl Server {
    /// Starts `argv` (which serves on `sock`) and waits until the socket accepts.
    fn start(argv: Vec<String>, sock: PathBuf, log: PathBuf) -> Server {
        let mut s = Server {
            child: None,
            sock,
            cmd: argv,
            log,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.cmd));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{:?} exited ({st}): {}",
                    self.cmd,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{:?} did not listen", self.cmd);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.sock);
    }

    /// Starts it again with the same command.
    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nbdkit serving `plugin_args` (with `filters` first) on `dir/name.nbd`.
fn nbdkit(dir: &Path, name: &str, filters: &[&str], plugin_args: &[&str]) -> Server {
    let bin = need("nbdkit", "nbdkit");
    let sock = dir.join(format!("{name}.nbd"));
    let mut argv = vec![
        bin.display().to_string(),
        "--foreground".into(),
        "--unix".into(),
        sock.display().to_string(),
    ];
    argv.extend(filters.iter().map(|f| format!("--filter={f}")));
    argv.extend(plugin_args.iter().map(|s| s.to_string()));
    Server::start(argv, sock, dir.join(format!("{name}.log")))
}

/// qemu-nbd serving the raw image `img` as export `export` on `dir/name.nbd`.
fn qemu_nbd(dir: &Path, name: &str, img: &Path, export: &str) -> Server {
    let bin = need("qemu-nbd", "qemu-utils");
    let sock = dir.join(format!("{name}.nbd"));
    let argv = vec![
        bin.display().to_string(),
        "--format=raw".into(),
        "--persistent".into(),
        "--shared=8".into(),
        "--discard=unmap".into(),
        "--cache=none".into(),
        "--aio=threads".into(),
        format!("--export-name={export}"),
        format!("--socket={}", sock.display()),
        img.display().to_string(),
    ];
    Server::start(argv, sock, dir.join(format!("{name}.log")))
}

/// A device table for an nbd export.
fn nbd_config(name: &str, uri: &str, extra: &str) -> String {
    blk_config(
        name,
        &format!("backend = \"nbd\"\nuri = \"{uri}\"\n{extra}"),
    )
}

/// Writes `n` blocks of `bs` bytes at spread, distinct offsets on queue `q`, `qd` at a
/// time, then reads them back `qd` at a time and compares.
fn write_verify(c: &mut BlkClient, q: usize, n: usize, qd: usize, bs: usize, seed: u64) {
    let slots = c.capacity / bs as u64;
    let offs: Vec<u64> = (0..n as u64)
        .map(|i| (i * 7919 + seed * 31) % slots * bs as u64)
        .collect();
    let data = pattern(seed, n * bs);
    for chunk in (0..n).collect::<Vec<_>>().chunks(qd) {
        for (k, &i) in chunk.iter().enumerate() {
            c.buf()[k * bs..][..bs].copy_from_slice(&data[i * bs..][..bs]);
        }
        let ops: Vec<Op> = chunk
            .iter()
            .enumerate()
            .map(|(k, &i)| Op::Write {
                offset: offs[i],
                buf_off: k * bs,
                len: bs,
            })
            .collect();
        let r = c.run(q, &ops);
        assert!(r.iter().all(|&r| r == 0), "writes failed: {r:?}");
    }
    for chunk in (0..n).collect::<Vec<_>>().chunks(qd) {
        c.buf()[..qd * bs].fill(0x5a);
        let ops: Vec<Op> = chunk
            .iter()
            .enumerate()
            .map(|(k, &i)| Op::Read {
                offset: offs[i],
                buf_off: k * bs,
                len: bs,
            })
            .collect();
        let r = c.run(q, &ops);
        assert!(r.iter().all(|&r| r == 0), "reads failed: {r:?}");
        for (k, &i) in chunk.iter().enumerate() {
            assert!(
                c.buf()[k * bs..][..bs] == data[i * bs..][..bs],
                "data mismatch at offset {} (qd {qd}, bs {bs})",
                offs[i]
            );
        }
    }
}

/// Writes 0xee at `offset` (64 KiB), flushes, discards its first half and write-zeroes
/// 8 KiB after it, and checks what reads back.
fn flush_discard_zero(c: &mut BlkClient, offset: u64) {
    c.buf()[..65536].fill(0xee);
    let w = Op::Write {
        offset,
        buf_off: 0,
        len: 65536,
    };
    assert_eq!(c.run(0, &[w]), vec![0]);
    assert_eq!(c.run(0, &[Op::Flush]), vec![0]);
    let zero = [
        Op::Discard { offset, len: 32768 },
        Op::WriteZeroes {
            offset: offset + 40960,
            len: 8192,
        },
    ];
    assert_eq!(c.run(0, &zero), vec![0, 0]);
    c.buf()[..65536].fill(0x11);
    let read = Op::Read {
        offset,
        buf_off: 0,
        len: 65536,
    };
    assert_eq!(c.run(0, &[read]), vec![0]);
    let got = c.buf()[..65536].to_vec();
    for (i, b) in got.iter().enumerate() {
        // A discard may leave the data (it is a hint); nbdkit memory and files punch it.
        if i < 32768 {
            assert!(*b == 0 || *b == 0xee, "byte {i} after discard: {b:#x}");
        } else if (40960..49152).contains(&i) {
            assert_eq!(*b, 0, "byte {i} after write-zeroes");
        } else {
            assert_eq!(*b, 0xee, "byte {i} untouched");
        }
    }
}

/// The features the device offers, from `dev config show` / `dev show`.
fn shown(d: &Daemon, name: &str) -> serde_json::Value {
    d.cli_json(&["dev", "show", name])["dev"][0].clone()
}

#[test]
fn nbdkit_memory_qd1_qd32_flush_discard_zeroes_and_multi_conn() {
    let dir = unique_dir("nbd-mem");
    let srv = nbdkit(&dir, "mem", &[], &["memory", "64M"]);
    let config = format!(
        "{}{}",
        nbd_config("n0", &srv.uri(""), ""),
        nbd_config("n2", &srv.uri(""), "queues = 2\nconnections = 2\n"),
    );
    let d = Daemon::start("nbd-mem", &config, &["n0", "n2"]);
    let v = shown(&d, "n0");
    assert_eq!(v["backend"], "nbd", "{v}");
    assert_eq!(v["capacity"], 64 * MIB, "{v}");
    let mut c = BlkClient::connect(&d.sock_str("n0"), 1, 32 * 65536).unwrap();
    assert_eq!(c.capacity, 64 * MIB);
    write_verify(&mut c, 0, 16, 1, 4096, 1);
    write_verify(&mut c, 0, 512, 32, 4096, 2);
    write_verify(&mut c, 0, 64, 32, 65536, 3);
    flush_discard_zero(&mut c, 8 * MIB);
    drop(c);
    // Two queues on two connections (the memory plugin advertises multi-conn): both
    // queues serve, and what one wrote the other reads.
    assert!(
        d.log_text().contains("connections=2"),
        "multi-conn not used"
    );
    let mut c = BlkClient::connect(&d.sock_str("n2"), 2, 32 * 65536).unwrap();
    write_verify(&mut c, 0, 128, 32, 4096, 4);
    write_verify(&mut c, 1, 128, 32, 4096, 5);
    c.buf()[..4096].fill(0x77);
    let w = Op::Write {
        offset: 0,
        buf_off: 0,
        len: 4096,
    };
    assert_eq!(c.run(0, &[w, Op::Flush]), vec![0, 0]);
    c.buf()[..4096].fill(0);
    let r = Op::Read {
        offset: 0,
        buf_off: 0,
        len: 4096,
    };
    assert_eq!(c.run(1, &[r]), vec![0]);
    assert!(c.buf()[..4096].iter().all(|&b| b == 0x77));
    drop(c);
    // A read-only export makes a read-only device (VIRTIO_BLK_F_RO), whatever `ro` says.
    let ro = nbdkit(&dir, "ro", &[], &["--readonly", "memory", "8M"]);
    let (ok, _, err) = d.cli(&[
        "dev",
        "add",
        "name",
        "r0",
        "mgmtdev",
        "blk",
        "backend",
        "nbd",
        "uri",
        &ro.uri(""),
    ]);
    assert!(ok, "{err}");
    assert_eq!(shown(&d, "r0")["read_only"], true);
    let mut c = BlkClient::connect_with(&d.sock_str("r0"), 1, 4096, true).unwrap();
    let r = Op::Read {
        offset: 0,
        buf_off: 0,
        len: 4096,
    };
    assert_eq!(c.run(0, &[r]), vec![0]);
    let features = shown(&d, "r0")["features"].to_string();
    assert!(features.contains("VIRTIO_BLK_F_RO"), "{features}");
    assert!(!features.contains("VIRTIO_BLK_F_DISCARD"), "{features}");
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn requests_larger_than_the_server_maximum_are_split() {
    let dir = unique_dir("nbd-split");
    // The server refuses requests over 64 KiB and unaligned to 4 KiB.
    let srv = nbdkit(
        &dir,
        "split",
        &["blocksize-policy"],
        &[
            "memory",
            "32M",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let d = Daemon::start(
        "nbd-split",
        &nbd_config("s0", &srv.uri(""), "logical_block_size = 4096\n"),
        &["s0"],
    );
    let mut c = BlkClient::connect(&d.sock_str("s0"), 1, 8 * MIB as usize).unwrap();
    write_verify(&mut c, 0, 8, 4, MIB as usize, 6);
    write_verify(&mut c, 0, 64, 32, 4096, 7);
    drop(c);
    // A minimum block larger than logical_block_size is refused, naming the fix.
    let (ok, _, err) = d.cli(&[
        "dev",
        "add",
        "name",
        "s1",
        "mgmtdev",
        "blk",
        "backend",
        "nbd",
        "uri",
        &srv.uri(""),
    ]);
    assert!(!ok);
    assert!(err.contains("logical_block_size 4096"), "{err}");
    assert!(d.stop().success());
}

/// A guest request is split into at most 4096 NBD commands (`MAX_PARTS`), so what a
/// queue holds per request is bounded whatever length the guest asks for: against a
/// server taking at most 4 KiB a command, a 16 MiB read is served and a 16 MiB + 4 KiB
/// one fails with IOERR, and the queue goes on.
#[test]
fn a_request_needing_too_many_server_commands_fails_alone() {
    let dir = unique_dir("nbd-parts");
    let srv = nbdkit(
        &dir,
        "parts",
        &["blocksize-policy"],
        &[
            "memory",
            "32M",
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=4096",
            "blocksize-error-policy=error",
        ],
    );
    let d = Daemon::start("nbd-parts", &nbd_config("p0", &srv.uri(""), ""), &["p0"]);
    let len = 16 * MIB as usize;
    let mut c = BlkClient::connect(&d.sock_str("p0"), 1, len + 4096).unwrap();
    let read = |len| Op::Read {
        offset: 0,
        buf_off: 0,
        len,
    };
    assert_eq!(
        c.run(0, &[read(len)]),
        vec![0],
        "a 16 MiB read (4096 commands)"
    );
    let r = c.run(0, &[read(len + 4096)]);
    assert!(r[0] < 0, "a read of 4097 commands was served: {r:?}");
    write_verify(&mut c, 0, 16, 4, 4096, 9);
    drop(c);
    let log = d.log_text();
    assert!(
        log.contains("needs more than 4096 commands"),
        "the refusal is not the daemon's:\n{log}"
    );
    assert!(d.stop().success());
}

#[test]
fn nbdkit_file_plugin_flush_trim_and_zeroes_reach_the_file() {
    let dir = disk_dir("nbd-file");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let srv = nbdkit(
        &dir,
        "file",
        &[],
        &["file", &format!("file={}", img.display())],
    );
    let d = Daemon::start("nbd-file", &nbd_config("f0", &srv.uri(""), ""), &["f0"]);
    let mut c = BlkClient::connect(&d.sock_str("f0"), 1, 32 * 65536).unwrap();
    write_verify(&mut c, 0, 256, 32, 4096, 8);
    c.buf()[..MIB as usize].fill(0xab);
    let w = Op::Write {
        offset: 4 * MIB,
        buf_off: 0,
        len: MIB as usize,
    };
    assert_eq!(c.run(0, &[w, Op::Flush]), vec![0, 0]);
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[4 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|&b| b == 0xab));
    let blocks_before = std::fs::metadata(&img).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks()
    });
    let ops = [
        Op::Discard {
            offset: 4 * MIB,
            len: MIB / 2,
        },
        Op::WriteZeroes {
            offset: 4 * MIB + MIB / 2,
            len: 65536,
        },
        Op::Flush,
    ];
    assert_eq!(c.run(0, &ops), vec![0, 0, 0]);
    drop(c);
    let bytes = std::fs::read(&img).unwrap();
    let at = (4 * MIB + MIB / 2) as usize;
    assert!(
        bytes[at..at + 65536].iter().all(|&b| b == 0),
        "write-zeroes"
    );
    assert!(bytes[at + 65536..5 * MIB as usize]
        .iter()
        .all(|&b| b == 0xab));
    // The trim punched a hole in the file (nbdkit's file plugin: FALLOC_FL_PUNCH_HOLE).
    assert!(bytes[4 * MIB as usize..at].iter().all(|&b| b == 0), "trim");
    let blocks_after = std::fs::metadata(&img).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks()
    });
    assert!(
        blocks_after.unwrap() < blocks_before.unwrap(),
        "the trim deallocated nothing"
    );
    assert!(d.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_nbd_raw_image_verify_flush_zeroes_and_unknown_export() {
    let dir = disk_dir("nbd-qemu");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let srv = qemu_nbd(&dir, "qemu", &img, "disk0");
    let d = Daemon::start(
        "nbd-qemu",
        &nbd_config("q0", &srv.uri("disk0"), ""),
        &["q0"],
    );
    let mut c = BlkClient::connect(&d.sock_str("q0"), 1, 32 * 65536).unwrap();
    assert_eq!(c.capacity, 64 * MIB);
    write_verify(&mut c, 0, 16, 1, 4096, 9);
    write_verify(&mut c, 0, 512, 32, 4096, 10);
    write_verify(&mut c, 0, 64, 32, 65536, 11);
    flush_discard_zero(&mut c, 16 * MIB);
    c.buf()[..65536].fill(0xcd);
    let w = Op::Write {
        offset: 32 * MIB,
        buf_off: 0,
        len: 65536,
    };
    assert_eq!(c.run(0, &[w, Op::Flush]), vec![0, 0]);
    drop(c);
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[32 * MIB as usize..][..65536]
        .iter()
        .all(|&b| b == 0xcd));
    let z = (16 * MIB + 40960) as usize;
    assert!(bytes[z..z + 8192].iter().all(|&b| b == 0));

    // An export the server does not have: dev add fails with the server's reason.
    let (ok, _, err) = d.cli(&[
        "dev",
        "add",
        "name",
        "q1",
        "mgmtdev",
        "blk",
        "backend",
        "nbd",
        "uri",
        &srv.uri("nope"),
    ]);
    assert!(!ok, "dev add of an unknown export succeeded");
    assert!(err.contains("\"nope\""), "{err}");
    assert!(err.contains("NBD_REP_ERR_UNKNOWN"), "{err}");
    // A bad URI names the attribute; no server names the address.
    let (ok, _, err) = d.cli(&[
        "dev", "add", "name", "q2", "mgmtdev", "blk", "backend", "nbd", "uri", "nbd:/x",
    ]);
    assert!(!ok && err.contains("uri"), "{err}");
    let missing = dir.join("missing.nbd");
    let uri = format!("nbd+unix:///x?socket={}", missing.display());
    let (ok, _, err) = d.cli(&[
        "dev", "add", "name", "q3", "mgmtdev", "blk", "backend", "nbd", "uri", &uri,
    ]);
    assert!(!ok && err.contains("missing.nbd"), "{err}");
    // The right export at run time.
    let (ok, _, err) = d.cli(&[
        "dev",
        "add",
        "name",
        "q4",
        "mgmtdev",
        "blk",
        "backend",
        "nbd",
        "uri",
        &srv.uri("disk0"),
        "timeout",
        "10",
    ]);
    assert!(ok, "{err}");
    let mut c = BlkClient::connect(&d.sock_str("q4"), 1, 65536).unwrap();
    let r = Op::Read {
        offset: 32 * MIB,
        buf_off: 0,
        len: 65536,
    };
    assert_eq!(c.run(0, &[r]), vec![0]);
    assert!(c.buf()[..65536].iter().all(|&b| b == 0xcd));
    drop(c);
    assert!(d.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn server_errors_fail_only_their_requests() {
    let dir = unique_dir("nbd-err");
    let trigger = dir.join("fail-reads");
    let srv = nbdkit(
        &dir,
        "err",
        &["error"],
        &[
            "memory",
            "16M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            &format!("error-pread-file={}", trigger.display()),
        ],
    );
    let config = format!(
        "{}{}",
        nbd_config("e0", &srv.uri(""), ""),
        blk_config("r0", "backend = \"ram\"\nsize = \"16M\"\n"),
    );
    let d = Daemon::start("nbd-err", &config, &["e0", "r0"]);
    let mut c = BlkClient::connect(&d.sock_str("e0"), 1, 32 * 4096).unwrap();
    let mut other = BlkClient::connect(&d.sock_str("r0"), 1, 32 * 4096).unwrap();
    write_verify(&mut c, 0, 64, 32, 4096, 12);
    std::fs::write(&trigger, b"").unwrap();
    let reads: Vec<Op> = (0..32)
        .map(|i| Op::Read {
            offset: i * 4096,
            buf_off: i as usize * 4096,
            len: 4096,
        })
        .collect();
    let r = c.run(0, &reads);
    assert!(
        r.iter().all(|&r| r < 0),
        "reads past the error filter: {r:?}"
    );
    // Writes are not affected, the other device neither.
    c.buf()[..4096].fill(1);
    let w = Op::Write {
        offset: 0,
        buf_off: 0,
        len: 4096,
    };
    assert_eq!(c.run(0, &[w]), vec![0]);
    write_verify(&mut other, 0, 64, 32, 4096, 13);
    std::fs::remove_file(&trigger).unwrap();
    // Back to normal on the same connection.
    write_verify(&mut c, 0, 64, 32, 4096, 14);
    drop(c);
    drop(other);
    assert!(
        d.log_text().contains("NBD_EIO"),
        "the daemon's log names the server's error"
    );
    assert!(d.stop().success());
}

#[test]
fn server_killed_and_restarted_mid_io_completes_within_reconnect_delay() {
    let dir = disk_dir("nbd-restart");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    // Writes take 500 ms at the server, so they are in flight when it is killed.
    let mut srv = nbdkit(
        &dir,
        "slow",
        &["delay"],
        &[
            "file",
            &format!("file={}", img.display()),
            "delay-write=500ms",
        ],
    );
    let d = Daemon::start(
        "nbd-restart",
        &nbd_config("k0", &srv.uri(""), "reconnect_delay = 10\n"),
        &["k0"],
    );
    let mut c = BlkClient::connect(&d.sock_str("k0"), 1, 32 * 4096).unwrap();
    let data = pattern(15, 32 * 4096);
    c.buf()[..32 * 4096].copy_from_slice(&data);
    let writes: Vec<Op> = (0..32)
        .map(|i| Op::Write {
            offset: i * 4096,
            buf_off: i as usize * 4096,
            len: 4096,
        })
        .collect();
    let sock = srv.sock.clone();
    // The thread that starts nbdkit again lives until the writes are done: nbdkit shuts
    // down when the thread that spawned it exits.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        srv.kill();
        assert!(!sock.exists());
        std::thread::sleep(Duration::from_millis(1500));
        srv.restart();
        let _ = done_rx.recv();
        srv
    });
    let t = Instant::now();
    let r = c
        .try_run(0, &writes, Duration::from_secs(30))
        .expect("writes hung");
    assert!(
        r.iter().all(|&r| r == 0),
        "writes across the restart: {r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    c.buf()[..32 * 4096].fill(0);
    let reads: Vec<Op> = (0..32)
        .map(|i| Op::Read {
            offset: i * 4096,
            buf_off: i as usize * 4096,
            len: 4096,
        })
        .collect();
    assert!(c.run(0, &reads).iter().all(|&r| r == 0));
    assert!(
        c.buf()[..32 * 4096] == data[..],
        "data lost across the restart"
    );
    assert!(d.log_text().contains("NBD connection re-established"));
    drop(c);
    assert!(d.stop().success());
    done_tx.send(()).unwrap();
    drop(killer.join().unwrap());
    let mut srv = nbdkit(
        &dir,
        "again",
        &[],
        &["file", &format!("file={}", img.display())],
    );

    // A server that stays down: requests fail with IOERR once reconnect_delay is over,
    // and I/O works again when it is back.
    let d = Daemon::start(
        "nbd-down",
        &nbd_config("k1", &srv.uri(""), "reconnect_delay = 2\n"),
        &["k1"],
    );
    let mut c = BlkClient::connect(&d.sock_str("k1"), 1, 4096).unwrap();
    let read = Op::Read {
        offset: 0,
        buf_off: 0,
        len: 4096,
    };
    assert_eq!(c.run(0, &[read]), vec![0]);
    srv.kill();
    let t = Instant::now();
    let r = c
        .try_run(0, &[read], Duration::from_secs(20))
        .expect("a read hung with the server down");
    assert!(r[0] < 0, "a read succeeded with the server down");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    srv.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = c.try_run(0, &[read], Duration::from_secs(20)).unwrap();
        if r[0] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no I/O after the server came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.buf()[..4096] == data[..4096]);
    drop(c);
    assert!(d.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stalled_server_times_out_and_never_hangs_dev_del() {
    let dir = unique_dir("nbd-stall");
    let srv = nbdkit(
        &dir,
        "stall",
        &["delay"],
        &["memory", "16M", "delay-read=60"],
    );
    let d = Daemon::start(
        "nbd-stall",
        &nbd_config("t0", &srv.uri(""), "timeout = 2\n"),
        &["t0"],
    );
    let mut c = BlkClient::connect(&d.sock_str("t0"), 1, 4 * 4096).unwrap();
    // Writes are not delayed.
    c.buf()[..4096].fill(3);
    let w = Op::Write {
        offset: 0,
        buf_off: 0,
        len: 4096,
    };
    assert_eq!(c.run(0, &[w]), vec![0]);
    let t = Instant::now();
    let reads: Vec<Op> = (0..4)
        .map(|i| Op::Read {
            offset: i * 4096,
            buf_off: i as usize * 4096,
            len: 4096,
        })
        .collect();
    let r = c
        .try_run(0, &reads, Duration::from_secs(30))
        .expect("reads hung on a stalled server");
    assert!(r.iter().all(|&r| r < 0), "{r:?}");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    // More reads stall again; deleting the device while they are in flight is bounded.
    let base = c.buf().as_mut_ptr();
    let mut pending = c.queues.remove(0);
    for i in 0..4u64 {
        // Pointer arithmetic inside the client's mapped buffer (4 blocks).
        let at = base.wrapping_add(i as usize * 4096);
        pending.read(i * 4096, at, 4096, i as usize, blkio::ReqFlags::empty());
    }
    let mut none: Vec<std::mem::MaybeUninit<blkio::Completion>> = Vec::new();
    let mut zero = Duration::ZERO;
    let _ = pending.do_io(&mut none, 0, Some(&mut zero), None);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let (ok, _, err) = d.cli(&["dev", "del", "t0"]);
    assert!(ok, "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "dev del took {:?}",
        t.elapsed()
    );
    drop(pending);
    drop(c);
    assert!(d.stop().success());
}

/// How the fake server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Evil {
    /// An option reply claiming 4 GiB of payload (handshake).
    HugeOptionReply,
    /// Not an NBD server at all (handshake).
    NotNbd,
    /// A reply with a bad magic.
    BadMagic,
    /// A reply naming a cookie that is not in flight.
    UnknownCookie,
    /// A data chunk claiming ~4 GiB for a 4 KiB read.
    HugeData,
    /// A data chunk outside the read's range.
    DataOutside,
    /// An error chunk whose message is longer than the chunk.
    BadErrorMessage,
    /// Half the data, then "done": the read fails, the connection stays.
    ShortRead,
}

/// A hand-written NBD server on `sock` that shakes hands correctly (unless the mode is a
/// handshake one) and then answers every request the `evil` way. Runs until `stop`.
fn evil_server(
    sock: PathBuf,
    evil: Evil,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let mut s = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let opt_reply =
                    |s: &mut std::os::unix::net::UnixStream, opt: u32, ty: u32, data: &[u8]| {
                        let mut m = Vec::new();
                        m.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
                        m.extend_from_slice(&opt.to_be_bytes());
                        m.extend_from_slice(&ty.to_be_bytes());
                        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
                        m.extend_from_slice(data);
                        s.write_all(&m)
                    };
                if evil == Evil::NotNbd {
                    let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                    return;
                }
                let mut hello = b"NBDMAGICIHAVEOPT".to_vec();
                hello.extend_from_slice(&3u16.to_be_bytes());
                if s.write_all(&hello).is_err() {
                    return;
                }
                let mut b = [0u8; 4];
                if s.read_exact(&mut b).is_err() {
                    return;
                }
                // Options until NBD_OPT_GO.
                loop {
                    let mut h = [0u8; 16];
                    if s.read_exact(&mut h).is_err() {
                        return;
                    }
                    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                    let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
                    let mut data = vec![0u8; len.min(1 << 16)];
                    if s.read_exact(&mut data).is_err() {
                        return;
                    }
                    match opt {
                        8 if evil == Evil::HugeOptionReply => {
                            let mut m = Vec::new();
                            m.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
                            m.extend_from_slice(&8u32.to_be_bytes());
                            m.extend_from_slice(&1u32.to_be_bytes());
                            m.extend_from_slice(&u32::MAX.to_be_bytes());
                            let _ = s.write_all(&m);
                            std::thread::sleep(Duration::from_millis(200));
                            return;
                        }
                        8 => {
                            let _ = opt_reply(&mut s, 8, 1, &[]);
                        }
                        7 => {
                            let mut info = 0u16.to_be_bytes().to_vec();
                            info.extend_from_slice(&(16 * MIB).to_be_bytes());
                            info.extend_from_slice(&((1u16 << 0) | (1 << 2)).to_be_bytes());
                            let _ = opt_reply(&mut s, 7, 3, &info);
                            let _ = opt_reply(&mut s, 7, 1, &[]);
                            break;
                        }
                        _ => {
                            let _ = opt_reply(&mut s, opt, 0x8000_0001, &[]);
                        }
                    }
                }
                // Transmission: answer each request the evil way.
                while !stop.load(Ordering::Relaxed) {
                    let mut r = [0u8; 28];
                    match s.read_exact(&mut r) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(_) => return,
                    }
                    let ty = u16::from_be_bytes([r[6], r[7]]);
                    let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
                    let offset = u64::from_be_bytes(r[16..24].try_into().unwrap());
                    let len = u32::from_be_bytes(r[24..28].try_into().unwrap());
                    if ty == 1 {
                        let mut skip = vec![0u8; len as usize];
                        let _ = s.read_exact(&mut skip);
                    }
                    let chunk = |flags: u16, kind: u16, cookie: u64, len: u32| {
                        let mut m = 0x668e_33efu32.to_be_bytes().to_vec();
                        m.extend_from_slice(&flags.to_be_bytes());
                        m.extend_from_slice(&kind.to_be_bytes());
                        m.extend_from_slice(&cookie.to_be_bytes());
                        m.extend_from_slice(&len.to_be_bytes());
                        m
                    };
                    let mut m = match evil {
                        Evil::BadMagic => vec![0x41; 16],
                        Evil::UnknownCookie => chunk(1, 0, cookie ^ (1 << 40), 0),
                        Evil::HugeData => {
                            let mut m = chunk(1, 1, cookie, u32::MAX - 16);
                            m.extend_from_slice(&offset.to_be_bytes());
                            m.extend_from_slice(&[0u8; 4096]);
                            m
                        }
                        Evil::DataOutside => {
                            let mut m = chunk(1, 1, cookie, len + 8);
                            m.extend_from_slice(&(offset + 512).to_be_bytes());
                            m.extend_from_slice(&vec![0u8; len as usize]);
                            m
                        }
                        Evil::BadErrorMessage => {
                            let mut m = chunk(1, 0x8001, cookie, 6 + 10);
                            m.extend_from_slice(&5u32.to_be_bytes());
                            m.extend_from_slice(&5000u16.to_be_bytes());
                            m.extend_from_slice(&[b'x'; 10]);
                            m
                        }
                        Evil::ShortRead => {
                            let half = len / 2;
                            let mut m = chunk(1, 1, cookie, half + 8);
                            m.extend_from_slice(&offset.to_be_bytes());
                            m.extend_from_slice(&vec![0x33u8; half as usize]);
                            m
                        }
                        Evil::HugeOptionReply | Evil::NotNbd => return,
                    };
                    if ty != 0 && evil != Evil::BadMagic && evil != Evil::UnknownCookie {
                        // Writes and flushes get an honest answer.
                        m = chunk(1, 0, cookie, 0);
                    }
                    if s.write_all(&m).is_err() {
                        return;
                    }
                }
            });
        }
    })
}

#[test]
fn a_hostile_server_never_crashes_or_hangs_the_daemon() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = unique_dir("nbd-evil");
    let d = Daemon::start(
        "nbd-evil",
        &blk_config("r0", "backend = \"ram\"\nsize = \"16M\"\n"),
        &["r0"],
    );
    let mut bystander = BlkClient::connect(&d.sock_str("r0"), 1, 32 * 4096).unwrap();
    for (i, evil) in [
        Evil::HugeOptionReply,
        Evil::NotNbd,
        Evil::BadMagic,
        Evil::UnknownCookie,
        Evil::HugeData,
        Evil::DataOutside,
        Evil::BadErrorMessage,
        Evil::ShortRead,
    ]
    .into_iter()
    .enumerate()
    {
        let sock = dir.join(format!("evil{i}.nbd"));
        let stop = Arc::new(AtomicBool::new(false));
        let srv = evil_server(sock.clone(), evil, stop.clone());
        let name = format!("e{i}");
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let (ok, _, err) = d.cli(&[
            "dev",
            "add",
            "name",
            &name,
            "mgmtdev",
            "blk",
            "backend",
            "nbd",
            "uri",
            &uri,
            "timeout",
            "2",
            "reconnect_delay",
            "1",
        ]);
        if matches!(evil, Evil::HugeOptionReply | Evil::NotNbd) {
            assert!(!ok, "{evil:?}: dev add succeeded");
            assert!(err.contains("broke the protocol"), "{evil:?}: {err}");
        } else {
            assert!(ok, "{evil:?}: {err}");
            let mut c = BlkClient::connect(&d.sock_str(&name), 1, 4096).unwrap();
            c.buf().fill(0x5a);
            let read = Op::Read {
                offset: 8192,
                buf_off: 0,
                len: 4096,
            };
            let t = Instant::now();
            let r = c
                .try_run(0, &[read], Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{evil:?}: the read hung: {e}"));
            assert!(r[0] < 0, "{evil:?}: a read succeeded");
            assert!(
                t.elapsed() < Duration::from_secs(8),
                "{evil:?}: {:?}",
                t.elapsed()
            );
            // A short read fails only its request: the connection stays, writes go on.
            if evil == Evil::ShortRead {
                let w = Op::Write {
                    offset: 0,
                    buf_off: 0,
                    len: 4096,
                };
                assert_eq!(c.run(0, &[w]), vec![0], "{evil:?}");
            }
            drop(c);
            let t = Instant::now();
            let (ok, _, err) = d.cli(&["dev", "del", &name]);
            assert!(ok, "{evil:?}: {err}");
            assert!(
                t.elapsed() < Duration::from_secs(6),
                "{evil:?}: dev del {:?}",
                t.elapsed()
            );
        }
        write_verify(&mut bystander, 0, 32, 32, 4096, 20 + i as u64);
        stop.store(true, Ordering::Relaxed);
        srv.join().unwrap();
    }
    drop(bystander);
    assert!(d.stop().success());
}
