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
        /// VHOST_F_LOG_ALL (bit 26): vhost dirty page logging for live migration
        /// (transport-level on vhost-user; never seen by the device).
        const VHOST_F_LOG_ALL = 1 << 26;
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

/// virtio-net feature bits (virtio 1.2 §5.1.3), named as in the spec.
///
/// These are associated constants, not named flags of the `bitflags!` type above: the
/// device-specific bits 0..=23 mean something else for each device type (bit 13 is both
/// VIRTIO_NET_F_HOST_ECN and VIRTIO_BLK_F_DISCARD), so [`VirtioFeatures::names`],
/// `from_name`, `from_bits` and `all` keep knowing only the device-independent bits (tools
/// that name a blk device's bits are unaffected). [`VirtioFeatures::net_names`] and
/// [`VirtioFeatures::from_net_name`] name these for a virtio-net device.
impl VirtioFeatures {
    /// VIRTIO_NET_F_CSUM (bit 0): the device handles packets with partial checksum
    /// (transmit checksum offload).
    pub const VIRTIO_NET_F_CSUM: Self = Self::from_bits_retain(1 << 0);
    /// VIRTIO_NET_F_GUEST_CSUM (bit 1): the driver handles packets with partial checksum
    /// (receive checksum offload).
    pub const VIRTIO_NET_F_GUEST_CSUM: Self = Self::from_bits_retain(1 << 1);
    /// VIRTIO_NET_F_CTRL_GUEST_OFFLOADS (bit 2): guest offloads can be changed through the
    /// control virtqueue.
    pub const VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: Self = Self::from_bits_retain(1 << 2);
    /// VIRTIO_NET_F_MTU (bit 3): `mtu` in the config space is valid.
    pub const VIRTIO_NET_F_MTU: Self = Self::from_bits_retain(1 << 3);
    /// VIRTIO_NET_F_MAC (bit 5): `mac` in the config space is valid.
    pub const VIRTIO_NET_F_MAC: Self = Self::from_bits_retain(1 << 5);
    /// VIRTIO_NET_F_GUEST_TSO4 (bit 7): the driver can receive TSOv4.
    pub const VIRTIO_NET_F_GUEST_TSO4: Self = Self::from_bits_retain(1 << 7);
    /// VIRTIO_NET_F_GUEST_TSO6 (bit 8): the driver can receive TSOv6.
    pub const VIRTIO_NET_F_GUEST_TSO6: Self = Self::from_bits_retain(1 << 8);
    /// VIRTIO_NET_F_GUEST_ECN (bit 9): the driver can receive TSO with ECN.
    pub const VIRTIO_NET_F_GUEST_ECN: Self = Self::from_bits_retain(1 << 9);
    /// VIRTIO_NET_F_GUEST_UFO (bit 10): the driver can receive UFO.
    pub const VIRTIO_NET_F_GUEST_UFO: Self = Self::from_bits_retain(1 << 10);
    /// VIRTIO_NET_F_HOST_TSO4 (bit 11): the device can receive TSOv4.
    pub const VIRTIO_NET_F_HOST_TSO4: Self = Self::from_bits_retain(1 << 11);
    /// VIRTIO_NET_F_HOST_TSO6 (bit 12): the device can receive TSOv6.
    pub const VIRTIO_NET_F_HOST_TSO6: Self = Self::from_bits_retain(1 << 12);
    /// VIRTIO_NET_F_HOST_ECN (bit 13): the device can receive TSO with ECN.
    pub const VIRTIO_NET_F_HOST_ECN: Self = Self::from_bits_retain(1 << 13);
    /// VIRTIO_NET_F_HOST_UFO (bit 14): the device can receive UFO.
    pub const VIRTIO_NET_F_HOST_UFO: Self = Self::from_bits_retain(1 << 14);
    /// VIRTIO_NET_F_MRG_RXBUF (bit 15): the driver can merge receive buffers.
    pub const VIRTIO_NET_F_MRG_RXBUF: Self = Self::from_bits_retain(1 << 15);
    /// VIRTIO_NET_F_STATUS (bit 16): `status` in the config space is valid.
    pub const VIRTIO_NET_F_STATUS: Self = Self::from_bits_retain(1 << 16);
    /// VIRTIO_NET_F_CTRL_VQ (bit 17): the control virtqueue is available.
    pub const VIRTIO_NET_F_CTRL_VQ: Self = Self::from_bits_retain(1 << 17);
    /// VIRTIO_NET_F_CTRL_RX (bit 18): control-queue receive mode and MAC filter commands.
    pub const VIRTIO_NET_F_CTRL_RX: Self = Self::from_bits_retain(1 << 18);
    /// VIRTIO_NET_F_CTRL_VLAN (bit 19): control-queue VLAN filtering.
    pub const VIRTIO_NET_F_CTRL_VLAN: Self = Self::from_bits_retain(1 << 19);
    /// VIRTIO_NET_F_CTRL_RX_EXTRA (bit 20): the extra receive modes (ALLUNI, NOMULTI,
    /// NOUNI, NOBCAST) on the control queue.
    pub const VIRTIO_NET_F_CTRL_RX_EXTRA: Self = Self::from_bits_retain(1 << 20);
    /// VIRTIO_NET_F_GUEST_ANNOUNCE (bit 21): the driver can send gratuitous packets.
    pub const VIRTIO_NET_F_GUEST_ANNOUNCE: Self = Self::from_bits_retain(1 << 21);
    /// VIRTIO_NET_F_MQ (bit 22): multiqueue with automatic receive steering.
    pub const VIRTIO_NET_F_MQ: Self = Self::from_bits_retain(1 << 22);
    /// VIRTIO_NET_F_CTRL_MAC_ADDR (bit 23): the MAC address can be set through the control
    /// queue.
    pub const VIRTIO_NET_F_CTRL_MAC_ADDR: Self = Self::from_bits_retain(1 << 23);
    /// VIRTIO_NET_F_SPEED_DUPLEX (bit 63): `speed` and `duplex` in the config space are
    /// valid.
    pub const VIRTIO_NET_F_SPEED_DUPLEX: Self = Self::from_bits_retain(1 << 63);

    /// The virtio-net bits above with their spec names, in bit order.
    pub const VIRTIO_NET_FEATURES: [(&'static str, Self); 23] = [
        ("VIRTIO_NET_F_CSUM", Self::VIRTIO_NET_F_CSUM),
        ("VIRTIO_NET_F_GUEST_CSUM", Self::VIRTIO_NET_F_GUEST_CSUM),
        (
            "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS",
            Self::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        ),
        ("VIRTIO_NET_F_MTU", Self::VIRTIO_NET_F_MTU),
        ("VIRTIO_NET_F_MAC", Self::VIRTIO_NET_F_MAC),
        ("VIRTIO_NET_F_GUEST_TSO4", Self::VIRTIO_NET_F_GUEST_TSO4),
        ("VIRTIO_NET_F_GUEST_TSO6", Self::VIRTIO_NET_F_GUEST_TSO6),
        ("VIRTIO_NET_F_GUEST_ECN", Self::VIRTIO_NET_F_GUEST_ECN),
        ("VIRTIO_NET_F_GUEST_UFO", Self::VIRTIO_NET_F_GUEST_UFO),
        ("VIRTIO_NET_F_HOST_TSO4", Self::VIRTIO_NET_F_HOST_TSO4),
        ("VIRTIO_NET_F_HOST_TSO6", Self::VIRTIO_NET_F_HOST_TSO6),
        ("VIRTIO_NET_F_HOST_ECN", Self::VIRTIO_NET_F_HOST_ECN),
        ("VIRTIO_NET_F_HOST_UFO", Self::VIRTIO_NET_F_HOST_UFO),
        ("VIRTIO_NET_F_MRG_RXBUF", Self::VIRTIO_NET_F_MRG_RXBUF),
        ("VIRTIO_NET_F_STATUS", Self::VIRTIO_NET_F_STATUS),
        ("VIRTIO_NET_F_CTRL_VQ", Self::VIRTIO_NET_F_CTRL_VQ),
        ("VIRTIO_NET_F_CTRL_RX", Self::VIRTIO_NET_F_CTRL_RX),
        ("VIRTIO_NET_F_CTRL_VLAN", Self::VIRTIO_NET_F_CTRL_VLAN),
        (
            "VIRTIO_NET_F_CTRL_RX_EXTRA",
            Self::VIRTIO_NET_F_CTRL_RX_EXTRA,
        ),
        (
            "VIRTIO_NET_F_GUEST_ANNOUNCE",
            Self::VIRTIO_NET_F_GUEST_ANNOUNCE,
        ),
        ("VIRTIO_NET_F_MQ", Self::VIRTIO_NET_F_MQ),
        (
            "VIRTIO_NET_F_CTRL_MAC_ADDR",
            Self::VIRTIO_NET_F_CTRL_MAC_ADDR,
        ),
        ("VIRTIO_NET_F_SPEED_DUPLEX", Self::VIRTIO_NET_F_SPEED_DUPLEX),
    ];

    /// Names of the set virtio-net bits ([`VirtioFeatures::VIRTIO_NET_FEATURES`]), in bit
    /// order, for logs and tools describing a virtio-net device.
    pub fn net_names(self) -> Vec<&'static str> {
        Self::VIRTIO_NET_FEATURES
            .iter()
            .filter(|(_, f)| self.contains(*f))
            .map(|(n, _)| *n)
            .collect()
    }

    /// The virtio-net bit called `name` (`VIRTIO_NET_F_MRG_RXBUF`), if there is one.
    pub fn from_net_name(name: &str) -> Option<Self> {
        Self::VIRTIO_NET_FEATURES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
    }
}
