//! uvdpa's virtio core: feature bits, the device status machine, guest memory and split
//! and packed virtqueues with validated descriptor chains (virtio 1.2 §2).
//!
//! Nothing in this crate trusts the driver: every ring index, descriptor address, length and
//! flag read from guest memory is checked before it is used, and a malformed input is an
//! error value that says what was wrong, never a panic.

#![deny(missing_docs)]

pub mod chain;
pub mod device;
pub mod dirty;
pub mod fault;
pub mod features;
pub mod inflight;
pub mod interrupts;
pub mod loglimit;
pub mod memory;
pub mod packed;
pub mod queue;
pub mod sandbox;
pub mod split;
pub mod stats;
pub mod status;
pub mod worker;

pub use chain::{ChainError, DescriptorChain, Segment};
pub use device::VirtioDevice;
pub use dirty::{DirtyLog, QueueLog};
pub use features::VirtioFeatures;
pub use memory::{fd_seals, FdSeals, GuestMemory, MemoryError, MemoryRegion};
pub use queue::Virtqueue;
pub use split::{QueueError, SplitQueue, VringConfig};
pub use status::{DeviceStatus, StatusError, StatusMachine};
