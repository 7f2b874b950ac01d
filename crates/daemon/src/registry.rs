//! The device registry of the daemon: mgmtdevs (device types), and the devices created from
//! them at start (config file) or at run time (`uvdpa dev add`), each served on its own
//! vhost-user socket. Views returned here are the stable JSON schema of `uvdpa ... -j`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};
use uvdpa_devices::blk::{BackendSpec, BlkDevice, BlkFeatures};
use uvdpa_restrack::{Owner, ResHandle, ResType, Tracker};
use uvdpa_vhost_user::{ResCtx, ServerOptions, VhostUserServer};
use uvdpa_virtio::{DeviceStatus, VirtioDevice, VirtioFeatures};

use crate::config::DeviceSpec;

/// Registry errors; each maps to an errno-like code for IPC replies.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// No device with this name.
    #[error("No device named {0:?}")]
    NotFound(String),
    /// The name is taken.
    #[error("A device named {0:?} already exists")]
    Exists(String),
    /// The device could not be created (backend, socket).
    #[error("Cannot create device {name}: {reason}")]
    Create {
        /// Device name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The device was removed, but something still held it when the wait ran out.
    #[error("Device {name} removed, but {reason}")]
    StillHeld {
        /// Device name.
        name: String,
        /// Who holds it (from the resource tracker).
        reason: String,
    },
    /// A queue index out of range.
    #[error("Device {name} has no queue {qidx} (it has {queues})")]
    NoQueue {
        /// Device name.
        name: String,
        /// Index asked for.
        qidx: u32,
        /// Number of queues.
        queues: u16,
    },
}

impl RegistryError {
    /// The errno-like code for an IPC error reply.
    pub fn code(&self) -> i32 {
        match self {
            RegistryError::NotFound(_) | RegistryError::NoQueue { .. } => {
                -(rustix::io::Errno::NODEV.raw_os_error())
            }
            RegistryError::Exists(_) => -(rustix::io::Errno::EXIST.raw_os_error()),
            RegistryError::Create { .. } => -(rustix::io::Errno::INVAL.raw_os_error()),
            RegistryError::StillHeld { .. } => -(rustix::io::Errno::BUSY.raw_os_error()),
        }
    }
}

/// One attribute a mgmtdev accepts in `dev add`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttrView {
    /// Attribute name as typed on the command line.
    pub name: String,
    /// Allowed values.
    pub range: String,
    /// Default when omitted.
    pub default: String,
}

/// A device type (`uvdpa mgmtdev show`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MgmtdevView {
    /// Name used in `dev add ... mgmtdev NAME`.
    pub name: String,
    /// Virtio device ID (virtio 1.2 §5).
    pub device_id: u32,
    /// Transport(s).
    pub transports: Vec<String>,
    /// Attributes of `dev add`.
    pub attributes: Vec<AttrView>,
}

/// The mgmtdevs this daemon offers.
pub fn mgmtdevs() -> Vec<MgmtdevView> {
    let a = |name: &str, range: &str, default: &str| AttrView {
        name: name.into(),
        range: range.into(),
        default: default.into(),
    };
    vec![MgmtdevView {
        name: "blk".into(),
        device_id: 2,
        transports: vec!["vhost-user".into()],
        attributes: vec![
            a("backend", "ram|file|null", "ram"),
            a(
                "size",
                "512..=2^47 bytes, multiple of 512; K/M/G/T suffixes (ram, null)",
                "-",
            ),
            a("path", "file path (file)", "-"),
            a("direct", "flag: O_DIRECT (file)", "off"),
            a("ro", "flag: read-only", "off"),
            a("queues", "1..=64", "1"),
            a("queue_size", "power of two 1..=32768", "256"),
            a("serial", "at most 20 bytes", "uvdpa-NAME"),
            a("logical_block_size", "512|1024|2048|4096", "512"),
            a(
                "poll_us",
                "0..=1000000 (busy-poll window after the ring empties, µs)",
                "0",
            ),
        ],
    }]
}

/// `uvdpa dev show` for one device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceView {
    /// Device name.
    pub name: String,
    /// Its mgmtdev.
    pub mgmtdev: String,
    /// Backend kind.
    pub backend: String,
    /// vhost-user socket path.
    pub socket: String,
    /// `ready` (no frontend), `connected`, `live` (DRIVER_OK) or `needs-reset`.
    pub state: String,
    /// Status bits by name (virtio 1.2 §2.1).
    pub status: Vec<String>,
    /// Negotiated features by name (unknown bits as `bitN`).
    pub features: Vec<String>,
    /// Frontend pid, when connected.
    pub frontend_pid: Option<u32>,
    /// Number of virtqueues.
    pub queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Read-only.
    pub read_only: bool,
    /// QEMU options that attach it.
    pub qemu: String,
}

/// `uvdpa dev config show`: the decoded virtio_blk_config (virtio 1.2 §5.2.4).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlkConfigView {
    /// Device name.
    pub name: String,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment in bytes.
    pub size_max: u32,
    /// Most segments per request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// Request queues.
    pub num_queues: u16,
    /// Most sectors per discard segment.
    pub max_discard_sectors: u32,
    /// Most discard segments.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may unmap.
    pub write_zeroes_may_unmap: bool,
}

/// `uvdpa dev vstats show`: counters of one queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VstatsView {
    /// Device name.
    pub name: String,
    /// Queue index.
    pub qidx: u32,
    /// Chains completed.
    pub requests: u64,
    /// Bytes read from the driver's buffers.
    pub bytes_read: u64,
    /// Bytes written to the driver's buffers.
    pub bytes_written: u64,
    /// Kicks received.
    pub kicks: u64,
    /// Calls sent.
    pub calls: u64,
    /// Calls suppressed (EVENT_IDX, NO_INTERRUPT).
    pub calls_suppressed: u64,
    /// Errors that stopped the queue.
    pub errors: u64,
}

/// A device whose backend is set up but not yet served (so the daemon can check every
/// configured device before serving any).
pub struct Prepared {
    spec: DeviceSpec,
    blk: Arc<BlkDevice>,
}

impl Prepared {
    /// Sets up the backend of `spec`.
    ///
    /// # Errors
    /// [`RegistryError::Create`] with the backend's reason.
    pub fn new(spec: DeviceSpec) -> Result<Self, RegistryError> {
        let blk = BlkDevice::new(spec.blk.clone()).map_err(|e| RegistryError::Create {
            name: spec.name.clone(),
            reason: e.to_string(),
        })?;
        let unoffered = spec.mandate & !blk.features().bits();
        if unoffered != 0 {
            return Err(RegistryError::Create {
                name: spec.name.clone(),
                reason: format!(
                    "mandate: {} not offered by this device",
                    feature_names(unoffered).join(",")
                ),
            });
        }
        Ok(Self {
            spec,
            blk: Arc::new(blk),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

struct Managed {
    spec: DeviceSpec,
    blk: Arc<BlkDevice>,
    server: VhostUserServer,
    entry: ResHandle,
}

/// How long `dev del` waits for the last reference to a device (restrack, seed 003).
pub const DEL_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon's devices.
pub struct Registry {
    run_dir: PathBuf,
    devices: Mutex<BTreeMap<String, Managed>>,
    tracker: Tracker,
}

fn feature_names(bits: u64) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for i in 0..64 {
        let bit = 1u64 << i;
        if bits & bit == 0 {
            continue;
        }
        let name = VirtioFeatures::from_bits(bit)
            .and_then(|f| f.iter_names().next().map(|(n, _)| n.to_string()))
            .or_else(|| {
                BlkFeatures::from_bits(bit)
                    .and_then(|f| f.iter_names().next().map(|(n, _)| n.to_string()))
            })
            .unwrap_or_else(|| format!("bit{i}"));
        names.push(name);
    }
    names
}

/// The QEMU options that attach a vhost-user-blk device served at `sock`.
pub fn qemu_command_line(name: &str, queues: u16, sock: &Path) -> String {
    format!(
        "qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \
         -numa node,memdev=mem -chardev socket,id={name},path={sock} \
         -device vhost-user-blk-pci,chardev={name},num-queues={queues} ...",
        sock = sock.display(),
    )
}

impl Registry {
    /// An empty registry whose sockets go in `run_dir`.
    pub fn new(run_dir: &Path, tracker: Tracker) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            devices: Mutex::new(BTreeMap::new()),
            tracker,
        }
    }

    /// The resource tracker devices and their sessions are recorded in.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Managed>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a device and starts serving it.
    ///
    /// # Errors
    /// [`RegistryError::Exists`] for a taken name, [`RegistryError::Create`] when the
    /// backend or socket cannot be set up.
    pub fn add(&self, spec: DeviceSpec) -> Result<DeviceView, RegistryError> {
        let p = Prepared::new(spec)?;
        self.install(p)
    }

    /// Starts serving a device whose backend is already set up.
    ///
    /// # Errors
    /// As [`Registry::add`].
    pub fn install(&self, p: Prepared) -> Result<DeviceView, RegistryError> {
        let Prepared { spec, blk } = p;
        let mut devs = self.lock();
        if devs.contains_key(&spec.name) {
            return Err(RegistryError::Exists(spec.name));
        }
        let sock = self.run_dir.join(format!("{}.sock", spec.name));
        let entry = self
            .tracker
            .create(ResType::Device, spec.name.clone(), None, Owner::current());
        entry.add();
        let res = ResCtx {
            tracker: self.tracker.clone(),
            device: entry.id(),
        };
        let opts = ServerOptions {
            res: Some(res),
            poll: Duration::from_micros(u64::from(spec.poll_us)),
            mandated: VirtioFeatures::from_raw(spec.mandate),
        };
        let server =
            VhostUserServer::start_with(&spec.name, &sock, blk.clone(), opts).map_err(|e| {
                RegistryError::Create {
                    name: spec.name.clone(),
                    reason: format!("cannot serve on {}: {e}", sock.display()),
                }
            })?;
        let (usecs, frames) = spec.coalesce;
        if usecs != 0 || frames != 0 {
            for q in 0..spec.blk.num_queues {
                let _ = server.vectors().set_coalesce(q, usecs, frames);
            }
        }
        info!(device = %spec.name, socket = %sock.display(), "device added");
        let m = Managed {
            spec,
            blk,
            server,
            entry,
        };
        let view = Self::view(&m);
        devs.insert(m.spec.name.clone(), m);
        Ok(view)
    }

    /// Removes a device: the frontend is disconnected (its vrings stopped after in-flight
    /// requests), file backends flushed, the socket removed.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`].
    pub fn del(&self, name: &str) -> Result<(), RegistryError> {
        let m = self
            .lock()
            .remove(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        // Disconnect the frontend: its workers finish their in-flight requests, hand their
        // rings back and drop their references to the device.
        m.server.shutdown();
        if let Err(e) = m.blk.flush() {
            warn!(device = name, "Flush on delete failed: {}", e.0);
        }
        let res = m.entry.del(DEL_TIMEOUT);
        info!(device = name, "device deleted");
        res.map_err(|e| {
            warn!(device = name, "{e}");
            RegistryError::StillHeld {
                name: name.into(),
                reason: e.to_string(),
            }
        })
    }

    /// Removes every device (daemon shutdown).
    pub fn del_all(&self) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for n in names {
            let _ = self.del(&n);
        }
    }

    fn view(m: &Managed) -> DeviceView {
        let st = m.server.session_state();
        let status = DeviceStatus::from_bits_retain(st.status);
        let state = if !st.connected {
            "ready"
        } else if status.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
            "needs-reset"
        } else if status.contains(DeviceStatus::DRIVER_OK) || st.running_vrings > 0 {
            "live"
        } else {
            "connected"
        };
        let backend = match &m.spec.blk.backend {
            BackendSpec::Ram { .. } => "ram",
            BackendSpec::File { .. } => "file",
            BackendSpec::Null { .. } => "null",
        };
        DeviceView {
            name: m.spec.name.clone(),
            mgmtdev: "blk".into(),
            backend: backend.into(),
            socket: m.server.path().display().to_string(),
            state: state.into(),
            status: status.names().into_iter().map(String::from).collect(),
            features: feature_names(st.features),
            frontend_pid: st.frontend_pid,
            queues: m.spec.blk.num_queues,
            queue_size: m.spec.blk.queue_size,
            capacity: m.blk.capacity_bytes(),
            read_only: m.spec.blk.read_only,
            qemu: qemu_command_line(&m.spec.name, m.spec.blk.num_queues, m.server.path()),
        }
    }

    /// Views of one device or of all, sorted by name.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] for an unknown name.
    pub fn show(&self, name: Option<&str>) -> Result<Vec<DeviceView>, RegistryError> {
        let devs = self.lock();
        match name {
            Some(n) => devs
                .get(n)
                .map(|m| vec![Self::view(m)])
                .ok_or_else(|| RegistryError::NotFound(n.into())),
            None => Ok(devs.values().map(Self::view).collect()),
        }
    }

    /// The decoded config space of a device.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`].
    pub fn config(&self, name: &str) -> Result<BlkConfigView, RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let c = m.blk.config_space();
        Ok(BlkConfigView {
            name: name.into(),
            capacity: c.capacity,
            size_max: c.size_max,
            seg_max: c.seg_max,
            blk_size: c.blk_size,
            num_queues: c.num_queues,
            max_discard_sectors: c.max_discard_sectors,
            max_discard_seg: c.max_discard_seg,
            discard_sector_alignment: c.discard_sector_alignment,
            max_write_zeroes_sectors: c.max_write_zeroes_sectors,
            max_write_zeroes_seg: c.max_write_zeroes_seg,
            write_zeroes_may_unmap: c.write_zeroes_may_unmap != 0,
        })
    }

    fn with_server<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Managed) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        f(m)
    }

    /// The interrupt vector table of a device.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`].
    pub fn irq_show(&self, name: &str) -> Result<Vec<VectorView>, RegistryError> {
        self.with_server(name, |m| {
            Ok(m.server
                .vectors()
                .snapshot()
                .into_iter()
                .map(|v| VectorView {
                    vec: v.index,
                    trigger: v.has_trigger,
                    masked: v.masked,
                    pending: v.pending,
                    coalesce_usecs: v.max_delay_us,
                    coalesce_frames: v.max_batch,
                    signals: v.counters.signals(),
                    suppressed_event_idx: v.counters.suppressed_event_idx,
                    suppressed_coalesced: v.counters.suppressed_coalesced,
                    suppressed_masked: v.counters.suppressed_masked,
                })
                .collect())
        })
    }

    /// Fires vector `vec` by hand (DATA_NONE for one vector); returns whether a signal
    /// was sent (false without a trigger, or masked).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`] for a vector out of range.
    pub fn irq_trigger(&self, name: &str, vec: u32) -> Result<bool, RegistryError> {
        self.with_server(name, |m| {
            let v = u16::try_from(vec).unwrap_or(u16::MAX);
            m.server
                .vectors()
                .trigger(v)
                .map_err(|_| RegistryError::NoQueue {
                    name: name.into(),
                    qidx: vec,
                    queues: m.spec.blk.num_queues,
                })
        })
    }

    /// Sets a queue vector's coalescing (µs, completion batches; 0/0 = off).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`].
    pub fn set_coalesce(
        &self,
        name: &str,
        qidx: u32,
        usecs: u32,
        frames: u32,
    ) -> Result<(), RegistryError> {
        self.with_server(name, |m| {
            let v = u16::try_from(qidx).unwrap_or(u16::MAX);
            m.server
                .vectors()
                .set_coalesce(v, usecs, frames)
                .map_err(|_| RegistryError::NoQueue {
                    name: name.into(),
                    qidx,
                    queues: m.spec.blk.num_queues,
                })
        })
    }

    /// Counters of queue `qidx`, and a duplicate of the stats table's memfd with its
    /// number of entries (for live watching by the CLI).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`].
    pub fn vstats(
        &self,
        name: &str,
        qidx: u32,
    ) -> Result<(VstatsView, Option<std::os::fd::OwnedFd>, usize), RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let table = m.server.stats();
        let q = table.queue(qidx as usize).ok_or(RegistryError::NoQueue {
            name: name.into(),
            qidx,
            queues: m.spec.blk.num_queues,
        })?;
        let view = vstats_view(name, qidx, q);
        Ok((view, table.fd().try_clone_to_owned().ok(), table.queues()))
    }
}

/// One interrupt vector (`uvdpa dev irq show`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VectorView {
    /// Vector index (= vring index).
    pub vec: u16,
    /// A call eventfd is installed.
    pub trigger: bool,
    /// Masked.
    pub masked: bool,
    /// A signal is pending (masked while fired).
    pub pending: bool,
    /// Coalescing: at most one signal per this many µs (0 = off).
    pub coalesce_usecs: u32,
    /// Coalescing: at most one signal per this many completions batches (0 = off).
    pub coalesce_frames: u32,
    /// Signals sent (including deferred and injected ones).
    pub signals: u64,
    /// Signals suppressed by EVENT_IDX / NO_INTERRUPT.
    pub suppressed_event_idx: u64,
    /// Signals suppressed by coalescing.
    pub suppressed_coalesced: u64,
    /// Signals suppressed by masking.
    pub suppressed_masked: u64,
}

/// Reads one queue's counters into a view.
pub fn vstats_view(name: &str, qidx: u32, q: &uvdpa_virtio::stats::QueueStats) -> VstatsView {
    VstatsView {
        name: name.into(),
        qidx,
        requests: q.requests.load(Ordering::Relaxed),
        bytes_read: q.bytes_read.load(Ordering::Relaxed),
        bytes_written: q.bytes_written.load(Ordering::Relaxed),
        kicks: q.kicks.load(Ordering::Relaxed),
        calls: q.calls.load(Ordering::Relaxed),
        calls_suppressed: q.calls_suppressed.load(Ordering::Relaxed),
        errors: q.errors.load(Ordering::Relaxed),
    }
}
