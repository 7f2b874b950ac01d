//! Lock-free limits on log lines a guest or a frontend can cause, so a misbehaving driver
//! or a frontend looping connect/disconnect cannot flood the host log (STYLE.md:
//! guest-caused errors are rate-limited).
//!
//! A [`LogLimiter`] allows a burst of lines per one-second window; the first line allowed
//! after some were dropped carries how many (`suppressed=K`), so the log still says that
//! something happened and how often. A device keeps one [`DeviceLogLimits`] for its whole
//! life (every session and every queue share it), one limiter per kind of line, so a
//! connect storm does not hide a broken ring and the other way round.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Allows at most `per_sec` messages per one-second window. Counting is approximate under
/// contention (relaxed atomics), which is all a log limiter needs.
#[derive(Debug)]
pub struct LogLimiter {
    start: Instant,
    per_sec: u32,
    /// The one-second window (seconds since `start`) `count` belongs to.
    window: AtomicU64,
    /// Messages asked for in the current window.
    count: AtomicU32,
    /// Messages refused since the last one allowed.
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// A limiter allowing `per_sec` messages per second.
    pub fn new(per_sec: u32) -> Self {
        Self {
            start: Instant::now(),
            per_sec,
            window: AtomicU64::new(0),
            count: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Asks to log one message: `Some(n)` when it may be logged, `n` being how many were
    /// suppressed since the last allowed one; `None` when it must be dropped.
    pub fn check(&self) -> Option<u64> {
        self.check_at(self.start.elapsed().as_secs())
    }

    /// Messages dropped since the last one allowed (not reset by reading).
    pub fn pending_suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// [`LogLimiter::check`] at `now` seconds since the limiter was made.
    fn check_at(&self, now: u64) -> Option<u64> {
        let window = self.window.load(Ordering::Relaxed);
        if now != window
            && self
                .window
                .compare_exchange(window, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < self.per_sec {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Lines per second and per kind a device may log at INFO or above about its frontends
/// ([`DeviceLogLimits`]). A well-behaved frontend's connect (connected, memory table,
/// status changes) stays well under it.
pub const DEVICE_LOG_LINES_PER_SEC: u32 = 20;

/// The log limits of one device, kept across its sessions: one [`LogLimiter`] per kind of
/// line a frontend can cause, each allowing [`DEVICE_LOG_LINES_PER_SEC`].
#[derive(Debug)]
pub struct DeviceLogLimits {
    /// Frontends connecting, disconnecting, refused, or their session ended.
    pub session: LogLimiter,
    /// Requests refused or noted (memory tables, status changes, failed requests).
    pub request: LogLimiter,
    /// Rings failed by bad guest input (DEVICE_NEEDS_RESET).
    pub ring: LogLimiter,
}

impl Default for DeviceLogLimits {
    fn default() -> Self {
        Self {
            session: LogLimiter::new(DEVICE_LOG_LINES_PER_SEC),
            request: LogLimiter::new(DEVICE_LOG_LINES_PER_SEC),
            ring: LogLimiter::new(DEVICE_LOG_LINES_PER_SEC),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_per_window_then_reports_what_it_dropped() {
        let l = LogLimiter::new(3);
        let first: Vec<_> = (0..5).map(|_| l.check_at(0)).collect();
        assert_eq!(first, vec![Some(0), Some(0), Some(0), None, None]);
        assert_eq!(l.pending_suppressed(), 2);
        // A new window allows messages again and reports the two dropped ones once.
        assert_eq!(l.check_at(1), Some(2));
        assert_eq!(l.check_at(1), Some(0));
        assert_eq!(l.check_at(7), Some(0));
    }

    #[test]
    fn device_limits_count_each_kind_apart() {
        let d = DeviceLogLimits::default();
        for _ in 0..DEVICE_LOG_LINES_PER_SEC {
            assert!(d.session.check().is_some());
        }
        assert!(
            d.ring.check().is_some(),
            "a connect storm hid a ring failure"
        );
    }
}
