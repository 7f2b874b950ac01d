//! The device registry of the daemon: mgmtdevs (device types), and the devices created from
//! them at start (config file) or at run time (`uvdpa dev add`), each served on its own
//! vhost-user socket. Views returned here are the stable JSON schema of `uvdpa ... -j`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};
use uvdpa_devices::blk::trace as blk_trace;
use uvdpa_devices::blk::{
    BackendSpec, BlkConfig, BlkDevice, BlkFeatures, DEFAULT_QUEUE_SIZE as DEFAULT_BLK_QUEUE_SIZE,
};
use uvdpa_devices::net::capture::{CaptureError, CapturePoint, CaptureRing};
use uvdpa_devices::net::config::{
    MacDisplay, QueueRole, VirtioNetConfig, DEFAULT_MTU, MAX_QUEUE_PAIRS, VIRTIO_NET_S_LINK_UP,
};
use uvdpa_devices::net::device::{NetBackendSpec, NetDevice, MAX_NET_QUEUE_SIZE};
use uvdpa_devices::net::switch::SwitchRegistry;
use uvdpa_restrack::{Owner, ResHandle, ResType, Tracker};
use uvdpa_vduse::server::{VduseOptions, VduseServer};
use uvdpa_vhost_user::server::SessionCounters;
use uvdpa_vhost_user::{ResCtx, ServerOptions, SessionState, VhostUserServer};
use uvdpa_virtio::interrupts::VectorTable;
use uvdpa_virtio::stats::QueueStats;
use uvdpa_virtio::stats::StatsTable;
use uvdpa_virtio::{DeviceStatus, VirtioDevice, VirtioFeatures};

use crate::config::{
    DeviceKind, DeviceSpec, NetSpec, Transport, BLK_DEFAULT_POLL_US, NET_DEFAULT_FRAME_LEN,
    NET_MIN_FRAME_LEN,
};

/// `e` and its sources, joined by ": " (user-facing errors print their cause chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

mod handover;
pub use handover::Handed;

/// Registry errors; each maps to an errno-like code for IPC replies.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// No device with this name.
    #[error("No device named {0:?}")]
    NotFound(String),
    /// The name is taken.
    #[error("A device named {0:?} already exists")]
    Exists(String),
    /// The device could not be created (backend, socket).
    #[error("Cannot create device {name}: {reason}")]
    Create {
        /// Device name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The device was removed, but something still held it when the wait ran out.
    #[error("Device {name} removed, but {reason}")]
    StillHeld {
        /// Device name.
        name: String,
        /// Who holds it (from the resource tracker).
        reason: String,
    },
    /// An attribute the device cannot change (to that value).
    #[error("Cannot change {attr} of device {name}: {reason}")]
    Set {
        /// Device name.
        name: String,
        /// The attribute.
        attr: &'static str,
        /// Why not.
        reason: String,
    },
    /// A queue index out of range.
    #[error("Device {name} has no queue {qidx} (it has {queues})")]
    NoQueue {
        /// Device name.
        name: String,
        /// Index asked for.
        qidx: u32,
        /// Number of queues.
        queues: u16,
    },
    /// A live capture could not be attached.
    #[error("Cannot capture device {name}: {reason}")]
    Capture {
        /// Device name.
        name: String,
        /// Why not.
        reason: String,
    },
    /// A live upgrade cannot move the devices (or one of them).
    #[error("Cannot hand the devices over: {0}")]
    Handover(String),
    /// A capture is already attached to the device (or this client already captures).
    #[error("Cannot capture device {name}: {reason}")]
    CaptureBusy {
        /// Device name.
        name: String,
        /// Who holds it.
        reason: String,
    },
}

impl RegistryError {
    /// The errno-like code for an IPC error reply.
    pub fn code(&self) -> i32 {
        match self {
            RegistryError::NotFound(_) | RegistryError::NoQueue { .. } => {
                -(rustix::io::Errno::NODEV.raw_os_error())
            }
            RegistryError::Exists(_) => -(rustix::io::Errno::EXIST.raw_os_error()),
            RegistryError::Create { .. }
            | RegistryError::Set { .. }
            | RegistryError::Capture { .. } => -(rustix::io::Errno::INVAL.raw_os_error()),
            RegistryError::StillHeld { .. }
            | RegistryError::CaptureBusy { .. }
            | RegistryError::Handover(_) => -(rustix::io::Errno::BUSY.raw_os_error()),
        }
    }
}

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

/// A created device with its type's configuration (a copy of its spec's kind).
enum Dev {
    Blk(BlkConfig, Arc<BlkDevice>),
    Net(NetSpec, Arc<NetDevice>),
}

impl Dev {
    /// The device as the transport serves it.
    fn virtio(&self) -> Arc<dyn VirtioDevice> {
        match self {
            Dev::Blk(_, b) => b.clone(),
            Dev::Net(_, n) => n.clone(),
        }
    }
}

/// A device whose backend is set up but not yet served (so the daemon can check every
/// configured device before serving any). Made by [`Registry::prepare`].
pub struct Prepared {
    spec: DeviceSpec,
    dev: Dev,
}

impl Prepared {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// A device's transport endpoint.
enum Served {
    /// A vhost-user socket.
    VhostUser(VhostUserServer),
    /// A VDUSE device.
    Vduse(VduseServer),
}

impl Served {
    fn session_state(&self) -> SessionState {
        match self {
            Served::VhostUser(s) => s.session_state(),
            Served::Vduse(s) => s.session_state(),
        }
    }

    fn stats(&self) -> &Arc<StatsTable> {
        match self {
            Served::VhostUser(s) => s.stats(),
            Served::Vduse(s) => s.stats(),
        }
    }

    /// Frontend connections so far (vhost-user; a VDUSE device has one kernel driver and
    /// no sessions to count).
    fn sessions(&self) -> Option<Arc<SessionCounters>> {
        match self {
            Served::VhostUser(s) => Some(s.sessions().clone()),
            Served::Vduse(_) => None,
        }
    }

    fn vectors(&self) -> &Arc<VectorTable> {
        match self {
            Served::VhostUser(s) => s.vectors(),
            Served::Vduse(s) => s.vectors(),
        }
    }

    /// Raises a configuration change notification (virtio 1.2 §2.5) towards the driver:
    /// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG to a vhost-user frontend that set a backend
    /// channel, VDUSE_DEV_SET_CONFIG + VDUSE_DEV_INJECT_CONFIG_IRQ on VDUSE. Returns
    /// whether the notice went out (a vhost-user device without a frontend, or whose
    /// frontend has no backend channel, cannot be told: the new config is what its next
    /// GET_CONFIG reads).
    fn config_changed(&self, name: &str) -> bool {
        match self {
            Served::VhostUser(s) => s.config_changed(),
            Served::Vduse(s) => match s.config_changed() {
                Ok(()) => true,
                Err(e) => {
                    warn!(
                        device = name,
                        "Config change notification failed: {}",
                        error_chain(&e)
                    );
                    false
                }
            },
        }
    }

    /// The socket path, or the VDUSE character device.
    fn path(&self) -> PathBuf {
        match self {
            Served::VhostUser(s) => s.path().to_path_buf(),
            Served::Vduse(s) => s.path(),
        }
    }

    fn shutdown(self) {
        match self {
            Served::VhostUser(s) => s.shutdown(),
            Served::Vduse(s) => s.shutdown(),
        }
    }
}

struct Managed {
    spec: DeviceSpec,
    dev: Dev,
    server: Served,
    entry: ResHandle,
}

/// A live capture attached by an IPC client (`uvdpa dev capture`), kept until the client
/// disconnects or the device goes.
struct ActiveCapture {
    device: String,
    point: Arc<CapturePoint>,
    /// Listed by `res show capture` while attached.
    entry: ResHandle,
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

fn net_mgmtdev() -> String {
    "net".into()
}

/// Default snaplen of `dev capture` (tcpdump's).
pub const CAPTURE_DEFAULT_SNAPLEN: u32 = 262_144;
/// Capture memory for all sub-rings together, before rounding each down to a power of
/// two within [`CAPTURE_MIN_RING`]..=[`CAPTURE_MAX_RING`].
const CAPTURE_BUDGET: u64 = 16 << 20;
const CAPTURE_MIN_RING: u64 = 1 << 20;
const CAPTURE_MAX_RING: u64 = 8 << 20;

/// How long `dev del` waits for the last reference to a device (restrack, seed 003).
pub const DEL_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon's devices.
pub struct Registry {
    run_dir: PathBuf,
    devices: Mutex<BTreeMap<String, Managed>>,
    tracker: Tracker,
    /// The in-daemon L2 switches net devices with the `switch` backend join.
    switches: SwitchRegistry,
    /// Live captures by IPC client id.
    captures: Mutex<HashMap<u64, ActiveCapture>>,
}

/// Names of the set bits of a feature word of a `blk` or `net` device (unknown bits as
/// `bitN`).
fn feature_names(bits: u64, mgmtdev: &str) -> Vec<String> {
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
fn vdpa_sysfs(name: &str) -> (Option<String>, Option<String>) {
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

fn net_backend_name(b: &NetBackendSpec) -> &'static str {
    match b {
        NetBackendSpec::Loopback => "loopback",
        NetBackendSpec::Sink => "sink",
        NetBackendSpec::Source { .. } => "source",
        NetBackendSpec::Tap { .. } => "tap",
        NetBackendSpec::Switch { .. } => "switch",
    }
}

impl Registry {
    /// An empty registry whose sockets go in `run_dir`.
    pub fn new(run_dir: &Path, tracker: Tracker) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            devices: Mutex::new(BTreeMap::new()),
            tracker,
            switches: SwitchRegistry::new(),
            captures: Mutex::default(),
        }
    }

    /// The resource tracker devices and their sessions are recorded in.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Managed>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a device and starts serving it.
    ///
    /// # Errors
    /// [`RegistryError::Exists`] for a taken name, [`RegistryError::Create`] when the
    /// backend or socket cannot be set up.
    pub fn add(&self, spec: DeviceSpec) -> Result<DeviceView, RegistryError> {
        // Before the backend is set up: a second TAP open would attach queues to the
        // existing device's interface, a second switch join would add a port.
        if self.lock().contains_key(&spec.name) {
            return Err(RegistryError::Exists(spec.name));
        }
        let p = self.prepare(spec)?;
        self.install(p)
    }

    /// Sets up the backend of `spec` (net devices of the switch backend join this
    /// registry's switch of that name).
    ///
    /// # Errors
    /// [`RegistryError::Create`] with the backend's reason, or naming mandated features the
    /// device does not offer.
    pub fn prepare(&self, spec: DeviceSpec) -> Result<Prepared, RegistryError> {
        self.prepare_with(spec, None)
    }

    /// As [`Registry::prepare`]; a `ram` blk device maps `ram` (the memfd of the disk a
    /// previous daemon served) instead of a new one.
    ///
    /// # Errors
    /// As [`Registry::prepare`]; `ram` given for another backend.
    pub fn prepare_with(
        &self,
        spec: DeviceSpec,
        ram: Option<OwnedFd>,
    ) -> Result<Prepared, RegistryError> {
        let create = |reason: String| RegistryError::Create {
            name: spec.name.clone(),
            reason,
        };
        // After `--user` dropped root, say why instead of failing on EACCES/EPERM.
        if matches!(spec.transport, crate::config::Transport::Vduse { .. }) {
            crate::privs::needs_root("A VDUSE device").map_err(|e| create(e.to_string()))?;
        }
        if let DeviceKind::Net(n) = &spec.kind {
            if matches!(
                n.backend,
                uvdpa_devices::net::device::NetBackendSpec::Tap { .. }
            ) {
                crate::privs::needs_root("A tap device").map_err(|e| create(e.to_string()))?;
            }
        }
        let dev = match &spec.kind {
            DeviceKind::Blk(cfg) => Dev::Blk(
                cfg.clone(),
                Arc::new(
                    match ram {
                        Some(fd) => BlkDevice::with_ram_fd(cfg.clone(), fd),
                        None => BlkDevice::new(cfg.clone()),
                    }
                    .map_err(|e| create(error_chain(&e)))?,
                ),
            ),
            DeviceKind::Net(n) => Dev::Net(
                n.clone(),
                Arc::new(
                    NetDevice::new(
                        &spec.name,
                        n.config,
                        n.queue_size,
                        &n.backend,
                        &self.switches,
                    )
                    .map_err(|e| create(e.to_string()))?,
                ),
            ),
        };
        let unoffered = spec.mandate & !dev.virtio().features().bits();
        if unoffered != 0 {
            return Err(create(format!(
                "mandate: {} not offered by this device",
                feature_names(unoffered, spec.mgmtdev()).join(",")
            )));
        }
        Ok(Prepared { spec, dev })
    }

    /// Starts serving a device whose backend is already set up.
    ///
    /// # Errors
    /// As [`Registry::add`].
    pub fn install(&self, p: Prepared) -> Result<DeviceView, RegistryError> {
        self.install_with(p, None)
    }

    /// As [`Registry::install`]; with `adopt`, a vhost-user device is rebuilt from what a
    /// previous daemon's server left ([`VhostUserServer::adopt`]) and stays paused.
    fn install_with(
        &self,
        p: Prepared,
        adopt: Option<Handed>,
    ) -> Result<DeviceView, RegistryError> {
        let Prepared { spec, dev } = p;
        let mut devs = self.lock();
        if devs.contains_key(&spec.name) {
            return Err(RegistryError::Exists(spec.name));
        }
        let sock = self.run_dir.join(format!("{}.sock", spec.name));
        let entry = self
            .tracker
            .create(ResType::Device, spec.name.clone(), None, Owner::current());
        entry.add();
        let res = ResCtx {
            tracker: self.tracker.clone(),
            device: entry.id(),
        };
        let poll = Duration::from_micros(u64::from(spec.poll_us));
        let mandated = VirtioFeatures::from_raw(spec.mandate);
        let unoffered = VirtioFeatures::from_raw(spec.unoffer);
        let server = match spec.transport {
            Transport::VhostUser => {
                let opts = ServerOptions {
                    res: Some(res),
                    poll,
                    mandated,
                    unoffered,
                    access: spec.access,
                    max_memory: spec.max_memory,
                };
                let server = match adopt {
                    None => VhostUserServer::start_with(&spec.name, &sock, dev.virtio(), opts)
                        .map_err(|e| format!("cannot serve on {}: {e}", sock.display())),
                    Some(Handed::VhostUser(h)) => {
                        VhostUserServer::adopt(&spec.name, &sock, dev.virtio(), opts, h)
                            .map_err(|e| error_chain(&e))
                    }
                    Some(Handed::Vduse(_)) => Err("VDUSE state for a vhost-user device".into()),
                };
                Served::VhostUser(server.map_err(|reason| RegistryError::Create {
                    name: spec.name.clone(),
                    reason,
                })?)
            }
            Transport::Vduse { bind, bounce_size } => {
                let opts = VduseOptions {
                    res: Some(res),
                    poll,
                    mandated,
                    unoffered,
                    bind,
                    bounce_size,
                    log_dir: Some(self.run_dir.clone()),
                };
                // Creating and binding waits for the kernel's probe of the device (its
                // driver's first requests): outside the registry lock would be nicer, but
                // names must stay unique while it runs.
                let server = match adopt {
                    None => VduseServer::start(&spec.name, dev.virtio(), opts)
                        .map_err(|e| error_chain(&e)),
                    Some(Handed::Vduse(h)) => VduseServer::adopt(&spec.name, dev.virtio(), opts, h)
                        .map_err(|e| error_chain(&e)),
                    Some(Handed::VhostUser(_)) => Err("vhost-user state for a VDUSE device".into()),
                };
                Served::Vduse(server.map_err(|reason| RegistryError::Create {
                    name: spec.name.clone(),
                    reason,
                })?)
            }
        };
        let (usecs, frames) = spec.coalesce;
        if usecs != 0 || frames != 0 {
            for q in 0..spec.num_queues() {
                let _ = server.vectors().set_coalesce(q, usecs, frames);
            }
        }
        info!(device = %spec.name, transport = spec.transport.name(), path = %server.path().display(), "device added");
        let m = Managed {
            spec,
            dev,
            server,
            entry,
        };
        let view = Self::view(&m);
        devs.insert(m.spec.name.clone(), m);
        Ok(view)
    }

    /// Removes a device: the frontend is disconnected (its vrings stopped after in-flight
    /// requests), file backends flushed, the socket removed.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`].
    pub fn del(&self, name: &str) -> Result<(), RegistryError> {
        let m = self
            .lock()
            .remove(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        self.capture_stop_device(name);
        // Disconnect the frontend: its workers finish their in-flight requests, hand their
        // rings back and drop their references to the device.
        m.server.shutdown();
        if let Err(e) = m.dev.virtio().flush() {
            warn!(device = name, "Flush on delete failed: {}", e.0);
        }
        let res = m.entry.del(DEL_TIMEOUT);
        info!(device = name, "device deleted");
        res.map_err(|e| {
            warn!(device = name, "{e}");
            RegistryError::StillHeld {
                name: name.into(),
                reason: e.to_string(),
            }
        })
    }

    /// Removes every device (daemon shutdown).
    pub fn del_all(&self) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for n in names {
            let _ = self.del(&n);
        }
    }

    fn captures(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ActiveCapture>> {
        self.captures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attaches a live capture of device `name` for IPC client `client` (process `pid`):
    /// virtqueue `qidx` only, or every data queue. A net device mirrors its frames, cut at
    /// `snaplen` bytes; a blk device writes one request trace record per completed request
    /// (`uvdpa_devices::blk::trace`, `snaplen` is ignored). Returns what was attached and
    /// the ring's memfd. The capture lasts until [`Registry::capture_stop`] for that client
    /// (its connection closed) or the device is deleted.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`] for a queue out of range,
    /// [`RegistryError::Capture`] for the control queue, a bad snaplen or no memory,
    /// [`RegistryError::CaptureBusy`] when the device or the client already has a
    /// capture.
    pub fn capture_start(
        &self,
        name: &str,
        qidx: Option<u32>,
        snaplen: u32,
        client: u64,
        pid: i32,
    ) -> Result<(CaptureView, OwnedFd), RegistryError> {
        let err = |reason: String| RegistryError::Capture {
            name: name.into(),
            reason,
        };
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let no_queue = |q: u32| RegistryError::NoQueue {
            name: name.into(),
            qidx: q,
            queues: m.spec.num_queues(),
        };
        // net: one sub-ring per queue pair, frames cut at snaplen; blk: one sub-ring per
        // queue, fixed-size request records.
        let (mgmtdev, point, queues, all_rings, snaplen) = match &m.dev {
            Dev::Net(spec, net) => {
                let pairs = spec.config.max_queue_pairs;
                let data_queues = 2 * u32::from(pairs);
                let queues: Vec<u16> = match qidx {
                    None => (0..2 * pairs).collect(),
                    Some(q) if q < data_queues => vec![q as u16],
                    Some(q) if q == data_queues => {
                        return Err(err(format!("queue {q} is the control queue")))
                    }
                    Some(q) => return Err(no_queue(q)),
                };
                let point = net.capture_point().clone();
                ("net", point, queues, u32::from(pairs), snaplen)
            }
            Dev::Blk(cfg, blk) => {
                let queues: Vec<u16> = match qidx {
                    None => (0..cfg.num_queues).collect(),
                    Some(q) if q < u32::from(cfg.num_queues) => vec![q as u16],
                    Some(q) => return Err(no_queue(q)),
                };
                let point = blk.trace_point().clone();
                let rec = blk_trace::RECORD_LEN as u32;
                ("blk", point, queues, u32::from(cfg.num_queues), rec)
            }
        };
        let mut caps = self.captures();
        if let Some(c) = caps.get(&client) {
            return Err(RegistryError::CaptureBusy {
                name: name.into(),
                reason: format!("this client already captures {}", c.device),
            });
        }
        let rings = if qidx.is_some() { 1 } else { all_rings };
        let per_ring =
            (CAPTURE_BUDGET / u64::from(rings)).clamp(CAPTURE_MIN_RING, CAPTURE_MAX_RING);
        let ring_size = 1u64 << (63 - per_ring.leading_zeros());
        let ring =
            CaptureRing::new(name, rings, ring_size, snaplen).map_err(|e| err(error_chain(&e)))?;
        let fd = ring
            .fd()
            .try_clone_to_owned()
            .map_err(|e| err(format!("cannot duplicate the ring's fd: {e}")))?;
        match point.attach(Arc::new(ring), qidx.map(|q| q as u16)) {
            Ok(()) => {}
            Err(CaptureError::Busy) => {
                let holder = caps
                    .values()
                    .find(|c| c.device == name)
                    .map(|c| format!(" (by {})", c.entry.id()))
                    .unwrap_or_default();
                return Err(RegistryError::CaptureBusy {
                    name: name.into(),
                    reason: format!("a capture is already attached{holder}"),
                });
            }
            Err(e) => return Err(err(error_chain(&e))),
        }
        let res_name = match qidx {
            Some(q) => format!("{name}-q{q}"),
            None => name.to_string(),
        };
        let entry = self.tracker.create(
            ResType::Capture,
            res_name,
            Some(m.entry.id()),
            Owner::of_pid(u32::try_from(pid).unwrap_or(0)),
        );
        entry.add();
        let view = CaptureView {
            name: name.into(),
            mgmtdev: mgmtdev.into(),
            queues,
            rings,
            ring_size,
            snaplen,
            res: entry.id().to_string(),
        };
        info!(device = name, client, pid, queues = ?view.queues, "capture attached");
        caps.insert(
            client,
            ActiveCapture {
                device: name.into(),
                point,
                entry,
            },
        );
        Ok((view, fd))
    }

    /// Detaches the capture of IPC client `client`, if it has one (its connection
    /// closed). Returns whether it had one.
    pub fn capture_stop(&self, client: u64) -> bool {
        let Some(c) = self.captures().remove(&client) else {
            return false;
        };
        c.point.detach();
        info!(device = %c.device, client, "capture detached");
        let _ = c.entry.del(Duration::ZERO);
        true
    }

    /// Detaches the captures of device `name` (it is being deleted).
    fn capture_stop_device(&self, name: &str) {
        let gone: Vec<ActiveCapture> = {
            let mut caps = self.captures();
            let ids: Vec<u64> = caps
                .iter()
                .filter(|(_, c)| c.device == name)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter().filter_map(|id| caps.remove(&id)).collect()
        };
        for c in gone {
            c.point.detach();
            let _ = c.entry.del(Duration::ZERO);
        }
    }

    fn view(m: &Managed) -> DeviceView {
        let st = m.server.session_state();
        let status = DeviceStatus::from_bits_retain(st.status);
        let state = if !st.connected {
            "ready"
        } else if status.contains(DeviceStatus::DEVICE_NEEDS_RESET) {
            "needs-reset"
        } else if status.contains(DeviceStatus::DRIVER_OK) || st.running_vrings > 0 {
            "live"
        } else {
            "connected"
        };
        let path = m.server.path();
        let sock = path.as_path();
        let vduse = matches!(m.spec.transport, Transport::Vduse { .. });
        let mut v = DeviceView {
            name: m.spec.name.clone(),
            mgmtdev: m.spec.mgmtdev().into(),
            transport: m.spec.transport.name().into(),
            vdpa: None,
            kernel_dev: None,
            backend: String::new(),
            socket: sock.display().to_string(),
            state: state.into(),
            status: status.names().into_iter().map(String::from).collect(),
            features: feature_names(st.features, m.spec.mgmtdev()),
            frontend_pid: st.frontend_pid,
            queues: m.spec.num_queues(),
            queue_size: m.spec.queue_size(),
            max_memory: (!vduse).then_some(m.spec.max_memory),
            capacity: None,
            read_only: None,
            aio: None,
            mac: None,
            mtu: None,
            max_vqp: None,
            qemu: String::new(),
            testpmd: None,
        };
        match &m.dev {
            Dev::Blk(cfg, blk) => {
                v.backend = cfg.backend.name().into();
                v.capacity = Some(blk.capacity_bytes());
                v.read_only = Some(blk.read_only());
                v.aio = blk.aio().map(|a| a.as_str().into());
                v.qemu = qemu_command_line(&m.spec.name, cfg.num_queues, cfg.queue_size, sock);
            }
            Dev::Net(n, _) => {
                let mac = MacDisplay(n.config.mac).to_string();
                let pairs = n.config.max_queue_pairs;
                v.backend = net_backend_name(&n.backend).into();
                v.qemu = qemu_net_command_line(pairs, &mac, n.config.mtu, sock);
                v.testpmd = Some(testpmd_vdev(pairs, sock));
                v.mac = Some(mac);
                v.mtu = Some(n.config.mtu);
                v.max_vqp = Some(pairs);
            }
        }
        if vduse {
            // Not a socket: the kernel's driver is attached through the vDPA bus.
            v.testpmd = None;
            (v.vdpa, v.kernel_dev) = vdpa_sysfs(&m.spec.name);
            v.qemu = match &v.kernel_dev {
                Some(d) if d.starts_with("vhost-vdpa-") => format!(
                    "qemu-system-x86_64 ... -device vhost-vdpa-device-pci,vhostdev=/dev/{d} ..."
                ),
                _ => String::new(),
            };
        }
        v
    }

    /// Views of one device or of all, sorted by name.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] for an unknown name.
    pub fn show(&self, name: Option<&str>) -> Result<Vec<DeviceView>, RegistryError> {
        let devs = self.lock();
        match name {
            Some(n) => devs
                .get(n)
                .map(|m| vec![Self::view(m)])
                .ok_or_else(|| RegistryError::NotFound(n.into())),
            None => Ok(devs.values().map(Self::view).collect()),
        }
    }

    /// The decoded config space of a device (net: with its backend and the features the
    /// driver negotiated).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`].
    pub fn config(&self, name: &str) -> Result<ConfigView, RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        match &m.dev {
            Dev::Blk(_, blk) => {
                let c = blk.config_space();
                Ok(ConfigView::Blk(BlkConfigView {
                    name: name.into(),
                    capacity: c.capacity,
                    size_max: c.size_max,
                    seg_max: c.seg_max,
                    blk_size: c.blk_size,
                    num_queues: c.num_queues,
                    max_discard_sectors: c.max_discard_sectors,
                    max_discard_seg: c.max_discard_seg,
                    discard_sector_alignment: c.discard_sector_alignment,
                    max_write_zeroes_sectors: c.max_write_zeroes_sectors,
                    max_write_zeroes_seg: c.max_write_zeroes_seg,
                    write_zeroes_may_unmap: c.write_zeroes_may_unmap != 0,
                    aio: blk.aio().map(|a| a.as_str().into()),
                }))
            }
            Dev::Net(spec, net) => {
                // What the driver reads (the MAC may have been changed on the control
                // queue); the configured values if the space cannot be decoded.
                let c = VirtioNetConfig::from_le_bytes(&net.config())
                    .unwrap_or_else(|| spec.config.virtio_config());
                let st = m.server.session_state();
                let (tap, switch, frame_len) = match &spec.backend {
                    NetBackendSpec::Tap { .. } => (net.tap_name().map(String::from), None, None),
                    NetBackendSpec::Switch { name } => (None, Some(name.clone()), None),
                    NetBackendSpec::Source { frame_len } => (None, None, Some(*frame_len)),
                    NetBackendSpec::Loopback | NetBackendSpec::Sink => (None, None, None),
                };
                Ok(ConfigView::Net(NetConfigView {
                    name: name.into(),
                    mac: MacDisplay(c.mac).to_string(),
                    mtu: c.mtu,
                    max_vqp: c.max_virtqueue_pairs,
                    link: if c.status & VIRTIO_NET_S_LINK_UP != 0 {
                        "up"
                    } else {
                        "down"
                    }
                    .into(),
                    backend: net_backend_name(&spec.backend).into(),
                    tap,
                    switch,
                    frame_len,
                    negotiated_features: feature_names(st.features, "net"),
                }))
            }
        }
    }

    fn with_server<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Managed) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        f(m)
    }

    /// The interrupt vector table of a device.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`].
    pub fn irq_show(&self, name: &str) -> Result<Vec<VectorView>, RegistryError> {
        self.with_server(name, |m| {
            Ok(m.server
                .vectors()
                .snapshot()
                .into_iter()
                .map(|v| VectorView {
                    vec: v.index,
                    trigger: v.has_trigger,
                    masked: v.masked,
                    pending: v.pending,
                    coalesce_usecs: v.max_delay_us,
                    coalesce_frames: v.max_batch,
                    signals: v.counters.signals(),
                    suppressed_event_idx: v.counters.suppressed_event_idx,
                    suppressed_coalesced: v.counters.suppressed_coalesced,
                    suppressed_masked: v.counters.suppressed_masked,
                })
                .collect())
        })
    }

    /// Fires vector `vec` by hand (DATA_NONE for one vector); returns whether a signal
    /// was sent (false without a trigger, or masked).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`] for a vector out of range.
    pub fn irq_trigger(&self, name: &str, vec: u32) -> Result<bool, RegistryError> {
        self.with_server(name, |m| {
            let v = u16::try_from(vec).unwrap_or(u16::MAX);
            m.server
                .vectors()
                .trigger(v)
                .map_err(|_| RegistryError::NoQueue {
                    name: name.into(),
                    qidx: vec,
                    queues: m.spec.num_queues(),
                })
        })
    }

    /// Sets a queue vector's coalescing (µs, completion batches; 0/0 = off).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`].
    pub fn set_coalesce(
        &self,
        name: &str,
        qidx: u32,
        usecs: u32,
        frames: u32,
    ) -> Result<(), RegistryError> {
        self.with_server(name, |m| {
            let v = u16::try_from(qidx).unwrap_or(u16::MAX);
            m.server
                .vectors()
                .set_coalesce(v, usecs, frames)
                .map_err(|_| RegistryError::NoQueue {
                    name: name.into(),
                    qidx,
                    queues: m.spec.num_queues(),
                })
        })
    }

    /// Changes the capacity of blk device `name` to `bytes` while it is served (qemu's
    /// `block_resize`; see [`BlkDevice::resize`] for what each backend does), then tells
    /// the driver through the transport (a configuration change notification). Returns
    /// the device's view and whether the driver was notified.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::Set`] for a net device, a read-only
    /// one, a size that is not a positive multiple of the logical block size, or one the
    /// backend cannot take.
    pub fn set_capacity(
        &self,
        name: &str,
        bytes: u64,
    ) -> Result<(DeviceView, bool), RegistryError> {
        let mut devs = self.lock();
        let m = devs
            .get_mut(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let set_err = |reason: String| RegistryError::Set {
            name: name.into(),
            attr: "capacity",
            reason,
        };
        let Dev::Blk(cfg, blk) = &mut m.dev else {
            return Err(set_err("only blk devices have a capacity".into()));
        };
        let old = blk.resize(bytes).map_err(|e| set_err(error_chain(&e)))?;
        match &mut cfg.backend {
            BackendSpec::Ram { size } | BackendSpec::Null { size } => *size = bytes,
            BackendSpec::File { .. } | BackendSpec::Nbd(_) | BackendSpec::Rbd(_) => {}
        }
        let notified = m.server.config_changed(name);
        info!(
            device = name,
            old,
            new = bytes,
            notified,
            "capacity changed"
        );
        Ok((Self::view(m), notified))
    }

    /// Handles to every device's counters for one metrics scrape, sorted by name.
    pub fn metrics_sources(&self) -> Vec<MetricsSource> {
        let devs = self.lock();
        devs.values()
            .map(|m| {
                let st = m.server.session_state();
                let kind = match &m.dev {
                    Dev::Blk(_, blk) => MetricsKind::Blk(blk.clone()),
                    Dev::Net(n, _) => {
                        let negotiated = if st.features == 0 {
                            VirtioFeatures::VIRTIO_NET_F_MQ
                        } else {
                            VirtioFeatures::from_raw(st.features)
                        };
                        MetricsKind::Net(
                            (0..m.spec.num_queues())
                                .map(|i| QueueRole::of(i, n.config.max_queue_pairs, negotiated))
                                .collect(),
                        )
                    }
                };
                MetricsSource {
                    name: m.spec.name.clone(),
                    transport: m.spec.transport.name(),
                    status: st.status,
                    connected: st.connected,
                    stats: m.server.stats().clone(),
                    sessions: m.server.sessions(),
                    kind,
                }
            })
            .collect()
    }

    /// Names of the devices served, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Counters of queue `qidx`, and a duplicate of the stats table's memfd with its
    /// number of entries (for live watching by the CLI).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`], [`RegistryError::NoQueue`].
    pub fn vstats(
        &self,
        name: &str,
        qidx: u32,
    ) -> Result<(QueueStatsView, Option<std::os::fd::OwnedFd>, usize), RegistryError> {
        let devs = self.lock();
        let m = devs
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let table = m.server.stats();
        let q = table.queue(qidx as usize).ok_or(RegistryError::NoQueue {
            name: name.into(),
            qidx,
            queues: m.spec.num_queues(),
        })?;
        let view = match &m.dev {
            Dev::Blk(..) => QueueStatsView::Blk(vstats_view(name, qidx, q)),
            Dev::Net(n, _) => {
                // Before a driver negotiated features, the layout of a device with MQ.
                let st = m.server.session_state();
                let negotiated = if st.features == 0 {
                    VirtioFeatures::VIRTIO_NET_F_MQ
                } else {
                    VirtioFeatures::from_raw(st.features)
                };
                let role = u16::try_from(qidx)
                    .ok()
                    .and_then(|i| QueueRole::of(i, n.config.max_queue_pairs, negotiated));
                QueueStatsView::Net(net_vstats_view(name, qidx, role, q))
            }
        };
        Ok((view, table.fd().try_clone_to_owned().ok(), table.queues()))
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
