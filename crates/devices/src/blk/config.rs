//! The virtio-blk configuration space, `struct virtio_blk_config` (virtio 1.2 §5.2.4), up
//! to and including `write_zeroes_may_unmap` and its padding: 60 bytes, little-endian.
//!
//! The structs below mirror the spec field for field (`#[repr(C, packed)]`, so their layout
//! *is* the wire layout and the tests check every offset); fields hold native integers and
//! [`VirtioBlkConfig::to_le_bytes`] encodes them at their own offsets, so no byte is
//! reinterpreted through `unsafe`.

use std::mem::{offset_of, size_of};

/// `struct virtio_blk_geometry` (valid with VIRTIO_BLK_F_GEOMETRY).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioBlkGeometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

/// `struct virtio_blk_topology` (valid with VIRTIO_BLK_F_TOPOLOGY).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioBlkTopology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    pub opt_io_size: u32,
}

/// `struct virtio_blk_config` through `write_zeroes_may_unmap` (virtio 1.2 §5.2.4).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioBlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest size of one segment (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Most segments in one request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Disk geometry (VIRTIO_BLK_F_GEOMETRY).
    pub geometry: VirtioBlkGeometry,
    /// Logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// I/O topology (VIRTIO_BLK_F_TOPOLOGY).
    pub topology: VirtioBlkTopology,
    /// 1 for a writeback cache, 0 for writethrough (VIRTIO_BLK_F_CONFIG_WCE).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Most sectors in one discard segment (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: u32,
    /// Most segments in one discard request.
    pub max_discard_seg: u32,
    /// Alignment of discard ranges, in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors in one write-zeroes segment (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// 1 if write-zeroes with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

/// Bytes of [`VirtioBlkConfig`] on the wire.
pub const VIRTIO_BLK_CONFIG_SIZE: usize = size_of::<VirtioBlkConfig>();

const GEOMETRY: usize = offset_of!(VirtioBlkConfig, geometry);
const TOPOLOGY: usize = offset_of!(VirtioBlkConfig, topology);

/// A little-endian field: where it sits and how it encodes.
trait Le: Sized {
    const N: usize;
    fn put(self, out: &mut [u8]);
    fn get(bytes: &[u8]) -> Option<Self>;
}

macro_rules! le {
    ($($t:ty),*) => {$(
        impl Le for $t {
            const N: usize = size_of::<$t>();
            fn put(self, out: &mut [u8]) {
                if let Some(dst) = out.get_mut(..Self::N) {
                    dst.copy_from_slice(&self.to_le_bytes());
                }
            }
            fn get(bytes: &[u8]) -> Option<Self> {
                Some(<$t>::from_le_bytes(bytes.get(..Self::N)?.try_into().ok()?))
            }
        }
    )*};
}
le!(u8, u16, u32, u64);

fn put<T: Le>(buf: &mut [u8], at: usize, v: T) {
    if let Some(dst) = buf.get_mut(at..) {
        v.put(dst);
    }
}

fn get<T: Le>(buf: &[u8], at: usize) -> Option<T> {
    T::get(buf.get(at..)?)
}

impl VirtioBlkConfig {
    /// The config space as the driver reads it.
    pub fn to_le_bytes(&self) -> [u8; VIRTIO_BLK_CONFIG_SIZE] {
        let mut b = [0u8; VIRTIO_BLK_CONFIG_SIZE];
        let (g, t) = (self.geometry, self.topology);
        put(&mut b, offset_of!(Self, capacity), self.capacity);
        put(&mut b, offset_of!(Self, size_max), self.size_max);
        put(&mut b, offset_of!(Self, seg_max), self.seg_max);
        put(
            &mut b,
            GEOMETRY + offset_of!(VirtioBlkGeometry, cylinders),
            g.cylinders,
        );
        put(
            &mut b,
            GEOMETRY + offset_of!(VirtioBlkGeometry, heads),
            g.heads,
        );
        put(
            &mut b,
            GEOMETRY + offset_of!(VirtioBlkGeometry, sectors),
            g.sectors,
        );
        put(&mut b, offset_of!(Self, blk_size), self.blk_size);
        put(
            &mut b,
            TOPOLOGY + offset_of!(VirtioBlkTopology, physical_block_exp),
            t.physical_block_exp,
        );
        put(
            &mut b,
            TOPOLOGY + offset_of!(VirtioBlkTopology, alignment_offset),
            t.alignment_offset,
        );
        put(
            &mut b,
            TOPOLOGY + offset_of!(VirtioBlkTopology, min_io_size),
            t.min_io_size,
        );
        put(
            &mut b,
            TOPOLOGY + offset_of!(VirtioBlkTopology, opt_io_size),
            t.opt_io_size,
        );
        put(&mut b, offset_of!(Self, writeback), self.writeback);
        put(&mut b, offset_of!(Self, num_queues), self.num_queues);
        put(
            &mut b,
            offset_of!(Self, max_discard_sectors),
            self.max_discard_sectors,
        );
        put(
            &mut b,
            offset_of!(Self, max_discard_seg),
            self.max_discard_seg,
        );
        put(
            &mut b,
            offset_of!(Self, discard_sector_alignment),
            self.discard_sector_alignment,
        );
        put(
            &mut b,
            offset_of!(Self, max_write_zeroes_sectors),
            self.max_write_zeroes_sectors,
        );
        put(
            &mut b,
            offset_of!(Self, max_write_zeroes_seg),
            self.max_write_zeroes_seg,
        );
        put(
            &mut b,
            offset_of!(Self, write_zeroes_may_unmap),
            self.write_zeroes_may_unmap,
        );
        b
    }

    /// Decodes a config space read from a device (tools, `dev config show`); `None` if
    /// `bytes` is shorter than [`VIRTIO_BLK_CONFIG_SIZE`]. Padding is read as zero.
    pub fn from_le_bytes(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..VIRTIO_BLK_CONFIG_SIZE)?;
        Some(Self {
            capacity: get(b, offset_of!(Self, capacity))?,
            size_max: get(b, offset_of!(Self, size_max))?,
            seg_max: get(b, offset_of!(Self, seg_max))?,
            geometry: VirtioBlkGeometry {
                cylinders: get(b, GEOMETRY + offset_of!(VirtioBlkGeometry, cylinders))?,
                heads: get(b, GEOMETRY + offset_of!(VirtioBlkGeometry, heads))?,
                sectors: get(b, GEOMETRY + offset_of!(VirtioBlkGeometry, sectors))?,
            },
            blk_size: get(b, offset_of!(Self, blk_size))?,
            topology: VirtioBlkTopology {
                physical_block_exp: get(
                    b,
                    TOPOLOGY + offset_of!(VirtioBlkTopology, physical_block_exp),
                )?,
                alignment_offset: get(
                    b,
                    TOPOLOGY + offset_of!(VirtioBlkTopology, alignment_offset),
                )?,
                min_io_size: get(b, TOPOLOGY + offset_of!(VirtioBlkTopology, min_io_size))?,
                opt_io_size: get(b, TOPOLOGY + offset_of!(VirtioBlkTopology, opt_io_size))?,
            },
            writeback: get(b, offset_of!(Self, writeback))?,
            unused0: 0,
            num_queues: get(b, offset_of!(Self, num_queues))?,
            max_discard_sectors: get(b, offset_of!(Self, max_discard_sectors))?,
            max_discard_seg: get(b, offset_of!(Self, max_discard_seg))?,
            discard_sector_alignment: get(b, offset_of!(Self, discard_sector_alignment))?,
            max_write_zeroes_sectors: get(b, offset_of!(Self, max_write_zeroes_sectors))?,
            max_write_zeroes_seg: get(b, offset_of!(Self, max_write_zeroes_seg))?,
            write_zeroes_may_unmap: get(b, offset_of!(Self, write_zeroes_may_unmap))?,
            unused1: [0; 3],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_virtio_1_2_section_5_2_4() {
        assert_eq!(size_of::<VirtioBlkGeometry>(), 4);
        assert_eq!(offset_of!(VirtioBlkGeometry, cylinders), 0);
        assert_eq!(offset_of!(VirtioBlkGeometry, heads), 2);
        assert_eq!(offset_of!(VirtioBlkGeometry, sectors), 3);

        assert_eq!(size_of::<VirtioBlkTopology>(), 8);
        assert_eq!(offset_of!(VirtioBlkTopology, physical_block_exp), 0);
        assert_eq!(offset_of!(VirtioBlkTopology, alignment_offset), 1);
        assert_eq!(offset_of!(VirtioBlkTopology, min_io_size), 2);
        assert_eq!(offset_of!(VirtioBlkTopology, opt_io_size), 4);

        assert_eq!(VIRTIO_BLK_CONFIG_SIZE, 60);
        assert_eq!(offset_of!(VirtioBlkConfig, capacity), 0);
        assert_eq!(offset_of!(VirtioBlkConfig, size_max), 8);
        assert_eq!(offset_of!(VirtioBlkConfig, seg_max), 12);
        assert_eq!(offset_of!(VirtioBlkConfig, geometry), 16);
        assert_eq!(offset_of!(VirtioBlkConfig, blk_size), 20);
        assert_eq!(offset_of!(VirtioBlkConfig, topology), 24);
        assert_eq!(offset_of!(VirtioBlkConfig, writeback), 32);
        assert_eq!(offset_of!(VirtioBlkConfig, unused0), 33);
        assert_eq!(offset_of!(VirtioBlkConfig, num_queues), 34);
        assert_eq!(offset_of!(VirtioBlkConfig, max_discard_sectors), 36);
        assert_eq!(offset_of!(VirtioBlkConfig, max_discard_seg), 40);
        assert_eq!(offset_of!(VirtioBlkConfig, discard_sector_alignment), 44);
        assert_eq!(offset_of!(VirtioBlkConfig, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(VirtioBlkConfig, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(VirtioBlkConfig, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(VirtioBlkConfig, unused1), 57);
    }

    #[test]
    fn encodes_each_field_little_endian_at_its_offset() {
        let c = VirtioBlkConfig {
            capacity: 0x0102_0304_0506_0708,
            size_max: 0x1112_1314,
            seg_max: 0x2122_2324,
            geometry: VirtioBlkGeometry {
                cylinders: 0x3132,
                heads: 0x33,
                sectors: 0x34,
            },
            blk_size: 0x4142_4344,
            topology: VirtioBlkTopology {
                physical_block_exp: 0x51,
                alignment_offset: 0x52,
                min_io_size: 0x5354,
                opt_io_size: 0x5556_5758,
            },
            writeback: 0x61,
            unused0: 0xff,
            num_queues: 0x6263,
            max_discard_sectors: 0x7172_7374,
            max_discard_seg: 0x8182_8384,
            discard_sector_alignment: 0x9192_9394,
            max_write_zeroes_sectors: 0xa1a2_a3a4,
            max_write_zeroes_seg: 0xb1b2_b3b4,
            write_zeroes_may_unmap: 0xc1,
            unused1: [0xff; 3],
        };
        let b = c.to_le_bytes();
        let expect: [u8; 60] = [
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // capacity
            0x14, 0x13, 0x12, 0x11, // size_max
            0x24, 0x23, 0x22, 0x21, // seg_max
            0x32, 0x31, 0x33, 0x34, // geometry
            0x44, 0x43, 0x42, 0x41, // blk_size
            0x51, 0x52, 0x54, 0x53, 0x58, 0x57, 0x56, 0x55, // topology
            0x61, 0x00, // writeback, unused0 (padding is always zero)
            0x63, 0x62, // num_queues
            0x74, 0x73, 0x72, 0x71, // max_discard_sectors
            0x84, 0x83, 0x82, 0x81, // max_discard_seg
            0x94, 0x93, 0x92, 0x91, // discard_sector_alignment
            0xa4, 0xa3, 0xa2, 0xa1, // max_write_zeroes_sectors
            0xb4, 0xb3, 0xb2, 0xb1, // max_write_zeroes_seg
            0xc1, 0x00, 0x00, 0x00, // write_zeroes_may_unmap, unused1
        ];
        assert_eq!(b, expect);
        let back = VirtioBlkConfig::from_le_bytes(&b).unwrap();
        assert_eq!(
            back,
            VirtioBlkConfig {
                unused0: 0,
                unused1: [0; 3],
                ..c
            }
        );
        assert_eq!(VirtioBlkConfig::from_le_bytes(&b[..59]), None);
    }
}
