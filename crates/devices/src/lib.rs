//! uvdpa's software virtio devices.
//!
//! Each device implements [`uvdpa_virtio::VirtioDevice`]: it offers features, exposes its
//! config space and hands the transport one [`uvdpa_virtio::worker::QueueHandler`] per
//! queue. Everything a driver puts in a queue is untrusted: a malformed request completes
//! with an error status and a rate-limited debug log, never a panic.
//!
//! - [`blk`]: virtio-blk (virtio 1.2 §5.2) over RAM, file and null backends.
//! - [`net`]: virtio-net (virtio 1.2 §5.1) over a TAP interface or an in-daemon switch.

#![deny(missing_docs)]

pub mod blk;
pub mod net;
mod ratelimit;
