//! VDUSE transport for uvdpa (Linux `Documentation/userspace-api/vduse.rst`, API version 0):
//! the control device, the device fd's message loop, guest memory through the IOTLB, kick
//! fds and interrupt injection, and binding to the vDPA bus over the `vdpa` generic netlink
//! family.

pub mod netlink;
