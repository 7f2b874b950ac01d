//! Feature bits (virtio 1.2 §2.2, §6) with their spec names.

use bitflags::bitflags;

bitflags! {
    /// Device-independent and transport feature bits, named as in the virtio 1.2 spec (§6).
    ///
    /// Device-specific bits (0..=23) are defined beside each device (for example
    /// `uvdpa_devices::blk::BlkFeatures`); this type keeps unknown bits (`from_bits_retain`)
    /// so a feature word can be carried around whole and checked against the device's offer.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct VirtioFeatures: u64 {
        /// VIRTIO_RING_F_INDIRECT_DESC (bit 28): indirect descriptor tables (§2.7.5.3).
        const VIRTIO_RING_F_INDIRECT_DESC = 1 << 28;
        /// VIRTIO_RING_F_EVENT_IDX (bit 29): used_event/avail_event notification suppression (§2.7.7).
        const VIRTIO_RING_F_EVENT_IDX = 1 << 29;
        /// VHOST_USER_F_PROTOCOL_FEATURES (bit 30): vhost-user protocol feature negotiation.
        const VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30;
        /// VIRTIO_F_VERSION_1 (bit 32): compliance with virtio 1.x (§6).
        const VIRTIO_F_VERSION_1 = 1 << 32;
        /// VIRTIO_F_ACCESS_PLATFORM (bit 33): device behind an IOMMU.
        const VIRTIO_F_ACCESS_PLATFORM = 1 << 33;
        /// VIRTIO_F_RING_PACKED (bit 34): packed virtqueue layout (§2.8).
        const VIRTIO_F_RING_PACKED = 1 << 34;
        /// VIRTIO_F_IN_ORDER (bit 35): buffers are used in the order they are made available.
        const VIRTIO_F_IN_ORDER = 1 << 35;
        /// VIRTIO_F_ORDER_PLATFORM (bit 36): memory ordering of the platform.
        const VIRTIO_F_ORDER_PLATFORM = 1 << 36;
        /// VIRTIO_F_SR_IOV (bit 37).
        const VIRTIO_F_SR_IOV = 1 << 37;
        /// VIRTIO_F_NOTIFICATION_DATA (bit 38).
        const VIRTIO_F_NOTIFICATION_DATA = 1 << 38;
        /// VIRTIO_F_RING_RESET (bit 40): individual virtqueue reset.
        const VIRTIO_F_RING_RESET = 1 << 40;
    }
}

impl VirtioFeatures {
    /// Builds a feature word from a raw 64-bit value, keeping device-specific and unknown bits.
    pub fn from_raw(bits: u64) -> Self {
        Self::from_bits_retain(bits)
    }

    /// Names of the set bits that have a name in this type, in bit order, for logs and tools.
    pub fn names(self) -> Vec<&'static str> {
        self.iter_names().map(|(n, _)| n).collect()
    }
}
