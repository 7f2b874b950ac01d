//! A lock-free limiter for logs a guest can trigger, so a misbehaving driver cannot flood
//! the host log (STYLE.md: guest-caused errors are logged at debug level, rate-limited).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Allows at most `per_sec` messages per one-second window, shared by every queue of a
/// device. Counting is approximate under contention (relaxed atomics), which is all a log
/// limiter needs.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    start: Instant,
    per_sec: u32,
    /// The one-second window (seconds since `start`) `count` belongs to.
    window: AtomicU64,
    /// Messages asked for in the current window.
    count: AtomicU32,
    /// Messages refused since the last one allowed.
    suppressed: AtomicU64,
}

impl RateLimiter {
    /// A limiter allowing `per_sec` messages per second.
    pub(crate) fn new(per_sec: u32) -> Self {
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
    pub(crate) fn check(&self) -> Option<u64> {
        self.check_at(self.start.elapsed().as_secs())
    }

    /// [`RateLimiter::check`] at `now` seconds since the limiter was made.
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

/// Logs at debug level through a [`RateLimiter`], adding a `suppressed` field that counts
/// the messages dropped before this one. Costs one branch when debug logging is off.
macro_rules! guest_debug {
    ($limiter:expr, $($arg:tt)+) => {
        if tracing::enabled!(tracing::Level::DEBUG) {
            if let Some(suppressed) = $limiter.check() {
                tracing::debug!(suppressed, $($arg)+);
            }
        }
    };
}
pub(crate) use guest_debug;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_per_window_then_reports_what_it_dropped() {
        let l = RateLimiter::new(3);
        let first: Vec<_> = (0..5).map(|_| l.check_at(0)).collect();
        assert_eq!(first, vec![Some(0), Some(0), Some(0), None, None]);
        // A new window allows messages again and reports the two dropped ones once.
        assert_eq!(l.check_at(1), Some(2));
        assert_eq!(l.check_at(1), Some(0));
        assert_eq!(l.check_at(7), Some(0));
    }
}
