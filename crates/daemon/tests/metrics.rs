//! The metrics endpoint end to end: a daemon with `metrics = "127.0.0.1:0"` serves
//! OpenMetrics at /metrics; libblkio drives known traffic; the scrape, parsed by the
//! `prometheus-parse` crate (a parser nobody here wrote), shows exactly that traffic.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use prometheus_parse::{Scrape, Value};

/// The address the daemon logged for its metrics endpoint.
fn metrics_addr(d: &Daemon) -> String {
    let t0 = Instant::now();
    loop {
        let log = d.log_text();
        if let Some(i) = log.find("serving metrics at http://") {
            let rest = &log[i + "serving metrics at http://".len()..];
            return rest[..rest.find("/metrics").unwrap()].to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no metrics address in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` over HTTP/1.0: (status line, headers, body).
fn http_get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.into(), headers.into(), body.into())
}

/// A parsed scrape, indexed by metric name and sorted label pairs.
struct Metrics {
    scrape: Scrape,
}

impl Metrics {
    fn get(addr: &str) -> (Metrics, String) {
        let (status, headers, body) = http_get(addr, "/metrics");
        assert!(status.contains("200"), "{status}");
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{headers}"
        );
        assert!(body.trim_end().ends_with("# EOF"), "no # EOF:\n{body}");
        let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        (Metrics { scrape }, body)
    }

    fn samples(&self, metric: &str, labels: &[(&str, &str)]) -> Vec<&prometheus_parse::Sample> {
        self.scrape
            .samples
            .iter()
            .filter(|s| {
                s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample of `metric` with `labels`.
    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.samples(metric, labels);
        assert_eq!(
            found.len(),
            1,
            "{metric}{labels:?}: expected one sample, found {found:?}"
        );
        match &found[0].value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{metric}: not a number: {other:?}"),
        }
    }

    fn q(&self, metric: &str, dev: &str, q: &str) -> u64 {
        self.value(metric, &[("device", dev), ("queue", q)]) as u64
    }
}

const N_WRITES: usize = 48;
const N_READS: usize = 20;
const BS: usize = 4096;
/// virtio-blk request header (device-readable) and status byte (device-writable).
const HDR: u64 = 16;

#[test]
fn scrape_matches_the_traffic_libblkio_generated() {
    let config = format!(
        "metrics = \"127.0.0.1:0\"\n{}\n[[device]]\nname = \"net0\"\nmgmtdev = \"net\"\n",
        blk_config("blk0", "backend = \"ram\"\nsize = \"16M\"\nqueues = 2")
    );
    let d = Daemon::start("metrics", &config, &["blk0", "net0"]);
    let addr = metrics_addr(&d);

    // Before any traffic: every family is there, at zero.
    let (m, body) = Metrics::get(&addr);
    for q in ["0", "1"] {
        assert_eq!(m.q("uvdpa_blk_requests_total", "blk0", q), 0, "{body}");
    }
    assert_eq!(
        m.value("uvdpa_device_needs_reset", &[("device", "blk0")]),
        0.0
    );
    assert_eq!(
        m.value("uvdpa_device_connected", &[("device", "blk0")]),
        0.0
    );
    assert_eq!(m.value("uvdpa_resources", &[("type", "dev")]), 2.0);
    assert_eq!(
        m.value(
            "uvdpa_device_info",
            &[
                ("device", "net0"),
                ("mgmtdev", "net"),
                ("transport", "vhost-user")
            ]
        ),
        1.0
    );
    // A net device's queues: rx and tx with their direction, the control queue apart.
    assert_eq!(
        m.value(
            "uvdpa_net_frames_total",
            &[("device", "net0"), ("queue", "0"), ("direction", "rx")]
        ),
        0.0
    );
    assert_eq!(
        m.value(
            "uvdpa_net_drops_total",
            &[("device", "net0"), ("queue", "1"), ("direction", "tx")]
        ),
        0.0
    );
    assert_eq!(
        m.value("uvdpa_net_ctrl_commands_total", &[("device", "net0")]),
        0.0
    );

    // N writes of 4 KiB on queue 0 (8 in flight), M reads on queue 1.
    let mut c = BlkClient::connect(&d.sock_str("blk0"), 2, 8 * BS).unwrap();
    let data = pattern(7, 8 * BS);
    c.buf().copy_from_slice(&data);
    for batch in 0..N_WRITES / 8 {
        let ops: Vec<Op> = (0..8)
            .map(|i| Op::Write {
                offset: ((batch * 8 + i) * BS) as u64,
                buf_off: i * BS,
                len: BS,
            })
            .collect();
        assert!(c.run(0, &ops).iter().all(|&r| r == 0));
    }
    for i in 0..N_READS {
        let ops = [Op::Read {
            offset: (i * BS) as u64,
            buf_off: 0,
            len: BS,
        }];
        assert_eq!(c.run(1, &ops), vec![0]);
    }

    let (m, body) = Metrics::get(&addr);
    let (w, r) = (N_WRITES as u64, N_READS as u64);
    assert_eq!(m.q("uvdpa_blk_requests_total", "blk0", "0"), w, "{body}");
    assert_eq!(
        m.q("uvdpa_blk_read_bytes_total", "blk0", "0"),
        w * (BS as u64 + HDR)
    );
    assert_eq!(m.q("uvdpa_blk_written_bytes_total", "blk0", "0"), w);
    assert_eq!(m.q("uvdpa_blk_requests_total", "blk0", "1"), r);
    assert_eq!(m.q("uvdpa_blk_read_bytes_total", "blk0", "1"), r * HDR);
    assert_eq!(
        m.q("uvdpa_blk_written_bytes_total", "blk0", "1"),
        r * (BS as u64 + 1)
    );
    assert_eq!(m.q("uvdpa_blk_errors_total", "blk0", "0"), 0);
    assert!(m.q("uvdpa_blk_kicks_total", "blk0", "0") >= 1);
    // Every completion batch either signalled or was suppressed.
    let q1_batches = m.q("uvdpa_blk_calls_total", "blk0", "1")
        + m.q("uvdpa_blk_calls_suppressed_total", "blk0", "1");
    assert!(
        q1_batches >= 1 && q1_batches <= r,
        "{q1_batches} batches for {r} requests"
    );
    // The metrics are the same counters `uvdpa dev vstats show` reads.
    for (q, n) in [(0usize, w), (1, r)] {
        assert_eq!(d.vstat("blk0", q, "requests"), n);
        assert_eq!(
            d.vstat("blk0", q, "bytes_read"),
            m.q("uvdpa_blk_read_bytes_total", "blk0", &q.to_string())
        );
    }

    // The latency histogram counts every request once, buckets cumulative up to +Inf.
    for (q, n) in [("0", w), ("1", r)] {
        let labels = [("device", "blk0"), ("queue", q)];
        let h = m.samples("uvdpa_blk_request_duration_seconds", &labels);
        assert_eq!(h.len(), 1, "{body}");
        let Value::Histogram(buckets) = &h[0].value else {
            panic!("not a histogram: {:?}", h[0].value)
        };
        assert!(buckets
            .windows(2)
            .all(|b| b[0].count <= b[1].count && b[0].less_than < b[1].less_than));
        let inf = buckets.last().unwrap();
        assert!(inf.less_than.is_infinite());
        assert_eq!(inf.count as u64, n);
        assert_eq!(
            m.value("uvdpa_blk_request_duration_seconds_count", &labels) as u64,
            n
        );
        let sum = m.value("uvdpa_blk_request_duration_seconds_sum", &labels);
        assert!(sum > 0.0 && sum < n as f64 * 30.0, "sum {sum}");
        // The first finite bucket is 1 µs.
        assert!((buckets[0].less_than - 1e-6).abs() < 1e-12, "{buckets:?}");
    }

    // The session, while connected and after.
    assert_eq!(
        m.value("uvdpa_session_connects_total", &[("device", "blk0")]),
        1.0
    );
    assert_eq!(
        m.value("uvdpa_device_connected", &[("device", "blk0")]),
        1.0
    );
    assert!(m.value("uvdpa_resources", &[("type", "session")]) >= 1.0);
    assert!(m.value("uvdpa_resources", &[("type", "vq")]) >= 2.0);
    drop(c);
    let t0 = Instant::now();
    loop {
        let (m, body) = Metrics::get(&addr);
        if m.value("uvdpa_session_disconnects_total", &[("device", "blk0")]) == 1.0 {
            assert_eq!(
                m.value("uvdpa_device_connected", &[("device", "blk0")]),
                0.0
            );
            assert_eq!(m.value("uvdpa_resources", &[("type", "session")]), 0.0);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no disconnect:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Anything but GET /metrics.
    let (status, _, _) = http_get(&addr, "/nothing");
    assert!(status.contains("404"), "{status}");

    // Names follow the conventions: every family has HELP and TYPE, counters end in
    // _total, units are spelled out.
    let (_, body) = Metrics::get(&addr);
    let mut types = HashMap::new();
    for l in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut w = l.split_whitespace().skip(2);
        types.insert(w.next().unwrap().to_string(), w.next().unwrap().to_string());
    }
    for l in body.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        assert!(name.starts_with("uvdpa_"), "{l}");
        if name.ends_with("_total") {
            let family = name.trim_end_matches("_total");
            assert_eq!(
                types.get(family).map(String::as_str),
                Some("counter"),
                "{l}"
            );
        }
    }
    assert!(d.stop().success());
}
