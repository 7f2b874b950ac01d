//! The device layer: what a transport (vhost-user today, VDUSE later) needs from a virtio
//! device, in the spirit of the kernel's vdpa config ops and vhost-mdev's backend ops.
//!
//! The transport owns negotiation ([`crate::StatusMachine`]), the rings and the workers; the
//! device supplies its feature offer, its config space and one [`QueueHandler`] per queue.

use crate::features::VirtioFeatures;
use crate::worker::{ChainGroup, DeviceFault, GroupHandler, QueueHandler};

/// A software virtio device served by a transport.
///
/// # Invariants
/// `features()` always contains VIRTIO_F_VERSION_1; `config()` returns the same length
/// every call; `queue_handler` may be called again for a queue after its previous handler
/// was dropped (reconnect, reset).
pub trait VirtioDevice: Send + Sync {
    /// Virtio device ID (virtio 1.2 §5): 1 network, 2 block.
    fn device_type(&self) -> u32;

    /// Number of virtqueues the device exposes.
    fn num_queues(&self) -> u16;

    /// The device's queue size (descriptors): the ring size it suggests to frontends
    /// (printed in the QEMU command line it hands out) and the maximum a VDUSE driver may
    /// configure. It is not a wall for vhost-user: there the frontend chooses each ring's
    /// size, any size virtio 1.2 allows (§2.7: a power of two up to 32768 for split
    /// rings, §2.8: 1..=32768 for packed rings), and the device serves it.
    fn queue_size(&self) -> u16;

    /// Device and transport features offered to the driver.
    fn features(&self) -> VirtioFeatures;

    /// Features the driver must accept for FEATURES_OK (VIRTIO_F_VERSION_1 is implied).
    fn mandated_features(&self) -> VirtioFeatures {
        VirtioFeatures::VIRTIO_F_VERSION_1
    }

    /// The device-specific configuration space, little-endian, as the driver reads it.
    fn config(&self) -> Vec<u8>;

    /// A driver write to the config space at `offset`.
    ///
    /// # Errors
    /// The default refuses every write: most fields are read-only.
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceFault> {
        Err(DeviceFault(format!(
            "config space is read-only (write of {} bytes at {offset})",
            data.len()
        )))
    }

    /// Sets the MTU the frontend gave the driver (vhost-user VHOST_USER_NET_SET_MTU, which
    /// QEMU sends before it starts a virtio-net device whose `host_mtu` the driver
    /// accepted with VIRTIO_NET_F_MTU, virtio 1.2 §5.1.4): transmitted frames are then
    /// bounded by this MTU instead of the device's own. `None` returns to the device's own
    /// (the frontend went away or reset the device).
    ///
    /// # Errors
    /// The default refuses: only network devices have an MTU. A network device refuses an
    /// MTU outside 68..=65535 bytes (§5.1.4.1).
    fn set_frontend_mtu(&self, mtu: Option<u16>) -> Result<(), DeviceFault> {
        match mtu {
            None => Ok(()),
            Some(m) => Err(DeviceFault(format!("MTU {m}: not a network device"))),
        }
    }

    /// A request processor for queue `index`, given the negotiated features.
    ///
    /// # Errors
    /// A [`DeviceFault`] if the queue cannot be served (for example a backend error).
    fn queue_handler(
        &self,
        index: u16,
        features: VirtioFeatures,
    ) -> Result<Box<dyn QueueHandler>, DeviceFault>;

    /// The worker group queue `index` runs in once `features` are negotiated (the queue
    /// layout can depend on them: virtio-net's control queue is queue 2 without
    /// VIRTIO_NET_F_MQ). Queues of one group are owned by one worker thread together
    /// (virtio-net: the receive and transmit queue of a pair). The default puts every queue
    /// in its own group, numbered as the queue. Groups are numbered below
    /// [`VirtioDevice::num_queues`].
    fn queue_group(&self, index: u16, _features: VirtioFeatures) -> u16 {
        index
    }

    /// The processor of worker group `group`, given the negotiated features. The default
    /// runs [`VirtioDevice::queue_handler`] of queue `group` per chain ([`ChainGroup`]).
    ///
    /// # Errors
    /// A [`DeviceFault`] if the group cannot be served.
    fn group_handler(
        &self,
        group: u16,
        features: VirtioFeatures,
    ) -> Result<Box<dyn GroupHandler>, DeviceFault> {
        Ok(Box::new(ChainGroup::new(
            self.queue_handler(group, features)?,
        )))
    }

    /// Makes completed writes durable (file backends: fdatasync). Called when a frontend
    /// disconnects and at shutdown. The default does nothing.
    ///
    /// # Errors
    /// A [`DeviceFault`] describing the failed flush.
    fn flush(&self) -> Result<(), DeviceFault> {
        Ok(())
    }
}
