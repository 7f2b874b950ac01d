//! rust-vmm's vhost-user frontend (`vhost` crate, feature `vhost-user-frontend`) drives a
//! uvdpa virtio-blk device through its whole lifecycle, with this test acting as the
//! virtio driver on the shared memory; and the STATUS protocol feature over a raw socket.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use uvdpa_virtio::split::testing::DriverQueue;
use uvdpa_virtio::{GuestMemory, MemoryRegion};
use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const UADDR: u64 = 0x7f00_0000_0000;
const MEM: u64 = 4 << 20;

/// A memfd of `MEM` bytes that the test maps as the virtio driver and the frontend hands to
/// the backend as the memory table (gpa 0, frontend address `UADDR`).
fn share_memory(fe: &Frontend) -> (std::os::fd::OwnedFd, Arc<GuestMemory>) {
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
    (fd, mem)
}

/// Lays out vring 0 of `size` at guest address 0x1000 and gives it to the backend (num,
/// addr, call, kick; with `enable`, also base 0 before the call and SET_VRING_ENABLE after
/// the kick, as frontends that negotiated protocol features do). Returns (ring, call, kick).
fn start_ring0(
    fe: &mut Frontend,
    mem: &Arc<GuestMemory>,
    size: u16,
    enable: bool,
) -> (DriverQueue, EventFd, EventFd) {
    let dq = DriverQueue::new(mem.clone(), 0x1000, size);
    let (call, kick) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    fe.set_vring_num(0, size).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: UADDR + dq.desc,
            used_ring_addr: UADDR + dq.used,
            avail_ring_addr: UADDR + dq.avail,
            log_addr: None,
        },
    )
    .unwrap();
    if enable {
        fe.set_vring_base(0, 0).unwrap();
    }
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    if enable {
        fe.set_vring_enable(0, true).unwrap();
    }
    (dq, call, kick)
}

fn wait_call(call: &EventFd) {
    assert!(
        common::vu::wait_event(call, Duration::from_secs(10)),
        "no used-buffer notification within 10 s"
    );
}

/// Puts a virtio-blk request (header, optional data, status byte) on the ring and returns
/// (head, status address).
fn blk_request(
    dq: &mut DriverQueue,
    t: u32,
    sector: u64,
    data: Option<(u64, u32, bool)>,
    slot: u64,
) -> (u16, u64) {
    let hdr = 0x20_0000 + slot * 0x100;
    let status = hdr + 0x80;
    let mut h = t.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    dq.mem.write(hdr, &h).unwrap();
    dq.mem.write(status, &[0xff]).unwrap();
    let mut bufs = vec![(hdr, 16, false)];
    bufs.extend(data);
    bufs.push((status, 1, true));
    (dq.add_chain(&bufs), status)
}

fn status_byte(dq: &DriverQueue, at: u64) -> u8 {
    let mut b = [0u8];
    dq.mem.read(at, &mut b).unwrap();
    b[0]
}

#[test]
fn rust_vmm_frontend_drives_blk_lifecycle() {
    let d = Daemon::start(
        "fe",
        &blk_config(
            "fe",
            "backend = \"ram\"\nsize = \"16M\"\nserial = \"fe-serial\"",
        ),
        &["fe"],
    );
    let mut fe = Frontend::connect(d.sock("fe"), 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert!(offered & (1 << 32) != 0 && offered & (1 << 30) != 0);
    assert!(offered & (1 << 9) != 0, "VIRTIO_BLK_F_FLUSH offered");
    fe.set_features((1 << 32) | (1 << 30) | (1 << 28)).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    for f in [
        P::MQ,
        P::REPLY_ACK,
        P::CONFIG,
        P::CONFIGURE_MEM_SLOTS,
        P::STATUS,
        P::RESET_DEVICE,
    ] {
        assert!(pf.contains(f), "{f:?} not offered");
    }
    fe.set_protocol_features(
        P::MQ | P::REPLY_ACK | P::CONFIG | P::CONFIGURE_MEM_SLOTS | P::RESET_DEVICE,
    )
    .unwrap();
    // Ask for an ack on every request from here on (REPLY_ACK), so failures are reported.
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().unwrap(), 1);
    assert_eq!(fe.get_max_mem_slots().unwrap(), 32);

    // Guest memory: a memfd the test maps as the "driver" and the frontend hands over.
    let (_fd, mem) = share_memory(&fe);
    let (mut dq, call, kick) = start_ring0(&mut fe, &mem, 64, true);

    // OUT: write a 4 KiB pattern at sector 8.
    let data = pattern(5, 4096);
    mem.write(0x30_0000, &data).unwrap();
    let (h, st) = blk_request(&mut dq, 1, 8, Some((0x30_0000, 4096, false)), 0);
    dq.publish();
    kick.write(1).unwrap();
    wait_call(&call);
    assert_eq!(dq.pop_used(), Some((u32::from(h), 1)));
    assert_eq!(status_byte(&dq, st), 0, "VIRTIO_BLK_S_OK");

    // IN: read it back into another buffer.
    let (h, st) = blk_request(&mut dq, 0, 8, Some((0x31_0000, 4096, true)), 1);
    dq.publish();
    kick.write(1).unwrap();
    wait_call(&call);
    assert_eq!(dq.pop_used(), Some((u32::from(h), 4097)));
    assert_eq!(status_byte(&dq, st), 0);
    let mut back = vec![0u8; 4096];
    mem.read(0x31_0000, &mut back).unwrap();
    assert!(back == data);

    // GET_ID, an unsupported type, and a read past the end.
    let (_, st_id) = blk_request(&mut dq, 8, 0, Some((0x32_0000, 20, true)), 2);
    let (_, st_bad) = blk_request(&mut dq, 77, 0, None, 3);
    let (_, st_eod) = blk_request(
        &mut dq,
        0,
        (16 << 20) / 512,
        Some((0x33_0000, 512, true)),
        4,
    );
    dq.publish();
    kick.write(1).unwrap();
    wait_call(&call);
    let mut id = [0u8; 20];
    mem.read(0x32_0000, &mut id).unwrap();
    assert_eq!(&id[..9], b"fe-serial");
    assert_eq!(status_byte(&dq, st_id), 0);
    assert_eq!(status_byte(&dq, st_bad), 2, "VIRTIO_BLK_S_UNSUPP");
    assert_eq!(status_byte(&dq, st_eod), 1, "VIRTIO_BLK_S_IOERR");

    // GET_VRING_BASE stops the ring and reports how far it got.
    assert_eq!(fe.get_vring_base(0).unwrap(), 5);

    // Memory slots: add and remove a second region while configured.
    let fd2 = rustix::fs::memfd_create("guest2", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd2, 1 << 20).unwrap();
    let r2 = VhostUserMemoryRegionInfo {
        guest_phys_addr: 1 << 30,
        memory_size: 1 << 20,
        userspace_addr: UADDR + (1 << 30),
        mmap_offset: 0,
        mmap_handle: fd2.as_raw_fd(),
    };
    fe.add_mem_region(&r2).unwrap();
    fe.remove_mem_region(&r2).unwrap();
    assert!(
        fe.remove_mem_region(&r2).is_err(),
        "removing an absent region must fail"
    );

    fe.reset_device().unwrap();
    drop(fe);
    assert!(d.stop().success());
}

#[test]
fn read_only_device_answers_out_with_ioerr() {
    let d = Daemon::start(
        "fero",
        &blk_config("ro", "backend = \"ram\"\nsize = \"1M\"\nread_only = true"),
        &["ro"],
    );
    let mut fe = Frontend::connect(d.sock("ro"), 1).unwrap();
    fe.set_owner().unwrap();
    assert!(
        fe.get_features().unwrap() & (1 << 5) != 0,
        "VIRTIO_BLK_F_RO offered"
    );
    fe.set_features((1 << 32) | (1 << 5)).unwrap();
    let (_fd, mem) = share_memory(&fe);
    // Without VHOST_USER_F_PROTOCOL_FEATURES the ring is enabled once it has a kick fd.
    let (mut dq, call, kick) = start_ring0(&mut fe, &mem, 16, false);
    mem.write(0x30_0000, &[0xaa; 512]).unwrap();
    let (_, st_out) = blk_request(&mut dq, 1, 0, Some((0x30_0000, 512, false)), 0);
    let (_, st_in) = blk_request(&mut dq, 0, 0, Some((0x31_0000, 512, true)), 1);
    dq.publish();
    kick.write(1).unwrap();
    wait_call(&call);
    assert_eq!(
        status_byte(&dq, st_out),
        1,
        "OUT on a read-only device: VIRTIO_BLK_S_IOERR"
    );
    assert_eq!(status_byte(&dq, st_in), 0);
    let mut back = [0xffu8; 512];
    mem.read(0x31_0000, &mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "the refused write reached the disk"
    );
    drop(fe);
    assert!(d.stop().success());
}

/// Raw requests for the STATUS protocol feature (vhost-crate frontends do not send it).
struct Raw(UnixStream);

impl Raw {
    fn req(&mut self, code: u32, need_reply: bool, body: &[u8]) -> Option<u64> {
        let mut hdr = code.to_le_bytes().to_vec();
        hdr.extend_from_slice(&(1u32 | if need_reply { 8 } else { 0 }).to_le_bytes());
        hdr.extend_from_slice(&(body.len() as u32).to_le_bytes());
        let mut msg = hdr;
        msg.extend_from_slice(body);
        std::io::Write::write_all(&mut &self.0, &msg).unwrap();
        let expects = need_reply || matches!(code, 1 | 15 | 40);
        if !expects {
            return None;
        }
        let mut rh = [0u8; 12];
        self.0.read_exact(&mut rh).unwrap();
        let mut b = [0u8; 8];
        self.0.read_exact(&mut b).unwrap();
        Some(u64::from_le_bytes(b))
    }
}

#[test]
fn status_protocol_refuses_features_ok_and_resets() {
    const SET_FEATURES: u32 = 2;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    const SET_STATUS: u32 = 39;
    const GET_STATUS: u32 = 40;
    let d = Daemon::start(
        "st",
        &blk_config("st", "backend = \"null\"\nsize = \"1M\""),
        &["st"],
    );
    let s = UnixStream::connect(d.sock("st")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = Raw(s);
    let proto = (1u64 << 30) | (1 << 32);
    r.req(
        SET_PROTOCOL_FEATURES,
        false,
        &(P::REPLY_ACK | P::STATUS).bits().to_le_bytes(),
    );
    assert_eq!(
        r.req(SET_FEATURES, true, &(1u64 << 30).to_le_bytes()),
        Some(0)
    );
    assert_eq!(r.req(SET_STATUS, true, &1u64.to_le_bytes()), Some(0));
    assert_eq!(r.req(SET_STATUS, true, &3u64.to_le_bytes()), Some(0));
    // The driver left out VIRTIO_F_VERSION_1 (mandated): FEATURES_OK is refused...
    assert_ne!(r.req(SET_STATUS, true, &11u64.to_le_bytes()), Some(0));
    // ...and a re-read shows it clear, as virtio 1.2 §3.1.1 has the driver check.
    assert_eq!(r.req(GET_STATUS, false, &[]), Some(3));
    // Driver features with VERSION_1: accepted.
    assert_eq!(r.req(SET_FEATURES, true, &proto.to_le_bytes()), Some(0));
    assert_eq!(r.req(SET_STATUS, true, &11u64.to_le_bytes()), Some(0));
    assert_eq!(r.req(GET_STATUS, false, &[]), Some(11));
    assert_eq!(r.req(SET_STATUS, true, &15u64.to_le_bytes()), Some(0));
    assert_eq!(r.req(GET_STATUS, false, &[]), Some(15));
    // Clearing bits without a reset is refused; writing 0 resets.
    assert_ne!(r.req(SET_STATUS, true, &3u64.to_le_bytes()), Some(0));
    assert_eq!(r.req(SET_STATUS, true, &0u64.to_le_bytes()), Some(0));
    assert_eq!(r.req(GET_STATUS, false, &[]), Some(0));
    drop(r);
    assert!(d.stop().success());
}

#[test]
fn mandated_features_gate_features_ok() {
    const SET_FEATURES: u32 = 2;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    const SET_STATUS: u32 = 39;
    const GET_STATUS: u32 = 40;
    const FLUSH: u64 = 1 << 9;
    let cfg = blk_config(
        "m",
        "backend = \"null\"\nsize = \"1M\"\nmandate = [\"VIRTIO_BLK_F_FLUSH\"]",
    );
    let d = Daemon::start("mand", &cfg, &["m"]);
    // With STATUS: FEATURES_OK is left clear until the driver accepts the mandated feature.
    let s = UnixStream::connect(d.sock("m")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = Raw(s);
    let base = (1u64 << 30) | (1 << 32);
    r.req(
        SET_PROTOCOL_FEATURES,
        false,
        &(P::REPLY_ACK | P::STATUS).bits().to_le_bytes(),
    );
    assert_eq!(r.req(SET_FEATURES, true, &base.to_le_bytes()), Some(0));
    assert_eq!(r.req(SET_STATUS, true, &3u64.to_le_bytes()), Some(0));
    assert_ne!(
        r.req(SET_STATUS, true, &11u64.to_le_bytes()),
        Some(0),
        "FEATURES_OK without a mandated feature"
    );
    assert_eq!(r.req(GET_STATUS, false, &[]), Some(3));
    assert_eq!(
        r.req(SET_FEATURES, true, &(base | FLUSH).to_le_bytes()),
        Some(0)
    );
    assert_eq!(r.req(SET_STATUS, true, &11u64.to_le_bytes()), Some(0));
    assert_eq!(r.req(GET_STATUS, false, &[]), Some(11));
    drop(r);
    // Without STATUS (rust-vmm's frontend), SET_FEATURES itself is refused.
    std::thread::sleep(Duration::from_millis(50));
    let mut fe = Frontend::connect(d.sock("m"), 1).unwrap();
    fe.set_owner().unwrap();
    assert!(fe.get_features().unwrap() & FLUSH != 0);
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(P::REPLY_ACK).unwrap();
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    assert!(
        fe.set_features(base).is_err(),
        "features without the mandated one were accepted"
    );
    fe.set_features(base | FLUSH).unwrap();
    drop(fe);
    // A mandate the device cannot offer is refused at creation, naming the feature.
    let (ok, _, err) = d.cli(&[
        "dev",
        "add",
        "name",
        "m2",
        "mgmtdev",
        "blk",
        "size",
        "1M",
        "ro",
        "mandate",
        "VIRTIO_BLK_F_DISCARD",
    ]);
    assert!(!ok && err.contains("VIRTIO_BLK_F_DISCARD"), "{err}");
    assert!(d.stop().success());
}

#[test]
fn broken_ring_sets_needs_reset_and_notifies_the_frontend_over_its_channel() {
    let d = Daemon::start(
        "nr",
        &blk_config("nr", "backend = \"ram\"\nsize = \"1M\""),
        &["nr"],
    );
    let mut fe = Frontend::connect(d.sock("nr"), 1).unwrap();
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    fe.set_features((1 << 32) | (1 << 30)).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(P::BACKEND_REQ));
    fe.set_protocol_features(P::REPLY_ACK | P::BACKEND_REQ)
        .unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    fe.set_backend_request_fd(&theirs).unwrap();
    let (_fd, mem) = share_memory(&fe);
    let (mut dq, _call, kick) = start_ring0(&mut fe, &mem, 16, true);
    // A descriptor loop: 0 -> 1 -> 0.
    dq.write_desc(dq.desc, 0, 0x30_0000, 16, 1, 1);
    dq.write_desc(dq.desc, 1, 0x30_0000, 16, 1, 0);
    dq.push_avail(0);
    dq.publish();
    kick.write(1).unwrap();
    // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG arrives on the backend channel.
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hdr = [0u8; 12];
    (&ours)
        .read_exact(&mut hdr)
        .expect("no config-change notice from the backend");
    assert_eq!(
        u32::from_le_bytes(hdr[0..4].try_into().unwrap()),
        2,
        "CONFIG_CHANGE_MSG"
    );
    let dev = d.cli_json(&["dev", "show", "nr"]);
    assert_eq!(dev["dev"][0]["state"], "needs-reset", "{dev}");
    drop(fe);
    assert!(d.stop().success());
}
