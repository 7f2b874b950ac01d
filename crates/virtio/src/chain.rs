//! Descriptor chains, validated whole before a device sees them (virtio 1.2 §2.7.5,
//! §2.7.5.3 for split rings; §2.8.6, §2.8.7 for packed rings).
//!
//! A chain is walked once, up front: every descriptor index is checked against its table,
//! every buffer is translated into host pieces with a bounds check, the total length is
//! checked for overflow, a chain longer than its table (or ring) is a loop, an indirect
//! descriptor inside an indirect table is refused, and a device-readable descriptor after a
//! device-writable one is refused. In a packed ring every chained descriptor must also be
//! available under the wrap counter of its slot. Only then does the device get host
//! buffers.

use thiserror::Error;

use crate::memory::{GuestMemory, MemoryError};

/// VIRTQ_DESC_F_NEXT: the chain continues in `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE: the buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// VIRTQ_DESC_F_INDIRECT: the buffer holds a table of descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// VIRTQ_DESC_F_AVAIL (packed rings, §2.8.1): equal to the driver's wrap counter when it
/// made the descriptor available.
pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
/// VIRTQ_DESC_F_USED (packed rings, §2.8.1): unequal to the driver's wrap counter in an
/// available descriptor, equal to the device's wrap counter in a used one.
pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;
/// Size in bytes of one descriptor: split (`struct virtq_desc`) and packed
/// (`struct pvirtq_desc`) alike.
pub const DESC_SIZE: u64 = 16;

/// Entries an indirect table may hold whatever the ring size: a table is accepted up to
/// `max(ring size, INDIRECT_TABLE_MAX)` entries.
///
/// Virtio 1.2 §2.7.5.3.1 and §2.8.7 bound a chain by the queue size, but drivers size
/// indirect tables by what the device advertises instead: Linux's virtio_blk builds
/// tables of `seg_max + 2` entries whatever ring size the frontend chose, and QEMU's own
/// devices accept up to 1024 descriptors per chain (`VIRTQUEUE_MAX_SIZE`) on any ring. A
/// device that advertises a limit (virtio-blk `seg_max`) keeps it at most
/// `INDIRECT_TABLE_MAX - 2`, so every table a driver builds from it is accepted on every
/// ring size. The bound still stops loops and unbounded work: a table is walked once.
pub const INDIRECT_TABLE_MAX: u32 = 1024;

/// Most entries an indirect table may hold in a ring of `ring_len` descriptors
/// (see [`INDIRECT_TABLE_MAX`]).
pub fn indirect_table_max(ring_len: u16) -> u32 {
    u32::from(ring_len).max(INDIRECT_TABLE_MAX)
}

/// What was wrong with a descriptor chain. The head index is reported beside it by the
/// queue ([`crate::split::QueueError::Chain`]).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor index (head or `next`) is past the end of its table.
    #[error("Descriptor index {index} is outside its table of {table_len}")]
    IndexOutOfRange {
        /// The offending index.
        index: u16,
        /// Entries in the table it indexes.
        table_len: u32,
    },
    /// The chain visits more descriptors than its table holds: a loop.
    #[error("Descriptor chain longer than its table of {table_len} (a loop)")]
    TooLong {
        /// Entries in the table.
        table_len: u32,
    },
    /// A buffer or indirect table is not inside guest memory.
    #[error("Descriptor buffer is outside guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// The chain's total length overflows 32 bits.
    #[error("Descriptor chain total length overflows 32 bits")]
    LengthOverflow,
    /// An indirect descriptor inside an indirect table (§2.7.5.3.1).
    #[error("Indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// INDIRECT used without VIRTIO_RING_F_INDIRECT_DESC negotiated.
    #[error("Indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// INDIRECT and NEXT both set (§2.7.5.3.1).
    #[error("Descriptor sets both INDIRECT and NEXT")]
    IndirectWithNext,
    /// An indirect table whose length is 0, not a multiple of 16, or has more entries
    /// than [`indirect_table_max`] allows.
    #[error("Indirect table length {len} is invalid (multiple of 16, 1..={max} entries)")]
    IndirectBadLength {
        /// Length in bytes.
        len: u32,
        /// Most entries allowed.
        max: u32,
    },
    /// A device-readable descriptor follows a device-writable one (§2.7.4.2).
    #[error("Device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Packed ring: a descriptor of the chain (after its head, which the driver publishes
    /// last) is not available under the wrap counter of its slot (§2.8.6).
    #[error("Chained descriptor at ring slot {slot} is not available")]
    Unavailable {
        /// The ring slot of the descriptor.
        slot: u16,
    },
}

/// One host buffer piece of a chain. Layout-compatible with `struct iovec`, so a slice of
/// segments can be handed to `preadv`/`pwritev` as is.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// Host address of the first byte (inside a guest memory mapping).
    pub base: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a segment is an address range inside guest memory mapped for the whole process;
// it carries no thread affinity. Dereferencing it is done by its users under their own
// SAFETY arguments.
unsafe impl Send for Segment {}

/// A validated descriptor chain: its head index (split) or buffer ID (packed), the ring
/// slots it occupies, and its device-readable then device-writable host buffers. Reused
/// between requests so the data path allocates nothing once warm.
#[derive(Debug, Default)]
pub struct DescriptorChain {
    head: u16,
    desc_count: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: u32,
    writable_len: u32,
    /// Packed ring with inflight tracking: the entry of the inflight region holding this
    /// chain (set by the queue that popped it, read back when it is completed).
    inflight: Option<u16>,
}

/// A raw split-ring descriptor as read from guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Copies the 16 bytes of descriptor `index` of the table at host address `table`.
///
/// # Safety
/// `table` must point to at least `index + 1` descriptors of mapped memory.
unsafe fn read_raw(table: *const u8, index: u16) -> [u8; DESC_SIZE as usize] {
    // SAFETY: the caller guarantees the 16 bytes at this offset are mapped; one volatile
    // read of a byte array (alignment 1, so any address) tolerates concurrent writes by
    // the driver and compiles to one or two loads instead of sixteen.
    unsafe {
        let src = table.add(usize::from(index) * DESC_SIZE as usize);
        std::ptr::read_volatile(src as *const [u8; DESC_SIZE as usize])
    }
}

fn le64(raw: &[u8; DESC_SIZE as usize]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&raw[0..8]);
    u64::from_le_bytes(b)
}

impl RawDesc {
    /// Reads descriptor `index` of the table at host address `table`.
    ///
    /// # Safety
    /// `table` must point to at least `index + 1` descriptors of mapped memory.
    pub(crate) unsafe fn read(table: *const u8, index: u16) -> Self {
        // SAFETY: forwarded from the caller.
        let raw = unsafe { read_raw(table, index) };
        Self {
            addr: le64(&raw),
            len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        }
    }
}

/// A raw packed-ring descriptor (`struct pvirtq_desc`) as read from guest memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawPackedDesc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

impl RawPackedDesc {
    /// Reads descriptor `index` of the ring or indirect table at host address `table`.
    ///
    /// # Safety
    /// `table` must point to at least `index + 1` descriptors of mapped memory.
    pub(crate) unsafe fn read(table: *const u8, index: u16) -> Self {
        // SAFETY: forwarded from the caller.
        let raw = unsafe { read_raw(table, index) };
        Self {
            addr: le64(&raw),
            len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            id: u16::from_le_bytes([raw[12], raw[13]]),
            flags: u16::from_le_bytes([raw[14], raw[15]]),
        }
    }
}

/// Whether packed-ring descriptor `flags` mark it available under driver wrap counter
/// `wrap` (§2.8.1): AVAIL equals the wrap counter and USED differs from it.
pub(crate) fn packed_available(flags: u16, wrap: bool) -> bool {
    (flags & VIRTQ_DESC_F_AVAIL != 0) == wrap && (flags & VIRTQ_DESC_F_USED != 0) != wrap
}

impl DescriptorChain {
    /// The id to return in the used ring: the head descriptor index (split ring) or the
    /// buffer ID, taken from the chain's last ring descriptor (packed ring, §2.8.6).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Descriptor ring slots the chain occupies. Packed ring: the slots it consumed (1 for
    /// an indirect chain), which the device skips when it writes the used entry. Split
    /// ring: the descriptors walked in the main table (informational).
    pub fn desc_count(&self) -> u16 {
        self.desc_count
    }

    /// Device-readable buffers, in chain order.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// Device-writable buffers, in chain order.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// Copies up to `buf.len()` bytes from the readable part starting at byte `offset`;
    /// returns how many were copied.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        copy_segments(&self.readable, offset, buf.len(), |seg_ptr, done, n| {
            // SAFETY: `seg_ptr..+n` is inside a validated segment of live guest memory and
            // `buf` has room for `done + n` bytes.
            unsafe { std::ptr::copy_nonoverlapping(seg_ptr, buf.as_mut_ptr().add(done), n) }
        })
    }

    /// Copies `data` into the writable part starting at byte `offset`; returns how many
    /// bytes fit.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> usize {
        copy_segments(&self.writable, offset, data.len(), |seg_ptr, done, n| {
            // SAFETY: as in `read_at`, with the copy direction reversed.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(done), seg_ptr, n) }
        })
    }

    /// Walks and validates the chain starting at `head` of the descriptor table at host
    /// address `table` with `table_len` entries, filling `self`.
    ///
    /// # Safety
    /// `table` must point to `table_len` descriptors of mapped memory that stays mapped
    /// while `mem` is alive.
    pub(crate) unsafe fn parse_split(
        &mut self,
        mem: &GuestMemory,
        table: *const u8,
        table_len: u16,
        head: u16,
        indirect_allowed: bool,
    ) -> Result<(), ChainError> {
        self.reset(head);

        let (mut tbl, mut tbl_len) = (table, u32::from(table_len));
        let mut in_indirect = false;
        let mut seen_writable = false;
        let mut index = head;
        let mut visited = 0u32;
        loop {
            if u32::from(index) >= tbl_len {
                return Err(ChainError::IndexOutOfRange {
                    index,
                    table_len: tbl_len,
                });
            }
            visited += 1;
            if visited > tbl_len {
                return Err(ChainError::TooLong { table_len: tbl_len });
            }
            // SAFETY: index < tbl_len entries of a table that the caller (main table) or
            // the translation below (indirect table) proved mapped.
            let desc = unsafe { RawDesc::read(tbl, index) };
            if !in_indirect {
                // visited <= table_len <= u16::MAX here.
                self.desc_count = self.desc_count.saturating_add(1);
            }
            if desc.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if in_indirect {
                    return Err(ChainError::NestedIndirect);
                }
                if !indirect_allowed {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if desc.flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext);
                }
                let max = indirect_table_max(table_len);
                let entries = desc.len / DESC_SIZE as u32;
                if desc.len == 0 || desc.len % DESC_SIZE as u32 != 0 || entries > max {
                    return Err(ChainError::IndirectBadLength { len: desc.len, max });
                }
                tbl = mem.translate(desc.addr, u64::from(desc.len))?;
                tbl_len = entries;
                in_indirect = true;
                index = 0;
                visited = 0;
                continue;
            }
            let writable = desc.flags & VIRTQ_DESC_F_WRITE != 0;
            self.push_buffer(mem, desc.addr, desc.len, writable, &mut seen_writable)?;
            if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            index = desc.next;
        }
    }

    /// Empties the chain for a new walk.
    fn reset(&mut self, head: u16) {
        self.head = head;
        self.desc_count = 0;
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        self.inflight = None;
    }

    /// The inflight region entry recorded for this chain (packed ring).
    pub(crate) fn inflight_entry(&self) -> Option<u16> {
        self.inflight
    }

    /// Records the inflight region entry holding this chain (packed ring).
    pub(crate) fn set_inflight_entry(&mut self, entry: Option<u16>) {
        self.inflight = entry;
    }

    /// Adds one buffer to the chain: ordering (§2.7.4.2, §2.8.4), length overflow, and
    /// translation into host segments.
    fn push_buffer(
        &mut self,
        mem: &GuestMemory,
        addr: u64,
        len: u32,
        writable: bool,
        seen_writable: &mut bool,
    ) -> Result<(), ChainError> {
        if writable {
            *seen_writable = true;
            self.writable_len = self
                .writable_len
                .checked_add(len)
                .ok_or(ChainError::LengthOverflow)?;
        } else {
            // §2.7.4.2 orders descriptors whatever their length.
            if *seen_writable {
                return Err(ChainError::ReadableAfterWritable);
            }
            self.readable_len = self
                .readable_len
                .checked_add(len)
                .ok_or(ChainError::LengthOverflow)?;
        }
        self.readable_len
            .checked_add(self.writable_len)
            .ok_or(ChainError::LengthOverflow)?;
        let list = if writable {
            &mut self.writable
        } else {
            &mut self.readable
        };
        mem.for_each_piece(addr, u64::from(len), |base, len| {
            list.push(Segment {
                base,
                len: len as usize,
            })
        })?;
        Ok(())
    }

    /// Walks and validates the packed-ring chain whose head is at `slot` of the descriptor
    /// ring at host address `ring` with `ring_len` slots, the head being available under
    /// driver wrap counter `wrap`; fills `self`.
    ///
    /// The chain follows NEXT across consecutive slots, wrapping at the ring end (where the
    /// wrap counter toggles); every descriptor must be available under the wrap counter of
    /// its slot. The buffer ID comes from the last ring descriptor. An INDIRECT descriptor
    /// (without NEXT, so it ends the chain) points to a table of `len / 16` consecutive
    /// descriptors whose NEXT flags and IDs are ignored.
    ///
    /// [`DescriptorChain::desc_count`] is the number of ring slots read, also when an
    /// error is returned (at least 1): what the caller consumes.
    ///
    /// # Safety
    /// `ring` must point to `ring_len` descriptors of mapped memory that stays mapped while
    /// `mem` is alive, and `slot < ring_len`.
    pub(crate) unsafe fn parse_packed(
        &mut self,
        mem: &GuestMemory,
        ring: *const u8,
        ring_len: u16,
        slot: u16,
        wrap: bool,
        indirect_allowed: bool,
    ) -> Result<(), ChainError> {
        self.reset(0);
        let (mut slot, mut wrap) = (slot, wrap);
        let mut seen_writable = false;
        loop {
            if self.desc_count >= ring_len {
                return Err(ChainError::TooLong {
                    table_len: u32::from(ring_len),
                });
            }
            // SAFETY: slot < ring_len (the caller's head, then kept in range by the wrap
            // below) in a ring the caller proved mapped.
            let desc = unsafe { RawPackedDesc::read(ring, slot) };
            self.desc_count += 1;
            if !packed_available(desc.flags, wrap) {
                return Err(ChainError::Unavailable { slot });
            }
            if desc.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !indirect_allowed {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if desc.flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext);
                }
                let max = indirect_table_max(ring_len);
                let entries = desc.len / DESC_SIZE as u32;
                if desc.len == 0 || desc.len % DESC_SIZE as u32 != 0 || entries > max {
                    return Err(ChainError::IndirectBadLength { len: desc.len, max });
                }
                let table = mem.translate(desc.addr, u64::from(desc.len))?;
                // entries <= max(ring_len, 1024) <= u16::MAX.
                for index in 0..entries as u16 {
                    // SAFETY: index < entries, and the table's len = 16·entries bytes were
                    // translated above into live guest memory.
                    let e = unsafe { RawPackedDesc::read(table, index) };
                    if e.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                        return Err(ChainError::NestedIndirect);
                    }
                    let writable = e.flags & VIRTQ_DESC_F_WRITE != 0;
                    self.push_buffer(mem, e.addr, e.len, writable, &mut seen_writable)?;
                }
                self.head = desc.id;
                return Ok(());
            }
            let writable = desc.flags & VIRTQ_DESC_F_WRITE != 0;
            self.push_buffer(mem, desc.addr, desc.len, writable, &mut seen_writable)?;
            if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
                self.head = desc.id;
                return Ok(());
            }
            slot += 1;
            if slot >= ring_len {
                slot = 0;
                wrap = !wrap;
            }
        }
    }

    /// Builds a chain from already-translated segments (for device tests).
    ///
    /// # Safety
    /// Every segment must describe memory that is valid for reads (readable) or writes
    /// (writable) of its whole length for as long as the chain is used: `read_at`,
    /// `write_at` and devices dereference them.
    pub unsafe fn from_segments(head: u16, readable: Vec<Segment>, writable: Vec<Segment>) -> Self {
        let sum = |v: &[Segment]| v.iter().map(|s| s.len as u32).sum();
        Self {
            head,
            desc_count: 1,
            readable_len: sum(&readable),
            writable_len: sum(&writable),
            readable,
            writable,
            inflight: None,
        }
    }
}

/// Copies across segments starting at a byte offset; `copy(seg_ptr, done, n)` moves `n`
/// bytes between the segment at `seg_ptr` and the caller's buffer at offset `done`.
fn copy_segments(
    segs: &[Segment],
    mut offset: usize,
    len: usize,
    mut copy: impl FnMut(*mut u8, usize, usize),
) -> usize {
    let mut done = 0;
    for s in segs {
        if done == len {
            break;
        }
        if offset >= s.len {
            offset -= s.len;
            continue;
        }
        let n = (s.len - offset).min(len - done);
        copy(s.base.wrapping_add(offset), done, n);
        done += n;
        offset = 0;
    }
    done
}
