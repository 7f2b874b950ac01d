//! `struct virtio_net_hdr` (virtio 1.2 §5.1.6), the header in front of every frame in the
//! receive and transmit queues, and the checks applied to one a driver transmits
//! (§5.1.6.2).
//!
//! The header is always 12 bytes: VIRTIO_F_VERSION_1 is mandatory (so `num_buffers` is
//! always present) and the features that lengthen it (VIRTIO_NET_F_HASH_REPORT, the UDP
//! tunnel GSO features) are not offered.

use thiserror::Error;
use uvdpa_virtio::VirtioFeatures;

/// Bytes of `struct virtio_net_hdr`.
pub const VIRTIO_NET_HDR_LEN: usize = 12;

/// `flags`: the device must complete the checksum at `csum_start + csum_offset`
/// (transmit, with VIRTIO_NET_F_CSUM) / the driver must (receive, VIRTIO_NET_F_GUEST_CSUM).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags` (receive only): the checksum was validated.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `flags` (receive only, VIRTIO_NET_F_RSC_EXT): coalescing information is present.
pub const VIRTIO_NET_HDR_F_RSC_INFO: u8 = 4;

/// `gso_type`: not a GSO frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4 segmentation (TSO).
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation (UFO).
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6 segmentation (TSO).
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type` bit: the TCP segments carry ECN (with VIRTIO_NET_F_HOST_ECN /
/// VIRTIO_NET_F_GUEST_ECN).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Bytes of an Ethernet header (destination, source, EtherType).
pub const ETH_HLEN: usize = 14;
/// Bytes of one 802.1Q VLAN tag.
pub const VLAN_HLEN: usize = 4;
/// Largest frame the device carries, virtio header excluded: 64 KiB of (GSO) packet plus
/// the Ethernet header and one VLAN tag. Receive buffers of
/// `VIRTIO_NET_HDR_LEN + MAX_FRAME_LEN` bytes hold any frame a backend delivers.
pub const MAX_FRAME_LEN: usize = 65536 + ETH_HLEN + VLAN_HLEN;

/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;

/// `struct virtio_net_hdr` with native integers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*` bits.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*` type, possibly with [`VIRTIO_NET_HDR_GSO_ECN`].
    pub gso_type: u8,
    /// Bytes of headers to replicate per segment (a hint: never relied on).
    pub hdr_len: u16,
    /// Bytes of payload per segment (the MSS) of a GSO frame.
    pub gso_size: u16,
    /// Offset in the frame where checksumming starts (with NEEDS_CSUM).
    pub csum_start: u16,
    /// Offset from `csum_start` where the checksum is stored (with NEEDS_CSUM).
    pub csum_offset: u16,
    /// Receive: descriptors (chains) the frame occupies; 1 without
    /// VIRTIO_NET_F_MRG_RXBUF. Transmit: zero, ignored.
    pub num_buffers: u16,
}

/// What is wrong with a transmitted header or frame (§5.1.6.2). The frame is dropped.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum HdrError {
    /// The frame is shorter than an Ethernet header.
    #[error("Short frame: {len} bytes, less than the {ETH_HLEN}-byte Ethernet header")]
    Short {
        /// Frame bytes after the virtio header.
        len: usize,
    },
    /// A frame without GSO is longer than the MTU allows.
    #[error(
        "Frame of {len} bytes exceeds MTU {mtu} (at most {max} bytes with the Ethernet \
         header and one VLAN tag)"
    )]
    ExceedsMtu {
        /// Frame bytes after the virtio header.
        len: usize,
        /// The MTU applied.
        mtu: u16,
        /// The longest frame allowed.
        max: usize,
    },
    /// A GSO frame longer than [`MAX_FRAME_LEN`].
    #[error("GSO frame of {len} bytes exceeds {MAX_FRAME_LEN} bytes")]
    TooLong {
        /// Frame bytes after the virtio header.
        len: usize,
    },
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated.
    #[error("NEEDS_CSUM set but VIRTIO_NET_F_CSUM was not negotiated")]
    CsumNotNegotiated,
    /// The checksum field `csum_start + csum_offset .. +2` is not inside the frame.
    #[error(
        "Checksum at csum_start {csum_start} + csum_offset {csum_offset} is outside the \
         {len}-byte frame"
    )]
    CsumOutOfFrame {
        /// `csum_start`.
        csum_start: u16,
        /// `csum_offset`.
        csum_offset: u16,
        /// Frame bytes after the virtio header.
        len: usize,
    },
    /// A `gso_type` (without its ECN bit) that is none of NONE, TCPV4, UDP, TCPV6.
    #[error("Unknown gso_type {gso_type:#04x}")]
    UnknownGsoType {
        /// The `gso_type` byte.
        gso_type: u8,
    },
    /// A GSO type whose VIRTIO_NET_F_HOST_* feature (TSO4, TSO6, UFO) was not negotiated.
    #[error("gso_type {gso_type:#04x} needs {feature}, which was not negotiated")]
    GsoNotNegotiated {
        /// The `gso_type` byte.
        gso_type: u8,
        /// The feature it needs.
        feature: &'static str,
    },
    /// The ECN bit without VIRTIO_NET_F_HOST_ECN negotiated.
    #[error("gso_type has the ECN bit but VIRTIO_NET_F_HOST_ECN was not negotiated")]
    EcnNotNegotiated,
    /// The ECN bit on a frame that is not GSO.
    #[error("gso_type has the ECN bit without a GSO type")]
    EcnWithoutGso,
    /// A GSO frame without VIRTIO_NET_HDR_F_NEEDS_CSUM (§5.1.6.2.1: the driver MUST set it).
    #[error("gso_type {gso_type:#04x} without NEEDS_CSUM")]
    GsoWithoutCsum {
        /// The `gso_type` byte.
        gso_type: u8,
    },
    /// A GSO frame with `gso_size` 0.
    #[error("gso_type {gso_type:#04x} with gso_size 0")]
    ZeroGsoSize {
        /// The `gso_type` byte.
        gso_type: u8,
    },
}

impl VirtioNetHdr {
    /// Decodes a header (little-endian fields).
    pub fn parse(b: &[u8; VIRTIO_NET_HDR_LEN]) -> Self {
        let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: le16(NUM_BUFFERS),
        }
    }

    /// Decodes the header at the start of `b`; `None` if `b` is shorter than
    /// [`VIRTIO_NET_HDR_LEN`].
    pub fn from_prefix(b: &[u8]) -> Option<Self> {
        Some(Self::parse(b.get(..VIRTIO_NET_HDR_LEN)?.try_into().ok()?))
    }

    /// Encodes the header (for the receive queue, or for a backend).
    pub fn to_bytes(&self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// A receive header for a frame with complete checksums and no GSO in `num_buffers`
    /// buffers.
    pub fn rx_plain(num_buffers: u16) -> Self {
        Self {
            num_buffers,
            ..Self::default()
        }
    }

    /// Whether `gso_type` asks for segmentation (anything but NONE, ECN bit aside).
    pub fn is_gso(&self) -> bool {
        self.gso_type & !VIRTIO_NET_HDR_GSO_ECN != VIRTIO_NET_HDR_GSO_NONE
    }

    /// Checks a header the driver transmitted in front of a `frame_len`-byte frame
    /// (`frame_len` counts the bytes after the header), given the negotiated features and
    /// the device MTU (§5.1.6.2):
    ///
    /// - the frame holds at least an Ethernet header (14 bytes);
    /// - NEEDS_CSUM requires VIRTIO_NET_F_CSUM, and the 2-byte checksum field at
    ///   `csum_start + csum_offset` inside the frame;
    /// - a GSO type must be TCPV4, TCPV6 or UDP with VIRTIO_NET_F_HOST_TSO4 / TSO6 / UFO
    ///   negotiated, carry NEEDS_CSUM and a non-zero `gso_size`, and the frame is at most
    ///   [`MAX_FRAME_LEN`]; the ECN bit requires VIRTIO_NET_F_HOST_ECN and a GSO type;
    /// - a frame without GSO is at most `mtu + 14 + 4` bytes (L3 payload up to the MTU,
    ///   the Ethernet header, and room for one 802.1Q tag). The MTU applies when
    ///   VIRTIO_NET_F_MTU was negotiated (the driver then knows it, §5.1.4.2); otherwise the
    ///   limit is [`MAX_MTU`](super::config::MAX_MTU).
    ///
    /// Flag bits other than NEEDS_CSUM are ignored, as §5.1.6.2.2 requires ("The device
    /// MUST ignore flag bits that it does not recognize"); DATA_VALID and RSC_INFO, which a
    /// driver must not set on transmit, are ignored likewise. `hdr_len` is a hint the
    /// device must not rely on: not checked. `num_buffers` is ignored on transmit.
    ///
    /// # Errors
    /// The first [`HdrError`] found.
    pub fn validate_tx(
        &self,
        frame_len: usize,
        negotiated: VirtioFeatures,
        mtu: u16,
    ) -> Result<(), HdrError> {
        if frame_len < ETH_HLEN {
            return Err(HdrError::Short { len: frame_len });
        }
        let gso_type = self.gso_type;
        let ecn = gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        let needs_csum = self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        let needed = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => None,
            VIRTIO_NET_HDR_GSO_TCPV4 => Some((
                VirtioFeatures::VIRTIO_NET_F_HOST_TSO4,
                "VIRTIO_NET_F_HOST_TSO4",
            )),
            VIRTIO_NET_HDR_GSO_TCPV6 => Some((
                VirtioFeatures::VIRTIO_NET_F_HOST_TSO6,
                "VIRTIO_NET_F_HOST_TSO6",
            )),
            VIRTIO_NET_HDR_GSO_UDP => Some((
                VirtioFeatures::VIRTIO_NET_F_HOST_UFO,
                "VIRTIO_NET_F_HOST_UFO",
            )),
            _ => return Err(HdrError::UnknownGsoType { gso_type }),
        };
        if let Some((feature, name)) = needed {
            if !negotiated.contains(feature) {
                return Err(HdrError::GsoNotNegotiated {
                    gso_type,
                    feature: name,
                });
            }
        } else if ecn {
            return Err(HdrError::EcnWithoutGso);
        }
        if ecn && !negotiated.contains(VirtioFeatures::VIRTIO_NET_F_HOST_ECN) {
            return Err(HdrError::EcnNotNegotiated);
        }
        if needs_csum {
            if !negotiated.contains(VirtioFeatures::VIRTIO_NET_F_CSUM) {
                return Err(HdrError::CsumNotNegotiated);
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(HdrError::CsumOutOfFrame {
                    csum_start: self.csum_start,
                    csum_offset: self.csum_offset,
                    len: frame_len,
                });
            }
        }
        if needed.is_some() {
            if !needs_csum {
                return Err(HdrError::GsoWithoutCsum { gso_type });
            }
            if self.gso_size == 0 {
                return Err(HdrError::ZeroGsoSize { gso_type });
            }
            if frame_len > MAX_FRAME_LEN {
                return Err(HdrError::TooLong { len: frame_len });
            }
        } else {
            let mtu = if negotiated.contains(VirtioFeatures::VIRTIO_NET_F_MTU) {
                mtu
            } else {
                super::config::MAX_MTU
            };
            let max = usize::from(mtu) + ETH_HLEN + VLAN_HLEN;
            if frame_len > max {
                return Err(HdrError::ExceedsMtu {
                    len: frame_len,
                    mtu,
                    max,
                });
            }
        }
        Ok(())
    }
}

/// Writes `num_buffers` into an encoded header at the start of `hdr` (receive, once the
/// number of buffers a frame took is known). Returns `false`, changing nothing, if `hdr` is
/// shorter than [`VIRTIO_NET_HDR_LEN`].
pub fn set_num_buffers(hdr: &mut [u8], num_buffers: u16) -> bool {
    match hdr.get_mut(NUM_BUFFERS..NUM_BUFFERS + 2) {
        Some(field) => {
            field.copy_from_slice(&num_buffers.to_le_bytes());
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSUM: VirtioFeatures = VirtioFeatures::VIRTIO_NET_F_CSUM;
    const MTU: VirtioFeatures = VirtioFeatures::VIRTIO_NET_F_MTU;

    fn all_host() -> VirtioFeatures {
        CSUM | MTU
            | VirtioFeatures::VIRTIO_NET_F_HOST_TSO4
            | VirtioFeatures::VIRTIO_NET_F_HOST_TSO6
            | VirtioFeatures::VIRTIO_NET_F_HOST_UFO
            | VirtioFeatures::VIRTIO_NET_F_HOST_ECN
    }

    fn gso(gso_type: u8) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    #[test]
    fn encodes_and_decodes_each_field_little_endian() {
        let h = VirtioNetHdr {
            flags: 0x01,
            gso_type: 0x84,
            hdr_len: 0x0302,
            gso_size: 0x0504,
            csum_start: 0x0706,
            csum_offset: 0x0908,
            num_buffers: 0x0b0a,
        };
        let b = h.to_bytes();
        assert_eq!(b, [0x01, 0x84, 2, 3, 4, 5, 6, 7, 8, 9, 0x0a, 0x0b]);
        assert_eq!(VirtioNetHdr::parse(&b), h);
        assert_eq!(
            VirtioNetHdr::from_prefix(&[b.as_slice(), &[0xee; 3]].concat()),
            Some(h)
        );
        assert_eq!(VirtioNetHdr::from_prefix(&b[..11]), None);
        assert_eq!(
            VirtioNetHdr::rx_plain(1).to_bytes(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
        );
    }

    #[test]
    fn patches_num_buffers_in_place() {
        let mut b = [0xaau8; 20];
        assert!(set_num_buffers(&mut b, 0x0302));
        assert_eq!(&b[10..12], &[0x02, 0x03]);
        assert_eq!(b[9], 0xaa);
        assert_eq!(b[12], 0xaa);
        let mut short = [0u8; 11];
        assert!(!set_num_buffers(&mut short, 1));
        assert_eq!(short, [0; 11]);
        let mut exact = [0u8; 12];
        assert!(set_num_buffers(&mut exact, 7));
        assert_eq!(VirtioNetHdr::parse(&exact).num_buffers, 7);
    }

    #[test]
    fn plain_frames_are_bounded_by_ethernet_header_and_mtu() {
        let h = VirtioNetHdr::default();
        let f = MTU;
        assert_eq!(h.validate_tx(14, f, 1500), Ok(()));
        assert_eq!(h.validate_tx(13, f, 1500), Err(HdrError::Short { len: 13 }));
        assert_eq!(h.validate_tx(0, f, 1500), Err(HdrError::Short { len: 0 }));
        // MTU + Ethernet header + one VLAN tag.
        assert_eq!(h.validate_tx(1518, f, 1500), Ok(()));
        assert_eq!(
            h.validate_tx(1519, f, 1500),
            Err(HdrError::ExceedsMtu {
                len: 1519,
                mtu: 1500,
                max: 1518
            })
        );
        // Without VIRTIO_NET_F_MTU the driver does not know the MTU: 65535 applies.
        let none = VirtioFeatures::empty();
        assert_eq!(h.validate_tx(9018, none, 1500), Ok(()));
        assert_eq!(h.validate_tx(65535 + 18, none, 1500), Ok(()));
        assert!(matches!(
            h.validate_tx(65535 + 19, none, 1500),
            Err(HdrError::ExceedsMtu { mtu: 65535, .. })
        ));
        assert!(h.validate_tx(usize::MAX, none, 1500).is_err());
    }

    #[test]
    fn unknown_and_receive_only_flags_are_ignored_on_transmit() {
        for flags in [
            VIRTIO_NET_HDR_F_DATA_VALID,
            VIRTIO_NET_HDR_F_RSC_INFO,
            0x08,
            0x80,
            0xfe,
        ] {
            let h = VirtioNetHdr {
                flags,
                ..VirtioNetHdr::default()
            };
            assert_eq!(h.validate_tx(60, MTU, 1500), Ok(()), "flags {flags:#x}");
        }
    }

    #[test]
    fn needs_csum_requires_the_feature_and_a_field_inside_the_frame() {
        let h = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..VirtioNetHdr::default()
        };
        assert_eq!(
            h.validate_tx(60, MTU, 1500),
            Err(HdrError::CsumNotNegotiated)
        );
        assert_eq!(h.validate_tx(52, CSUM | MTU, 1500), Ok(()));
        assert_eq!(
            h.validate_tx(51, CSUM | MTU, 1500),
            Err(HdrError::CsumOutOfFrame {
                csum_start: 34,
                csum_offset: 16,
                len: 51
            })
        );
        let far = VirtioNetHdr {
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..h
        };
        assert!(matches!(
            far.validate_tx(1514, CSUM | MTU, 1500),
            Err(HdrError::CsumOutOfFrame { .. })
        ));
        // Without NEEDS_CSUM the fields are not used, whatever they hold.
        let unused = VirtioNetHdr { flags: 0, ..far };
        assert_eq!(unused.validate_tx(60, MTU, 1500), Ok(()));
    }

    #[test]
    fn gso_types_require_their_host_feature() {
        for (t, feature, name) in [
            (
                VIRTIO_NET_HDR_GSO_TCPV4,
                VirtioFeatures::VIRTIO_NET_F_HOST_TSO4,
                "VIRTIO_NET_F_HOST_TSO4",
            ),
            (
                VIRTIO_NET_HDR_GSO_TCPV6,
                VirtioFeatures::VIRTIO_NET_F_HOST_TSO6,
                "VIRTIO_NET_F_HOST_TSO6",
            ),
            (
                VIRTIO_NET_HDR_GSO_UDP,
                VirtioFeatures::VIRTIO_NET_F_HOST_UFO,
                "VIRTIO_NET_F_HOST_UFO",
            ),
        ] {
            let h = gso(t);
            assert!(h.is_gso());
            assert_eq!(h.validate_tx(65000, CSUM | feature, 1500), Ok(()));
            assert_eq!(
                h.validate_tx(65000, all_host() - feature, 1500),
                Err(HdrError::GsoNotNegotiated {
                    gso_type: t,
                    feature: name
                })
            );
            assert_eq!(
                VirtioNetHdr { gso_size: 0, ..h }.validate_tx(65000, all_host(), 1500),
                Err(HdrError::ZeroGsoSize { gso_type: t })
            );
            assert_eq!(
                VirtioNetHdr { flags: 0, ..h }.validate_tx(65000, all_host(), 1500),
                Err(HdrError::GsoWithoutCsum { gso_type: t })
            );
            assert_eq!(h.validate_tx(MAX_FRAME_LEN, all_host(), 1500), Ok(()));
            assert_eq!(
                h.validate_tx(MAX_FRAME_LEN + 1, all_host(), 1500),
                Err(HdrError::TooLong {
                    len: MAX_FRAME_LEN + 1
                })
            );
        }
        for t in [2u8, 5, 6, 0x20, 0x40, 0x7f, 0xff] {
            assert_eq!(
                gso(t).validate_tx(1000, all_host(), 1500),
                Err(HdrError::UnknownGsoType { gso_type: t })
            );
        }
    }

    #[test]
    fn ecn_requires_host_ecn_and_a_gso_type() {
        let t = VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN;
        assert_eq!(gso(t).validate_tx(30000, all_host(), 1500), Ok(()));
        assert_eq!(
            gso(t).validate_tx(
                30000,
                all_host() - VirtioFeatures::VIRTIO_NET_F_HOST_ECN,
                1500
            ),
            Err(HdrError::EcnNotNegotiated)
        );
        assert_eq!(
            gso(VIRTIO_NET_HDR_GSO_ECN).validate_tx(100, all_host(), 1500),
            Err(HdrError::EcnWithoutGso)
        );
        assert!(!gso(VIRTIO_NET_HDR_GSO_ECN).is_gso());
    }

    #[test]
    fn errors_name_what_was_wrong() {
        let e = HdrError::GsoNotNegotiated {
            gso_type: 4,
            feature: "VIRTIO_NET_F_HOST_TSO6",
        }
        .to_string();
        assert!(e.contains("0x04") && e.contains("HOST_TSO6"), "{e}");
        let e = HdrError::ExceedsMtu {
            len: 1600,
            mtu: 1500,
            max: 1518,
        }
        .to_string();
        assert!(
            e.contains("1600") && e.contains("1500") && e.contains("1518"),
            "{e}"
        );
    }

    #[test]
    fn no_header_from_a_driver_panics() {
        // Every flags/gso_type byte with extreme offsets and lengths.
        let lens = [
            0,
            13,
            14,
            60,
            1518,
            1519,
            MAX_FRAME_LEN,
            MAX_FRAME_LEN + 1,
            usize::MAX,
        ];
        for flags in 0..=255u8 {
            for gso_type in [0u8, 1, 3, 4, 5, 0x80, 0x81, 0xff] {
                for v in [0u16, 1, 0x7fff, u16::MAX] {
                    let h = VirtioNetHdr {
                        flags,
                        gso_type,
                        hdr_len: v,
                        gso_size: v,
                        csum_start: v,
                        csum_offset: v,
                        num_buffers: v,
                    };
                    for len in lens {
                        let _ = h.validate_tx(len, all_host(), u16::MAX);
                        let _ = h.validate_tx(len, VirtioFeatures::empty(), 68);
                    }
                }
            }
        }
    }
}
