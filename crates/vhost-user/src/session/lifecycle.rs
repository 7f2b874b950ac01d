//! Resetting and ending a session: RESET_DEVICE/RESET_OWNER, a reset by status, and the
//! close that also runs on drop.

use super::Session;

impl Session {
    /// Device reset by status (SET_STATUS 0, virtio 1.2 §2.1); see
    /// [`DeviceRuntime::reset_status`](uvdpa_runtime::DeviceRuntime::reset_status). QEMU
    /// 7.2 sends it before GET_VRING_BASE when it stops a device, so the vrings keep the
    /// base they stopped at. Session-level negotiation (virtio and protocol features) is
    /// kept.
    pub fn reset_status(&mut self) {
        self.rt.reset_status();
    }

    /// Full device reset (RESET_DEVICE, RESET_OWNER); see
    /// [`DeviceRuntime::reset`](uvdpa_runtime::DeviceRuntime::reset).
    pub fn reset(&mut self) {
        self.rt.reset();
        self.record.inflight = None;
    }

    /// Ends the session: every vring completes the chains already in its avail ring and
    /// stops, then completed writes are made durable.
    pub fn close(&mut self) {
        self.rt.close();
        self.region_repeats.clear();
        self.log_fd = None;
        self.record = crate::handover::Record::default();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}
