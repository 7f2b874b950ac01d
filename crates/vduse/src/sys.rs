//! The VDUSE kernel ABI, API version 0 (`include/uapi/linux/vduse.h`,
//! `Documentation/userspace-api/vduse.rst`): `#[repr(C)]` mirrors of the uapi structs,
//! the ioctl numbers (from `linux-raw-sys`), the request types and result codes.
//!
//! Each struct's size is checked at compile time against the size its ioctl number
//! encodes, so a layout mistake cannot build. Where API version 1 added fields
//! (`ngroups`, `nas`, `group`) in what version 0 calls reserved space, the version-0
//! layout is used: those words stay reserved and zero.
//!
//! The structs are plain data: every field is an integer or an array of integers, and
//! padding is spelled out as explicit fields, so any bit pattern is a valid value and
//! the zero value is the "all reserved fields zero" value the kernel requires.

use rustix::ioctl::Opcode;

/// The API version this crate speaks (`VDUSE_API_VERSION`).
pub const VDUSE_API_VERSION: u64 = 0;

/// Size of a device name buffer, the terminating NUL included (`VDUSE_NAME_MAX`).
pub const VDUSE_NAME_MAX: usize = 256;

/// IOTLB access: the device may only read (`VDUSE_ACCESS_RO`).
pub const VDUSE_ACCESS_RO: u8 = 0x1;
/// IOTLB access: the device may only write (`VDUSE_ACCESS_WO`).
pub const VDUSE_ACCESS_WO: u8 = 0x2;
/// IOTLB access: the device may read and write (`VDUSE_ACCESS_RW`).
pub const VDUSE_ACCESS_RW: u8 = 0x3;

/// `vduse_vq_eventfd.fd` value that removes a virtqueue's kick eventfd.
pub const VDUSE_EVENTFD_DEASSIGN: i32 = -1;

/// Request type: the kernel asks for a virtqueue's state (`VDUSE_GET_VQ_STATE`).
pub const VDUSE_GET_VQ_STATE: u32 = 0;
/// Request type: the driver wrote the device status (`VDUSE_SET_STATUS`).
pub const VDUSE_SET_STATUS: u32 = 1;
/// Request type: IOTLB mappings in a range changed (`VDUSE_UPDATE_IOTLB`).
pub const VDUSE_UPDATE_IOTLB: u32 = 2;

/// Response result: the request succeeded (`VDUSE_REQ_RESULT_OK`).
pub const VDUSE_REQ_RESULT_OK: u32 = 0;
/// Response result: the request failed (`VDUSE_REQ_RESULT_FAILED`).
pub const VDUSE_REQ_RESULT_FAILED: u32 = 1;

/// Largest configuration space the kernel accepts at VDUSE_CREATE_DEV (`PAGE_SIZE`; the
/// smallest page size, 4 KiB, is used so the check holds on every architecture).
pub const VDUSE_MAX_CONFIG_SIZE: usize = 4096;

/// Largest `vq_num` the kernel accepts at VDUSE_CREATE_DEV.
pub const VDUSE_MAX_VQ_NUM: u32 = 0xffff;

/// The size field of an ioctl number (`_IOC_SIZE`).
pub const fn ioctl_size(nr: u32) -> usize {
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    const MASK: u32 = 0x1fff;
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    const MASK: u32 = 0x3fff;
    ((nr >> 16) & MASK) as usize
}

/// An ioctl number from `linux-raw-sys` as rustix's [`Opcode`] (`u32` or `c_ulong`
/// depending on the backend; the conversion never narrows).
#[allow(clippy::unnecessary_cast)]
const fn op(nr: u32) -> Opcode {
    nr as Opcode
}

use linux_raw_sys::ioctl as nr;

/// `VDUSE_GET_API_VERSION` (control fd, `_IOR`, `u64`).
pub const VDUSE_GET_API_VERSION: Opcode = op(nr::VDUSE_GET_API_VERSION);
/// `VDUSE_SET_API_VERSION` (control fd, `_IOW`, `u64`).
pub const VDUSE_SET_API_VERSION: Opcode = op(nr::VDUSE_SET_API_VERSION);
/// `VDUSE_CREATE_DEV` (control fd, `_IOW`, [`VduseDevConfig`] + config bytes).
pub const VDUSE_CREATE_DEV: Opcode = op(nr::VDUSE_CREATE_DEV);
/// `VDUSE_DESTROY_DEV` (control fd, `_IOW`, `char[VDUSE_NAME_MAX]`).
pub const VDUSE_DESTROY_DEV: Opcode = op(nr::VDUSE_DESTROY_DEV);
/// `VDUSE_IOTLB_GET_FD` (device fd, `_IOWR`, [`VduseIotlbEntry`]; returns an fd).
pub const VDUSE_IOTLB_GET_FD: Opcode = op(nr::VDUSE_IOTLB_GET_FD);
/// `VDUSE_DEV_GET_FEATURES` (device fd, `_IOR`, `u64`).
pub const VDUSE_DEV_GET_FEATURES: Opcode = op(nr::VDUSE_DEV_GET_FEATURES);
/// `VDUSE_DEV_SET_CONFIG` (device fd, `_IOW`, [`VduseConfigData`] + bytes).
pub const VDUSE_DEV_SET_CONFIG: Opcode = op(nr::VDUSE_DEV_SET_CONFIG);
/// `VDUSE_DEV_INJECT_CONFIG_IRQ` (device fd, `_IO`).
pub const VDUSE_DEV_INJECT_CONFIG_IRQ: Opcode = op(nr::VDUSE_DEV_INJECT_CONFIG_IRQ);
/// `VDUSE_VQ_SETUP` (device fd, `_IOW`, [`VduseVqConfig`]).
pub const VDUSE_VQ_SETUP: Opcode = op(nr::VDUSE_VQ_SETUP);
/// `VDUSE_VQ_GET_INFO` (device fd, `_IOWR`, [`VduseVqInfo`]).
pub const VDUSE_VQ_GET_INFO: Opcode = op(nr::VDUSE_VQ_GET_INFO);
/// `VDUSE_VQ_SETUP_KICKFD` (device fd, `_IOW`, [`VduseVqEventfd`]).
pub const VDUSE_VQ_SETUP_KICKFD: Opcode = op(nr::VDUSE_VQ_SETUP_KICKFD);
/// `VDUSE_VQ_INJECT_IRQ` (device fd, `_IOW`, `u32` queue index).
pub const VDUSE_VQ_INJECT_IRQ: Opcode = op(nr::VDUSE_VQ_INJECT_IRQ);

/// Basic configuration of a device, the fixed part of VDUSE_CREATE_DEV's argument
/// (`struct vduse_dev_config`); `config_size` bytes of configuration space follow it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VduseDevConfig {
    /// Device name, NUL-terminated (at most `VDUSE_NAME_MAX - 1` bytes of name).
    pub name: [u8; VDUSE_NAME_MAX],
    /// Virtio vendor id.
    pub vendor_id: u32,
    /// Virtio device id (the kernel allows block, net and fs).
    pub device_id: u32,
    /// Virtio feature bits the device offers.
    pub features: u64,
    /// Number of virtqueues.
    pub vq_num: u32,
    /// Alignment of virtqueue metadata, in bytes (at most the page size).
    pub vq_align: u32,
    /// Reserved, zero (API version 1 puts `ngroups` and `nas` in the first two words).
    pub reserved: [u32; 13],
    /// Size of the configuration space that follows, in bytes.
    pub config_size: u32,
}

impl VduseDevConfig {
    /// The all-zero value.
    pub const fn zeroed() -> Self {
        Self {
            name: [0; VDUSE_NAME_MAX],
            vendor_id: 0,
            device_id: 0,
            features: 0,
            vq_num: 0,
            vq_align: 0,
            reserved: [0; 13],
            config_size: 0,
        }
    }
}

/// Configuration of one virtqueue for VDUSE_VQ_SETUP (`struct vduse_vq_config`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VduseVqConfig {
    /// Virtqueue index.
    pub index: u32,
    /// Largest ring size the device supports.
    pub max_size: u16,
    /// Reserved, zero (API version 1 puts `group` in words 1-2).
    pub reserved: [u16; 13],
}

/// Split virtqueue state (`struct vduse_vq_state_split`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VduseVqStateSplit {
    /// The device's next available index (virtio 1.2 §2.7.6).
    pub avail_index: u16,
}

/// Packed virtqueue state (`struct vduse_vq_state_packed`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VduseVqStatePacked {
    /// Driver ring wrap counter the device last observed (0 or 1).
    pub last_avail_counter: u16,
    /// Device's next available position (15 bits).
    pub last_avail_idx: u16,
    /// Device ring wrap counter (0 or 1).
    pub last_used_counter: u16,
    /// Device's next used position (15 bits).
    pub last_used_idx: u16,
}

/// The split/packed state union of [`VduseVqInfo`] and [`VduseVqState`]. Both members
/// are plain `u16`s, so either may be read whatever was written.
#[repr(C)]
#[derive(Clone, Copy)]
pub union VduseVqStateUnion {
    /// Split ring state.
    pub split: VduseVqStateSplit,
    /// Packed ring state.
    pub packed: VduseVqStatePacked,
}

impl VduseVqStateUnion {
    /// The all-zero value.
    pub const fn zeroed() -> Self {
        Self {
            packed: VduseVqStatePacked {
                last_avail_counter: 0,
                last_avail_idx: 0,
                last_used_counter: 0,
                last_used_idx: 0,
            },
        }
    }

    /// The union's bytes read as packed state (a split state's `avail_index` shares the
    /// first word with `last_avail_counter`).
    pub fn as_packed(&self) -> VduseVqStatePacked {
        // SAFETY: both members are `repr(C)` structs of `u16`s starting at offset 0; the
        // union is 8 bytes and always fully initialised (constructors write `packed`), so
        // reading `packed` reads initialised integers, valid for any bit pattern.
        unsafe { self.packed }
    }
}

impl std::fmt::Debug for VduseVqStateUnion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_packed().fmt(f)
    }
}

/// Information about a virtqueue, from VDUSE_VQ_GET_INFO (`struct vduse_vq_info`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VduseVqInfo {
    /// Virtqueue index (set by the caller).
    pub index: u32,
    /// Ring size the driver chose.
    pub num: u32,
    /// IOVA of the descriptor area.
    pub desc_addr: u64,
    /// IOVA of the driver area (split: avail ring).
    pub driver_addr: u64,
    /// IOVA of the device area (split: used ring).
    pub device_addr: u64,
    /// Ring state set by the driver (split or packed per the negotiated features).
    pub state: VduseVqStateUnion,
    /// Whether the driver enabled the queue (0 or 1).
    pub ready: u8,
    /// Padding to the C struct's size, zero.
    pub padding: [u8; 7],
}

impl VduseVqInfo {
    /// The value to pass for queue `index`, every other field zero.
    pub const fn for_index(index: u32) -> Self {
        Self {
            index,
            num: 0,
            desc_addr: 0,
            driver_addr: 0,
            device_addr: 0,
            state: VduseVqStateUnion::zeroed(),
            ready: 0,
            padding: [0; 7],
        }
    }
}

/// Kick eventfd of a virtqueue for VDUSE_VQ_SETUP_KICKFD (`struct vduse_vq_eventfd`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VduseVqEventfd {
    /// Virtqueue index.
    pub index: u32,
    /// The eventfd, or [`VDUSE_EVENTFD_DEASSIGN`].
    pub fd: i32,
}

/// One IOTLB entry, IOVA range `[start, last]`, for VDUSE_IOTLB_GET_FD
/// (`struct vduse_iotlb_entry`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VduseIotlbEntry {
    /// Offset of the range in the returned fd, for mmap (out).
    pub offset: u64,
    /// First IOVA (in: start of the range to look up; out: the entry's).
    pub start: u64,
    /// Last IOVA, inclusive (in: end of the range to look up; out: the entry's).
    pub last: u64,
    /// [`VDUSE_ACCESS_RO`], [`VDUSE_ACCESS_WO`] or [`VDUSE_ACCESS_RW`] (out).
    pub perm: u8,
    /// Padding to the C struct's size, zero.
    pub padding: [u8; 7],
}

/// Fixed part of VDUSE_DEV_SET_CONFIG's argument (`struct vduse_config_data`);
/// `length` bytes follow it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VduseConfigData {
    /// Offset in the configuration space, in bytes.
    pub offset: u32,
    /// Number of bytes that follow.
    pub length: u32,
}

/// Virtqueue state in a request or response (`struct vduse_vq_state`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VduseVqState {
    /// Virtqueue index.
    pub index: u32,
    /// Split or packed state (responses only).
    pub state: VduseVqStateUnion,
}

/// Device status in a request (`struct vduse_dev_status`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VduseDevStatus {
    /// The device status byte the driver wrote (virtio 1.2 §2.1).
    pub status: u8,
}

/// An IOVA range `[start, last]` (`struct vduse_iova_range`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VduseIovaRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA, inclusive.
    pub last: u64,
}

/// The payload union of [`VduseDevRequest`].
#[repr(C)]
#[derive(Clone, Copy)]
pub union VduseDevRequestPayload {
    /// VDUSE_GET_VQ_STATE: the queue (only `index` is set).
    pub vq_state: VduseVqState,
    /// VDUSE_SET_STATUS: the status.
    pub s: VduseDevStatus,
    /// VDUSE_UPDATE_IOTLB: the range.
    pub iova: VduseIovaRange,
    /// The union's full size.
    pub padding: [u32; 32],
}

/// A request read from the device fd (`struct vduse_dev_request`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VduseDevRequest {
    /// One of the request types (`VDUSE_GET_VQ_STATE`, ...).
    pub ty: u32,
    /// Identifier to echo in the response.
    pub request_id: u32,
    /// Reserved.
    pub reserved: [u32; 4],
    /// Type-specific payload.
    pub payload: VduseDevRequestPayload,
}

/// The payload union of [`VduseDevResponse`].
#[repr(C)]
#[derive(Clone, Copy)]
pub union VduseDevResponsePayload {
    /// Answer to VDUSE_GET_VQ_STATE.
    pub vq_state: VduseVqState,
    /// The union's full size.
    pub padding: [u32; 32],
}

/// A response written to the device fd (`struct vduse_dev_response`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VduseDevResponse {
    /// The request's identifier.
    pub request_id: u32,
    /// [`VDUSE_REQ_RESULT_OK`] or [`VDUSE_REQ_RESULT_FAILED`].
    pub result: u32,
    /// Reserved, must be zero (the kernel refuses the write otherwise).
    pub reserved: [u32; 4],
    /// Type-specific payload.
    pub payload: VduseDevResponsePayload,
}

/// Size of a request as read from the device fd, in bytes (152).
pub const REQUEST_SIZE: usize = std::mem::size_of::<VduseDevRequest>();
/// Size of a response as written to the device fd, in bytes (152).
pub const RESPONSE_SIZE: usize = std::mem::size_of::<VduseDevResponse>();

// Layouts: each struct is exactly as large as its ioctl number says.
const _: () = assert!(std::mem::size_of::<u64>() == ioctl_size(nr::VDUSE_GET_API_VERSION));
const _: () = assert!(std::mem::size_of::<u64>() == ioctl_size(nr::VDUSE_SET_API_VERSION));
const _: () = assert!(std::mem::size_of::<VduseDevConfig>() == ioctl_size(nr::VDUSE_CREATE_DEV));
const _: () = assert!(VDUSE_NAME_MAX == ioctl_size(nr::VDUSE_DESTROY_DEV));
const _: () = assert!(std::mem::size_of::<VduseIotlbEntry>() == ioctl_size(nr::VDUSE_IOTLB_GET_FD));
const _: () = assert!(std::mem::size_of::<u64>() == ioctl_size(nr::VDUSE_DEV_GET_FEATURES));
const _: () =
    assert!(std::mem::size_of::<VduseConfigData>() == ioctl_size(nr::VDUSE_DEV_SET_CONFIG));
const _: () = assert!(0 == ioctl_size(nr::VDUSE_DEV_INJECT_CONFIG_IRQ));
const _: () = assert!(std::mem::size_of::<VduseVqConfig>() == ioctl_size(nr::VDUSE_VQ_SETUP));
const _: () = assert!(std::mem::size_of::<VduseVqInfo>() == ioctl_size(nr::VDUSE_VQ_GET_INFO));
const _: () =
    assert!(std::mem::size_of::<VduseVqEventfd>() == ioctl_size(nr::VDUSE_VQ_SETUP_KICKFD));
const _: () = assert!(std::mem::size_of::<u32>() == ioctl_size(nr::VDUSE_VQ_INJECT_IRQ));
// The messages (not ioctls): sizes from the uapi header.
const _: () = assert!(REQUEST_SIZE == 152);
const _: () = assert!(RESPONSE_SIZE == 152);
const _: () = assert!(std::mem::size_of::<VduseVqState>() == 12);
const _: () = assert!(std::mem::offset_of!(VduseDevRequest, payload) == 24);
const _: () = assert!(std::mem::offset_of!(VduseDevResponse, payload) == 24);
const _: () = assert!(std::mem::offset_of!(VduseVqInfo, state) == 32);
const _: () = assert!(std::mem::offset_of!(VduseVqInfo, ready) == 40);

/// Plain-data structs whose bytes may be viewed as `[u8]`.
///
/// # Safety
/// Implementors are `repr(C)`, contain only integers (or arrays/unions of them) and no
/// implicit padding, so every byte of a value is initialised.
pub unsafe trait Plain: Copy {}

// SAFETY: integers only; the size assertion above equals the sum of the fields.
unsafe impl Plain for VduseDevConfig {}
// SAFETY: integers only, 4 + 2 + 26 = 32 bytes, no padding.
unsafe impl Plain for VduseConfigData {}

/// The bytes of a plain-data value.
pub fn as_bytes<T: Plain>(v: &T) -> &[u8] {
    // SAFETY: `T: Plain` has no uninitialised bytes; the slice covers exactly `*v` and
    // borrows it, so it cannot outlive or alias a mutable use of the value.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// An ioctl whose argument is a pointer to caller memory and whose result is the
/// syscall's return value (an fd for VDUSE_IOTLB_GET_FD), for the calls rustix's
/// patterns do not cover: variable-length arguments and fd-returning ioctls.
pub(crate) struct RawIoctl<'a> {
    opcode: Opcode,
    arg: *mut std::ffi::c_void,
    _borrow: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> RawIoctl<'a> {
    /// An ioctl on the bytes of `arg`.
    ///
    /// # Safety
    /// `opcode` must be an ioctl that accesses at most `arg.len()` bytes at its argument
    /// pointer, and only as plain bytes (any value written is valid for `[u8]`).
    pub(crate) unsafe fn with_bytes(opcode: Opcode, arg: &'a mut [u8]) -> Self {
        Self {
            opcode,
            arg: arg.as_mut_ptr().cast(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// An ioctl on `arg`.
    ///
    /// # Safety
    /// `opcode` must be an ioctl that accesses at most `size_of::<T>()` bytes at its
    /// argument pointer, and writes only values valid for `T` (plain integers).
    pub(crate) unsafe fn with_value<T: Copy>(opcode: Opcode, arg: &'a mut T) -> Self {
        Self {
            opcode,
            arg: (arg as *mut T).cast(),
            _borrow: std::marker::PhantomData,
        }
    }
}

// SAFETY: the constructors' contracts make the opcode and the borrowed argument agree;
// the argument is borrowed mutably for the value's lifetime, so the kernel may write it;
// the output is the syscall's return value, which needs no pointer.
unsafe impl rustix::ioctl::Ioctl for RawIoctl<'_> {
    type Output = rustix::ioctl::IoctlOutput;

    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        self.arg
    }

    unsafe fn output_from_ptr(
        out: rustix::ioctl::IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<Self::Output> {
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_sandbox_allows_the_interrupt_ioctls_by_their_real_numbers() {
        use uvdpa_virtio::sandbox;
        assert_eq!(sandbox::VDUSE_VQ_INJECT_IRQ as Opcode, VDUSE_VQ_INJECT_IRQ);
        assert_eq!(
            sandbox::VDUSE_DEV_INJECT_CONFIG_IRQ as Opcode,
            VDUSE_DEV_INJECT_CONFIG_IRQ
        );
        assert_eq!(sandbox::VDUSE_IOTLB_GET_FD as Opcode, VDUSE_IOTLB_GET_FD);
    }

    #[test]
    fn ioctl_numbers_match_the_uapi_macros() {
        use rustix::ioctl::opcode;
        assert_eq!(VDUSE_GET_API_VERSION, opcode::read::<u64>(0x81, 0x00));
        assert_eq!(VDUSE_SET_API_VERSION, opcode::write::<u64>(0x81, 0x01));
        assert_eq!(
            VDUSE_CREATE_DEV,
            opcode::write::<VduseDevConfig>(0x81, 0x02)
        );
        assert_eq!(
            VDUSE_DESTROY_DEV,
            opcode::write::<[u8; VDUSE_NAME_MAX]>(0x81, 0x03)
        );
        assert_eq!(
            VDUSE_IOTLB_GET_FD,
            opcode::read_write::<VduseIotlbEntry>(0x81, 0x10)
        );
        assert_eq!(VDUSE_DEV_GET_FEATURES, opcode::read::<u64>(0x81, 0x11));
        assert_eq!(
            VDUSE_DEV_SET_CONFIG,
            opcode::write::<VduseConfigData>(0x81, 0x12)
        );
        assert_eq!(VDUSE_DEV_INJECT_CONFIG_IRQ, opcode::none(0x81, 0x13));
        assert_eq!(VDUSE_VQ_SETUP, opcode::write::<VduseVqConfig>(0x81, 0x14));
        assert_eq!(
            VDUSE_VQ_GET_INFO,
            opcode::read_write::<VduseVqInfo>(0x81, 0x15)
        );
        assert_eq!(
            VDUSE_VQ_SETUP_KICKFD,
            opcode::write::<VduseVqEventfd>(0x81, 0x16)
        );
        assert_eq!(VDUSE_VQ_INJECT_IRQ, opcode::write::<u32>(0x81, 0x17));
    }

    #[test]
    fn field_offsets_match_the_uapi_header() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(VduseDevConfig, vendor_id), 256);
        assert_eq!(offset_of!(VduseDevConfig, features), 264);
        assert_eq!(offset_of!(VduseDevConfig, vq_num), 272);
        assert_eq!(offset_of!(VduseDevConfig, config_size), 332);
        assert_eq!(offset_of!(VduseIotlbEntry, perm), 24);
        assert_eq!(offset_of!(VduseVqState, state), 4);
        assert_eq!(std::mem::size_of::<VduseIovaRange>(), 16);
    }
}
