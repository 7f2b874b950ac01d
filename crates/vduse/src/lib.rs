//! VDUSE transport for uvdpa (Linux `Documentation/userspace-api/vduse.rst`, API version 0):
//! the control device, the device fd's message loop, guest memory through the IOTLB, kick
//! fds and interrupt injection, and binding to the vDPA bus over the `vdpa` generic netlink
//! family.

pub mod control;
pub mod dev;
pub mod error;
pub mod iotlb;
pub mod message;
pub mod netlink;
pub mod reconnect;
pub mod server;
pub mod sys;

pub use control::{Control, DevSpec};
pub use dev::{DeviceFd, IotlbEntry, IotlbPerm, VqInfo};
pub use error::VduseError;
pub use iotlb::{IotlbResolver, IotlbSource};
pub use message::{Request, RequestKind, Response, ResponseResult, RingLayout, VqState};
