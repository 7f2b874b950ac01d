//! Rate-limited debug logs for what a guest's requests cause, so a misbehaving driver cannot
//! flood the host log (STYLE.md: guest-caused errors are logged at debug level,
//! rate-limited). The limiter is [`uvdpa_virtio::loglimit::LogLimiter`].

pub(crate) use uvdpa_virtio::loglimit::LogLimiter as RateLimiter;

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
