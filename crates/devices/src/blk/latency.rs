//! Request latency per queue: a log2 histogram in microseconds, updated by the queue's
//! worker with relaxed atomic adds (no lock, no allocation) and read by anyone at any time
//! (the daemon's metrics endpoint).
//!
//! A request's latency runs from the moment its worker took the chain off the ring to the
//! moment its status byte was written (for io_uring requests: when the last completion
//! came back), so it covers the backend and any retry, not the time the chain waited in
//! the ring before the worker looked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Number of finite buckets: upper bounds 1, 2, 4, … 2^(BUCKETS-1) µs (about 8.4 s);
/// slower requests count only in the `+Inf` bucket (the total).
pub const BUCKETS: usize = 24;

/// The histogram of one queue.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Requests per bucket (not cumulative): bucket 0 holds latencies of at most 1 µs,
    /// bucket `i > 0` those in (2^(i-1), 2^i] µs, bucket `BUCKETS` the rest.
    buckets: [AtomicU64; BUCKETS + 1],
    /// Sum of all latencies, in nanoseconds.
    sum_ns: AtomicU64,
}

/// A copy of a [`LatencyHistogram`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// `(upper bound in µs, requests at most that slow)`, cumulative, for the finite
    /// buckets in increasing order.
    pub buckets: Vec<(u64, u64)>,
    /// Every request counted (the `+Inf` bucket).
    pub count: u64,
    /// Sum of their latencies, in nanoseconds.
    pub sum_ns: u64,
}

/// The bucket of a latency of `us` microseconds (rounded up).
fn bucket_of(us: u64) -> usize {
    if us <= 1 {
        return 0;
    }
    // The smallest i with us <= 2^i.
    let i = (u64::BITS - (us - 1).leading_zeros()) as usize;
    i.min(BUCKETS)
}

impl LatencyHistogram {
    /// Counts one request that took `d`.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let us = ns.div_ceil(1000);
        if let Some(b) = self.buckets.get(bucket_of(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The current counts. Buckets are read one by one while workers may add to them, so
    /// a snapshot taken during I/O may be a few requests behind in some buckets; every
    /// count only grows.
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(BUCKETS);
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative = cumulative.saturating_add(b.load(Ordering::Relaxed));
            if i < BUCKETS {
                buckets.push((1u64 << i, cumulative));
            }
        }
        LatencySnapshot {
            buckets,
            count: cumulative,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(4), 2);
        assert_eq!(bucket_of(5), 3);
        assert_eq!(bucket_of(1 << 23), 23);
        assert_eq!(bucket_of((1 << 23) + 1), BUCKETS);
        assert_eq!(bucket_of(u64::MAX), BUCKETS);
    }

    #[test]
    fn snapshot_is_cumulative() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_nanos(300)); // 1 µs
        h.record(Duration::from_micros(3)); // ≤ 4 µs
        h.record(Duration::from_micros(4)); // ≤ 4 µs
        h.record(Duration::from_secs(60)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), BUCKETS);
        assert_eq!(s.buckets[0], (1, 1));
        assert_eq!(s.buckets[1], (2, 1));
        assert_eq!(s.buckets[2], (4, 3));
        assert_eq!(s.buckets[BUCKETS - 1], (1 << (BUCKETS - 1), 3));
        assert_eq!(s.sum_ns, 300 + 3_000 + 4_000 + 60_000_000_000);
    }
}
