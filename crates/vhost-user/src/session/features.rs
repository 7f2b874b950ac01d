//! Feature negotiation: the transport and protocol features offered (with the process's
//! dirty-logging mode, which decides whether logging is among them) and SET_FEATURES.

use tracing::{debug, info, warn};
use uvdpa_virtio::VirtioFeatures;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::Session;
use crate::error::Error;

/// Whether and how this backend does dirty page logging for live migration, from the
/// environment variable `UVDPA_DIRTY_LOG` read once per process:
/// - unset or `on`: VHOST_F_LOG_ALL and LOG_SHMFD are offered and every device write is
///   logged while the frontend asks for it;
/// - `off`: neither is offered (QEMU then refuses to migrate the VM: a migration blocker);
/// - `skip`: offered, but nothing is logged (a test switch that shows a migration test
///   catches lost writes; never for real use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// Offered and done.
    On,
    /// Not offered.
    Off,
    /// Offered, not done (tests).
    Skip,
}

/// The process's [`DirtyLogMode`] (`UVDPA_DIRTY_LOG`).
pub fn dirty_log_mode() -> DirtyLogMode {
    static MODE: std::sync::OnceLock<DirtyLogMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("UVDPA_DIRTY_LOG").as_deref() {
        Ok("off") => DirtyLogMode::Off,
        Ok("skip") => {
            warn!("UVDPA_DIRTY_LOG=skip: dirty logging offered but not done; live migration will lose device writes");
            DirtyLogMode::Skip
        }
        Ok("on") | Err(_) => DirtyLogMode::On,
        Ok(other) => {
            warn!("UVDPA_DIRTY_LOG={other:?} is not on/off/skip; dirty logging stays on");
            DirtyLogMode::On
        }
    })
}

/// Transport features offered over vhost-user besides the device's own.
pub(super) fn transport_features() -> VirtioFeatures {
    let log = if dirty_log_mode() == DirtyLogMode::Off {
        VirtioFeatures::empty()
    } else {
        VirtioFeatures::VHOST_F_LOG_ALL
    };
    VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES | log
}

/// Protocol features this backend implements (REPLY_ACK is always offered).
pub fn supported_protocol_features(device_type: u32) -> VhostUserProtocolFeatures {
    let log = if dirty_log_mode() == DirtyLogMode::Off {
        VhostUserProtocolFeatures::empty()
    } else {
        VhostUserProtocolFeatures::LOG_SHMFD
    };
    // VHOST_USER_PROTOCOL_F_NET_MTU (`MTU` in rust-vmm) for network devices (device ID 1).
    let net_mtu = if device_type == 1 {
        VhostUserProtocolFeatures::MTU
    } else {
        VhostUserProtocolFeatures::empty()
    };
    net_mtu
        | log
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ
}

impl Session {
    /// Features offered over vhost-user: the device's, with VHOST_USER_F_PROTOCOL_FEATURES.
    pub(super) fn offered(&self) -> VirtioFeatures {
        self.rt.offered()
    }

    pub(super) fn set_features(&mut self, value: u64) -> Result<(), Error> {
        let unknown = value & !self.offered().bits();
        if unknown != 0 {
            return Err(Error::UnofferedFeatures { unknown });
        }
        let features = VirtioFeatures::from_raw(value);
        let transport =
            VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES | VirtioFeatures::VHOST_F_LOG_ALL;
        let logging = features.contains(VirtioFeatures::VHOST_F_LOG_ALL);
        if logging != self.rt.acked().contains(VirtioFeatures::VHOST_F_LOG_ALL)
            && self.log_limits.request.check().is_some()
        {
            info!(device = %self.name, on = logging, "dirty logging (VHOST_F_LOG_ALL) switched");
        }
        if !self.protocol.contains(VhostUserProtocolFeatures::STATUS) {
            // Without SET_STATUS, SET_FEATURES is where FEATURES_OK is decided.
            self.rt.check_features(features - transport)?;
        }
        self.rt.set_features(features, transport)?;
        if !features.contains(VirtioFeatures::VHOST_USER_F_PROTOCOL_FEATURES) {
            // Without protocol features, rings are enabled as soon as they start.
            for i in 0..self.rt.num_vrings() {
                self.rt.reconfigure(i, |v| v.enabled = true)?;
            }
        }
        debug!(device = %self.name, features = format_args!("{value:#x}"), "features acked");
        Ok(())
    }
}
