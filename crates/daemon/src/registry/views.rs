//! The views the registry returns: the stable JSON schema of `uvdpa ... -j` (devices,
//! mgmtdevs, config spaces, counters, vectors, captures), and the text helpers they use
//! (feature names, the QEMU and testpmd lines that attach a device).

use super::*;

/// One attribute a mgmtdev accepts in `dev add`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttrView {
    /// Attribute name as typed on the command line.
    pub name: String,
    /// Allowed values.
    pub range: String,
    /// Default when omitted.
    pub default: String,
}

/// A device type (`uvdpa mgmtdev show`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MgmtdevView {
    /// Name used in `dev add ... mgmtdev NAME`.
    pub name: String,
    /// Virtio device ID (virtio 1.2 §5).
    pub device_id: u32,
    /// Transport(s).
    pub transports: Vec<String>,
    /// Attributes of `dev add`.
    pub attributes: Vec<AttrView>,
}

/// The mgmtdevs this daemon offers.
pub fn mgmtdevs() -> Vec<MgmtdevView> {
    let a = |name: &str, range: &str, default: &str| AttrView {
        name: name.into(),
        range: range.into(),
        default: default.into(),
    };
    let poll_us = |default: u32| {
        a(
            "poll_us",
            "0..=1000000 (busy-poll window after the ring empties, µs; default 0 over vduse and for rbd)",
            &default.to_string(),
        )
    };
    let transport = || a("transport", "vhost-user|vduse", "vhost-user");
    let unoffer = || {
        a(
            "unoffer",
            "feature names, comma-separated (not VIRTIO_F_VERSION_1 or a mandated one)",
            "-",
        )
    };
    let socket = || {
        [
            a("socket_mode", "octal 0000..=0777 (vhost-user socket file)", "0600"),
            a(
                "socket_user",
                "user name or uid: the socket's owner, accepted as a frontend",
                "-",
            ),
            a(
                "socket_group",
                "group name or gid: the socket's group; frontends of that primary group accepted",
                "-",
            ),
            a(
                "max_memory",
                "bytes or K/M/G/T, 1M..=128T: address space a frontend's memory table may map (vhost-user)",
                "4T",
            ),
        ]
    };
    let bind = || {
        a(
            "bind",
            "vduse|none (vduse: add to the vDPA bus through vdpa netlink)",
            "vduse",
        )
    };
    vec![
        MgmtdevView {
            name: "blk".into(),
            device_id: 2,
            transports: vec!["vhost-user".into(), "vduse".into()],
            attributes: vec![
                a("backend", "ram|file|null|nbd|rbd", "ram"),
                a(
                    "size",
                    "512..=2^47 bytes, multiple of 512; K/M/G/T suffixes (ram, null)",
                    "-",
                ),
                a("path", "file path (file)", "-"),
                a("direct", "flag: O_DIRECT (file)", "off"),
                a(
                    "aio",
                    "io_uring|sync (file; io_uring falls back to sync where unavailable)",
                    "io_uring",
                ),
                a(
                    "uri",
                    "nbd://HOST[:PORT]/EXPORT | nbd+unix:///EXPORT?socket=PATH (nbd)",
                    "-",
                ),
                a(
                    "connections",
                    "1..=queues (nbd; more than 1 only with NBD_FLAG_CAN_MULTI_CONN)",
                    "1",
                ),
                a(
                    "reconnect_delay",
                    "0..=3600 s requests wait for a lost server (nbd)",
                    "0",
                ),
                a("timeout", "1..=3600 s a request may take (nbd, rbd)", "30"),
                a("pool", "Ceph pool of the image (rbd)", "-"),
                a("image", "RBD image name (rbd)", "-"),
                a("conf", "ceph.conf path (rbd)", "-"),
                a("id", "cephx user without client. (rbd)", "admin"),
                a("keyring", "cephx keyring path (rbd)", "from conf"),
                a("ro", "flag: read-only", "off"),
                a("queues", "1..=64", "1"),
                a(
                    "queue_size",
                    "power of two 1..=32768",
                    &DEFAULT_BLK_QUEUE_SIZE.to_string(),
                ),
                a("serial", "at most 20 bytes", "uvdpa-NAME"),
                a("logical_block_size", "512|1024|2048|4096", "512"),
                poll_us(BLK_DEFAULT_POLL_US),
                unoffer(),
                transport(),
                bind(),
                a(
                    "bounce_size",
                    "1M..=1G bytes, more than seg_max × size_max (vduse)",
                    "power of two above the largest request, at least 64M",
                ),
            ]
            .into_iter()
            .chain(socket())
            .collect(),
        },
        MgmtdevView {
            name: "net".into(),
            device_id: 1,
            transports: vec!["vhost-user".into(), "vduse".into()],
            attributes: vec![
                a("backend", "loopback|tap|switch|sink|source", "loopback"),
                a(
                    "mac",
                    "unicast address aa:bb:cc:dd:ee:ff",
                    "02:... generated from NAME",
                ),
                a("mtu", "68..=65535 bytes", "1500"),
                a(
                    "max_vqp",
                    &format!("1..={MAX_QUEUE_PAIRS} (queue pairs)"),
                    "1",
                ),
                a("queue_size", &format!("1..={MAX_NET_QUEUE_SIZE}"), "256"),
                a(
                    "tap",
                    "interface name, at most 15 bytes (tap)",
                    "uvdpa-NAME",
                ),
                a("switch", "in-daemon switch name (switch, required)", "-"),
                a(
                    "frame_len",
                    &format!("{NET_MIN_FRAME_LEN}..=mtu+14 bytes (source)"),
                    &NET_DEFAULT_FRAME_LEN.to_string(),
                ),
                poll_us(0),
                unoffer(),
                transport(),
                bind(),
                a("bounce_size", "1M..=1G bytes (vduse)", "64M"),
            ]
            .into_iter()
            .chain(socket())
            .collect(),
        },
    ]
}

/// `uvdpa dev show` for one device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceView {
    /// Device name.
    pub name: String,
    /// Its mgmtdev.
    pub mgmtdev: String,
    /// `vhost-user` or `vduse`.
    pub transport: String,
    /// VDUSE: the device on the vDPA bus (`/sys/bus/vdpa/devices/NAME`), when bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdpa: Option<String>,
    /// VDUSE bound to virtio_vdpa: the kernel's block device (`vda`) or netdev (`eth0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_dev: Option<String>,
    /// Backend kind.
    pub backend: String,
    /// vhost-user socket path, or the VDUSE character device (`/dev/vduse/NAME`).
    pub socket: String,
    /// `ready` (no frontend), `connected`, `live` (DRIVER_OK) or `needs-reset`.
    pub state: String,
    /// Status bits by name (virtio 1.2 §2.1).
    pub status: Vec<String>,
    /// Negotiated features by name (unknown bits as `bitN`).
    pub features: Vec<String>,
    /// Frontend pid, when connected.
    pub frontend_pid: Option<u32>,
    /// Number of virtqueues (net: two per queue pair and the control queue).
    pub queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// vhost-user: the most bytes of address space a frontend's memory table may map
    /// (attribute `max_memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<u64>,
    /// Capacity in bytes (blk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// Read-only (blk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// How the file backend does its I/O, as running: `io_uring` or `sync` (blk: file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio: Option<String>,
    /// MAC address (net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU in bytes (net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Queue pairs (net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vqp: Option<u16>,
    /// QEMU options that attach it.
    pub qemu: String,
    /// The `dpdk-testpmd --vdev` argument that attaches it (net).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub testpmd: Option<String>,
}

/// `uvdpa dev config show`: the decoded virtio_blk_config (virtio 1.2 §5.2.4).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlkConfigView {
    /// Device name.
    pub name: String,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment in bytes.
    pub size_max: u32,
    /// Most segments per request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// Request queues.
    pub num_queues: u16,
    /// Most sectors per discard segment.
    pub max_discard_sectors: u32,
    /// Most discard segments.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may unmap.
    pub write_zeroes_may_unmap: bool,
    /// How the file backend does its I/O, as running: `io_uring` or `sync` (file backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio: Option<String>,
}

/// `uvdpa dev config show` for a net device: the decoded virtio_net_config (virtio 1.2
/// §5.1.4) as the driver reads it, the backend, and the features the driver negotiated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetConfigView {
    /// Device name.
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// MTU in bytes.
    pub mtu: u16,
    /// Queue pairs (`max_virtqueue_pairs`).
    pub max_vqp: u16,
    /// Link status: `up` or `down`.
    pub link: String,
    /// Backend kind.
    pub backend: String,
    /// TAP interface name (tap backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Switch name (switch backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    /// Generated frame length (source backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_len: Option<u16>,
    /// Features the driver negotiated, by name (empty until a driver set them).
    pub negotiated_features: Vec<String>,
}

/// `uvdpa dev config show`: the config of a blk or a net device (JSON: the object itself,
/// without a tag).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ConfigView {
    /// virtio-blk.
    Blk(BlkConfigView),
    /// virtio-net.
    Net(NetConfigView),
}

/// `uvdpa dev vstats show` for a net device: one queue's role and its counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetVstatsView {
    /// Device name.
    pub name: String,
    /// Queue index.
    pub qidx: u32,
    /// `rx` (even index below 2 × pairs), `tx` (odd), `cq` (the control queue), or
    /// `unused` (past the control queue of a driver that did not negotiate MQ).
    pub queue_type: String,
    /// Frames received by the driver (rx) or sent by it (tx); control commands (cq).
    pub packets: u64,
    /// Bytes of those frames (Ethernet header and payload; the virtio-net header is not
    /// counted), the stats table's `bytes_written` for rx and `bytes_read` for tx; for cq,
    /// the bytes of the commands read.
    pub bytes: u64,
    /// Frames dropped: no receive buffer space (rx), malformed or oversized (tx).
    pub drops: u64,
    /// Kicks received.
    pub kicks: u64,
    /// Calls sent.
    pub calls: u64,
    /// Errors that stopped the queue.
    pub errors: u64,
}

/// `uvdpa dev vstats show`: a blk or a net queue (JSON: the object itself, untagged).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum QueueStatsView {
    /// A virtio-blk queue.
    Blk(VstatsView),
    /// A virtio-net queue.
    Net(NetVstatsView),
}

/// `uvdpa dev vstats show`: counters of one queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VstatsView {
    /// Device name.
    pub name: String,
    /// Queue index.
    pub qidx: u32,
    /// Chains completed.
    pub requests: u64,
    /// Bytes read from the driver's buffers.
    pub bytes_read: u64,
    /// Bytes written to the driver's buffers.
    pub bytes_written: u64,
    /// Kicks received.
    pub kicks: u64,
    /// Calls sent.
    pub calls: u64,
    /// Calls suppressed (EVENT_IDX, NO_INTERRUPT).
    pub calls_suppressed: u64,
    /// Errors that stopped the queue.
    pub errors: u64,
}

/// What the metrics endpoint reads of one device: shared handles to its counters, copied
/// out of the registry under its lock (held for the copy only), so a scrape reads the
/// counters without holding any lock a queue worker or the control socket needs.
pub struct MetricsSource {
    /// Device name.
    pub name: String,
    /// `vhost-user` or `vduse`.
    pub transport: &'static str,
    /// Status bits (virtio 1.2 §2.1) as of the copy.
    pub status: u8,
    /// A frontend (or the kernel's driver) is attached.
    pub connected: bool,
    /// The per-queue counters (shared memory the workers add to).
    pub stats: Arc<StatsTable>,
    /// Frontend connections (vhost-user only).
    pub sessions: Option<Arc<SessionCounters>>,
    /// What kind of device, with what the metrics need of it.
    pub kind: MetricsKind,
}

/// The type-specific part of a [`MetricsSource`].
pub enum MetricsKind {
    /// A blk device (its latency histograms).
    Blk(Arc<BlkDevice>),
    /// A net device: the role of each queue under the negotiated features (or, before a
    /// driver negotiated, the layout of a device with MQ).
    Net(Vec<Option<QueueRole>>),
}

/// What `dev.capture` attached, for the client (with the ring's memfd).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaptureView {
    /// Device name.
    pub name: String,
    /// `net` (frames, for pcapng) or `blk` (request trace records,
    /// `uvdpa_devices::blk::trace`).
    #[serde(default = "net_mgmtdev")]
    pub mgmtdev: String,
    /// The virtqueues captured (net: receive queues even, transmit queues odd).
    pub queues: Vec<u16>,
    /// Sub-rings in the memfd (net: one per queue pair, blk: one per queue; one for a
    /// single queue).
    pub rings: u32,
    /// Data bytes per sub-ring.
    pub ring_size: u64,
    /// Most bytes copied per frame (blk: the trace record's size).
    pub snaplen: u32,
    /// The resource entry (`capture/N`).
    pub res: String,
}

pub(super) fn net_mgmtdev() -> String {
    "net".into()
}

/// Names of the set bits of a feature word of a `blk` or `net` device (unknown bits as
/// `bitN`).
pub(super) fn feature_names(bits: u64, mgmtdev: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for i in 0..64 {
        let bit = 1u64 << i;
        if bits & bit == 0 {
            continue;
        }
        let name = VirtioFeatures::from_bits(bit)
            .and_then(|f| f.iter_names().next().map(|(n, _)| n.to_string()))
            .or_else(|| match mgmtdev {
                "net" => VirtioFeatures::from_raw(bit)
                    .net_names()
                    .first()
                    .map(|n| n.to_string()),
                _ => BlkFeatures::from_bits(bit)
                    .and_then(|f| f.iter_names().next().map(|(n, _)| n.to_string())),
            })
            .unwrap_or_else(|| format!("bit{i}"));
        names.push(name);
    }
    names
}

/// The QEMU options that attach a vhost-user-blk device served at `sock`, with the
/// device's queue size as the ring size (`seg_max` is made for it; see
/// [`uvdpa_devices::blk::seg_max`]).
pub fn qemu_command_line(name: &str, queues: u16, queue_size: u16, sock: &Path) -> String {
    format!(
        "qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \
         -numa node,memdev=mem -chardev socket,id={name},path={sock} \
         -device vhost-user-blk-pci,chardev={name},num-queues={queues},queue-size={queue_size} ...",
        sock = sock.display(),
    )
}

/// The QEMU options that attach a vhost-user net device with `pairs` queue pairs, address
/// `mac` and MTU `mtu` served at `sock` (`vectors=0`: QEMU 7.2 under TCG crashes with MSI-X
/// on a vhost-user virtio-net-pci; see tests/guest/run-guest.sh). An MTU other than 1500
/// is given to the guest with `host_mtu` (VIRTIO_NET_F_MTU).
pub fn qemu_net_command_line(pairs: u16, mac: &str, mtu: u16, sock: &Path) -> String {
    let (queues, mq) = if pairs > 1 {
        (format!(",queues={pairs}"), ",mq=on")
    } else {
        (String::new(), "")
    };
    let host_mtu = if mtu == DEFAULT_MTU {
        String::new()
    } else {
        format!(",host_mtu={mtu}")
    };
    format!(
        "qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \
         -numa node,memdev=mem -chardev socket,id=c0,path={sock} \
         -netdev vhost-user,id=n0,chardev=c0{queues} \
         -device virtio-net-pci,netdev=n0,mac={mac}{mq}{host_mtu},vectors=0 ...",
        sock = sock.display(),
    )
}

/// Where VDUSE device `name` sits on the vDPA bus: its bus device (when bound) and what
/// the kernel made of it: the block device or netdev of virtio_vdpa, or the
/// `vhost-vdpa-N` character device of vhost_vdpa.
pub(super) fn vdpa_sysfs(name: &str) -> (Option<String>, Option<String>) {
    let dir = Path::new("/sys/bus/vdpa/devices").join(name);
    if !dir.exists() {
        return (None, None);
    }
    let entries = |p: &Path| -> Vec<String> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut kernel_dev = None;
    for e in entries(&dir) {
        if e.starts_with("vhost-vdpa-") {
            kernel_dev = Some(e);
        } else if e.starts_with("virtio") {
            let vdir = dir.join(&e);
            kernel_dev = ["block", "net"]
                .iter()
                .find_map(|sub| entries(&vdir.join(sub)).into_iter().next());
        }
    }
    (Some(name.to_string()), kernel_dev)
}

/// The `dpdk-testpmd --vdev` argument that attaches a net device served at `sock`.
pub fn testpmd_vdev(pairs: u16, sock: &Path) -> String {
    format!("net_virtio_user0,path={},queues={pairs}", sock.display())
}

pub(super) fn net_backend_name(b: &NetBackendSpec) -> &'static str {
    match b {
        NetBackendSpec::Loopback => "loopback",
        NetBackendSpec::Sink => "sink",
        NetBackendSpec::Source { .. } => "source",
        NetBackendSpec::Tap { .. } => "tap",
        NetBackendSpec::Switch { .. } => "switch",
    }
}

/// One interrupt vector (`uvdpa dev irq show`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VectorView {
    /// Vector index (= vring index).
    pub vec: u16,
    /// A call eventfd is installed.
    pub trigger: bool,
    /// Masked.
    pub masked: bool,
    /// A signal is pending (masked while fired).
    pub pending: bool,
    /// Coalescing: at most one signal per this many µs (0 = off).
    pub coalesce_usecs: u32,
    /// Coalescing: at most one signal per this many completions batches (0 = off).
    pub coalesce_frames: u32,
    /// Signals sent (including deferred and injected ones).
    pub signals: u64,
    /// Signals suppressed by EVENT_IDX / NO_INTERRUPT.
    pub suppressed_event_idx: u64,
    /// Signals suppressed by coalescing.
    pub suppressed_coalesced: u64,
    /// Signals suppressed by masking.
    pub suppressed_masked: u64,
}

/// Reads one queue's counters into a view.
pub fn vstats_view(name: &str, qidx: u32, q: &QueueStats) -> VstatsView {
    VstatsView {
        name: name.into(),
        qidx,
        requests: q.requests.load(Ordering::Relaxed),
        bytes_read: q.bytes_read.load(Ordering::Relaxed),
        bytes_written: q.bytes_written.load(Ordering::Relaxed),
        kicks: q.kicks.load(Ordering::Relaxed),
        calls: q.calls.load(Ordering::Relaxed),
        calls_suppressed: q.calls_suppressed.load(Ordering::Relaxed),
        errors: q.errors.load(Ordering::Relaxed),
    }
}

/// Reads one net queue's counters into a view; `role` is what the queue is (`None`: not
/// in use with the negotiated features).
pub fn net_vstats_view(
    name: &str,
    qidx: u32,
    role: Option<QueueRole>,
    q: &QueueStats,
) -> NetVstatsView {
    let (queue_type, bytes) = match role {
        Some(QueueRole::Rx(_)) => ("rx", &q.bytes_written),
        Some(QueueRole::Tx(_)) => ("tx", &q.bytes_read),
        Some(QueueRole::Ctrl) => ("cq", &q.bytes_read),
        None => ("unused", &q.bytes_read),
    };
    NetVstatsView {
        name: name.into(),
        qidx,
        queue_type: queue_type.into(),
        packets: q.requests.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
        drops: q.drops.load(Ordering::Relaxed),
        kicks: q.kicks.load(Ordering::Relaxed),
        calls: q.calls.load(Ordering::Relaxed),
        errors: q.errors.load(Ordering::Relaxed),
    }
}
