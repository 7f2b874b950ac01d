//! The reconnect log of a VDUSE device: what a restarted daemon needs to take over a device
//! the kernel kept alive (its driver waiting) after the previous daemon died.
//!
//! A VDUSE device outlives the process that created it, but the kernel does not replay
//! SET_STATUS to a new process, and requests the dead daemon had taken from the avail ring
//! would be lost. The log is a file on tmpfs (the daemon's run directory), shared-mapped,
//! so it survives a SIGKILL:
//!
//! ```text
//! 0      u8[8]  magic "UVDPAVD1"
//! 8      u8     device status last acknowledged (virtio 1.2 §2.1)
//! 16     u64    driver features (little-endian)
//! 24     u16    ring size the inflight area is laid out for
//! 26     u16    number of vrings
//! 4096   the inflight area: the vhost-user "Inflight I/O tracking" layout per vring
//!        ([`uvdpa_virtio::inflight`]) of the negotiated ring layout, split or packed;
//!        sized for packed (the larger), laid out anew at every DRIVER_OK
//! ```
//!
//! Restart: the header gives the status and features to replay through the status
//! machine; a split ring resumes at its used index, a packed ring at the position its
//! region recorded, and the chains still marked in flight are resubmitted first (libvduse
//! keeps a similar log, for split rings).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use uvdpa_virtio::inflight::{InflightLayout, InflightMap};

const MAGIC: &[u8; 8] = b"UVDPAVD1";
/// Offset of the inflight area in the file.
const INFLIGHT_OFFSET: u64 = 4096;

/// A mapped reconnect log.
#[derive(Debug)]
pub struct ReconnectLog {
    path: PathBuf,
    header: NonNull<u8>,
    inflight: Arc<InflightMap>,
}

// SAFETY: the header mapping is written only by the message loop thread that owns the log
// (through `&mut self`) and read with volatile loads; the inflight map is Send + Sync.
unsafe impl Send for ReconnectLog {}
// SAFETY: as for Send; `&self` methods only read.
unsafe impl Sync for ReconnectLog {}

fn map_header(fd: &OwnedFd) -> io::Result<NonNull<u8>> {
    // SAFETY: a new shared mapping of the log's first page, aliasing no Rust object.
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            INFLIGHT_OFFSET as usize,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            fd,
            0,
        )
    }?;
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl ReconnectLog {
    /// Bytes of the inflight area: room for the packed layout, which is larger than the
    /// split one, so either fits.
    fn inflight_len(num_queues: u16, queue_size: u16) -> u64 {
        InflightLayout::Packed.region_size(num_queues, queue_size) as u64
    }

    /// Maps the header page and the inflight area of the log file `fd` (the area sized for
    /// the packed layout, which either ring layout fits).
    fn map(
        fd: OwnedFd,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<(NonNull<u8>, Arc<InflightMap>)> {
        let header = map_header(&fd)?;
        let inflight = InflightMap::open_in(
            InflightLayout::Packed,
            fd,
            INFLIGHT_OFFSET,
            Self::inflight_len(num_queues, queue_size),
            num_queues,
            queue_size,
        );
        match inflight {
            Ok(inflight) => Ok((header, inflight)),
            Err(e) => {
                // SAFETY: the page `map_header` just mapped; nothing else refers to it.
                let _ =
                    unsafe { rustix::mm::munmap(header.as_ptr().cast(), INFLIGHT_OFFSET as usize) };
                Err(e)
            }
        }
    }

    /// A fresh log at `path` (replacing any old one) for `num_queues` rings of
    /// `queue_size` descriptors, status 0.
    ///
    /// # Errors
    /// Creating, sizing or mapping the file failed.
    pub fn create(path: &Path, num_queues: u16, queue_size: u16) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        let len = INFLIGHT_OFFSET + Self::inflight_len(num_queues, queue_size);
        file.set_len(len)?;
        let (header, inflight) = Self::map(OwnedFd::from(file), num_queues, queue_size)?;
        inflight.init_layout(InflightLayout::Split)?;
        let log = Self {
            path: path.to_path_buf(),
            header,
            inflight,
        };
        // SAFETY: offsets 0..28 are inside the mapped first page, which only this log
        // writes.
        unsafe {
            std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), log.header.as_ptr(), MAGIC.len());
            std::ptr::write_volatile(
                log.header.as_ptr().add(24).cast::<u16>(),
                queue_size.to_le(),
            );
            std::ptr::write_volatile(
                log.header.as_ptr().add(26).cast::<u16>(),
                num_queues.to_le(),
            );
        }
        Ok(log)
    }

    /// Opens the log a previous daemon left at `path`.
    ///
    /// # Errors
    /// Missing file, a file that is not a log (magic), or one laid out for another device
    /// (its sizes differ from `num_queues`/`queue_size`, or it is too short).
    pub fn open(path: &Path, num_queues: u16, queue_size: u16) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = INFLIGHT_OFFSET + Self::inflight_len(num_queues, queue_size);
        if file.metadata()?.len() < len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is shorter than a log for this device", path.display()),
            ));
        }
        let (header, inflight) = Self::map(OwnedFd::from(file), num_queues, queue_size)?;
        let log = Self {
            path: path.to_path_buf(),
            header,
            inflight,
        };
        let mut magic = [0u8; 8];
        // SAFETY: inside the mapped first page.
        unsafe { std::ptr::copy_nonoverlapping(log.header.as_ptr(), magic.as_mut_ptr(), 8) };
        // SAFETY: inside the mapped first page, 2-aligned.
        let (qs, nq) = unsafe {
            (
                u16::from_le(std::ptr::read_volatile(
                    log.header.as_ptr().add(24).cast::<u16>(),
                )),
                u16::from_le(std::ptr::read_volatile(
                    log.header.as_ptr().add(26).cast::<u16>(),
                )),
            )
        };
        if &magic != MAGIC || qs != queue_size || nq != num_queues {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a reconnect log of this device ({nq} rings of {qs})",
                    path.display()
                ),
            ));
        }
        Ok(log)
    }

    /// Records what the device acknowledged: status and driver features.
    pub fn record(&mut self, status: u8, features: u64) {
        // SAFETY: offsets 8 and 16 are inside the mapped first page (16 is 8-aligned).
        unsafe {
            std::ptr::write_volatile(self.header.as_ptr().add(16).cast::<u64>(), features.to_le());
            std::ptr::write_volatile(self.header.as_ptr().add(8), status);
        }
    }

    /// The status and driver features last recorded.
    pub fn recorded(&self) -> (u8, u64) {
        // SAFETY: as in `record`.
        unsafe {
            (
                std::ptr::read_volatile(self.header.as_ptr().add(8)),
                u64::from_le(std::ptr::read_volatile(
                    self.header.as_ptr().add(16).cast::<u64>(),
                )),
            )
        }
    }

    /// The inflight area, for the runtime's split rings.
    pub fn inflight(&self) -> &Arc<InflightMap> {
        &self.inflight
    }

    /// Removes the file (the device is destroyed: nothing to reconnect to).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ReconnectLog {
    fn drop(&mut self) {
        // SAFETY: the page `map_header` mapped; nothing borrows it past `&self`.
        let _ =
            unsafe { rustix::mm::munmap(self.header.as_ptr().cast(), INFLIGHT_OFFSET as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_survives_reopen_and_refuses_another_layout() {
        let dir = std::env::temp_dir().join(format!("uvdpa-reconnect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d0.vduse");
        {
            let mut log = ReconnectLog::create(&path, 2, 128).unwrap();
            log.record(0x0f, 1 << 32 | 1 << 33);
            let mut q = log.inflight().queue(1, 128).unwrap();
            q.begin(7);
        }
        let log = ReconnectLog::open(&path, 2, 128).unwrap();
        assert_eq!(log.recorded(), (0x0f, 1 << 32 | 1 << 33));
        let mut q = log.inflight().queue(1, 128).unwrap();
        assert_eq!(q.recover(0), vec![7]);
        assert!(ReconnectLog::open(&path, 2, 256).is_err());
        assert!(ReconnectLog::open(&path, 1, 128).is_err());
        std::fs::write(&path, vec![0u8; 8192 + 4096]).unwrap();
        assert!(ReconnectLog::open(&path, 2, 128).is_err());
        log.remove();
        assert!(ReconnectLog::open(&path, 2, 128).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
