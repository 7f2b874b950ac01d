//! `uvdpa dev set NAME capacity SIZE` over vhost-user: rust-vmm's frontend (`vhost` crate)
//! negotiates BACKEND_REQ and CONFIG and hands the daemon a backend channel; the resize
//! makes the daemon send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on it, GET_CONFIG then reads
//! the new capacity, and requests are checked against it (virtio 1.2 §5.2.4, §2.5).

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::vu::{VuRing, F_PROTOCOL_FEATURES, F_VERSION_1, T_IN, T_OUT, UADDR};
use common::*;
use uvdpa_virtio::split::testing::DriverQueue;
use uvdpa_virtio::{GuestMemory, MemoryRegion};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures as P,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: u64 = 4 << 20;
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (backend → frontend request 2).
const CONFIG_CHANGE_MSG: u32 = 2;

/// A frontend with vring 0 running on shared memory; with `channel`, it negotiated
/// BACKEND_REQ and gave the daemon the other end of the returned socket.
struct Fe {
    fe: Frontend,
    ring: VuRing,
    channel: Option<UnixStream>,
    _fd: std::os::fd::OwnedFd,
}

impl Fe {
    fn connect(sock: &std::path::Path, channel: bool) -> Fe {
        let mut fe = Frontend::connect(sock, 1).unwrap();
        fe.set_owner().unwrap();
        fe.get_features().unwrap();
        fe.set_features(F_VERSION_1 | F_PROTOCOL_FEATURES).unwrap();
        let offered = fe.get_protocol_features().unwrap();
        let mut proto = P::REPLY_ACK | P::CONFIG;
        if channel {
            assert!(offered.contains(P::BACKEND_REQ), "{offered:?}");
            proto |= P::BACKEND_REQ;
        }
        fe.set_protocol_features(proto).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let ours = channel.then(|| {
            let (ours, theirs) = UnixStream::pair().unwrap();
            fe.set_backend_request_fd(&theirs).unwrap();
            ours.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            ours
        });
        let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, MEM).unwrap();
        let mem = Arc::new(
            GuestMemory::new(vec![MemoryRegion::map(&fd, 0, MEM, UADDR, 0).unwrap()]).unwrap(),
        );
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM,
            userspace_addr: UADDR,
            mmap_offset: 0,
            mmap_handle: fd.as_raw_fd(),
        }])
        .unwrap();
        let dq = DriverQueue::new(mem, 0x1000, 64);
        let new_fd = |flags| EventFd::new(flags).unwrap();
        let (call, kick, err) = (new_fd(EFD_NONBLOCK), new_fd(0), new_fd(EFD_NONBLOCK));
        fe.set_vring_num(0, 64).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 64,
                queue_size: 64,
                flags: 0,
                desc_table_addr: UADDR + dq.desc,
                used_ring_addr: UADDR + dq.used,
                avail_ring_addr: UADDR + dq.avail,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_err(0, &err).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Fe {
            fe,
            ring: VuRing {
                index: 0,
                dq,
                call,
                kick,
                err,
            },
            channel: ours,
            _fd: fd,
        }
    }

    /// `capacity` from GET_CONFIG, in sectors.
    fn capacity(&mut self) -> u64 {
        let (_, cfg) = self
            .fe
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
            .unwrap();
        u64::from_le_bytes(cfg[..8].try_into().unwrap())
    }

    /// Waits for the next message on the backend channel; returns (request, flags, size).
    fn backend_message(&self) -> (u32, u32, u32) {
        let mut hdr = [0u8; 12];
        self.channel
            .as_ref()
            .expect("no backend channel")
            .read_exact(&mut hdr)
            .expect("no message from the backend within 10 s");
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        (word(0), word(4), word(8))
    }

    /// Runs one 4 KiB read or write at `sector` (buffer at 0x30_0000); returns its status.
    fn io(&mut self, t: u32, sector: u64) -> u8 {
        let r = &mut self.ring;
        let (h, st) = r.blk_request(t, sector, Some((0x30_0000, 4096, t == T_IN)), 0x20_0000);
        r.dq.publish();
        r.kick();
        let used = r.wait_used(Duration::from_secs(10)).expect("no completion");
        assert_eq!(used.0, u32::from(h));
        r.byte(st)
    }
}

#[test]
fn resize_notifies_the_frontend_and_get_config_reads_the_new_capacity() {
    let d = Daemon::start(
        "rsz",
        &blk_config("rsz", "backend = \"ram\"\nsize = \"1M\""),
        &["rsz"],
    );
    let mut fe = Fe::connect(&d.sock("rsz"), true);
    assert_eq!(fe.capacity(), 2048);
    let data = pattern(1, 4096);
    fe.ring
        .write_read_verify("before the resize", 8, &data, 0x30_0000, 0x20_0000);
    // Past the end of the 1 MiB disk.
    assert_eq!(fe.io(T_OUT, 4096), 1, "write past the end: IOERR");

    // Grow to 4 MiB.
    let (ok, out, err) = d.cli(&["dev", "set", "rsz", "capacity", "4M"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("capacity 4194304") && out.contains("driver notified"),
        "{out}"
    );
    let (request, flags, size) = fe.backend_message();
    assert_eq!(request, CONFIG_CHANGE_MSG, "CONFIG_CHANGE_MSG");
    assert_eq!((flags & 0x3, size), (1, 0), "version 1, no body");
    assert_eq!(fe.capacity(), 8192);
    fe.ring
        .write_read_verify("past the old end", 4096, &data, 0x30_0000, 0x20_0000);
    fe.ring
        .write_read_verify("at the new end", 8192 - 8, &data, 0x30_0000, 0x20_0000);
    assert_eq!(fe.io(T_IN, 8192), 1, "read past the new end: IOERR");
    // The data written before the resize is still there.
    fe.ring.dq.mem.write(0x30_0000, &[0u8; 4096]).unwrap();
    assert_eq!(fe.io(T_IN, 8), 0);
    let mut back = vec![0u8; 4096];
    fe.ring.dq.mem.read(0x30_0000, &mut back).unwrap();
    assert!(back == data, "data written before the resize is gone");

    // `dev show` and `dev config show` report it.
    let dev = d.cli_json(&["dev", "show", "rsz"]);
    assert_eq!(dev["dev"][0]["capacity"], 4 << 20, "{dev}");
    let cfg = d.cli_json(&["dev", "config", "show", "rsz"]);
    assert_eq!(cfg["config"]["capacity"], 8192, "{cfg}");
    let (_, text, _) = d.cli(&["dev", "show", "rsz"]);
    assert!(text.contains("capacity 4194304"), "{text}");

    // Shrink to 512 KiB: notified again; the block past the new end fails.
    let v = d.cli_json(&["dev", "set", "rsz", "capacity", "512K"]);
    assert_eq!(v["notified"], true, "{v}");
    assert_eq!(v["dev"]["capacity"], 512 << 10, "{v}");
    assert_eq!(fe.backend_message().0, CONFIG_CHANGE_MSG);
    assert_eq!(fe.capacity(), 1024);
    assert_eq!(fe.io(T_IN, 4096), 1, "read past the shrunk end: IOERR");
    assert_eq!(fe.io(T_IN, 1016), 0, "last block inside");
    assert_eq!(fe.io(T_IN, 1020), 1, "straddling the end: IOERR");
    drop(fe);
    let log = d.log_text();
    assert!(!log.contains("NEEDS_RESET"), "{log}");
    assert!(d.stop().success());
}

#[test]
fn resize_without_a_backend_channel_or_frontend_still_changes_the_config() {
    let dir = disk_dir("rsz-file");
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let cfg = format!(
        "{}{}{}",
        blk_config(
            "f",
            &format!("backend = \"file\"\npath = \"{}\"", img.display())
        ),
        blk_config("ro", "backend = \"ram\"\nsize = \"1M\"\nread_only = true"),
        "[[device]]\nname = \"n\"\nmgmtdev = \"net\"\n",
    );
    let d = Daemon::start("rsz2", &cfg, &["f", "ro", "n"]);

    // No frontend: nothing to notify; the file grows.
    let v = d.cli_json(&["dev", "set", "f", "capacity", "2M"]);
    assert_eq!(v["notified"], false, "{v}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 2 << 20);

    // A frontend without BACKEND_REQ sees the change on its next GET_CONFIG.
    let mut fe = Fe::connect(&d.sock("f"), false);
    assert_eq!(fe.capacity(), 4096);
    let (ok, out, err) = d.cli(&["dev", "set", "f", "capacity", "3M"]);
    assert!(ok, "{err}");
    assert!(out.contains("not notified"), "{out}");
    assert_eq!(fe.capacity(), 6144);
    assert_eq!(fe.io(T_OUT, 6144 - 8), 0);
    assert_eq!(fe.io(T_OUT, 6144), 1);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 3 << 20);
    // Shrinking truncates the image, as qemu-storage-daemon's block_resize does.
    let (ok, _, err) = d.cli(&["dev", "set", "f", "capacity", "1M"]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    assert_eq!(fe.io(T_IN, 2048), 1);
    drop(fe);

    // Refusals name the reason and change nothing.
    for (args, want) in [
        (&["dev", "set", "ro", "capacity", "2M"][..], "read-only"),
        (
            &["dev", "set", "n", "capacity", "2M"][..],
            "only blk devices",
        ),
        (&["dev", "set", "f", "capacity", "1000"][..], "multiple of"),
        (&["dev", "set", "f", "capacity", "0"][..], "multiple of"),
        (&["dev", "set", "f", "capacity", "lots"][..], "capacity"),
        (&["dev", "set", "nope", "capacity", "1M"][..], "nope"),
    ] {
        let (ok, _, err) = d.cli(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let v = d.cli_json(&["dev", "show", "ro"]);
    assert_eq!(v["dev"][0]["capacity"], 1 << 20, "{v}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);

    // A RAM disk grows only inside the address space it reserved.
    let (ok, _, err) = d.cli(&[
        "dev", "add", "name", "r", "mgmtdev", "blk", "backend", "ram", "size", "1M",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = d.cli(&["dev", "set", "r", "capacity", "100T"]);
    assert!(!ok && err.contains("reserved"), "{err}");
    let (ok, _, err) = d.cli(&["dev", "set", "r", "capacity", "1G"]);
    assert!(ok, "{err}");
    assert!(d.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}
