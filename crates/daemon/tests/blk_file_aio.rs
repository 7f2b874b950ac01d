//! The `file` backend on io_uring, end to end with libblkio: an image on the real disk
//! (`/var/tmp`, not tmpfs) opened with O_DIRECT, many requests in flight at once (QD32),
//! every block verified; and the same with `aio = "sync"`.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

/// An image file on the real disk, removed when dropped.
struct Image(std::path::PathBuf);

impl Image {
    fn new(tag: &str, len: u64) -> Self {
        let p = std::path::PathBuf::from(format!(
            "/var/tmp/uvdpa-e2e-{tag}-{}.img",
            std::process::id()
        ));
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        Self(p)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `n` blocks of `bs` bytes at spread, distinct offsets, `qd` at a time, then reads
/// them back `qd` at a time and compares.
fn write_verify(c: &mut BlkClient, n: usize, qd: usize, bs: usize, seed: u64) {
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
        assert!(c.run(0, &ops).iter().all(|&r| r == 0), "writes failed");
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
        assert!(c.run(0, &ops).iter().all(|&r| r == 0), "reads failed");
        for (k, &i) in chunk.iter().enumerate() {
            assert!(
                c.buf()[k * bs..][..bs] == data[i * bs..][..bs],
                "data mismatch at offset {} (qd {qd}, bs {bs})",
                offs[i]
            );
        }
    }
}

fn run_file_device(tag: &str, aio: Option<&str>, want_aio: &str) {
    let img = Image::new(tag, 256 * MIB);
    let aio_line = aio.map_or(String::new(), |a| format!("aio = \"{a}\"\n"));
    let d = Daemon::start(
        tag,
        &blk_config(
            "f0",
            &format!(
                "backend = \"file\"\npath = \"{}\"\ndirect = true\n{aio_line}",
                img.0.display()
            ),
        ),
        &["f0"],
    );
    let shown = d.cli_json(&["dev", "show", "f0"]);
    assert_eq!(shown["dev"][0]["aio"], want_aio, "{shown}");
    let config = d.cli_json(&["dev", "config", "show", "f0"]);
    assert_eq!(config["config"]["aio"], want_aio, "{config}");
    let mut c = BlkClient::connect(&d.sock_str("f0"), 1, 32 * 65536).unwrap();
    assert_eq!(c.capacity, 256 * MIB);
    write_verify(&mut c, 16, 1, 4096, 1);
    write_verify(&mut c, 512, 32, 4096, 2);
    write_verify(&mut c, 64, 32, 65536, 3);
    // Flush, and discard / write-zeroes read back as zeroes.
    c.buf()[..65536].fill(0xee);
    let w = |offset| Op::Write {
        offset,
        buf_off: 0,
        len: 65536,
    };
    assert_eq!(c.run(0, &[w(0), w(8 * MIB)]), vec![0, 0]);
    assert_eq!(c.run(0, &[Op::Flush]), vec![0]);
    let zero = [
        Op::Discard {
            offset: 0,
            len: 65536,
        },
        Op::WriteZeroes {
            offset: 8 * MIB + 4096,
            len: 8192,
        },
    ];
    assert_eq!(c.run(0, &zero), vec![0, 0]);
    for (offset, zeroed) in [(0u64, 0..65536), (8 * MIB, 4096..12288)] {
        c.buf()[..65536].fill(0x11);
        let read = Op::Read {
            offset,
            buf_off: 0,
            len: 65536,
        };
        assert_eq!(c.run(0, &[read]), vec![0]);
        let got = c.buf()[..65536].to_vec();
        for (i, b) in got.iter().enumerate() {
            let want = if zeroed.contains(&i) { 0 } else { 0xee };
            assert_eq!(*b, want, "byte {i} of the block at {offset}");
        }
    }
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn file_o_direct_on_io_uring_qd32_write_read_verify() {
    run_file_device("aio-uring", None, "io_uring");
}

#[test]
fn file_o_direct_with_aio_sync_qd32_write_read_verify() {
    run_file_device("aio-sync", Some("sync"), "sync");
}
