//! Live upgrade of a VDUSE device: what a new daemon process needs to go on serving it
//! without the kernel's driver noticing.
//!
//! The old daemon's message loop stops between two requests and holds the vrings (popped
//! requests complete first, so each ring's base is both its next avail and its next used
//! position); its image is the device status, the acknowledged features and each vring's
//! size, addresses and base, with duplicates of the device fd (`/dev/vduse/NAME`, which the
//! kernel lets only one file hold) and of the kick eventfds the kernel signals (so they
//! need not be set up again, and a rollback finds them in place). The new daemon rebuilds
//! the runtime from it with the vrings held, and its message loop starts paused: nothing
//! runs there until [`VduseServer::resume`]; the old daemon lets go with
//! [`VduseServer::detach`], which leaves the kernel device as it is.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uvdpa_runtime::pause::Mode;
use uvdpa_virtio::{DeviceStatus, VirtioFeatures};

use super::{dev_err, Inner, ServeError, Shared, VduseServer};

/// One vring as the driver configured it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VringImage {
    /// Vring index.
    pub index: u16,
    /// Size in descriptors.
    pub size: u16,
    /// Descriptor table, driver area and device area IOVAs.
    pub addr: (u64, u64, u64),
    /// Next avail (and used) position: index (split), or slot with the wrap counter in
    /// bit 15 (packed).
    pub base: u16,
    /// The driver started it (a kick fd is set up).
    pub started: bool,
    /// The driver enabled it.
    pub enabled: bool,
}

/// The state of a held VDUSE device, besides its fds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VduseState {
    /// Device status bits.
    pub status: u8,
    /// Acknowledged features.
    pub features: u64,
    /// Configured vrings.
    pub vrings: Vec<VringImage>,
}

/// What a paused VDUSE device leaves for a new daemon.
pub struct VduseHandover {
    /// `/dev/vduse/NAME` (a duplicate).
    pub dev: OwnedFd,
    /// The kick eventfds, one per vring the kernel sees (duplicates).
    pub kicks: Vec<OwnedFd>,
    /// The per-queue counters' memfd (a duplicate).
    pub stats: OwnedFd,
    /// Status, features, vrings.
    pub state: VduseState,
}

/// What the message loop leaves when it pauses (the server adds the stats memfd).
pub(crate) struct LoopImage {
    dev: OwnedFd,
    kicks: Vec<OwnedFd>,
    state: VduseState,
}

/// What the message loop does after a pause.
pub(crate) enum AfterPause {
    Serve,
    Detach,
}

fn image(sh: &Shared, inner: &Inner) -> Result<LoopImage, String> {
    let rt = &inner.rt;
    if rt.needs_reset() {
        return Err("the device needs a reset".into());
    }
    let dup = |fd: std::os::fd::BorrowedFd<'_>, what: &str| {
        fd.try_clone_to_owned()
            .map_err(|e| format!("cannot duplicate the {what} fd: {e}"))
    };
    let mut vrings = Vec::new();
    for i in 0..sh.kicks.len() {
        let Some(v) = rt.vring(i) else { continue };
        let Some(addr) = v.addr else { continue };
        vrings.push(VringImage {
            index: i as u16,
            size: v.size,
            addr,
            base: v.base,
            started: v.started,
            enabled: v.enabled,
        });
    }
    Ok(LoopImage {
        dev: dup(sh.dev.as_fd(), "device")?,
        kicks: sh
            .kicks
            .iter()
            .map(|k| dup(k.as_fd(), "kick"))
            .collect::<Result<_, _>>()?,
        state: VduseState {
            status: rt.device_status().bits(),
            features: rt.acked().bits(),
            vrings,
        },
    })
}

/// The message loop's side of a pause: hold the vrings, leave an image if one is
/// wanted, wait for the verdict, restart the vrings on resume.
pub(crate) fn pause(sh: &Shared) -> AfterPause {
    let ctl = &sh.control;
    let mut st = ctl.lock();
    match st.mode {
        Mode::Serving => {
            drop(st);
            // Held with no pause to wait for: a resume came before this thread looked.
            let mut inner = sh.inner.lock().unwrap_or_else(|e| e.into_inner());
            if inner.rt.held() {
                if let Err(e) = inner.rt.release() {
                    warn!(device = %sh.name, "Vrings did not start after the takeover: {e}");
                }
                inner.rt.publish_state(|_| {});
            }
            return AfterPause::Serve;
        }
        Mode::Detached => return AfterPause::Detach,
        Mode::Paused => {}
    }
    {
        let mut inner = sh.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.rt.hold();
        if st.want_image && st.image.is_none() {
            st.image = Some(image(sh, &inner));
            ctl.cv.notify_all();
        }
    }
    let (st, mode) = ctl.wait_unpaused(st);
    drop(st);
    if mode == Mode::Detached {
        return AfterPause::Detach;
    }
    let mut inner = sh.inner.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = inner.rt.release() {
        warn!(device = %sh.name, "Vrings did not restart after a pause: {e}");
    }
    inner.rt.publish_state(|_| {});
    AfterPause::Serve
}

/// Rebuilds the runtime of an adopted device from `state`, its vrings held: the status
/// replayed step by step, the features acknowledged, guest memory through the IOTLB and
/// every configured vring with its kick eventfd.
pub(crate) fn restore(sh: &Shared, inner: &mut Inner, state: &VduseState) -> Result<(), String> {
    let rt = &mut inner.rt;
    rt.hold();
    let status = DeviceStatus::from_bits_retain(state.status);
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
            rt.set_features(
                VirtioFeatures::from_raw(state.features),
                VirtioFeatures::empty(),
            )
            .map_err(|e| e.to_string())?;
        }
        rt.set_status(replay.bits()).map_err(|e| e.to_string())?;
    }
    if !replay.contains(DeviceStatus::DRIVER_OK) {
        return Ok(());
    }
    let mem = sh
        .ops
        .clone()
        .guest_memory()
        .map_err(|e| format!("mapping the IOTLB: {e}"))?;
    rt.replace_memory(|_| Ok(Some(mem)))
        .map_err(|e| e.to_string())?;
    for v in &state.vrings {
        let i = usize::from(v.index);
        let kick = sh
            .kicks
            .get(i)
            .ok_or_else(|| format!("vring {i}: the device has {} vrings", sh.kicks.len()))?
            .clone();
        let v = v.clone();
        rt.reconfigure(i, |r| {
            r.size = v.size;
            r.addr = Some(v.addr);
            r.base = v.base;
            r.base_set = true;
            r.kick = v.started.then_some(kick);
            r.started = v.started;
            r.enabled = v.enabled;
        })
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl VduseServer {
    /// Pauses the device for a live upgrade: the message loop stops between two requests
    /// (requests the kernel sends meanwhile wait in the device fd for whoever serves
    /// next) and holds the vrings, and leaves an image of the device.
    ///
    /// # Errors
    /// [`ServeError::Device`]: already paused, not paused within `timeout`, or the device
    /// cannot be imaged (it is resumed before returning).
    pub fn quiesce(&self, timeout: Duration) -> Result<VduseHandover, ServeError> {
        let Some(sh) = &self.shared else {
            return Err(dev_err(&self.name, "stopped"));
        };
        let ctl = &sh.control;
        let mut st = ctl.lock();
        if st.mode != Mode::Serving {
            return Err(dev_err(&self.name, "already paused"));
        }
        st.mode = Mode::Paused;
        st.want_image = true;
        st.image = None;
        ctl.raise();
        let (mut st, paused) = ctl.wait_for(st, timeout, |st| st.image.is_some());
        let image = st.image.take();
        drop(st);
        let fail = |why: String| {
            self.resume();
            Err(dev_err(&self.name, why))
        };
        let image = match image {
            Some(Ok(i)) if paused => i,
            Some(Err(why)) => return fail(why),
            _ => return fail(format!("did not pause within {timeout:?}")),
        };
        let stats = match self.stats.fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => return fail(format!("cannot duplicate the stats memfd: {e}")),
        };
        Ok(VduseHandover {
            dev: image.dev,
            kicks: image.kicks,
            stats,
            state: image.state,
        })
    }

    /// Ends a pause: the vrings restart where they stopped and the message loop answers
    /// the kernel again (a failed upgrade; or, on an adopted device, the start of
    /// serving). A no-op when not paused.
    pub fn resume(&self) {
        let Some(sh) = &self.shared else { return };
        let ctl = &sh.control;
        let mut st = ctl.lock();
        if st.mode != Mode::Paused {
            return;
        }
        st.mode = Mode::Serving;
        st.want_image = false;
        st.image = None;
        ctl.clear();
        ctl.cv.notify_all();
        drop(st);
        info!(device = %self.name, "serving (resumed)");
    }

    /// Serves a device another daemon paused ([`VduseServer::quiesce`]): the runtime is
    /// rebuilt from its image and everything stays paused until [`VduseServer::resume`];
    /// [`VduseServer::detach`] gives up without touching the kernel device.
    ///
    /// # Errors
    /// [`ServeError::Device`]: the fds do not fit the device, the reconnect log cannot be
    /// opened, or the image was refused.
    pub fn adopt(
        name: &str,
        device: Arc<dyn uvdpa_virtio::VirtioDevice>,
        opts: super::VduseOptions,
        h: VduseHandover,
    ) -> Result<Self, ServeError> {
        let dev = Arc::new(crate::dev::DeviceFd::from_fd(h.dev).map_err(|e| dev_err(name, e))?);
        let bound = opts.bind;
        let mut server = Self::serve(super::Parts {
            name: name.to_string(),
            dev: dev.clone(),
            ops: dev,
            device,
            opts,
            created: false,
            kernel: true,
            adopt: Some(super::Adopted {
                kicks: h.kicks,
                stats: h.stats,
                state: h.state,
            }),
        })?;
        server.bound = bound;
        info!(device = name, "VDUSE device adopted (paused)");
        Ok(server)
    }
}
