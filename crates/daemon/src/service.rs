//! Running under a service manager: readiness and reload notifications to systemd
//! (`sd_notify` through `$NOTIFY_SOCKET`, a no-op without it), and the config reload of
//! SIGHUP (systemd's `ExecReload`), which adds and removes the devices whose `[[device]]`
//! tables were added to or removed from the file and leaves the others alone.

use std::collections::BTreeMap;

use sd_notify::NotifyState;
use tracing::{debug, info, warn};

use crate::config::{DeviceEntry, DeviceSpec};
use crate::registry::{DeviceView, Registry, RegistryError};

/// `e` and its sources, joined by ": " (each source once, even when a message already
/// quotes it).
pub fn error_chain(e: &dyn std::error::Error) -> String {
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

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("Cannot notify the service manager ($NOTIFY_SOCKET): {e}");
    }
}

/// Tells systemd (`Type=notify`) that every configured device is served: `READY=1` and a
/// `STATUS=` line naming how many.
pub fn notify_ready(registry: &Registry) {
    let n = registry.names().len();
    let status = format!("serving {n} device(s)");
    debug!("sd_notify READY=1");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// `MAINPID=<this process>`: after a live upgrade the new daemon is the service's main
/// process (the unit needs `NotifyAccess=all` for systemd to take it from a process that
/// is not the main one yet).
pub fn notify_main_pid() {
    notify(&[NotifyState::MainPid(std::process::id())]);
}

/// `RELOADING=1` with the monotonic time systemd 253+ asks for; `notify_ready` ends it.
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Devices now served that were not before (new or changed tables).
    pub added: Vec<DeviceView>,
    /// Devices removed (tables gone or changed).
    pub removed: Vec<String>,
    /// Devices of the new file that could not be served, with why.
    pub failed: Vec<(String, String)>,
}

/// The devices the config file declares, as last read. Devices added at run time with
/// `uvdpa dev add` are not in it, so a reload never removes them.
#[derive(Debug, Default)]
pub struct Declared {
    entries: BTreeMap<String, DeviceEntry>,
}

impl Declared {
    /// The devices of the file the daemon started from.
    pub fn new(entries: Vec<DeviceEntry>) -> Self {
        Self {
            entries: entries
                .into_iter()
                .filter_map(|e| Some((e.name.clone()?, e)))
                .collect(),
        }
    }

    /// Applies a newly read file: devices whose table is gone are removed; devices whose
    /// table changed are removed and created again from the new table; new tables are
    /// served; a device whose table is unchanged is not touched (its socket, frontend and
    /// queues keep running), unless it is no longer served (deleted with `uvdpa dev del`,
    /// or failed to start before), in which case it is created.
    pub fn reload(
        &mut self,
        registry: &Registry,
        devices: Vec<(DeviceEntry, DeviceSpec)>,
    ) -> ReloadReport {
        let mut report = ReloadReport::default();
        let new: BTreeMap<&str, &DeviceEntry> =
            devices.iter().map(|(e, s)| (s.name.as_str(), e)).collect();
        for (name, old) in &self.entries {
            if new.get(name.as_str()).is_some_and(|e| *e == old) {
                continue;
            }
            match registry.del(name) {
                Ok(()) => {
                    info!(device = %name, "reload: removed");
                    report.removed.push(name.clone());
                }
                Err(RegistryError::NotFound(_)) => {}
                Err(e) => {
                    warn!(device = %name, "reload: {e}");
                    report.removed.push(name.clone());
                }
            }
        }
        let served = registry.names();
        for (entry, spec) in &devices {
            let unchanged = self.entries.get(&spec.name) == Some(entry);
            if unchanged && served.contains(&spec.name) {
                continue;
            }
            match registry.add(spec.clone()) {
                Ok(v) => {
                    info!(device = %spec.name, "reload: added");
                    report.added.push(v);
                }
                Err(e) => {
                    warn!(device = %spec.name, "reload: not served: {e}");
                    report.failed.push((spec.name.clone(), e.to_string()));
                }
            }
        }
        self.entries = devices.into_iter().map(|(e, s)| (s.name, e)).collect();
        report
    }
}
