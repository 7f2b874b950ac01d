//! virtio-net (virtio 1.2 §5.1): an Ethernet device whose queue pairs are served by a TAP
//! interface or by a port of an L2 switch inside the daemon.
//!
//! - [`config`]: device attributes ([`config::NetConfig`]: MAC, MTU, queue pairs, link),
//!   their validation, the config space and the queue numbering.
//! - [`hdr`]: `struct virtio_net_hdr` and the checks applied to a transmitted header.
//! - [`ctrl`]: the control virtqueue and the receive-filter / queue-pair state it records
//!   for the data path ([`ctrl::NetCtrlState`]).
//! - [`tap`]: a Linux TAP interface with one queue per queue pair.
//! - [`switch`]: an in-daemon L2 learning switch connecting devices.
//! - [`device`]: [`device::NetDevice`], the device a transport serves.
//! - [`pair`]: the data path of one queue pair (receive and transmit queue in one worker).
//! - [`capture`]: live capture, frames mirrored into a shared-memory ring for the CLI.

pub use device::{NetBackendSpec, NetDevice, NetDeviceError};

pub mod capture;
pub mod config;
pub mod ctrl;
pub mod device;
pub mod hdr;
pub mod pair;
pub mod switch;
pub mod tap;
