//! The metrics endpoint (`uvdpa daemon --metrics ADDR`): OpenMetrics text over HTTP at
//! `/metrics`, encoded by `prometheus-client`, served by `tiny_http` on its own thread.
//!
//! Every scrape reads the counters where the workers keep them: the per-queue stats table
//! (shared memory, relaxed atomic loads), the blk latency histograms (atomics), the
//! vhost-user session counters (atomics) and the resource tracker's per-type counts. The
//! registry lock is held only to copy the handles ([`Registry::metrics_sources`]), so a
//! scrape never waits on, or holds up, a queue worker.
//!
//! Names follow Prometheus conventions: a `uvdpa_` prefix, the device type next
//! (`uvdpa_blk_…`, `uvdpa_net_…`), base units in the name (`_bytes`, `_seconds`) and
//! `_total` on counters; labels `device`, `queue` and, for net queues, `direction`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use tracing::{info, warn};
use uvdpa_devices::net::config::QueueRole;
use uvdpa_virtio::stats::QueueStats;
use uvdpa_virtio::DeviceStatus;

use crate::registry::{MetricsKind, MetricsSource, Registry};

/// The Content-Type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// One metric family: its descriptor and its samples, written in one go.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    unit: Option<Unit>,
    samples: Vec<(Labels, u64)>,
}

impl<'a> Family<'a> {
    fn new(name: &'a str, help: &'a str) -> Self {
        Self {
            name,
            help,
            unit: None,
            samples: Vec::new(),
        }
    }

    fn bytes(name: &'a str, help: &'a str) -> Self {
        Self {
            unit: Some(Unit::Bytes),
            ..Self::new(name, help)
        }
    }

    fn push(&mut self, labels: Labels, v: u64) {
        self.samples.push((labels, v));
    }

    fn encode(&self, enc: &mut DescriptorEncoder, ty: MetricType) -> fmt::Result {
        let mut desc = enc.encode_descriptor(self.name, self.help, self.unit.as_ref(), ty)?;
        for (labels, v) in &self.samples {
            let mut m = desc.encode_family(labels)?;
            match ty {
                MetricType::Counter => m.encode_counter::<NoLabelSet, u64, f64>(v, None)?,
                _ => m.encode_gauge(v)?,
            }
        }
        Ok(())
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The collector that turns the registry's counters into metric families on each scrape.
struct DaemonCollector {
    registry: Arc<Registry>,
}

impl fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaemonCollector").finish_non_exhaustive()
    }
}

/// The queue counters every device type has, as families named `uvdpa_{TYPE}_…`.
struct QueueFamilies<'a> {
    kicks: Family<'a>,
    calls: Family<'a>,
    suppressed: Family<'a>,
    errors: Family<'a>,
}

impl<'a> QueueFamilies<'a> {
    fn new(names: [&'a str; 4]) -> Self {
        let [kicks, calls, suppressed, errors] = names;
        Self {
            kicks: Family::new(kicks, "Kick notifications received from the driver"),
            calls: Family::new(calls, "Used-buffer notifications sent to the driver"),
            suppressed: Family::new(
                suppressed,
                "Completion batches whose notification the driver suppressed (EVENT_IDX, NO_INTERRUPT)",
            ),
            errors: Family::new(errors, "Ring or device errors that stopped the queue"),
        }
    }

    fn push(&mut self, labels: &Labels, q: &QueueStats) {
        self.kicks.push(labels.clone(), load(&q.kicks));
        self.calls.push(labels.clone(), load(&q.calls));
        self.suppressed
            .push(labels.clone(), load(&q.calls_suppressed));
        self.errors.push(labels.clone(), load(&q.errors));
    }

    fn encode(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        for f in [&self.kicks, &self.calls, &self.suppressed, &self.errors] {
            f.encode(enc, MetricType::Counter)?;
        }
        Ok(())
    }
}

fn queue_labels(device: &str, q: usize) -> Labels {
    vec![("device", device.to_string()), ("queue", q.to_string())]
}

impl DaemonCollector {
    fn encode_devices(
        &self,
        enc: &mut DescriptorEncoder,
        sources: &[MetricsSource],
    ) -> fmt::Result {
        let mut info = enc.encode_descriptor(
            "uvdpa_device",
            "A device served by the daemon",
            None,
            MetricType::Info,
        )?;
        for s in sources {
            let mgmtdev = match s.kind {
                MetricsKind::Blk(_) => "blk",
                MetricsKind::Net(_) => "net",
            };
            info.encode_info(&vec![
                ("device", s.name.clone()),
                ("mgmtdev", mgmtdev.to_string()),
                ("transport", s.transport.to_string()),
            ])?;
        }
        let dev = |s: &MetricsSource| vec![("device", s.name.clone())];
        let mut status = Family::new(
            "uvdpa_device_status",
            "Device status byte (virtio 1.2 §2.1): ACKNOWLEDGE=1 DRIVER=2 DRIVER_OK=4 FEATURES_OK=8 DEVICE_NEEDS_RESET=64 FAILED=128",
        );
        let mut needs_reset = Family::new(
            "uvdpa_device_needs_reset",
            "1 while the device has DEVICE_NEEDS_RESET set (a queue failed), else 0",
        );
        let mut connected = Family::new(
            "uvdpa_device_connected",
            "1 while a frontend (vhost-user) or the kernel's driver (VDUSE) is attached",
        );
        let mut connects = Family::new(
            "uvdpa_session_connects",
            "vhost-user frontends accepted on the device's socket",
        );
        let mut disconnects = Family::new(
            "uvdpa_session_disconnects",
            "vhost-user sessions ended (frontend left, protocol error, shutdown)",
        );
        let mut refused = Family::new(
            "uvdpa_session_refused",
            "vhost-user connections refused because a frontend was already connected",
        );
        for s in sources {
            status.push(dev(s), u64::from(s.status));
            let nr =
                DeviceStatus::from_bits_retain(s.status).contains(DeviceStatus::DEVICE_NEEDS_RESET);
            needs_reset.push(dev(s), u64::from(nr));
            connected.push(dev(s), u64::from(s.connected));
            if let Some(c) = &s.sessions {
                connects.push(dev(s), load(&c.connects));
                disconnects.push(dev(s), load(&c.disconnects));
                refused.push(dev(s), load(&c.refused));
            }
        }
        for g in [&status, &needs_reset, &connected] {
            g.encode(enc, MetricType::Gauge)?;
        }
        for c in [&connects, &disconnects, &refused] {
            c.encode(enc, MetricType::Counter)?;
        }
        Ok(())
    }

    fn encode_blk(enc: &mut DescriptorEncoder, sources: &[MetricsSource]) -> fmt::Result {
        let mut requests = Family::new("uvdpa_blk_requests", "virtio-blk requests completed");
        let mut read = Family::bytes(
            "uvdpa_blk_read",
            "Bytes the device read from the driver's buffers of completed requests (request headers and write data)",
        );
        let mut written = Family::bytes(
            "uvdpa_blk_written",
            "Bytes the device wrote into the driver's buffers of completed requests (read data, IDs and status bytes)",
        );
        let mut common = QueueFamilies::new([
            "uvdpa_blk_kicks",
            "uvdpa_blk_calls",
            "uvdpa_blk_calls_suppressed",
            "uvdpa_blk_errors",
        ]);
        let mut hists = Vec::new();
        for s in sources {
            let MetricsKind::Blk(blk) = &s.kind else {
                continue;
            };
            for i in 0..s.stats.queues() {
                let Some(q) = s.stats.queue(i) else { continue };
                let labels = queue_labels(&s.name, i);
                requests.push(labels.clone(), load(&q.requests));
                read.push(labels.clone(), load(&q.bytes_read));
                written.push(labels.clone(), load(&q.bytes_written));
                common.push(&labels, q);
                if let Some(h) = u16::try_from(i).ok().and_then(|i| blk.latency(i)) {
                    hists.push((labels, h));
                }
            }
        }
        requests.encode(enc, MetricType::Counter)?;
        read.encode(enc, MetricType::Counter)?;
        written.encode(enc, MetricType::Counter)?;
        common.encode(enc)?;
        let unit = Unit::Seconds;
        let mut desc = enc.encode_descriptor(
            "uvdpa_blk_request_duration",
            "virtio-blk request latency, from taking the request off the ring to writing its status (log2 buckets from 1 µs)",
            Some(&unit),
            MetricType::Histogram,
        )?;
        for (labels, h) in &hists {
            let buckets: Vec<(f64, u64)> = h
                .buckets
                .iter()
                .map(|&(us, n)| (us as f64 / 1e6, n))
                .chain(std::iter::once((f64::MAX, h.count)))
                .collect();
            // The encoder adds bucket counts up itself (and writes f64::MAX as +Inf): hand
            // it per-bucket counts.
            let mut prev = 0;
            let per_bucket: Vec<(f64, u64)> = buckets
                .into_iter()
                .map(|(le, cum)| {
                    let n = cum.saturating_sub(prev);
                    prev = cum;
                    (le, n)
                })
                .collect();
            desc.encode_family(labels)?.encode_histogram::<NoLabelSet>(
                h.sum_ns as f64 / 1e9,
                h.count,
                &per_bucket,
                None,
            )?;
        }
        Ok(())
    }

    fn encode_net(enc: &mut DescriptorEncoder, sources: &[MetricsSource]) -> fmt::Result {
        let mut frames = Family::new(
            "uvdpa_net_frames",
            "Frames the driver received (direction rx) or sent (direction tx)",
        );
        let mut bytes = Family::bytes(
            "uvdpa_net",
            "Bytes of those frames (Ethernet header and payload, without the virtio-net header)",
        );
        let mut drops = Family::new(
            "uvdpa_net_drops",
            "Frames dropped: no receive buffer space (rx), malformed or oversized (tx)",
        );
        let mut ctrl = Family::new("uvdpa_net_ctrl_commands", "Control queue commands handled");
        let mut common = QueueFamilies::new([
            "uvdpa_net_kicks",
            "uvdpa_net_calls",
            "uvdpa_net_calls_suppressed",
            "uvdpa_net_errors",
        ]);
        for s in sources {
            let MetricsKind::Net(roles) = &s.kind else {
                continue;
            };
            for i in 0..s.stats.queues() {
                let Some(q) = s.stats.queue(i) else { continue };
                let labels = queue_labels(&s.name, i);
                common.push(&labels, q);
                let (direction, b) = match roles.get(i).copied().flatten() {
                    Some(QueueRole::Rx(_)) => ("rx", &q.bytes_written),
                    Some(QueueRole::Tx(_)) => ("tx", &q.bytes_read),
                    Some(QueueRole::Ctrl) => {
                        ctrl.push(labels, load(&q.requests));
                        continue;
                    }
                    None => continue,
                };
                let mut l = labels;
                l.push(("direction", direction.to_string()));
                frames.push(l.clone(), load(&q.requests));
                bytes.push(l.clone(), load(b));
                drops.push(l, load(&q.drops));
            }
        }
        frames.encode(enc, MetricType::Counter)?;
        bytes.encode(enc, MetricType::Counter)?;
        drops.encode(enc, MetricType::Counter)?;
        ctrl.encode(enc, MetricType::Counter)?;
        common.encode(enc)
    }
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let sources = self.registry.metrics_sources();
        self.encode_devices(&mut enc, &sources)?;
        Self::encode_blk(&mut enc, &sources)?;
        Self::encode_net(&mut enc, &sources)?;
        let mut res = Family::new(
            "uvdpa_resources",
            "Live entries of the resource tracker per type (`uvdpa res show`)",
        );
        for (ty, n) in self.registry.tracker().counts() {
            res.push(
                vec![("type", ty.as_str().to_string())],
                u64::try_from(n).unwrap_or(u64::MAX),
            );
        }
        res.encode(&mut enc, MetricType::Gauge)
    }
}

/// The exposition of `registry`'s counters as of now (OpenMetrics text, ending in `# EOF`).
pub fn render(registry: &Arc<Registry>) -> String {
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register_collector(Box::new(DaemonCollector {
        registry: registry.clone(),
    }));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        warn!("Encoding the metrics failed: {e}");
    }
    out
}

/// The running metrics endpoint.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

/// Binds `addr` and serves `/metrics` on a thread of its own.
///
/// # Errors
/// The address cannot be bound, or the thread cannot start.
pub fn serve(addr: SocketAddr, registry: Arc<Registry>) -> io::Result<MetricsServer> {
    let server = Arc::new(tiny_http::Server::http(addr).map_err(io::Error::other)?);
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("the metrics server is not on an IP address"))?;
    let s = server.clone();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in s.incoming_requests() {
                respond(req, &registry);
            }
        })?;
    info!(%addr, "serving metrics at http://{addr}/metrics");
    Ok(MetricsServer {
        server,
        addr,
        thread: Some(thread),
    })
}

fn respond(req: tiny_http::Request, registry: &Arc<Registry>) {
    let path = req.url().split('?').next().unwrap_or_default();
    let header = |v: &str| {
        tiny_http::Header::from_bytes(&b"Content-Type"[..], v.as_bytes())
            .map_err(|()| warn!("bad header"))
            .ok()
    };
    let get = matches!(
        req.method(),
        tiny_http::Method::Get | tiny_http::Method::Head
    );
    let resp = match (get, path) {
        (true, "/metrics") => {
            let mut r = tiny_http::Response::from_string(render(registry));
            if let Some(h) = header(CONTENT_TYPE) {
                r.add_header(h);
            }
            r
        }
        (true, "/") => tiny_http::Response::from_string("uvdpa: metrics at /metrics\n"),
        (true, _) => tiny_http::Response::from_string("not found\n").with_status_code(404),
        (false, _) => tiny_http::Response::from_string("only GET\n").with_status_code(405),
    };
    if let Err(e) = req.respond(resp) {
        warn!("Answering a metrics request failed: {e}");
    }
}

impl MetricsServer {
    /// The address it listens on (with the port the kernel chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
