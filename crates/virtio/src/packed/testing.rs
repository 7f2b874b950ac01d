//! A driver-side view of a packed queue in guest memory, for tests and test frontends:
//! lays out the ring, makes chains available, reads used descriptors. It does no
//! validation of its own inputs on purpose, so tests can build hostile layouts.

use std::sync::atomic::{fence, Ordering};

use super::*;
use crate::chain::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

/// Driver side of a packed ring placed at fixed guest addresses.
#[derive(Debug)]
pub struct DriverQueue {
    /// Memory the ring lives in.
    pub mem: Arc<GuestMemory>,
    /// Queue size.
    pub size: u16,
    /// Descriptor ring address.
    pub desc: u64,
    /// Driver event suppression area address.
    pub driver_area: u64,
    /// Device event suppression area address.
    pub device_area: u64,
    /// Next slot the driver will make available.
    pub next_avail: u16,
    /// The driver's avail wrap counter.
    pub avail_wrap: bool,
    /// Next slot the driver will look at for a used descriptor.
    pub next_used: u16,
    /// The driver's used wrap counter.
    pub used_wrap: bool,
    /// Next buffer ID [`DriverQueue::add_chain`] hands out (`< size`).
    pub next_id: u16,
    /// Ring slots of the chain with each buffer ID (`< size`), to skip in `pop_used`.
    slots_of_id: Vec<u16>,
}

impl DriverQueue {
    /// A ring of `size` at `base`, the driver area right after it and the device area
    /// right after that; all zeroed (nothing available, notifications enabled).
    pub fn new(mem: Arc<GuestMemory>, base: u64, size: u16) -> Self {
        let ring = DESC_SIZE * u64::from(size);
        let q = Self {
            mem,
            size,
            desc: base,
            driver_area: base + ring,
            device_area: base + ring + 4,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            next_id: 0,
            slots_of_id: vec![1; usize::from(size)],
        };
        q.mem.write(base, &vec![0u8; ring as usize + 8]).unwrap();
        q
    }

    /// The config a device would receive for this ring (fresh: base `0x8000`).
    pub fn config(&self, event_idx: bool, indirect: bool) -> VringConfig {
        VringConfig {
            size: self.size,
            desc_addr: self.desc,
            avail_addr: self.driver_area,
            used_addr: self.device_area,
            next_avail: WRAP_BIT,
            event_idx,
            indirect,
            addrs_are_uaddr: false,
        }
    }

    /// AVAIL/USED bits that make a descriptor available under wrap counter `wrap`.
    pub fn avail_bits(wrap: bool) -> u16 {
        if wrap {
            VIRTQ_DESC_F_AVAIL
        } else {
            VIRTQ_DESC_F_USED
        }
    }

    /// Writes a raw 16-byte descriptor at guest address `at` (a ring slot or an
    /// indirect table entry); `flags` are written as given.
    pub fn write_raw(&self, at: u64, addr: u64, len: u32, id: u16, flags: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&id.to_le_bytes());
        d[14..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write(at, &d).unwrap();
    }

    /// Writes a raw descriptor at ring `slot`; `flags` are written as given (add
    /// [`DriverQueue::avail_bits`] to make it available).
    pub fn write_desc(&self, slot: u16, addr: u64, len: u32, id: u16, flags: u16) {
        self.write_raw(self.slot_addr(slot), addr, len, id, flags);
    }

    fn slot_addr(&self, slot: u16) -> u64 {
        self.desc + DESC_SIZE * u64::from(slot)
    }

    fn read_u16(&self, at: u64) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read(at, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    fn write_u16(&self, at: u64, v: u16) {
        self.mem.write(at, &v.to_le_bytes()).unwrap();
    }

    /// Makes `descs` (`(addr, len, id, flags)`, flags without AVAIL/USED) available at
    /// consecutive slots from the next avail slot, wrapping at the ring end with the
    /// wrap counter of each slot; the head's flags are written last, after a release
    /// fence. The chain's slot count is remembered under the last descriptor's ID.
    pub fn push_raw(&mut self, descs: &[(u64, u32, u16, u16)]) {
        let head = self.next_avail;
        let mut head_flags = 0;
        for (i, &(addr, len, id, flags)) in descs.iter().enumerate() {
            let f = flags | Self::avail_bits(self.avail_wrap);
            if i == 0 {
                // Body only: the slot keeps its old (not available) flags for now.
                let old = self.read_u16(self.slot_addr(head) + FLAGS_OFF as u64);
                self.write_desc(head, addr, len, id, old);
                head_flags = f;
            } else {
                self.write_desc(self.next_avail, addr, len, id, f);
            }
            self.next_avail += 1;
            if self.next_avail >= self.size {
                self.next_avail = 0;
                self.avail_wrap = !self.avail_wrap;
            }
        }
        if let Some(&(_, _, id, _)) = descs.last() {
            if let Some(n) = self.slots_of_id.get_mut(usize::from(id)) {
                *n = descs.len() as u16;
            }
            fence(Ordering::Release);
            self.write_u16(self.slot_addr(head) + FLAGS_OFF as u64, head_flags);
        }
    }

    fn take_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = (id + 1) % self.size;
        id
    }

    /// Makes a chain of `(addr, len, writable)` buffers available at consecutive slots;
    /// returns its buffer ID (set in every descriptor).
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let id = self.take_id();
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let next = if i + 1 < bufs.len() {
                    VIRTQ_DESC_F_NEXT
                } else {
                    0
                };
                let write = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                (addr, len, id, next | write)
            })
            .collect();
        self.push_raw(&descs);
        id
    }

    /// Writes `bufs` as a table of consecutive descriptors at guest address `table` and
    /// makes one INDIRECT descriptor pointing to it available; returns its buffer ID.
    pub fn add_indirect(&mut self, table: u64, bufs: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let write = if w { VIRTQ_DESC_F_WRITE } else { 0 };
            self.write_raw(table + DESC_SIZE * i as u64, addr, len, 0, write);
        }
        let id = self.take_id();
        let len = (DESC_SIZE as usize * bufs.len()) as u32;
        self.push_raw(&[(table, len, id, VIRTQ_DESC_F_INDIRECT)]);
        id
    }

    /// Returns the next used descriptor `(id, len)`, if the device published one, and
    /// skips the slots of that buffer's chain.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let at = self.slot_addr(self.next_used);
        let flags = self.read_u16(at + FLAGS_OFF as u64);
        let avail = flags & VIRTQ_DESC_F_AVAIL != 0;
        let used = flags & VIRTQ_DESC_F_USED != 0;
        if avail != self.used_wrap || used != self.used_wrap {
            return None;
        }
        fence(Ordering::Acquire);
        let id = self.read_u16(at + ID_OFF as u64);
        let mut b = [0u8; 4];
        self.mem.read(at + LEN_OFF as u64, &mut b).unwrap();
        let n = self
            .slots_of_id
            .get(usize::from(id))
            .copied()
            .unwrap_or(1)
            .clamp(1, self.size);
        let next = u32::from(self.next_used) + u32::from(n);
        if next >= u32::from(self.size) {
            self.next_used = (next - u32::from(self.size)) as u16;
            self.used_wrap = !self.used_wrap;
        } else {
            self.next_used = next as u16;
        }
        Some((id, u32::from_le_bytes(b)))
    }

    /// The driver's next avail position encoded as a vring base.
    pub fn avail_base(&self) -> u16 {
        encode(self.next_avail, self.avail_wrap)
    }

    /// The driver's next used position encoded as an `off_wrap`.
    pub fn used_off_wrap(&self) -> u16 {
        encode(self.next_used, self.used_wrap)
    }

    /// Writes the driver event suppression area: `off_wrap` then `flags`.
    pub fn set_driver_event(&self, flags: u16, off_wrap: u16) {
        self.write_u16(self.driver_area + EVENT_OFF_WRAP as u64, off_wrap);
        fence(Ordering::Release);
        self.write_u16(self.driver_area + EVENT_FLAGS as u64, flags);
    }

    /// Reads the device event suppression area's `flags`.
    pub fn device_event_flags(&self) -> u16 {
        self.read_u16(self.device_area + EVENT_FLAGS as u64)
    }

    /// Reads the device event suppression area's `off_wrap`.
    pub fn device_event_off_wrap(&self) -> u16 {
        self.read_u16(self.device_area + EVENT_OFF_WRAP as u64)
    }
}
