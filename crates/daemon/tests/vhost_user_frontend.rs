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
use uvdpa_virtio::chain::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use uvdpa_virtio::packed::testing::DriverQueue as PackedDriverQueue;
use uvdpa_virtio::packed::{RING_EVENT_FLAGS_DESC, WRAP_BIT};
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

/// Writes a virtio-blk request header of type `t` for `sector` at `hdr` and an unset
/// status byte at `hdr + 0x80`; returns the status byte's address.
fn blk_header(mem: &GuestMemory, hdr: u64, t: u32, sector: u64) -> u64 {
    let status = hdr + 0x80;
    let mut h = t.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    mem.write(hdr, &h).unwrap();
    mem.write(status, &[0xff]).unwrap();
    status
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
    let status = blk_header(&dq.mem, hdr, t, sector);
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

/// A virtio-blk request on a packed ring: header at `0x20_0000 + slot * 0x100`, status byte
/// 0x80 after it (preset to 0xff), optional data buffer; as one chain of consecutive ring
/// descriptors, or with `indirect` as one INDIRECT descriptor whose table is at
/// `0x28_0000 + slot * 0x100`. Returns (buffer id, status address).
fn packed_blk_request(
    dq: &mut PackedDriverQueue,
    t: u32,
    sector: u64,
    data: Option<(u64, u32, bool)>,
    slot: u64,
    indirect: bool,
) -> (u16, u64) {
    let hdr = 0x20_0000 + slot * 0x100;
    let status = blk_header(&dq.mem, hdr, t, sector);
    let mut bufs = vec![(hdr, 16, false)];
    bufs.extend(data);
    bufs.push((status, 1, true));
    let id = if indirect {
        dq.add_indirect(0x28_0000 + slot * 0x100, &bufs)
    } else {
        dq.add_chain(&bufs)
    };
    (id, status)
}

/// The status byte at guest address `at`.
fn packed_status(dq: &PackedDriverQueue, at: u64) -> u8 {
    let mut b = [0u8];
    dq.mem.read(at, &mut b).unwrap();
    b[0]
}

/// Checks a packed vring base from GET_VRING_BASE against the driver's view of the ring
/// (every request completed): bits 0..15 are the next avail slot and its wrap counter.
/// Bits 16..31 may carry the next used slot and its wrap counter (the vhost-user spec's
/// layout; equal to the avail ones after an in-order stop) or be 0 (what uvdpa sends, as
/// DPDK does).
fn check_packed_base(base: u32, dq: &PackedDriverQueue) {
    assert_eq!(
        base & 0xffff,
        u32::from(dq.avail_base()),
        "vring base {base:#x}"
    );
    let used = base >> 16;
    assert!(
        used == 0 || used == u32::from(dq.used_off_wrap()),
        "used half of vring base {base:#x}"
    );
}

/// Waits (bounded) until the device has re-armed kicks in its event suppression area at
/// the driver's next avail position (EVENT_IDX: RING_EVENT_FLAGS_DESC with that
/// `off_wrap`), which it does each time its worker goes idle.
fn wait_kick_armed_at(dq: &PackedDriverQueue, what: &str) {
    let t0 = std::time::Instant::now();
    while (dq.device_event_flags(), dq.device_event_off_wrap())
        != (RING_EVENT_FLAGS_DESC, dq.avail_base())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: device event area flags {} off_wrap {:#x}, want DESC at {:#x}",
            dq.device_event_flags(),
            dq.device_event_off_wrap(),
            dq.avail_base()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Makes `reqs` (type, sector, data) available at once, kicks, and checks that each
/// completes with VIRTIO_BLK_S_OK and the used length of its writable part. Requests
/// alternate between plain chains and indirect tables from `*n` on.
fn packed_batch(
    dq: &mut PackedDriverQueue,
    call: &EventFd,
    kick: &EventFd,
    n: &mut u64,
    reqs: &[(u32, u64, (u64, u32, bool))],
) {
    let mut want = Vec::new();
    for &(t, sector, data) in reqs {
        let slot = *n % 16;
        let (id, st) = packed_blk_request(dq, t, sector, Some(data), slot, *n % 3 == 1);
        let used = if data.2 { data.1 + 1 } else { 1 };
        want.push((id, used, st));
        *n += 1;
    }
    // Ask for a notification when the first of them is used (EVENT_IDX: DESC), and insist
    // on it.
    dq.set_driver_event(RING_EVENT_FLAGS_DESC, dq.used_off_wrap());
    common::vu::wait_event(call, Duration::ZERO);
    kick.write(1).unwrap();
    wait_call(call);
    for (id, used, st) in want {
        let t0 = std::time::Instant::now();
        let got = loop {
            if let Some(u) = dq.pop_used() {
                break u;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "request {id} not completed"
            );
            common::vu::wait_event(call, Duration::from_millis(100));
        };
        assert_eq!(got, (id, used), "used descriptor (id, len)");
        assert_eq!(packed_status(dq, st), 0, "request {id}: VIRTIO_BLK_S_OK");
    }
}

/// Writes a 4 KiB pattern at `sector` and reads it back, in one batch of two.
fn packed_write_read(
    dq: &mut PackedDriverQueue,
    call: &EventFd,
    kick: &EventFd,
    n: &mut u64,
    sector: u64,
) {
    let data = pattern(sector, 4096);
    let (w, r) = (0x32_0000 + (*n % 8) * 0x2000, 0x34_0000 + (*n % 8) * 0x2000);
    dq.mem.write(w, &data).unwrap();
    dq.mem.write(r, &[0u8; 4096]).unwrap();
    packed_batch(
        dq,
        call,
        kick,
        n,
        &[(1, sector, (w, 4096, false)), (0, sector, (r, 4096, true))],
    );
    let mut back = vec![0u8; 4096];
    dq.mem.read(r, &mut back).unwrap();
    assert!(back == data, "sector {sector}: data read back differs");
}

#[test]
fn packed_ring_blk_requests_and_vring_base_carry_the_wrap_counter() {
    const RING_PACKED: u64 = 1 << 34;
    const EVENT_IDX: u64 = 1 << 29;
    const SIZE: u16 = 16;
    let d = Daemon::start(
        "fepk",
        &blk_config("pk", "backend = \"ram\"\nsize = \"16M\""),
        &["pk"],
    );
    let mut fe = Frontend::connect(d.sock("pk"), 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert!(offered & RING_PACKED != 0, "VIRTIO_F_RING_PACKED offered");
    fe.set_features((1 << 32) | (1 << 30) | (1 << 28) | EVENT_IDX | RING_PACKED)
        .unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(P::MQ | P::REPLY_ACK | P::CONFIG)
        .unwrap();
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    let (_fd, mem) = share_memory(&fe);

    // The ring: descriptors at 0x1000, then the driver and device event suppression areas
    // where a split ring has its avail and used rings.
    let mut dq = PackedDriverQueue::new(mem.clone(), 0x1000, SIZE);
    let (call, kick) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    fe.set_vring_num(0, SIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: SIZE,
            queue_size: SIZE,
            flags: 0,
            desc_table_addr: UADDR + dq.desc,
            avail_ring_addr: UADDR + dq.driver_area,
            used_ring_addr: UADDR + dq.device_area,
            log_addr: None,
        },
    )
    .unwrap();
    // A fresh packed ring: slot 0, wrap counter 1.
    fe.set_vring_base(0, WRAP_BIT).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    let names = d.cli_json(&["dev", "show", "pk"])["dev"][0]["features"].clone();
    assert!(
        names
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "VIRTIO_F_RING_PACKED"),
        "{names}"
    );

    // One OUT (a 3-descriptor chain: header, data, status) and one IN (indirect).
    let mut n = 0u64;
    let data = pattern(9, 4096);
    mem.write(0x30_0000, &data).unwrap();
    let (id, st) = packed_blk_request(&mut dq, 1, 8, Some((0x30_0000, 4096, false)), 0, false);
    kick.write(1).unwrap();
    wait_call(&call);
    assert_eq!(dq.pop_used(), Some((id, 1)));
    assert_eq!(packed_status(&dq, st), 0, "VIRTIO_BLK_S_OK");
    let (id, st) = packed_blk_request(&mut dq, 0, 8, Some((0x31_0000, 4096, true)), 1, true);
    kick.write(1).unwrap();
    wait_call(&call);
    assert_eq!(dq.pop_used(), Some((id, 4097)));
    assert_eq!(packed_status(&dq, st), 0);
    let mut back = vec![0u8; 4096];
    mem.read(0x31_0000, &mut back).unwrap();
    assert!(back == data);
    assert_eq!(
        dq.avail_base(),
        WRAP_BIT | 4,
        "3 + 1 slots on the first lap"
    );
    wait_kick_armed_at(&dq, "after the first requests");

    // Write/read pairs (1 to 6 slots each) until the ring has wrapped at least twice and the
    // driver is on a lap with wrap counter 0, part-way through the ring.
    let mut sector = 64;
    while n < 24 || dq.avail_wrap || dq.next_avail == 0 {
        packed_write_read(&mut dq, &call, &kick, &mut n, sector);
        sector += 8;
    }
    wait_kick_armed_at(&dq, "after the laps");

    // GET_VRING_BASE stops the ring and returns the next avail slot with its wrap counter
    // (0 here) in bit 15.
    let base = fe.get_vring_base(0).unwrap();
    check_packed_base(base, &dq);
    assert_eq!(base & u32::from(WRAP_BIT), 0, "wrap counter 0 in bit 15");
    assert!(base & 0xffff > 0, "stopped part-way through the ring");
    let base = (base & 0xffff) as u16;

    // While the ring is stopped, the driver makes a write available (no kick). Restarting
    // from the base (SET_VRING_BASE, then a kick fd) finds it at once.
    let later = pattern(77, 4096);
    mem.write(0x36_0000, &later).unwrap();
    let (id, st) = packed_blk_request(&mut dq, 1, 1000, Some((0x36_0000, 4096, false)), 15, false);
    dq.set_driver_event(RING_EVENT_FLAGS_DESC, dq.used_off_wrap());
    common::vu::wait_event(&call, Duration::ZERO);
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    wait_call(&call);
    assert_eq!(dq.pop_used(), Some((id, 1)), "first request after restart");
    assert_eq!(packed_status(&dq, st), 0);
    // The ring goes on over the wrap back to counter 1, and the data is all there.
    let wrap_at_restart = dq.avail_wrap;
    let mut more = 0;
    while more < 12 || dq.avail_wrap == wrap_at_restart {
        packed_write_read(&mut dq, &call, &kick, &mut n, sector);
        sector += 8;
        more += 1;
    }
    mem.write(0x37_0000, &[0u8; 4096]).unwrap();
    packed_batch(
        &mut dq,
        &call,
        &kick,
        &mut n,
        &[
            (0, 1000, (0x37_0000, 4096, true)),
            (0, 8, (0x31_0000, 4096, true)),
        ],
    );
    mem.read(0x37_0000, &mut back).unwrap();
    assert!(back == later, "the write made before the restart");
    mem.read(0x31_0000, &mut back).unwrap();
    assert!(back == data, "the first write");
    wait_kick_armed_at(&dq, "after the restart");
    let base = fe.get_vring_base(0).unwrap();
    check_packed_base(base, &dq);
    assert_ne!(base & u32::from(WRAP_BIT), 0, "wrap counter back at 1");
    let vs = d.cli_json(&["dev", "vstats", "show", "pk", "qidx", "0"]);
    assert_eq!(vs["vstats"]["requests"], n + 3, "{vs}");
    assert_eq!(vs["vstats"]["errors"], 0, "{vs}");
    drop(fe);
    assert!(d.stop().success());
}

/// Puts a virtio-blk request on the ring as one indirect table (header, `pages` 4 KiB data
/// buffers scattered over guest memory, status byte), as Linux's virtio_blk does for a
/// request of `pages` segments whatever the ring size. Returns (head, status address).
fn indirect_blk_request(
    dq: &mut DriverQueue,
    t: u32,
    sector: u64,
    data: u64,
    pages: u16,
    table: u64,
) -> (u16, u64) {
    let hdr = table - 0x100;
    let status = blk_header(&dq.mem, hdr, t, sector);
    let write = if t == 0 { VIRTQ_DESC_F_WRITE } else { 0 };
    dq.write_desc(table, 0, hdr, 16, VIRTQ_DESC_F_NEXT, 1);
    for p in 0..pages {
        // Every other page, backwards: no two segments are contiguous.
        let addr = data + 2 * 4096 * u64::from(pages - 1 - p);
        dq.write_desc(table, p + 1, addr, 4096, write | VIRTQ_DESC_F_NEXT, p + 2);
    }
    dq.write_desc(table, pages + 1, status, 1, VIRTQ_DESC_F_WRITE, 0);
    let head = dq.add_chain(&[(table, 16 * (u32::from(pages) + 2), false)]);
    dq.write_desc(
        dq.desc,
        head,
        table,
        16 * (u32::from(pages) + 2),
        VIRTQ_DESC_F_INDIRECT,
        0,
    );
    (head, status)
}

/// What a stock guest does with QEMU's default `queue-size=128` (or 64, or 1024) on a
/// device with default settings: the device's `seg_max` (126) is what the driver builds
/// 1 MiB requests from — 258-entry indirect tables, longer than a 64- or 128-entry ring —
/// and the frontend picks a ring size other than the device's queue size, with an
/// inflight buffer for it. Every ring size serves them (issue #9, failures 1 and 2).
#[test]
fn default_device_serves_any_ring_size_and_seg_max_sized_indirect_tables() {
    let d = Daemon::start(
        "ring",
        &blk_config("ring", "backend = \"ram\"\nsize = \"16M\""),
        &["ring"],
    );
    for size in [64u16, 128, 1024] {
        let mut fe = Frontend::connect(d.sock("ring"), 1).unwrap();
        fe.set_owner().unwrap();
        fe.get_features().unwrap();
        fe.set_features((1 << 32) | (1 << 30) | (1 << 28)).unwrap();
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(P::MQ | P::REPLY_ACK | P::CONFIG | P::INFLIGHT_SHMFD)
            .unwrap();
        fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        let (_, cfg) = fe
            .get_config(
                0,
                16,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &[0; 16],
            )
            .unwrap();
        let seg_max = u32::from_le_bytes(cfg[12..16].try_into().unwrap());
        assert_eq!(seg_max, 126, "seg_max of the default queue size 128");
        let (inflight, _file) = fe
            .get_inflight_fd(&vhost::vhost_user::message::VhostUserInflight::new(
                0, 0, 1, size,
            ))
            .unwrap_or_else(|e| panic!("GET_INFLIGHT_FD for a ring of {size}: {e}"));
        assert!({ inflight.mmap_size } > 0);
        let (_fd, mem) = share_memory(&fe);
        let (mut dq, call, kick) = start_ring0(&mut fe, &mem, size, true);

        // A 1 MiB write of 256 scattered pages (the most seg_max allows would be 126 with
        // 4 KiB segments; Linux merges, so tables up to seg_max + 2 = 128 entries arrive,
        // and this longer one shows the bound is the 1024 entries of QEMU's devices).
        let data = pattern(u64::from(size), 1 << 20);
        for (p, chunk) in data.chunks(4096).enumerate() {
            mem.write(0x20_0000 + 2 * 4096 * (255 - p as u64), chunk)
                .unwrap();
        }
        let (h, st) = indirect_blk_request(&mut dq, 1, 2048, 0x20_0000, 256, 0x1f_0000);
        dq.publish();
        kick.write(1).unwrap();
        wait_call(&call);
        assert_eq!(dq.pop_used(), Some((u32::from(h), 1)), "ring {size}");
        assert_eq!(status_byte(&dq, st), 0, "ring {size}: write status");

        // Read it back into the pages between those.
        let (h, st) = indirect_blk_request(&mut dq, 0, 2048, 0x20_1000, 256, 0x1f_8000);
        dq.publish();
        kick.write(1).unwrap();
        wait_call(&call);
        assert_eq!(dq.pop_used(), Some((u32::from(h), (1 << 20) + 1)));
        assert_eq!(status_byte(&dq, st), 0, "ring {size}: read status");
        let mut back = vec![0u8; 1 << 20];
        for (p, chunk) in back.chunks_mut(4096).enumerate() {
            mem.read(0x20_1000 + 2 * 4096 * (255 - p as u64), chunk)
                .unwrap();
        }
        assert!(back == data, "ring {size}: data differs");
        drop(fe);
    }
    let log = d.log_text();
    assert!(!log.contains("NEEDS_RESET"), "{log}");
    assert!(d.stop().success());
}

/// Issue 11: GET_INFLIGHT_FD sizes the buffer for the ring layout SET_FEATURES negotiated
/// (QEMU sends SET_FEATURES first): the split layout's 16-byte entries, or the packed
/// layout's 32-byte ones; asked before SET_FEATURES, the packed size (it serves either).
#[test]
fn inflight_buffer_follows_the_negotiated_ring_layout() {
    use vhost::vhost_user::message::VhostUserInflight;
    const RING_PACKED: u64 = 1 << 34;
    let d = Daemon::start(
        "ifl",
        &blk_config("ifl", "backend = \"ram\"\nsize = \"16M\"\nqueues = 2"),
        &["ifl"],
    );
    // (features to ack, or none before asking; expected size for 2 queues of 128)
    let split = 2 * 2112;
    let packed = 2 * 4160;
    for (features, want) in [
        (Some((1u64 << 32) | (1 << 30)), split),
        (Some((1u64 << 32) | (1 << 30) | RING_PACKED), packed),
        (None, packed),
    ] {
        let mut fe = Frontend::connect(d.sock("ifl"), 1).unwrap();
        fe.set_owner().unwrap();
        fe.get_features().unwrap();
        if let Some(f) = features {
            fe.set_features(f).unwrap();
        }
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(P::MQ | P::REPLY_ACK | P::INFLIGHT_SHMFD)
            .unwrap();
        let (inflight, file) = fe
            .get_inflight_fd(&VhostUserInflight::new(0, 0, 2, 128))
            .unwrap();
        assert_eq!(
            { inflight.mmap_size } as usize,
            want,
            "features {features:x?}: {split} split, {packed} packed"
        );
        assert!(file.metadata().unwrap().len() >= want as u64);
        drop(fe);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.stop().success());
}

/// Live migration's dirty logging (vhost-user "Dirty logging"): with VHOST_F_LOG_ALL and
/// LOG_SHMFD negotiated, a log set with SET_LOG_BASE and the used ring's guest address given
/// with VHOST_VRING_F_LOG, blk reads mark exactly the pages the device wrote (data, status
/// bytes, used ring); with LOG_ALL switched off again nothing is marked.
#[test]
fn dirty_log_marks_pages_the_device_writes() {
    use uvdpa_virtio::DirtyLog;
    use vhost::vhost_user::message::VhostUserVringAddrFlags;
    use vhost::VhostUserDirtyLogRegion;

    const LOG_ALL: u64 = 1 << 26;
    let d = Daemon::start(
        "dl",
        &blk_config("dl", "backend = \"ram\"\nsize = \"16M\""),
        &["dl"],
    );
    let mut fe = Frontend::connect(d.sock("dl"), 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert!(offered & LOG_ALL != 0, "VHOST_F_LOG_ALL offered");
    let base = (1 << 32) | (1 << 30) | (1 << 28);
    fe.set_features(base).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(P::LOG_SHMFD), "LOG_SHMFD offered");
    fe.set_protocol_features(P::MQ | P::REPLY_ACK | P::CONFIG | P::LOG_SHMFD)
        .unwrap();
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    let (_fd, mem) = share_memory(&fe);
    let (mut dq, call, kick) = start_ring0(&mut fe, &mem, 64, true);

    // Data on the device to read back.
    let data = pattern(7, 3 * 4096);
    mem.write(0x30_0000, &data).unwrap();
    let (_, st) = blk_request(&mut dq, 1, 8, Some((0x30_0000, 3 * 4096, false)), 0);
    dq.publish();
    kick.write(1).unwrap();
    wait_call(&call);
    assert!(dq.pop_used().is_some());
    assert_eq!(status_byte(&dq, st), 0);

    // Migration starts, in QEMU's order: the log, LOG_ALL, the rings' log addresses.
    let log_size = MEM / 4096 / 8;
    let log_fd = rustix::fs::memfd_create("log", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&log_fd, log_size).unwrap();
    let log = DirtyLog::map(&log_fd, log_size, 0).unwrap();
    fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: log_size,
            mmap_offset: 0,
            mmap_handle: log_fd.as_raw_fd(),
        }),
    )
    .unwrap();
    fe.set_features(base | LOG_ALL).unwrap();
    let (desc, avail, used) = (dq.desc, dq.avail, dq.used);
    let ring = move |log_addr: Option<u64>| VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: if log_addr.is_some() {
            VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
        } else {
            0
        },
        desc_table_addr: UADDR + desc,
        used_ring_addr: UADDR + used,
        avail_ring_addr: UADDR + avail,
        log_addr,
    };
    fe.set_vring_addr(0, &ring(Some(dq.used))).unwrap();
    // The restarted ring may already have written its notification fields (used ring).
    let early = log.dirty_pages();
    assert!(
        early.iter().all(|&p| p == dq.used / 4096),
        "before any request only the used ring may be marked: {early:x?}"
    );
    log.clear();

    // Two reads: one page-aligned 4 KiB buffer, one 8 KiB buffer across three pages.
    let (_, st1) = blk_request(&mut dq, 0, 8, Some((0x31_0000, 4096, true)), 1);
    let (_, st2) = blk_request(&mut dq, 0, 16, Some((0x35_0800, 8192, true)), 2);
    dq.publish();
    kick.write(1).unwrap();
    wait_call(&call);
    assert!(dq.pop_used().is_some() && dq.pop_used().is_some());
    assert_eq!((status_byte(&dq, st1), status_byte(&dq, st2)), (0, 0));
    let mut back = vec![0u8; 8192];
    mem.read(0x35_0800, &mut back).unwrap();
    assert!(back == data[4096..]);
    let used_page = dq.used / 4096;
    let status_page = st1 / 4096;
    assert_eq!(status_page, st2 / 4096);
    let mut want = vec![used_page, status_page, 0x310, 0x350, 0x351, 0x352];
    want.sort_unstable();
    assert_eq!(log.dirty_pages(), want, "exactly the written pages");

    // Migration ends (or is cancelled): LOG_ALL off, addresses without F_LOG; no logging.
    fe.set_features(base).unwrap();
    fe.set_vring_addr(0, &ring(None)).unwrap();
    log.clear();
    let (_, st3) = blk_request(&mut dq, 0, 8, Some((0x36_0000, 4096, true)), 3);
    dq.publish();
    kick.write(1).unwrap();
    wait_call(&call);
    assert!(dq.pop_used().is_some());
    assert_eq!(status_byte(&dq, st3), 0);
    assert!(log.dirty_pages().is_empty(), "logging off: no bits");

    // The ring stops where it got to (the switchover's GET_VRING_BASE).
    assert_eq!(fe.get_vring_base(0).unwrap(), 4);
    drop(fe);
    assert!(d.stop().success());
}
