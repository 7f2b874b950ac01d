//! A device served over VDUSE: created in the kernel (`/dev/vduse/control`), its message
//! loop answered on a thread, its vrings run by the transport-neutral
//! [`uvdpa_runtime::DeviceRuntime`], and optionally bound to the vDPA bus
//! (vdpa netlink `VDPA_CMD_DEV_NEW`, what `vdpa dev add name NAME mgmtdev vduse` sends).
//!
//! Message policy (Linux `Documentation/userspace-api/vduse.rst`, seed 004):
//! * `VDUSE_SET_STATUS`: through the runtime's status machine. FEATURES_OK reads the
//!   driver's features (`VDUSE_DEV_GET_FEATURES`) and is refused (`VDUSE_REQ_RESULT_FAILED`,
//!   so the kernel keeps the old status and the driver sees FEATURES_OK clear) for
//!   unoffered bits or missing mandated ones; DRIVER_OK starts every ready vring from
//!   `VDUSE_VQ_GET_INFO`; 0 (reset) is acknowledged only after every vring stopped and its
//!   in-flight requests completed, and drops the IOTLB mappings.
//! * `VDUSE_GET_VQ_STATE`: the ring stops (so its position is exact), is reported, and runs
//!   on.
//! * `VDUSE_UPDATE_IOTLB`: mappings overlapping the range are retired; the next access
//!   fetches the new mapping (`VDUSE_IOTLB_GET_FD`).
//! * anything else, or a malformed request: `VDUSE_REQ_RESULT_FAILED` and a log line. A
//!   request of the right size echoes its id even when its contents are invalid (an
//!   UPDATE_IOTLB with `start > last`); one of the wrong size carries no id to answer, so
//!   it is logged and skipped (the kernel, if it sent it, times it out).
//!
//! The loop never blocks on the kernel: the device fd is non-blocking and polled together
//! with a shutdown eventfd. It answers at most `DRAIN_BATCH` requests per wakeup before
//! looking at the shutdown fd again, so a flood cannot hold off a stop; and a device fd
//! that polls ready with nothing to read (a device the kernel marked broken after a
//! timed-out message polls EPOLLERR for good) is looked at again only every
//! `STALL_BACKOFF`, never in a busy loop.
//!
//! The few ioctls the policy itself calls go through `PolicyOps`, implemented by
//! [`DeviceFd`]; the unit tests (`server/tests.rs`) run the loop over a socketpair with a
//! fake in their place.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use tracing::{debug, info, warn};
use uvdpa_runtime::pause::{Mode, Pause};
use uvdpa_runtime::{DeviceRuntime, ResCtx, RuntimeParams, SessionState};
use uvdpa_virtio::interrupts::VectorTable;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::{DeviceStatus, GuestMemory, VirtioDevice, VirtioFeatures};

use crate::control::{Control, DevSpec};
use crate::dev::{DeviceFd, VqInfo};
use crate::error::VduseError;
use crate::message::{MessageError, Request, RequestKind, Response, RingLayout, VqState};
use crate::netlink::{MgmtDev, VdpaNetlink};
use crate::reconnect::ReconnectLog;
use crate::sys::{VduseDevRequest, REQUEST_SIZE};
use uvdpa_virtio::inflight::InflightLayout;

mod handover;
#[cfg(test)]
mod tests;

pub use handover::{VduseHandover, VduseState, VringImage};

/// Requests the loop answers per wakeup before it looks at the shutdown fd again.
pub(crate) const DRAIN_BATCH: usize = 64;

/// How long the loop leaves a device fd alone after a wakeup that brought no request
/// (error or hang-up reported, or read failing) before polling it again.
pub(crate) const STALL_BACKOFF: Duration = Duration::from_millis(200);

/// The device-fd ioctls the message policy calls: [`DeviceFd`]'s in production, a fake
/// kernel's in the unit tests (a socketpair standing in for the device fd answers every
/// ioctl with ENOTTY).
pub(crate) trait PolicyOps: Send + Sync {
    /// VDUSE_DEV_GET_FEATURES ([`DeviceFd::get_features`]).
    fn get_features(&self) -> Result<u64, VduseError>;
    /// VDUSE_VQ_GET_INFO ([`DeviceFd::vq_get_info`]).
    fn vq_get_info(&self, index: u32) -> Result<VqInfo, VduseError>;
    /// VDUSE_VQ_SETUP_KICKFD ([`DeviceFd::vq_setup_kickfd`]).
    fn vq_setup_kickfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<(), VduseError>;
    /// The guest memory workers use from DRIVER_OK on (IOTLB-mapped for a real device,
    /// see [`crate::iotlb::guest_memory`]).
    fn guest_memory(self: Arc<Self>) -> Result<GuestMemory, VduseError>;
}

impl PolicyOps for DeviceFd {
    fn get_features(&self) -> Result<u64, VduseError> {
        DeviceFd::get_features(self)
    }

    fn vq_get_info(&self, index: u32) -> Result<VqInfo, VduseError> {
        DeviceFd::vq_get_info(self, index)
    }

    fn vq_setup_kickfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<(), VduseError> {
        DeviceFd::vq_setup_kickfd(self, index, fd)
    }

    fn guest_memory(self: Arc<Self>) -> Result<GuestMemory, VduseError> {
        crate::iotlb::guest_memory(self)
    }
}

/// Options of a VDUSE device.
#[derive(Clone, Default)]
pub struct VduseOptions {
    /// Where the runtime records its resources.
    pub res: Option<ResCtx>,
    /// Each worker's busy-poll window after its ring runs empty (zero: sleep at once).
    pub poll: Duration,
    /// Features the driver must accept for FEATURES_OK beyond the device's own (seed 004).
    pub mandated: VirtioFeatures,
    /// Device features withheld from the offer (attribute `unoffer`).
    pub unoffered: VirtioFeatures,
    /// Add the device to the vDPA bus (vdpa netlink, mgmtdev `vduse`).
    pub bind: bool,
    /// The kernel's bounce buffer for this device, bytes (sysfs `bounce_size`); 0 keeps
    /// the kernel's default.
    pub bounce_size: u64,
    /// Where the reconnect log (`NAME.vduse`, see [`crate::reconnect`]) lives: a tmpfs
    /// directory that outlives the daemon (its run directory). `None`: no log, a restarted
    /// daemon cannot take the device over.
    pub log_dir: Option<PathBuf>,
}

/// Errors of [`VduseServer::start`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `/dev/vduse/control` could not be used.
    #[error("VDUSE control device: {0}")]
    Control(#[from] VduseError),
    /// The device fd could not be opened or set up.
    #[error("VDUSE device {name}: {reason}")]
    Device {
        /// Device name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Binding to the vDPA bus failed.
    #[error("Adding {name} to the vDPA bus failed: {source}")]
    Bind {
        /// Device name.
        name: String,
        /// The netlink error.
        #[source]
        source: crate::netlink::Error,
    },
}

/// Virtio features a VDUSE device offers besides the device's own: the kernel requires
/// VIRTIO_F_ACCESS_PLATFORM (every address is an IOVA of its IOTLB).
pub fn transport_features() -> VirtioFeatures {
    VirtioFeatures::VIRTIO_F_ACCESS_PLATFORM
}

/// Device feature bits the kernel refuses at VDUSE_CREATE_DEV (6.12): blk
/// VIRTIO_BLK_F_CONFIG_WCE (bit 11); net VIRTIO_NET_F_CTRL_VQ (bit 17), and with it what
/// needs the control queue: CTRL_RX (18), CTRL_VLAN (19), GUEST_ANNOUNCE (21), MQ (22),
/// CTRL_MAC_ADDR (23).
fn refused_features(device_type: u32) -> u64 {
    match device_type {
        2 => 1 << 11,
        1 => (1 << 17) | (1 << 18) | (1 << 19) | (1 << 21) | (1 << 22) | (1 << 23),
        _ => 0,
    }
}

/// Virtqueues the kernel sees: a net device without its control queue (one pair, as
/// VIRTIO_NET_F_MQ and CTRL_VQ are not offered); every queue otherwise.
fn vduse_vq_num(device: &dyn VirtioDevice) -> u16 {
    match device.device_type() {
        1 => 2,
        _ => device.num_queues(),
    }
}

/// The runtime and the log that records what it acknowledged.
struct Inner {
    rt: DeviceRuntime,
    log: Option<ReconnectLog>,
}

/// What the loop thread shares with the server handle.
struct Shared {
    name: String,
    /// The message channel (read requests, write responses) and interrupt injection.
    dev: Arc<DeviceFd>,
    /// The ioctls of the message policy (`dev` itself outside the unit tests).
    ops: Arc<dyn PolicyOps>,
    inner: Mutex<Inner>,
    /// One kick eventfd per vring, registered with VDUSE_VQ_SETUP_KICKFD at DRIVER_OK.
    kicks: Vec<Arc<OwnedFd>>,
    /// Times the device fd polled ready (the unit tests check the loop does not spin).
    wakeups: AtomicU64,
    /// Live-upgrade pause state of the message loop.
    control: Pause<handover::LoopImage>,
}

/// What a device handed over by another daemon comes with (see [`VduseServer::adopt`]).
pub(crate) struct Adopted {
    /// The kick eventfds the kernel signals.
    pub kicks: Vec<OwnedFd>,
    /// The per-queue counters' memfd.
    pub stats: OwnedFd,
    /// Status, features and vrings to restore.
    pub state: VduseState,
}

/// What [`VduseServer::serve`] runs: an open device fd and the device behind it.
pub(crate) struct Parts {
    /// Device name.
    pub name: String,
    /// The device fd (`/dev/vduse/NAME`, or a socket standing in for it).
    pub dev: Arc<DeviceFd>,
    /// The policy's ioctls (`dev` itself, or a fake).
    pub ops: Arc<dyn PolicyOps>,
    /// The device served.
    pub device: Arc<dyn VirtioDevice>,
    /// Options (`bind` and `bounce_size` are the caller's business).
    pub opts: VduseOptions,
    /// The device was created for this server; `false`: take it over from the reconnect
    /// log.
    pub created: bool,
    /// A kernel device that a stop with destroy removes through `/dev/vduse/control`
    /// (`false` for a stand-in fd).
    pub kernel: bool,
    /// Handed over by another daemon: restore this instead of reattaching from the log,
    /// and start paused.
    pub adopt: Option<Adopted>,
}

/// A device served over VDUSE.
pub struct VduseServer {
    name: String,
    /// Dropped on stop: the last strong reference to the device fd, which must be closed
    /// before VDUSE_DESTROY_DEV (the kernel refuses to destroy an open device).
    shared: Option<Arc<Shared>>,
    stats: Arc<StatsTable>,
    state: Arc<Mutex<SessionState>>,
    vectors: Arc<VectorTable>,
    device: Arc<dyn VirtioDevice>,
    shutdown: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    bound: bool,
    created: bool,
    /// Destroy through `/dev/vduse/control` on shutdown (see [`Parts::kernel`]).
    kernel: bool,
}

fn dev_err(name: &str, reason: impl std::fmt::Display) -> ServeError {
    ServeError::Device {
        name: name.into(),
        reason: reason.to_string(),
    }
}

impl VduseServer {
    /// Creates (or, after a daemon restart, reattaches to) VDUSE device `name` for
    /// `device`, starts answering its messages, and binds it to the vDPA bus if asked.
    ///
    /// # Errors
    /// [`ServeError`]: no VDUSE in this kernel (`/dev/vduse/control` missing), a device the
    /// kernel refused, or a failed bind (the device is destroyed again).
    pub fn start(
        name: &str,
        device: Arc<dyn VirtioDevice>,
        opts: VduseOptions,
    ) -> Result<Self, ServeError> {
        let control = Control::open()?;
        control.set_api_version(0)?;
        let features = ((device.features() - opts.unoffered) | transport_features()).bits()
            & !refused_features(device.device_type());
        let vq_num = vduse_vq_num(&*device);
        let spec = DevSpec {
            name: name.to_string(),
            device_id: device.device_type(),
            vendor_id: 0,
            features,
            vq_num: u32::from(vq_num),
            vq_align: 4096,
            config: device.config(),
        };
        let created = match control.create_dev(&spec) {
            Ok(()) => {
                info!(device = name, "VDUSE device created");
                true
            }
            Err(VduseError::Exists { .. }) => {
                info!(device = name, "VDUSE device exists: reattaching");
                false
            }
            Err(e) => return Err(e.into()),
        };
        // Called with the device fd closed (the kernel refuses to destroy an open device).
        let undo = |e: ServeError| {
            if created {
                let _ = control.destroy_dev(name);
            }
            e
        };
        if created && opts.bounce_size != 0 {
            let attr = Path::new("/sys/class/vduse").join(name).join("bounce_size");
            if let Err(e) = std::fs::write(&attr, opts.bounce_size.to_string()) {
                return Err(undo(dev_err(
                    name,
                    format!(
                        "setting bounce_size {} in {}: {e}",
                        opts.bounce_size,
                        attr.display()
                    ),
                )));
            }
        }
        let dev = Arc::new(DeviceFd::open(name).map_err(|e| undo(dev_err(name, e)))?);
        if created {
            for i in 0..vq_num {
                if let Err(e) = dev.vq_setup(u32::from(i), device.queue_size()) {
                    drop(dev);
                    return Err(undo(dev_err(name, format!("VDUSE_VQ_SETUP {i}: {e}"))));
                }
            }
        }
        let bind = opts.bind;
        let mut server = Self::serve(Parts {
            name: name.to_string(),
            dev: dev.clone(),
            ops: dev,
            device,
            opts,
            created,
            kernel: true,
            adopt: None,
        })
        .map_err(undo)?;
        if bind {
            let bind = || -> Result<bool, crate::netlink::Error> {
                let nl = VdpaNetlink::connect()?;
                if nl.dev_get(name)?.is_some() {
                    return Ok(false);
                }
                nl.dev_new(name, &MgmtDev::vduse())?;
                Ok(true)
            };
            match bind() {
                Ok(added) => {
                    server.bound = true;
                    info!(device = name, added, "on the vDPA bus");
                }
                Err(source) => {
                    server.stop(true);
                    return Err(ServeError::Bind {
                        name: name.into(),
                        source,
                    });
                }
            }
        }
        info!(device = name, "serving VDUSE");
        Ok(server)
    }

    /// Serves an open device fd: the runtime, the kick eventfds, the reconnect log (taking
    /// the device over from it unless `created`) and the message loop thread. Nothing of
    /// `parts` outlives an error (the device fd is closed when this returns).
    ///
    /// # Errors
    /// [`ServeError::Device`] naming what could not be set up.
    pub(crate) fn serve(parts: Parts) -> Result<Self, ServeError> {
        let Parts {
            name,
            dev,
            ops,
            device,
            opts,
            created,
            kernel,
            adopt,
        } = parts;
        let name = name.as_str();
        let nq = device.num_queues();
        let vq_num = vduse_vq_num(&*device);
        let (stats, kick_fds, restore) = match adopt {
            Some(a) => (
                StatsTable::adopt(a.stats, usize::from(nq)),
                Some(a.kicks),
                Some(a.state),
            ),
            None => (StatsTable::new(name, usize::from(nq)), None, None),
        };
        let stats = stats.map_err(|e| dev_err(name, format!("stats table: {e}")))?;
        // Weak: the server's stop closes the fd by dropping the last strong reference.
        let inject_dev = Arc::downgrade(&dev);
        let vectors = Arc::new(VectorTable::with_injector(
            nq,
            Arc::new(move |i| {
                if let Some(d) = inject_dev.upgrade() {
                    let _ = d.vq_inject_irq(u32::from(i));
                }
            }),
        ));
        let state = Arc::new(Mutex::new(SessionState::default()));
        let config_dev = Arc::downgrade(&dev);
        let rt = DeviceRuntime::new(
            name,
            RuntimeParams {
                device: device.clone(),
                stats: stats.clone(),
                state: state.clone(),
                res: opts.res.clone(),
                frontend_pid: None,
                poll: opts.poll,
                mandated: opts.mandated,
                unoffered: opts.unoffered,
                transport_features: transport_features(),
                strict_status_order: true,
                addrs_are_uaddr: false,
                vectors: vectors.clone(),
                notify_config: Arc::new(move || {
                    config_dev
                        .upgrade()
                        .is_some_and(|d| d.inject_config_irq().is_ok())
                }),
                // The IOTLB fds come from the kernel, not from a driver that could shrink
                // them; a fault there leaves the device in DEVICE_NEEDS_RESET.
                end_session: None,
                log_limits: Arc::default(),
            },
        );
        let kicks = match kick_fds {
            Some(k) if k.len() == usize::from(vq_num) => k.into_iter().map(Arc::new).collect(),
            Some(k) => {
                return Err(dev_err(
                    name,
                    format!("{} kick fds handed over for {vq_num} vrings", k.len()),
                ))
            }
            None => {
                let mut kicks = Vec::with_capacity(usize::from(vq_num));
                for _ in 0..vq_num {
                    let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                        .map_err(|e| dev_err(name, format!("eventfd: {e}")))?;
                    kicks.push(Arc::new(fd));
                }
                kicks
            }
        };
        let mode = if restore.is_some() {
            Mode::Paused
        } else {
            Mode::Serving
        };
        let log_path = opts
            .log_dir
            .as_ref()
            .map(|d| d.join(format!("{name}.vduse")));
        let log = match (&log_path, created) {
            (None, _) => None,
            (Some(p), true) => Some(
                ReconnectLog::create(p, vq_num, device.queue_size())
                    .map_err(|e| dev_err(name, format!("reconnect log {}: {e}", p.display())))?,
            ),
            (Some(p), false) => Some(ReconnectLog::open(p, vq_num, device.queue_size()).map_err(
                |e| {
                    dev_err(
                        name,
                        format!(
                            "it exists in the kernel but its reconnect log cannot be used ({e}); \
                             remove it with `vdpa dev del {name}` and destroy it, or restart with the same run directory"
                        ),
                    )
                },
            )?),
        };
        let shared = Arc::new(Shared {
            name: name.to_string(),
            dev,
            ops,
            inner: Mutex::new(Inner { rt, log }),
            kicks,
            wakeups: AtomicU64::new(0),
            control: Pause::new(mode).map_err(|e| dev_err(name, e))?,
        });
        {
            let mut guard = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
            let inner = &mut *guard;
            if let Some(log) = &inner.log {
                let _ = inner.rt.set_inflight(Some(log.inflight().clone()));
            }
            match &restore {
                Some(state) => handover::restore(&shared, inner, state)
                    .map_err(|e| dev_err(name, format!("restoring the handed-over state: {e}")))?,
                None if !created => reattach(&shared, inner).map_err(|e| dev_err(name, e))?,
                None => {}
            }
            inner.rt.publish_state(|_| {});
        }
        let shutdown = Arc::new(eventfd(0, EventfdFlags::CLOEXEC).map_err(|e| dev_err(name, e))?);
        let (sh, stop) = (shared.clone(), shutdown.clone());
        let thread = std::thread::Builder::new()
            .name(format!("{name}-vduse"))
            .spawn(move || message_loop(&sh, &stop))
            .map_err(|e| dev_err(name, e))?;
        Ok(Self {
            name: name.to_string(),
            shared: Some(shared),
            stats,
            state,
            vectors,
            device,
            shutdown,
            thread: Some(thread),
            bound: false,
            created,
            kernel,
        })
    }

    /// The runtime's state for `dev show`.
    pub fn session_state(&self) -> SessionState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Per-queue counters.
    pub fn stats(&self) -> &Arc<StatsTable> {
        &self.stats
    }

    /// The device's vector table (vector `i` injects vring `i`'s interrupt).
    pub fn vectors(&self) -> &Arc<VectorTable> {
        &self.vectors
    }

    /// The device served.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    /// The VDUSE character device (`/dev/vduse/NAME`).
    pub fn path(&self) -> PathBuf {
        Path::new("/dev/vduse").join(&self.name)
    }

    /// Whether this server took over a device a previous daemon left in the kernel.
    pub fn reattached(&self) -> bool {
        !self.created
    }

    /// Whether the device was added to the vDPA bus by this server.
    pub fn bound(&self) -> bool {
        self.bound
    }

    /// Tells the driver the config space changed (VDUSE_DEV_SET_CONFIG with the device's
    /// current config, then VDUSE_DEV_INJECT_CONFIG_IRQ).
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn config_changed(&self) -> Result<(), ServeError> {
        let Some(sh) = &self.shared else {
            return Err(dev_err(&self.name, "stopped"));
        };
        let config = self.device.config();
        sh.dev
            .set_config(0, &config)
            .and_then(|()| sh.dev.inject_config_irq())
            .map_err(|e| dev_err(&self.name, e))
    }

    /// Removes the device: unbinds it from the vDPA bus (the kernel resets it through the
    /// message loop, so in-flight requests complete), stops the loop and destroys it.
    pub fn shutdown(mut self) {
        self.stop(true);
    }

    /// Stops serving without destroying the kernel device (a daemon restart reattaches).
    pub fn detach(mut self) {
        self.stop(false);
    }

    fn stop(&mut self, destroy: bool) {
        if destroy && self.bound {
            match VdpaNetlink::connect().and_then(|nl| nl.dev_del(&self.name)) {
                Ok(()) => info!(device = %self.name, "removed from the vDPA bus"),
                Err(e) => warn!(device = %self.name, "Removing from the vDPA bus failed: {e}"),
            }
            self.bound = false;
        }
        let _ = rustix::io::write(&*self.shutdown, &1u64.to_ne_bytes());
        let mut handed_over = false;
        if let Some(sh) = &self.shared {
            // A paused loop waits for a verdict, not for the shutdown fd.
            let mut st = sh.control.lock();
            if st.mode == Mode::Paused {
                st.mode = Mode::Detached;
                handed_over = true;
                sh.control.raise();
                sh.control.cv.notify_all();
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let Some(shared) = self.shared.take() else {
            return;
        };
        let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        if handed_over {
            // Another daemon serves it: nothing to drain or flush.
            inner.rt.abandon();
        } else {
            inner.rt.close();
        }
        let log = inner.log.take();
        drop(inner);
        // Closes the device fd (the loop thread has ended; workers are stopped).
        drop(shared);
        if destroy {
            if let Some(log) = log {
                log.remove();
            }
        }
        if destroy && self.kernel {
            match Control::open().and_then(|c| c.destroy_dev(&self.name)) {
                Ok(()) => info!(device = %self.name, "VDUSE device destroyed"),
                Err(e) => warn!(device = %self.name, "Destroying the VDUSE device failed: {e}"),
            }
        }
    }
}

impl Drop for VduseServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(true);
        }
    }
}

/// Answers the device fd's requests until `shutdown` fires.
fn message_loop(sh: &Shared, shutdown: &OwnedFd) {
    let timeout = Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    // Whether the last wakeup brought nothing but an error or hang-up (logged once).
    let mut stalled = false;
    // An adopted device starts paused; its resume may come before the first poll.
    if let handover::AfterPause::Detach = handover::pause(sh) {
        return;
    }
    loop {
        let wake = sh.control.wake_fd();
        let mut fds = [
            PollFd::new(&*sh.dev, PollFlags::IN),
            PollFd::new(shutdown, PollFlags::IN),
            PollFd::new(&wake, PollFlags::IN),
        ];
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                warn!(device = %sh.name, "Polling the VDUSE device failed: {e}");
                return;
            }
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        if !fds[2].revents().is_empty() {
            match handover::pause(sh) {
                handover::AfterPause::Serve => continue,
                handover::AfterPause::Detach => return,
            }
        }
        let revents = fds[0].revents();
        if revents.is_empty() {
            continue;
        }
        sh.wakeups.fetch_add(1, Ordering::Relaxed);
        let (progress, failed) = drain(sh, stalled);
        if progress > 0 {
            stalled = false;
        } else if failed || revents.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
            // Ready with nothing to read: a device the kernel marked broken (EPOLLERR), a
            // stand-in whose peer hung up, or read failing. Polling at once would spin.
            if !stalled {
                warn!(
                    device = %sh.name,
                    "The VDUSE device fd polls {revents:?} with no request to read: looking again every {STALL_BACKOFF:?}"
                );
                stalled = true;
            }
            let backoff = Timespec {
                tv_sec: i64::try_from(STALL_BACKOFF.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(STALL_BACKOFF.subsec_nanos()),
            };
            let mut stop = [PollFd::new(shutdown, PollFlags::IN)];
            if poll(&mut stop, Some(&backoff)).is_ok() && !stop[0].revents().is_empty() {
                return;
            }
        }
    }
}

/// Answers up to [`DRAIN_BATCH`] queued requests, each with exactly one response.
/// Returns how many messages were consumed (answered or skipped as malformed) and whether
/// reading failed; `quiet` (the fd is known to be stalled) turns read failures into debug
/// lines.
fn drain(sh: &Shared, quiet: bool) -> (usize, bool) {
    let mut progress = 0;
    for _ in 0..DRAIN_BATCH {
        match read_request(&sh.dev) {
            Ok(Incoming::Request(req)) => {
                progress += 1;
                let resp = handle(sh, &req);
                answer(sh, &resp);
            }
            Ok(Incoming::Malformed { id, len, error }) => {
                progress += 1;
                match id {
                    Some(id) => {
                        warn!(device = %sh.name, "Malformed VDUSE request {id}: {error}; answering FAILED");
                        answer(sh, &Response::failed(id));
                    }
                    // No id to answer by: the kernel (if it sent this) times the request
                    // out on its side (msg_timeout).
                    None => warn!(device = %sh.name, len, "Unreadable VDUSE request: {error}"),
                }
            }
            Ok(Incoming::Empty) => return (progress, false),
            Ok(Incoming::Nothing) => {
                // A zero-length read: an empty message from a stand-in fd, or its peer gone
                // (then HUP is reported too). Nothing to answer.
                debug!(device = %sh.name, "Zero-length read from the VDUSE device fd");
                return (progress, false);
            }
            Err(e) => {
                if quiet {
                    debug!(device = %sh.name, "Reading a VDUSE request failed: {e}");
                } else {
                    warn!(device = %sh.name, "Reading a VDUSE request failed: {e}");
                }
                return (progress, true);
            }
        }
    }
    (progress, false)
}

fn answer(sh: &Shared, resp: &Response) {
    if let Err(e) = sh.dev.write_response(resp) {
        warn!(device = %sh.name, "Answering VDUSE request {} failed: {e}", resp.request_id);
    }
}

/// One read from the device fd.
enum Incoming {
    /// A well-formed request.
    Request(Request),
    /// A message that does not parse; `id` if it was full-size (its id is then the
    /// kernel's, to answer by).
    Malformed {
        id: Option<u32>,
        len: usize,
        error: MessageError,
    },
    /// No message pending (EAGAIN).
    Empty,
    /// A read of zero bytes.
    Nothing,
}

/// Reads one message without blocking (the fd is non-blocking, see
/// [`DeviceFd::from_fd`]); unlike [`DeviceFd::read_request`], a full-size message that
/// does not parse keeps its request id.
fn read_request(dev: &DeviceFd) -> Result<Incoming, VduseError> {
    const OFF_ID: usize = std::mem::offset_of!(VduseDevRequest, request_id);
    let mut buf = [0u8; REQUEST_SIZE];
    loop {
        return match rustix::io::read(dev, &mut buf) {
            Ok(0) => Ok(Incoming::Nothing),
            Ok(len) => {
                let bytes = buf.get(..len).unwrap_or(&buf);
                Ok(match Request::parse(bytes) {
                    Ok(req) => Incoming::Request(req),
                    Err(error) => Incoming::Malformed {
                        id: (len == REQUEST_SIZE)
                            .then(|| buf.get(OFF_ID..OFF_ID + 4))
                            .flatten()
                            .and_then(|b| b.try_into().ok())
                            .map(u32::from_ne_bytes),
                        len,
                        error,
                    },
                })
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => Ok(Incoming::Empty),
            Err(errno) => Err(VduseError::Read { errno }),
        };
    }
}

/// Answers one request (see the module documentation for the policy).
fn handle(sh: &Shared, req: &Request) -> Response {
    let mut guard = sh.inner.lock().unwrap_or_else(|e| e.into_inner());
    let Inner { rt, log } = &mut *guard;
    let id = req.request_id;
    let resp = match req.kind {
        RequestKind::SetStatus { status } => match set_status(sh, rt, log.as_ref(), status) {
            Ok(()) => {
                if let Some(log) = log {
                    log.record(status, rt.acked().bits());
                }
                Response::ok(id)
            }
            Err(e) => {
                warn!(device = %sh.name, status = format_args!("{status:#x}"), "SET_STATUS refused: {e}");
                Response::failed(id)
            }
        },
        RequestKind::GetVqState { index } => {
            let i = index as usize;
            if i >= rt.num_vrings() {
                warn!(device = %sh.name, index, "GET_VQ_STATE for a vring the device does not have");
                Response::failed(id)
            } else {
                rt.stop_vring(i);
                let base = rt.vring(i).map_or(0, |v| v.base);
                let _ = rt.update_vring(i);
                if rt.acked().contains(VirtioFeatures::VIRTIO_F_RING_PACKED) {
                    // The device completes in order of its wrap counter and slot: the used
                    // position equals the avail one once the ring stopped.
                    let (wrap, idx) = (base & 0x8000 != 0, base & 0x7fff);
                    Response::vq_state_packed(id, index, wrap, idx, wrap, idx)
                } else {
                    Response::vq_state_split(id, index, base)
                }
            }
        }
        RequestKind::UpdateIotlb { start, last } => {
            if let Some(mem) = rt.memory() {
                // Every IOTLB mapping is a late region (see `iotlb::guest_memory`), so
                // none is fixed; a fixed one would keep serving the stale range.
                if mem.invalidate(start, last).fixed_overlap {
                    warn!(device = %sh.name, "IOTLB invalidation overlaps a fixed mapping");
                }
            }
            debug!(device = %sh.name, start = format_args!("{start:#x}"), last = format_args!("{last:#x}"), "IOTLB range invalidated");
            Response::ok(id)
        }
        RequestKind::Unknown { ty } => {
            warn!(device = %sh.name, ty, "Unknown VDUSE request type");
            Response::failed(id)
        }
    };
    rt.publish_state(|_| {});
    resp
}

fn set_status(
    sh: &Shared,
    rt: &mut DeviceRuntime,
    log: Option<&ReconnectLog>,
    status: u8,
) -> Result<(), String> {
    if status == 0 {
        // Acknowledged only once every vring stopped (in-flight requests completed).
        rt.reset_status();
        let _ = rt.replace_memory(|_| Ok(None));
        for (i, _) in sh.kicks.iter().enumerate() {
            let _ = sh.ops.vq_setup_kickfd(i as u32, None);
        }
        return Ok(());
    }
    let old = rt.device_status();
    let new = DeviceStatus::from_bits_retain(status);
    if new.contains(DeviceStatus::FEATURES_OK) && !old.contains(DeviceStatus::FEATURES_OK) {
        let features = VirtioFeatures::from_raw(sh.ops.get_features().map_err(|e| e.to_string())?);
        rt.check_features(features).map_err(|e| e.to_string())?;
        rt.set_features(features, VirtioFeatures::empty())
            .map_err(|e| e.to_string())?;
    }
    rt.set_status(status).map_err(|e| e.to_string())?;
    if new.contains(DeviceStatus::DRIVER_OK) && !old.contains(DeviceStatus::DRIVER_OK) {
        if let Some(log) = log {
            // A fresh start: the log's inflight area is laid out anew for this ring layout
            // (no ring runs, so nothing tracks in it).
            let packed = rt.acked().contains(VirtioFeatures::VIRTIO_F_RING_PACKED);
            log.inflight()
                .init_layout(InflightLayout::for_ring(packed))
                .map_err(|e| format!("reconnect log: {e}"))?;
        }
        start_vrings(sh, rt, false)?;
    }
    Ok(())
}

/// After a daemon restart: replays the status and features the previous daemon
/// acknowledged (from the reconnect log) and, if the driver was running, resumes every
/// ready vring where its used ring stands, resubmitting what was in flight.
fn reattach(sh: &Shared, inner: &mut Inner) -> Result<(), String> {
    let Some(log) = &inner.log else {
        return Err("no reconnect log to take the device over with".into());
    };
    let (status, _) = log.recorded();
    let status = DeviceStatus::from_bits_retain(status);
    let rt = &mut inner.rt;
    let mut replay = DeviceStatus::empty();
    for step in [
        DeviceStatus::ACKNOWLEDGE,
        DeviceStatus::DRIVER,
        DeviceStatus::FEATURES_OK,
        DeviceStatus::DRIVER_OK,
    ] {
        if !status.contains(step) {
            break;
        }
        replay |= step;
        if step == DeviceStatus::FEATURES_OK {
            let features =
                VirtioFeatures::from_raw(sh.ops.get_features().map_err(|e| e.to_string())?);
            rt.set_features(features, VirtioFeatures::empty())
                .map_err(|e| e.to_string())?;
        }
        rt.set_status(replay.bits()).map_err(|e| e.to_string())?;
    }
    if replay.contains(DeviceStatus::DRIVER_OK) {
        start_vrings(sh, rt, true)?;
    }
    info!(device = %sh.name, status = ?replay.names(), "reattached to the VDUSE device");
    Ok(())
}

/// At DRIVER_OK: guest memory through the IOTLB, and every ready vring from
/// VDUSE_VQ_GET_INFO with our kick eventfd.
///
/// With `resume` (a restarted daemon), a split ring starts at its used index: every entry
/// the previous daemon took is either used or still marked in the reconnect log, from where
/// it is resubmitted first.
fn start_vrings(sh: &Shared, rt: &mut DeviceRuntime, resume: bool) -> Result<(), String> {
    let mem = sh
        .ops
        .clone()
        .guest_memory()
        .map_err(|e| format!("mapping the IOTLB: {e}"))?;
    rt.replace_memory(|_| Ok(Some(mem)))
        .map_err(|e| e.to_string())?;
    let packed = rt.acked().contains(VirtioFeatures::VIRTIO_F_RING_PACKED);
    for (i, kick) in sh.kicks.iter().enumerate() {
        let info: VqInfo = sh
            .ops
            .vq_get_info(i as u32)
            .map_err(|e| format!("VDUSE_VQ_GET_INFO {i}: {e}"))?;
        if !info.ready {
            continue;
        }
        let num = u16::try_from(info.num).map_err(|_| format!("vring {i}: size {}", info.num))?;
        sh.ops
            .vq_setup_kickfd(i as u32, Some(kick.as_fd()))
            .map_err(|e| format!("VDUSE_VQ_SETUP_KICKFD {i}: {e}"))?;
        let base = if packed {
            match info.state(RingLayout::Packed) {
                VqState::Packed(p) => (u16::from(p.last_avail_counter) << 15) | p.last_avail_idx,
                VqState::Split { avail_index } => avail_index,
            }
        } else if resume {
            let mut idx = [0u8; 2];
            rt.memory()
                .ok_or("no guest memory")?
                .read(info.device_addr + 2, &mut idx)
                .map_err(|e| format!("vring {i}: reading the used index: {e}"))?;
            u16::from_le_bytes(idx)
        } else {
            match info.state(RingLayout::Split) {
                VqState::Split { avail_index } => avail_index,
                VqState::Packed(p) => p.last_avail_idx,
            }
        };
        let kick = kick.clone();
        rt.reconfigure(i, |v| {
            v.size = num;
            v.addr = Some((info.desc_addr, info.driver_addr, info.device_addr));
            v.base = base;
            v.base_set = true;
            v.kick = Some(kick);
            v.started = true;
            v.enabled = true;
        })
        .map_err(|e| e.to_string())?;
        // A kick the driver sent before our fd was installed is not lost: the ring is
        // looked at once when its worker starts.
        let _ = rustix::io::write(&*sh.kicks[i], &1u64.to_ne_bytes());
    }
    info!(device = %sh.name, "driver ready: vrings started");
    Ok(())
}
