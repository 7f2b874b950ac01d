//! virtio-blk requests (virtio 1.2 §5.2.6): parsing a chain into a [`Request`] and mapping
//! failures to a status byte. Parsing reads only the header and the discard/write-zeroes
//! segment table, checks every length and sector range, and touches no backend; execution
//! ([`super::queue`]) comes second.
//!
//! A request is `struct virtio_blk_req`: a 16-byte header `{type, reserved, sector}` at the
//! start of the device-readable part, then the data (readable for writes, writable for
//! reads), then a status byte, the last byte of the device-writable part.

use std::io;

use thiserror::Error;
use uvdpa_virtio::DescriptorChain;

use super::{BlkFeatures, MAX_ZERO_SECTORS, MAX_ZERO_SEGMENTS, SECTOR_SIZE};

/// VIRTIO_BLK_T_IN: read sectors into the writable buffers.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// VIRTIO_BLK_T_OUT: write sectors from the readable buffers.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// VIRTIO_BLK_T_FLUSH: make completed writes durable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// VIRTIO_BLK_T_GET_ID: read the device ID string (serial), at most 20 bytes.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// VIRTIO_BLK_T_DISCARD: discard sector ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// VIRTIO_BLK_T_WRITE_ZEROES: zero sector ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// VIRTIO_BLK_S_OK: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// VIRTIO_BLK_S_IOERR: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// VIRTIO_BLK_S_UNSUPP: the request type or a flag is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes of the request header (`type`, `reserved`, `sector`).
pub(crate) const HEADER_LEN: usize = 16;
/// Bytes of one discard/write-zeroes segment (`sector`, `num_sectors`, `flags`).
pub(crate) const ZERO_SEGMENT_LEN: usize = 16;
/// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: the device may deallocate the zeroed range.
pub(crate) const FLAG_UNMAP: u32 = 1;

// Chain lengths are u32; every target we build for has a usize of at least 32 bits.
const _: () = assert!(usize::BITS >= 32);

/// What a queue's requests are checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Disk capacity in bytes.
    pub(crate) capacity: u64,
    /// Writes fail with IOERR.
    pub(crate) read_only: bool,
    /// Device features the driver accepted.
    pub(crate) features: BlkFeatures,
    /// Alignment O_DIRECT needs for offsets and lengths, if the backend uses it.
    pub(crate) direct_align: Option<usize>,
}

/// A parsed, validated request. Byte offsets and lengths are within the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    /// Read `len` bytes at `offset` into the writable part (before the status byte).
    In {
        /// Disk byte offset.
        offset: u64,
        /// Bytes to read.
        len: usize,
    },
    /// Write `len` bytes at `offset` from the readable part (after the header).
    Out {
        /// Disk byte offset.
        offset: u64,
        /// Bytes to write.
        len: usize,
    },
    /// Flush the backend.
    Flush,
    /// Write the serial into the first `len` writable bytes (up to 20).
    GetId {
        /// Writable bytes before the status byte.
        len: usize,
    },
    /// Discard `count` ranges from the segment table.
    Discard {
        /// Segments in the table.
        count: usize,
    },
    /// Zero `count` ranges from the segment table.
    WriteZeroes {
        /// Segments in the table.
        count: usize,
    },
}

/// One checked discard/write-zeroes range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ZeroRange {
    /// Disk byte offset.
    pub(crate) offset: u64,
    /// Length in bytes.
    pub(crate) len: u64,
    /// The driver allows deallocation (write-zeroes only).
    pub(crate) unmap: bool,
}

/// Why a request failed; [`status`] turns it into the status byte.
#[derive(Debug, Error)]
pub(crate) enum RequestError {
    /// Fewer than 16 readable bytes.
    #[error("Request header is {len} bytes, shorter than {HEADER_LEN}")]
    ShortHeader {
        /// Readable bytes in the chain.
        len: u32,
    },
    /// A request type this device does not implement or did not negotiate.
    #[error("Unsupported request type {0}")]
    Unsupported(u32),
    /// The data length is not a whole number of sectors.
    #[error("Data length {len} is not a multiple of {SECTOR_SIZE}")]
    PartialSector {
        /// Data bytes in the chain.
        len: usize,
    },
    /// The range goes past the end of the disk (or overflows).
    #[error("Sector {sector} + {len} bytes is past the end of the disk ({capacity} bytes)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// Disk capacity in bytes.
        capacity: u64,
    },
    /// A write-type request on a read-only device.
    #[error("Write-type request {0} on a read-only device")]
    ReadOnly(u32),
    /// An O_DIRECT backend got an offset or length it cannot transfer.
    #[error("Offset {offset} or length {len} is not aligned to {align} bytes for O_DIRECT")]
    Unaligned {
        /// Disk byte offset.
        offset: u64,
        /// Length in bytes.
        len: usize,
        /// Required alignment.
        align: usize,
    },
    /// The discard/write-zeroes table is empty or not a whole number of segments.
    #[error("Segment table of {len} bytes is not a non-empty multiple of {ZERO_SEGMENT_LEN}")]
    BadSegmentTable {
        /// Table bytes in the chain.
        len: usize,
    },
    /// More discard/write-zeroes segments than the config space allows.
    #[error("{count} segments in one request, at most {MAX_ZERO_SEGMENTS}")]
    TooManySegments {
        /// Segments in the request.
        count: usize,
    },
    /// A discard/write-zeroes segment larger than the config space allows.
    #[error("Segment of {sectors} sectors, at most {MAX_ZERO_SECTORS}")]
    SegmentTooLarge {
        /// Sectors in the segment.
        sectors: u32,
    },
    /// Unknown flags, or unmap on a discard (§5.2.6.2: UNSUPP).
    #[error("Unsupported segment flags {0:#x}")]
    UnsupportedFlags(u32),
    /// The backend failed.
    #[error("Backend I/O failed: {0}")]
    Io(io::Error),
}

/// The status byte for a failed request: UNSUPP for what the device does not implement,
/// IOERR for everything else (as QEMU does, a write to a read-only disk is IOERR).
pub(crate) fn status(err: &RequestError) -> u8 {
    match err {
        RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP,
        RequestError::ShortHeader { .. }
        | RequestError::PartialSector { .. }
        | RequestError::OutOfRange { .. }
        | RequestError::ReadOnly(_)
        | RequestError::Unaligned { .. }
        | RequestError::BadSegmentTable { .. }
        | RequestError::TooManySegments { .. }
        | RequestError::SegmentTooLarge { .. }
        | RequestError::Io(_) => VIRTIO_BLK_S_IOERR,
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(src) = b.get(at..at + 4) {
        v.copy_from_slice(src);
    }
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(src) = b.get(at..at + 8) {
        v.copy_from_slice(src);
    }
    u64::from_le_bytes(v)
}

/// Checks `len` bytes at `sector` against the capacity; returns the byte offset.
fn disk_range(sector: u64, len: u64, capacity: u64) -> Result<u64, RequestError> {
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|offset| offset.checked_add(len).is_some_and(|end| end <= capacity))
        .ok_or(RequestError::OutOfRange {
            sector,
            len,
            capacity,
        })
}

/// Checks a read or write's data length and range.
fn data_range(sector: u64, len: usize, limits: &Limits) -> Result<u64, RequestError> {
    if len as u64 % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector { len });
    }
    let offset = disk_range(sector, len as u64, limits.capacity)?;
    if let Some(align) = limits.direct_align {
        if offset % align as u64 != 0 || len % align != 0 {
            return Err(RequestError::Unaligned { offset, len, align });
        }
    }
    Ok(offset)
}

/// Parses and validates the request in `chain`, whose writable part holds at least the
/// status byte.
pub(crate) fn parse(chain: &DescriptorChain, limits: &Limits) -> Result<Request, RequestError> {
    let mut hdr = [0u8; HEADER_LEN];
    if chain.read_at(0, &mut hdr) < HEADER_LEN {
        return Err(RequestError::ShortHeader {
            len: chain.readable_len(),
        });
    }
    let ty = le_u32(&hdr, 0);
    let sector = le_u64(&hdr, 8);
    // Both subtractions are safe: the header is readable and a status byte is writable.
    let readable_data = (chain.readable_len() as usize).saturating_sub(HEADER_LEN);
    let writable_data = (chain.writable_len() as usize).saturating_sub(1);
    match ty {
        VIRTIO_BLK_T_IN => {
            let len = writable_data;
            let offset = data_range(sector, len, limits)?;
            Ok(Request::In { offset, len })
        }
        VIRTIO_BLK_T_OUT => {
            if limits.read_only {
                return Err(RequestError::ReadOnly(ty));
            }
            let len = readable_data;
            let offset = data_range(sector, len, limits)?;
            Ok(Request::Out { offset, len })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => Ok(Request::GetId { len: writable_data }),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let write_zeroes = ty == VIRTIO_BLK_T_WRITE_ZEROES;
            let feature = if write_zeroes {
                BlkFeatures::VIRTIO_BLK_F_WRITE_ZEROES
            } else {
                BlkFeatures::VIRTIO_BLK_F_DISCARD
            };
            if !limits.features.contains(feature) {
                return Err(RequestError::Unsupported(ty));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly(ty));
            }
            let len = readable_data;
            if len == 0 || len % ZERO_SEGMENT_LEN != 0 {
                return Err(RequestError::BadSegmentTable { len });
            }
            let count = len / ZERO_SEGMENT_LEN;
            if count > MAX_ZERO_SEGMENTS as usize {
                return Err(RequestError::TooManySegments { count });
            }
            // Check every segment before any is executed, so a bad one fails the whole
            // request without side effects.
            for i in 0..count {
                zero_segment(chain, i, write_zeroes, limits)?;
            }
            Ok(if write_zeroes {
                Request::WriteZeroes { count }
            } else {
                Request::Discard { count }
            })
        }
        _ => Err(RequestError::Unsupported(ty)),
    }
}

/// Reads and checks segment `index` of a discard/write-zeroes table (§5.2.6:
/// `{le64 sector; le32 num_sectors; le32 flags}`). Called by the parser, and again by the
/// executor since the driver may have changed the table in between.
pub(crate) fn zero_segment(
    chain: &DescriptorChain,
    index: usize,
    write_zeroes: bool,
    limits: &Limits,
) -> Result<ZeroRange, RequestError> {
    let mut raw = [0u8; ZERO_SEGMENT_LEN];
    let at = index
        .checked_mul(ZERO_SEGMENT_LEN)
        .and_then(|o| o.checked_add(HEADER_LEN));
    let got = at.map_or(0, |at| chain.read_at(at, &mut raw));
    if got < ZERO_SEGMENT_LEN {
        return Err(RequestError::BadSegmentTable { len: got });
    }
    let sector = le_u64(&raw, 0);
    let sectors = le_u32(&raw, 8);
    let flags = le_u32(&raw, 12);
    let allowed = if write_zeroes { FLAG_UNMAP } else { 0 };
    if flags & !allowed != 0 {
        return Err(RequestError::UnsupportedFlags(flags));
    }
    if sectors > MAX_ZERO_SECTORS {
        return Err(RequestError::SegmentTooLarge { sectors });
    }
    let len = u64::from(sectors) * SECTOR_SIZE;
    let offset = disk_range(sector, len, limits.capacity)?;
    Ok(ZeroRange {
        offset,
        len,
        unmap: flags & FLAG_UNMAP != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use uvdpa_virtio::Segment;

    fn limits() -> Limits {
        Limits {
            capacity: 8 * SECTOR_SIZE,
            read_only: false,
            features: BlkFeatures::all(),
            direct_align: None,
        }
    }

    fn seg(b: &mut [u8]) -> Segment {
        Segment {
            base: b.as_mut_ptr(),
            len: b.len(),
        }
    }

    fn header(ty: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    #[test]
    fn read_and_write_ranges() {
        let mut hdr = header(VIRTIO_BLK_T_IN, 6);
        let mut data = [0u8; 1024];
        let mut status = [0u8; 1];
        // SAFETY: the segments point into buffers that outlive the chain.
        let c = unsafe {
            DescriptorChain::from_segments(
                0,
                vec![seg(&mut hdr)],
                vec![seg(&mut data), seg(&mut status)],
            )
        };
        assert_eq!(
            parse(&c, &limits()).unwrap(),
            Request::In {
                offset: 3072,
                len: 1024
            }
        );
        let mut hdr = header(VIRTIO_BLK_T_IN, 7);
        // SAFETY: the segments point into buffers that outlive the chain.
        let c = unsafe {
            DescriptorChain::from_segments(
                0,
                vec![seg(&mut hdr)],
                vec![seg(&mut data), seg(&mut status)],
            )
        };
        assert!(matches!(
            parse(&c, &limits()),
            Err(RequestError::OutOfRange { sector: 7, .. })
        ));
    }

    #[test]
    fn sector_multiplication_overflow_is_out_of_range() {
        assert!(matches!(
            disk_range(u64::MAX / 256, 512, u64::MAX),
            Err(RequestError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk_range(u64::MAX / 512, 512, u64::MAX),
            Err(RequestError::OutOfRange { .. })
        ));
    }

    #[test]
    fn direct_alignment_is_checked() {
        let l = Limits {
            direct_align: Some(4096),
            capacity: 1 << 20,
            ..limits()
        };
        assert!(data_range(8, 4096, &l).is_ok());
        assert!(matches!(
            data_range(1, 4096, &l),
            Err(RequestError::Unaligned { .. })
        ));
        assert!(matches!(
            data_range(8, 512, &l),
            Err(RequestError::Unaligned { .. })
        ));
    }

    #[test]
    fn status_mapping() {
        assert_eq!(status(&RequestError::Unsupported(3)), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(
            status(&RequestError::UnsupportedFlags(2)),
            VIRTIO_BLK_S_UNSUPP
        );
        assert_eq!(status(&RequestError::ReadOnly(1)), VIRTIO_BLK_S_IOERR);
        assert_eq!(
            status(&RequestError::Io(io::Error::other("x"))),
            VIRTIO_BLK_S_IOERR
        );
    }
}
