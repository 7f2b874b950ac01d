//! End-to-end tests with libblkio (`blkio` crate, driver `virtio-blk-vhost-user`) as the
//! frontend: data written through uvdpa reads back, on every backend and queue layout.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

fn offsets(seed: u64, n: usize, capacity: u64, bs: u64) -> Vec<u64> {
    // Distinct, block-aligned, spread over the whole disk.
    let slots = capacity / bs;
    let mut v: Vec<u64> = pattern(seed, n * 8)
        .chunks(8)
        .enumerate()
        .map(|(i, c)| {
            let r = u64::from_le_bytes(c.try_into().unwrap());
            let slice = slots / n as u64;
            (i as u64 * slice + r % slice) * bs
        })
        .collect();
    v.dedup();
    v
}

/// Writes a pattern at `n` offsets with queue depth `qd` on queue `q`, reads it back and
/// compares.
fn write_verify(c: &mut BlkClient, q: usize, n: usize, qd: usize, bs: usize, seed: u64) {
    let offs = offsets(seed, n, c.capacity, bs as u64);
    let data = pattern(seed ^ 0xabc, offs.len() * bs);
    for chunk in (0..offs.len()).collect::<Vec<_>>().chunks(qd) {
        for &i in chunk {
            c.buf()[i % qd * bs..][..bs].copy_from_slice(&data[i * bs..][..bs]);
        }
        let ops: Vec<Op> = chunk
            .iter()
            .map(|&i| Op::Write {
                offset: offs[i],
                buf_off: i % qd * bs,
                len: bs,
            })
            .collect();
        assert!(c.run(q, &ops).iter().all(|&r| r == 0), "writes failed");
    }
    for chunk in (0..offs.len()).collect::<Vec<_>>().chunks(qd) {
        c.buf()[..qd * bs].fill(0x5a);
        let ops: Vec<Op> = chunk
            .iter()
            .map(|&i| Op::Read {
                offset: offs[i],
                buf_off: i % qd * bs,
                len: bs,
            })
            .collect();
        assert!(c.run(q, &ops).iter().all(|&r| r == 0), "reads failed");
        for &i in chunk {
            assert!(
                c.buf()[i % qd * bs..][..bs] == data[i * bs..][..bs],
                "data mismatch at offset {} (queue {q}, qd {qd})",
                offs[i]
            );
        }
    }
}

#[test]
fn ram_write_read_verify_qd1_and_qd32_one_queue() {
    let d = Daemon::start(
        "qd",
        &blk_config("r0", "backend = \"ram\"\nsize = \"64M\""),
        &["r0"],
    );
    let mut c = BlkClient::connect(&d.sock_str("r0"), 1, 32 * 65536).unwrap();
    assert_eq!(c.capacity, 64 * MIB);
    write_verify(&mut c, 0, 24, 1, 4096, 1);
    write_verify(&mut c, 0, 64, 32, 4096, 2);
    write_verify(&mut c, 0, 32, 32, 65536, 3);
    // Unaligned-to-page but sector-aligned lengths and offsets.
    write_verify(&mut c, 0, 16, 8, 1536, 4);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn two_queues_carry_independent_io() {
    let d = Daemon::start(
        "mq",
        &blk_config("m0", "backend = \"ram\"\nsize = \"64M\"\nqueues = 2"),
        &["m0"],
    );
    let mut c = BlkClient::connect(&d.sock_str("m0"), 2, 32 * 4096).unwrap();
    assert_eq!(c.queues.len(), 2);
    write_verify(&mut c, 0, 32, 1, 4096, 10);
    write_verify(&mut c, 1, 64, 32, 4096, 11);
    write_verify(&mut c, 0, 64, 32, 4096, 12);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn flush_discard_and_write_zeroes_read_back_zeroes() {
    let d = Daemon::start(
        "dz",
        &blk_config("z0", "backend = \"ram\"\nsize = \"16M\""),
        &["z0"],
    );
    let mut c = BlkClient::connect(&d.sock_str("z0"), 1, 65536).unwrap();
    let bs = 65536usize;
    c.buf()[..bs].fill(0xee);
    let ops = [
        Op::Write {
            offset: 0,
            buf_off: 0,
            len: bs,
        },
        Op::Write {
            offset: 8 * MIB,
            buf_off: 0,
            len: bs,
        },
    ];
    assert_eq!(c.run(0, &ops), vec![0, 0]);
    assert_eq!(c.run(0, &[Op::Flush]), vec![0]);
    assert_eq!(
        c.run(
            0,
            &[
                Op::Discard {
                    offset: 0,
                    len: bs as u64
                },
                Op::WriteZeroes {
                    offset: 8 * MIB + 4096,
                    len: 8192
                }
            ]
        ),
        vec![0, 0]
    );
    for (offset, zero_at, len) in [(0u64, 0..bs, bs), (8 * MIB, 4096..12288, bs)] {
        c.buf()[..bs].fill(0x11);
        assert_eq!(
            c.run(
                0,
                &[Op::Read {
                    offset,
                    buf_off: 0,
                    len
                }]
            ),
            vec![0]
        );
        let got = c.buf()[..len].to_vec();
        for (i, b) in got.iter().enumerate() {
            let want = if zero_at.contains(&i) { 0 } else { 0xee };
            assert_eq!(*b, want, "byte {i} of block at {offset}");
        }
    }
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn read_only_device_refuses_writes_and_serves_reads() {
    let d = Daemon::start(
        "ro",
        &blk_config("ro0", "backend = \"ram\"\nsize = \"8M\"\nread_only = true"),
        &["ro0"],
    );
    // The device offers VIRTIO_BLK_F_RO: libblkio refuses a read-write open of it.
    let rw = BlkClient::connect(&d.sock_str("ro0"), 1, 4096);
    assert!(
        rw.is_err(),
        "read-write open of a read-only device succeeded"
    );
    // (The device's own IOERR answer to OUT is shown by vhost_user_frontend.rs and the
    // uvdpa-devices unit tests: libblkio does not send writes to a read-only device.)
    let mut c = BlkClient::connect_with(&d.sock_str("ro0"), 1, 4096, true).unwrap();
    let r = c.run(
        0,
        &[Op::Write {
            offset: 0,
            buf_off: 0,
            len: 4096,
        }],
    );
    assert!(r[0] < 0, "write to a read-only device succeeded: {r:?}");
    c.buf().fill(0x77);
    assert_eq!(
        c.run(
            0,
            &[Op::Read {
                offset: 4096,
                buf_off: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    assert!(c.buf().iter().all(|&b| b == 0));
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn null_backend_reads_zeroes_and_discards_writes() {
    let d = Daemon::start(
        "null",
        &blk_config("n0", "backend = \"null\"\nsize = \"1G\""),
        &["n0"],
    );
    let mut c = BlkClient::connect(&d.sock_str("n0"), 1, 8192).unwrap();
    assert_eq!(c.capacity, 1 << 30);
    c.buf().fill(0x42);
    assert_eq!(
        c.run(
            0,
            &[Op::Write {
                offset: 0,
                buf_off: 0,
                len: 4096
            }]
        ),
        vec![0]
    );
    assert_eq!(
        c.run(
            0,
            &[Op::Read {
                offset: 0,
                buf_off: 4096,
                len: 4096
            }]
        ),
        vec![0]
    );
    assert!(c.buf()[4096..].iter().all(|&b| b == 0));
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn second_frontend_is_refused_while_one_is_connected() {
    let d = Daemon::start(
        "busy",
        &blk_config("b0", "backend = \"ram\"\nsize = \"8M\""),
        &["b0"],
    );
    let mut first = BlkClient::connect(&d.sock_str("b0"), 1, 4 * 4096).unwrap();
    let second = BlkClient::connect(&d.sock_str("b0"), 1, 4096);
    assert!(second.is_err(), "a second frontend was accepted");
    // The first one is unaffected.
    write_verify(&mut first, 0, 8, 4, 4096, 20);
    assert!(d.log_text().contains("Refusing a second frontend"));
    drop(first);
    assert!(d.stop().success());
}

#[test]
fn reconnect_keeps_ram_data() {
    let d = Daemon::start(
        "recon",
        &blk_config("k0", "backend = \"ram\"\nsize = \"16M\""),
        &["k0"],
    );
    let data = pattern(99, 65536);
    {
        let mut c = BlkClient::connect(&d.sock_str("k0"), 1, 65536).unwrap();
        c.buf().copy_from_slice(&data);
        assert_eq!(
            c.run(
                0,
                &[Op::Write {
                    offset: 4 * MIB,
                    buf_off: 0,
                    len: 65536
                }]
            ),
            vec![0]
        );
    }
    // The device becomes ready again once the session ends; retry briefly.
    let mut c = None;
    for _ in 0..100 {
        match BlkClient::connect(&d.sock_str("k0"), 1, 65536) {
            Ok(x) => {
                c = Some(x);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    let mut c = c.expect("reconnect failed");
    assert_eq!(
        c.run(
            0,
            &[Op::Read {
                offset: 4 * MIB,
                buf_off: 0,
                len: 65536
            }]
        ),
        vec![0]
    );
    assert!(c.buf() == &data[..], "data lost across reconnect");
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn file_backend_holds_data_after_sigterm_and_socket_is_removed() {
    let dir = unique_dir("file");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 8 << 20]).unwrap();
    let cfg = blk_config(
        "f0",
        &format!("backend = \"file\"\npath = \"{}\"", img.display()),
    );
    let d = Daemon::start_in(dir.clone(), &cfg, &["f0"]);
    let data = pattern(7, 65536);
    let mut c = BlkClient::connect(&d.sock_str("f0"), 1, 65536).unwrap();
    c.buf().copy_from_slice(&data);
    assert_eq!(
        c.run(
            0,
            &[
                Op::Write {
                    offset: MIB,
                    buf_off: 0,
                    len: 65536
                },
                Op::Flush
            ]
        ),
        vec![0, 0]
    );
    let sock = d.sock("f0");
    // Stop while the frontend is still connected: the daemon drains and exits 0.
    assert!(d.stop().success());
    drop(c);
    assert!(!sock.exists(), "socket not removed at exit");
    let on_disk = std::fs::read(&img).unwrap();
    assert!(
        on_disk[MIB as usize..][..65536] == data[..],
        "file lacks the written data"
    );
}

#[test]
fn invalid_config_fails_before_serving_and_names_the_field() {
    let dir = unique_dir("badcfg");
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        blk_config("x0", "backend = \"ram\"\nsize = \"8M\"\nqueue_size = 100"),
    )
    .unwrap();
    let out = std::process::Command::new(uvdpa_bin())
        .args(["daemon", "--run-dir"])
        .arg(&dir)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("queue_size"), "stderr: {err}");
    assert!(!dir.join("x0.sock").exists());
    // A missing backing file is also refused before anything is served.
    std::fs::write(
        &cfg,
        blk_config("x1", "backend = \"file\"\npath = \"/nonexistent/disk.img\""),
    )
    .unwrap();
    let out = std::process::Command::new(uvdpa_bin())
        .args(["daemon", "--run-dir"])
        .arg(&dir)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/disk.img"));
    assert!(!dir.join("x1.sock").exists());
}
