//! What a virtio-net device is made of ([`NetConfig`]: MAC address, MTU, queue pairs, link
//! state), how those attributes are parsed and checked, the config space the driver reads
//! (`struct virtio_net_config`, virtio 1.2 §5.1.4) and the queue numbering (§5.1.2).
//!
//! The config space is encoded up to and including `duplex`: 17 bytes, little-endian.
//! `speed` and `duplex` read as unknown (0xffffffff, 0xff); they are meaningful only with
//! VIRTIO_NET_F_SPEED_DUPLEX, and a driver that did not negotiate it never reads them.
//! The RSS fields that follow are not encoded (VIRTIO_NET_F_RSS is not offered).

use std::fmt;

use thiserror::Error;
use uvdpa_virtio::VirtioFeatures;

/// Smallest MTU (bytes of L3 payload per frame): the IPv4 minimum, as the spec's lower
/// bound for `mtu` (§5.1.4.1).
pub const MIN_MTU: u16 = 68;
/// Largest MTU.
pub const MAX_MTU: u16 = u16::MAX;
/// MTU of a device that does not say otherwise: Ethernet's.
pub const DEFAULT_MTU: u16 = 1500;
/// Most queue pairs a device may have (each pair is two virtqueues).
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// `VIRTIO_NET_S_LINK_UP` (bit 0 of `status`): the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// `VIRTIO_NET_S_ANNOUNCE` (bit 1 of `status`): the device asks the driver to announce
/// itself (VIRTIO_NET_F_GUEST_ANNOUNCE).
pub const VIRTIO_NET_S_ANNOUNCE: u16 = 2;

/// `speed` meaning "unknown" (`SPEED_UNKNOWN`), in Mbit/s.
pub const SPEED_UNKNOWN: u32 = u32::MAX;
/// `duplex` meaning "unknown" (`DUPLEX_UNKNOWN`).
pub const DUPLEX_UNKNOWN: u8 = 0xff;

/// Bytes of [`VirtioNetConfig`] on the wire: `mac` through `duplex`.
pub const VIRTIO_NET_CONFIG_SIZE: usize = 17;

/// Offsets of the fields of `struct virtio_net_config` (§5.1.4).
const MAC: usize = 0;
const STATUS: usize = 6;
const MAX_VIRTQUEUE_PAIRS: usize = 8;
const MTU: usize = 10;
const SPEED: usize = 12;
const DUPLEX: usize = 16;

/// A 48-bit Ethernet address.
pub type MacAddr = [u8; 6];

/// The attributes of a virtio-net device; checked by [`NetConfig::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The device's MAC address (config `mac`, VIRTIO_NET_F_MAC): unicast, not all zeroes.
    pub mac: MacAddr,
    /// Largest L3 payload of a frame in bytes, Ethernet header excluded (config `mtu`,
    /// VIRTIO_NET_F_MTU): [`MIN_MTU`]..=[`MAX_MTU`].
    pub mtu: u16,
    /// Queue pairs (config `max_virtqueue_pairs`, VIRTIO_NET_F_MQ):
    /// 1..=[`MAX_QUEUE_PAIRS`].
    pub max_queue_pairs: u16,
    /// Link state reported in `status` (VIRTIO_NET_F_STATUS).
    pub link_up: bool,
}

/// Why a virtio-net attribute was refused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum NetConfigError {
    /// A MAC address that is not six hexadecimal octets separated by `:` or `-`.
    #[error("Invalid MAC address {value:?}: expected six hex octets such as 02:00:00:00:00:01")]
    MacSyntax {
        /// The text given.
        value: String,
    },
    /// A multicast (group) MAC address, which no interface may have as its own.
    #[error("Invalid MAC address {}: a multicast address (low bit of the first octet set)", MacDisplay(*.mac))]
    MacMulticast {
        /// The address.
        mac: MacAddr,
    },
    /// The all-zero MAC address.
    #[error("Invalid MAC address 00:00:00:00:00:00")]
    MacZero,
    /// `mtu` out of range.
    #[error("Invalid mtu {value}: must be in {MIN_MTU}..={MAX_MTU}")]
    Mtu {
        /// The value given.
        value: u16,
    },
    /// `max_queue_pairs` out of range.
    #[error("Invalid max_queue_pairs {value}: must be in 1..={MAX_QUEUE_PAIRS}")]
    QueuePairs {
        /// The value given.
        value: u16,
    },
}

/// `struct virtio_net_config` (virtio 1.2 §5.1.4) through `duplex`, as native values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioNetConfig {
    /// MAC address.
    pub mac: MacAddr,
    /// `VIRTIO_NET_S_*` bits.
    pub status: u16,
    /// Queue pairs the device has.
    pub max_virtqueue_pairs: u16,
    /// MTU in bytes.
    pub mtu: u16,
    /// Link speed in Mbit/s, [`SPEED_UNKNOWN`] if unknown.
    pub speed: u32,
    /// 0 full duplex, 1 half duplex, [`DUPLEX_UNKNOWN`] if unknown.
    pub duplex: u8,
}

impl VirtioNetConfig {
    /// The config space as the driver reads it.
    pub fn to_le_bytes(&self) -> [u8; VIRTIO_NET_CONFIG_SIZE] {
        let mut b = [0u8; VIRTIO_NET_CONFIG_SIZE];
        b[MAC..MAC + 6].copy_from_slice(&self.mac);
        b[STATUS..STATUS + 2].copy_from_slice(&self.status.to_le_bytes());
        b[MAX_VIRTQUEUE_PAIRS..MAX_VIRTQUEUE_PAIRS + 2]
            .copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[MTU..MTU + 2].copy_from_slice(&self.mtu.to_le_bytes());
        b[SPEED..SPEED + 4].copy_from_slice(&self.speed.to_le_bytes());
        b[DUPLEX] = self.duplex;
        b
    }

    /// Decodes a config space read from a device (tools, `dev config show`); `None` if
    /// `bytes` is shorter than [`VIRTIO_NET_CONFIG_SIZE`].
    pub fn from_le_bytes(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; VIRTIO_NET_CONFIG_SIZE] =
            bytes.get(..VIRTIO_NET_CONFIG_SIZE)?.try_into().ok()?;
        let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Some(Self {
            mac: [b[0], b[1], b[2], b[3], b[4], b[5]],
            status: le16(STATUS),
            max_virtqueue_pairs: le16(MAX_VIRTQUEUE_PAIRS),
            mtu: le16(MTU),
            speed: u32::from_le_bytes([b[SPEED], b[SPEED + 1], b[SPEED + 2], b[SPEED + 3]]),
            duplex: b[DUPLEX],
        })
    }
}

impl NetConfig {
    /// The defaults for a device called `name`: a MAC derived from the name
    /// ([`generate_mac`]), MTU [`DEFAULT_MTU`], one queue pair, link up.
    pub fn new(name: &str) -> Self {
        Self {
            mac: generate_mac(name),
            mtu: DEFAULT_MTU,
            max_queue_pairs: 1,
            link_up: true,
        }
    }

    /// Checks every attribute.
    ///
    /// # Errors
    /// A [`NetConfigError`] naming the first attribute out of range: a multicast or zero
    /// MAC, an MTU below [`MIN_MTU`], queue pairs outside 1..=[`MAX_QUEUE_PAIRS`].
    pub fn validate(&self) -> Result<(), NetConfigError> {
        check_unicast(self.mac)?;
        if self.mtu < MIN_MTU {
            return Err(NetConfigError::Mtu { value: self.mtu });
        }
        if !(1..=MAX_QUEUE_PAIRS).contains(&self.max_queue_pairs) {
            return Err(NetConfigError::QueuePairs {
                value: self.max_queue_pairs,
            });
        }
        Ok(())
    }

    /// Virtqueues of the device: two per queue pair plus the control queue.
    pub fn num_queues(&self) -> u16 {
        self.max_queue_pairs.saturating_mul(2).saturating_add(1)
    }

    /// `status` as configured: [`VIRTIO_NET_S_LINK_UP`] when the link is up.
    pub fn status(&self) -> u16 {
        if self.link_up {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        }
    }

    /// The config space fields as configured. The MAC and status can change at run time
    /// (control queue MAC_ADDR_SET, announce):
    /// [`NetCtrlState::config_space`](super::ctrl::NetCtrlState::config_space) encodes
    /// them with those changes.
    pub fn virtio_config(&self) -> VirtioNetConfig {
        VirtioNetConfig {
            mac: self.mac,
            status: self.status(),
            max_virtqueue_pairs: self.max_queue_pairs,
            mtu: self.mtu,
            speed: SPEED_UNKNOWN,
            duplex: DUPLEX_UNKNOWN,
        }
    }

    /// The config space as the driver reads it: [`VIRTIO_NET_CONFIG_SIZE`] bytes
    /// (`mac`, `status`, `max_virtqueue_pairs`, `mtu`, `speed`, `duplex`).
    pub fn config_space(&self) -> Vec<u8> {
        self.virtio_config().to_le_bytes().to_vec()
    }
}

/// Refuses multicast and all-zero addresses.
fn check_unicast(mac: MacAddr) -> Result<(), NetConfigError> {
    if mac == [0; 6] {
        Err(NetConfigError::MacZero)
    } else if is_multicast(&mac) {
        Err(NetConfigError::MacMulticast { mac })
    } else {
        Ok(())
    }
}

/// Whether `mac` is a group (multicast or broadcast) address: low bit of the first octet.
pub fn is_multicast(mac: &MacAddr) -> bool {
    mac[0] & 1 != 0
}

/// Whether `mac` is the broadcast address ff:ff:ff:ff:ff:ff.
pub fn is_broadcast(mac: &MacAddr) -> bool {
    *mac == [0xff; 6]
}

/// Parses a MAC address written as six hexadecimal octets of one or two digits separated
/// by `:` or `-` (`02:00:5e:10:00:01`, `2-0-5E-10-0-1`). Only the syntax is checked; a
/// device's own address is further checked by [`NetConfig::validate`].
///
/// # Errors
/// [`NetConfigError::MacSyntax`] for anything else.
pub fn parse_mac(s: &str) -> Result<MacAddr, NetConfigError> {
    let bad = || NetConfigError::MacSyntax {
        value: s.to_string(),
    };
    let sep = if s.contains('-') { '-' } else { ':' };
    let mut mac = [0u8; 6];
    let mut parts = s.split(sep);
    for octet in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *octet = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Writes a MAC address as `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacDisplay(pub MacAddr);

impl fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A stable MAC address for the device called `name`: `02:` (locally administered,
/// unicast) followed by five bytes of the 64-bit FNV-1a hash of the name. The same name
/// gives the same address on every run and build (FNV is fixed, unlike std's hasher), so a
/// guest keeps its address across daemon restarts; different names collide with
/// probability about 2^-40 per pair.
pub fn generate_mac(name: &str) -> MacAddr {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let h = name
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    let b = h.to_be_bytes();
    [0x02, b[3], b[4], b[5], b[6], b[7]]
}

/// Index of the receive queue of pair `pair` (receiveq`pair+1`): `2 * pair` (§5.1.2).
pub const fn rx_queue_index(pair: u16) -> u16 {
    pair.wrapping_mul(2)
}

/// Index of the transmit queue of pair `pair` (transmitq`pair+1`): `2 * pair + 1`.
pub const fn tx_queue_index(pair: u16) -> u16 {
    pair.wrapping_mul(2).wrapping_add(1)
}

/// Index of the control queue (§5.1.2): `2 * N`, where N is `max_queue_pairs` when
/// VIRTIO_NET_F_MQ is negotiated and 1 otherwise. (A device with several pairs whose driver
/// did not take MQ has its control queue at index 2.)
pub fn ctrl_queue_index(max_queue_pairs: u16, negotiated: VirtioFeatures) -> u16 {
    let n = if negotiated.contains(VirtioFeatures::VIRTIO_NET_F_MQ) {
        max_queue_pairs
    } else {
        1
    };
    n.saturating_mul(2)
}

/// What a virtqueue index is on a device with `max_queue_pairs` pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// The receive queue of this pair.
    Rx(u16),
    /// The transmit queue of this pair.
    Tx(u16),
    /// The control queue.
    Ctrl,
}

impl QueueRole {
    /// The role of queue `index` given the negotiated features (see
    /// [`ctrl_queue_index`]); `None` for an index the device does not have (or one past the
    /// pairs in use when MQ was not negotiated).
    pub fn of(index: u16, max_queue_pairs: u16, negotiated: VirtioFeatures) -> Option<Self> {
        let ctrl = ctrl_queue_index(max_queue_pairs, negotiated);
        if index == ctrl {
            Some(Self::Ctrl)
        } else if index < ctrl {
            Some(if index % 2 == 0 {
                Self::Rx(index / 2)
            } else {
                Self::Tx(index / 2)
            })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout_matches_virtio_1_2_section_5_1_4() {
        let c = NetConfig {
            mac: [0x02, 0x11, 0x22, 0x33, 0x44, 0x55],
            mtu: 0x1234,
            max_queue_pairs: 0x0506,
            link_up: true,
        };
        let b = c.config_space();
        let expect: [u8; 17] = [
            0x02, 0x11, 0x22, 0x33, 0x44, 0x55, // mac
            0x01, 0x00, // status: LINK_UP
            0x06, 0x05, // max_virtqueue_pairs
            0x34, 0x12, // mtu
            0xff, 0xff, 0xff, 0xff, // speed: unknown
            0xff, // duplex: unknown
        ];
        assert_eq!(b, expect);
        assert_eq!(VirtioNetConfig::from_le_bytes(&b), Some(c.virtio_config()));
        assert_eq!(VirtioNetConfig::from_le_bytes(&b[..16]), None);
        let down = NetConfig {
            link_up: false,
            ..c
        };
        assert_eq!(&down.config_space()[6..8], &[0, 0]);
    }

    #[test]
    fn validate_checks_each_attribute() {
        let ok = NetConfig::new("n0");
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.mtu, DEFAULT_MTU);
        assert_eq!(ok.num_queues(), 3);
        for (mtu, good) in [(67, false), (68, true), (9000, true), (65535, true)] {
            let c = NetConfig { mtu, ..ok };
            assert_eq!(c.validate().is_ok(), good, "mtu {mtu}");
        }
        for (p, good) in [(0, false), (1, true), (16, true), (17, false)] {
            let c = NetConfig {
                max_queue_pairs: p,
                ..ok
            };
            assert_eq!(c.validate().is_ok(), good, "pairs {p}");
        }
        let c = NetConfig {
            max_queue_pairs: 16,
            ..ok
        };
        assert_eq!(c.num_queues(), 33);
        let multicast = NetConfig {
            mac: [0x01, 0, 0x5e, 0, 0, 1],
            ..ok
        };
        assert_eq!(
            multicast.validate(),
            Err(NetConfigError::MacMulticast {
                mac: [0x01, 0, 0x5e, 0, 0, 1]
            })
        );
        let zero = NetConfig { mac: [0; 6], ..ok };
        assert_eq!(zero.validate(), Err(NetConfigError::MacZero));
        // Messages name the value and the allowed range.
        let e = NetConfig { mtu: 10, ..ok }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("10") && e.contains("68..=65535"), "{e}");
        let e = multicast.validate().unwrap_err().to_string();
        assert!(e.contains("01:00:5e:00:00:01"), "{e}");
    }

    #[test]
    fn parses_and_prints_mac_addresses() {
        assert_eq!(
            parse_mac("02:00:5e:10:00:01"),
            Ok([0x02, 0, 0x5e, 0x10, 0, 1])
        );
        assert_eq!(parse_mac("2-0-5E-10-0-1"), Ok([0x02, 0, 0x5e, 0x10, 0, 1]));
        assert_eq!(parse_mac("FF:ff:ff:ff:ff:ff"), Ok([0xff; 6]));
        for bad in [
            "",
            "02:00:5e:10:00",
            "02:00:5e:10:00:01:02",
            "02:00:5e:10:00:",
            "02:00:5e:10:00:001",
            "02:00:5e:10:00:0g",
            "02-00:5e:10:00:01",
            "02:00:5e:10:00:+1",
            "０2:00:5e:10:00:01",
            "02005e100001",
        ] {
            assert!(
                matches!(parse_mac(bad), Err(NetConfigError::MacSyntax { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            MacDisplay([0x02, 0, 0x5e, 0x10, 0xab, 1]).to_string(),
            "02:00:5e:10:ab:01"
        );
        assert!(is_multicast(&[0x33, 0x33, 0, 0, 0, 1]));
        assert!(is_multicast(&[0xff; 6]) && is_broadcast(&[0xff; 6]));
        assert!(!is_multicast(&[0x02, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn generated_macs_are_stable_local_unicast_and_differ_by_name() {
        let a = generate_mac("net0");
        assert_eq!(a, generate_mac("net0"));
        // Pinned: the derivation must not change between builds (guests keep their MAC).
        assert_eq!(MacDisplay(a).to_string(), "02:ba:a0:31:b9:f8");
        assert_eq!(a[0], 0x02, "locally administered, unicast");
        assert_eq!(check_unicast(a), Ok(()));
        let names: Vec<String> = (0..1000).map(|i| format!("net{i}")).collect();
        let mut macs: Vec<MacAddr> = names.iter().map(|n| generate_mac(n)).collect();
        macs.sort_unstable();
        macs.dedup();
        assert_eq!(macs.len(), 1000);
        assert_eq!(generate_mac(""), [0x02, 0xe4, 0x84, 0x22, 0x23, 0x25]);
    }

    #[test]
    fn queue_numbering_follows_section_5_1_2() {
        assert_eq!(rx_queue_index(0), 0);
        assert_eq!(tx_queue_index(0), 1);
        assert_eq!(rx_queue_index(3), 6);
        assert_eq!(tx_queue_index(3), 7);
        let mq = VirtioFeatures::VIRTIO_NET_F_MQ;
        let none = VirtioFeatures::empty();
        assert_eq!(ctrl_queue_index(4, mq), 8);
        assert_eq!(ctrl_queue_index(4, none), 2);
        assert_eq!(ctrl_queue_index(1, mq), 2);
        assert_eq!(QueueRole::of(0, 4, mq), Some(QueueRole::Rx(0)));
        assert_eq!(QueueRole::of(7, 4, mq), Some(QueueRole::Tx(3)));
        assert_eq!(QueueRole::of(8, 4, mq), Some(QueueRole::Ctrl));
        assert_eq!(QueueRole::of(9, 4, mq), None);
        assert_eq!(QueueRole::of(2, 4, none), Some(QueueRole::Ctrl));
        assert_eq!(QueueRole::of(3, 4, none), None);
        assert_eq!(QueueRole::of(u16::MAX, 16, mq), None);
    }

    #[test]
    fn net_feature_bits_have_spec_numbers_and_do_not_rename_other_devices_bits() {
        let f = VirtioFeatures::VIRTIO_NET_F_CSUM
            | VirtioFeatures::VIRTIO_NET_F_MAC
            | VirtioFeatures::VIRTIO_NET_F_MRG_RXBUF
            | VirtioFeatures::VIRTIO_NET_F_MQ
            | VirtioFeatures::VIRTIO_NET_F_CTRL_MAC_ADDR;
        assert_eq!(f.bits(), 1 | 1 << 5 | 1 << 15 | 1 << 22 | 1 << 23);
        assert_eq!(
            f.net_names(),
            [
                "VIRTIO_NET_F_CSUM",
                "VIRTIO_NET_F_MAC",
                "VIRTIO_NET_F_MRG_RXBUF",
                "VIRTIO_NET_F_MQ",
                "VIRTIO_NET_F_CTRL_MAC_ADDR"
            ]
        );
        assert_eq!(
            VirtioFeatures::from_net_name("VIRTIO_NET_F_HOST_ECN"),
            Some(VirtioFeatures::from_raw(1 << 13))
        );
        assert_eq!(VirtioFeatures::from_net_name("VIRTIO_F_VERSION_1"), None);
        // Bit 13 is VIRTIO_BLK_F_DISCARD for a block device: the generic names stay generic.
        assert_eq!(VirtioFeatures::from_bits(1 << 13), None);
        assert!(VirtioFeatures::from_name("VIRTIO_NET_F_HOST_ECN").is_none());
        assert!(f.names().is_empty());
        let expected: [(u32, &str); 23] = [
            (0, "CSUM"),
            (1, "GUEST_CSUM"),
            (2, "CTRL_GUEST_OFFLOADS"),
            (3, "MTU"),
            (5, "MAC"),
            (7, "GUEST_TSO4"),
            (8, "GUEST_TSO6"),
            (9, "GUEST_ECN"),
            (10, "GUEST_UFO"),
            (11, "HOST_TSO4"),
            (12, "HOST_TSO6"),
            (13, "HOST_ECN"),
            (14, "HOST_UFO"),
            (15, "MRG_RXBUF"),
            (16, "STATUS"),
            (17, "CTRL_VQ"),
            (18, "CTRL_RX"),
            (19, "CTRL_VLAN"),
            (20, "CTRL_RX_EXTRA"),
            (21, "GUEST_ANNOUNCE"),
            (22, "MQ"),
            (23, "CTRL_MAC_ADDR"),
            (63, "SPEED_DUPLEX"),
        ];
        for ((bit, name), (n, f)) in expected.iter().zip(VirtioFeatures::VIRTIO_NET_FEATURES) {
            assert_eq!(format!("VIRTIO_NET_F_{name}"), n);
            assert_eq!(f.bits(), 1u64 << bit, "{n}");
        }
    }
}
