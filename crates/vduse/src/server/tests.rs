//! The message policy against a hostile kernel: the loop runs over one end of a
//! SOCK_SEQPACKET socketpair (each write is one message, as each read of the VDUSE device
//! fd is one request), and the test plays the kernel on the other end. The policy's ioctls
//! either fail as they do on a socket (ENOTTY), or come from [`FakeKernel`].

use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use rustix::io::Errno;
use rustix::net::{
    recv, send, socketpair, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType,
};
use uvdpa_devices::blk::{BackendSpec, BlkConfig, BlkDevice};
use uvdpa_virtio::MemoryRegion;

use super::*;
use crate::message::ResponseResult;
use crate::sys::VDUSE_UPDATE_IOTLB;

const ACK: u8 = DeviceStatus::ACKNOWLEDGE.bits();
const DRIVER: u8 = DeviceStatus::DRIVER.bits();
const FEATURES_OK: u8 = DeviceStatus::FEATURES_OK.bits();
const DRIVER_OK: u8 = DeviceStatus::DRIVER_OK.bits();

/// How long a test waits for an answer before calling the loop dead.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Vrings of the test device (a two-queue virtio-blk).
const QUEUES: u16 = 2;
const QUEUE_SIZE: u16 = 256;
/// The fake kernel's guest memory: vring `i` at `i * VRING_STRIDE`.
const VRING_STRIDE: u64 = 0x10000;

fn blk() -> Arc<dyn VirtioDevice> {
    Arc::new(
        BlkDevice::new(BlkConfig {
            backend: BackendSpec::Ram { size: 1 << 20 },
            read_only: false,
            num_queues: QUEUES,
            queue_size: QUEUE_SIZE,
            serial: "vduse-policy".into(),
            logical_block_size: 512,
        })
        .unwrap(),
    )
}

/// The policy's ioctls as a kernel that answers what the test set.
#[derive(Default)]
struct FakeKernel {
    /// What VDUSE_DEV_GET_FEATURES returns.
    features: Mutex<u64>,
    /// VDUSE_VQ_SETUP_KICKFD calls: (index, assigned).
    kickfds: Mutex<Vec<(u32, bool)>>,
}

impl FakeKernel {
    fn with_features(features: VirtioFeatures) -> Arc<Self> {
        Arc::new(Self {
            features: Mutex::new(features.bits()),
            ..Self::default()
        })
    }

    fn set_features(&self, features: u64) {
        *self.features.lock().unwrap() = features;
    }
}

impl PolicyOps for FakeKernel {
    fn get_features(&self) -> Result<u64, VduseError> {
        Ok(*self.features.lock().unwrap())
    }

    fn vq_get_info(&self, index: u32) -> Result<VqInfo, VduseError> {
        if index >= u32::from(QUEUES) {
            return Err(VduseError::Ioctl {
                op: "VDUSE_VQ_GET_INFO",
                errno: Errno::INVAL,
            });
        }
        let base = u64::from(index) * VRING_STRIDE;
        Ok(VqInfo {
            index,
            num: u32::from(QUEUE_SIZE),
            desc_addr: base,
            driver_addr: base + 0x1000,
            device_addr: base + 0x2000,
            state_words: [0; 4],
            ready: true,
        })
    }

    fn vq_setup_kickfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<(), VduseError> {
        self.kickfds.lock().unwrap().push((index, fd.is_some()));
        Ok(())
    }

    fn guest_memory(self: Arc<Self>) -> Result<GuestMemory, VduseError> {
        let size = u64::from(QUEUES) * VRING_STRIDE;
        let map = |source| VduseError::Map {
            start: 0,
            last: size - 1,
            source,
        };
        GuestMemory::new(vec![MemoryRegion::anonymous(0, size).map_err(map)?]).map_err(map)
    }
}

/// The kernel's side of a served fake device.
struct Kernel {
    server: Option<VduseServer>,
    fd: Arc<OwnedFd>,
    next_id: u32,
}

impl Kernel {
    /// Serves a blk device over a socketpair; the policy's ioctls go to `fake`, or to the
    /// socket (ENOTTY) without one.
    fn new(name: &str, fake: Option<Arc<FakeKernel>>, opts: VduseOptions) -> Self {
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let dev = Arc::new(DeviceFd::from_fd(theirs).unwrap());
        let ops: Arc<dyn PolicyOps> = match fake {
            Some(f) => f,
            None => dev.clone(),
        };
        let server = VduseServer::serve(Parts {
            name: name.into(),
            dev,
            ops,
            device: blk(),
            opts,
            created: true,
            kernel: false,
            adopt: None,
        })
        .unwrap();
        assert!(!server.reattached());
        Self {
            server: Some(server),
            fd: Arc::new(ours),
            next_id: 1,
        }
    }

    fn server(&self) -> &VduseServer {
        self.server.as_ref().unwrap()
    }

    fn send_bytes(&self, bytes: &[u8]) {
        assert_eq!(
            send(&*self.fd, bytes, SendFlags::NOSIGNAL).unwrap(),
            bytes.len()
        );
    }

    /// Sends a request of `kind` under a fresh id; returns the id.
    fn send(&mut self, kind: RequestKind) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.send_bytes(
            &Request {
                request_id: id,
                kind,
            }
            .to_bytes(),
        );
        id
    }

    /// Whether a message arrives within `wait`.
    fn readable(&self, wait: Duration) -> bool {
        let ts = Timespec {
            tv_sec: i64::try_from(wait.as_secs()).unwrap(),
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&*self.fd, PollFlags::IN)];
        poll(&mut fds, Some(&ts)).unwrap() > 0
    }

    /// The next response, parsed with `layout` for a GET_VQ_STATE answer.
    fn recv(&self, layout: Option<RingLayout>) -> Response {
        assert!(
            self.readable(ANSWER_TIMEOUT),
            "no answer within {ANSWER_TIMEOUT:?}: the loop is stuck or dead"
        );
        let mut buf = [0u8; 2 * REQUEST_SIZE];
        let (n, _) = recv(&*self.fd, &mut buf, RecvFlags::DONTWAIT).unwrap();
        Response::parse(&buf[..n], layout).unwrap()
    }

    /// Sends `kind` and returns the answer, checked to carry the request's id.
    fn ask_as(&mut self, kind: RequestKind, layout: Option<RingLayout>) -> Response {
        let id = self.send(kind);
        let resp = self.recv(layout);
        assert_eq!(resp.request_id, id, "answer to {kind:?}");
        resp
    }

    fn ask(&mut self, kind: RequestKind) -> Response {
        self.ask_as(kind, None)
    }

    fn set_status(&mut self, status: u8) -> ResponseResult {
        self.ask(RequestKind::SetStatus { status }).result
    }

    fn status(&self) -> u8 {
        self.server().session_state().status
    }

    /// A valid request still gets its answer.
    fn assert_alive(&mut self) {
        let resp = self.ask(RequestKind::UpdateIotlb {
            start: 0x1000,
            last: 0x1fff,
        });
        assert_eq!(resp.result, ResponseResult::Ok);
    }

    fn wakeups(&self) -> u64 {
        let shared = self.server().shared.as_ref().unwrap();
        shared.wakeups.load(Ordering::Relaxed)
    }

    /// Shuts the server down; returns how long that took.
    fn shutdown(&mut self) -> Duration {
        let t = Instant::now();
        self.server.take().unwrap().shutdown();
        t.elapsed()
    }
}

#[test]
fn features_ok_fails_when_get_features_fails() {
    let mut k = Kernel::new("vduse-policy-enotty", None, VduseOptions::default());
    assert_eq!(k.set_status(ACK), ResponseResult::Ok);
    assert_eq!(k.status(), ACK);
    assert_eq!(k.set_status(ACK | DRIVER), ResponseResult::Ok);
    assert_eq!(k.status(), ACK | DRIVER);
    // VDUSE_DEV_GET_FEATURES fails (ENOTTY on a socket): FEATURES_OK is refused.
    assert_eq!(
        k.set_status(ACK | DRIVER | FEATURES_OK),
        ResponseResult::Failed
    );
    assert_eq!(k.status(), ACK | DRIVER);
    k.assert_alive();
    assert_eq!(k.set_status(0), ResponseResult::Ok);
    assert_eq!(k.status(), 0);
    k.assert_alive();
}

#[test]
fn features_ok_checks_the_drivers_features() {
    let good = VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_F_ACCESS_PLATFORM;
    let fake = FakeKernel::with_features(good);
    let opts = VduseOptions {
        mandated: VirtioFeatures::VIRTIO_F_VERSION_1,
        ..VduseOptions::default()
    };
    let mut k = Kernel::new("vduse-policy-features", Some(fake.clone()), opts);
    assert_eq!(k.set_status(ACK), ResponseResult::Ok);
    assert_eq!(k.set_status(ACK | DRIVER), ResponseResult::Ok);

    // A bit the device never offered.
    fake.set_features(good.bits() | 1 << 50);
    assert_eq!(
        k.set_status(ACK | DRIVER | FEATURES_OK),
        ResponseResult::Failed
    );
    assert_eq!(k.status(), ACK | DRIVER);
    // The mandated VIRTIO_F_VERSION_1 missing.
    fake.set_features(VirtioFeatures::VIRTIO_F_ACCESS_PLATFORM.bits());
    assert_eq!(
        k.set_status(ACK | DRIVER | FEATURES_OK),
        ResponseResult::Failed
    );
    assert_eq!(k.status(), ACK | DRIVER);
    // DRIVER_OK before FEATURES_OK: out of order.
    assert_eq!(
        k.set_status(ACK | DRIVER | DRIVER_OK),
        ResponseResult::Failed
    );
    assert_eq!(k.status(), ACK | DRIVER);
    k.assert_alive();

    fake.set_features(good.bits());
    assert_eq!(k.set_status(ACK | DRIVER | FEATURES_OK), ResponseResult::Ok);
    assert_eq!(k.status(), ACK | DRIVER | FEATURES_OK);
    assert_eq!(k.server().session_state().features, good.bits());

    // Bits cleared without a reset.
    assert_eq!(k.set_status(ACK | DRIVER), ResponseResult::Failed);
    assert_eq!(k.set_status(ACK | FEATURES_OK), ResponseResult::Failed);
    assert_eq!(k.status(), ACK | DRIVER | FEATURES_OK);

    // DRIVER_OK starts both vrings from VDUSE_VQ_GET_INFO with a kick fd each.
    assert_eq!(
        k.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK),
        ResponseResult::Ok
    );
    assert_eq!(k.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(k.server().session_state().running_vrings, QUEUES);
    assert_eq!(*fake.kickfds.lock().unwrap(), [(0, true), (1, true)]);
    // ... and clearing DRIVER_OK is refused too.
    assert_eq!(
        k.set_status(ACK | DRIVER | FEATURES_OK),
        ResponseResult::Failed
    );
    assert_eq!(k.server().session_state().running_vrings, QUEUES);

    // Reset: every vring stopped, kick fds removed, status 0.
    fake.kickfds.lock().unwrap().clear();
    assert_eq!(k.set_status(0), ResponseResult::Ok);
    assert_eq!(k.status(), 0);
    assert_eq!(k.server().session_state().running_vrings, 0);
    assert_eq!(*fake.kickfds.lock().unwrap(), [(0, false), (1, false)]);
    k.assert_alive();
    // A new negotiation after the reset.
    assert_eq!(k.set_status(ACK), ResponseResult::Ok);
    assert_eq!(k.status(), ACK);
}

#[test]
fn get_vq_state_checks_the_index() {
    let good = VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_F_ACCESS_PLATFORM;
    let fake = FakeKernel::with_features(good);
    let mut k = Kernel::new("vduse-policy-vqstate", Some(fake), VduseOptions::default());
    for index in [u32::from(QUEUES), 1000, u32::MAX] {
        let resp = k.ask(RequestKind::GetVqState { index });
        assert_eq!(resp.result, ResponseResult::Failed, "vring {index}");
        assert_eq!(resp.vq_state, None);
    }
    k.assert_alive();
    for index in 0..u32::from(QUEUES) {
        let resp = k.ask_as(RequestKind::GetVqState { index }, Some(RingLayout::Split));
        assert_eq!(
            resp,
            Response::vq_state_split(resp.request_id, index, 0),
            "vring {index}"
        );
    }
    // The same with the rings running (stopped for the report, then running on).
    for s in [ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK, 0x0f] {
        assert_eq!(k.set_status(s), ResponseResult::Ok);
    }
    for index in 0..u32::from(QUEUES) {
        let resp = k.ask_as(RequestKind::GetVqState { index }, Some(RingLayout::Split));
        assert_eq!(resp, Response::vq_state_split(resp.request_id, index, 0));
    }
    assert_eq!(k.server().session_state().running_vrings, QUEUES);
    let resp = k.ask(RequestKind::GetVqState { index: 7 });
    assert_eq!(resp.result, ResponseResult::Failed);
    assert_eq!(k.set_status(0), ResponseResult::Ok);
}

#[test]
fn update_iotlb_with_an_empty_range_is_failed_by_id() {
    let mut k = Kernel::new("vduse-policy-iotlb", None, VduseOptions::default());
    for (start, last) in [(0x2000, 0x1000), (u64::MAX, 0), (1, 0)] {
        // Request::parse refuses it; the loop still answers by the id.
        let bytes = Request {
            request_id: 0xabc0,
            kind: RequestKind::UpdateIotlb { start, last },
        }
        .to_bytes();
        assert_eq!(
            u32::from_ne_bytes(bytes[..4].try_into().unwrap()),
            VDUSE_UPDATE_IOTLB
        );
        k.send_bytes(&bytes);
        assert_eq!(
            k.recv(None),
            Response::failed(0xabc0),
            "{start:#x}..={last:#x}"
        );
        k.assert_alive();
    }
    for (start, last) in [(0, 0), (0, u64::MAX), (u64::MAX, u64::MAX)] {
        let resp = k.ask(RequestKind::UpdateIotlb { start, last });
        assert_eq!(resp.result, ResponseResult::Ok, "{start:#x}..={last:#x}");
    }
}

#[test]
fn unknown_request_types_are_failed_by_id() {
    let mut k = Kernel::new("vduse-policy-unknown", None, VduseOptions::default());
    for ty in [3, 4, 0x100, u32::MAX] {
        let resp = k.ask(RequestKind::Unknown { ty });
        assert_eq!(resp, Response::failed(resp.request_id), "type {ty}");
    }
    k.assert_alive();
    assert_eq!(k.status(), 0);
}

#[test]
fn truncated_and_garbage_messages_do_not_stop_the_loop() {
    let mut k = Kernel::new("vduse-policy-garbage", None, VduseOptions::default());
    let valid = Request {
        request_id: 99,
        kind: RequestKind::SetStatus { status: ACK },
    }
    .to_bytes();
    // Too short to be a request: nothing to answer by, skipped.
    for len in [0, 1, 7, 8, 100, REQUEST_SIZE - 1] {
        k.send_bytes(&valid[..len]);
    }
    assert!(
        !k.readable(Duration::from_millis(200)),
        "a truncated request was answered"
    );
    assert_eq!(k.status(), 0, "a truncated SET_STATUS was applied");
    k.assert_alive();

    // Full-size garbage (xorshift bytes): every message answered once, by its id.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..500u32 {
        let mut b = [0u8; REQUEST_SIZE];
        for chunk in b.chunks_mut(8) {
            chunk.copy_from_slice(&next().to_ne_bytes()[..chunk.len()]);
        }
        if i % 2 == 0 {
            // Half with a known type, random payload.
            b[..4].copy_from_slice(&(i / 2 % 4).to_ne_bytes());
        }
        b[4..8].copy_from_slice(&(0x5000_0000 + i).to_ne_bytes());
        k.send_bytes(&b);
        let layout =
            (u32::from_ne_bytes(b[..4].try_into().unwrap()) == 0).then_some(RingLayout::Split);
        let resp = k.recv(layout);
        assert_eq!(resp.request_id, 0x5000_0000 + i, "garbage message {i}");
    }
    // All ff: an unknown type with id u32::MAX.
    k.send_bytes(&[0xff; REQUEST_SIZE]);
    assert_eq!(k.recv(None), Response::failed(u32::MAX));
    k.assert_alive();
    assert_eq!(k.set_status(0), ResponseResult::Ok);
    assert_eq!(k.status(), 0);
}

#[test]
fn a_flood_is_answered() {
    let mut k = Kernel::new("vduse-policy-flood", None, VduseOptions::default());
    const N: u32 = 10_000;
    // Windows below what the socket buffers hold, so no answer is dropped on EAGAIN (the
    // kernel's device fd never refuses a response write).
    const WINDOW: u32 = 100;
    let t = Instant::now();
    let mut answered = 0;
    while answered < N {
        let ids: Vec<u32> = (0..WINDOW.min(N - answered))
            .map(|i| {
                k.send(if i % 2 == 0 {
                    RequestKind::UpdateIotlb {
                        start: u64::from(i) << 12,
                        last: (u64::from(i) << 12) | 0xfff,
                    }
                } else {
                    RequestKind::Unknown { ty: 77 }
                })
            })
            .collect();
        for (i, id) in ids.into_iter().enumerate() {
            let resp = k.recv(None);
            assert_eq!(resp.request_id, id);
            let want = if i % 2 == 0 {
                ResponseResult::Ok
            } else {
                ResponseResult::Failed
            };
            assert_eq!(resp.result, want);
            answered += 1;
        }
    }
    assert!(!k.readable(Duration::ZERO), "more answers than requests");
    k.assert_alive();
    eprintln!("{N} requests answered in {:?}", t.elapsed());
}

#[test]
fn shutdown_with_requests_pending_returns_promptly() {
    let fake = FakeKernel::with_features(
        VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_F_ACCESS_PLATFORM,
    );
    let mut k = Kernel::new("vduse-policy-shutdown", Some(fake), VduseOptions::default());
    for s in [ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK, 0x0f] {
        assert_eq!(k.set_status(s), ResponseResult::Ok);
    }
    // A writer that keeps the server's queue full of GET_VQ_STATE for running rings (each
    // stops and restarts a worker: slower to answer than to send), never reading the
    // answers (so the server's writes fail too), until told to stop or for 5 s at most.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let (fd, stop, sent) = (k.fd.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut id = 1000u32;
            while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(5) {
                let req = Request {
                    request_id: id,
                    kind: RequestKind::GetVqState { index: id % 2 },
                };
                match send(
                    &*fd,
                    &req.to_bytes(),
                    SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
                ) {
                    Ok(_) => {
                        id = id.wrapping_add(1);
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Errno::AGAIN) => std::thread::yield_now(),
                    Err(_) => break,
                }
            }
        })
    };
    let t = Instant::now();
    while sent.load(Ordering::Relaxed) < 200 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let took = k.shutdown();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        sent.load(Ordering::Relaxed) >= 200,
        "the flood did not build up"
    );
    assert!(
        took < Duration::from_secs(2),
        "shutdown under a flood took {took:?}"
    );
}

#[test]
fn a_hung_up_peer_does_not_make_the_loop_spin() {
    let mut k = Kernel::new("vduse-policy-hangup", None, VduseOptions::default());
    k.assert_alive();
    let before = k.wakeups();
    // The kernel's end closes: the fd polls readable and hung up for good, and every read
    // returns 0 bytes (as a device marked broken polls EPOLLERR for good).
    let Kernel { server, fd, .. } = k;
    drop(fd);
    let server = server.unwrap();
    let wakeups = || {
        server
            .shared
            .as_ref()
            .unwrap()
            .wakeups
            .load(Ordering::Relaxed)
    };
    std::thread::sleep(Duration::from_secs(1));
    let woke = wakeups() - before;
    let most = 2 + Duration::from_secs(1).as_millis() / STALL_BACKOFF.as_millis();
    assert!(
        u128::from(woke) <= most,
        "{woke} wakeups in 1 s with the peer gone (at most {most} expected)"
    );
    let t = Instant::now();
    server.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t.elapsed()
    );
}

#[test]
fn parts_of_a_stand_in_fd_are_not_destroyed_in_the_kernel() {
    let mut k = Kernel::new("vduse-policy-parts", None, VduseOptions::default());
    assert!(!k.server().bound());
    assert_eq!(
        k.server().path(),
        Path::new("/dev/vduse/vduse-policy-parts")
    );
    assert_eq!(k.server().vectors().nvec(), QUEUES);
    // config_changed goes to the fd's ioctls: ENOTTY on a socket, an error not a panic.
    assert!(k.server().config_changed().is_err());
    k.assert_alive();
    let took = k.shutdown();
    assert!(took < Duration::from_secs(2));
}

/// Drives a fake device to DRIVER_OK with both vrings running.
fn running_device(name: &str) -> (Kernel, Arc<FakeKernel>, VirtioFeatures) {
    let good = VirtioFeatures::VIRTIO_F_VERSION_1 | VirtioFeatures::VIRTIO_F_ACCESS_PLATFORM;
    let fake = FakeKernel::with_features(good);
    let mut k = Kernel::new(name, Some(fake.clone()), VduseOptions::default());
    for s in [ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK] {
        assert_eq!(k.set_status(s), ResponseResult::Ok);
    }
    assert_eq!(
        k.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK),
        ResponseResult::Ok
    );
    assert_eq!(k.server().session_state().running_vrings, QUEUES);
    (k, fake, good)
}

#[test]
fn quiesce_pauses_the_loop_and_resume_answers_what_waited() {
    let (mut k, _fake, _) = running_device("vduse-pause");
    let h = k.server().quiesce(ANSWER_TIMEOUT).unwrap();
    assert_eq!(h.state.status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(
        k.server().quiesce(ANSWER_TIMEOUT).is_err(),
        "a second quiesce while paused must be refused"
    );
    // Requests wait in the fd while paused, unanswered.
    let id = k.send(RequestKind::UpdateIotlb {
        start: 0x1000,
        last: 0x1fff,
    });
    assert!(
        !k.readable(Duration::from_millis(300)),
        "answered while paused"
    );
    k.server().resume();
    let resp = k.recv(None);
    assert_eq!((resp.request_id, resp.result), (id, ResponseResult::Ok));
    // The vrings run again (the worker publishes after the next request).
    k.assert_alive();
    assert_eq!(k.server().session_state().running_vrings, QUEUES);
    k.shutdown();
}

#[test]
fn an_adopted_device_resumes_where_the_paused_one_stopped() {
    let (mut k, fake, good) = running_device("vduse-adopt");
    let h = k.server().quiesce(ANSWER_TIMEOUT).unwrap();
    assert_eq!(h.state.features, good.bits());
    assert_eq!(h.kicks.len(), usize::from(QUEUES));
    assert_eq!(h.state.vrings.len(), usize::from(QUEUES));
    for (i, v) in h.state.vrings.iter().enumerate() {
        let base = i as u64 * VRING_STRIDE;
        assert_eq!(v.index, i as u16);
        assert_eq!(v.size, QUEUE_SIZE);
        assert_eq!(v.addr, (base, base + 0x1000, base + 0x2000));
        assert!(v.started && v.enabled);
    }
    let setups = fake.kickfds.lock().unwrap().len();
    let id = k.send(RequestKind::UpdateIotlb {
        start: 0x2000,
        last: 0x2fff,
    });
    let adopted = VduseServer::serve(Parts {
        name: "vduse-adopt".into(),
        dev: Arc::new(DeviceFd::from_fd(h.dev).unwrap()),
        ops: fake.clone(),
        device: blk(),
        opts: VduseOptions::default(),
        created: false,
        kernel: false,
        adopt: Some(Adopted {
            kicks: h.kicks,
            stats: h.stats,
            state: h.state,
        }),
    })
    .unwrap();
    // Adopted paused: nothing answered, nothing running, no kick fd set up again.
    assert!(
        !k.readable(Duration::from_millis(300)),
        "answered before resume"
    );
    assert_eq!(
        adopted.session_state().status,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert_eq!(fake.kickfds.lock().unwrap().len(), setups);
    // The old server lets go (its copy of the fd closes), the new one serves.
    k.server.take().unwrap().detach();
    adopted.resume();
    let resp = k.recv(None);
    assert_eq!((resp.request_id, resp.result), (id, ResponseResult::Ok));
    k.server = Some(adopted);
    k.assert_alive();
    assert_eq!(k.server().session_state().running_vrings, QUEUES);
    assert_eq!(k.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    k.shutdown();
}

#[test]
fn an_adopted_device_resumed_at_once_still_starts_its_vrings() {
    // The resume may come before the adopted loop first polls its wake fd.
    for round in 0..20 {
        let (mut k, fake, _) = running_device("vduse-adopt-race");
        let h = k.server().quiesce(ANSWER_TIMEOUT).unwrap();
        let adopted = VduseServer::serve(Parts {
            name: "vduse-adopt-race".into(),
            dev: Arc::new(DeviceFd::from_fd(h.dev).unwrap()),
            ops: fake.clone(),
            device: blk(),
            opts: VduseOptions::default(),
            created: false,
            kernel: false,
            adopt: Some(Adopted {
                kicks: h.kicks,
                stats: h.stats,
                state: h.state,
            }),
        })
        .unwrap();
        adopted.resume();
        k.server.take().unwrap().detach();
        k.server = Some(adopted);
        k.assert_alive();
        assert_eq!(
            k.server().session_state().running_vrings,
            QUEUES,
            "round {round}: vrings not started after an early resume"
        );
        k.shutdown();
    }
}
