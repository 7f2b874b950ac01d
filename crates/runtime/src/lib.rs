//! uvdpa's transport-neutral device runtime: what both transports (vhost-user, VDUSE)
//! drive to serve one device to one driver.
//!
//! A [`DeviceRuntime`] holds the device status machine (virtio 1.2 §2.1, §3.1) and the
//! negotiated features, the vrings as the driver configured them, the worker groups that
//! run them, the inflight buffer, the interrupt vectors (seed 001) and the resource
//! entries (seed 003). A transport decodes its own wire format (vhost-user messages,
//! VDUSE requests and ioctls) and calls the runtime; neither transport imports the other.
//!
//! A vring runs (is owned by a [`QueueWorker`](uvdpa_virtio::worker::QueueWorker)) while it
//! is started (a kick fd is set), enabled, fully addressed, sized, guest memory exists and
//! the device does not need a reset. The device puts its vrings in worker groups
//! ([`VirtioDevice::queue_group`](uvdpa_virtio::VirtioDevice::queue_group)): the ready
//! vrings of a group run in one worker (virtio-net: a queue pair). Any change to what a
//! running worker uses (memory, kick/err fds, a vring joining or leaving the group) stops
//! the worker, applies the change and starts it again with the ring state it handed back.

#![deny(missing_docs)]

mod error;
pub mod pause;
mod runtime;

pub use error::RuntimeError;
pub use runtime::{
    ConfigNotifier, DeviceRuntime, ResCtx, RuntimeParams, SessionEnder, SessionState, VringState,
    STOP_TIMEOUT,
};
