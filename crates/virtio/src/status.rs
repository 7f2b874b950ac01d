//! The device status field as a checked state machine (virtio 1.2 §2.1, §3.1.1).
//!
//! ```text
//!   0 (reset) --ACKNOWLEDGE--> A --DRIVER--> A|D --FEATURES_OK?--> A|D|FO --DRIVER_OK--> live
//!                                                 |  refused: bit left clear
//!   any state --write 0--> reset (queues stopped first by the transport)
//!   any state --device error--> |DEVICE_NEEDS_RESET    any state --driver--> |FAILED
//! ```
//! FEATURES_OK is granted only when the driver's features are a subset of the device's offer,
//! include every feature mandated when the device was created, and include
//! VIRTIO_F_VERSION_1 (uvdpa serves modern devices only).

use bitflags::bitflags;
use thiserror::Error;

use crate::features::VirtioFeatures;

bitflags! {
    /// Device status bits (virtio 1.2 §2.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DeviceStatus: u8 {
        /// ACKNOWLEDGE (1): the guest OS has found the device.
        const ACKNOWLEDGE = 1;
        /// DRIVER (2): the guest OS knows how to drive the device.
        const DRIVER = 2;
        /// DRIVER_OK (4): the driver is set up and ready to drive the device.
        const DRIVER_OK = 4;
        /// FEATURES_OK (8): the driver has acknowledged the features it understands.
        const FEATURES_OK = 8;
        /// DEVICE_NEEDS_RESET (64): the device hit an error it cannot recover from.
        const DEVICE_NEEDS_RESET = 64;
        /// FAILED (128): the driver gave up on the device.
        const FAILED = 128;
    }
}

impl DeviceStatus {
    /// Names of the set bits, for logs and tools.
    pub fn names(self) -> Vec<&'static str> {
        self.iter_names().map(|(n, _)| n).collect()
    }
}

/// Why a status write was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StatusError {
    /// The driver tried to clear bits without a reset (§2.1.1: only a write of 0 clears).
    #[error("Status write {new:#x} clears bits of {old:#x} without a reset")]
    ClearsBits {
        /// Status before the write.
        old: u8,
        /// Value written.
        new: u8,
    },
    /// A bit was set before the bit it depends on (§3.1.1 initialization order).
    #[error("Status write {new:#x} sets {bit} out of order")]
    OutOfOrder {
        /// Value written.
        new: u8,
        /// Name of the offending bit.
        bit: &'static str,
    },
    /// FEATURES_OK refused: the driver acked features the device does not offer.
    #[error("FEATURES_OK refused: driver features {unknown:#x} are not offered by the device")]
    UnofferedFeatures {
        /// The bits acked but not offered.
        unknown: u64,
    },
    /// FEATURES_OK refused: the driver did not accept every mandated feature.
    #[error("FEATURES_OK refused: mandated features {missing:#x} were not accepted")]
    MissingMandated {
        /// The mandated bits the driver left out.
        missing: u64,
    },
}

/// The negotiation state of one device: offered, mandated and driver features, and status.
#[derive(Debug, Clone)]
pub struct StatusMachine {
    status: DeviceStatus,
    offered: VirtioFeatures,
    mandated: VirtioFeatures,
    driver: VirtioFeatures,
    strict_order: bool,
}

impl StatusMachine {
    /// A device in reset state that offers `offered` and requires `mandated` (a subset of
    /// `offered`; VIRTIO_F_VERSION_1 is always mandated).
    pub fn new(offered: VirtioFeatures, mandated: VirtioFeatures) -> Self {
        Self {
            status: DeviceStatus::empty(),
            offered,
            mandated: (mandated | VirtioFeatures::VIRTIO_F_VERSION_1) & offered,
            driver: VirtioFeatures::empty(),
            strict_order: true,
        }
    }

    /// Whether ACKNOWLEDGE and DRIVER must precede FEATURES_OK (default: yes, as a driver
    /// talking to the device directly must do, §3.1.1). A vhost-user frontend proxies the
    /// status of a driver it runs itself and may write FEATURES_OK or DRIVER_OK alone (QEMU
    /// 7.2 does); with `false` only "FEATURES_OK before DRIVER_OK" is enforced. FEATURES_OK
    /// is validated either way.
    pub fn with_strict_order(mut self, strict: bool) -> Self {
        self.strict_order = strict;
        self
    }

    /// The current status byte.
    pub fn status(&self) -> DeviceStatus {
        self.status
    }

    /// The features offered by the device.
    pub fn offered(&self) -> VirtioFeatures {
        self.offered
    }

    /// The features the driver acked most recently (whether or not FEATURES_OK was granted).
    pub fn driver_features(&self) -> VirtioFeatures {
        self.driver
    }

    /// Whether the driver has set DRIVER_OK (and the device is not in need of reset).
    pub fn is_live(&self) -> bool {
        self.status.contains(DeviceStatus::DRIVER_OK)
            && !self.status.contains(DeviceStatus::DEVICE_NEEDS_RESET)
    }

    /// Records the driver's feature word (vhost-user SET_FEATURES, or the driver-features
    /// register). Validation happens when FEATURES_OK is requested, as the spec orders.
    pub fn set_driver_features(&mut self, features: VirtioFeatures) {
        self.driver = features;
    }

    /// Checks `features` against the offer and the mandated set without changing state.
    ///
    /// # Errors
    /// [`StatusError::UnofferedFeatures`] or [`StatusError::MissingMandated`].
    pub fn check_features(&self, features: VirtioFeatures) -> Result<(), StatusError> {
        let unknown = features.bits() & !self.offered.bits();
        if unknown != 0 {
            return Err(StatusError::UnofferedFeatures { unknown });
        }
        let missing = self.mandated.bits() & !features.bits();
        if missing != 0 {
            return Err(StatusError::MissingMandated { missing });
        }
        Ok(())
    }

    /// Applies a driver write of the status byte (virtio 1.2 §2.1, §3.1.1).
    ///
    /// A write of 0 resets the machine; the caller must have stopped the queues first. A
    /// write that clears bits, or sets them out of order, is refused and leaves the status
    /// unchanged. A write asking for FEATURES_OK with unacceptable features is applied
    /// without FEATURES_OK (so a driver re-reading status sees it clear), and the reason is
    /// returned as the error. The device-owned DEVICE_NEEDS_RESET bit is kept as it was.
    ///
    /// # Errors
    /// The [`StatusError`] that explains the refusal.
    pub fn set_status(&mut self, value: u8) -> Result<DeviceStatus, StatusError> {
        if value == 0 {
            self.reset();
            return Ok(self.status);
        }
        let old = self.status;
        let needs_reset = old & DeviceStatus::DEVICE_NEEDS_RESET;
        let mut new = DeviceStatus::from_bits_retain(value) - DeviceStatus::DEVICE_NEEDS_RESET;
        let old_driver_bits = old - DeviceStatus::DEVICE_NEEDS_RESET;
        if !new.contains(old_driver_bits) {
            return Err(StatusError::ClearsBits {
                old: old.bits(),
                new: value,
            });
        }
        let order: [(DeviceStatus, DeviceStatus, &'static str); 3] = [
            (DeviceStatus::DRIVER, DeviceStatus::ACKNOWLEDGE, "DRIVER"),
            (
                DeviceStatus::FEATURES_OK,
                DeviceStatus::DRIVER,
                "FEATURES_OK",
            ),
            (
                DeviceStatus::DRIVER_OK,
                DeviceStatus::FEATURES_OK,
                "DRIVER_OK",
            ),
        ];
        for (bit, needs, name) in order {
            if !self.strict_order && bit != DeviceStatus::DRIVER_OK {
                continue;
            }
            if new.contains(bit) && !new.contains(needs) {
                return Err(StatusError::OutOfOrder {
                    new: value,
                    bit: name,
                });
            }
        }
        let mut refusal = None;
        if new.contains(DeviceStatus::FEATURES_OK) && !old.contains(DeviceStatus::FEATURES_OK) {
            if let Err(e) = self.check_features(self.driver) {
                new.remove(DeviceStatus::FEATURES_OK | DeviceStatus::DRIVER_OK);
                refusal = Some(e);
            }
        }
        self.status = new | needs_reset;
        match refusal {
            Some(e) => Err(e),
            None => Ok(self.status),
        }
    }

    /// Marks the device as needing a reset (virtio 1.2 §2.1.2): set by the device on an
    /// unrecoverable error, cleared only by a reset.
    pub fn set_needs_reset(&mut self) {
        self.status |= DeviceStatus::DEVICE_NEEDS_RESET;
    }

    /// Returns to the reset state: status 0 and no driver features.
    pub fn reset(&mut self) {
        self.status = DeviceStatus::empty();
        self.driver = VirtioFeatures::empty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u8 = 1;
    const D: u8 = 2;
    const DOK: u8 = 4;
    const FOK: u8 = 8;

    fn machine() -> StatusMachine {
        let offered = VirtioFeatures::VIRTIO_F_VERSION_1
            | VirtioFeatures::VIRTIO_RING_F_EVENT_IDX
            | VirtioFeatures::from_raw(1 << 9);
        StatusMachine::new(offered, VirtioFeatures::from_raw(1 << 9))
    }

    #[test]
    fn normal_initialization_sequence_reaches_driver_ok() {
        let mut m = machine();
        m.set_status(A).unwrap();
        m.set_status(A | D).unwrap();
        m.set_driver_features(VirtioFeatures::from_raw((1 << 32) | (1 << 9)));
        m.set_status(A | D | FOK).unwrap();
        assert!(m.status().contains(DeviceStatus::FEATURES_OK));
        m.set_status(A | D | FOK | DOK).unwrap();
        assert!(m.is_live());
    }

    #[test]
    fn features_ok_refused_for_unoffered_feature_and_left_clear() {
        let mut m = machine();
        m.set_status(A | D).unwrap();
        m.set_driver_features(VirtioFeatures::from_raw((1 << 32) | (1 << 9) | (1 << 3)));
        let err = m.set_status(A | D | FOK).unwrap_err();
        assert_eq!(err, StatusError::UnofferedFeatures { unknown: 1 << 3 });
        assert_eq!(m.status().bits(), A | D);
    }

    #[test]
    fn features_ok_refused_when_mandated_feature_missing() {
        let mut m = machine();
        m.set_status(A | D).unwrap();
        m.set_driver_features(VirtioFeatures::VIRTIO_F_VERSION_1);
        let err = m.set_status(A | D | FOK).unwrap_err();
        assert_eq!(err, StatusError::MissingMandated { missing: 1 << 9 });
        assert!(!m.status().contains(DeviceStatus::FEATURES_OK));
    }

    #[test]
    fn version_1_is_always_mandated() {
        let mut m = machine();
        m.set_status(A | D).unwrap();
        m.set_driver_features(VirtioFeatures::from_raw(1 << 9));
        assert_eq!(
            m.set_status(A | D | FOK).unwrap_err(),
            StatusError::MissingMandated { missing: 1 << 32 }
        );
    }

    #[test]
    fn out_of_order_and_clearing_writes_are_refused_unchanged() {
        let mut m = machine();
        assert!(matches!(
            m.set_status(D),
            Err(StatusError::OutOfOrder { .. })
        ));
        assert_eq!(m.status().bits(), 0);
        m.set_status(A | D).unwrap();
        assert!(matches!(
            m.set_status(A | D | DOK),
            Err(StatusError::OutOfOrder { .. })
        ));
        assert!(matches!(
            m.set_status(A),
            Err(StatusError::ClearsBits { .. })
        ));
        assert_eq!(m.status().bits(), A | D);
    }

    #[test]
    fn relaxed_order_accepts_proxied_status_but_keeps_driver_ok_rule() {
        let mut m = machine().with_strict_order(false);
        m.set_driver_features(VirtioFeatures::from_raw((1 << 32) | (1 << 9)));
        m.set_status(FOK).unwrap();
        m.set_status(FOK | DOK).unwrap();
        assert!(m.is_live());
        let mut m = machine().with_strict_order(false);
        assert!(matches!(
            m.set_status(DOK),
            Err(StatusError::OutOfOrder { .. })
        ));
        m.set_driver_features(VirtioFeatures::from_raw(1 << 32));
        assert!(matches!(
            m.set_status(FOK),
            Err(StatusError::MissingMandated { .. })
        ));
        assert_eq!(m.status().bits(), 0);
    }

    #[test]
    fn reset_clears_everything_including_needs_reset() {
        let mut m = machine();
        m.set_status(A | D).unwrap();
        m.set_needs_reset();
        m.set_status(A | D | 128).unwrap();
        assert!(m
            .status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET | DeviceStatus::FAILED));
        assert!(!m.is_live());
        m.set_status(0).unwrap();
        assert_eq!(m.status().bits(), 0);
        assert_eq!(m.driver_features(), VirtioFeatures::empty());
    }
}
