//! A VDUSE device fd, `/dev/vduse/NAME` (`vduse.rst`, "How VDUSE works"): the ioctls
//! that configure virtqueues, inject interrupts and fetch IOTLB fds, and the read/write
//! message channel.
//!
//! [`DeviceFd::from_fd`] accepts any fd, so tests drive the message channel over a
//! socketpair or pipe (the ioctls then fail with ENOTTY).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Getter, NoArg, Setter, Updater};

use crate::control::{validate_name, DEV_DIR};
use crate::error::VduseError;
use crate::message::{PackedVqState, Request, Response, RingLayout, VqState};
use crate::sys::{
    self, RawIoctl, VduseConfigData, VduseIotlbEntry, VduseVqConfig, VduseVqEventfd, VduseVqInfo,
    REQUEST_SIZE, RESPONSE_SIZE, VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_ACCESS_WO,
    VDUSE_EVENTFD_DEASSIGN,
};

/// What the device may do with an IOTLB range (`VDUSE_ACCESS_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbPerm {
    /// The device may only read (`VDUSE_ACCESS_RO`).
    ReadOnly,
    /// The device may only write (`VDUSE_ACCESS_WO`).
    WriteOnly,
    /// The device may read and write (`VDUSE_ACCESS_RW`).
    ReadWrite,
}

impl IotlbPerm {
    /// From the uapi byte; `None` for anything else.
    pub fn from_raw(perm: u8) -> Option<Self> {
        match perm {
            VDUSE_ACCESS_RO => Some(Self::ReadOnly),
            VDUSE_ACCESS_WO => Some(Self::WriteOnly),
            VDUSE_ACCESS_RW => Some(Self::ReadWrite),
            _ => None,
        }
    }

    /// The uapi byte.
    pub fn to_raw(self) -> u8 {
        match self {
            Self::ReadOnly => VDUSE_ACCESS_RO,
            Self::WriteOnly => VDUSE_ACCESS_WO,
            Self::ReadWrite => VDUSE_ACCESS_RW,
        }
    }
}

/// One IOTLB entry: IOVAs `[start, last]` are `offset..` of the fd returned with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IotlbEntry {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA, inclusive (`start <= last`).
    pub last: u64,
    /// Offset of `start` in the fd, in bytes (the mmap offset).
    pub offset: u64,
    /// Access the device has.
    pub perm: IotlbPerm,
}

impl IotlbEntry {
    /// Size in bytes, `None` for the whole 64-bit space (2^64 does not fit).
    pub fn size(&self) -> Option<u64> {
        (self.last - self.start).checked_add(1)
    }
}

/// A virtqueue as the driver set it up, from VDUSE_VQ_GET_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VqInfo {
    /// Virtqueue index.
    pub index: u32,
    /// Ring size the driver chose (0 before it did).
    pub num: u32,
    /// IOVA of the descriptor area.
    pub desc_addr: u64,
    /// IOVA of the driver area (split: avail ring; packed: driver event suppression).
    pub driver_addr: u64,
    /// IOVA of the device area (split: used ring; packed: device event suppression).
    pub device_addr: u64,
    /// The state union's four words as the kernel returned them; read them with
    /// [`VqInfo::state`].
    pub state_words: [u16; 4],
    /// Whether the driver enabled the queue.
    pub ready: bool,
}

impl VqInfo {
    /// The ring state the driver set (vhost-vdpa's SET_VRING_BASE; zero for
    /// virtio-vdpa), read as `layout` (packed iff VIRTIO_F_RING_PACKED was negotiated).
    /// Packed counters and positions are masked to 1 and 15 bits, as the kernel does.
    pub fn state(&self, layout: RingLayout) -> VqState {
        let [ac, ai, uc, ui] = self.state_words;
        match layout {
            RingLayout::Split => VqState::Split { avail_index: ac },
            RingLayout::Packed => VqState::Packed(PackedVqState {
                last_avail_counter: ac & 1 == 1,
                last_avail_idx: ai & 0x7fff,
                last_used_counter: uc & 1 == 1,
                last_used_idx: ui & 0x7fff,
            }),
        }
    }
}

/// An open VDUSE device (or a stand-in fd for tests).
#[derive(Debug)]
pub struct DeviceFd {
    fd: OwnedFd,
}

impl DeviceFd {
    /// Opens `/dev/vduse/NAME` read-write, close-on-exec, non-blocking.
    ///
    /// # Errors
    /// [`VduseError::InvalidName`]; [`VduseError::Busy`] if another file description has
    /// it open (EBUSY; the kernel allows one); [`VduseError::Open`] otherwise (ENOENT or
    /// ENODEV: no such device).
    pub fn open(name: &str) -> Result<Self, VduseError> {
        validate_name(name)?;
        let path = PathBuf::from(DEV_DIR).join(name);
        let flags = OFlags::RDWR | OFlags::CLOEXEC | OFlags::NONBLOCK;
        match rustix::fs::open(&path, flags, Mode::empty()) {
            Ok(fd) => Ok(Self { fd }),
            Err(Errno::BUSY) => Err(VduseError::Busy {
                name: name.to_owned(),
            }),
            Err(errno) => Err(VduseError::Open { path, errno }),
        }
    }

    /// Wraps an fd: a device fd opened elsewhere (handed over at a live upgrade), or a
    /// socket or pipe standing in for one in tests. The fd is switched to non-blocking
    /// mode, which [`DeviceFd::read_request`] relies on.
    ///
    /// # Errors
    /// [`VduseError::Ioctl`] (op `F_SETFL`) if the mode cannot be set.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, VduseError> {
        let fcntl = |errno| VduseError::Ioctl {
            op: "F_SETFL",
            errno,
        };
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(fcntl)?;
        rustix::fs::fcntl_setfl(&fd, flags | OFlags::NONBLOCK).map_err(fcntl)?;
        Ok(Self { fd })
    }

    /// Gives the fd back (to hand it to a new daemon process).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// VDUSE_DEV_GET_FEATURES: the feature bits the driver wrote (meaningful once it set
    /// FEATURES_OK; the kernel mirrors whatever was written, the device checks them).
    ///
    /// # Errors
    /// [`VduseError::Ioctl`].
    pub fn get_features(&self) -> Result<u64, VduseError> {
        // SAFETY: VDUSE_DEV_GET_FEATURES is `_IOR(0x81, 0x11, __u64)`: the kernel writes
        // one u64 to the pointer, which Getter provides.
        let get = unsafe { Getter::<{ sys::VDUSE_DEV_GET_FEATURES }, u64>::new() };
        // SAFETY: opcode and argument type agree (above).
        unsafe { rustix::ioctl::ioctl(&self.fd, get) }.map_err(ioctl_err("VDUSE_DEV_GET_FEATURES"))
    }

    /// VDUSE_DEV_SET_CONFIG: writes `bytes` at `offset` of the configuration space (then
    /// call [`DeviceFd::inject_config_irq`] to tell the driver).
    ///
    /// # Errors
    /// [`VduseError::InvalidArgument`] for an empty or over-4-GiB `bytes`;
    /// [`VduseError::Ioctl`] (EINVAL: past the end of the configuration space).
    pub fn set_config(&self, offset: u32, bytes: &[u8]) -> Result<(), VduseError> {
        let length = u32::try_from(bytes.len())
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| VduseError::InvalidArgument {
                what: format!("configuration write of {} bytes", bytes.len()),
            })?;
        let hdr = VduseConfigData { offset, length };
        let mut buf = Vec::with_capacity(std::mem::size_of::<VduseConfigData>() + bytes.len());
        buf.extend_from_slice(sys::as_bytes(&hdr));
        buf.extend_from_slice(bytes);
        // SAFETY: VDUSE_DEV_SET_CONFIG reads the 8-byte header then `length` bytes, which
        // is exactly `buf.len()`; it writes nothing.
        let call = unsafe { RawIoctl::with_bytes(sys::VDUSE_DEV_SET_CONFIG, &mut buf) };
        // SAFETY: opcode and argument agree (above).
        unsafe { rustix::ioctl::ioctl(&self.fd, call) }
            .map(|_| ())
            .map_err(ioctl_err("VDUSE_DEV_SET_CONFIG"))
    }

    /// VDUSE_DEV_INJECT_CONFIG_IRQ: a configuration change interrupt.
    ///
    /// # Errors
    /// [`VduseError::Ioctl`] (EINVAL before DRIVER_OK).
    pub fn inject_config_irq(&self) -> Result<(), VduseError> {
        // SAFETY: VDUSE_DEV_INJECT_CONFIG_IRQ is `_IO(0x81, 0x13)`: no argument.
        let call = unsafe { NoArg::<{ sys::VDUSE_DEV_INJECT_CONFIG_IRQ }>::new() };
        // SAFETY: the opcode takes no argument (above).
        unsafe { rustix::ioctl::ioctl(&self.fd, call) }
            .map_err(ioctl_err("VDUSE_DEV_INJECT_CONFIG_IRQ"))
    }

    /// VDUSE_VQ_SETUP: declares queue `index` with ring sizes up to `max_size`. Every
    /// queue must be set up before the device is added to the vDPA bus.
    ///
    /// # Errors
    /// [`VduseError::Ioctl`] (EINVAL: index out of range).
    pub fn vq_setup(&self, index: u32, max_size: u16) -> Result<(), VduseError> {
        let cfg = VduseVqConfig {
            index,
            max_size,
            reserved: [0; 13],
        };
        // SAFETY: VDUSE_VQ_SETUP is `_IOW(0x81, 0x14, struct vduse_vq_config)`, whose
        // layout VduseVqConfig mirrors (size checked at compile time).
        let set = unsafe { Setter::<{ sys::VDUSE_VQ_SETUP }, VduseVqConfig>::new(cfg) };
        // SAFETY: opcode and argument type agree (above).
        unsafe { rustix::ioctl::ioctl(&self.fd, set) }.map_err(ioctl_err("VDUSE_VQ_SETUP"))
    }

    /// VDUSE_VQ_GET_INFO: queue `index` as the driver configured it.
    ///
    /// # Errors
    /// [`VduseError::Ioctl`] (EINVAL: index out of range).
    pub fn vq_get_info(&self, index: u32) -> Result<VqInfo, VduseError> {
        let mut info = VduseVqInfo::for_index(index);
        // SAFETY: VDUSE_VQ_GET_INFO is `_IOWR(0x81, 0x15, struct vduse_vq_info)`, whose
        // layout VduseVqInfo mirrors (size checked at compile time); the kernel writes
        // integers only.
        let call = unsafe { Updater::<{ sys::VDUSE_VQ_GET_INFO }, VduseVqInfo>::new(&mut info) };
        // SAFETY: opcode and argument type agree (above).
        unsafe { rustix::ioctl::ioctl(&self.fd, call) }.map_err(ioctl_err("VDUSE_VQ_GET_INFO"))?;
        let s = info.state.as_packed();
        Ok(VqInfo {
            index: info.index,
            num: info.num,
            desc_addr: info.desc_addr,
            driver_addr: info.driver_addr,
            device_addr: info.device_addr,
            state_words: [
                s.last_avail_counter,
                s.last_avail_idx,
                s.last_used_counter,
                s.last_used_idx,
            ],
            ready: info.ready != 0,
        })
    }

    /// VDUSE_VQ_SETUP_KICKFD: the eventfd the kernel signals when the driver kicks queue
    /// `index`; `None` removes it. A kick that came while none was set is delivered when
    /// one is.
    ///
    /// # Errors
    /// [`VduseError::Ioctl`] (EINVAL: index out of range; EBADF: not an eventfd).
    pub fn vq_setup_kickfd(
        &self,
        index: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), VduseError> {
        let arg = VduseVqEventfd {
            index,
            fd: fd.map_or(VDUSE_EVENTFD_DEASSIGN, |f| f.as_raw_fd()),
        };
        // SAFETY: VDUSE_VQ_SETUP_KICKFD is `_IOW(0x81, 0x16, struct vduse_vq_eventfd)`,
        // mirrored by VduseVqEventfd; the fd, if any, is borrowed for the call's duration.
        let set = unsafe { Setter::<{ sys::VDUSE_VQ_SETUP_KICKFD }, VduseVqEventfd>::new(arg) };
        // SAFETY: opcode and argument type agree (above).
        unsafe { rustix::ioctl::ioctl(&self.fd, set) }.map_err(ioctl_err("VDUSE_VQ_SETUP_KICKFD"))
    }

    /// VDUSE_VQ_INJECT_IRQ: a used-buffer interrupt for queue `index`.
    ///
    /// # Errors
    /// [`VduseError::Ioctl`] (EINVAL: index out of range, or before DRIVER_OK).
    pub fn vq_inject_irq(&self, index: u32) -> Result<(), VduseError> {
        // SAFETY: VDUSE_VQ_INJECT_IRQ is `_IOW(0x81, 0x17, __u32)`: the kernel reads one
        // u32 from the pointer, which Setter provides.
        let set = unsafe { Setter::<{ sys::VDUSE_VQ_INJECT_IRQ }, u32>::new(index) };
        // SAFETY: opcode and argument type agree (above).
        unsafe { rustix::ioctl::ioctl(&self.fd, set) }.map_err(ioctl_err("VDUSE_VQ_INJECT_IRQ"))
    }

    /// VDUSE_IOTLB_GET_FD: the first IOTLB entry overlapping IOVAs `[start, last]` and an
    /// fd to mmap it from (close-on-exec), or `None` if no entry overlaps.
    ///
    /// # Errors
    /// [`VduseError::InvalidArgument`] if `start > last`; [`VduseError::Ioctl`] for other
    /// failures; [`VduseError::IotlbEntry`] if the kernel's answer is unusable (inverted,
    /// not overlapping the range, unknown permission).
    pub fn iotlb_get_fd(
        &self,
        start: u64,
        last: u64,
    ) -> Result<Option<(IotlbEntry, OwnedFd)>, VduseError> {
        if start > last {
            return Err(VduseError::InvalidArgument {
                what: format!("IOTLB range {start:#x}..={last:#x} is empty"),
            });
        }
        let mut e = VduseIotlbEntry {
            start,
            last,
            ..VduseIotlbEntry::default()
        };
        // SAFETY: VDUSE_IOTLB_GET_FD is `_IOWR(0x81, 0x10, struct vduse_iotlb_entry)`,
        // mirrored by VduseIotlbEntry (size checked at compile time); the kernel writes
        // integers only.
        let call = unsafe { RawIoctl::with_value(sys::VDUSE_IOTLB_GET_FD, &mut e) };
        // SAFETY: opcode and argument agree (above).
        let raw = match unsafe { rustix::ioctl::ioctl(&self.fd, call) } {
            Ok(raw) => raw,
            // The kernel answers EINVAL when no entry overlaps (or no domain exists yet).
            Err(Errno::INVAL | Errno::NOENT) => return Ok(None),
            Err(errno) => return Err(ioctl_err("VDUSE_IOTLB_GET_FD")(errno)),
        };
        if raw < 0 {
            return Err(ioctl_err("VDUSE_IOTLB_GET_FD")(Errno::BADF));
        }
        // SAFETY: a successful VDUSE_IOTLB_GET_FD returns a new fd installed in this
        // process's table by receive_fd(); nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // receive_fd() is given only the access mode, not O_CLOEXEC.
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).map_err(ioctl_err("F_SETFD"))?;
        let entry = check_entry(&e, start, last)?;
        Ok(Some((entry, fd)))
    }

    /// Reads one request without blocking: `None` if none is pending (EAGAIN).
    ///
    /// # Errors
    /// [`VduseError::Read`] (EPERM-like failures once the kernel marked the device
    /// broken); [`VduseError::Message`] for a read of the wrong size (0 bytes: the other
    /// end of a test socket closed) or a malformed request.
    pub fn read_request(&self) -> Result<Option<Request>, VduseError> {
        let mut buf = [0u8; REQUEST_SIZE];
        loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(n) => {
                    let bytes = buf.get(..n).unwrap_or(&buf);
                    return Ok(Some(Request::parse(bytes)?));
                }
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(None),
                Err(errno) => return Err(VduseError::Read { errno }),
            }
        }
    }

    /// Writes one response.
    ///
    /// # Errors
    /// [`VduseError::Write`] (ENOENT: the kernel has no pending request with this id, for
    /// instance because it timed out); [`VduseError::ShortWrite`].
    pub fn write_response(&self, response: &Response) -> Result<(), VduseError> {
        let bytes = response.to_bytes();
        loop {
            match rustix::io::write(&self.fd, &bytes) {
                Ok(n) if n == RESPONSE_SIZE => return Ok(()),
                Ok(written) => {
                    return Err(VduseError::ShortWrite {
                        written,
                        len: RESPONSE_SIZE,
                    })
                }
                Err(Errno::INTR) => continue,
                Err(errno) => return Err(VduseError::Write { errno }),
            }
        }
    }
}

impl AsFd for DeviceFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn ioctl_err(op: &'static str) -> impl Fn(Errno) -> VduseError {
    move |errno| VduseError::Ioctl { op, errno }
}

/// Validates the kernel's answer to VDUSE_IOTLB_GET_FD for `[start, last]`.
pub(crate) fn check_entry(
    e: &VduseIotlbEntry,
    start: u64,
    last: u64,
) -> Result<IotlbEntry, VduseError> {
    let bad = |reason| VduseError::IotlbEntry {
        start: e.start,
        last: e.last,
        perm: e.perm,
        asked_start: start,
        asked_last: last,
        reason,
    };
    if e.start > e.last {
        return Err(bad("start after last"));
    }
    if e.last < start || e.start > last {
        return Err(bad("does not overlap the range asked for"));
    }
    let perm = IotlbPerm::from_raw(e.perm).ok_or_else(|| bad("unknown permission"))?;
    Ok(IotlbEntry {
        start: e.start,
        last: e.last,
        offset: e.offset,
        perm,
    })
}

#[cfg(test)]
mod tests {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

    use super::*;
    use crate::message::{RequestKind, ResponseResult};

    fn pair() -> (DeviceFd, OwnedFd) {
        let (a, b) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        (DeviceFd::from_fd(a).unwrap(), b)
    }

    #[test]
    fn message_loop_over_a_socketpair() {
        let (dev, kernel) = pair();
        assert_eq!(dev.read_request().unwrap(), None);
        let reqs = [
            Request {
                request_id: 1,
                kind: RequestKind::SetStatus { status: 0x0f },
            },
            Request {
                request_id: 2,
                kind: RequestKind::GetVqState { index: 1 },
            },
            Request {
                request_id: 3,
                kind: RequestKind::UpdateIotlb {
                    start: 0,
                    last: u64::MAX,
                },
            },
        ];
        for r in &reqs {
            rustix::io::write(&kernel, &r.to_bytes()).unwrap();
        }
        let mut got = vec![];
        while let Some(r) = dev.read_request().unwrap() {
            let resp = match r.kind {
                RequestKind::GetVqState { index } => {
                    Response::vq_state_split(r.request_id, index, 42)
                }
                _ => Response::ok(r.request_id),
            };
            dev.write_response(&resp).unwrap();
            got.push(r);
        }
        assert_eq!(got, reqs);
        let mut buf = [0u8; 200];
        for (i, layout) in [None, Some(RingLayout::Split), None]
            .into_iter()
            .enumerate()
        {
            let n = rustix::io::read(&kernel, &mut buf).unwrap();
            let resp = Response::parse(&buf[..n], layout).unwrap();
            assert_eq!(resp.request_id, i as u32 + 1);
            assert_eq!(resp.result, ResponseResult::Ok);
            if layout.is_some() {
                assert_eq!(
                    resp.vq_state.unwrap().state,
                    VqState::Split { avail_index: 42 }
                );
            }
        }
    }

    #[test]
    fn short_and_malformed_requests_are_errors() {
        let (dev, kernel) = pair();
        rustix::io::write(&kernel, &[0u8; 10]).unwrap();
        assert!(matches!(
            dev.read_request(),
            Err(VduseError::Message(crate::message::MessageError::Length {
                got: 10,
                ..
            }))
        ));
        let bad = Request {
            request_id: 1,
            kind: RequestKind::UpdateIotlb { start: 5, last: 4 },
        };
        rustix::io::write(&kernel, &bad.to_bytes()).unwrap();
        assert!(dev.read_request().is_err());
        // The peer is gone: a 0-byte read is a length error, not a hang.
        drop(kernel);
        assert!(dev.read_request().is_err());
        assert!(matches!(
            dev.write_response(&Response::ok(1)),
            Err(VduseError::Write { .. })
        ));
    }

    #[test]
    fn ioctls_on_a_fake_fd_fail_cleanly() {
        let (dev, _kernel) = pair();
        let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let notty = |r: Result<(), VduseError>| {
            assert!(
                matches!(
                    r,
                    Err(VduseError::Ioctl {
                        errno: Errno::NOTTY,
                        ..
                    })
                ),
                "{r:?}"
            )
        };
        notty(dev.get_features().map(|_| ()));
        notty(dev.set_config(0, &[1, 2]));
        notty(dev.inject_config_irq());
        notty(dev.vq_setup(0, 256));
        notty(dev.vq_get_info(0).map(|_| ()));
        notty(dev.vq_setup_kickfd(0, Some(efd.as_fd())));
        notty(dev.vq_setup_kickfd(0, None));
        notty(dev.vq_inject_irq(0));
        notty(dev.iotlb_get_fd(0, 10).map(|_| ()));
        assert!(matches!(
            dev.iotlb_get_fd(10, 0),
            Err(VduseError::InvalidArgument { .. })
        ));
        assert!(matches!(
            dev.set_config(0, &[]),
            Err(VduseError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn kernel_iotlb_answers_are_checked() {
        let e = |start, last, perm| VduseIotlbEntry {
            offset: 0,
            start,
            last,
            perm,
            padding: [0; 7],
        };
        let ok = check_entry(&e(0x1000, 0x1fff, 3), 0x1800, 0x1800).unwrap();
        assert_eq!(ok.perm, IotlbPerm::ReadWrite);
        assert_eq!(ok.size(), Some(0x1000));
        assert!(check_entry(&e(0x2000, 0x1fff, 3), 0, u64::MAX).is_err());
        assert!(check_entry(&e(0x1000, 0x1fff, 3), 0x2000, 0x3000).is_err());
        assert!(check_entry(&e(0x1000, 0x1fff, 0), 0, u64::MAX).is_err());
        assert!(check_entry(&e(0x1000, 0x1fff, 4), 0, u64::MAX).is_err());
        let full = check_entry(&e(0, u64::MAX, 1), 0, 0).unwrap();
        assert_eq!(full.size(), None);
        assert_eq!(full.perm, IotlbPerm::ReadOnly);
    }

    #[test]
    fn vq_info_state_masks_like_the_kernel() {
        let info = VqInfo {
            index: 0,
            num: 256,
            desc_addr: 0,
            driver_addr: 0,
            device_addr: 0,
            state_words: [3, 0x8001, 1, 0xffff],
            ready: true,
        };
        assert_eq!(
            info.state(RingLayout::Split),
            VqState::Split { avail_index: 3 }
        );
        assert_eq!(
            info.state(RingLayout::Packed),
            VqState::Packed(PackedVqState {
                last_avail_counter: true,
                last_avail_idx: 1,
                last_used_counter: true,
                last_used_idx: 0x7fff,
            })
        );
    }

    #[test]
    fn open_validates_the_name() {
        assert!(matches!(
            DeviceFd::open("../etc"),
            Err(VduseError::InvalidName { .. })
        ));
        // No VDUSE on the build host: the device node does not exist.
        assert!(matches!(
            DeviceFd::open("uvdpa-test-none"),
            Err(VduseError::Open { .. })
        ));
    }
}
