//! The VDUSE control device, `/dev/vduse/control` (`vduse.rst`, "How VDUSE works"):
//! API version negotiation, creating and destroying devices.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Getter, Setter};

use crate::error::VduseError;
use crate::sys::{
    self, RawIoctl, VduseDevConfig, VDUSE_MAX_CONFIG_SIZE, VDUSE_MAX_VQ_NUM, VDUSE_NAME_MAX,
};

/// Path of the control device.
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// Directory of the device nodes, `/dev/vduse/NAME`.
pub const DEV_DIR: &str = "/dev/vduse";

/// What VDUSE_CREATE_DEV creates (`struct vduse_dev_config` and the configuration space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevSpec {
    /// Device name: 1 to `VDUSE_NAME_MAX - 1` (255) bytes, no NUL, no `/`, not `.`, `..`
    /// or `control` (it becomes `/dev/vduse/NAME`). See [`validate_name`].
    pub name: String,
    /// Virtio device id (virtio 1.2 §5; the kernel allows 1 net, 2 block, 26 fs).
    pub device_id: u32,
    /// Virtio vendor id.
    pub vendor_id: u32,
    /// Feature bits the device offers (must include VIRTIO_F_ACCESS_PLATFORM, bit 33;
    /// the kernel checks that and a few device-specific rules, answering EINVAL).
    pub features: u64,
    /// Number of virtqueues, at most 65535.
    pub vq_num: u32,
    /// Alignment of virtqueue metadata in bytes, at most the page size.
    pub vq_align: u32,
    /// Initial configuration space (virtio 1.2 §4.x device-specific), at most 4096
    /// bytes; later changes go through `DeviceFd::set_config`.
    pub config: Vec<u8>,
}

/// Checks a device name and returns it as the NUL-padded buffer the kernel takes.
///
/// # Errors
/// [`VduseError::InvalidName`] if the name is empty, longer than `VDUSE_NAME_MAX - 1`
/// bytes, contains a NUL or `/`, or is `.`, `..` or `control`.
pub fn validate_name(name: &str) -> Result<[u8; VDUSE_NAME_MAX], VduseError> {
    let bad = |reason| {
        Err(VduseError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= VDUSE_NAME_MAX {
        return bad("longer than 255 bytes");
    }
    if name.bytes().any(|b| b == 0 || b == b'/') {
        return bad("contains NUL or '/'");
    }
    if matches!(name, "." | ".." | "control") {
        return bad("reserved name");
    }
    let mut buf = [0u8; VDUSE_NAME_MAX];
    buf.get_mut(..name.len())
        .map(|d| d.copy_from_slice(name.as_bytes()))
        .ok_or(VduseError::InvalidName {
            name: name.to_owned(),
            reason: "longer than 255 bytes",
        })?;
    Ok(buf)
}

/// An open control device.
#[derive(Debug)]
pub struct Control {
    fd: OwnedFd,
}

impl Control {
    /// Opens [`CONTROL_PATH`] read-write, close-on-exec.
    ///
    /// # Errors
    /// [`VduseError::Open`] (ENOENT: the `vduse` module is not loaded).
    pub fn open() -> Result<Self, VduseError> {
        Self::open_path(CONTROL_PATH)
    }

    /// Opens a control device at `path` (tests, unusual /dev layouts).
    ///
    /// # Errors
    /// [`VduseError::Open`].
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self, VduseError> {
        let path = path.as_ref();
        let fd = rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).map_err(
            |errno| VduseError::Open {
                path: path.to_owned(),
                errno,
            },
        )?;
        Ok(Self { fd })
    }

    /// Wraps an fd already open on a control device (or a fake one for tests).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// VDUSE_GET_API_VERSION: the API version of this control fd (the kernel's newest
    /// until [`Control::set_api_version`]).
    ///
    /// # Errors
    /// [`VduseError::Ioctl`].
    pub fn api_version(&self) -> Result<u64, VduseError> {
        // SAFETY: VDUSE_GET_API_VERSION is `_IOR(0x81, 0, __u64)`: the kernel writes one
        // u64 to the pointer, which Getter provides.
        let get = unsafe { Getter::<{ sys::VDUSE_GET_API_VERSION }, u64>::new() };
        // SAFETY: the opcode and argument type agree (above).
        unsafe { rustix::ioctl::ioctl(&self.fd, get) }.map_err(|errno| VduseError::Ioctl {
            op: "VDUSE_GET_API_VERSION",
            errno,
        })
    }

    /// VDUSE_SET_API_VERSION: the version this side speaks; call with
    /// [`sys::VDUSE_API_VERSION`] (0) before creating devices.
    ///
    /// # Errors
    /// [`VduseError::Ioctl`] (EINVAL: newer than the kernel's).
    pub fn set_api_version(&self, version: u64) -> Result<(), VduseError> {
        // SAFETY: VDUSE_SET_API_VERSION is `_IOW(0x81, 1, __u64)`: the kernel reads one
        // u64 from the pointer, which Setter provides.
        let set = unsafe { Setter::<{ sys::VDUSE_SET_API_VERSION }, u64>::new(version) };
        // SAFETY: the opcode and argument type agree (above).
        unsafe { rustix::ioctl::ioctl(&self.fd, set) }.map_err(|errno| VduseError::Ioctl {
            op: "VDUSE_SET_API_VERSION",
            errno,
        })
    }

    /// VDUSE_CREATE_DEV: creates device `spec.name`, which appears as `/dev/vduse/NAME`.
    ///
    /// # Errors
    /// [`VduseError::InvalidName`] / [`VduseError::InvalidArgument`] for a spec the kernel
    /// would refuse on size grounds (checked before any call); [`VduseError::Exists`] if
    /// a device has this name (reattach to it); [`VduseError::Ioctl`] otherwise (EINVAL:
    /// the kernel's validation, e.g. a device id other than net/block/fs or features
    /// without VIRTIO_F_ACCESS_PLATFORM; EPERM: a net device without CAP_NET_ADMIN).
    pub fn create_dev(&self, spec: &DevSpec) -> Result<(), VduseError> {
        let mut buf = create_dev_arg(spec)?;
        // SAFETY: VDUSE_CREATE_DEV reads `offsetof(vduse_dev_config, config)` bytes (the
        // header) then `config_size` more, which is exactly `buf.len()` (built above); it
        // writes nothing.
        let call = unsafe { RawIoctl::with_bytes(sys::VDUSE_CREATE_DEV, &mut buf) };
        // SAFETY: the opcode and argument agree (above).
        match unsafe { rustix::ioctl::ioctl(&self.fd, call) } {
            Ok(_) => Ok(()),
            Err(Errno::EXIST) => Err(VduseError::Exists {
                name: spec.name.clone(),
            }),
            Err(errno) => Err(VduseError::Ioctl {
                op: "VDUSE_CREATE_DEV",
                errno,
            }),
        }
    }

    /// VDUSE_DESTROY_DEV: destroys device `name`. The device must not be bound to the vDPA
    /// bus and its `/dev/vduse/NAME` must not be open.
    ///
    /// # Errors
    /// [`VduseError::InvalidName`]; [`VduseError::NoSuchDevice`] (the kernel's EINVAL);
    /// [`VduseError::Busy`] (EBUSY: still bound or open); [`VduseError::Ioctl`] otherwise.
    pub fn destroy_dev(&self, name: &str) -> Result<(), VduseError> {
        let buf = validate_name(name)?;
        // SAFETY: VDUSE_DESTROY_DEV is `_IOW(0x81, 3, char[VDUSE_NAME_MAX])`: the kernel
        // reads VDUSE_NAME_MAX bytes from the pointer, which Setter provides.
        let set = unsafe { Setter::<{ sys::VDUSE_DESTROY_DEV }, [u8; VDUSE_NAME_MAX]>::new(buf) };
        // SAFETY: the opcode and argument type agree (above).
        match unsafe { rustix::ioctl::ioctl(&self.fd, set) } {
            Ok(()) => Ok(()),
            Err(Errno::INVAL) => Err(VduseError::NoSuchDevice {
                name: name.to_owned(),
            }),
            Err(Errno::BUSY) => Err(VduseError::Busy {
                name: name.to_owned(),
            }),
            Err(errno) => Err(VduseError::Ioctl {
                op: "VDUSE_DESTROY_DEV",
                errno,
            }),
        }
    }
}

impl AsFd for Control {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// VDUSE_CREATE_DEV's argument: the header followed by the configuration space.
fn create_dev_arg(spec: &DevSpec) -> Result<Vec<u8>, VduseError> {
    let name = validate_name(&spec.name)?;
    if spec.config.len() > VDUSE_MAX_CONFIG_SIZE {
        return Err(VduseError::InvalidArgument {
            what: format!(
                "configuration space of {} bytes (at most {VDUSE_MAX_CONFIG_SIZE})",
                spec.config.len()
            ),
        });
    }
    if spec.vq_num > VDUSE_MAX_VQ_NUM {
        return Err(VduseError::InvalidArgument {
            what: format!("{} virtqueues (at most {VDUSE_MAX_VQ_NUM})", spec.vq_num),
        });
    }
    let mut hdr = VduseDevConfig::zeroed();
    hdr.name = name;
    hdr.vendor_id = spec.vendor_id;
    hdr.device_id = spec.device_id;
    hdr.features = spec.features;
    hdr.vq_num = spec.vq_num;
    hdr.vq_align = spec.vq_align;
    // Fits: at most VDUSE_MAX_CONFIG_SIZE (checked above).
    hdr.config_size = spec.config.len() as u32;
    let mut buf = Vec::with_capacity(std::mem::size_of::<VduseDevConfig>() + spec.config.len());
    buf.extend_from_slice(sys::as_bytes(&hdr));
    buf.extend_from_slice(&spec.config);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DevSpec {
        DevSpec {
            name: "blk0".into(),
            device_id: 2,
            vendor_id: 0,
            features: 1 << 32 | 1 << 33,
            vq_num: 2,
            vq_align: 4096,
            config: vec![0xaa; 60],
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("blk0").is_ok());
        assert!(validate_name(&"x".repeat(255)).is_ok());
        for bad in ["", ".", "..", "control", "a/b", "a\0b"] {
            assert!(
                matches!(validate_name(bad), Err(VduseError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(validate_name(&"x".repeat(256)).is_err());
        let b = validate_name("blk0").unwrap();
        assert_eq!(&b[..5], b"blk0\0");
    }

    #[test]
    fn create_dev_argument_has_the_uapi_layout() {
        let b = create_dev_arg(&spec()).unwrap();
        assert_eq!(b.len(), 336 + 60);
        assert_eq!(&b[..4], b"blk0");
        assert_eq!(&b[256..260], &0u32.to_ne_bytes());
        assert_eq!(&b[260..264], &2u32.to_ne_bytes());
        assert_eq!(&b[264..272], &(1u64 << 32 | 1 << 33).to_ne_bytes());
        assert_eq!(&b[272..276], &2u32.to_ne_bytes());
        assert_eq!(&b[276..280], &4096u32.to_ne_bytes());
        assert!(b[280..332].iter().all(|&x| x == 0));
        assert_eq!(&b[332..336], &60u32.to_ne_bytes());
        assert!(b[336..].iter().all(|&x| x == 0xaa));
    }

    #[test]
    fn oversized_specs_are_refused_before_the_kernel() {
        let mut s = spec();
        s.config = vec![0; 4097];
        assert!(matches!(
            create_dev_arg(&s),
            Err(VduseError::InvalidArgument { .. })
        ));
        let mut s = spec();
        s.vq_num = 0x10000;
        assert!(create_dev_arg(&s).is_err());
    }

    #[test]
    fn ioctls_on_a_fake_fd_report_the_errno() {
        // A memfd is not a control device: every ioctl fails with ENOTTY, and the error
        // names the call.
        let fd = rustix::fs::memfd_create("fake", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let c = Control::from_fd(fd);
        match c.set_api_version(0) {
            Err(VduseError::Ioctl { op, errno }) => {
                assert_eq!(op, "VDUSE_SET_API_VERSION");
                assert_eq!(errno, Errno::NOTTY);
            }
            other => panic!("{other:?}"),
        }
        assert!(c.api_version().is_err());
        assert!(matches!(
            c.create_dev(&spec()),
            Err(VduseError::Ioctl {
                errno: Errno::NOTTY,
                ..
            })
        ));
        assert!(c.destroy_dev("blk0").is_err());
        assert!(matches!(
            c.destroy_dev("a/b"),
            Err(VduseError::InvalidName { .. })
        ));
    }

    #[test]
    fn open_reports_the_path() {
        match Control::open_path("/nonexistent/vduse/control") {
            Err(VduseError::Open { path, errno }) => {
                assert_eq!(path, Path::new("/nonexistent/vduse/control"));
                assert_eq!(errno, Errno::NOENT);
            }
            other => panic!("{other:?}"),
        }
    }
}
