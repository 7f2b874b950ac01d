//! The memory table: SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG, with the
//! [`SessionParams::max_memory`](super::SessionParams::max_memory) check before anything is
//! mapped and the seal check of each region's fd.

use std::os::fd::OwnedFd;

use tracing::{debug, info};
use uvdpa_virtio::{GuestMemory, MemoryRegion};
use vhost::vhost_user::message::{
    VhostUserMemory, VhostUserMemoryRegion, VhostUserSingleMemoryRegion,
};

use super::wire::{decode, expect_fds};
use super::Session;
use crate::connection::Request;
use crate::error::Error;

impl Session {
    /// Says in the log when a memory region's fd is not sealed against shrinking
    /// (`F_SEAL_SHRINK`): the frontend could truncate it under the mapping, and only the
    /// SIGBUS containment of [`uvdpa_virtio::fault`] keeps the daemon alive then. Files
    /// and hugetlbfs (QEMU's memory-backend-file, DPDK's hugepage files) cannot be sealed,
    /// so this is no refusal, and it is logged at INFO (default level) rather than WARN:
    /// common frontends (libblkio, virtio-driver, DPDK) hand over unsealed fds every time.
    fn check_seals(&self, fd: &OwnedFd, gpa: u64, size: u64) {
        let seals = uvdpa_virtio::fd_seals(fd);
        if !seals.shrink_sealed {
            if let Some(suppressed) = self.log_limits.request.check() {
                info!(
                    device = %self.name,
                    gpa = format_args!("{gpa:#x}"),
                    size = format_args!("{size:#x}"),
                    fd = seals.kind,
                    suppressed,
                    "Memory region is not sealed against shrinking (no F_SEAL_SHRINK): relies on SIGBUS containment"
                );
            }
        }
    }

    /// Refuses a memory table that would map `total` bytes (`None`: more than 2^64) when
    /// that is past [`SessionParams::max_memory`](super::SessionParams::max_memory); returns
    /// the total otherwise.
    fn check_memory_limit(&self, total: Option<u64>) -> Result<u64, Error> {
        match total {
            Some(t) if t <= self.max_memory => Ok(t),
            _ => Err(Error::MemoryLimit {
                total: total.unwrap_or(u64::MAX),
                limit: self.max_memory,
            }),
        }
    }

    pub(super) fn set_mem_table(&mut self, req: &Request) -> Result<(), Error> {
        let hdr_len = std::mem::size_of::<VhostUserMemory>();
        let region_len = std::mem::size_of::<VhostUserMemoryRegion>();
        let (head, rest) = req.body.split_at(hdr_len.min(req.body.len()));
        let m: VhostUserMemory = decode("SET_MEM_TABLE", head)?;
        let n = m.num_regions as usize;
        if n == 0 || n > crate::connection::MAX_FDS {
            return Err(Error::InvalidParam {
                request: "SET_MEM_TABLE",
                reason: format!("{n} regions (1..={})", crate::connection::MAX_FDS),
            });
        }
        if rest.len() != n * region_len {
            return Err(Error::BadBodySize {
                request: "SET_MEM_TABLE",
                got: req.body.len(),
                expected: hdr_len + n * region_len,
            });
        }
        expect_fds("SET_MEM_TABLE", req, n)?;
        // The whole table against the limit before anything is mapped; it replaces the
        // current table, so only its own regions count.
        let mut wanted = Vec::with_capacity(n);
        for chunk in rest.chunks_exact(region_len) {
            wanted.push(decode::<VhostUserMemoryRegion>("SET_MEM_TABLE", chunk)?);
        }
        let total = self.check_memory_limit(wanted.iter().try_fold(0u64, |sum, r| {
            sum.checked_add(mapped_bytes(r.mmap_offset, r.memory_size))
        }))?;
        let mut regions = Vec::with_capacity(n);
        let mut records = Vec::with_capacity(n);
        for (r, fd) in wanted.iter().zip(&req.fds) {
            self.check_seals(fd, r.guest_phys_addr, r.memory_size);
            regions.push(MemoryRegion::map(
                fd,
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
            )?);
            records.push(crate::handover::RegionRecord::new(
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
                fd,
            ));
        }
        let mem = GuestMemory::new(regions)?;
        if let Some(suppressed) = self.log_limits.request.check() {
            info!(device = %self.name, regions = n, bytes = mem.total_size(), mapped = total, suppressed, "memory table set");
        }
        self.region_repeats.clear();
        self.record.regions = records;
        Ok(self.rt.replace_memory(|_| Ok(Some(mem)))?)
    }

    pub(super) fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        fds: &[OwnedFd],
    ) -> Result<(), Error> {
        let fd = fds.first().ok_or(Error::WrongFdCount {
            request: "ADD_MEM_REG",
            got: 0,
            expected: 1,
        })?;
        // QEMU sends a multi-queue device's regions once per vhost device (one per net
        // queue pair): a region identical to a mapped one is another reference to it, not
        // an overlap.
        let key = (r.guest_phys_addr, r.memory_size);
        let mapped = self.rt.memory().is_some_and(|m| {
            m.region(key.0, key.1)
                .is_some_and(|x| x.uaddr() == r.user_addr)
        });
        if mapped {
            match self.region_repeats.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n = n.saturating_add(1),
                None => self.region_repeats.push((key, 1)),
            }
            debug!(device = %self.name, gpa = key.0, size = key.1, "ADD_MEM_REG of a mapped region: one more reference");
            return Ok(());
        }
        let current = self.rt.memory().map_or(Some(0), |m| {
            m.regions()
                .iter()
                .try_fold(0u64, |sum, x| sum.checked_add(x.mapped_len()))
        });
        let total = current.and_then(|c| c.checked_add(mapped_bytes(r.mmap_offset, r.memory_size)));
        self.check_memory_limit(total)?;
        self.check_seals(fd, r.guest_phys_addr, r.memory_size);
        let region = MemoryRegion::map(
            fd,
            r.guest_phys_addr,
            r.memory_size,
            r.user_addr,
            r.mmap_offset,
        )?;
        if let Some(m) = self.rt.memory() {
            m.check_addition(&region)?;
        }
        self.record.regions.push(crate::handover::RegionRecord::new(
            r.guest_phys_addr,
            r.memory_size,
            r.user_addr,
            r.mmap_offset,
            fd,
        ));
        Ok(self.rt.replace_memory(|old| {
            let mut regions = old;
            regions.push(region);
            Ok(Some(GuestMemory::new(regions)?))
        })?)
    }

    pub(super) fn remove_mem_region(&mut self, gpa: u64, size: u64) -> Result<(), Error> {
        if let Some(i) = self
            .region_repeats
            .iter()
            .position(|(k, _)| *k == (gpa, size))
        {
            match self.region_repeats.get_mut(i) {
                Some((_, n)) if *n > 1 => *n -= 1,
                _ => {
                    self.region_repeats.swap_remove(i);
                }
            }
            return Ok(());
        }
        // Checked before the table is taken apart, so a refused removal keeps it.
        if self.rt.memory().and_then(|m| m.region(gpa, size)).is_none() {
            return Err(Error::Memory(uvdpa_virtio::MemoryError::NoSuchRegion {
                gpa,
                size,
            }));
        }
        self.record
            .regions
            .retain(|r| !(r.gpa == gpa && r.size == size));
        Ok(self.rt.replace_memory(|old| {
            let regions: Vec<MemoryRegion> = old
                .into_iter()
                .filter(|r| !(r.gpa() == gpa && r.size() == size))
                .collect();
            Ok(Some(GuestMemory::new(regions)?))
        })?)
    }
}

/// Bytes of address space a region maps: [`MemoryRegion::map`] maps from offset 0 of the
/// fd (saturating: an overflowing region is refused by the limit, and by the mapping).
fn mapped_bytes(mmap_offset: u64, size: u64) -> u64 {
    mmap_offset.saturating_add(size)
}
