//! `uvdpa dev capture` on a blk device: the request trace as JSON lines, one object per
//! completed request (the daemon side is `uvdpa_devices::blk::trace`):
//!
//! ```json
//! {"time":"2026-12-06T19:55:01.123456789Z","queue":0,"type":"OUT","sector":2048,"len":4096,"status":"OK","latency_us":12.345}
//! ```
//!
//! `time` is when the request completed (UTC, nanoseconds), `sector` in 512-byte units,
//! `len` in bytes, `latency_us` in microseconds from the worker taking the request off the
//! ring to its status byte.

use std::io::{self, Write};

use uvdpa_devices::blk::trace::{status_name, type_name, TraceRecord};

/// Writes trace records as JSON lines. The CLI drains one queue's sub-ring after the
/// other, so records are held until [`TraceOut::flush`] (after each pass over the rings)
/// and written in completion-time order.
pub struct TraceOut<W: Write> {
    w: W,
    pending: Vec<(u64, u16, TraceRecord)>,
}

impl<W: Write> TraceOut<W> {
    /// A writer of JSON lines to `w`.
    pub fn new(w: W) -> Self {
        Self {
            w,
            pending: Vec::new(),
        }
    }

    /// Takes the record of a request of `queue` completed at `ts_ns` (Unix epoch
    /// nanoseconds); a record too short to decode is skipped (`false`).
    pub fn record(&mut self, queue: u16, ts_ns: u64, data: &[u8]) -> bool {
        let Some(r) = TraceRecord::decode(data) else {
            return false;
        };
        self.pending.push((ts_ns, queue, r));
        true
    }

    /// Writes the records taken since the last call, oldest first, and flushes.
    ///
    /// # Errors
    /// The output cannot be written.
    pub fn flush(&mut self) -> io::Result<()> {
        // Stable: one queue's records keep their order when two have the same time.
        self.pending.sort_by_key(|&(ts, _, _)| ts);
        for (ts_ns, queue, r) in std::mem::take(&mut self.pending) {
            Self::line(&mut self.w, queue, ts_ns, &r)?;
        }
        self.w.flush()
    }

    fn line(w: &mut W, queue: u16, ts_ns: u64, r: &TraceRecord) -> io::Result<()> {
        // Written by hand to keep the documented field order (every value is a number or
        // a name without characters JSON escapes).
        writeln!(
            w,
            r#"{{"time":"{}","queue":{queue},"type":"{}","sector":{},"len":{},"status":"{}","latency_us":{}}}"#,
            rfc3339_ns(ts_ns),
            type_name(r.ty),
            r.sector,
            r.len,
            status_name(r.status),
            r.latency_ns as f64 / 1000.0
        )
    }
}

/// `ts_ns` nanoseconds since the Unix epoch as an RFC 3339 UTC time with nanoseconds.
pub fn rfc3339_ns(ts_ns: u64) -> String {
    let secs = ts_ns / 1_000_000_000;
    let nanos = ts_ns % 1_000_000_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, days ≥ 0).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_ns(0), "1970-01-01T00:00:00.000000000Z");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.789.
        assert_eq!(
            rfc3339_ns(951_827_696_789_000_000),
            "2000-02-29T12:34:56.789000000Z"
        );
        assert_eq!(
            rfc3339_ns(1_796_586_901_000_000_001),
            "2026-12-06T19:55:01.000000001Z"
        );
    }

    #[test]
    fn records_become_json_lines() {
        let rec = TraceRecord {
            ty: 1,
            status: 0,
            sector: 2048,
            len: 4096,
            latency_ns: 12_345,
        };
        let mut out = TraceOut::new(Vec::new());
        assert!(out.record(1, 2_000, &rec.encode()));
        assert!(out.record(3, 0, &rec.encode()));
        assert!(!out.record(3, 0, &[0; 8]));
        assert!(out.w.is_empty(), "held until flushed");
        out.flush().unwrap();
        let text = String::from_utf8(out.w.clone()).unwrap();
        let (first, second) = text.split_once('\n').unwrap();
        assert!(second.contains(r#""queue":1,"#), "oldest first: {text}");
        let text = first.to_string();
        assert!(
            text.starts_with(r#"{"time":"1970-01-01T00:00:00.000000000Z","queue":3,"type":"OUT","#)
        );
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(
            v,
            json!({"time": "1970-01-01T00:00:00.000000000Z", "queue": 3, "type": "OUT",
                   "sector": 2048, "len": 4096, "status": "OK", "latency_us": 12.345})
        );
    }
}
