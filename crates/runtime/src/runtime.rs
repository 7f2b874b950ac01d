//! [`DeviceRuntime`]: one device served to one driver, whatever the transport.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};
use uvdpa_restrack::{Owner, ResHandle, ResId, ResType, Tracker};
use uvdpa_virtio::dirty::DirtyLog;
use uvdpa_virtio::inflight::InflightMap;
use uvdpa_virtio::interrupts::{IrqAction, VectorTable};
use uvdpa_virtio::loglimit::DeviceLogLimits;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::{
    DeviceStatus, GuestMemory, MemoryRegion, StatusMachine, VirtioDevice, VirtioFeatures,
};

use crate::error::RuntimeError;

mod workers;

use workers::{queue_groups, Group};

/// How long stopping a vring waits for the request in progress before the ring is
/// abandoned and the device marked DEVICE_NEEDS_RESET.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Tells the driver the device changed (a configuration-change notification, virtio 1.2
/// §2.1.2 after DEVICE_NEEDS_RESET, or a new capacity): vhost-user sends
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, VDUSE injects the config interrupt. Returns
/// whether the notice went out. Called from queue workers: it must not block.
pub type ConfigNotifier = Arc<dyn Fn() -> bool + Send + Sync>;

/// Ring state of one vring as the driver configured it.
#[derive(Default)]
pub struct VringState {
    /// Ring size in descriptors (0: not set).
    pub size: u16,
    /// Descriptor table, driver area (avail ring) and device area (used ring) addresses:
    /// frontend virtual addresses on vhost-user, IOVAs on VDUSE.
    pub addr: Option<(u64, u64, u64)>,
    /// Where the device resumes: the next avail index (split), or the next avail slot with
    /// its wrap counter in bit 15 (packed).
    pub base: u16,
    /// A base was set by the driver (or handed back by a stopped worker).
    pub base_set: bool,
    /// The kick eventfd; a vring runs only with one.
    pub kick: Option<Arc<OwnedFd>>,
    /// The error eventfd (vhost-user SET_VRING_ERR), if any.
    pub err: Option<Arc<OwnedFd>>,
    /// The driver started the ring (a kick fd was set and not withdrawn since).
    pub started: bool,
    /// The ring is enabled (vhost-user SET_VRING_ENABLE, VDUSE `ready`).
    pub enabled: bool,
    /// Guest-physical address of the used ring for dirty logging (vhost-user
    /// SET_VRING_ADDR with VHOST_VRING_F_LOG: `log_guest_addr`).
    pub log_addr: Option<u64>,
    /// Owned by its group's running worker.
    running: bool,
    /// Resource entries of the running vring (virtqueue, worker, call vector); released
    /// when the worker hands the ring back.
    tracked: Vec<ResHandle>,
}

impl VringState {
    /// Whether a worker owns the ring now.
    pub fn running(&self) -> bool {
        self.running
    }
}

/// Where a runtime records its resources (restrack, seed 003): the tracker and the device
/// entry its entries hang under.
#[derive(Clone)]
pub struct ResCtx {
    /// The daemon's tracker.
    pub tracker: Tracker,
    /// The device's entry.
    pub device: ResId,
}

/// What a session exposes to the daemon for `dev show` (updated after every request).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    /// A driver is attached (a vhost-user frontend connected, a VDUSE device bound).
    pub connected: bool,
    /// The frontend's pid (SO_PEERCRED), if known.
    pub frontend_pid: Option<u32>,
    /// Virtio features the driver acked.
    pub features: u64,
    /// vhost-user protocol features negotiated (0 on VDUSE).
    pub protocol_features: u64,
    /// Device status byte (virtio 1.2 §2.1).
    pub status: u8,
    /// Vrings owned by a running worker.
    pub running_vrings: u16,
}

/// What a runtime is given at creation.
pub struct RuntimeParams {
    /// The device served.
    pub device: Arc<dyn VirtioDevice>,
    /// One counters entry per device queue (kept across sessions).
    pub stats: Arc<StatsTable>,
    /// Refreshed by [`DeviceRuntime::publish_state`], for `dev show`.
    pub state: Arc<Mutex<SessionState>>,
    /// Where to record resources, if anywhere.
    pub res: Option<ResCtx>,
    /// The driver's process (vhost-user: the frontend's pid), owner of its resources;
    /// `None`: this process.
    pub frontend_pid: Option<u32>,
    /// Busy-poll window of each queue worker (zero: off).
    pub poll: Duration,
    /// Features mandated at device creation beyond the device's own (seed 004).
    pub mandated: VirtioFeatures,
    /// Device feature bits withheld from the offer (a device attribute: `unoffer`).
    pub unoffered: VirtioFeatures,
    /// Transport feature bits offered besides the device's (vhost-user:
    /// VHOST_USER_F_PROTOCOL_FEATURES; VDUSE: VIRTIO_F_ACCESS_PLATFORM).
    pub transport_features: VirtioFeatures,
    /// Whether the status machine enforces the driver's write order (virtio 1.2 §3.1.1).
    /// vhost-user frontends proxy their driver's status and may skip steps (QEMU 7.2).
    pub strict_status_order: bool,
    /// Ring addresses are frontend virtual addresses (vhost-user) rather than guest
    /// addresses/IOVAs (VDUSE).
    pub addrs_are_uaddr: bool,
    /// The device's interrupt vectors: vector `i` is vring `i`'s call (seed 001).
    pub vectors: Arc<VectorTable>,
    /// How the driver is told the device changed.
    pub notify_config: ConfigNotifier,
    /// Ends the session from a queue worker when the driver's memory faulted under the
    /// daemon (a shrunk memory fd, see `uvdpa_virtio::fault`): vhost-user shuts the
    /// connection down, so the faulted memory is unmapped and the frontend must reconnect
    /// with a new table. `None`: the device only goes to DEVICE_NEEDS_RESET. Must not block.
    pub end_session: Option<SessionEnder>,
    /// The device's log limits, kept across its sessions: status lines go through
    /// `request`, ring failures through `ring`, so a frontend that loops breaking its ring
    /// and reconnecting cannot flood the log.
    pub log_limits: Arc<DeviceLogLimits>,
}

/// See [`RuntimeParams::end_session`].
pub type SessionEnder = Arc<dyn Fn() + Send + Sync>;

/// One device served to one driver: status, features, memory, vrings and their workers.
pub struct DeviceRuntime {
    name: String,
    device: Arc<dyn VirtioDevice>,
    transport_features: VirtioFeatures,
    unoffered: VirtioFeatures,
    acked: VirtioFeatures,
    status: StatusMachine,
    needs_reset: Arc<AtomicBool>,
    mem: Option<Arc<GuestMemory>>,
    vrings: Vec<VringState>,
    /// Worker groups, and the group of each vring.
    groups: Vec<Group>,
    group_of: Vec<usize>,
    stats: Arc<StatsTable>,
    state: Arc<Mutex<SessionState>>,
    res: Option<ResCtx>,
    poll: Duration,
    addrs_are_uaddr: bool,
    frontend: Owner,
    session_entry: Option<ResHandle>,
    mem_entries: Vec<ResHandle>,
    inflight: Option<Arc<InflightMap>>,
    /// The frontend's dirty bitmap (vhost-user SET_LOG_BASE); used while the acked
    /// features hold VHOST_F_LOG_ALL.
    log: Option<Arc<DirtyLog>>,
    vectors: Arc<VectorTable>,
    notify_config: ConfigNotifier,
    end_session: Option<SessionEnder>,
    log_limits: Arc<DeviceLogLimits>,
    closed: bool,
    /// Vrings are held stopped ([`DeviceRuntime::hold`]): none starts until
    /// [`DeviceRuntime::release`].
    held: bool,
}

impl DeviceRuntime {
    /// A fresh runtime (device status 0, no features, no memory, no vrings configured).
    /// `name` names the device in logs and worker threads.
    pub fn new(name: &str, p: RuntimeParams) -> Self {
        let RuntimeParams {
            device,
            stats,
            state,
            res,
            frontend_pid,
            poll,
            mandated,
            unoffered,
            transport_features,
            strict_status_order,
            addrs_are_uaddr,
            vectors,
            notify_config,
            end_session,
            log_limits,
        } = p;
        let status = StatusMachine::new(
            (device.features() - unoffered) | transport_features,
            device.mandated_features() | mandated,
        )
        .with_strict_order(strict_status_order);
        let n = device.num_queues();
        let vrings = (0..n).map(|_| VringState::default()).collect();
        let (groups, group_of) = queue_groups(&*device, VirtioFeatures::empty());
        let mut rt = Self {
            name: name.to_string(),
            device,
            transport_features,
            unoffered,
            acked: VirtioFeatures::empty(),
            status,
            needs_reset: Arc::new(AtomicBool::new(false)),
            mem: None,
            vrings,
            groups,
            group_of,
            stats,
            state,
            res,
            poll,
            addrs_are_uaddr,
            frontend: frontend_pid.map_or_else(Owner::current, Owner::of_pid),
            session_entry: None,
            mem_entries: Vec::new(),
            inflight: None,
            log: None,
            vectors,
            notify_config,
            end_session,
            log_limits,
            closed: false,
            held: false,
        };
        let entry = match rt.frontend.pid {
            0 => format!("{}-frontend", rt.name),
            pid => format!("{}-frontend-{pid}", rt.name),
        };
        rt.session_entry = rt.track(ResType::Session, entry, None, rt.frontend.clone());
        rt
    }

    /// The device's name (logs, worker threads).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device served.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    /// The device's interrupt vectors.
    pub fn vectors(&self) -> &Arc<VectorTable> {
        &self.vectors
    }

    /// Features offered: the device's (less the withheld ones) with the transport's.
    pub fn offered(&self) -> VirtioFeatures {
        (self.device.features() - self.unoffered) | self.transport_features
    }

    /// Features the driver acked (last [`DeviceRuntime::set_features`]).
    pub fn acked(&self) -> VirtioFeatures {
        self.acked
    }

    /// Number of vrings (the device's queues).
    pub fn num_vrings(&self) -> usize {
        self.vrings.len()
    }

    /// Vring `i` as configured, if `i` is in range.
    pub fn vring(&self, i: usize) -> Option<&VringState> {
        self.vrings.get(i)
    }

    /// The guest memory workers use, if set.
    pub fn memory(&self) -> Option<&Arc<GuestMemory>> {
        self.mem.as_ref()
    }

    /// The device status as the driver reads it (DEVICE_NEEDS_RESET included).
    pub fn device_status(&self) -> DeviceStatus {
        let mut s = self.status.status();
        if self.needs_reset.load(Ordering::Acquire) {
            s |= DeviceStatus::DEVICE_NEEDS_RESET;
        }
        s
    }

    /// Whether a worker failed and the device waits for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Checks `features` for FEATURES_OK (seed 004: inside the offer, mandated ones present)
    /// without changing anything.
    ///
    /// # Errors
    /// [`RuntimeError::Status`] naming the unoffered or missing bits.
    pub fn check_features(&self, features: VirtioFeatures) -> Result<(), RuntimeError> {
        Ok(self.status.check_features(features)?)
    }

    /// Applies the driver's features. The status machine sees `features` without the
    /// transport-only bits in `strip`; running rings restart with the handlers and queue
    /// layout of the new features.
    ///
    /// # Errors
    /// A ring that cannot restart ([`RuntimeError::Vring`], [`RuntimeError::Worker`]).
    pub fn set_features(
        &mut self,
        features: VirtioFeatures,
        strip: VirtioFeatures,
    ) -> Result<(), RuntimeError> {
        self.status.set_driver_features(features - strip);
        if features != self.acked {
            let running = self.stop_running_vrings();
            (self.groups, self.group_of) = queue_groups(&*self.device, features);
            self.acked = features;
            for i in running {
                self.update_vring(i)?;
            }
        }
        self.acked = features;
        Ok(())
    }

    /// A status write from the driver (virtio 1.2 §2.1, §3.1.1); 0 resets
    /// ([`DeviceRuntime::reset_status`]).
    ///
    /// # Errors
    /// [`RuntimeError::Status`]: the status machine refused (FEATURES_OK with unoffered or
    /// missing mandated features, bits cleared without a reset, steps out of order).
    pub fn set_status(&mut self, value: u8) -> Result<(), RuntimeError> {
        if value == 0 {
            self.reset_status();
            return Ok(());
        }
        let res = self.status.set_status(value);
        if let Some(suppressed) = self.log_limits.request.check() {
            info!(device = %self.name, status = ?self.status.status().names(), suppressed, "device status");
        }
        res?;
        Ok(())
    }

    /// Device reset by status (virtio 1.2 §2.1): every vring is stopped, its in-flight
    /// requests completed before its worker hands it back, and the status machine returns
    /// to 0. The vrings keep their configuration and the base they stopped at (a
    /// GET_VRING_BASE that follows reports where the ring really is); a vring runs again
    /// only after a new kick fd. The negotiated features are kept.
    pub fn reset_status(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop_vring(i);
            if let Some(v) = self.vrings.get_mut(i) {
                v.started = false;
                v.kick = None;
            }
        }
        let driver = self.status.driver_features();
        self.status.reset();
        self.status.set_driver_features(driver);
        self.needs_reset.store(false, Ordering::Release);
        if let Some(suppressed) = self.log_limits.request.check() {
            info!(device = %self.name, suppressed, "device status reset");
        }
    }

    /// Full device reset: every vring is stopped (in-flight requests complete first), then
    /// the state returns to what a new runtime has. Memory is kept; the transport drops
    /// it with [`DeviceRuntime::replace_memory`] if its protocol says so.
    pub fn reset(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop_vring(i);
        }
        for v in &mut self.vrings {
            *v = VringState::default();
        }
        (self.groups, self.group_of) = queue_groups(&*self.device, VirtioFeatures::empty());
        self.status.reset();
        self.needs_reset.store(false, Ordering::Release);
        self.acked = VirtioFeatures::empty();
        self.inflight = None;
        self.log = None;
        if let Some(suppressed) = self.log_limits.request.check() {
            info!(device = %self.name, suppressed, "device reset");
        }
    }

    /// Holds every vring stopped, for a live upgrade: running vrings stop where their
    /// workers stopped (requests already popped complete first, chains not yet popped stay
    /// in the avail ring, so each ring's base is both its next avail and its next used
    /// position), and none starts again, whatever the driver configures, until
    /// [`DeviceRuntime::release`]. Returns the vrings that were running.
    pub fn hold(&mut self) -> Vec<usize> {
        self.held = true;
        self.stop_running_vrings()
    }

    /// Ends a [`DeviceRuntime::hold`]: every vring that is ready starts (at its base).
    ///
    /// # Errors
    /// A ring that cannot start (the other rings are still started).
    pub fn release(&mut self) -> Result<(), RuntimeError> {
        self.held = false;
        let mut first = Ok(());
        for i in 0..self.vrings.len() {
            if let Err(e) = self.update_vring(i) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Lets go of a held runtime that another process serves now (live upgrade): unlike
    /// [`DeviceRuntime::close`], nothing is drained or flushed (the vrings are held, their
    /// requests completed) and nothing is said to the driver; the memory, fds and entries
    /// go when the runtime is dropped.
    pub fn abandon(&mut self) {
        self.closed = true;
        self.mem = None;
        self.mem_entries.clear();
        self.session_entry = None;
    }

    /// Whether the vrings are held ([`DeviceRuntime::hold`]).
    pub fn held(&self) -> bool {
        self.held
    }

    /// The inflight buffer, if the driver set one.
    pub fn inflight(&self) -> Option<&Arc<InflightMap>> {
        self.inflight.as_ref()
    }

    /// Whether a dirty log is installed (logging may still be off: see
    /// [`DeviceRuntime::logging`]).
    pub fn has_dirty_log(&self) -> bool {
        self.log.is_some()
    }

    /// Marks the device DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2) and notifies the driver.
    pub fn fail(&self, why: &str) {
        if let Some(suppressed) = self.log_limits.ring.check() {
            warn!(device = %self.name, suppressed, "Device needs reset: {why}");
        }
        self.needs_reset.store(true, Ordering::Release);
        (self.notify_config)();
    }

    /// Records an entry under `parent` (default: the device) if tracking is on.
    fn track(
        &self,
        ty: ResType,
        name: String,
        parent: Option<ResId>,
        owner: Owner,
    ) -> Option<ResHandle> {
        let ctx = self.res.as_ref()?;
        let h = ctx
            .tracker
            .create(ty, name, parent.or(Some(ctx.device)), owner);
        h.add();
        Some(h)
    }

    fn session_id(&self) -> Option<ResId> {
        self.session_entry.as_ref().map(ResHandle::id)
    }

    fn track_memory(&mut self) {
        self.mem_entries.clear();
        let Some(mem) = self.mem.clone() else { return };
        let parent = self.session_id();
        for r in mem.regions() {
            let name = format!("{}-gpa-{:#x}+{:#x}", self.name, r.gpa(), r.size());
            if let Some(h) = self.track(ResType::MemRegion, name, parent, self.frontend.clone()) {
                self.mem_entries.push(h);
            }
        }
    }

    /// Refreshes the state `dev show` reads; `extra` sets transport fields.
    pub fn publish_state(&self, extra: impl FnOnce(&mut SessionState)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.connected = true;
        st.features = self.acked.bits();
        st.status = self.device_status().bits();
        st.running_vrings = self.vrings.iter().filter(|v| v.running).count() as u16;
        extra(&mut st);
    }

    /// Stops running vrings, builds the new memory from the old regions, and restarts
    /// every vring that is ready. A failed build leaves no memory: rings wait for the next
    /// table (callers check what they can before calling).
    ///
    /// # Errors
    /// The build's error, a table still shared ([`RuntimeError::Device`]), or a ring that
    /// cannot restart.
    pub fn replace_memory(
        &mut self,
        build: impl FnOnce(Vec<MemoryRegion>) -> Result<Option<GuestMemory>, RuntimeError>,
    ) -> Result<(), RuntimeError> {
        self.stop_running_vrings();
        let old = match self.mem.take() {
            Some(arc) => match Arc::try_unwrap(arc) {
                Ok(m) => m.into_regions(),
                Err(arc) => {
                    // Still shared (cannot happen once workers are stopped): keep it.
                    self.mem = Some(arc);
                    return Err(RuntimeError::Device("guest memory still in use".into()));
                }
            },
            None => Vec::new(),
        };
        let result = build(old).map(|m| {
            self.mem = m.map(Arc::new);
        });
        self.track_memory();
        for i in 0..self.vrings.len() {
            self.update_vring(i)?;
        }
        result
    }

    /// Installs (or drops) the inflight buffer; running vrings restart to pick it up.
    ///
    /// # Errors
    /// A ring that cannot restart.
    pub fn set_inflight(&mut self, map: Option<Arc<InflightMap>>) -> Result<(), RuntimeError> {
        let running = self.stop_running_vrings();
        self.inflight = map;
        for i in running {
            self.update_vring(i)?;
        }
        Ok(())
    }

    /// Installs (or drops) the dirty log; running vrings restart to pick it up. It is used
    /// while the acked features hold VHOST_F_LOG_ALL (see [`DeviceRuntime::logging`]).
    ///
    /// # Errors
    /// A ring that cannot restart.
    pub fn set_dirty_log(&mut self, log: Option<Arc<DirtyLog>>) -> Result<(), RuntimeError> {
        let running = self.stop_running_vrings();
        self.log = log;
        for i in running {
            self.update_vring(i)?;
        }
        Ok(())
    }

    /// The dirty log the vrings write, when logging is on: a log is set and the driver
    /// acked VHOST_F_LOG_ALL.
    pub fn logging(&self) -> Option<&Arc<DirtyLog>> {
        self.log
            .as_ref()
            .filter(|_| self.acked.contains(VirtioFeatures::VHOST_F_LOG_ALL))
    }

    /// Ends the session: every vring completes the chains already in its avail ring and
    /// stops, completed writes are made durable, the driver's call fds and MTU are dropped
    /// and memory is unmapped.
    pub fn close(&mut self) {
        self.closed = true;
        for i in 0..self.vrings.len() {
            self.stop_vring_with(i, true);
        }
        if let Err(e) = self.device.flush() {
            warn!(device = %self.name, "Flush at disconnect failed: {}", e.0);
        }
        // Release the driver's call eventfds.
        let _ = self.vectors.set_irqs(0, 0, IrqAction::Eventfd(Vec::new()));
        // The next frontend sets its own MTU (NET_SET_MTU) or uses the device's.
        let _ = self.device.set_frontend_mtu(None);
        self.mem = None;
        self.mem_entries.clear();
        self.session_entry = None;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *st = SessionState::default();
    }
}

impl Drop for DeviceRuntime {
    fn drop(&mut self) {
        if !self.closed {
            self.close();
        }
    }
}
