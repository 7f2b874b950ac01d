//! A Linux TAP interface as the backend of a virtio-net device.
//!
//! The interface is attached with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a vnet header
//! size of 12 (`TUNSETVNETHDRSZ`), so every frame read from or written to it starts with
//! the same `struct virtio_net_hdr` the virtqueues carry ([`super::hdr`]): a transmit
//! chain's readable segments go to the kernel as they are (`writev`), and what the kernel
//! hands over is a receive header plus a frame. With more than one queue pair the
//! interface is multi-queue (`IFF_MULTI_QUEUE`) and each pair has its own file descriptor
//! (the kernel steers received flows across them). All descriptors are non-blocking and
//! close-on-exec; [`Tap::fd`] is for epoll.
//!
//! The kernel parses the header in the native byte order unless told otherwise; uvdpa
//! runs on little-endian hosts, where that is virtio's little-endian.
//!
//! Offloads: what the kernel may deliver (partial checksums, TSO/UFO frames) follows the
//! guest offloads the driver negotiated ([`Tap::set_offload`]); none until then.

use std::ffi::c_int;
use std::io::{self, IoSlice};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{open, Mode, OFlags};
use thiserror::Error;
use uvdpa_virtio::{Segment, VirtioFeatures};

use super::hdr::VIRTIO_NET_HDR_LEN;

/// Longest interface name in bytes (`IFNAMSIZ` less the terminating NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;
/// Most queues a TAP interface may have (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_TAP_QUEUES: u16 = 256;
/// Most segments one [`Tap::send`] takes (`IOV_MAX`).
pub const MAX_SEND_SEGMENTS: usize = 1024;
/// Prefix of default interface names ([`Tap::default_name`]).
pub const DEFAULT_PREFIX: &str = "uvdpa-";

const TUN_PATH: &str = "/dev/net/tun";

/// Why a TAP interface could not be set up.
#[derive(Debug, Error)]
pub enum TapError {
    /// An interface name the kernel would refuse.
    #[error("Invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A queue pair count out of range.
    #[error("Invalid TAP queue count {value}: must be in 1..={MAX_TAP_QUEUES}")]
    InvalidQueues {
        /// The value given.
        value: u16,
    },
    /// Opening `/dev/net/tun` failed (no TUN/TAP support, or no permission).
    #[error("Opening {TUN_PATH} failed")]
    OpenTun {
        /// The error from open.
        #[source]
        source: io::Error,
    },
    /// Creating or attaching to the interface failed (`TUNSETIFF`): no CAP_NET_ADMIN, an
    /// existing interface of another kind or with other flags, or (exclusive open) an
    /// existing interface.
    #[error("Attaching queue {queue} of TAP interface {name} failed (TUNSETIFF)")]
    Attach {
        /// The interface.
        name: String,
        /// The queue (pair) index.
        queue: u16,
        /// The error from ioctl.
        #[source]
        source: io::Error,
    },
    /// Another ioctl on the interface failed.
    #[error("{op} on TAP interface {name} failed")]
    Ioctl {
        /// The interface.
        name: String,
        /// The request, e.g. `TUNSETOFFLOAD 0x3`.
        op: String,
        /// The error from ioctl.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` with the `ifr_flags` member of its union; padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; size_of::<libc::ifreq>() - libc::IFNAMSIZ - size_of::<libc::c_short>()],
}

const _: () = assert!(size_of::<IfReq>() == size_of::<libc::ifreq>());

impl IfReq {
    fn new(name: &str, flags: c_int) -> Self {
        let mut r = Self {
            name: [0; libc::IFNAMSIZ],
            // The TUNSETIFF flags all fit the kernel's `short`.
            flags: flags as libc::c_short,
            _pad: [0; size_of::<libc::ifreq>() - libc::IFNAMSIZ - size_of::<libc::c_short>()],
        };
        let n = name.len().min(MAX_IFNAME_LEN);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// An open TAP interface: one non-blocking descriptor per queue pair. Dropping it closes
/// the descriptors; a non-persistent interface then disappears.
#[derive(Debug)]
pub struct Tap {
    name: String,
    fds: Vec<OwnedFd>,
}

/// The `TUN_F_*` offload flags matching the guest offloads in `features`:
/// TUN_F_CSUM for VIRTIO_NET_F_GUEST_CSUM, and with it TUN_F_TSO4 / TUN_F_TSO6 / TUN_F_UFO
/// for GUEST_TSO4 / GUEST_TSO6 / GUEST_UFO, TUN_F_TSO_ECN for GUEST_ECN with a TSO.
/// Segmentation offloads are dropped without checksum offload, and ECN without TSO, as the
/// spec's feature dependencies require (§5.1.3.1) and the kernel insists (it refuses the
/// other combinations).
pub fn tun_offload_flags(features: VirtioFeatures) -> libc::c_uint {
    if !features.contains(VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    let tso4 = features.contains(VirtioFeatures::VIRTIO_NET_F_GUEST_TSO4);
    let tso6 = features.contains(VirtioFeatures::VIRTIO_NET_F_GUEST_TSO6);
    if tso4 {
        flags |= libc::TUN_F_TSO4;
    }
    if tso6 {
        flags |= libc::TUN_F_TSO6;
    }
    if (tso4 || tso6) && features.contains(VirtioFeatures::VIRTIO_NET_F_GUEST_ECN) {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if features.contains(VirtioFeatures::VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// Checks `name` as the kernel's `dev_valid_name` does.
fn check_name(name: &str) -> Result<(), TapError> {
    let bad = |reason| {
        Err(TapError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        bad("empty")
    } else if name.len() > MAX_IFNAME_LEN {
        bad("longer than 15 bytes")
    } else if name == "." || name == ".." {
        bad("'.' and '..' are reserved")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        bad("contains '/', ':', a NUL or whitespace")
    } else {
        Ok(())
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

impl Tap {
    /// The default interface name of the device called `device`: `uvdpa-` + the name,
    /// truncated to 15 bytes (on a character boundary); characters the kernel refuses in
    /// a name ('/', ':', whitespace, NUL) become '_'. Truncation can map two long device
    /// names to one interface name: [`Tap::create`] refuses the second, [`Tap::open`]
    /// would attach to the first's interface.
    pub fn default_name(device: &str) -> String {
        let mut name = String::from(DEFAULT_PREFIX);
        for c in device.chars() {
            let c = if c == '/' || c == ':' || c == '\0' || c.is_whitespace() {
                '_'
            } else {
                c
            };
            if name.len() + c.len_utf8() > MAX_IFNAME_LEN {
                break;
            }
            name.push(c);
        }
        name
    }

    /// Creates the interface `name` or attaches to an existing one (say, a persistent
    /// interface made with `ip tuntap add mode tap [multi_queue]`), with `queue_pairs`
    /// queues (multi-queue when more than one).
    ///
    /// # Errors
    /// [`TapError::InvalidName`], [`TapError::InvalidQueues`] (1..=[`MAX_TAP_QUEUES`]), or
    /// the step that failed: opening `/dev/net/tun`, `TUNSETIFF` (an existing interface
    /// with other flags, already in use without multi-queue, no CAP_NET_ADMIN), setting the
    /// header size or the offloads.
    pub fn open(name: &str, queue_pairs: u16) -> Result<Self, TapError> {
        Self::attach(name, queue_pairs, false)
    }

    /// As [`Tap::open`], but the interface must not exist yet (`IFF_TUN_EXCL`): it is
    /// created, and never shared with another device.
    ///
    /// # Errors
    /// As [`Tap::open`]; an existing interface is [`TapError::Attach`] with EBUSY.
    pub fn create(name: &str, queue_pairs: u16) -> Result<Self, TapError> {
        Self::attach(name, queue_pairs, true)
    }

    fn attach(name: &str, queue_pairs: u16, exclusive: bool) -> Result<Self, TapError> {
        check_name(name)?;
        if !(1..=MAX_TAP_QUEUES).contains(&queue_pairs) {
            return Err(TapError::InvalidQueues { value: queue_pairs });
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queue_pairs > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut name = name.to_string();
        let mut fds = Vec::with_capacity(usize::from(queue_pairs));
        for queue in 0..queue_pairs {
            let fd = open(
                TUN_PATH,
                OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| TapError::OpenTun { source: e.into() })?;
            let excl = if exclusive && queue == 0 {
                libc::IFF_TUN_EXCL
            } else {
                0
            };
            let mut ifr = IfReq::new(&name, flags | excl);
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is a live,
            // correctly sized (checked at compile time) and exclusively borrowed one.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut IfReq) };
            if r < 0 {
                return Err(TapError::Attach {
                    name,
                    queue,
                    source: errno(),
                });
            }
            // The kernel reports the name it used (it expands a `%d` pattern).
            name = ifr.name();
            fds.push(fd);
        }
        let tap = Self { name, fds };
        let size = VIRTIO_NET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points to a
        // live `c_int`.
        let r = unsafe {
            libc::ioctl(
                tap.fds[0].as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &size as *const c_int,
            )
        };
        if r < 0 {
            return Err(tap.ioctl_error(format!("TUNSETVNETHDRSZ {size}")));
        }
        // An existing interface may keep offloads from its last user: none until the
        // driver negotiates some.
        tap.set_offload(VirtioFeatures::empty())?;
        Ok(tap)
    }

    fn ioctl_error(&self, op: String) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            op,
            source: errno(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queue pairs (descriptors).
    pub fn queue_pairs(&self) -> u16 {
        // At most MAX_TAP_QUEUES descriptors.
        self.fds.len() as u16
    }

    /// The descriptor of queue pair `pair`, to wait on for received frames (readable) or
    /// room to send (writable); `None` if there is no such pair.
    pub fn fd(&self, pair: u16) -> Option<BorrowedFd<'_>> {
        self.fds.get(usize::from(pair)).map(|f| f.as_fd())
    }

    fn queue(&self, pair: u16) -> io::Result<BorrowedFd<'_>> {
        self.fd(pair).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TAP {} has no queue pair {pair}", self.name),
            )
        })
    }

    /// Sets what the kernel may hand over from the negotiated guest offloads in `features`
    /// ([`tun_offload_flags`]; `TUNSETOFFLOAD`). Applies to every queue of the interface.
    ///
    /// # Errors
    /// [`TapError::Ioctl`] if the kernel refuses.
    pub fn set_offload(&self, features: VirtioFeatures) -> Result<(), TapError> {
        let flags = tun_offload_flags(features);
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long), no memory.
        let r = unsafe {
            libc::ioctl(
                self.fds[0].as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(self.ioctl_error(format!("TUNSETOFFLOAD {flags:#x}")));
        }
        Ok(())
    }

    /// Sends one frame on queue pair `pair`: `iov` holds a 12-byte `virtio_net_hdr`
    /// followed by the frame, in as many segments as it likes (a transmit chain's readable
    /// segments, as they are). Returns the bytes written (all of them: a TAP write is
    /// one whole frame).
    ///
    /// The kernel copies from the segments; each must describe memory mapped in this
    /// process (guest memory segments of a validated chain do). An address outside the
    /// process's mappings fails with EFAULT; nothing is ever written through them.
    ///
    /// # Errors
    /// No such pair (InvalidInput), more than [`MAX_SEND_SEGMENTS`] segments or a header
    /// the kernel refuses (EINVAL: for instance `hdr_len` longer than the frame), a full
    /// queue (WouldBlock), the interface down (EIO).
    pub fn send(&self, pair: u16, iov: &[Segment]) -> io::Result<usize> {
        let fd = self.queue(pair)?;
        if iov.len() > MAX_SEND_SEGMENTS {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `Segment` is layout-compatible with `struct iovec` (its documented
        // `repr(C)` contract) and `iov` is a live slice of `iov.len()` of them. writev
        // only reads the described memory, in the kernel, which reports EFAULT for
        // unmapped addresses instead of faulting.
        let r = unsafe {
            libc::writev(
                fd.as_raw_fd(),
                iov.as_ptr().cast::<libc::iovec>(),
                iov.len() as c_int,
            )
        };
        if r < 0 {
            Err(errno())
        } else {
            Ok(r as usize)
        }
    }

    /// As [`Tap::send`], from host buffers (header first).
    ///
    /// # Errors
    /// As [`Tap::send`].
    pub fn send_bufs(&self, pair: u16, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let fd = self.queue(pair)?;
        Ok(rustix::io::writev(fd, bufs)?)
    }

    /// Receives one frame from queue pair `pair` into `buf`: a 12-byte `virtio_net_hdr`
    /// then the frame. Returns its length, or `None` when no frame is waiting. `buf`
    /// should hold `VIRTIO_NET_HDR_LEN + MAX_FRAME_LEN` bytes (see [`super::hdr`]): the
    /// kernel cuts a longer frame short to `buf.len()` (so a result equal to `buf.len()`
    /// may be truncated) and discards the rest.
    ///
    /// # Errors
    /// No such pair (InvalidInput), or the read failed.
    pub fn recv(&self, pair: u16, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let fd = self.queue(pair)?;
        loop {
            match rustix::io::read(fd, &mut *buf) {
                Ok(n) => return Ok(Some(n)),
                Err(rustix::io::Errno::AGAIN) => return Ok(None),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use rustix::net::{eth, socket_with, AddressFamily, SocketFlags, SocketType};

    use super::*;
    use crate::net::hdr::{VirtioNetHdr, MAX_FRAME_LEN};

    /// A local experimental EtherType, so stray frames (IPv6 neighbour discovery on a
    /// fresh link) are told apart from the test's.
    const ETHERTYPE: u16 = 0x88b5;

    #[test]
    fn default_names_fit_ifnamsiz() {
        assert_eq!(Tap::default_name("n0"), "uvdpa-n0");
        assert_eq!(Tap::default_name("abcdefghi"), "uvdpa-abcdefghi");
        assert_eq!(Tap::default_name("abcdefghijkl"), "uvdpa-abcdefghi");
        assert_eq!(Tap::default_name("a b/c:d"), "uvdpa-a_b_c_d");
        // Multi-byte characters are never split.
        let n = Tap::default_name("abcdefgh\u{e9}x");
        assert_eq!(n, "uvdpa-abcdefgh");
        assert!(n.len() <= MAX_IFNAME_LEN);
        let n = Tap::default_name("abcdefg\u{e9}x");
        assert_eq!(n, "uvdpa-abcdefg\u{e9}");
        assert_eq!(n.len(), 15);
        for d in ["", "x", "averyveryverylongdevicename"] {
            assert!(check_name(&Tap::default_name(d)).is_ok(), "{d}");
        }
    }

    #[test]
    fn names_the_kernel_refuses_are_refused_first() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\0b",
            "sixteen-bytes-xx",
        ] {
            assert!(
                matches!(Tap::open(bad, 1), Err(TapError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(check_name("fifteen-bytes-x").is_ok());
        for q in [0, MAX_TAP_QUEUES + 1] {
            assert!(matches!(
                Tap::open("uvdpa-q", q),
                Err(TapError::InvalidQueues { .. })
            ));
        }
    }

    #[test]
    fn offload_flags_follow_the_guest_offloads() {
        let f = |bits: &[VirtioFeatures]| {
            tun_offload_flags(bits.iter().fold(VirtioFeatures::empty(), |a, b| a | *b))
        };
        let csum = VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM;
        let tso4 = VirtioFeatures::VIRTIO_NET_F_GUEST_TSO4;
        let tso6 = VirtioFeatures::VIRTIO_NET_F_GUEST_TSO6;
        let ecn = VirtioFeatures::VIRTIO_NET_F_GUEST_ECN;
        let ufo = VirtioFeatures::VIRTIO_NET_F_GUEST_UFO;
        assert_eq!(f(&[]), 0);
        assert_eq!(f(&[csum]), libc::TUN_F_CSUM);
        assert_eq!(
            f(&[csum, tso4, tso6, ecn, ufo]),
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        );
        // Not the host offloads; nothing without GUEST_CSUM; no ECN without TSO.
        assert_eq!(
            f(&[
                VirtioFeatures::VIRTIO_NET_F_CSUM,
                VirtioFeatures::VIRTIO_NET_F_HOST_TSO4
            ]),
            0
        );
        assert_eq!(f(&[tso4, tso6, ecn, ufo]), 0);
        assert_eq!(f(&[csum, ecn]), libc::TUN_F_CSUM);
        assert_eq!(
            f(&[csum, tso6, ecn]),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
    }

    // -----------------------------------------------------------------------------------
    // Real interfaces, each test in a network namespace of its own.

    /// Runs `body` on a thread moved into a fresh network namespace; returns `false`, with
    /// the reason printed, if this machine cannot (no /dev/net/tun, no CAP_SYS_ADMIN).
    fn in_netns(test: &str, body: impl FnOnce() + Send + 'static) -> bool {
        if !Path::new(TUN_PATH).exists() {
            eprintln!("SKIPPED {test}: {TUN_PATH} does not exist (no TUN/TAP support)");
            return false;
        }
        let t = std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread (this test's own)
            // into a new network namespace; it touches no memory.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(errno());
            }
            body();
            Ok(())
        });
        match t.join() {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                eprintln!("SKIPPED {test}: cannot create a network namespace: {e}");
                false
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A socket for interface ioctls (in the calling thread's namespace).
    fn ctl_socket() -> OwnedFd {
        socket_with(
            AddressFamily::INET,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    /// An AF_PACKET socket bound to `ifname` (brought up first), the host's side of the
    /// TAP.
    struct HostSide {
        fd: OwnedFd,
    }

    impl HostSide {
        fn new(ifname: &str) -> Self {
            let ctl = ctl_socket();
            let mut ifr = IfReq::new(ifname, 0);
            // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one `struct ifreq`, and
            // `ifr` is a live, correctly sized one.
            unsafe {
                assert_eq!(
                    libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr as *mut IfReq),
                    0
                );
                ifr.flags |= libc::IFF_UP as libc::c_short;
                assert_eq!(
                    libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr as *mut IfReq),
                    0,
                    "{}",
                    errno()
                );
            }
            let index = rustix::net::netdevice::name_to_index(&ctl, ifname).unwrap();
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = socket_with(
                AddressFamily::PACKET,
                SocketType::RAW,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                Some(eth::ALL),
            )
            .unwrap();
            let addr = libc::sockaddr_ll {
                sll_family: libc::AF_PACKET as u16,
                sll_protocol: proto,
                sll_ifindex: index as c_int,
                sll_hatype: 0,
                sll_pkttype: 0,
                sll_halen: 0,
                sll_addr: [0; 8],
            };
            // SAFETY: bind reads `size_of::<sockaddr_ll>()` bytes from a live sockaddr_ll.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "bind: {}", errno());
            Self { fd }
        }

        /// Transmits `frame` out of the interface (towards the TAP's reader).
        fn send(&self, frame: &[u8]) {
            let n = rustix::io::write(&self.fd, frame).expect("packet socket send");
            assert_eq!(n, frame.len());
        }

        /// The next frame of the test's EtherType received on the interface, within 5 s.
        fn recv(&self) -> Vec<u8> {
            let mut buf = vec![0u8; 65536];
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match rustix::io::read(&self.fd, &mut buf[..]) {
                    Ok(n) if n >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() => {
                        return buf[..n].to_vec()
                    }
                    Ok(_) => {}
                    Err(rustix::io::Errno::AGAIN) => std::thread::sleep(Duration::from_millis(5)),
                    Err(e) => panic!("packet socket recv: {e}"),
                }
            }
            panic!("no frame arrived on the host side");
        }
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![tag; len];
        f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xd5]);
        f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x5e]);
        f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        f
    }

    /// The next frame of the test's EtherType any of `pairs` of `tap` receives, within 5 s,
    /// with its header, and the pair it came on.
    fn tap_recv(tap: &Tap, pairs: u16) -> (u16, VirtioNetHdr, Vec<u8>) {
        let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_FRAME_LEN];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let mut idle = true;
            for pair in 0..pairs {
                if let Some(n) = tap.recv(pair, &mut buf).unwrap() {
                    idle = false;
                    let h = VirtioNetHdr::from_prefix(&buf[..n]).unwrap();
                    let f = buf[VIRTIO_NET_HDR_LEN..n].to_vec();
                    if f.len() >= 14 && f[12..14] == ETHERTYPE.to_be_bytes() {
                        return (pair, h, f);
                    }
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("no frame arrived at the TAP");
    }

    #[test]
    fn frames_cross_a_real_tap_both_ways() {
        in_netns("frames_cross_a_real_tap_both_ways", || {
            let tap = Tap::create("uvdpa-t0", 1).unwrap();
            assert_eq!(tap.name(), "uvdpa-t0");
            assert_eq!(tap.queue_pairs(), 1);
            assert!(tap.fd(0).is_some() && tap.fd(1).is_none());
            // Non-blocking, close-on-exec.
            let fl = rustix::fs::fcntl_getfl(tap.fd(0).unwrap()).unwrap();
            assert!(fl.contains(OFlags::NONBLOCK));
            let fdfl = rustix::io::fcntl_getfd(tap.fd(0).unwrap()).unwrap();
            assert!(fdfl.contains(rustix::io::FdFlags::CLOEXEC));
            let host = HostSide::new("uvdpa-t0");
            let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_FRAME_LEN];

            // Host → device: a header (no offloads: all zero) then the frame.
            let f = frame(0xa1, 200);
            host.send(&f);
            let (pair, h, got) = tap_recv(&tap, 1);
            assert_eq!((pair, got), (0, f));
            assert_eq!(h.gso_type, 0);
            assert_eq!(h.flags & 1, 0, "no NEEDS_CSUM without GUEST_CSUM");

            // Device → host, from segments as a transmit chain has them.
            let mut hdr = VirtioNetHdr::default().to_bytes().to_vec();
            let mut f = frame(0xb2, 300);
            let (mut a, mut b) = (f[..20].to_vec(), f[20..].to_vec());
            let segs = [&mut hdr, &mut a, &mut b].map(|v| Segment {
                base: v.as_mut_ptr(),
                len: v.len(),
            });
            assert_eq!(tap.send(0, &segs).unwrap(), VIRTIO_NET_HDR_LEN + 300);
            assert_eq!(host.recv(), f);

            // And from host buffers.
            f[14] = 0xc3;
            let h = VirtioNetHdr::default().to_bytes();
            let n = tap
                .send_bufs(0, &[IoSlice::new(&h), IoSlice::new(&f)])
                .unwrap();
            assert_eq!(n, VIRTIO_NET_HDR_LEN + 300);
            assert_eq!(host.recv(), f);

            // A buffer shorter than the frame gets its start (or, on some kernels, an
            // error); the rest is lost, never left for the next read.
            host.send(&frame(0x77, 200));
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut small = [0u8; 40];
            loop {
                match tap.recv(0, &mut small) {
                    Ok(Some(n))
                        if small[VIRTIO_NET_HDR_LEN + 12..][..2] == ETHERTYPE.to_be_bytes() =>
                    {
                        assert_eq!(n, 40);
                        break;
                    }
                    Err(_) => break,
                    _ => {
                        assert!(Instant::now() < deadline, "no frame arrived at the TAP");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            // Nothing else pending for us: None, not an error.
            while let Some(n) = tap.recv(0, &mut buf).unwrap() {
                let f = &buf[VIRTIO_NET_HDR_LEN..n];
                assert_ne!(f.get(12..14), Some(&ETHERTYPE.to_be_bytes()[..]));
            }

            // Offloads the kernel accepts, in every combination the driver can negotiate.
            tap.set_offload(
                VirtioFeatures::VIRTIO_NET_F_GUEST_CSUM
                    | VirtioFeatures::VIRTIO_NET_F_GUEST_TSO4
                    | VirtioFeatures::VIRTIO_NET_F_GUEST_TSO6
                    | VirtioFeatures::VIRTIO_NET_F_GUEST_ECN
                    | VirtioFeatures::VIRTIO_NET_F_GUEST_UFO,
            )
            .unwrap();
            tap.set_offload(VirtioFeatures::VIRTIO_NET_F_GUEST_ECN)
                .unwrap();
            tap.set_offload(VirtioFeatures::empty()).unwrap();

            // Bad pair indices and oversized segment lists are errors, not panics.
            assert_eq!(
                tap.recv(1, &mut buf).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
            assert_eq!(
                tap.send(9, &segs).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
            let many = vec![segs[0]; MAX_SEND_SEGMENTS + 1];
            assert_eq!(
                tap.send(0, &many).unwrap_err().raw_os_error(),
                Some(libc::EINVAL)
            );
            // A header the kernel refuses (hdr_len past the frame, with GSO).
            let bad = VirtioNetHdr {
                flags: 1,
                gso_type: 1,
                hdr_len: 60000,
                gso_size: 100,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            }
            .to_bytes();
            assert!(tap
                .send_bufs(0, &[IoSlice::new(&bad), IoSlice::new(&f)])
                .is_err());

            // The interface exists: an exclusive create of it fails, an open attaches
            // only when the flags match (this one is single-queue and in use).
            assert!(matches!(
                Tap::create("uvdpa-t0", 1),
                Err(TapError::Attach { .. })
            ));
            assert!(matches!(
                Tap::open("uvdpa-t0", 1),
                Err(TapError::Attach { .. })
            ));
            drop(tap);
            // Closing the last descriptor removes the (non-persistent) interface.
            let ctl = ctl_socket();
            assert!(rustix::net::netdevice::name_to_index(&ctl, "uvdpa-t0").is_err());
        });
    }

    #[test]
    fn a_multi_queue_tap_has_one_descriptor_per_pair() {
        in_netns("a_multi_queue_tap_has_one_descriptor_per_pair", || {
            let tap = Tap::open("uvdpa-mq", 4).unwrap();
            assert_eq!(tap.queue_pairs(), 4);
            let fds: Vec<_> = (0..4).map(|p| tap.fd(p).unwrap().as_raw_fd()).collect();
            let mut unique = fds.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), 4);
            let host = HostSide::new("uvdpa-mq");
            // Frames from the host arrive on some queue; frames sent on every queue reach
            // the host.
            for i in 0..8u8 {
                let f = frame(i, 64 + usize::from(i));
                host.send(&f);
                let (pair, _, got) = tap_recv(&tap, 4);
                assert!(pair < 4);
                assert_eq!(got, f);
            }
            let h = VirtioNetHdr::default().to_bytes();
            for pair in 0..4 {
                let f = frame(0x40 + pair as u8, 100);
                tap.send_bufs(pair, &[IoSlice::new(&h), IoSlice::new(&f)])
                    .unwrap();
                assert_eq!(host.recv(), f);
            }
            // A pattern name: the kernel picks the number, every queue joins that one.
            let tap = Tap::create("uvdpa-p%d", 2).unwrap();
            assert!(tap.name().starts_with("uvdpa-p") && !tap.name().contains('%'));
            let c = CString::new(tap.name()).unwrap();
            // SAFETY: if_nametoindex reads the NUL-terminated string `c`, which is live.
            assert_ne!(unsafe { libc::if_nametoindex(c.as_ptr()) }, 0);
        });
    }
}
