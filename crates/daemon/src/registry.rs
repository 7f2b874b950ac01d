//! The device registry of the daemon: mgmtdevs (device types), and the devices created from
//! them at start (config file) or at run time (`uvdpa dev add`), each served on its own
//! vhost-user socket. Views returned here are the stable JSON schema of `uvdpa ... -j`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};
use uvdpa_devices::blk::trace as blk_trace;
use uvdpa_devices::blk::{
    BackendSpec, BlkConfig, BlkDevice, BlkFeatures, DEFAULT_QUEUE_SIZE as DEFAULT_BLK_QUEUE_SIZE,
};
use uvdpa_devices::net::capture::{CaptureError, CapturePoint, CaptureRing};
use uvdpa_devices::net::config::{
    MacDisplay, QueueRole, VirtioNetConfig, DEFAULT_MTU, MAX_QUEUE_PAIRS, VIRTIO_NET_S_LINK_UP,
};
use uvdpa_devices::net::device::{NetBackendSpec, NetDevice, MAX_NET_QUEUE_SIZE};
use uvdpa_devices::net::switch::SwitchRegistry;
use uvdpa_restrack::{Owner, ResHandle, ResType, Tracker};
use uvdpa_vduse::server::{VduseOptions, VduseServer};
use uvdpa_vhost_user::server::SessionCounters;
use uvdpa_vhost_user::{ResCtx, ServerOptions, SessionState, VhostUserServer};
use uvdpa_virtio::interrupts::VectorTable;
use uvdpa_virtio::stats::QueueStats;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::{DeviceStatus, VirtioDevice, VirtioFeatures};

use crate::config::{
    DeviceKind, DeviceSpec, NetSpec, Transport, BLK_DEFAULT_POLL_US, NET_DEFAULT_FRAME_LEN,
    NET_MIN_FRAME_LEN,
};

/// `e` and its sources, joined by ": " (user-facing errors print their cause chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

mod capture;
mod handover;
mod inspect;
mod views;
use capture::ActiveCapture;
pub use capture::CAPTURE_DEFAULT_SNAPLEN;
pub use handover::Handed;
pub use views::*;

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
    /// An attribute the device cannot change (to that value).
    #[error("Cannot change {attr} of device {name}: {reason}")]
    Set {
        /// Device name.
        name: String,
        /// The attribute.
        attr: &'static str,
        /// Why not.
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
    /// A live capture could not be attached.
    #[error("Cannot capture device {name}: {reason}")]
    Capture {
        /// Device name.
        name: String,
        /// Why not.
        reason: String,
    },
    /// A live upgrade cannot move the devices (or one of them).
    #[error("Cannot hand the devices over: {0}")]
    Handover(String),
    /// A capture is already attached to the device (or this client already captures).
    #[error("Cannot capture device {name}: {reason}")]
    CaptureBusy {
        /// Device name.
        name: String,
        /// Who holds it.
        reason: String,
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
            RegistryError::Create { .. }
            | RegistryError::Set { .. }
            | RegistryError::Capture { .. } => -(rustix::io::Errno::INVAL.raw_os_error()),
            RegistryError::StillHeld { .. }
            | RegistryError::CaptureBusy { .. }
            | RegistryError::Handover(_) => -(rustix::io::Errno::BUSY.raw_os_error()),
        }
    }
}

/// A created device with its type's configuration (a copy of its spec's kind).
enum Dev {
    Blk(BlkConfig, Arc<BlkDevice>),
    Net(NetSpec, Arc<NetDevice>),
}

impl Dev {
    /// The device as the transport serves it.
    fn virtio(&self) -> Arc<dyn VirtioDevice> {
        match self {
            Dev::Blk(_, b) => b.clone(),
            Dev::Net(_, n) => n.clone(),
        }
    }
}

/// A device whose backend is set up but not yet served (so the daemon can check every
/// configured device before serving any). Made by [`Registry::prepare`].
pub struct Prepared {
    spec: DeviceSpec,
    dev: Dev,
}

impl Prepared {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// A device's transport endpoint.
enum Served {
    /// A vhost-user socket.
    VhostUser(VhostUserServer),
    /// A VDUSE device.
    Vduse(VduseServer),
}

impl Served {
    fn session_state(&self) -> SessionState {
        match self {
            Served::VhostUser(s) => s.session_state(),
            Served::Vduse(s) => s.session_state(),
        }
    }

    fn stats(&self) -> &Arc<StatsTable> {
        match self {
            Served::VhostUser(s) => s.stats(),
            Served::Vduse(s) => s.stats(),
        }
    }

    /// Frontend connections so far (vhost-user; a VDUSE device has one kernel driver and
    /// no sessions to count).
    fn sessions(&self) -> Option<Arc<SessionCounters>> {
        match self {
            Served::VhostUser(s) => Some(s.sessions().clone()),
            Served::Vduse(_) => None,
        }
    }

    fn vectors(&self) -> &Arc<VectorTable> {
        match self {
            Served::VhostUser(s) => s.vectors(),
            Served::Vduse(s) => s.vectors(),
        }
    }

    /// Raises a configuration change notification (virtio 1.2 §2.5) towards the driver:
    /// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG to a vhost-user frontend that set a backend
    /// channel, VDUSE_DEV_SET_CONFIG + VDUSE_DEV_INJECT_CONFIG_IRQ on VDUSE. Returns
    /// whether the notice went out (a vhost-user device without a frontend, or whose
    /// frontend has no backend channel, cannot be told: the new config is what its next
    /// GET_CONFIG reads).
    fn config_changed(&self, name: &str) -> bool {
        match self {
            Served::VhostUser(s) => s.config_changed(),
            Served::Vduse(s) => match s.config_changed() {
                Ok(()) => true,
                Err(e) => {
                    warn!(
                        device = name,
                        "Config change notification failed: {}",
                        error_chain(&e)
                    );
                    false
                }
            },
        }
    }

    /// The socket path, or the VDUSE character device.
    fn path(&self) -> PathBuf {
        match self {
            Served::VhostUser(s) => s.path().to_path_buf(),
            Served::Vduse(s) => s.path(),
        }
    }

    fn shutdown(self) {
        match self {
            Served::VhostUser(s) => s.shutdown(),
            Served::Vduse(s) => s.shutdown(),
        }
    }
}

struct Managed {
    spec: DeviceSpec,
    dev: Dev,
    server: Served,
    entry: ResHandle,
}

/// How long `dev del` waits for the last reference to a device (restrack, seed 003).
pub const DEL_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon's devices.
pub struct Registry {
    run_dir: PathBuf,
    devices: Mutex<BTreeMap<String, Managed>>,
    tracker: Tracker,
    /// The in-daemon L2 switches net devices with the `switch` backend join.
    switches: SwitchRegistry,
    /// Live captures by IPC client id.
    captures: Mutex<HashMap<u64, ActiveCapture>>,
}

impl Registry {
    /// An empty registry whose sockets go in `run_dir`.
    pub fn new(run_dir: &Path, tracker: Tracker) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            devices: Mutex::new(BTreeMap::new()),
            tracker,
            switches: SwitchRegistry::new(),
            captures: Mutex::default(),
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
        // Before the backend is set up: a second TAP open would attach queues to the
        // existing device's interface, a second switch join would add a port.
        if self.lock().contains_key(&spec.name) {
            return Err(RegistryError::Exists(spec.name));
        }
        let p = self.prepare(spec)?;
        self.install(p)
    }

    /// Sets up the backend of `spec` (net devices of the switch backend join this
    /// registry's switch of that name).
    ///
    /// # Errors
    /// [`RegistryError::Create`] with the backend's reason, or naming mandated features the
    /// device does not offer.
    pub fn prepare(&self, spec: DeviceSpec) -> Result<Prepared, RegistryError> {
        self.prepare_with(spec, None)
    }

    /// As [`Registry::prepare`]; a `ram` blk device maps `ram` (the memfd of the disk a
    /// previous daemon served) instead of a new one.
    ///
    /// # Errors
    /// As [`Registry::prepare`]; `ram` given for another backend.
    pub fn prepare_with(
        &self,
        spec: DeviceSpec,
        ram: Option<OwnedFd>,
    ) -> Result<Prepared, RegistryError> {
        let create = |reason: String| RegistryError::Create {
            name: spec.name.clone(),
            reason,
        };
        // After `--user` dropped root, say why instead of failing on EACCES/EPERM.
        if matches!(spec.transport, crate::config::Transport::Vduse { .. }) {
            crate::privs::needs_root("A VDUSE device").map_err(|e| create(e.to_string()))?;
        }
        if let DeviceKind::Net(n) = &spec.kind {
            if matches!(
                n.backend,
                uvdpa_devices::net::device::NetBackendSpec::Tap { .. }
            ) {
                crate::privs::needs_root("A tap device").map_err(|e| create(e.to_string()))?;
            }
        }
        let dev = match &spec.kind {
            DeviceKind::Blk(cfg) => Dev::Blk(
                cfg.clone(),
                Arc::new(
                    match ram {
                        Some(fd) => BlkDevice::with_ram_fd(cfg.clone(), fd),
                        None => BlkDevice::new(cfg.clone()),
                    }
                    .map_err(|e| create(error_chain(&e)))?,
                ),
            ),
            DeviceKind::Net(n) => Dev::Net(
                n.clone(),
                Arc::new(
                    NetDevice::new(
                        &spec.name,
                        n.config,
                        n.queue_size,
                        &n.backend,
                        &self.switches,
                    )
                    .map_err(|e| create(e.to_string()))?,
                ),
            ),
        };
        let unoffered = spec.mandate & !dev.virtio().features().bits();
        if unoffered != 0 {
            return Err(create(format!(
                "mandate: {} not offered by this device",
                feature_names(unoffered, spec.mgmtdev()).join(",")
            )));
        }
        Ok(Prepared { spec, dev })
    }

    /// Starts serving a device whose backend is already set up.
    ///
    /// # Errors
    /// As [`Registry::add`].
    pub fn install(&self, p: Prepared) -> Result<DeviceView, RegistryError> {
        self.install_with(p, None)
    }

    /// As [`Registry::install`]; with `adopt`, a vhost-user device is rebuilt from what a
    /// previous daemon's server left ([`VhostUserServer::adopt`]) and stays paused.
    fn install_with(
        &self,
        p: Prepared,
        adopt: Option<Handed>,
    ) -> Result<DeviceView, RegistryError> {
        let Prepared { spec, dev } = p;
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
        let poll = Duration::from_micros(u64::from(spec.poll_us));
        let mandated = VirtioFeatures::from_raw(spec.mandate);
        let unoffered = VirtioFeatures::from_raw(spec.unoffer);
        let server = match spec.transport {
            Transport::VhostUser => {
                let opts = ServerOptions {
                    res: Some(res),
                    poll,
                    mandated,
                    unoffered,
                    access: spec.access,
                    max_memory: spec.max_memory,
                };
                let server = match adopt {
                    None => VhostUserServer::start_with(&spec.name, &sock, dev.virtio(), opts)
                        .map_err(|e| format!("cannot serve on {}: {e}", sock.display())),
                    Some(Handed::VhostUser(h)) => {
                        VhostUserServer::adopt(&spec.name, &sock, dev.virtio(), opts, h)
                            .map_err(|e| error_chain(&e))
                    }
                    Some(Handed::Vduse(_)) => Err("VDUSE state for a vhost-user device".into()),
                };
                Served::VhostUser(server.map_err(|reason| RegistryError::Create {
                    name: spec.name.clone(),
                    reason,
                })?)
            }
            Transport::Vduse { bind, bounce_size } => {
                let opts = VduseOptions {
                    res: Some(res),
                    poll,
                    mandated,
                    unoffered,
                    bind,
                    bounce_size,
                    log_dir: Some(self.run_dir.clone()),
                };
                // Creating and binding waits for the kernel's probe of the device (its
                // driver's first requests): outside the registry lock would be nicer, but
                // names must stay unique while it runs.
                let server = match adopt {
                    None => VduseServer::start(&spec.name, dev.virtio(), opts)
                        .map_err(|e| error_chain(&e)),
                    Some(Handed::Vduse(h)) => VduseServer::adopt(&spec.name, dev.virtio(), opts, h)
                        .map_err(|e| error_chain(&e)),
                    Some(Handed::VhostUser(_)) => Err("vhost-user state for a VDUSE device".into()),
                };
                Served::Vduse(server.map_err(|reason| RegistryError::Create {
                    name: spec.name.clone(),
                    reason,
                })?)
            }
        };
        let (usecs, frames) = spec.coalesce;
        if usecs != 0 || frames != 0 {
            for q in 0..spec.num_queues() {
                let _ = server.vectors().set_coalesce(q, usecs, frames);
            }
        }
        info!(device = %spec.name, transport = spec.transport.name(), path = %server.path().display(), "device added");
        let m = Managed {
            spec,
            dev,
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
        self.capture_stop_device(name);
        // Disconnect the frontend: its workers finish their in-flight requests, hand their
        // rings back and drop their references to the device.
        m.server.shutdown();
        if let Err(e) = m.dev.virtio().flush() {
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
}
