//! The registry's side of a live upgrade (`uvdpa daemon --takeover`, see
//! [`crate::upgrade`]): which devices can move, pausing and resuming all of them, letting
//! them go once a new daemon serves them, and rebuilding them in the new daemon.

use std::os::fd::OwnedFd;
use std::time::Duration;

use tracing::info;
use uvdpa_devices::blk::BackendSpec;
use uvdpa_devices::net::device::NetBackendSpec;
use uvdpa_vduse::server::VduseHandover;
use uvdpa_vhost_user::ServerHandover;

use super::{error_chain, Dev, Prepared, Registry, RegistryError, Served};
use crate::config::{DeviceEntry, SizeValue};

/// What a paused device left for a new daemon, by transport.
pub enum Handed {
    /// A vhost-user device (listener, session image, counters).
    VhostUser(ServerHandover),
    /// A VDUSE device (device fd, kick fds, state).
    Vduse(VduseHandover),
}

impl Registry {
    /// The tables that recreate every device in a new daemon (a `ram` or `null` disk with
    /// its current capacity), in name order.
    ///
    /// # Errors
    /// [`RegistryError::Handover`] naming a device that cannot move: a net device on a
    /// `tap` backend (the TAP queue fds are not handed over yet).
    pub fn handover_entries(&self) -> Result<Vec<DeviceEntry>, RegistryError> {
        let devs = self.lock();
        let mut out = Vec::with_capacity(devs.len());
        for (name, m) in devs.iter() {
            let mut entry = m.spec.entry.clone();
            match &m.dev {
                Dev::Net(n, _) if matches!(n.backend, NetBackendSpec::Tap { .. }) => {
                    return Err(RegistryError::Handover(format!(
                        "{name} uses a tap backend (not handed over yet)"
                    )));
                }
                Dev::Blk(cfg, b) => {
                    if matches!(
                        cfg.backend,
                        BackendSpec::Ram { .. } | BackendSpec::Null { .. }
                    ) {
                        entry.size = Some(SizeValue::Bytes(b.capacity_bytes()));
                    }
                }
                Dev::Net(..) => {}
            }
            entry.name = Some(name.clone());
            out.push(entry);
        }
        Ok(out)
    }

    /// A duplicate of the memfd holding a `ram` disk's data (`None` for other devices).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`]; [`RegistryError::Handover`] if it cannot be duplicated.
    pub fn ram_fd(&self, name: &str) -> Result<Option<OwnedFd>, RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        match &m.dev {
            Dev::Blk(_, b) => b
                .ram_fd()
                .map(|fd| {
                    fd.try_clone_to_owned()
                        .map_err(|e| RegistryError::Handover(format!("{name}: ram memfd: {e}")))
                })
                .transpose(),
            Dev::Net(..) => Ok(None),
        }
    }

    /// Pauses every device for a takeover (see [`uvdpa_vhost_user::VhostUserServer::quiesce`])
    /// and returns what each left, by name. All or nothing: on an error the devices
    /// already paused are resumed.
    ///
    /// # Errors
    /// [`RegistryError::Handover`] with the first device's reason.
    pub fn quiesce_all(&self, timeout: Duration) -> Result<Vec<(String, Handed)>, RegistryError> {
        let devs = self.lock();
        let mut out = Vec::with_capacity(devs.len());
        let mut failed = None;
        for (name, m) in devs.iter() {
            let handed = match &m.server {
                Served::VhostUser(s) => s
                    .quiesce(timeout)
                    .map(Handed::VhostUser)
                    .map_err(|e| error_chain(&e)),
                Served::Vduse(s) => s
                    .quiesce(timeout)
                    .map(Handed::Vduse)
                    .map_err(|e| error_chain(&e)),
            };
            match handed {
                Ok(h) => out.push((name.clone(), h)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(devs);
        if let Some(why) = failed {
            self.resume_all();
            return Err(RegistryError::Handover(why));
        }
        Ok(out)
    }

    /// Resumes every paused device (a takeover that failed; or, in the new daemon, the
    /// start of serving the adopted devices).
    pub fn resume_all(&self) {
        for m in self.lock().values() {
            match &m.server {
                Served::VhostUser(s) => s.resume(),
                Served::Vduse(s) => s.resume(),
            }
        }
    }

    /// Lets every device go without a word to its frontend: another daemon serves them
    /// now. Sockets files, memfds and backends are left as they are; the registry is
    /// empty afterwards.
    pub fn detach_all(&self) {
        let devs = std::mem::take(&mut *self.lock());
        for (name, m) in devs {
            self.capture_stop_device(&name);
            match m.server {
                Served::VhostUser(s) => s.detach(),
                // Closes this process's copy of the device fd; the kernel device stays.
                Served::Vduse(s) => s.detach(),
            }
            info!(device = %name, "handed over");
        }
    }

    /// Serves a prepared device from what the previous daemon's server left; it stays
    /// paused until [`Registry::resume_all`].
    ///
    /// # Errors
    /// As [`Registry::install`], or the session image refused.
    pub fn adopt(&self, p: Prepared, h: Handed) -> Result<(), RegistryError> {
        self.install_with(p, Some(h)).map(|_| ())
    }
}
